"""BatchTimer: a callback that records when each training batch starts, to measure steady-state speed.

Add it to any fit from the command line (the run is otherwise untouched):
    python main.py fit --config configs/cifar.yaml --trainer.callbacks+ bench.timer.BatchTimer \
        --trainer.callbacks.output times.json
"""

import json
import os
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback


class BatchTimer(Callback):
    """Writes {"batch_size", "starts": [seconds], "epochs": [each start's epoch], "peak_rss_mb", "epoch_rss_mb": [MB after each training
    epoch], "threads"} to `output` when training ends.

    Args:
        output: JSON file to write.
    """

    def __init__(self, output: str = "batch_times.json"):
        self.output = output
        self.starts: list[float] = []
        self.epochs: list[int] = []  # each start's epoch
        self.epoch_rss_mb: list[float] = []
        self.batch_size = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # on a GPU, time finished work, not queued work
        self.starts.append(time.perf_counter())
        self.epochs.append(trainer.current_epoch)
        self.batch_size = len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        self.epoch_rss_mb.append(resident_pages * resource.getpagesize() / 2**20)

    def on_train_end(self, trainer, pl_module) -> None:
        # This process's own peak: VmHWM, not ru_maxrss, which Linux carries over from the parent at exec (a child
        # of a 2.6 GB pytest process "peaked" at 2.6 GB, its own memory never over 1.1 GB).
        status = Path("/proc/self/status").read_text()
        peak_mb = next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
        Path(self.output).write_text(json.dumps({"batch_size": self.batch_size, "starts": self.starts,
                                                 "epochs": self.epochs,
                                                 "peak_rss_mb": peak_mb, "epoch_rss_mb": self.epoch_rss_mb,
                                                 "threads": torch.get_num_threads()}))  # fmt: skip


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux: /proc), imports and start-up included."""
    started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")


class FitTimer(Callback):
    """Prints where a fit's wall time goes, in one line at its end:
    `fit phases: start-up and data N s, training loop N s (validation N s), loop N s`. On a GPU the clock reads
    wait for queued work (two syncs per validation, one at each phase's edge), not per step.
    """

    def __init__(self):
        self.marks: dict[str, float] = {}
        self.validation = 0.0

    def now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return seconds_since_process_start()

    def on_train_start(self, trainer, pl_module) -> None:
        self.marks["train_start"] = self.now()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.marks["validation_start"] = self.now()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validation += self.now() - self.marks["validation_start"]

    def on_train_end(self, trainer, pl_module) -> None:
        loop = self.now() - self.marks["train_start"]
        print(f"fit phases: start-up and data {self.marks['train_start']:.1f} s, training loop {loop:.1f} s "
              f"(validation {self.validation:.1f} s), fit loop: {loop - self.validation:.1f} s", flush=True)  # fmt: skip

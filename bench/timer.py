"""BatchTimer: a callback that records when each training batch starts, to measure steady-state speed.

Add it to any fit from the command line (the run is otherwise untouched):
    python main.py fit --config configs/cifar.yaml --trainer.callbacks+ bench.timer.BatchTimer \
        --trainer.callbacks.output times.json
"""

import json
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback


class BatchTimer(Callback):
    """Writes {"batch_size", "starts": [seconds], "peak_rss_mb", "epoch_rss_mb": [MB after each training
    epoch], "threads"} to `output` when training ends.

    Args:
        output: JSON file to write.
    """

    def __init__(self, output: str = "batch_times.json"):
        self.output = output
        self.starts: list[float] = []
        self.epoch_rss_mb: list[float] = []
        self.batch_size = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # on a GPU, time finished work, not queued work
        self.starts.append(time.perf_counter())
        self.batch_size = len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        self.epoch_rss_mb.append(resident_pages * resource.getpagesize() / 2**20)

    def on_train_end(self, trainer, pl_module) -> None:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        Path(self.output).write_text(json.dumps({"batch_size": self.batch_size, "starts": self.starts,
                                                 "peak_rss_mb": peak_mb, "epoch_rss_mb": self.epoch_rss_mb,
                                                 "threads": torch.get_num_threads()}))  # fmt: skip

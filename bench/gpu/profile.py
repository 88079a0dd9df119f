"""EpochProfile: torch's profiler over one whole training epoch, summarized where the time goes.

    python main.py fit --config configs/fast.yaml --trainer.max_epochs 2 \
        --trainer.callbacks+=bench.gpu.profile.EpochProfile --trainer.callbacks.output profile.txt

Profiles epoch `epoch` (default 1: the first is warm-up, cuDNN's autotuning and allocator growth) and writes
to `output` where the epoch's wall time went: inside Lightning's batch hooks (forward, backward, optimizer: a
host range of our own) and outside them (fetching the batch, its transfer and augmentation, Lightning's loop,
logging, checkpoints), the backward and optimizer shares, and the device's busy time; then torch's table of
the top ops by device time (CPU time without a GPU).
"""

import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.profiler import ProfilerActivity, profile, record_function


class EpochProfile(Callback):
    """Args:
    output: Text file for the summary and the table; None: the table is printed too (after the summary).
    epoch: The training epoch to profile (0-based).
    rows: Rows of torch's op table.
    """

    def __init__(self, output: str | None = "profile.txt", epoch: int = 1, rows: int = 30):
        self.output, self.epoch, self.rows = output, epoch, rows
        self.profiler: profile | None = None
        self.ranges: list = []
        self.steps = 0

    def _open(self, name: str) -> None:
        if self.profiler is not None:
            self.ranges.append(record_function(name).__enter__())

    def _close(self) -> None:
        if self.profiler is not None and self.ranges:
            self.ranges.pop().__exit__(None, None, None)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            return
        cuda = torch.cuda.is_available()
        self.profiler = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
        self.profiler.__enter__()
        self.started = time.perf_counter()

    # Host ranges around the parts of a step that Lightning exposes as hooks: the step's own forward/backward
    # and optimizer ranges come from torch (autograd, `Optimizer.step#...`), the rest is Lightning and logging.
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._open("step: forward, backward, optimizer")
        self.steps += self.profiler is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._close()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.profiler is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        device = "cuda" if torch.cuda.is_available() else "cpu"

        def host_ms(match) -> float:
            return sum(e.cpu_time_total for e in events if match(e.key)) / 1e3

        def device_ms(match) -> float:
            return sum(getattr(e, "device_time_total", 0) for e in events if match(e.key)) / 1e3 if device == "cuda" else 0.0

        parts = {
            "training step (forward, backward, optimizer)": lambda k: k.startswith("step: "),
            "optimizer step (Lightning runs forward and backward inside it, as its closure)":
                lambda k: k.startswith("Optimizer.step#"),
            "backward": lambda k: k.startswith("autograd::engine::evaluate_function"),
        }
        step_ms = host_ms(parts["training step (forward, backward, optimizer)"])
        lines = [f"epoch {self.epoch}: {self.steps} steps, {wall:.3f} s wall ({1e3 * wall / max(self.steps, 1):.2f} ms a step)",
                 f"  host time inside Lightning's batch hooks (step): {step_ms / 1e3:.3f} s; outside (data, Lightning's "
                 f"loop, logging, checkpoint): {wall - step_ms / 1e3:.3f} s"]  # fmt: skip
        for name, match in parts.items():
            lines.append(f"  {name}: host {host_ms(match):.1f} ms" + (f", device {device_ms(match):.1f} ms" if device == "cuda" else ""))
        if device == "cuda":
            busy = sum(e.self_device_time_total for e in events) / 1e3
            lines.append(f"  device busy (sum of kernel times): {busy:.1f} ms of {1e3 * wall:.1f} ms wall")
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        table = events.table(sort_by=sort, row_limit=self.rows)
        if self.output:
            Path(self.output).write_text("\n".join(lines) + "\n\n" + table + "\n")
        print("\n".join(lines) + ("" if self.output else "\n\n" + table), flush=True)
        self.profiler = None

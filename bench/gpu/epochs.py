"""EpochTimes: one line for each training epoch as it ends, so that a run stopped at a time limit still shows how far
it got and how fast. With `--model.compile true` the first epoch includes the compilation; the next ones are the
compiled speed.

    python main.py fit --config configs/fast.yaml --model.compile true --trainer.callbacks+=bench.gpu.epochs.EpochTimes
"""

import time

import torch
from lightning.pytorch import Callback


class EpochTimes(Callback):
    """Prints `epoch N: S steps in T s (M ms a step)` at each training epoch's end (on a GPU, after its queued work)."""

    def now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # at the epoch's edges only: the steps between stay unsynced
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started, self.steps = self.now(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = self.now() - self.started
        print(f"epoch {trainer.current_epoch}: {self.steps} steps in {seconds:.2f} s "
              f"({1e3 * seconds / max(self.steps, 1):.1f} ms a step)", flush=True)  # fmt: skip

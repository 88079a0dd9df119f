"""Test-side Lightning callbacks that a test adds to a real CLI run from the command line, so that a fault test
acts at a fixed training step instead of after a wall-clock sleep:

    --trainer.callbacks+=signals.SignalAt --trainer.callbacks.step 30 --trainer.callbacks.signal SIGTERM

`cli_env` (conftest.py) puts tests/ on the subprocess's PYTHONPATH; in process, pytest has it on sys.path.
"""

import os
import signal as signals
from pathlib import Path

from lightning.pytorch import Callback


class SignalAt(Callback):
    """When training has taken `step` optimizer steps (at the end of that batch, on rank `rank` only; every rank
    if None): write the file `touch` (a test waiting for the run to be "in training" polls for it) and send
    this process `signal` (SIGTERM, SIGINT, SIGKILL), as `kill` or Ctrl-C would from outside. Once per process.

    Args:
        step: The trainer's global step after which to act.
        signal: The signal's name, or None to only write `touch`.
        touch: A file to create, or None.
        rank: The global rank that acts, or None for every rank.
    """

    def __init__(self, step: int, signal: str | None = None, touch: str | None = None, rank: int | None = 0):
        self.step, self.signal, self.touch, self.rank = step, signal, touch, rank
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done or trainer.global_step < self.step or self.rank not in (None, trainer.global_rank):
            return
        self.done = True
        if self.touch:
            Path(self.touch).write_text(f"{trainer.global_step}\n")
        if self.signal:
            os.kill(os.getpid(), getattr(signals, self.signal))


class SignalWorkerOnce(Callback):
    """In a sweep trial's `fit`: when training has taken `step` steps, send the sweep worker (this process's parent)
    `signal` (SIGKILL, SIGINT), unless the file `marker` exists, which it writes first: once per test, whichever
    trial gets there first.

    Args:
        marker: The file that says it was done.
        signal: The signal's name.
        step: The trainer's global step after which to act.
    """

    def __init__(self, marker: str, signal: str, step: int = 1):
        self.marker, self.signal, self.step = Path(marker), signal, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step < self.step or self.marker.exists():
            return
        self.marker.write_text(f"{os.getpid()} {trainer.global_step}\n")
        os.kill(os.getppid(), getattr(signals, self.signal))

"""Stopping a fit cleanly on a signal, and resuming it as if it had never stopped."""

import os
import signal
import sys

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Stopped(SystemExit):
    """Training stopped by a signal: exits 128 + its number (130 Ctrl-C, 143 SIGTERM), as a shell reports a process
    the signal ended, so a scheduler knows the run did not finish."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopOnSignal(Callback):
    """The first Ctrl-C or SIGTERM in training stops it before the next batch, on every rank at the same batch:
    ModelCheckpoint's `save_on_exception` saves the state, and the process exits with `Stopped`. A second Ctrl-C
    stops at once. It replaces Lightning's SIGTERM handler during training (Lightning restores the earlier ones
    after it), which under DDP runs a collective inside the signal handler and lets each rank stop at its own batch:
    a rank then waits forever in a collective the others never join (Ctrl-C on a 2-process fit: both still alive
    80 s later). Here a signal only sets a flag.

    Args:
        check_every: Under DDP, the ranks agree whether to stop every this many batches (an all-reduce: a host sync).
    """

    def __init__(self, check_every: int = 8):
        self.check_every = check_every
        self.requested: int | None = None  # the signal this process received
        self.stopped: Stopped | None = None
        self.trainer: Trainer | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trainer = trainer
        for signum in NAMES:
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:  # the second Ctrl-C: now
            if self.trainer is not None and self.trainer.world_size > 1:
                # Any unwinding would run collectives the other ranks may never join: leave at once.
                print("Ctrl-C again: stopping now, without a checkpoint", file=sys.stderr, flush=True)
                os._exit(130)
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum
            again = " (Ctrl-C again: stop now)" if signum == signal.SIGINT else ""
            rank_zero_info(f"{NAMES[signum]}: stopping after this batch and saving a checkpoint{again}")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        # Here, not after the batch: Lightning counts a batch as done (which a resume skips) only after its
        # on_train_batch_end hooks and learning-rate step have run.
        stop = self.requested is not None
        if trainer.world_size > 1:
            if batch_idx % self.check_every:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)  # a signal to any rank stops them all
        if stop:
            self.stopped = Stopped(self.requested or signal.SIGTERM)
            raise self.stopped

    def report(self) -> str:
        """One line: what stopped the run and where its checkpoint is."""
        saved = [cb.last_model_path for cb in self.trainer.checkpoint_callbacks if cb.last_model_path]
        where = f"checkpoint saved to {saved[0]}; resume with --ckpt_path last" if saved else "no checkpoint saved"
        return f"stopped by {NAMES[self.stopped.signum]} before the run finished: {where}"


class RandomState(Callback):
    """Lightning saves no RNG state; this saves torch's (CPU and each CUDA device's) in every checkpoint, so a
    resumed fit draws what the uninterrupted run would from the global RNG (dropout, a network's own draws; the
    epoch's order and the augmentation have their own generators). Restored by a resumed `fit` only, and for CUDA
    only on the devices this process has: a checkpoint saved on 8 GPUs resumes on fewer."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":  # Lightning calls this in validate and test too
            return
        state = checkpoint.get("rng_state", {})  # the key LitModel used before: older checkpoints resume alike
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if torch.cuda.is_available():
            for device, cuda_state in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)

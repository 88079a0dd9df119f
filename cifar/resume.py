"""Exact resume: a fit stopped by a signal, or killed, continues as if it had never stopped. Checkpoints are whole or
absent, and hold what the fit draws from: torch's RNG state, the place in the epoch's order, and the seed that keys
each training batch's augmentation by its place alone."""

import hashlib
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def epoch_progress(trainer: Trainer):
    """Lightning's count of this epoch's batches (`ready`: fetched, `completed`: trained on), which a resumed fit
    restores: its loop's state, read only here (no public hook of a data module sees it)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current


def batch_key(*parts) -> int:
    """A seed in [0, 2**63) that depends on `parts` alone (e.g. run seed, DDP rank, epoch, batch in the epoch)."""
    return int.from_bytes(hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def batch_generator(device: torch.device, seed: int, rank: int, epoch: int, batch: int) -> torch.Generator:
    """A training batch's generator on `device`, seeded by its place alone: a resumed run draws what the straight run
    drew for it, and each rank its own. Seeding costs no device sync."""
    return torch.Generator(device).manual_seed(batch_key(seed, rank, epoch, batch))


class Stopped(SystemExit):
    """Training stopped by a signal: exits 128 + its number (130 Ctrl-C, 143 SIGTERM), as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopOnSignal(Callback):
    """The first Ctrl-C or SIGTERM in training stops it before the next batch, on every rank at the same batch, and
    ModelCheckpoint's `save_on_exception` saves it; a second Ctrl-C stops at once. (Lightning's SIGTERM handler runs
    a collective inside the handler under DDP, and the ranks stop at different batches and wait for each other.)

    Args:
        check_every: Under DDP, the ranks agree whether to stop every this many batches (an all-reduce: a host sync).
    """

    def __init__(self, check_every: int = 8):
        self.check_every = check_every
        self.requested: int | None = None  # the signal this process received
        self.stopped: Stopped | None = None
        self.trainer: Trainer | None = None

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        self.trainer = trainer
        for signum in NAMES:
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:  # the second Ctrl-C: now
            if self.trainer is not None and self.trainer.world_size > 1:  # unwinding would run collectives: leave
                print("Ctrl-C again: stopping now, without a checkpoint", file=sys.stderr, flush=True)
                os._exit(130)
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum
            again = " (Ctrl-C again: stop now)" if signum == signal.SIGINT else ""
            rank_zero_info(f"{NAMES[signum]}: stopping after this batch and saving a checkpoint{again}")

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        # Before the batch: Lightning counts a batch done (a resume skips it) only after its on_train_batch_end.
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
    """torch's RNG state (CPU and CUDA) in every checkpoint, which Lightning leaves out, restored by `fit` alone; CUDA
    only on the devices this process has (a checkpoint of 8 GPUs resumes on fewer)."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get("rng_state", {})
        if trainer.state.fn != "fit" or "torch" not in state:  # Lightning calls this in validate and test too
            return
        torch.set_rng_state(state["torch"])
        for device, cuda_state in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Each checkpoint whole or not at all: written beside the target, fsynced, renamed over it. (Lightning's own
    save stages it in the system's temp folder: a move from another filesystem is a copy, and a kill leaves half.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        os.fsync(directory)  # the rename, durable
        os.close(directory)


class EpochShuffle(DistributedSampler):
    """DistributedSampler's order (from the seed and the epoch alone; this rank's shard), which can start part-way
    through an epoch. Not a RandomSampler, which draws from the global RNG; and Lightning does not wrap it."""

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip: tuple[int, int] | None = None  # (epoch, samples of this rank's shard already trained on)

    def __iter__(self):
        start = self.skip[1] if self.skip and self.skip[0] == self.epoch else 0
        self.skip = None
        return iter(list(super().__iter__())[start:])


class ResumableLoader(DataLoader):
    """A DataLoader whose place in the epoch and order's seed go into checkpoints (Lightning saves a loader's
    `state_dict`): a fit stopped mid-epoch resumes with the next batch. The place is Lightning's count of trained
    batches (the loader's own runs ahead); under DDP rank 0's count is every rank's, so a mid-epoch resume needs the
    same number of ranks."""

    trainer: Trainer | None = None  # set by the data module

    def state_dict(self) -> dict:
        done = epoch_progress(self.trainer).completed if self.trainer else 0
        return {"epoch": self.sampler.epoch, "samples": done * self.batch_size, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.skip = (state["epoch"], state["samples"])
        self.sampler.seed = state["seed"]

"""Checkpoints written whole or not at all, and read without running any code they may carry."""

import os
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cifar.errors import UserError, first_line


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each checkpoint whole or not at all: to a temporary file beside the target, fsynced, then
    renamed over it, and the directory fsynced. A crash or kill mid-save leaves the previous file intact."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)  # atomic within one filesystem, which the same directory guarantees
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with `weights_only=True` (no code in it can run), or fail with a clear message."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # zip, pickle and unsafe-type errors all mean "not a checkpoint we load"
        reason = first_line(error)
        raise UserError(f"{path} is not a readable Lightning checkpoint ({reason[:200]})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint

"""`--ckpt_path best|last` in a new process: find the checkpoint on disk, since "best" lived in fit's memory.

The rule: every run writes its checkpoints to `<trainer.default_root_dir>/<run>/checkpoints/`. The
most recent run is the one whose checkpoint directory holds the most recently written `.ckpt`.
`last` is its `last.ckpt`; `best` is the `best_model_path` that its first ModelCheckpoint recorded in
that newest checkpoint (Lightning saves the callback's state in every checkpoint it writes).
"""

import os
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cifar.errors import UserError


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


def latest_run_checkpoints(root: Path) -> list[Path]:
    """Checkpoints of the most recent run under `root`, newest first."""
    runs = [d for d in root.glob("*/checkpoints") if any(d.glob("*.ckpt"))]
    if not runs:
        return []
    newest = max(runs, key=lambda d: max(f.stat().st_mtime for f in d.glob("*.ckpt")))
    return sorted(newest.glob("*.ckpt"), key=lambda f: f.stat().st_mtime, reverse=True)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with `weights_only=True` (no code in it can run), or fail with a clear message."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # zip, pickle and unsafe-type errors all mean "not a checkpoint we load"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a readable Lightning checkpoint ({reason[:200]})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def recorded_best_path(checkpoint: dict) -> str | None:
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and state.get("best_model_path"):
            return state["best_model_path"]
    return None


def resolve_checkpoint(ckpt_path: str, root: Path) -> Path:
    """The checkpoint file meant by `ckpt_path`: 'best', 'last' (see the module's rule) or a path, checked."""
    if ckpt_path not in ("best", "last"):
        path = Path(ckpt_path)
        load_checkpoint(path)
        return path
    checkpoints = latest_run_checkpoints(root)
    if not checkpoints:
        raise UserError(f"--ckpt_path {ckpt_path}: no checkpoints under {root}/*/checkpoints/. Run fit with this "
                        f"config first, or pass the path of a .ckpt file")  # fmt: skip
    directory = checkpoints[0].parent
    if ckpt_path == "last":
        path = directory / "last.ckpt"
        if not path.exists():
            raise UserError(f"--ckpt_path last: the latest run, {directory}, has no last.ckpt (set "
                            f"save_last: true on ModelCheckpoint); pass a checkpoint path instead")  # fmt: skip
        load_checkpoint(path)
        return path
    best = recorded_best_path(load_checkpoint(checkpoints[0]))
    if best is None:
        raise UserError(f"--ckpt_path best: {checkpoints[0]} records no best checkpoint (ModelCheckpoint needs "
                        f"a monitor); use --ckpt_path last or a path")  # fmt: skip
    path = directory / Path(best).name  # by name, so a moved or copied runs folder still resolves
    load_checkpoint(path)
    return path

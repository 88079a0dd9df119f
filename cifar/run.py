"""The run record: a command's directory, id and lock, which checkpoint `best`/`last` means, what a checkpoint's
lineage trained on, and whether a command may evaluate it on its images. The rules are README's "Runs"."""

import contextlib
import fcntl
import json
import os
import secrets
import socket
import string
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from cifar import loggers
from cifar.errors import UserError, first_line
from cifar.readers import describe_source

RECORD, LOCK = "run.json", ".lock"
OVERLAPS = "overlaps training data"  # the mark on results evaluated on training images
NEVER = "0001-01-01T00:00:00+00:00"  # the start of a run that recorded none
CONFIG_KEYS = ("seed_everything", "trainer", "model", "data")  # a checkpoint's config: not the command's own keys,
PLACE_KEYS = ("accelerator", "strategy", "devices", "num_nodes")  # nor where it ran (8 GPUs' checkpoint, 1 CPU's test)


def read_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def run_of(ckpt_path: str | Path) -> Path | None:
    """The run directory a checkpoint is in (`<run>/checkpoints/<name>.ckpt`), or None."""
    run_dir = Path(ckpt_path).resolve().parent.parent
    return run_dir if Path(ckpt_path).parent.name == "checkpoints" and (run_dir / RECORD).exists() else None


def latest_run(root: Path) -> Path | None:
    """The run under `root` (one or two levels down) with checkpoints whose last recorded start is the latest."""
    runs = [r.parent for r in (*root.glob(f"*/{RECORD}"), *root.glob(f"*/*/{RECORD}"))]
    starts = {r: read_record(r).get("starts") or [NEVER] for r in runs if any(r.glob("checkpoints/*.ckpt"))}
    return max(starts, key=lambda r: (max(map(datetime.fromisoformat, starts[r])), r.name), default=None)


def find_checkpoint(ckpt_path: str, root: Path) -> Path:
    """The file `--ckpt_path` means: a path, or `last`/`best` of the latest run under `root` (file times never
    count), as its run.json names them."""
    if ckpt_path not in ("best", "last"):
        return Path(ckpt_path)
    if (run_dir := latest_run(root)) is None:
        raise UserError(f"--ckpt_path {ckpt_path}: no run with checkpoints under {root}/. Run fit first, or pass "
                        f"the path of a .ckpt file")  # fmt: skip
    name = "last.ckpt" if ckpt_path == "last" else read_record(run_dir).get("best")
    path = run_dir / "checkpoints" / (name or "")
    if not (name and path.is_file()):
        what = "last.ckpt (set save_last: true on ModelCheckpoint)" if ckpt_path == "last" else "best checkpoint"
        raise UserError(f"--ckpt_path {ckpt_path}: the latest run, {run_dir}, has no {what}; pass a checkpoint path")
    rank_zero_info(f"--ckpt_path {ckpt_path}: {path} (the latest run under {root})")
    return path


def load_checkpoint(path: Path) -> dict:
    """A checkpoint read with `weights_only=True` (no code in it can run), or a UserError that says why not."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # zip, pickle and unsafe-type errors all mean "not a checkpoint we load"
        raise UserError(f"{path} is not a readable Lightning checkpoint ({first_line(error)[:200]})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def config_of(checkpoint: dict) -> dict:
    """The config a checkpoint trained with: its run's; from outside this app, its model's hyperparameters."""
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k != "_instantiator"}
    return (checkpoint.get("run") or {}).get("config") or ({"model": hparams} if hparams else {})


def lineage(checkpoint: dict | None, ckpt_path: str | None) -> list[dict]:
    """What a checkpoint's weights trained on, an entry per split ({source, split, held_out}); an ancestor that kept
    no record is an entry {unknown: why}, and what the lineage trained on stays unknown from then on."""
    record = (checkpoint or {}).get("run", {}).get("trained_on") if checkpoint else []
    return [{"unknown": f"checkpoint {ckpt_path} kept no record of its data"}] if record is None else record


def this_fit(trained_on: list[dict], dm) -> list[dict]:
    """The lineage a fit starts from, plus this fit's split where it is not the last entry's."""
    if getattr(dm, "split", None) is None:
        return trained_on
    held_out = torch.cat([dm.val_index, dm.test_index]).sort().values.int()  # never trained on
    entry = {"source": dm.sources["train"], "split": dm.split, "held_out": held_out}
    last = trained_on[-1] if trained_on else {}
    same = (last.get("source", {}).get("fingerprint"), last.get("split")) == (entry["source"]["fingerprint"], dm.split)
    return trained_on if same else [*trained_on, entry]


def split_text(split: dict) -> str:
    return ", ".join(f"{key} {split[key]}" for key in ("seed", "val_size", "test_size"))


def evaluation(command: str, dm, trained_on: list[dict], ckpt_path: str, fit_run: str | None) -> dict:
    """What `command` evaluates (the data module's split) against what the checkpoint's lineage trained on:
    {data, images, checkpoint, fit_run, overlap (None: unknown), note, trained (the split it trained on)}."""
    what = "test" if command == "test" else "validation"
    if command == "test" and dm.test_size is None:  # the data's own test split
        source, indices = dm.sources["test"], torch.arange(dm.sources["test"]["images"])
        described = f"{what} images: {describe_source(source)}"
    else:
        source, indices = dm.sources["train"], dm.test_index if command == "test" else dm.val_index
        described = f"{len(indices)} {what} images held out of {describe_source(source)}"
        described += f" by split {split_text(dm.split)}"
    mine = [e for e in trained_on if e.get("source", {}).get("fingerprint") == source["fingerprint"]]
    unknown = [e["unknown"] for e in trained_on if "unknown" in e]
    trained = torch.zeros(source["images"], dtype=torch.bool)
    for entry in mine:  # every split it trained on: all but what that split held out
        trained |= torch.ones_like(trained).index_fill_(0, entry["held_out"].long(), False)
    overlap = int(trained[indices].sum())
    if overlap:
        note = f"{OVERLAPS}, {overlap} of the {len(indices)} images trained checkpoint {ckpt_path}"
    elif unknown:
        overlap, note = None, f"whether checkpoint {ckpt_path} trained on them is unknown: {unknown[0]}"
    elif not mine:
        trained_on_text = "; ".join(describe_source(e["source"]) for e in trained_on)
        note = f"other data than checkpoint {ckpt_path} trained on ({trained_on_text})"
    else:
        note = f"none of them trained checkpoint {ckpt_path}"
    trained_split = f"{describe_source(source)} with split {split_text(mine[-1]['split'])}" if mine else None
    return {"data": described, "images": len(indices), "checkpoint": str(ckpt_path), "fit_run": fit_run,
            "overlap": overlap, "note": note, "trained": trained_split}  # fmt: skip


@dataclass
class Run:
    """One command's run: directory, W&B id, command, this process's start; for fit, the lineage it starts from."""

    dir: Path
    id: str
    command: str
    started: str = field(default_factory=lambda: datetime.now().astimezone().isoformat(timespec="microseconds"))
    resumed: bool = False
    trained_on: list[dict] = field(default_factory=list)
    evaluation: dict | None = None

    def record(self, **entries) -> None:
        """Write (or extend) `run.json`, whole or not at all: a start, or, with `entries`, those keys."""
        self.dir.mkdir(parents=True, exist_ok=True)
        record = read_record(self.dir) or {"id": self.id, "command": self.command, "starts": []}
        record.update(entries) if entries else record["starts"].append(self.started)
        fd, temporary = tempfile.mkstemp(dir=self.dir, prefix=f".{RECORD}.")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(temporary, self.dir / RECORD)


@contextlib.contextmanager
def open(command: str, root: Path, ckpt_path: str | None = None):
    """The command's run while it lasts: for `fit` from a checkpoint in a run's `checkpoints/`, that run, locked by
    rank 0 (by the launcher's environment: W&B has not started yet); else a new one under `root`, written later."""
    run_dir = run_of(ckpt_path) if command == "fit" and ckpt_path else None
    if run_dir is None:  # 8 random lowercase letters and digits, as W&B draws run ids (not public API)
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        yield Run(Path(root) / f"{datetime.now():%Y%m%d-%H%M%S}-{command}-{run_id}", run_id, command)
    elif rank_zero_only.rank != 0:
        yield Run(run_dir, read_record(run_dir).get("id", run_dir.name), command, resumed=True)
    else:
        with (run_dir / LOCK).open("a+") as lock:  # the kernel's flock: it dies with its process
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise UserError(f"run {run_dir} is being written by {lock.read().strip() or 'another process'}: a run "
                                f"has one writer. Wait for that process to end (or stop it), then try again") from None  # fmt: skip
            lock.truncate(0)  # appends now write at 0
            lock.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
            lock.flush()
            yield Run(run_dir, read_record(run_dir).get("id", run_dir.name), command, resumed=True)


class RunRecord(Callback):
    """Records rank 0's run in what Lightning writes: `run.json`, `config.yaml` (the config as given: run again, it
    makes a new run), the run in every checkpoint and the best pointer; the loggers get the config once."""

    def __init__(self, run: Run, config: dict, ckpt_path: str | None):
        self.run, self.config, self.ckpt_path, self.trained_on = run, config, ckpt_path, run.trained_on
        self.carried = {key: value for key, value in config.items() if key in CONFIG_KEYS}  # by checkpoints
        self.carried["trainer"] = {k: v for k, v in self.carried["trainer"].items() if k not in PLACE_KEYS}

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        if trainer.strategy.broadcast(self.ckpt_path) != self.ckpt_path:
            raise UserError(f"the processes resolved --ckpt_path to different files ({self.ckpt_path} on rank "
                            f"{trainer.global_rank}): runs changed while they started; pass the checkpoint's path")  # fmt: skip
        self.run = trainer.strategy.broadcast(self.run)  # each process drew its own id
        self.carried["model"] = {**self.carried["model"], "classes": pl_module.classes}  # linked from the data
        self.trained_on = this_fit(self.run.trained_on, trainer.datamodule) if stage == "fit" else self.trained_on
        if not trainer.is_global_zero:
            return
        self.run.record()
        starts = len(read_record(self.run.dir)["starts"])
        with (self.run.dir / ("config.yaml" if starts == 1 else f"config-resume-{starts}.yaml")).open("x") as f:
            yaml.safe_dump(self.config, f, sort_keys=False)
        evaluated = self.run.evaluation if stage in ("validate", "test") else None
        if stage == "fit":
            self.run.record(trained_on=[{k: v for k, v in e.items() if k != "held_out"} for e in self.trained_on])
        elif evaluated:
            self.run.record(evaluated=evaluated)
        loggers.log_run(trainer, self.config, evaluated)

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["run"] = {"name": self.run.dir.name, "id": self.run.id, "trained_on": self.trained_on,
                             "config": self.carried}  # fmt: skip
        # ModelCheckpoint sets its best before it saves: the file named may be the one being written now.
        best = Path(trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "").name
        if trainer.is_global_zero and best and read_record(self.run.dir).get("best") != best:
            self.run.record(best=best)

    def on_load_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        # A resumed run that has moved: ModelCheckpoint restores its state (best score, last.ckpt) only where its
        # folder is the one saved, so the state is re-pointed at the folder the run lives in now.
        for callback in trainer.checkpoint_callbacks if self.run.resumed else []:
            state = checkpoint.get("callbacks", {}).get(callback.state_key) or {}
            old, new = state.get("dirpath"), callback.dirpath
            if not old or old == new:
                continue
            for key in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
                if isinstance(state.get(key), str) and state[key].startswith(old):
                    state[key] = new + state[key][len(old) :]
            best_k = state.get("best_k_models", {})
            state["best_k_models"] = {new + p[len(old) :] if p.startswith(old) else p: s for p, s in best_k.items()}


def evaluation_of(trainer: Trainer) -> dict | None:
    """What this trainer's command evaluates, as the run records it (None outside the CLI)."""
    return next((cb.run.evaluation for cb in trainer.callbacks if isinstance(cb, RunRecord)), None)

"""The run record: a command's directory and W&B run, which checkpoint `best`/`last` means, what a checkpoint trained
on and whether a command may evaluate it on its images. The rules a user needs are README's "Runs"."""

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
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from cifar.datasets import describe_source
from cifar.errors import UserError

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
    """The run under `root` (one or two levels down) with a checkpoint whose last start is the latest; file times
    never count."""
    runs = [r.parent for r in (*root.glob(f"*/{RECORD}"), *root.glob(f"*/*/{RECORD}"))]
    starts = {r: read_record(r).get("starts") or [NEVER] for r in runs if any((r / "checkpoints").glob("*.ckpt"))}
    return max(starts, key=lambda r: (max(map(datetime.fromisoformat, starts[r])), r.name), default=None)


def find_checkpoint(ckpt_path: str, root: Path) -> Path:
    """The file `--ckpt_path` means: a path, or `last`/`best` of the latest run under `root`, as its run.json names
    them (`best`: its first ModelCheckpoint's best, by `monitor`, or with none its newest)."""
    if ckpt_path not in ("best", "last"):
        return Path(ckpt_path)
    run_dir = latest_run(root)
    if run_dir is None:
        raise UserError(f"--ckpt_path {ckpt_path}: no run with checkpoints under {root}/. Run fit first, or pass "
                        f"the path of a .ckpt file")  # fmt: skip
    name = "last.ckpt" if ckpt_path == "last" else read_record(run_dir).get("best")
    path = run_dir / "checkpoints" / (name or "")
    if not (name and path.is_file()):
        what = "last.ckpt (set save_last: true on ModelCheckpoint)" if ckpt_path == "last" else "best checkpoint"
        raise UserError(f"--ckpt_path {ckpt_path}: the latest run, {run_dir}, has no {what}; pass a checkpoint path")
    rank_zero_info(f"--ckpt_path {ckpt_path}: {path} (the latest run under {root})")
    return path


def config_of(checkpoint: dict) -> dict:
    """The config a checkpoint trained with: its run's, or, from outside this app, its model's hyperparameters."""
    if config := (checkpoint.get("run") or {}).get("config"):
        return config
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k != "_instantiator"}
    return {"model": hparams} if hparams else {}


def training_record(checkpoint: dict) -> list[dict] | None:
    """What a checkpoint trained on, one entry per split ({source, split, held_out}), or None if it kept no record."""
    return (checkpoint.get("run") or {}).get("trained_on")


def split_text(split: dict) -> str:
    return ", ".join(f"{key} {split[key]}" for key in ("seed", "val_size", "test_size"))


def evaluation(command: str, dm, checkpoint: dict, ckpt_path: Path) -> dict:
    """What `command` evaluates (the data module's choice), checked against what the checkpoint trained on: {data,
    images, checkpoint, fit_run, overlap, note}. Images it trained on stop the command unless `dm.allow_overlap`."""
    what = "test" if command == "test" else "validation"
    if command == "test" and dm.test_size is None:  # the data's own test split
        source, indices = dm.sources["test"], torch.arange(len(dm.test_dataset))
        described = f"{what} images: {describe_source(source)}"
    else:
        source, indices = dm.sources["train"], dm.test_index if command == "test" else dm.val_index
        split = split_text(dm.split)
        described = f"{len(indices)} {what} images held out of {describe_source(source)} by split {split}"
    fit_run = (checkpoint.get("run") or {}).get("name") or getattr(run_of(ckpt_path), "name", None)
    record, overlap = training_record(checkpoint), None
    mine = [e for e in record or [] if e["source"]["fingerprint"] == source["fingerprint"]]
    if record is None:
        note = f"checkpoint {ckpt_path} carries no record of its training data: whether it trained on them is unknown"
    elif not mine:
        overlap, note = 0, f"other data than checkpoint {ckpt_path} trained on ("
        note += "; ".join(describe_source(e["source"]) for e in record) + ")"
    else:
        trained = torch.zeros(source["images"], dtype=torch.bool)
        for entry in mine:  # every split it ever trained on: all but what that split held out
            trained |= torch.ones_like(trained).index_fill_(0, entry["held_out"].long(), False)
        overlap = int(trained[indices].sum())
        if overlap and not dm.allow_overlap:
            raise UserError(
                f"{overlap} of the {len(indices)} {what} images were used to train checkpoint {ckpt_path} (it "
                f"trained on {describe_source(source)} with split {split_text(mine[-1]['split'])}; this command's "
                f"{split_text(dm.split)}). Evaluate honestly: leave --data.seed, --data.val_size and --data.test_size "
                f"off the command line (the checkpoint's split is used), or use separate data (test/<class>/ folders, "
                f"the official test batches); or pass --data.allow_overlap true to evaluate them (marked '{OVERLAPS}')"
            )
        note = f"none of them trained checkpoint {ckpt_path}"
        if overlap:
            note = f"{OVERLAPS}, {overlap} of the {len(indices)} images trained checkpoint {ckpt_path}"
    rank_zero_info(f"Evaluating {described}: {note}")
    return {"data": described, "images": len(indices), "checkpoint": str(ckpt_path), "fit_run": fit_run,
            "overlap": overlap, "note": note}  # fmt: skip


@dataclass
class Run:
    """One command's run: directory, W&B id, command, this process's start, what it trained on or evaluates."""

    dir: Path
    id: str
    command: str
    started: str = field(default_factory=lambda: datetime.now().astimezone().isoformat(timespec="microseconds"))
    resumed: bool = False
    trained_on: list[dict] = field(default_factory=list)
    evaluation: dict | None = None

    @classmethod
    def start(cls, command: str, root: Path, ckpt_path: str | None = None) -> "Run":
        """A new run under `root`, or, for `fit` from a checkpoint in a run's `checkpoints/`, that run."""
        if command == "fit" and ckpt_path and (run_dir := run_of(ckpt_path)):
            return cls(run_dir, read_record(run_dir).get("id", run_dir.name), command, resumed=True)
        # 8 random lowercase letters and digits, as W&B draws run ids (its generator is not public API).
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        return cls(Path(root) / f"{datetime.now():%Y%m%d-%H%M%S}-{command}-{run_id}", run_id, command)

    def record(self, **entries) -> None:
        """Write (or extend) `run.json`, whole or not at all: a start, or, with `entries`, those keys."""
        self.dir.mkdir(parents=True, exist_ok=True)
        record = read_record(self.dir) or {"id": self.id, "command": self.command, "starts": []}
        if entries:
            record.update(entries)
        else:
            record["starts"].append(self.started)
        fd, temporary = tempfile.mkstemp(dir=self.dir, prefix=f".{RECORD}.")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(temporary, self.dir / RECORD)

    def lock(self):
        """Hold this run's lock (the kernel's `flock`: it dies with its process) or stop, naming who holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.dir / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"run {self.dir} is being written by {holder}: a run has one writer. Wait for that "
                            f"process to end (or stop it), then try again") from None  # fmt: skip
        handle.truncate(0)  # appends now write at 0
        handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        handle.flush()
        return handle


class RunRecord(SaveConfigCallback):
    """Writes rank 0's run: `run.json`, `config.yaml` (as given: run again, it makes a new run), the config and the
    evaluation for every logger, the run in every checkpoint; releases the run's lock (`held`) when it ends."""

    def __init__(self, parser: LightningArgumentParser, config: Namespace, run: Run, user_config: Namespace, held=None):
        super().__init__(parser, user_config, save_to_log_dir=False)
        self.run, self.held, self.ckpt_path = run, held, config.get("ckpt_path")
        self.as_dict = yaml.safe_load(parser.dump(user_config, skip_none=False))  # what config.yaml holds
        self.carried = {key: value for key, value in self.as_dict.items() if key in CONFIG_KEYS}  # by checkpoints
        self.carried["trainer"] = {k: v for k, v in self.carried["trainer"].items() if k not in PLACE_KEYS}

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        if trainer.strategy.broadcast(self.ckpt_path) != self.ckpt_path:
            raise UserError(f"the processes resolved --ckpt_path to different files ({self.ckpt_path} on rank "
                            f"{trainer.global_rank}): runs changed while they started; pass the checkpoint's path")  # fmt: skip
        self.run = trainer.strategy.broadcast(self.run)  # each process drew its own id
        super().setup(trainer, pl_module, stage)  # save_config, on rank 0 only
        if trainer.is_global_zero and (e := self.run.evaluation) and stage in ("validate", "test"):
            self.run.record(evaluated=e)
            for logger in trainer.loggers:
                logger.log_hyperparams({"evaluated": e})
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update({"evaluated_data": e["data"], "checkpoint": e["checkpoint"],
                                                      "fit_run": e["fit_run"], "overlaps_training_data": e["overlap"]})  # fmt: skip
                    logger.experiment.tags += ("overlaps-training-data",) if e["overlap"] else ()

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        self.run.record()
        starts = len(read_record(self.run.dir)["starts"])
        path = self.run.dir / ("config.yaml" if starts == 1 else f"config-resume-{starts}.yaml")
        self.parser.save(self.config, path, skip_none=False, multifile=self.multifile, overwrite=False)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.as_dict})

    def this_fit(self, trainer: Trainer) -> list[dict]:
        """The resumed checkpoint's training record, and this fit's split if it differs from the last entry."""
        dm, record = trainer.datamodule, self.run.trained_on
        if getattr(dm, "split", None) is None:
            return record
        entry = {"source": dm.sources["train"], "split": dm.split, "held_out": dm.held_out}
        last = [(e["source"]["fingerprint"], e["split"]) for e in record[-1:]]  # the same split of the same data?
        return record if last == [(entry["source"]["fingerprint"], dm.split)] else [*record, entry]

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            record = [{k: v for k, v in e.items() if k != "held_out"} for e in self.this_fit(trainer)]
            self.run.record(trained_on=record)

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["run"] = {"name": self.run.dir.name, "id": self.run.id, "trained_on": self.this_fit(trainer),
                             "config": self.carried}  # fmt: skip
        # ModelCheckpoint sets its best before it saves: the file named may be the one being written now.
        best = Path(trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "").name
        if trainer.is_global_zero and best and read_record(self.run.dir).get("best") != best:
            self.run.record(best=best)

    def teardown(self, trainer: Trainer, pl_module, stage: str) -> None:
        if self.run.evaluation and self.run.evaluation["overlap"] and stage in ("validate", "test"):
            rank_zero_info(f"The results above: {self.run.evaluation['note']}")  # after Lightning's table
        self.on_exception(trainer, pl_module, None)

    def on_exception(self, trainer: Trainer, pl_module, exception: BaseException | None) -> None:
        if self.held is not None:  # the run's lock: the process's end would free it, a command run in-process not
            self.held.close()
            self.held = None


def evaluation_of(trainer: Trainer) -> dict | None:
    """What this trainer's command evaluates, as the run records it (None outside the CLI)."""
    return next((cb.run.evaluation for cb in trainer.callbacks if isinstance(cb, RunRecord)), None)

"""Run identity: where a command's files go, which W&B run it is, and what `--ckpt_path best|last` means.

The rules:

1. Every command (fit, validate, test, predict) is a *run* with its own directory under the config's
   `trainer.default_root_dir` (the *root*, e.g. `runs/cifar`): `<root>/<YYYYmmdd-HHMMSS>-<command>-<id>/`.
   `<id>` is 8 random characters from W&B's own id generator and is the run's W&B id, so two runs
   started in the same second, on one machine or on two, never share a directory or a W&B run.
2. The directory holds `run.json`, the app's record of the run: its id, its command, the times it
   started (local time with its UTC offset; a resumed fit adds one), and its data: what fit trained on
   (`trained_on`), or what validate and test evaluated, with the checkpoint and its fit run (`evaluated`,
   also in the loggers' config and W&B's summary). Each checkpoint names the run that wrote it (`run`).
3. `fit --ckpt_path <a checkpoint in a run under the root>` (also `last` or `best`) continues that run:
   the same directory, so ModelCheckpoint keeps its best score and top-k, and the same W&B id.
4. The *latest run* under a root is, among the runs with a checkpoint in `checkpoints/`, the one whose
   last start in `run.json` is the latest. File times never count, so copying a runs folder or touching
   a file changes nothing. (Runs from before `run.json`: the time in their name.)
5. `last` is the latest run's `checkpoints/last.ckpt`. `best` is the best checkpoint its first
   ModelCheckpoint recorded, as saved in `last.ckpt` (or, without one, in the checkpoint of the most
   training steps), looked up by file name in the same folder, so a moved runs folder still works.
6. Several processes (DDP ranks, started by Lightning, torchrun or srun alike): every process picks
   a run without touching the disk; rank 0's is *the* run. Its directory is made when the trainer sets
   up, once the ranks can talk, and the other ranks learn it by `trainer.strategy.broadcast`, as
   ModelCheckpoint learns its dirpath. They write nothing. Every rank resolves `--ckpt_path best|last`
   by rules 4-5 from the same files; set-up checks that all ranks chose rank 0's file.
"""

import importlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from wandb.sdk.lib.runid import generate_id

from cifar.checkpoints import load_checkpoint
from cifar.errors import UserError

RECORD = "run.json"


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="microseconds")


@dataclass
class Run:
    """One command's run: its directory, W&B id and command, and when this process started it."""

    dir: Path
    id: str
    command: str
    started: str = field(default_factory=now)
    resumed: bool = False

    @classmethod
    def start(cls, command: str, root: Path, ckpt_path: str | None = None) -> "Run":
        """A new run under `root`, or, for `fit` from a checkpoint inside a run under `root`, that run (rule 3)."""
        if command == "fit" and ckpt_path:
            checkpoint = Path(ckpt_path).resolve()
            run_dir = checkpoint.parent.parent
            if checkpoint.parent.name == "checkpoints" and run_dir.parent == root.resolve():
                record = read_record(run_dir)
                return cls(Path(root) / run_dir.name, record.get("id", run_dir.name), command, resumed=True)
        run_id = generate_id()
        return cls(Path(root) / f"{datetime.now():%Y%m%d-%H%M%S}-{command}-{run_id}", run_id, command)

    def record(self, **entries) -> None:
        """Create the directory and write (or, resumed, extend) `run.json`, whole or not at all: a start, or,
        with `entries`, those keys."""
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

    def configure(self, config: Namespace) -> None:
        """Point the parsed config at this run: the trainer's root, every logger's `save_dir` (W&B: this run's
        id and the command as job type), and ModelCheckpoint's `dirpath` where the config leaves it unset.

        Done on the parsed config because LightningCLI builds the trainer, loggers and callbacks from it and
        none of them can be given a directory afterwards.
        """
        config.trainer.default_root_dir = str(self.dir)
        for logger in entries(config.trainer.logger):
            kind = class_of(logger.class_path)
            if issubclass(kind, Logger) and "save_dir" in logger.init_args:
                logger.init_args.save_dir = str(self.dir)
            if issubclass(kind, WandbLogger):
                # Absolute: W&B resolves a relative dir against the working directory of the process's first run.
                logger.init_args.save_dir = str(self.dir.resolve())
                if not (logger.init_args.get("version") or logger.init_args.get("id")):
                    logger.init_args.version = self.id
                if "job_type" in logger.init_args and not logger.init_args.job_type:
                    logger.init_args.job_type = self.command
        for callback in entries(config.trainer.callbacks):
            if issubclass(class_of(callback.class_path), ModelCheckpoint) and not callback.init_args.get("dirpath"):
                callback.init_args.dirpath = str(self.dir / "checkpoints")


class RunSaver(SaveConfigCallback):
    """Makes the run real when the trainer sets up: rank 0's run for every rank, its directory with
    `run.json` and `config.yaml`, and the config sent to every logger (W&B: the run's config, key `config`).

    It saves the config as the user gave it (`user_config`), not the one pointed at this run's directory
    and W&B id: running the saved file again makes a new run rather than writing into this one.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, run: Run, user_config: Namespace):
        super().__init__(parser, user_config, save_to_log_dir=False)
        self.run = run
        self.ckpt_path = config.get("ckpt_path")

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        self.run = trainer.strategy.broadcast(self.run)  # rule 6: rank 0's run
        if trainer.strategy.broadcast(self.ckpt_path) != self.ckpt_path:
            raise UserError(f"the processes resolved --ckpt_path to different files ({self.ckpt_path} on rank "
                            f"{trainer.global_rank}): runs changed while they started; pass the checkpoint's path")  # fmt: skip
        super().setup(trainer, pl_module, stage)  # save_config, on rank 0 only

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        self.run.record()
        path = self.run.dir / "config.yaml"
        if path.exists():  # a resumed run: keep the first config, add this one beside it
            path = self.run.dir / f"config-resumed-{datetime.now():%Y%m%d-%H%M%S}.yaml"
        self.parser.save(self.config, path, skip_none=False, multifile=self.multifile)
        as_dict = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": as_dict})

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["run"] = {"name": self.run.dir.name, "id": self.run.id}  # a moved checkpoint still names its run

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        record = getattr(trainer.datamodule, "state_dict", dict)().get("trained_on")
        if trainer.is_global_zero and record:
            self.run.record(trained_on=[{k: v for k, v in e.items() if k != "held_out"} for e in record])

    def on_validation_start(self, trainer: Trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self.record_evaluation(trainer)

    def on_test_start(self, trainer: Trainer, pl_module) -> None:
        self.record_evaluation(trainer)

    def record_evaluation(self, trainer: Trainer) -> None:
        """What validate or test evaluates, the checkpoint and its fit run: in `run.json`, every logger's config
        (key `evaluated`) and W&B's summary, tagged "overlaps-training-data" where it does."""
        evaluation = getattr(trainer.datamodule, "evaluation", None)
        if not (trainer.is_global_zero and evaluation):
            return
        evaluated = {**evaluation, "fit_run": fit_run_of(evaluation["checkpoint"])}
        self.run.record(evaluated=evaluated)
        for logger in trainer.loggers:
            logger.log_hyperparams({"evaluated": evaluated})
            if isinstance(logger, WandbLogger):
                summary = {"evaluated_data": evaluation["data"], "checkpoint": evaluated["checkpoint"],
                           "fit_run": evaluated["fit_run"], "overlaps_training_data": evaluation["overlap"]}  # fmt: skip
                logger.experiment.summary.update(summary)
                if evaluation["overlap"]:
                    logger.experiment.tags = (*logger.experiment.tags, "overlaps-training-data")


def fit_run_of(ckpt_path: str) -> str | None:
    """The name of the run that wrote a checkpoint: as the checkpoint records it, else the run folder it is in."""
    if run := load_checkpoint(Path(ckpt_path)).get("run"):
        return run["name"]
    run_dir = Path(ckpt_path).resolve().parent.parent
    return run_dir.name if (run_dir / RECORD).exists() else None


def read_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def last_start(run_dir: Path) -> datetime:
    """When the run last started (rule 4): from `run.json`, else the time in an older run's name."""
    if starts := read_record(run_dir).get("starts"):
        return max(datetime.fromisoformat(s) for s in starts)
    try:
        return datetime.strptime(run_dir.name[:15], "%Y%m%d-%H%M%S").astimezone()
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)


def latest_run(root: Path) -> Path | None:
    """The latest run under `root` that has a checkpoint (rule 4), or None."""
    runs = [d for d in root.glob("*/checkpoints") if any(d.glob("*.ckpt"))]
    return max((d.parent for d in runs), key=lambda d: (last_start(d), d.name), default=None)


def resolve_checkpoint(ckpt_path: str, root: Path) -> Path:
    """The checkpoint file meant by `ckpt_path`: `best`, `last` (rules 4-5, and says which file) or a path;
    checked to be loadable."""
    if ckpt_path not in ("best", "last"):
        load_checkpoint(Path(ckpt_path))
        return Path(ckpt_path)
    path = latest_checkpoint(ckpt_path, root)
    rank_zero_info(f"--ckpt_path {ckpt_path}: {path} (the latest run under {root})")
    return path


def latest_checkpoint(ckpt_path: str, root: Path) -> Path:
    """The latest run's `best` or `last` checkpoint (rules 4-5), checked to be loadable."""
    run = latest_run(root)
    if run is None:
        raise UserError(f"--ckpt_path {ckpt_path}: no checkpoints under {root}/*/checkpoints/. Run fit with this "
                        f"config first, or pass the path of a .ckpt file")  # fmt: skip
    checkpoints = run / "checkpoints"
    last = checkpoints / "last.ckpt"
    if ckpt_path == "last":
        if not last.exists():
            raise UserError(f"--ckpt_path last: the latest run, {run}, has no last.ckpt (set save_last: true on "
                            f"ModelCheckpoint); pass a checkpoint path instead")  # fmt: skip
        load_checkpoint(last)
        return last
    if last.exists():
        newest = load_checkpoint(last)
    else:  # the checkpoint of the most training steps holds ModelCheckpoint's latest state
        newest = max((load_checkpoint(p) for p in checkpoints.glob("*.ckpt")), key=lambda c: c.get("global_step", 0))
    best = next((state["best_model_path"] for key, state in newest.get("callbacks", {}).items()
                 if key.startswith("ModelCheckpoint") and state.get("best_model_path")), None)  # fmt: skip
    if best is None:
        raise UserError(f"--ckpt_path best: the latest run, {run}, records no best checkpoint (ModelCheckpoint "
                        f"needs a monitor); use --ckpt_path last or a path")  # fmt: skip
    path = checkpoints / Path(best).name
    load_checkpoint(path)
    return path


def class_of(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def entries(value) -> list[Namespace]:
    """The class_path/init_args entries of a config value that may be None, a bool, one entry or a list."""
    return [e for e in (value if isinstance(value, list) else [value]) if isinstance(e, Namespace) and "class_path" in e]


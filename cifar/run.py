"""The run record: where a command's files go, which W&B run it is, which checkpoint `best`/`last` means,
the config it ran with, what a checkpoint trained on and what it may be evaluated on. One module, one callback.

The rules:

1. Every command (fit, validate, test, predict) is a *run* with its own directory under the config's
   `trainer.default_root_dir` (the *root*, e.g. `runs/cifar`): `<root>/<YYYYmmdd-HHMMSS>-<command>-<id>/`.
   `<id>` is 8 random characters, as W&B draws run ids, and is the run's W&B id, so two runs started in
   the same second, on one machine or on two, never share a directory or a W&B run.
2. The directory holds `run.json` (id, command, the times it started, what fit trained on or what
   validate/test evaluated), `config.yaml` (the resolved config as the user gave it; a resumed fit adds
   `config-resume-<n>.yaml`) and, for fit, `checkpoints/`. Every checkpoint names its run and carries the
   *training record*: one entry per split it trained on (data fingerprint, split options and counts,
   the indices it held out).
3. A run has one writer. A new run has a new directory; a resumed one is written only by the process
   (under DDP, rank 0) that holds the lock on `<run>/.lock`, taken before W&B starts. A second process
   resuming it (two `fit --ckpt_path last` at once) stops with one line naming the holder (host, pid).
   The lock is the kernel's (`flock`): it dies with its process, even a killed one.
4. `fit --ckpt_path <a checkpoint of a run>` (or `last`/`best`) continues that run: the same directory,
   so ModelCheckpoint keeps its best score and top-k, and the same W&B id.
5. `best` and `last` mean the *latest run* under the root: among the runs (directories with `run.json`,
   one or two levels below it) that have a checkpoint, the one whose last recorded start is the latest;
   file times never count. `last` is its `checkpoints/last.ckpt`; `best` the best checkpoint its first
   ModelCheckpoint recorded (as saved in `last.ckpt`, else in the checkpoint of the most steps). With no
   `--config` the root is `runs/`, so the latest run of any config.
6. A command given a checkpoint and no `--config` starts from that run's own config (its latest
   `config*.yaml`): logger, callbacks, data and model as they trained. Options on the command line win;
   so do the `--model.*` ones over the checkpoint's hyperparameters, which Lightning applies after parsing.
7. Honest evaluation. validate, test and a resumed fit take the split of the checkpoint's latest entry
   for the same data (same fingerprint) except the split options typed on the command line. Then, before
   anything is made, the images they will evaluate are checked against every entry: images the
   checkpoint trained on stop the command with one line, unless `--data.allow_overlap true`, which marks
   every result "overlaps training data". Other data is fine, and said. A checkpoint without a record
   loads; its data cannot be checked, said once.
8. Several processes (DDP, by Lightning's launcher, torchrun or srun): every process prepares a run
   without touching the disk; rank 0's is *the* run, broadcast to the others when the trainer sets up.
   Only rank 0 writes.
9. W&B: its own settings decide online or offline (WANDB_MODE, `wandb offline`), except that with no API
   key configured a run logs offline instead of prompting or failing, and says how to upload it.
"""

import fcntl
import json
import os
import secrets
import socket
import string
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import wandb
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from cifar import datasets
from cifar.checkpoints import load_checkpoint
from cifar.data import SPLIT_OPTIONS, split_indices
from cifar.errors import UserError

RECORD, LOCK = "run.json", ".lock"
OVERLAPS = "overlaps training data"  # the mark on results evaluated on training images
INIT_TIMEOUT = "30"  # seconds W&B may take to start an online run (its default, 90, is long to wait for an error)


def new_id() -> str:
    """8 random lowercase letters and digits: a W&B run id as W&B draws them (its generator is not public API)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="microseconds")


# --- which checkpoint (rules 5, 6) ---------------------------------------------------------------------------


def read_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def last_start(run_dir: Path) -> datetime:
    if starts := read_record(run_dir).get("starts"):
        return max(datetime.fromisoformat(s) for s in starts)
    return datetime.min.replace(tzinfo=timezone.utc)


def latest_run(root: Path) -> Path | None:
    """The latest run under `root` that has a checkpoint (rule 5), or None."""
    runs = [r.parent for r in (*root.glob(f"*/{RECORD}"), *root.glob(f"*/*/{RECORD}"))]
    runs = [r for r in runs if any((r / "checkpoints").glob("*.ckpt"))]
    return max(runs, key=lambda r: (last_start(r), r.name), default=None)


def find_checkpoint(ckpt_path: str, root: Path) -> Path:
    """The checkpoint file meant by `ckpt_path`: `best`, `last` (rule 5, and says which file) or a path;
    checked to be loadable."""
    if ckpt_path not in ("best", "last"):
        load_checkpoint(Path(ckpt_path))
        return Path(ckpt_path)
    run = latest_run(root)
    if run is None:
        raise UserError(f"--ckpt_path {ckpt_path}: no run with checkpoints under {root}/. Run fit first, or pass "
                        f"the path of a .ckpt file")  # fmt: skip
    last = run / "checkpoints" / "last.ckpt"
    if ckpt_path == "last":
        if not last.exists():
            raise UserError(f"--ckpt_path last: the latest run, {run}, has no last.ckpt (set save_last: true on "
                            f"ModelCheckpoint); pass a checkpoint path instead")  # fmt: skip
        path = last
    else:
        newest = load_checkpoint(last) if last.exists() else max(
            (load_checkpoint(p) for p in (run / "checkpoints").glob("*.ckpt")), key=lambda c: c.get("global_step", 0))
        best = next((state["best_model_path"] for key, state in newest.get("callbacks", {}).items()
                     if key.startswith("ModelCheckpoint") and state.get("best_model_path")), None)  # fmt: skip
        if best is None:
            raise UserError(f"--ckpt_path best: the latest run, {run}, records no best checkpoint (ModelCheckpoint "
                            f"needs a monitor); use --ckpt_path last or a path")  # fmt: skip
        path = run / "checkpoints" / Path(best).name  # by name: a moved runs folder still works
    load_checkpoint(path)
    rank_zero_info(f"--ckpt_path {ckpt_path}: {path} (the latest run under {root})")
    return path


def config_of(ckpt_path: Path) -> Path | None:
    """The config a checkpoint's run last started with (rule 6), or None when it is not in a run directory."""
    run_dir = Path(ckpt_path).resolve().parent.parent
    resumes = sorted(run_dir.glob("config-resume-*.yaml"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return next((c for c in reversed([run_dir / "config.yaml", *resumes]) if c.is_file()), None)


def fit_run_of(checkpoint: dict, ckpt_path: Path) -> str | None:
    """The name of the run that wrote a checkpoint: as it records it, else the run folder it is in."""
    if run := checkpoint.get("run"):
        return run["name"]
    run_dir = Path(ckpt_path).resolve().parent.parent
    return run_dir.name if (run_dir / RECORD).exists() else None


# --- what a checkpoint trained on, and what it may be evaluated on (rules 2, 7) ---------------------------------


def training_record(checkpoint: dict) -> list[dict] | None:
    """The training record of a loaded checkpoint (`checkpoint["run"]`; older ones kept it under the data
    module's key), or None."""
    for value in (checkpoint.get("run"), *checkpoint.values()):
        if isinstance(value, dict) and "trained_on" in value:
            return value["trained_on"]
    return None


def split_text(split: dict) -> str:
    return ", ".join(f"{key} {split[key]}" for key in SPLIT_OPTIONS)


def training_source(command: str, data: Namespace) -> dict | None:
    """The training pool's source (fingerprint) from its file listing, before any run or W&B run exists, so
    that a file in the image folders that is not an image stops the command in one line naming it; None for
    predict, or when there is no data yet (a download comes later)."""
    data_dir = Path(data.data_dir)
    kind = datasets.detect_format(data_dir)
    if command == "predict" or kind is None:
        return None
    files = None
    if kind == "folder":
        train = data_dir / "train"
        files, _ = datasets.list_folder(train, datasets.folder_classes(train), strict=not data.skip_bad_images)
    return datasets.source(data_dir, "train", files=files)


def evaluation(command: str, data: Namespace, train: dict | None, typed: set[str], ckpt_path: Path) -> dict | None:
    """Rule 7 for `command` with a checkpoint, on the parsed data config and its `training_source`: adopt the
    checkpoint's split (in `data`, except the `typed` options), then check what will be evaluated. Returns the
    evaluation as runs and reports record it ({data, images, source, split, checkpoint, fit_run, overlap,
    note}); raises on an overlap not allowed. Reads file listings and the checkpoint, never the images."""
    checkpoint = load_checkpoint(ckpt_path)
    record = training_record(checkpoint)
    data_dir = Path(data.data_dir)
    same = [e for e in record or [] if train and e["source"]["fingerprint"] == train["fingerprint"]]
    if same:
        split = same[-1]["split"]
        for key in set(SPLIT_OPTIONS) - typed:
            data[key] = split[key]
        kept = f"; {', '.join(f'--data.{k} {data[k]}' for k in sorted(typed))} from the command line" if typed else ""
        rank_zero_info(f"Split: the checkpoint's ({split_text(split)}){kept}")
        train = {**train, "images": same[-1]["source"]["images"]}  # same files: the same images read
    what = "test" if command == "test" else "validation"
    if command == "test" and data.test_size is None:  # the data's own test split
        source = datasets.source(data_dir, "test") if datasets.detect_format(data_dir) else None
        if source is None:
            held = f" held out only its {same[-1]['split']['val']} validation images and" if same else ""
            raise UserError(f"{data_dir} has no test split: checkpoint {ckpt_path}{held} cannot be tested on it. "
                            f"Evaluate on the validation images with `validate --ckpt_path {ckpt_path}`, add "
                            f"test/<class>/ folders, or fit again with --data.test_size 5000 to hold out a test set")  # fmt: skip
        indices, chosen = torch.arange(source["images"] or 0), None
        drawn = f"{what} images: "
    elif train is None:
        return None  # nothing to read yet (the download comes later): the data module says what it reads
    else:
        source, chosen = train, {key: data[key] for key in SPLIT_OPTIONS}
        _, val, test, _ = split_indices(source["images"], data.seed, data.val_size, data.test_size)
        indices = test if command == "test" else val
        drawn = f"{len(indices)} {what} images held out of "
    described = f"{drawn}{datasets.describe_source(source)}" + (f" by split {split_text(chosen)}" if chosen else "")
    images = len(indices) if chosen else source["images"]  # None: the official test batches, counted when read
    result = {"data": described, "images": images, "source": source, "split": chosen, "checkpoint": str(ckpt_path),
              "fit_run": fit_run_of(checkpoint, ckpt_path), "overlap": None}  # fmt: skip
    mine = [e for e in record or [] if e["source"]["fingerprint"] == source["fingerprint"]]
    if record is None:
        result["note"] = (f"checkpoint {ckpt_path} carries no record of its training data (written before the app "
                          f"kept one): whether these images trained it cannot be checked")  # fmt: skip
    elif not mine:
        trained = "; ".join(datasets.describe_source(e["source"]) for e in record)
        result["overlap"], result["note"] = 0, f"other data than checkpoint {ckpt_path} trained on ({trained})"
    else:
        trained = torch.zeros(source["images"], dtype=torch.bool)
        for entry in mine:  # every split it ever trained on
            in_entry = torch.ones(source["images"], dtype=torch.bool)
            in_entry[entry["held_out"].long()] = False
            trained |= in_entry
        overlap = result["overlap"] = int(trained[indices].sum())
        if overlap == 0:
            result["note"] = f"none of them trained checkpoint {ckpt_path}"
        elif data.allow_overlap:
            result["note"] = (f"{OVERLAPS}, {overlap} of the {len(indices)} images trained checkpoint {ckpt_path} "
                              f"(--data.allow_overlap true)")  # fmt: skip
        else:
            raise UserError(
                f"{overlap} of the {len(indices)} {what} images were used to train checkpoint {ckpt_path} (it trained "
                f"on {datasets.describe_source(source)} with split {split_text(mine[-1]['split'])}; this command's "
                f"{split_text(chosen)}). Evaluate honestly on the images it held out (leave --data.seed, "
                f"--data.val_size and --data.test_size off the command line: the checkpoint's split is used) or on "
                f"separate data (test/<class>/ folders, the official test batches); to evaluate on them anyway, pass "
                f"--data.allow_overlap true (the results are then marked '{OVERLAPS}')"
            )
    rank_zero_info(f"Evaluating {described}: {result['note']}")
    return result


# --- the run (rules 1-4, 8, 9) ---------------------------------------------------------------------------------


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
        """A new run under `root`, or, for `fit` from a checkpoint in a run's `checkpoints/`, that run (rule 4)."""
        if command == "fit" and ckpt_path:
            run_dir = Path(ckpt_path).resolve().parent.parent
            if Path(ckpt_path).parent.name == "checkpoints" and (run_dir / RECORD).exists():
                return cls(run_dir, read_record(run_dir).get("id", run_dir.name), command, resumed=True)
        run_id = new_id()
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
        """Rule 3: hold this run's lock for the life of the process, or stop with who holds it."""
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
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        handle.flush()
        return handle

    def configure(self, config: Namespace) -> None:
        """Point the parsed config at this run: the trainer's root, every logger's `save_dir` (W&B: this run's
        id, the command as job type, offline without a key), ModelCheckpoint's `dirpath` where unset.

        Done on the parsed config because LightningCLI builds the trainer, loggers and callbacks from it and
        none of them can be given a directory afterwards.
        """
        config.trainer.default_root_dir = str(self.dir)
        for logger in entries(config.trainer.logger):
            if "save_dir" in logger.init_args:
                logger.init_args.save_dir = str(self.dir)
            if issubclass(class_of(logger.class_path), WandbLogger):
                # Absolute: W&B resolves a relative dir against the working directory of the process's first run.
                logger.init_args.save_dir = str(self.dir.resolve())
                if not (logger.init_args.get("version") or logger.init_args.get("id")):
                    logger.init_args.version = self.id
                if not logger.init_args.get("job_type"):
                    logger.init_args.job_type = self.command
                offline_without_a_key(logger.init_args)
        for callback in entries(config.trainer.callbacks):
            if issubclass(class_of(callback.class_path), ModelCheckpoint) and not callback.init_args.get("dirpath"):
                callback.init_args.dirpath = str(self.dir / "checkpoints")


def offline_without_a_key(init_args: Namespace) -> None:
    """Rule 9 for one WandbLogger's arguments. `offline: true` or a `mode` in the config wins."""
    os.environ.setdefault("WANDB_INIT_TIMEOUT", INIT_TIMEOUT)  # before wandb.setup() reads the environment
    if init_args.get("offline") and init_args.get("log_model"):  # WandbLogger refuses the pair, in a traceback
        raise UserError("log_model with offline: true: Lightning's WandbLogger refuses to log checkpoints offline. Drop "
                        "offline (with no API key configured the run logs offline anyway, checkpoints included, for "
                        "`wandb sync`) or log_model")  # fmt: skip
    if init_args.get("offline") or init_args.get("mode"):
        return
    if (os.environ.get("WANDB_MODE") or wandb.setup().settings.mode) != "online":
        return
    if not wandb.login(prompt=False, verify=False):
        init_args.mode = "offline"
        rank_zero_info("W&B: no API key configured (`wandb login` or WANDB_API_KEY), so this run logs offline; "
                       "upload it later with `wandb sync <run dir>/wandb`")  # fmt: skip


class RunRecord(SaveConfigCallback):
    """Makes the run real when the trainer sets up, and keeps its record: rank 0's run for every rank, its
    lock, `run.json` and `config.yaml`, the config and the evaluation sent to every logger, and the run and
    training record in every checkpoint.

    It saves the config as the user gave it (`user_config`), not the one pointed at this run's directory
    and W&B id: running the saved file again makes a new run rather than writing into this one.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, run: Run, user_config: Namespace,
                 evaluation: dict | None = None, trained_on: list[dict] | None = None, held=None):  # fmt: skip
        super().__init__(parser, user_config, save_to_log_dir=False)
        self.run, self.evaluation = run, evaluation
        self.trained_on = list(trained_on or [])  # the resumed checkpoint's training record
        self.ckpt_path = config.get("ckpt_path")
        self.held = held  # the run's lock (`Run.lock`), while this process writes a resumed run

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        if trainer.strategy.broadcast(self.ckpt_path) != self.ckpt_path:
            raise UserError(f"the processes resolved --ckpt_path to different files ({self.ckpt_path} on rank "
                            f"{trainer.global_rank}): runs changed while they started; pass the checkpoint's path")  # fmt: skip
        self.run = trainer.strategy.broadcast(self.run)  # rule 8: rank 0's run
        super().setup(trainer, pl_module, stage)  # save_config, on rank 0 only

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        self.run.record()
        starts = len(read_record(self.run.dir)["starts"])
        path = self.run.dir / ("config.yaml" if starts == 1 else f"config-resume-{starts}.yaml")
        self.parser.save(self.config, path, skip_none=False, multifile=self.multifile, overwrite=False)
        as_dict = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": as_dict})

    def this_fit(self, trainer: Trainer) -> list[dict]:
        """The training record: the resumed checkpoint's, and this fit's split if it differs."""
        dm = trainer.datamodule
        if getattr(dm, "split", None) is None:
            return self.trained_on
        entry = {"source": dm.sources["train"], "split": dm.split, "held_out": dm.held_out}
        last = self.trained_on[-1] if self.trained_on else None
        if last and last["source"]["fingerprint"] == entry["source"]["fingerprint"] and torch.equal(
                last["held_out"], entry["held_out"]):  # fmt: skip
            return self.trained_on
        return [*self.trained_on, entry]

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.run.record(trained_on=[{k: v for k, v in e.items() if k != "held_out"} for e in self.this_fit(trainer)])

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["run"] = {"name": self.run.dir.name, "id": self.run.id, "trained_on": self.this_fit(trainer)}

    def on_validation_start(self, trainer: Trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self.record_evaluation(trainer)

    def on_test_start(self, trainer: Trainer, pl_module) -> None:
        self.record_evaluation(trainer)

    def record_evaluation(self, trainer: Trainer) -> None:
        """What validate or test evaluates, the checkpoint and its fit run: in `run.json`, every logger's config
        (key `evaluated`) and W&B's summary, tagged "overlaps-training-data" where it does."""
        if not (trainer.is_global_zero and self.evaluation):
            return
        self.run.record(evaluated=self.evaluation)
        for logger in trainer.loggers:
            logger.log_hyperparams({"evaluated": self.evaluation})
            if isinstance(logger, WandbLogger):
                e = self.evaluation
                logger.experiment.summary.update({"evaluated_data": e["data"], "checkpoint": e["checkpoint"],
                                                  "fit_run": e["fit_run"], "overlaps_training_data": e["overlap"]})  # fmt: skip
                if e["overlap"]:
                    logger.experiment.tags = (*logger.experiment.tags, "overlaps-training-data")

    def teardown(self, trainer: Trainer, pl_module, stage: str) -> None:
        if self.evaluation and self.evaluation["overlap"] and stage in ("validate", "test"):
            rank_zero_info(f"The results above: {self.evaluation['note']}")  # after Lightning's table
        self.release()

    def on_exception(self, trainer: Trainer, pl_module, exception: BaseException) -> None:
        self.release()

    def release(self) -> None:
        """Give up the run's lock (the process's end would too; a command run in-process needs it now)."""
        if self.held is not None:
            self.held.close()
            self.held = None


def evaluation_of(trainer: Trainer) -> dict | None:
    """What this trainer's command evaluates, as the run records it (None outside the CLI)."""
    return next((cb.evaluation for cb in trainer.callbacks if isinstance(cb, RunRecord)), None)


def class_of(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def entries(value) -> list[Namespace]:
    """The class_path/init_args entries of a config value that may be None, a bool, one entry or a list."""
    return [e for e in (value if isinstance(value, list) else [value]) if isinstance(e, Namespace) and "class_path" in e]

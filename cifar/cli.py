"""LightningCLI glue: links, one directory per run, the config saved with the run, `best`/`last` from disk.

Every subcommand (fit, validate, test, predict) gets its own run directory,
`<trainer.default_root_dir>/<YYYYmmdd-HHMMSS>-<subcommand>/`, holding `config.yaml` (the resolved
config, re-runnable as is), the loggers' files (`wandb/`, ...), `checkpoints/` and any other output.
Nothing a run writes can collide with another run's files. Within the run, `trainer.default_root_dir`
is that directory; the W&B run id is its name.

Under DDP every process (rank) runs this CLI, and all of them must agree on one run directory (so one
W&B id, one `config.yaml`, one `checkpoints/`) and on the checkpoint `--ckpt_path best|last` means:

- Lightning's own launcher (`--trainer.strategy ddp --trainer.devices N`, no cluster) starts ranks > 0
  at `trainer.fit` time by re-running this script with rank 0's environment: rank 0 exports its choices
  in `CIFAR_RUN_DIR` and `CIFAR_CKPT_PATH` before that, and the other ranks adopt them.
- torchrun and SLURM's srun start all ranks at once, so the name is derived from what they share: the
  rendezvous id (`TORCHELASTIC_RUN_ID`) or the job and step id (`SLURM_JOB_ID`, `SLURM_STEP_ID`). The
  checkpoint is resolved from disk by every rank; on several nodes the run root must be on a shared
  file system (it must anyway, for `--ckpt_path` to load on every node).
"""

import ctypes
import importlib
import os
import signal
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Literal

import wandb.errors
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from cifar.checkpoints import resolve_checkpoint
from cifar.data import CIFAR10DataModule
from cifar.errors import UserError
from cifar.export import export_checkpoint
from cifar.module import LitModel


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as `config.yaml` in the run directory and sends it to every logger
    (W&B: the run's config, under the key `config`).

    It saves `user_config`, the config as resolved from defaults, files and arguments, rather than
    `config`, which also holds this run's own paths and W&B id: re-running the saved file must make a
    new run, not write into (or resume) this one.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, run_dir: str, user_config: Namespace):
        super().__init__(parser, user_config, save_to_log_dir=False)
        self.run_dir = Path(run_dir)

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.yaml"
        if path.exists():  # a resumed run: keep the first config, add this one beside it
            path = self.run_dir / f"config-resumed-{datetime.now():%Y%m%d-%H%M%S}.yaml"
        self.parser.save(self.config, path, skip_none=False, multifile=self.multifile)
        as_dict = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": as_dict})


def class_of(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def configured(value) -> list[Namespace]:
    """The class_path/init_args entries of a config value that may be None, a bool, one entry or a list."""
    entries = value if isinstance(value, list) else [value]
    return [e for e in entries if isinstance(e, Namespace) and "class_path" in e]


def new_run_dir(root: Path, subcommand: str) -> Path:
    """Create and return a run directory that no other run has, named by the time and the subcommand."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    for suffix in ["", *(f".{i}" for i in range(2, 1000))]:  # several runs started within one second
        try:
            (run_dir := root / f"{stamp}{suffix}-{subcommand}").mkdir()  # atomic: only one process creates it
            return run_dir
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run directory under {root}")


# What rank 0 tells the ranks Lightning's launcher starts as its child processes (see the module doc).
RUN_DIR_ENV, CKPT_PATH_ENV, PARENT_ENV = "CIFAR_RUN_DIR", "CIFAR_CKPT_PATH", "CIFAR_RUN_PID"


def launched_by_lightning() -> bool:
    """True in a rank that Lightning's subprocess launcher started (it sets LOCAL_RANK 1, 2, ...): a child of
    a rank 0 that ran this CLI. (The parent's pid too: a variable left by another program is never adopted.)"""
    child = os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(PARENT_ENV) == str(os.getppid())
    return child and RUN_DIR_ENV in os.environ


def cluster_job_name(subcommand: str) -> str | None:
    """The run directory name all ranks of a torchrun or SLURM job share, or None outside such a job."""
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) <= 1:
        return None  # one process: a timestamped directory of its own
    if run_id := os.environ.get("TORCHELASTIC_RUN_ID"):
        if run_id == "none":  # torchrun's default without --standalone or --rdzv-id: the same for every job
            raise UserError("torchrun without a unique rendezvous id: every job would share one run directory. "
                            "Pass --standalone (one machine) or --rdzv-id <a unique job id>")  # fmt: skip
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return f"torchrun-{run_id}{'' if restarts == '0' else f'.r{restarts}'}-{subcommand}"
    if (job := os.environ.get("SLURM_JOB_ID")) and "SLURM_PROCID" in os.environ:  # a task started by srun
        step, restarts = os.environ.get("SLURM_STEP_ID", "0"), os.environ.get("SLURM_RESTART_COUNT", "0")
        return f"slurm-{job}.{step}{'' if restarts == '0' else f'.r{restarts}'}-{subcommand}"
    return None


def resumed_run_dir(ckpt_path: str | None, root: Path) -> Path | None:
    """The run a `fit --ckpt_path` continues: the run directory holding the checkpoint, if it is one under `root`.

    Continuing in the same directory keeps ModelCheckpoint's full state (best score, top-k) and the W&B id.
    """
    if not ckpt_path:
        return None
    checkpoint = Path(ckpt_path).resolve()
    run_dir = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and run_dir.parent == root.resolve():
        return run_dir
    return None


class CifarTrainer(Trainer):
    """Lightning's Trainer with one more subcommand, `export` (LightningCLI's subcommands are Trainer methods)."""

    def export(
        self,
        model: LightningModule | None = None,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        format: Literal["onnx", "torchscript"] = "onnx",
        output: str | None = None,
    ) -> Path:
        """Export a checkpoint's model for serving: uint8 images in, class probabilities out, class names inside.

        Args:
            model: Not used: the model is rebuilt from the checkpoint.
            datamodule: Not used: the class names come from the checkpoint.
            ckpt_path: The checkpoint: `best`, `last` (of the latest run under trainer.default_root_dir) or a path.
            format: `onnx` (for onnxruntime and most servers) or `torchscript` (for `torch.jit.load`).
            output: The file to write (default: beside the checkpoint, `.onnx` or `.pt`); never overwritten.
        """
        return export_checkpoint(ckpt_path, format, output)


class CifarCLI(LightningCLI):
    """`LightningCLI(LitModel, CIFAR10DataModule)` with per-run directories and `--ckpt_path best|last` from disk."""

    def __init__(self, *args, **kwargs):
        ctrl_c = signal.getsignal(signal.SIGINT)
        try:
            super().__init__(*args, **kwargs)
        except SIGTERMException:  # Lightning stops after the current batch; its exit code 0 would say "done"
            why = getattr(self, "stop_signal", "SIGTERM")
            self.report_stop(why)
            raise SystemExit(130 if why == "Ctrl-C" else 143)  # 128 + SIGINT or SIGTERM, as a shell reports them
        except SystemExit as stop:
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.interrupted and stop.code == 1:  # Lightning's exit after Ctrl-C
                self.report_stop("Ctrl-C")
                raise SystemExit(130)  # 128 + SIGINT
            raise
        except BaseException:
            run_dir = getattr(self, "run_dir", None)
            shared = launched_by_lightning() or int(os.environ.get("WORLD_SIZE", "1")) > 1  # other ranks use it
            if run_dir and not shared and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # a run that failed before writing anything leaves no empty folder behind
            raise
        finally:
            signal.signal(signal.SIGINT, ctrl_c)  # before_fit's handler lives as long as the run

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides the number of classes; model and net follow (no number typed twice).
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")  # saved in checkpoints
        parser.set_defaults({"trainer.default_root_dir": "runs"})

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then turn `--ckpt_path best|last` into a checked file path, before LightningCLI reads the
        checkpoint's model hyperparameters (so `test` rebuilds the net that was trained)."""
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "", None)
        if config is not None and config.get("ckpt_path"):
            root = Path(config.trainer.default_root_dir)
            if launched_by_lightning() and CKPT_PATH_ENV in os.environ:  # rank 0 resolved it: the same file
                config.ckpt_path = os.environ[CKPT_PATH_ENV]
            resolved = resolve_checkpoint(config.ckpt_path, root)
            if config.ckpt_path in ("best", "last"):
                rank_zero_info(f"--ckpt_path {config.ckpt_path}: {resolved} (the latest run under {root})")
            config.ckpt_path = str(resolved)

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "export":  # writes one file where told: no run directory
            return
        config = self.config[self.subcommand]
        root = Path(config.trainer.default_root_dir)
        saved = config.clone()
        run_dir = resumed_run_dir(config.ckpt_path, root) if self.subcommand == "fit" else None
        if run_dir is None and launched_by_lightning():
            run_dir = Path(os.environ[RUN_DIR_ENV])
        elif run_dir is None and (name := cluster_job_name(self.subcommand)):
            (run_dir := root / name).mkdir(parents=True, exist_ok=True)  # every rank: whoever comes first makes it
        run_dir = run_dir or new_run_dir(root, self.subcommand)
        if not launched_by_lightning():  # for the ranks Lightning's launcher may start from this process
            os.environ.update({RUN_DIR_ENV: str(run_dir), CKPT_PATH_ENV: config.ckpt_path or "",
                               PARENT_ENV: str(os.getpid())})  # fmt: skip
        config.trainer.default_root_dir = str(run_dir)
        for logger in configured(config.trainer.logger):
            if issubclass(class_of(logger.class_path), Logger) and "save_dir" in logger.init_args:
                logger.init_args.save_dir = str(run_dir)
            if issubclass(class_of(logger.class_path), WandbLogger):
                if not (logger.init_args.get("version") or logger.init_args.get("id")):
                    logger.init_args.version = run_dir.name  # W&B run id = run directory name
                if "job_type" in logger.init_args and not logger.init_args.job_type:
                    logger.init_args.job_type = self.subcommand
                if logger.init_args.get("offline") and logger.init_args.get("log_model"):
                    # WandbLogger refuses this pair; the run is still worth having, without the upload.
                    print("warning: log_model needs W&B online: checkpoints are not uploaded in offline mode, so "
                          "log_model is off for this run (add --trainer.logger.init_args.offline false to upload "
                          "them as W&B model artifacts)", file=sys.stderr)  # fmt: skip
                    logger.init_args.log_model = False
        for callback in configured(config.trainer.callbacks):
            if issubclass(class_of(callback.class_path), ModelCheckpoint) and not callback.init_args.get("dirpath"):
                callback.init_args.dirpath = str(run_dir / "checkpoints")
        for flag, kind in (("enable_progress_bar", ProgressBar), ("enable_model_summary", ModelSummary)):
            if config.trainer.get(flag) is False and isinstance(config.trainer.callbacks, list):
                # configs/cifar.yaml declares RichProgressBar and RichModelSummary; the flag turns them off
                # (Lightning refuses a progress bar callback with the flag false, and runs a summary callback).
                config.trainer.callbacks = [c for c in configured(config.trainer.callbacks)
                                            if not issubclass(class_of(c.class_path), kind)]  # fmt: skip
        self.save_config_kwargs = {"run_dir": str(run_dir), "user_config": saved}
        self.run_dir = run_dir

    def instantiate_classes(self) -> None:
        if self.subcommand == "export":  # everything comes from the checkpoint: no data, network or logger
            self.model = self.datamodule = self.trainer = None
            return
        super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "export":  # the same call as CifarTrainer.export, without building a Trainer
            config = self.config.export
            export_checkpoint(config.ckpt_path, config.format, config.output)
            return
        super()._run_subcommand(subcommand)

    def before_fit(self) -> None:
        """Make the first Ctrl-C stop like SIGTERM: after the current batch, with a checkpoint. An interrupt
        inside a step would leave a checkpoint that redoes part of it; a second Ctrl-C stops at once."""

        def on_ctrl_c(signum, frame) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):  # Lightning's handler: training only
                raise KeyboardInterrupt
            self.stop_signal = "Ctrl-C"
            print("Ctrl-C: stopping after this batch and saving a checkpoint (Ctrl-C again: stop now)", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGINT, on_ctrl_c)

    def report_stop(self, why: str) -> None:
        saved = [cb.last_model_path for cb in self.trainer.checkpoint_callbacks if cb.last_model_path]
        where = f"checkpoint saved to {saved[0]}; resume with --ckpt_path last" if saved else "no checkpoint saved"
        print(f"stopped by {why} before the run finished: {where}", file=sys.stderr)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel at once.

    By default it maps every block over 32 MB fresh and unmaps it on free; at batch 2000 an activation is
    ~260 MB, so each CPU training step faulted in and zeroed gigabytes of new pages: `configs/fast.yaml`
    spent 18% of its CPU time in the kernel. Kept, they are reused: steps 3.8 s instead of 4.9-5.7 s on
    2 CPU cores (bench/RESULTS.md), for a peak RSS 10-20% higher. Not on other C libraries, nor over the user's own
    GLIBC_TUNABLES / MALLOC_* settings. Returns whether it was applied.
    """
    if sys.platform != "linux" or any(k == "GLIBC_TUNABLES" or k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    # No mmap'ed blocks, and give the heap's free top back only past 2 GB (mallopt takes a C int).
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def main(args: list[str] | None = None) -> None:
    """Run the CLI (`args=None` reads sys.argv); a user's mistake ends in one line on stderr and exit code 2."""
    # W&B online with no reachable server would wait 90 s before failing; 30 s is plenty to connect.
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per step: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    keep_freed_memory()
    try:
        CifarCLI(
            LitModel,
            CIFAR10DataModule,
            save_config_callback=RunConfigSaver,
            trainer_class=CifarTrainer,  # adds the `export` subcommand
            auto_configure_optimizers=False,  # the optimizer is the model's own `optimizer` argument
            args=args,
            parser_kwargs={"exit_on_error": False},  # errors come to us: one line, not the whole usage
        )
    except ArgumentError as error:  # unknown key, wrong type, unreadable --config file
        message = " ".join(str(error).split())  # jsonargparse spreads some messages over lines
        print(f"error: {message} (the options and their types: main.py SUBCOMMAND --help)", file=sys.stderr)
        sys.exit(2)
    except (UserError, MisconfigurationException) as error:  # ours, and Lightning's for bad trainer values
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    except wandb.errors.Error as error:  # e.g. online with no reachable server, or no API key
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: W&B could not start the run ({reason}). Log offline with "
              f"--trainer.logger.init_args.offline true and upload later with `wandb sync`, or wait longer "
              f"with WANDB_INIT_TIMEOUT=<seconds> (now {os.environ['WANDB_INIT_TIMEOUT']})", file=sys.stderr)  # fmt: skip
        sys.exit(2)

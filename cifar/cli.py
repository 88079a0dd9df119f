"""The command line: `LightningCLI(LitModel, CIFAR10DataModule)` for fit, validate, test and predict, plain
typed functions for the tools (export, serve), and every mistake a user can make as one line with exit code 2.

Every command takes `--config` and `--ckpt_path best|last|PATH` (README, "Runs"); the run's directory, W&B id,
record, lock and what a checkpoint may be evaluated on are `cifar/run.py`'s.
"""

import logging
import os
import sys
import warnings
from pathlib import Path

import wandb
import wandb.errors
import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from jsonargparse.typing import Path_fr
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from cifar import run
from cifar.checkpoints import load_checkpoint
from cifar.data import CIFAR10DataModule
from cifar.errors import UserError, first_line
from cifar.export import export
from cifar.malloc import keep_freed_memory
from cifar.module import LitModel
from cifar.serve import serve
from cifar.stopping import RandomState, Stopped, StopOnSignal

TOOLS = {"export": export, "serve": serve}  # subcommands that are not training: `main.py export --help`


class CifarCLI(LightningCLI):
    """LightningCLI with linked class counts, `--ckpt_path best|last`, a checkpoint's own config, and the run record
    of `cifar/run.py`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides the number of classes; model and net follow (no number typed twice).
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")  # saved in checkpoints

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse; with a checkpoint, read it (once) and parse the same arguments again on top of its config, so that
        `--config` files and the options typed win over it, and `test --ckpt_path best` needs no `--config`."""
        super().parse_arguments(parser, args)
        self.checkpoint = None
        command = self.config.get("subcommand")
        if not (command and self.config[command].get("ckpt_path")):
            return
        config = self.config[command]
        ckpt_path = run.find_checkpoint(config.ckpt_path, Path(config.trainer.default_root_dir))
        self.checkpoint = load_checkpoint(ckpt_path)
        start = parser.parse_object({"subcommand": command, command: run.config_of(self.checkpoint)}, defaults=False)
        self.config = parser.parse_args(args, namespace=start)
        self.config[command].ckpt_path = str(ckpt_path)
        rank_zero_info(f"Config: checkpoint {ckpt_path}'s, then --config files and the command line")

    def _parse_ckpt_path(self) -> None:
        """Nothing: `parse_arguments` has parsed the command line over the checkpoint's config. LightningCLI's own
        step puts the checkpoint's hyperparameters over the command line (Lightning #21455): `--model.tta 1` is lost."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        self.run = run.Run.start(self.subcommand, Path(config.trainer.default_root_dir), config.ckpt_path)
        if self.subcommand == "fit" and self.checkpoint:
            self.run.trained_on = run.training_record(self.checkpoint) or []
        # Before the trainer starts W&B: only a resumed run can have another writer (a new one has a new directory);
        # rank 0 by the launcher's environment, as Lightning's rank_zero_only knows it this early.
        held = self.run.lock() if self.run.resumed and rank_zero_only.rank == 0 else None
        self.save_config_kwargs = {"run": self.run, "user_config": config.clone(), "held": held}
        point_at(self.run, config)

    def after_instantiate_classes(self) -> None:
        """Read the data now, so that a bad file, or an evaluation of a checkpoint on images it trained on, stops the
        command before anything is written (Lightning starts W&B before it sets the data up). Data still to be
        downloaded is read when the trainer runs, and cannot be checked."""
        data = self.datamodule
        if data.format is None and self.subcommand != "predict":
            return
        data.setup(self.subcommand)  # Lightning's stages are the commands' names
        if self.checkpoint and self.subcommand != "predict":
            ckpt_path = self.config[self.subcommand].ckpt_path
            self.run.evaluation = run.evaluation(self.subcommand, data, self.checkpoint, ckpt_path)

    def before_fit(self) -> None:
        keep_freed_memory()  # training only: larger RSS for faster CPU steps (cifar/malloc.py)


def point_at(run_: run.Run, config: Namespace) -> None:
    """Point the parsed config at the run: the trainer's root, every logger's `save_dir` (W&B: the run's id, the
    command as job type, offline without a key), ModelCheckpoint's `dirpath` where unset. On the config because
    LightningCLI builds the trainer, loggers and callbacks from it, and none takes a directory afterwards."""
    config.trainer.default_root_dir = str(run_.dir)
    for logger in entries(config.trainer.logger):
        if "save_dir" in logger.init_args:
            logger.init_args.save_dir = str(run_.dir)
        if issubclass(class_of(logger.class_path), WandbLogger):
            # Absolute: W&B resolves a relative dir against the working directory of the process's first run.
            logger.init_args.save_dir = str(run_.dir.resolve())
            if not (logger.init_args.get("version") or logger.init_args.get("id")):
                logger.init_args.version = run_.id
            logger.init_args.job_type = logger.init_args.get("job_type") or run_.command
            offline_without_a_key(logger.init_args)
    for callback in entries(config.trainer.callbacks):
        if issubclass(class_of(callback.class_path), ModelCheckpoint) and not callback.init_args.get("dirpath"):
            callback.init_args.dirpath = str(run_.dir / "checkpoints")


def offline_without_a_key(init_args: Namespace) -> None:
    """W&B's own settings decide online or offline, except that with no API key a run logs offline rather than
    prompting or failing (and says how to upload it). `offline: true` or a `mode` in the config wins."""
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")  # seconds; W&B's 90 is long to wait for an error
    if init_args.get("offline") and init_args.get("log_model"):  # WandbLogger refuses the pair, in a traceback
        raise UserError("log_model with offline: true: Lightning's WandbLogger refuses to log checkpoints offline. Drop "
                        "offline (with no API key configured the run logs offline anyway, checkpoints included, for "
                        "`wandb sync`) or log_model")  # fmt: skip
    if init_args.get("offline") or init_args.get("mode"):
        return
    if (os.environ.get("WANDB_MODE") or wandb.setup().settings.mode) == "online" and not wandb.login(prompt=False):
        init_args.mode = "offline"
        rank_zero_info("W&B: no API key configured (`wandb login` or WANDB_API_KEY), so this run logs offline; "
                       "upload it later with `wandb sync <run dir>/wandb`")  # fmt: skip


def class_of(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def entries(value) -> list[Namespace]:
    """The class_path/init_args entries of a config value that may be None, a bool, one entry or a list."""
    return [e for e in (value if isinstance(value, list) else [value]) if isinstance(e, Namespace) and "class_path" in e]


def run_tool(name: str, argv: list[str]) -> None:
    """A tool (`export`, `serve`) as a typed function, plus the options every command shares: `--config` says
    where `best` and `last` look, and `--ckpt_path` is resolved as for training commands (cifar/run.py)."""
    tool = TOOLS[name]
    parser = ArgumentParser(prog=f"main.py {name}", exit_on_error=False, description=tool.__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path_fr | None, help="A training config (configs/*.yaml): `best` and `last` "
                        "are looked up under its trainer.default_root_dir (default: runs/, every config's runs)")  # fmt: skip
    parser.add_function_arguments(tool, as_group=False)
    options = parser.parse_args(argv).as_dict()
    config_path = options.pop("config", None)
    config = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
    root = Path(((config or {}).get("trainer") or {}).get("default_root_dir") or "runs")
    options["ckpt_path"] = str(run.find_checkpoint(options["ckpt_path"], root))
    tool(**options)


def main(args: list[str] | None = None) -> None:
    """Run the CLI (`args=None` reads sys.argv); a user's mistake ends in one line on stderr and exit code 2."""
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per step: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # A checkpoint of a fit with EMAWeightAveraging holds the average as its weights: validate, test and predict
    # score it as they should, and Lightning's warning that the callback's state is not restored there is noise.
    warnings.filterwarnings("ignore", message=r"You're using the WeightAveraging callback, but loading a checkpoint")
    # Lightning 2.6 logs "💡 Tip: ... install litlogger / litmodels" in every command, through plain Python logging.
    lightning_console = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lightning_console.addFilter(lambda record: not str(record.msg).startswith("💡 Tip"))
    argv = sys.argv[1:] if args is None else args
    stopper = StopOnSignal()
    try:
        if argv and argv[0] in TOOLS:
            run_tool(argv[0], argv[1:])
            return
        CifarCLI(
            LitModel,
            CIFAR10DataModule,
            save_config_callback=run.RunRecord,
            trainer_defaults={"default_root_dir": "runs", "callbacks": [stopper, RandomState()]},  # always there
            auto_configure_optimizers=False,  # the optimizer is the model's own `optimizer` argument
            args=args,
            parser_kwargs={"exit_on_error": False,  # errors come to us: one line, not the whole usage
                           "epilog": f"tools: {', '.join(TOOLS)} (main.py export --help, main.py serve --help)"},  # fmt: skip
        )
    except Stopped as stop:
        if stopper.trainer is None or stopper.trainer.is_global_zero:
            print(stopper.report(), file=sys.stderr)
        sys.exit(stop.code)
    except SIGTERMException:  # Lightning's own SIGTERM handling, outside training (test, validate, predict)
        print("stopped by SIGTERM before the run finished", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM
    except SystemExit as stop:
        if stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt):  # Lightning's exit after Ctrl-C
            sys.exit(130)  # 128 + SIGINT
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except ArgumentError as error:  # unknown key, wrong type, unreadable --config file
        message = " ".join(str(error).split())  # jsonargparse spreads some messages over lines
        command = f"main.py {argv[0]} --help" if argv and argv[0] in TOOLS else "main.py SUBCOMMAND --help"
        print(f"error: {message} (the options and their types: {command})", file=sys.stderr)
        sys.exit(2)
    except (UserError, MisconfigurationException) as error:  # ours, and Lightning's for bad trainer values
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    except wandb.errors.Error as error:  # e.g. online with no reachable server, or an invalid API key
        print(f"error: W&B could not start the run ({first_line(error)}). Log offline with "
              f"--trainer.logger.init_args.offline true and upload later with `wandb sync`, or wait longer "
              f"with WANDB_INIT_TIMEOUT=<seconds>", file=sys.stderr)  # fmt: skip
        if args is None:  # the command line's own process
            # W&B's exit handler waits for its service, which can go on retrying the unreachable server for
            # minutes (seen: over 6): leave now; the service watches this process and ends with it.
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)

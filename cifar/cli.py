"""The command line: `LightningCLI(LitModel, CIFAR10DataModule)` for fit, validate, test and predict, plain
typed functions for the tools (export), and every mistake a user can make as one line with exit code 2.

What a run writes and where, its W&B id, and `--ckpt_path best|last` follow the rules in `cifar/runs.py`;
which images a checkpoint is evaluated on, those in `cifar/provenance.py`.
"""

import sys
import warnings
from pathlib import Path

import wandb.errors
from jsonargparse import ArgumentError, auto_cli
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from cifar.data import CIFAR10DataModule
from cifar.errors import UserError
from cifar.export import export
from cifar.malloc import keep_freed_memory
from cifar.module import LitModel
from cifar.provenance import adopt_split, given_on_command_line
from cifar.runs import Run, RunSaver, class_of, entries, resolve_checkpoint
from cifar.serve import serve
from cifar.stopping import Stopped, StopOnSignal
from cifar.wandb_mode import offline_without_a_key

TOOLS = {"export": export, "serve": serve}  # subcommands that are not training: `main.py export --help`


class CifarCLI(LightningCLI):
    """LightningCLI with linked class counts, a directory per run, and `--ckpt_path best|last` from disk."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides the number of classes; model and net follow (no number typed twice).
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")  # saved in checkpoints

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then turn `--ckpt_path best|last` into a file, before LightningCLI reads the checkpoint's
        hyperparameters (so `test` rebuilds the network that was trained)."""
        super().parse_arguments(parser, args)
        self.argv = sys.argv[1:] if args is None else list(args) if isinstance(args, list) else []
        config = self.config.get(self.config.get("subcommand") or "")
        if config is not None and config.get("ckpt_path"):
            config.ckpt_path = str(resolve_checkpoint(config.ckpt_path, Path(config.trainer.default_root_dir)))
            self.typed_model_options = {key: config[key] for key in typed_options(self.argv, "model", config)}

    def before_instantiate_classes(self) -> None:
        """The run directory hook: this command's run, its paths in the config, W&B online or offline, and the
        split of the checkpoint's data (cifar/provenance.py, rule 1)."""
        config = self.config[self.subcommand]
        # Between parsing and this hook, LightningCLI puts the checkpoint's hyperparameters over the whole config,
        # the command line included (Lightning issues #20801, #21455): the config file's model yields to the
        # checkpoint (test rebuilds the net that was trained), but what the user typed (`--model.tta 0`) must win.
        for key, value in getattr(self, "typed_model_options", {}).items():
            config[key] = value
        if config.ckpt_path and self.subcommand in ("fit", "validate", "test"):
            adopt_split(config.data, config.ckpt_path, given_on_command_line(self.argv), self.subcommand)
        run = Run.start(self.subcommand, Path(config.trainer.default_root_dir), config.ckpt_path)
        self.save_config_kwargs = {"run": run, "user_config": config.clone()}  # for RunSaver
        run.configure(config)
        for logger in entries(config.trainer.logger):
            if issubclass(class_of(logger.class_path), WandbLogger):
                offline_without_a_key(logger.init_args)

    def before_fit(self) -> None:
        keep_freed_memory()  # training only: larger RSS for faster CPU steps (cifar/malloc.py)


def typed_options(argv: list[str], group: str, config) -> list[str]:
    """The keys of `config` that `--group.x.y` arguments in argv set (`--model.optimizer.lr` sets the key
    `model.optimizer.init_args.lr`)."""
    keys = []
    for arg in argv:
        if arg.startswith(f"--{group}."):
            key = arg[2:].split("=", 1)[0]
            matches = [k for k in config.keys() if k == key or k.replace(".init_args.", ".") == key]
            keys += matches or [k for k in config.keys() if k.startswith(key + ".")]
    return keys


def main(args: list[str] | None = None) -> None:
    """Run the CLI (`args=None` reads sys.argv); a user's mistake ends in one line on stderr and exit code 2."""
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per step: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    argv = sys.argv[1:] if args is None else args
    stopper = StopOnSignal()
    try:
        if argv and argv[0] in TOOLS:
            auto_cli(TOOLS[argv[0]], args=argv[1:], as_positional=False, exit_on_error=False, prog=f"main.py {argv[0]}")
            return
        CifarCLI(
            LitModel,
            CIFAR10DataModule,
            save_config_callback=RunSaver,
            trainer_defaults={"default_root_dir": "runs", "callbacks": [stopper]},  # StopOnSignal: always there
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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: W&B could not start the run ({reason}). Log offline with "
              f"--trainer.logger.init_args.offline true and upload later with `wandb sync`, or wait longer "
              f"with WANDB_INIT_TIMEOUT=<seconds>", file=sys.stderr)  # fmt: skip
        sys.exit(2)

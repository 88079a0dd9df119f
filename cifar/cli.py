"""The command line: `LightningCLI(LitModel, CIFAR10DataModule)` for fit, validate, test and predict, plain
typed functions for the tools (export, serve), and every mistake a user can make as one line with exit code 2.

Every command takes `--config` and `--ckpt_path best|last|PATH`; what they mean, and everything else about
a run (its directory, W&B id, record, lock, and what a checkpoint may be evaluated on), is `cifar/run.py`'s.
"""

import logging
import sys
import warnings
from pathlib import Path

import wandb.errors
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import Path_fr
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from cifar import run
from cifar.checkpoints import load_checkpoint
from cifar.data import SPLIT_OPTIONS, CIFAR10DataModule
from cifar.errors import UserError
from cifar.export import export
from cifar.malloc import keep_freed_memory
from cifar.module import LitModel
from cifar.serve import serve
from cifar.stopping import RandomState, Stopped, StopOnSignal

TOOLS = {"export": export, "serve": serve}  # subcommands that are not training: `main.py export --help`


class CifarCLI(LightningCLI):
    """LightningCLI with linked class counts and the run record of `cifar/run.py`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides the number of classes; model and net follow (no number typed twice).
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")  # saved in checkpoints

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse; then turn `--ckpt_path best|last` into a file and, with no `--config`, parse again on top of
        that run's own config (cifar/run.py, rules 5-6). Before LightningCLI reads the checkpoint's
        hyperparameters, so `test` rebuilds the network that was trained."""
        super().parse_arguments(parser, args)
        self.argv = sys.argv[1:] if args is None else list(args)
        command = self.config.get("subcommand")
        config = self.config.get(command) if command else None
        if config is None or not config.get("ckpt_path"):
            return
        ckpt_path = run.find_checkpoint(config.ckpt_path, Path(config.trainer.default_root_dir))
        if not config.get("config") and (start := run.config_of(ckpt_path)):
            at = self.argv.index(command) + 1
            self.config = parser.parse_args([*self.argv[:at], "--config", str(start), *self.argv[at:]])
            config = self.config[command]
            rank_zero_info(f"Config: {start}, the checkpoint's run's (options on the command line win)")
        config.ckpt_path = str(ckpt_path)
        # LightningCLI next puts the checkpoint's hyperparameters over the whole config, the command line
        # included (Lightning #20801, #21455): what the user typed (`--model.tta 0`) is put back on top after.
        self.typed = {key: config[key] for key in typed_options(self.argv, config)}

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        for key, value in getattr(self, "typed", {}).items():
            if key.startswith("model."):
                config[key] = value
        train = run.training_source(self.subcommand, config.data)  # before anything is made: stray files stop here
        evaluation = trained_on = None
        if config.ckpt_path and self.subcommand in ("fit", "validate", "test"):
            split_typed = {key.split(".")[1] for key in getattr(self, "typed", {})} & set(SPLIT_OPTIONS)
            evaluation = run.evaluation(self.subcommand, config.data, train, split_typed, Path(config.ckpt_path))
            if self.subcommand == "fit":
                trained_on = run.training_record(load_checkpoint(Path(config.ckpt_path)))
        this_run = run.Run.start(self.subcommand, Path(config.trainer.default_root_dir), config.ckpt_path)
        # Rule 3, before the trainer starts W&B: only a resumed run can have another writer (a new one has a new
        # directory); rank 0 by the launcher's environment, as Lightning's rank_zero_only knows it this early.
        held = this_run.lock() if this_run.resumed and rank_zero_only.rank == 0 else None
        self.save_config_kwargs = {"run": this_run, "user_config": config.clone(), "evaluation": evaluation,
                                   "trained_on": trained_on, "held": held}  # fmt: skip
        this_run.configure(config)

    def before_fit(self) -> None:
        keep_freed_memory()  # training only: larger RSS for faster CPU steps (cifar/malloc.py)


def typed_options(argv: list[str], config) -> list[str]:
    """The keys of `config` that `--model.*` and `--data.*` arguments in argv set (`--model.optimizer.lr` sets
    `model.optimizer.init_args.lr`)."""
    keys = []
    for arg in argv:
        if arg.startswith(("--model.", "--data.")):
            key = arg[2:].split("=", 1)[0]
            matches = [k for k in config.keys() if k == key or k.replace(".init_args.", ".") == key]
            keys += matches or [k for k in config.keys() if k.startswith(key + ".")]
    return keys


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


class NoAdvertisements(logging.Filter):
    """Lightning 2.6 logs "💡 Tip: ... install litlogger / litmodels" through its rank-zero logger in every
    command: a filter on that logger (Lightning's console output is plain Python logging) drops just those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def main(args: list[str] | None = None) -> None:
    """Run the CLI (`args=None` reads sys.argv); a user's mistake ends in one line on stderr and exit code 2."""
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per step: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NoAdvertisements())
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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: W&B could not start the run ({reason}). Log offline with "
              f"--trainer.logger.init_args.offline true and upload later with `wandb sync`, or wait longer "
              f"with WANDB_INIT_TIMEOUT=<seconds>", file=sys.stderr)  # fmt: skip
        sys.exit(2)

"""The command line: `LightningCLI(LitModel, CIFAR10DataModule)` for fit, validate, test and predict, the tools export,
serve and sweep, and every mistake a user can make as one line with exit code 2. A checkpoint's model is rebuilt one
way for every command: its config, then `--config` files, then the command line (README, "Runs")."""

import argparse
import contextlib
import importlib
import inspect
import logging
import os
import sys
import warnings
from pathlib import Path
from pydoc import locate

import wandb.errors
import yaml
from jsonargparse import ActionConfigFile, ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from cifar import loggers, run
from cifar.data import CIFAR10DataModule
from cifar.errors import UserError, first_line
from cifar.cpu import keep_freed_memory
from cifar.module import LitModel
from cifar.resume import RandomState, StopOnSignal, Stopped

# Subcommands that are not training (`main.py export --help`): their modules, imported when run, so that a fit (each
# trial of a sweep) does not import LitServe.
TOOLS = {"export": "cifar.export", "serve": "cifar.serve"}


class CifarCLI(LightningCLI):
    """LightningCLI with linked class counts, `--ckpt_path best|last`, a checkpoint's own config, and the run's
    lifetime: opened once the config is known, closed when the command ends, however it ends (`cifar/run.py`)."""

    def __init__(self, *args, **kwargs):
        with contextlib.ExitStack() as self.lifetime:
            super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides the number of classes; model and net follow (no number typed twice).
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")  # saved in checkpoints
        parser.add_argument("--allow_overlap", type=bool, default=False, help="Evaluate a checkpoint (validate, test, "
                            "fit from it) even on images it trained on, the results marked 'overlaps training data'")  # fmt: skip

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        command, self.checkpoint = self.config.get("subcommand"), None
        if command and self.config[command].get("ckpt_path"):
            self.config, self.checkpoint = over_checkpoint(parser, args, self.config, command)
            ckpt_path = self.config[command].ckpt_path
            rank_zero_info(f"Config: checkpoint {ckpt_path}'s, then --config files and the command line")

    def _parse_ckpt_path(self) -> None:
        """Nothing: `parse_arguments` has parsed the command line over the checkpoint's config. LightningCLI's own
        step puts the checkpoint's hyperparameters over the command line (Lightning #21455)."""

    def before_instantiate_classes(self) -> None:
        command, config = self.subcommand, self.config[self.subcommand]
        self.given = yaml.safe_load(self.parser.dump(self.config, skip_none=False))[command]  # before point_at
        root = Path(config.trainer.default_root_dir)
        self.run = self.lifetime.enter_context(run.open(command, root, config.ckpt_path))
        self.run.trained_on = run.lineage(self.checkpoint, config.ckpt_path)
        point_at(self.run, config)

    def after_instantiate_classes(self) -> None:
        """Read the data now, so that a bad file, or an evaluation of a checkpoint on images it trained on, stops the
        command before anything is written (Lightning starts W&B before it sets the data up). Data still to be
        downloaded is read when the trainer runs, and cannot be checked."""
        command, config, data = self.subcommand, self.config[self.subcommand], self.datamodule
        self.trainer.callbacks.append(run.RunRecord(self.run, self.given, config.ckpt_path))
        if read := data.format is not None or command == "predict":
            data.setup(command)  # Lightning's stages are the commands' names
        if command == "fit":  # training only, once the data is read: larger RSS for faster CPU steps (cpu.py)
            keep_freed_memory()
        if read and self.checkpoint and command != "predict":
            fit_run = self.checkpoint.get("run", {}).get("name") or getattr(run.run_of(config.ckpt_path), "name", None)
            e = self.run.evaluation = run.evaluation(command, data, self.run.trained_on, config.ckpt_path, fit_run)
            if e["overlap"] and not config.allow_overlap:
                what = "test" if command == "test" else "validation"
                raise UserError(f"{e['overlap']} of the {e['images']} {what} images were used to train checkpoint "
                                f"{e['checkpoint']} (it trained on {e['trained']}; this command's split: "
                                f"{run.split_text(data.split)}). Evaluate honestly: leave --data.seed, --data.val_size "
                                f"and --data.test_size off the command line (the checkpoint's split is used), or use "
                                f"separate data (test/<class>/ folders, the official test batches); or pass "
                                f"--allow_overlap true to evaluate them (marked '{run.OVERLAPS}')")  # fmt: skip
            rank_zero_info(f"Evaluating {e['data']}: {e['note']}")


def over_checkpoint(parser: LightningArgumentParser, args, config: Namespace, command: str | None = None):
    """(config, checkpoint): `--ckpt_path` resolved, the checkpoint read once, and `args` parsed again over its config,
    so that `--config` files and the options typed win over it (`test --ckpt_path best` needs no `--config`)."""
    options = config[command] if command else config
    ckpt_path = run.find_checkpoint(options.ckpt_path, Path(options.trainer.get("default_root_dir") or "runs"))
    checkpoint = run.load_checkpoint(ckpt_path)
    start = run.config_of(checkpoint)
    start = {"subcommand": command, command: start} if command else start
    config = parser.parse_args(args, namespace=parser.parse_object(start, defaults=False))
    (config[command] if command else config).ckpt_path = str(ckpt_path)
    return config, checkpoint


def point_at(run_: run.Run, config: Namespace) -> None:
    """Point the parsed config at the run: the trainer's root, every logger, and ModelCheckpoint's `dirpath` where
    unset (LightningCLI builds them from the config, and none takes a directory afterwards)."""
    config.trainer.default_root_dir = str(run_.dir)
    for entry in entries(config.trainer.logger):
        loggers.point(entry, locate(entry.class_path), run_)
    for entry in entries(config.trainer.callbacks):
        if issubclass(locate(entry.class_path), ModelCheckpoint) and not entry.init_args.get("dirpath"):
            entry.init_args.dirpath = str(run_.dir / "checkpoints")


def entries(value) -> list[Namespace]:
    """The class_path/init_args entries of a config value that may be None, a bool, one entry or a list."""
    return [e for e in (value if isinstance(value, list) else [value]) if isinstance(e, Namespace)]


def model_parser(**kwargs) -> LightningArgumentParser:
    """A parser of training configs that builds the model alone: `model` as `fit` has it, the other sections read as
    they are (`trainer.default_root_dir` says where `best` is)."""
    parser = LightningArgumentParser(**kwargs)
    parser.add_argument("--config", action=ActionConfigFile, help="Training configs (configs/*.yaml), over the "
                        "checkpoint's config; `best` and `last` are looked up under their trainer.default_root_dir")  # fmt: skip
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="The checkpoint (required): `best` or "
                        "`last` (of the latest run under trainer.default_root_dir, default runs/), or a .ckpt path")  # fmt: skip
    parser.add_argument("--seed_everything", type=int | bool | None, default=None, help=argparse.SUPPRESS)
    for section in ("trainer", "data"):
        parser.add_argument(f"--{section}", type=dict, default={}, help=argparse.SUPPRESS)
    parser.add_lightning_class_args(LitModel, "model")
    return parser


def rebuilt(parser: LightningArgumentParser, argv: list[str]) -> tuple[Namespace, LitModel, Path]:
    """(options, model, checkpoint path): the checkpoint's model rebuilt as `test` rebuilds it, eager, with its
    weights (`over_checkpoint`)."""
    if not (options := parser.parse_args(argv)).ckpt_path:
        raise UserError("--ckpt_path is required: best, last or the path of a .ckpt file")
    options, checkpoint = over_checkpoint(parser, argv, options)
    model = options.model
    model.compile = model.channels_last = False  # the same function, eager and plain
    if not model.classes:
        model.classes = [str(i) for i in range(model.num_classes)]
        print(f"note: {options.ckpt_path} holds no class names; they are numbered 0..{model.num_classes - 1}",
              file=sys.stderr)  # fmt: skip
    model.num_classes = model.net.init_args.num_classes = len(model.classes)  # as `fit` links them from the data
    lit_model = parser.instantiate_classes(Namespace(model=model)).model
    lit_model.on_load_checkpoint(checkpoint)  # a network of another shape: one line, not Lightning's page
    lit_model.load_state_dict(checkpoint["state_dict"])
    return options, lit_model.eval(), Path(options.ckpt_path)


def load_model(ckpt_path: str | Path, *args: str) -> LitModel:
    """The model of a checkpoint (a path, `best` or `last`), rebuilt as every command rebuilds it, in eval mode;
    `args`: more options, e.g. "--model.tta", "1"."""
    return rebuilt(model_parser(), ["--ckpt_path", str(ckpt_path), *args])[1]


def run_tool(name: str, argv: list[str]) -> None:
    """A tool (`export`, `serve`): a typed function of the rebuilt model, with the options every command takes."""
    tool = getattr(importlib.import_module(TOOLS[name]), name)
    parser = model_parser(prog=f"main.py {name}", exit_on_error=False, description=tool.__doc__.split("\n")[0])
    parser.add_function_arguments(tool, as_group=False, skip={"model", "ckpt_path"})
    options, model, ckpt_path = rebuilt(parser, argv)
    tool(model, ckpt_path, **{key: options[key] for key in list(inspect.signature(tool).parameters)[2:]})


def no_tip(record: logging.LogRecord) -> bool:
    """Lightning 2.6 logs "💡 Tip: ... install litlogger / litmodels" in every command: not ours to advertise."""
    return not str(record.msg).startswith("💡 Tip")


def main(args: list[str] | None = None) -> None:
    """Run the CLI (`args=None` reads sys.argv); a user's mistake ends in one line on stderr and exit code 2."""
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per step: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # A checkpoint of a fit with EMAWeightAveraging holds the average as its weights: validate, test and predict
    # score it as they should, and Lightning's warning that the callback's state is not restored there is noise.
    warnings.filterwarnings("ignore", message=r"You're using the WeightAveraging callback, but loading a checkpoint")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(no_tip)  # once, however often main runs
    argv, stopper = sys.argv[1:] if args is None else args, StopOnSignal()
    try:
        if argv and argv[0] in TOOLS:
            return run_tool(argv[0], argv[1:])
        if argv and argv[0] == "sweep":
            try:
                from cifar.sweep import command
            except ImportError as error:  # Optuna: the [sweep] extra
                raise UserError(f"sweep needs {error.name or 'Optuna'}: pip install -e '.[sweep]'") from None
            return command(argv[1:])
        cli = CifarCLI(
            LitModel,
            CIFAR10DataModule,
            save_config_callback=None,  # the run's record writes config.yaml (cifar/run.py)
            trainer_defaults={"default_root_dir": "runs", "callbacks": [stopper, RandomState()]},  # always there
            auto_configure_optimizers=False,  # the optimizer is the model's own `optimizer` argument
            load_from_checkpoint_support=False,  # a checkpoint holds its config once: in the run's record
            args=args,
            parser_kwargs={
                "exit_on_error": False,  # errors come to us: one line, not the whole usage
                "epilog": f"tools: {', '.join(TOOLS)}, sweep (main.py TOOL --help)",
            },
        )
        if (e := cli.run.evaluation) and e["overlap"] and cli.subcommand in ("validate", "test"):
            rank_zero_info(f"The results above: {e['note']}")  # after Lightning's table
    except Stopped as stop:
        if stopper.trainer is None or stopper.trainer.is_global_zero:
            print(stopper.report(), file=sys.stderr)
        sys.exit(stop.code)
    except SIGTERMException:  # Lightning's own SIGTERM handling, outside training (test, validate, predict)
        print("stopped by SIGTERM before the run finished", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM
    except SystemExit as stop:  # Lightning exits 1 after Ctrl-C: a shell's 128 + SIGINT instead
        sys.exit(130 if stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt) else stop.code)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ArgumentError, UserError, MisconfigurationException) as error:  # Lightning's: bad trainer values
        command = f"main.py {argv[0] if argv and argv[0] in (*TOOLS, 'sweep') else 'SUBCOMMAND'} --help"
        types = f" (the options and their types: {command})" if isinstance(error, ArgumentError) else ""
        print(f"error: {' '.join(str(error).split())}{types}", file=sys.stderr)
        sys.exit(2)
    except wandb.errors.Error as error:  # e.g. online with no reachable server, or an invalid API key
        print(f"error: W&B could not start the run ({first_line(error)}). Log offline with "
              f"--trainer.logger.init_args.offline true and upload later with `wandb sync`, or wait longer "
              f"with WANDB_INIT_TIMEOUT=<seconds>", file=sys.stderr)  # fmt: skip
        if args is None:  # W&B's exit handler would wait for its service, which may go on retrying the server
            sys.stderr.flush()
            os._exit(2)  # the service watches this process and ends with it
        sys.exit(2)

"""What the loggers see of a run: where they write and under which W&B id, the config (once per logger), and for an
evaluation W&B's summary and tags."""

import os

import wandb
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from cifar.errors import UserError


def point(logger: Namespace, logger_class: type, run) -> None:
    """Point one logger's parsed config at the run: its `save_dir`; for W&B also the run's id, the command as job
    type, and offline when there is no API key."""
    if "save_dir" in logger.init_args:
        logger.init_args.save_dir = str(run.dir)
    if issubclass(logger_class, WandbLogger):
        # Absolute: W&B resolves a relative dir against the working directory of the process's first run.
        logger.init_args.save_dir = str(run.dir.resolve())
        if not (logger.init_args.get("version") or logger.init_args.get("id")):
            logger.init_args.version = run.id
        logger.init_args.job_type = logger.init_args.get("job_type") or run.command
        offline_without_a_key(logger.init_args)


def offline_without_a_key(init_args: Namespace) -> None:
    """W&B's own settings decide online or offline, except that with no API key a run logs offline rather than
    prompting or failing (and says how to upload it). `offline: true` or a `mode` in the config wins. The mode is
    passed to the run: W&B reads WANDB_MODE at a process's first run only, and `main()` may run again in one."""
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")  # seconds; W&B's 90 is long to wait for an error
    if init_args.get("offline") and init_args.get("log_model"):  # WandbLogger refuses the pair, in a traceback
        raise UserError("log_model with offline: true: Lightning's WandbLogger refuses to log checkpoints offline. Drop "
                        "offline (with no API key configured the run logs offline anyway, checkpoints included, for "
                        "`wandb sync`) or log_model")  # fmt: skip
    if init_args.get("offline") or init_args.get("mode"):
        return
    init_args.mode = os.environ.get("WANDB_MODE") or wandb.setup().settings.mode
    if init_args.mode == "online" and not wandb.login(prompt=False):
        init_args.mode = "offline"
        rank_zero_info("W&B: no API key configured (`wandb login` or WANDB_API_KEY), so this run logs offline; "
                       "upload it later with `wandb sync <run dir>/wandb`")  # fmt: skip


def log_run(trainer: Trainer, config: dict, evaluated: dict | None) -> None:
    """Give every logger the config (nested, as config.yaml holds it) and what a validate or test evaluates; W&B
    also gets the evaluation in its summary, and a tag when the images overlap the checkpoint's training data."""
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": config, **({"evaluated": evaluated} if evaluated else {})})
        if isinstance(logger, WandbLogger) and evaluated:
            summary = {"evaluated_data": "data", "checkpoint": "checkpoint", "fit_run": "fit_run",
                       "overlaps_training_data": "overlap"}  # W&B's key: the evaluation's  # fmt: skip
            logger.experiment.summary.update({key: evaluated[name] for key, name in summary.items()})
            logger.experiment.tags += ("overlaps-training-data",) if evaluated["overlap"] else ()

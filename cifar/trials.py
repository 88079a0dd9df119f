"""A sweep's trials as its Optuna study holds them: the storage, which trials count, what a trial's `fit` reports
(`Report`, the callback `sweep` adds to it), and what the sweep writes of them: trials.csv, best.yaml, the plots
and a summary."""

import contextlib
import csv
import io
import math
import os
import tempfile
import warnings
from pathlib import Path

import optuna
import sqlalchemy.engine
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from cifar import sweepfile
from cifar.errors import UserError, first_line

State = optuna.trial.TrialState
PASSWORD = "CIFAR_SWEEP_STORAGE_PASSWORD"  # a storage URL's password reaches trials here, never their config files
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries, plots
# Optuna's heartbeats are made for Study.optimize; a trial here is a process of its own, whose heartbeat we beat
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2, inherit_intermediate_values=True)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial is ours


def fit_config(args: list[str]) -> str:
    """The whole config `fit ARGS` would run, as `--print_config` prints it; a mistake is a UserError."""
    from cifar.cli import main

    printed, said = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(said):
        try:
            main(["fit", *args, "--print_config"])
        except SystemExit as stop:
            if stop.code:
                lines = said.getvalue().strip().splitlines() or [f"exit code {stop.code}"]
                raise UserError(lines[-1].removeprefix("error: ")) from None
    return printed.getvalue()


def shown(url: str) -> str:
    with contextlib.suppress(Exception):
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    return url


def open_storage(url: str, heartbeat: int = 0) -> optuna.storages.RDBStorage:
    """Optuna's database storage, with heartbeats when `heartbeat` (seconds) > 0; a password may come from PASSWORD."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
        if os.environ.get(PASSWORD) and not parsed.password:
            parsed = parsed.set(password=os.environ[PASSWORD])
        # SQLite: each worker waits up to 60 s for another's write instead of failing at once
        engine = {"connect_args": {"timeout": 60}} if parsed.drivername.startswith("sqlite") else {}
        beat = {"heartbeat_interval": heartbeat, "heartbeat_stale_trial_callback": RETRY} if heartbeat > 0 else {}
        return optuna.storages.RDBStorage(parsed.render_as_string(hide_password=False), engine_kwargs=engine, **beat)
    except ImportError:
        raise UserError(f"the Optuna storage {shown(url)} needs its database driver (PostgreSQL: pip install "
                        f"'psycopg[binary]')") from None
    except Exception as error:  # sqlalchemy's and the drivers' many kinds
        raise UserError(f"cannot open the Optuna storage {shown(url)} ({first_line(error)}): give a database URL such "
                        f"as sqlite:///path/study.db or postgresql://user@host/db, its server running") from None


def without_password(url: str) -> str:
    return sqlalchemy.engine.make_url(url).set(password=None).render_as_string(hide_password=False)


def counted(trials: list) -> list:
    """The trials that count toward the sweep's total: not those waiting, nor failed ones queued again."""
    retried = {n for t in trials for n in RETRY.retry_history(t)}
    return [t for t in trials if t.state != State.WAITING and not (t.state == State.FAIL and t.number in retried)]


def text(options: dict) -> str:
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in options.items())


def write_table(study: optuna.Study, spec: sweepfile.Sweep, root: Path) -> None:
    """trials.csv: trial, state, the values passed, value, seconds, run directory, note; replaced whole."""
    keys = [p.key for p in spec.parameters]
    with tempfile.NamedTemporaryFile("w", dir=root, suffix=".csv", delete=False, newline="") as f:
        table = csv.writer(f)
        table.writerow(["trial", "state", *keys, "value", "seconds", "run", "note"])
        trials = study.get_trials(deepcopy=False)
        again = {RETRY.retry_history(t)[-1]: t.number for t in trials if RETRY.retry_history(t)}  # failed: its retry
        for t in trials:
            options = t.user_attrs.get("options", {})
            seconds = f"{t.duration.total_seconds():.1f}" if t.duration else ""
            notes = [t.user_attrs.get("note", "") if t.state == State.FAIL else "",
                     f"runs trial {RETRY.retry_history(t)[-1]} again" if RETRY.retry_history(t) else "",
                     f"run again as trial {again[t.number]}" if t.number in again else ""]
            table.writerow([t.number, t.state.name.lower(), *(options.get(k, "") for k in keys),
                            "" if t.value is None else t.value, seconds, t.user_attrs.get("run", ""),
                            "; ".join(filter(None, notes))])
    os.replace(f.name, root / "trials.csv")


def write_best(study: optuna.Study, spec: sweepfile.Sweep, root: Path) -> optuna.trial.FrozenTrial | None:
    """best.yaml: the best complete trial's whole config, its seed included (`fit --config best.yaml` reruns it)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == State.COMPLETE]
    if not complete:
        return None
    best = study.best_trial
    run_config = Path(best.user_attrs.get("run", "."), "config.yaml")
    seed = yaml.safe_load(run_config.read_text()).get("seed_everything") if run_config.exists() else None
    options = [sweepfile.option(k, v) for k, v in best.user_attrs.get("options", {}).items()]
    printed = fit_config([*spec.base, *options, *(["--seed_everything", str(seed)] if seed is not None else [])])
    (root / "best.yaml").write_text(f"# sweep {study.study_name}: trial {best.number}, {spec.metric} {best.value}\n{printed}")
    return best


def write_plots(study: optuna.Study, root: Path) -> list[str]:
    """Optuna's optimization history, parameter importances and parallel coordinates, as PNG (those it can draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    if not any(t.state == State.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    written, quiet = [], optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "too few trials for this plot": the picture is left out
    for name, plot in (("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances),
                       ("parallel_coordinate", plots.plot_parallel_coordinate)):
        with contextlib.suppress(Exception), warnings.catch_warnings(action="ignore"):  # e.g. importances of 1 trial
            axes = plot(study)
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            figure.savefig(root / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(figure)
            written.append(f"{name}.png")
    optuna.logging.set_verbosity(quiet)
    return written


def summary(study: optuna.Study, spec: sweepfile.Sweep, root: Path, total: int, seconds: float) -> str:
    """The outputs written, and a few lines on what the sweep found."""
    write_table(study, spec, root)
    best = write_best(study, spec, root)
    pictures = write_plots(study, root)
    trials = counted(study.get_trials(deepcopy=False))
    states = ", ".join(f"{sum(t.state == s for t in trials)} {s.name.lower()}" for s in (State.COMPLETE, State.PRUNED,
                       State.FAIL, State.RUNNING) if any(t.state == s for t in trials))
    lines = [f"sweep {study.study_name}: {len(trials)} of {total} trials ({states}); this worker {seconds:.0f} s"]
    if best:
        lines.append(f"best {spec.metric} {best.value:.4g}: trial {best.number} ({text(best.user_attrs['options'])}), "
                     f"run {best.user_attrs.get('run', '?')}")
        lines.append(f"rerun it: python main.py fit --config {root / 'best.yaml'}")
    lines.append(f"written to {root}: trials.csv{', best.yaml' if best else ''}{''.join(', ' + p for p in pictures)}")
    return "\n".join(lines)


class Report(Callback):
    """What `sweep` adds to a trial's `fit`: after each validation, the sweep's metric reported to the trial, and the
    fit stopped if Optuna's pruner says so (the W&B run tagged `pruned`, its checkpoint saved). Idle in any other
    command, and once its trial is over (a later `fit --ckpt_path` of the trial's run).

    Args:
        storage: The study's storage URL (its password, if any, from the environment).
        study: The study's name.
        trial: The trial's number.
        metric: The metric the sweep optimizes, as the fit logs it at validation (val_acc).
        early_terminate: The sweep file's early_terminate (hyperband), for the pruner.
    """

    def __init__(self, storage: str, study: str, trial: int, metric: str, early_terminate: dict | None = None):
        self.storage, self.study, self.trial, self.metric = storage, study, trial, metric
        self.early_terminate, self.handle = early_terminate, None

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        rdb = open_storage(self.storage)
        trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(self.study), self.trial)
        if rdb.get_trial(trial_id).state != State.RUNNING:
            rank_zero_info(f"sweep {self.study}: trial {self.trial} is over; this fit reports nothing to it")
            return
        study = optuna.load_study(study_name=self.study, storage=rdb, pruner=sweepfile.pruner(self.early_terminate))
        self.handle = optuna.trial.Trial(study, trial_id)
        run = Path(trainer.default_root_dir).absolute()  # the run's directory; a resumed one comes absolute
        self.handle.set_user_attr("run", str(run.relative_to(Path.cwd()) if run.is_relative_to(Path.cwd()) else run))

    def on_validation_end(self, trainer: Trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.metric not in trainer.callback_metrics:
            raise UserError(f"the sweep's metric {self.metric} is not logged at validation (logged: "
                            f"{', '.join(sorted(trainer.callback_metrics))}): name one of those in the sweep file")
        epoch = trainer.current_epoch + 1  # epochs done: W&B's iterations, hyperband's resource
        watched = {name: float(v) for name, v in trainer.callback_metrics.items() if name == self.metric or "loss" in name}
        for name, number in watched.items():
            if not math.isfinite(number):
                raise UserError(f"{name} is {number} after epoch {epoch}: the fit diverged")
        value = watched[self.metric]
        pruned = False
        if self.handle is not None:
            self.handle.report(value, epoch)
            pruned = self.handle.should_prune()
        if trainer.world_size > 1:
            pruned = trainer.strategy.broadcast(pruned)
        if not pruned:
            return
        trainer.should_stop = True
        if self.handle is not None:
            self.handle.set_user_attr("pruned_after_epoch", epoch)
            rank_zero_info(f"sweep {self.study}: trial {self.trial} pruned after epoch {epoch} ({self.metric} "
                           f"{value:.4g}); its checkpoint is saved")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.tags += ("pruned",)
                logger.experiment.summary["pruned_after_epoch"] = epoch

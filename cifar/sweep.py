"""`main.py sweep FILE`: a W&B sweep file searched by Optuna, on one machine or many. Each trial is an ordinary `fit`
in its own process and run directory, its values passed as command-line options; the workers share one Optuna
study through a storage URL (default: an SQLite file in the sweep's folder) and beat a heartbeat, so that a killed
worker's trial is failed and retried. What the study holds of each trial, and what the sweep writes: trials.py.
README: "Sweeps"."""

import contextlib
import ctypes
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import sqlalchemy.engine
import yaml
from jsonargparse import ArgumentParser

from cifar import sweepfile
from cifar.errors import UserError
from cifar.resume import NAMES
from cifar.trials import (
    PASSWORD,
    RETRY,
    State,
    counted,
    fit_config,
    open_storage,
    shown,
    summary,
    text,
    without_password,
    write_table,
)


def sweep(file: str, trials: int | None = None, storage: str | None = None, study: str | None = None,
          folder: str | None = None, heartbeat: int = 60, seed: int | None = None) -> None:
    """Search a W&B sweep file's parameters with Optuna, each trial a `fit` of the file's command with the trial's
    values as options; several workers (this command run again, here or on other machines) share the search.

    Args:
        file: A W&B sweep file (method grid/random/bayes, metric, parameters, early_terminate: hyperband, run_cap,
            and the command's `fit` options, e.g. `--config configs/cifar.yaml`), as `wandb sweep` takes it.
        trials: Trials in the whole sweep, all workers together (default: the file's run_cap; a grid: its size).
            Run the command again to continue a stopped sweep up to this count.
        storage: The Optuna storage URL the workers share (default: sqlite:///<folder>/study.db; for many machines
            a database such as postgresql://user@host/db, its password in PGPASSWORD or ~/.pgpass).
        study: The study's name in the storage (default: the file's `name`, else its file name without .yaml).
        folder: Where the trials' runs, logs, the table, best.yaml and the plots go (default: runs/sweeps/<study>).
        heartbeat: Seconds between a worker's heartbeats; a trial whose worker is silent for twice as long is
            failed and run again.
        seed: The seed of this worker's sampler (default: random; workers given the same seed draw alike).
    """
    if (trials is not None and trials < 1) or heartbeat < 1:
        raise UserError("--trials and --heartbeat (seconds) are counts of at least 1")
    spec = sweepfile.read(file)
    name = study or spec.name
    root = Path(folder or Path("runs") / "sweeps" / name)
    total = trials or spec.run_cap or spec.grid_size()
    if not total:
        raise UserError(f"how many trials? Pass --trials N, or set run_cap in {file}")
    total = min(total, spec.grid_size() or total)
    base = check_options(spec)
    root.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{root.resolve() / 'study.db'}"
    with locked(root):  # two workers creating one database's tables at once: one of them fails
        rdb = open_storage(url, heartbeat)
        searched = optuna.create_study(storage=rdb, study_name=name, sampler=spec.sampler(seed), direction=spec.direction,
                                       pruner=sweepfile.pruner(spec.early_terminate), load_if_exists=True)
        started_from = json.dumps(yaml.safe_load(spec.file.read_text()), sort_keys=True)
        if searched.user_attrs.setdefault("sweep file", started_from) != started_from:
            raise UserError(f"study {name} in {shown(url)} was started from another sweep file: continue it with that "
                            f"file, or start a new study with --study NEW_NAME")
        searched.set_user_attr("sweep file", started_from)
    Worker(spec, searched, rdb, url, root, total, heartbeat, base).run()


def command(argv: list[str]) -> None:
    """`main.py sweep FILE [options]`, parsed like every command (`--help`, one error line)."""
    parser = ArgumentParser(prog="main.py sweep", exit_on_error=False, description=sweep.__doc__.split("\n\n")[0])
    parser.add_argument("file", type=str, help="A W&B sweep file (as `wandb sweep` takes it)")
    parser.add_function_arguments(sweep, as_group=False, skip={"file"})
    options = parser.parse_args(argv)
    sweep(**{key: options[key] for key in ("file", "trials", "storage", "study", "folder", "heartbeat", "seed")})


def check_options(spec: sweepfile.Sweep) -> dict:
    """Every parameter, with each of its values (a range: both ends), parsed as a trial's `fit` will parse it, before
    any trial runs; returns the base config."""
    try:
        base = yaml.safe_load(fit_config(spec.base))
    except UserError as error:
        raise UserError(f"sweep file {spec.file}: command: {error}") from None
    for p in spec.parameters:
        for value in p.checked_values():
            try:
                fit_config([*spec.base, sweepfile.option(p.key, value)])
            except UserError as error:
                raise UserError(f"sweep file {spec.file}: parameters.{p.key}: {value!r} is not a value of this fit "
                                f"option ({error})") from None
    return base


class Worker:
    """Runs trials until the sweep has its count, one at a time, each a `fit` in a child process."""

    def __init__(self, spec, study, rdb, url, root: Path, total: int, heartbeat: int, base: dict):
        self.spec, self.study, self.rdb, self.url, self.root, self.total = spec, study, rdb, url, root, total
        self.heartbeat, self.signum, self.child = heartbeat, None, None
        self.study_id = rdb.get_study_id_from_name(study.study_name)
        logger = (base.get("trainer") or {}).get("logger")
        self.wandb = isinstance(logger, dict) and logger.get("class_path", "").endswith("WandbLogger")
        self.tags = [*((logger.get("init_args") or {}).get("tags") or []), study.study_name] if self.wandb else []

    def run(self) -> None:
        started = time.time()
        handlers = {signum: signal.signal(signum, self.on_signal) for signum in NAMES}
        try:
            while self.signum is None:
                trial = self.next_trial()
                if trial is None:
                    break
                if trial == "wait":  # the count is reached by trials still running in other workers
                    time.sleep(self.heartbeat / 2)
                    continue
                self.run_trial(trial)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        print(summary(self.study, self.spec, self.root, self.total, time.time() - started), file=sys.stderr)
        if self.signum:
            print(f"sweep {self.study.study_name} stopped by {NAMES[self.signum]}: run the same command to continue it",
                  file=sys.stderr)
            sys.exit(128 + self.signum)

    def on_signal(self, signum: int, frame) -> None:
        """Ctrl-C or SIGTERM: passed to the running trial, which saves its checkpoint and stops; then this worker
        stops (the trial runs again, from its checkpoint, when the sweep continues). Again: passed again."""
        first, self.signum = self.signum is None, self.signum or signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        if first:
            print(f"{NAMES[signum]}: the running trial saves its checkpoint, then this worker stops", file=sys.stderr,
                  flush=True)

    def next_trial(self):
        """A new (or retried) trial; "wait" while the count is reached only with trials still running elsewhere;
        None when the sweep is done. One worker at a time counts and asks (a lock in the folder)."""
        with locked(self.root):
            optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial: FAIL, and queued again
            trials = counted(self.study.get_trials(deepcopy=False))
            if reached(self.spec, trials):
                return None
            if len(trials) >= self.total:
                return "wait" if any(t.state == State.RUNNING for t in trials) else None
            return self.study.ask()

    def run_trial(self, trial: optuna.Trial) -> None:
        number = trial.number
        trial_id = self.rdb.get_trial_id_from_study_id_trial_number(self.study_id, number)
        options = {p.key: p.suggest(trial) for p in self.spec.parameters}
        trial.set_user_attr("options", options)
        earlier = self.frozen(number).user_attrs.get("run")  # a retried trial's run: resumed from its checkpoint
        resume = Path(earlier, "checkpoints", "last.ckpt") if earlier else None
        resume = resume if resume and resume.exists() else None
        print(f"trial {number}: {text(options)}" + (f" (resuming {earlier})" if resume else ""), file=sys.stderr)
        log = self.root / "logs" / f"trial-{number:04d}.log"
        log.parent.mkdir(exist_ok=True)
        beating = threading.Event()
        self.rdb.record_heartbeat(trial_id)
        with log.open("w") as out:
            self.child = subprocess.Popen([sys.executable, "-m", "cifar", "fit", *self.arguments(number, options, resume)],
                                          stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                          start_new_session=True,  # Ctrl-C reaches the trial once, from here
                                          preexec_fn=die_with_parent)
            threading.Thread(target=self.beat, args=(trial_id, beating), daemon=True).start()
            code = self.child.wait()
        beating.set()
        self.child = None
        self.finish(trial, code, log)

    def arguments(self, number: int, options: dict, resume: Path | None) -> list[str]:
        """The trial's `fit` options: the file's command, the trial's values, then the sweep's own (its folder, the
        W&B group and tag, the reporting callback)."""
        report = {"class_path": "cifar.trials.Report", "init_args": {
            "storage": without_password(self.url),
            "study": self.study.study_name, "trial": number, "metric": self.spec.metric,
            "early_terminate": self.spec.early_terminate}}
        args = [*self.spec.base, *(sweepfile.option(k, v) for k, v in options.items()),
                "--trainer.default_root_dir", str(self.root), f"--trainer.callbacks+={json.dumps(report)}"]
        if self.wandb:
            args += [f"--trainer.logger.init_args.group={self.study.study_name}",
                     f"--trainer.logger.init_args.tags={json.dumps(self.tags)}"]
            args += [f"--trainer.logger.init_args.{key}={getattr(self.spec, key)}" for key in ("project", "entity")
                     if getattr(self.spec, key)]
        return args + (["--ckpt_path", str(resume)] if resume else [])

    def env(self) -> dict:
        """This environment, with this `cifar` importable (installed or not) and the storage's password if any."""
        password = sqlalchemy.engine.make_url(self.url).password
        path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path, **({PASSWORD: str(password)} if password else {})}

    def beat(self, trial_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat):
            with contextlib.suppress(Exception):  # a busy database: the next beat
                self.rdb.record_heartbeat(trial_id)

    def frozen(self, number: int) -> optuna.trial.FrozenTrial:
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)

    def finish(self, trial: optuna.Trial, code: int, log: Path) -> None:
        """Tell the study how the trial ended: its best epoch's metric, pruned, interrupted (queued again) or failed
        with its first error line; and rewrite the table."""
        frozen = self.frozen(trial.number)
        values = [v for _, v in sorted(frozen.intermediate_values.items()) if not math.isnan(v)]
        if code == 0 and "pruned_after_epoch" in frozen.user_attrs:
            self.study.tell(trial, state=State.PRUNED)
            said = f"pruned after epoch {frozen.user_attrs['pruned_after_epoch']}"
        elif code == 0 and values:
            value = (max if self.spec.direction == "maximize" else min)(values)
            self.study.tell(trial, value)
            said = f"{self.spec.metric} {value:.4g} (its best epoch)"
        elif self.signum or code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
            trial.set_user_attr("note", f"stopped by {NAMES.get(self.signum or signal.SIGTERM)}")
            self.study.tell(trial, state=State.FAIL)
            RETRY(self.study, self.frozen(trial.number))
            said = "stopped; queued to run again, from its checkpoint"
        else:
            said = error_line(log) if code else f"the fit logged no {self.spec.metric} at validation"
            trial.set_user_attr("note", said)
            self.study.tell(trial, state=State.FAIL)
            said = f"failed: {said} (log: {log})"
        print(f"trial {trial.number}: {said}", file=sys.stderr, flush=True)
        write_table(self.study, self.spec, self.root)


@contextlib.contextmanager
def locked(root: Path):
    """The sweep folder's lock: one worker at a time opens the storage, or counts the trials and asks for one."""
    with (root / ".sweep.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def die_with_parent() -> None:
    """In the trial's process before it starts (Linux): SIGTERM when the worker dies, even by SIGKILL, so that the
    trial saves its checkpoint and stops rather than running on unwatched."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def reached(spec: sweepfile.Sweep, trials: list) -> bool:
    """Whether a complete trial reached the metric's `target` (W&B then ends the sweep)."""
    if spec.target is None:
        return False
    values = [t.value for t in trials if t.state == State.COMPLETE]
    return any(v >= spec.target if spec.direction == "maximize" else v <= spec.target for v in values)


def error_line(log: Path) -> str:
    """A failed trial's first `error:` line (the app's own), else its last line (a traceback's exception)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return (errors or lines[-1:] or ["no output"])[0]


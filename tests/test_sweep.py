"""`main.py sweep`: a W&B sweep file searched by Optuna, each trial a real `fit` in its own process, on tiny data."""

import glob
import json
import math
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb_records
from conftest import ROOT, cli_command, cli_env, cli_error, only, run_cli, sweep_file, sweep_trials

from cifar.cli import main

LR = {"model.optimizer.init_args.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}


def best_val_loss(run: Path) -> float:
    """The best val_loss that ModelCheckpoint (configs/cifar.yaml: monitor val_loss) recorded in a run."""
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    return float(next(v for k, v in state.items() if k.startswith("ModelCheckpoint"))["best_model_score"])


@pytest.mark.slow
def test_two_workers_run_each_trial_once_and_best_yaml_refits_to_the_best_value(folder_data: Path, tmp_path: Path):
    file = sweep_file(tmp_path, folder_data, {**LR, "data.batch_size": {"values": [4, 8]}}, logger=None)
    workers = [subprocess.Popen(cli_command(["sweep", str(file), "--trials", "3", "--heartbeat", "2"]), cwd=tmp_path,
                                env=cli_env(), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    said = [worker.communicate(timeout=600)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], said
    folder = tmp_path / "runs" / "sweeps" / "sweep"
    rows = sweep_trials(folder)
    assert sorted(int(r["trial"]) for r in rows) == [0, 1, 2] and {r["state"] for r in rows} == {"complete"}, rows
    runs = {r["run"] for r in rows}
    assert len(runs) == 3 and runs == {str(p.relative_to(tmp_path)) for p in folder.glob("*-fit-*")}
    assert all(sorted(p.name for p in (tmp_path / run).glob("config*.yaml")) == ["config.yaml"] for run in runs)  # once
    run_file = only((tmp_path / rows[0]["run"]).glob("wandb/offline-run-*/run-*.wandb"))
    assert wandb_records.group(run_file) == "sweep" and "sweep" in wandb_records.tags(run_file)
    best = min(rows, key=lambda r: float(r["value"]))
    assert f"best val_loss {float(best['value']):.4g}: trial {best['trial']}" in said[0] + said[1]
    for picture in ("history.png", "importances.png", "parallel_coordinate.png"):
        assert (folder / picture).stat().st_size > 0
    run_cli(["fit", "--config", str(folder / "best.yaml")], tmp_path)  # the best trial's config, its seed included
    refit = only((tmp_path / "runs" / "cifar").glob("*-fit-*"))
    assert best_val_loss(refit) == pytest.approx(float(best["value"]), rel=1e-6)


@pytest.mark.slow
def test_hyperband_prunes_a_trial_worse_than_the_one_before(folder_data: Path, tmp_path: Path, monkeypatch):
    """One bracket, its rung after the first epoch (max_iter 1, s 0), eta 2: a trial that does not learn (lr 0),
    after one that does (the grid's order with seed 1), stops after its first epoch with its checkpoint saved."""
    monkeypatch.chdir(tmp_path)
    hyperband = {"type": "hyperband", "max_iter": 1, "s": 0, "eta": 2}
    file = sweep_file(tmp_path, folder_data, {"model.optimizer.init_args.lr": {"values": [0.01, 0.0]}}, method="grid",
                      early_terminate=hyperband)
    main(["sweep", str(file), "--seed", "1"])
    rows = {float(r["model.optimizer.init_args.lr"]): r for r in sweep_trials(tmp_path / "runs/sweeps/sweep")}
    assert rows[0.01]["state"] == "complete" and rows[0.0]["state"] == "pruned", rows
    pruned = torch.load(Path(rows[0.0]["run"], "checkpoints", "last.ckpt"), weights_only=True)
    assert pruned["epoch"] == 0  # saved after its first epoch, of 2


@pytest.mark.slow
def test_a_failing_trial_is_recorded_with_its_error_line_and_the_sweep_goes_on(folder_data: Path, tmp_path: Path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = {"data.val_size": {"values": [12, 1000]}, "model.optimizer.init_args.lr": {"values": [0.001, 1e30]}}
    main(["sweep", str(sweep_file(tmp_path, folder_data, grid, "--trainer.max_epochs", "1", method="grid"))])
    rows = {(int(r["data.val_size"]), float(r["model.optimizer.init_args.lr"])): r
            for r in sweep_trials(tmp_path / "runs/sweeps/sweep")}
    assert rows[12, 0.001]["state"] == "complete"
    assert rows[12, 1e30]["state"] == "fail" and "the fit diverged" in rows[12, 1e30]["note"]  # a NaN loss
    for lr in (0.001, 1e30):  # more validation images than the data has
        assert rows[1000, lr]["state"] == "fail" and "--data.val_size=1000 is out of range" in rows[1000, lr]["note"]


@pytest.mark.slow
def test_a_worker_killed_by_sigkill_leaves_no_trial_running_and_the_sweep_completes(folder_data: Path, tmp_path: Path):
    kill = ["--data.batch_size", "4", "--trainer.callbacks+=signals.SignalWorkerOnce",  # 18 steps: it stops mid-way
            "--trainer.callbacks.marker", str(tmp_path / "killed"), "--trainer.callbacks.signal", "SIGKILL"]
    command = ["sweep", str(sweep_file(tmp_path, folder_data, LR, *kill)), "--trials", "1", "--heartbeat", "1"]
    killed = subprocess.run(cli_command(command), cwd=tmp_path, env=cli_env(), capture_output=True, timeout=600)
    assert killed.returncode == -9 and (tmp_path / "killed").exists()
    run_cli(command, tmp_path)  # another worker: the killed one's trial goes stale, is failed and run again
    rows = sweep_trials(tmp_path / "runs/sweeps/sweep")
    assert [r["state"] for r in rows] == ["fail", "complete"], rows  # the retry counts as the trial it runs again
    again = only(r for r in rows if r["note"] == "runs trial 0 again")
    assert rows[0]["state"] == "fail" and again["run"] == rows[0]["run"]  # resumed from the checkpoint saved at SIGTERM


@pytest.mark.slow
def test_ctrl_c_stops_the_worker_after_its_trial_saves_and_the_same_command_continues(folder_data: Path,
                                                                                        tmp_path: Path):
    interrupt = ["--data.batch_size", "4", "--trainer.callbacks+=signals.SignalWorkerOnce",  # 18 steps: mid-way
                 "--trainer.callbacks.marker",
                 str(tmp_path / "interrupted"), "--trainer.callbacks.signal", "SIGINT"]
    command = ["sweep", str(sweep_file(tmp_path, folder_data, LR, *interrupt)), "--trials", "1"]
    stopped = run_cli(command, tmp_path, check=False)
    assert stopped.returncode == 130 and "run the same command to continue" in stopped.stderr
    first = only(sweep_trials(tmp_path / "runs/sweeps/sweep")[:1])
    assert first["state"] == "fail" and "stopped by Ctrl-C" in first["note"]
    assert Path(tmp_path, first["run"], "checkpoints", "last.ckpt").exists()
    run_cli(command, tmp_path)
    rows = sweep_trials(tmp_path / "runs/sweeps/sweep")
    assert [r["state"] for r in rows] == ["fail", "complete"], rows
    again = only(r for r in rows if r["note"] == "runs trial 0 again")
    assert again["run"] == first["run"] and Path(tmp_path, first["run"], "config-resume-2.yaml").exists()  # resumed


BAD = {
    "an option the config lacks": ({"model.optimizer.init_args.lrr": {"values": [0.1]}}, {}, "parameters.model.optimizer.init_args.lrr"),
    "an unknown distribution": ({"data.batch_size": {"distribution": "beta", "min": 1, "max": 2}}, {}, "beta"),
    "nested parameters": ({"model": {"parameters": {"lr": {"value": 0.1}}}}, {}, "parameters.model.parameters"),
    "a custom method": (LR, {"method": "custom"}, "method"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_sweep_file_is_one_line_before_any_trial(case, folder_data: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parameters, keys, named = BAD[case]
    line = cli_error(["sweep", str(sweep_file(tmp_path, folder_data, parameters, **keys)), "--trials", "1"], capsys)
    assert named in line
    assert not (tmp_path / "runs").exists()


def test_a_file_that_is_not_yaml_and_a_storage_that_cannot_open_are_one_line(folder_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.yaml").write_text("method: [grid\n")
    assert "is not YAML" in cli_error(["sweep", "broken.yaml", "--trials", "1"], capsys)
    file = str(sweep_file(tmp_path, folder_data, LR))
    line = cli_error(["sweep", file, "--trials", "1", "--storage", "postgresql://nobody@127.0.0.1:9/none"], capsys)
    assert "cannot open the Optuna storage postgresql://nobody@127.0.0.1:9/none" in line
    assert not list(tmp_path.glob("runs/sweeps/*/logs"))


def postgres_server(tmp: Path) -> tuple[str, subprocess.Popen | None]:
    """A PostgreSQL server of our own in `tmp` (as the `postgres` user when this is root: initdb refuses root), on
    a free port; its URL."""
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    bin_dir = Path(initdb).resolve().parent  # Debian links initdb and pg_ctl alone into /usr/local/bin
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    user = "postgres" if as_user else pwd.getpwuid(os.getuid()).pw_name
    if as_user:
        shutil.chown(tmp, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(tmp / "db"), "-A", "trust", "-U", user],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(tmp / "db"), "-l", str(tmp / "log"), "-w", "-o",
                    f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "sweeps"],
                   check=True, capture_output=True)
    return f"postgresql://{user}@127.0.0.1:{port}/sweeps", [*as_user, str(bin_dir / "pg_ctl"), "-D", str(tmp / "db"), "-m", "fast", "stop"]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb")),
                    reason="needs PostgreSQL's initdb and pg_ctl (Debian: apt-get install postgresql)")
def test_two_workers_share_a_sweep_through_postgresql(folder_data: Path, tmp_path: Path):
    pytest.importorskip("psycopg", reason="needs psycopg, SQLAlchemy's PostgreSQL driver (pip install 'psycopg[binary]')")
    tmp = Path(tempfile.mkdtemp(prefix="cifar-pg-"))  # the postgres user must reach it: not under pytest's 0700 root
    url, stop = postgres_server(tmp)
    try:
        command = ["sweep", str(sweep_file(tmp_path, folder_data, LR)), "--trials", "2", "--storage", url]
        workers = [subprocess.Popen(cli_command(command), cwd=tmp_path, env=cli_env(), stderr=subprocess.PIPE,
                                    text=True) for _ in range(2)]
        said = [worker.communicate(timeout=600)[1] for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], said
        import optuna

        trials = optuna.load_study(study_name="sweep", storage=url).trials
        assert sorted(t.number for t in trials) == [0, 1] and {t.state.name for t in trials} == {"COMPLETE"}
        assert len({t.user_attrs["run"] for t in trials}) == 2
    finally:
        subprocess.run(stop, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_study_refuses_another_sweep_file(folder_data: Path, tmp_path: Path, capsys, monkeypatch):
    import optuna

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "sweeps" / "sweep"
    folder.mkdir(parents=True)
    optuna.create_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}").set_user_attr("sweep file", "{}")
    line = cli_error(["sweep", str(sweep_file(tmp_path, folder_data, LR)), "--trials", "1"], capsys)
    assert "was started from another sweep file" in line and "--study NEW_NAME" in line
    assert not (folder / "logs").exists()


def test_the_repositorys_sweep_file_runs_here_as_wandb_reads_it(monkeypatch):
    """configs/sweep.yaml, for `wandb sweep`, is also a search `sweep` can run: bayes as TPE, the command's options
    as the trials' base, every value parsed by the app's `fit`."""
    from cifar import sweep, sweepfile

    monkeypatch.chdir(ROOT)
    spec = sweepfile.read("configs/sweep.yaml")
    assert spec.method == "bayes" and type(spec.sampler(0)).__name__ == "TPESampler" and spec.direction == "maximize"
    assert spec.base[:2] == ["--config", "configs/cifar.yaml"] and len(spec.parameters) == 3
    assert sweep.check_options(spec)["model"]["net"]["class_path"] == "cifar.nets.TutorialCNN"


def test_each_wandb_distribution_draws_what_wandb_defines():
    """W&B's distributions drawn through Optuna (random sampler, 400 trials): log_uniform takes ln bounds,
    log_uniform_values the values; q_* give multiples of q; the normals their mean and spread; categorical values of
    any YAML type come back as they were."""
    import statistics

    import optuna

    from cifar import sweepfile

    specs = {
        "ln": {"distribution": "log_uniform", "min": -5, "max": -1},
        "values": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "q": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.25},
        "q_log": {"distribution": "q_log_uniform_values", "min": 10, "max": 1000, "q": 10},
        "normal": {"distribution": "normal", "mu": 2, "sigma": 0.5},
        "log_normal": {"distribution": "log_normal", "mu": 0, "sigma": 1},
        "q_normal": {"distribution": "q_normal", "mu": 0, "sigma": 3, "q": 1},
        "choice": {"values": [[1, 2], "a", None]},
        "int": {"min": 1, "max": 3},
    }
    bad = lambda key, why: ValueError(key, why)  # noqa: E731
    parameters = [sweepfile.parameter(key, spec, bad, "random") for key, spec in specs.items()]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    draws = {p.key: [] for p in parameters}
    for _ in range(400):
        trial = study.ask()
        for p in parameters:
            draws[p.key].append(p.suggest(trial))
        study.tell(trial, 0.0)
    ln = draws["ln"]
    assert all(math.exp(-5) <= v <= math.exp(-1) for v in ln) and min(ln) < math.exp(-4) and max(ln) > math.exp(-2)
    assert 0.2 < sum(v < 1e-3 for v in draws["values"]) / 400 < 0.47  # a third of a log-uniform range: 1e-4 to 1e-3
    assert set(draws["q"]) <= {0, 0.25, 0.5, 0.75, 1} and len(set(draws["q"])) >= 4
    assert all(v % 10 == 0 and 10 <= v <= 1000 for v in draws["q_log"])
    assert abs(statistics.mean(draws["normal"]) - 2) < 0.1 and abs(statistics.stdev(draws["normal"]) - 0.5) < 0.1
    assert all(v > 0 for v in draws["log_normal"]) and abs(statistics.median(map(math.log, draws["log_normal"]))) < 0.2
    assert all(v == round(v) for v in draws["q_normal"]) and len(set(draws["q_normal"])) > 5
    assert {json.dumps(v) for v in draws["choice"]} == {"[1, 2]", '"a"', "null"}
    assert set(draws["int"]) == {1, 2, 3}


def test_a_sweep_ends_once_a_trial_reaches_the_metrics_target():
    """W&B's `metric.target`: the sweep ends once a complete trial's value reaches it, in the goal's direction."""
    import optuna

    from cifar.sweep import reached

    study = optuna.create_study()
    for value in (0.3, 0.6):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    assert reached(SimpleNamespace(target=0.5, direction="maximize"), study.trials)
    assert not reached(SimpleNamespace(target=0.7, direction="maximize"), study.trials)
    assert reached(SimpleNamespace(target=0.4, direction="minimize"), study.trials)
    assert not reached(SimpleNamespace(target=0.2, direction="minimize"), study.trials)
    assert not reached(SimpleNamespace(target=None, direction="maximize"), study.trials)

"""The run record through the real CLI (cifar/run.py): the design card's two commands as written, every command
taking --config and --ckpt_path, one writer per run, and what a resumed fit and a signal do."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (FAST_CONFIG, app_messages, cli_command, cli_env, cli_error, exit_code, fitted_copy, only, options,
                      run_cli)

import wandb_records
from cifar.cli import main

CALLBACKS_MISSING = "callbacks used to create the checkpoint need to be provided"  # Lightning's warning


def test_the_design_cards_two_commands_as_written_then_the_tools_with_the_same_options(fitted, tmp_path: Path, capsys):
    """`fit --config configs/cifar.yaml` (the shared fit, `fitted`, in a folder with configs/ and data/), then in a
    new process `test --ckpt_path best` with no --config: a W&B-logged test with its report, from the run's own
    config. Then export and serve take the same options."""
    fit = fitted_copy(fitted, tmp_path).fit
    test = run_cli(["test", "--ckpt_path", "best"], tmp_path)  # literally

    fit_run = only((tmp_path / "runs/cifar").glob("*-fit-*"))
    tested = only((tmp_path / "runs/cifar").glob("*-test-*"))
    said = test.stdout + test.stderr
    assert f"--ckpt_path best: runs/cifar/{fit_run.name}/checkpoints/epoch=" in said
    assert f"Config: checkpoint runs/cifar/{fit_run.name}/checkpoints/epoch=" in said  # the config it trained with
    assert CALLBACKS_MISSING not in said and "Traceback" not in said
    assert "💡" not in fit.stdout + fit.stderr + said  # no Lightning advertisements
    report = json.loads((tested / "test_report.json").read_text())
    assert report["fit_run"] == fit_run.name
    assert report["data"].startswith("test images: image folders in")  # data/test, the data's own test split
    run_file = only(tested.glob("wandb/offline-run-*/run-*.wandb"))  # the config's WandbLogger, offline
    summary = wandb_records.summary(run_file)
    assert summary["fit_run"] == fit_run.name and summary["test_acc"] == pytest.approx(report["metrics"]["test_acc"])
    assert wandb_records.config(run_file)["config"]["trainer"]["default_root_dir"] == "runs/cifar"
    assert (tested / "confusion_matrix.png").is_file()

    # The tools take --config and --ckpt_path like every command (in-process from here).
    best = Path(report["checkpoint"]).name
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        main(["export", "--config", "configs/cifar.yaml", "--ckpt_path", "best", "--format", "torch_export"])
        assert (fit_run / "checkpoints" / best).with_suffix(".pt2").is_file()
        main(["export", "--ckpt_path", "last", "--output", "last.onnx"])  # no --config: the latest run under runs/
        assert (tmp_path / "last.onnx").is_file()
        # gets as far as the checkpoint, not "option not accepted"
        refused = cli_error(["serve", "--config", "configs/fast.yaml", "--ckpt_path", "best"], capsys)
        assert "--ckpt_path best" in refused and "no run with checkpoints under runs/fast/" in refused
        assert exit_code(["serve", "--help"]) == 0
        help_text = capsys.readouterr().out
        assert "--config" in help_text and "--max_batch_size" in help_text
        assert "--trainer" not in help_text and "--root" not in help_text


def test_a_resumed_fit_with_more_epochs_trains_them_on_the_new_schedule(folder_data: Path, tmp_path: Path, monkeypatch):
    """fast.yaml's decay to 0 spans the fit: resumed with --trainer.max_epochs 4 after 2, it spans the 4 epochs
    from the step reached, says so, and the added epochs train (they used to run at learning rate 0)."""
    monkeypatch.chdir(tmp_path)
    common = options(folder_data, "--trainer.precision", "32", config=FAST_CONFIG, val_size=12, batch_size=12,
                     logger=False, progress_bar=False)  # 36 training images: 3 steps an epoch
    main(["fit", *common, "--trainer.max_epochs", "2"])
    last = only(Path("runs/fast").glob("*-fit-*/checkpoints/last.ckpt"))
    first = torch.load(last, weights_only=True)
    assert first["lr_schedulers"][0]["total_steps"] == 6 and first["lr_schedulers"][0]["_last_lr"][0] == 0.0

    with app_messages() as said:
        main(["fit", *common, "--ckpt_path", "last", "--trainer.max_epochs", "4"])
    (schedule,) = [message for message in said if message.startswith("PiecewiseLinearLR:")]
    assert "spans 12 steps" in schedule and "fit: 6" in schedule and "from step 6" in schedule
    second = torch.load(last, weights_only=True)
    assert second["global_step"] == 12 and second["lr_schedulers"][0]["total_steps"] == 12
    assert second["lr_schedulers"][0]["_last_lr"][0] == 0.0  # decayed to 0 at the new end
    conv = "classifier.net.layers.1.0.weight"
    moved = (second["state_dict"][conv] - first["state_dict"][conv]).abs().max().item()
    assert moved > 0.01, moved  # at learning rate 0 (the bug) Muon's norm rescale alone moved it by < 1e-3


def wait_for(condition, what: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"{what}: the process exited {process.returncode}:\n{process.communicate()[0]}"
        assert time.time() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_run_has_one_writer_and_a_dead_writer_does_not_block_it(folder_data: Path, tmp_path: Path, capsys,
                                                                   monkeypatch):  # fmt: skip
    """Two `fit --ckpt_path last` of one run at once: the second stops in one line naming the first (host, pid)
    and writes nothing; once the first is killed (SIGKILL: no clean-up), the run resumes, and a SIGTERM at its
    3rd step (signals.SignalAt) stops it there with a checkpoint."""
    common = options(folder_data, val_size=12, batch_size=8, logger=False, progress_bar=False)
    with monkeypatch.context() as patch:  # the run's first epoch in this process (5 steps), which keeps no lock
        patch.chdir(tmp_path)
        main(["fit", *common, "--trainer.max_epochs", "1"])
    run = only((tmp_path / "runs/cifar").iterdir())
    starts = lambda: len(json.loads((run / "run.json").read_text())["starts"])  # noqa: E731
    resume = ["fit", *common, "--ckpt_path", "last", "--trainer.max_epochs", "100000",
              "--trainer.check_val_every_n_epoch", "100000"]  # no validation: EarlyStopping never stops it  # fmt: skip

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(cli_command([*resume, *extra]), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    first = start()
    try:
        wait_for(lambda: starts() == 2, "the first resume", first)
        with monkeypatch.context() as patch:  # the second in this process; were it let in, it would stop at step 6
            patch.chdir(tmp_path)
            refused = cli_error([*resume, "--trainer.max_steps", "6"], capsys)
        assert f"run {run.resolve()} is being written by host {socket.gethostname()} pid {first.pid}" in refused
        assert starts() == 2 and not list(run.glob("config-resume-3.yaml"))
        first.kill()  # its lock goes with it
        first.wait(timeout=30)
        third = start("--trainer.callbacks+=signals.SignalAt", "--trainer.callbacks.step", "8",
                      "--trainer.callbacks.signal", "SIGTERM")  # in training: a SIGTERM stops at a batch  # fmt: skip
        try:
            output = third.communicate(timeout=120)[0]
            assert third.returncode == 143, output
        finally:
            third.kill()
        assert starts() == 3, output
        assert (run / "config-resume-2.yaml").is_file() and (run / "config-resume-3.yaml").is_file()
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8, output
    finally:
        first.kill()


def test_a_moved_run_resumes_in_place(fitted, tmp_path: Path, monkeypatch):
    """A run folder copied elsewhere (its checkpoints name the old folder) resumes where it now is: `last.ckpt` is
    the resumed one, with no `last-v1.ckpt`, and ModelCheckpoint keeps its best score and files."""
    moved = fitted_copy(fitted, tmp_path)
    last = moved.run / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--ckpt_path", str(last), "--trainer.max_epochs", "3", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    after = torch.load(last, weights_only=True)
    assert after["epoch"] == before["epoch"] + 1
    assert not list(last.parent.glob("last-v*.ckpt"))
    (key,) = [k for k in after["callbacks"] if k.startswith("ModelCheckpoint")]
    state, old = after["callbacks"][key], before["callbacks"][key]
    assert state["dirpath"] == str(last.parent.resolve()) and state["best_model_score"] <= old["best_model_score"]


def test_latest_run_is_the_latest_recorded_start_not_the_newest_file(tmp_path: Path):
    from cifar.run import latest_run, open

    runs, root = tmp_path / "runs", tmp_path / "runs" / "cifar"  # runs/ holds every config's root

    def run(name: str, starts: list[str] | None) -> Path:
        (root / name / "checkpoints").mkdir(parents=True)
        (root / name / "checkpoints" / "last.ckpt").write_bytes(b"")
        if starts:
            (root / name / "run.json").write_text(json.dumps({"id": name[-8:], "command": "fit", "starts": starts}))
        return root / name

    old = run("20261201-120000-fit", None)  # no run.json: not a run of this app, whatever its name says
    first = run("20261122-090000-fit-aaaaaaaa", ["2026-11-22T09:00:00.000001+00:00"])
    resumed = run("20261122-080000-fit-bbbbbbbb", ["2026-11-22T08:00:00+00:00", "2026-11-22T10:00:00+02:00"])
    assert latest_run(root) == first  # resumed's last start, 10:00 at UTC+2, is 08:00 UTC
    assert latest_run(runs) == first  # one level up: the same, among every config's runs
    (root / "20261122-110000-test-cccccccc").mkdir()  # no checkpoints: not a candidate
    os.utime(old / "checkpoints" / "last.ckpt", (4e9, 4e9))
    assert latest_run(root) == first
    (resumed / "run.json").write_text(json.dumps({"id": "bbbbbbbb", "command": "fit",
                                                  "starts": ["2026-11-22T08:00:00+00:00", "2026-11-23T00:00:00+00:00"]}))  # fmt: skip
    assert latest_run(root) == resumed == latest_run(runs)
    with open("fit", root) as a, open("fit", root) as b:  # within one second
        assert a.id != b.id and a.dir != b.dir and a.dir.name.endswith(f"-fit-{a.id}")
    with open("fit", root, str(first / "checkpoints" / "last.ckpt")) as resumed:  # fit from a run's checkpoint
        assert resumed.dir == first and resumed.resumed

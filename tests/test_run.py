"""The run record through the real CLI (cifar/run.py): the design card's two commands as written, every command
taking --config and --ckpt_path, one writer per run, and what a resumed fit and a signal do."""

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CONFIG, FAST_CONFIG, cli_command, cli_env, fitted_copy, only, run_cli
from test_errors import cli_error

import wandb_records
from cifar.cli import main
from cifar.resume import Stopped, StopOnSignal

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
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:  # gets as far as the checkpoint, not "option not accepted"
            main(["serve", "--config", "configs/fast.yaml", "--ckpt_path", "best"])
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip() == ("error: --ckpt_path best: no run with checkpoints under runs/fast/. "
                                                   "Run fit first, or pass the path of a .ckpt file")  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main(["serve", "--help"])
        help_text = capsys.readouterr().out
        assert stop.value.code == 0 and "--config" in help_text and "--max_batch_size" in help_text
        assert "--trainer" not in help_text and "--root" not in help_text


def test_a_resumed_fit_with_more_epochs_trains_them_on_the_new_schedule(folder_data: Path, tmp_path: Path, caplog,
                                                                        monkeypatch):  # fmt: skip
    """fast.yaml's decay to 0 spans the fit: resumed with --trainer.max_epochs 4 after 2, it spans the 4 epochs
    from the step reached, says so, and the added epochs train (they used to run at learning rate 0)."""
    monkeypatch.chdir(tmp_path)
    common = ["--config", FAST_CONFIG, "--data.data_dir", str(folder_data), "--data.val_size", "12",
              "--data.batch_size", "12", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.precision", "32"]  # 36 training images: 3 steps an epoch  # fmt: skip
    main(["fit", *common, "--trainer.max_epochs", "2"])
    last = only(Path("runs/fast").glob("*-fit-*/checkpoints/last.ckpt"))
    first = torch.load(last, weights_only=True)
    assert first["lr_schedulers"][0]["total_steps"] == 6 and first["lr_schedulers"][0]["_last_lr"][0] == 0.0

    caplog.set_level("INFO")
    main(["fit", *common, "--ckpt_path", "last", "--trainer.max_epochs", "4"])
    said = [r.getMessage() for r in caplog.records if r.name == "lightning.pytorch.utilities.rank_zero"]
    assert ("PiecewiseLinearLR: the schedule now spans 12 steps (the checkpoint's fit: 6); it goes on from step 6 "
            "on the new length") in said  # fmt: skip
    second = torch.load(last, weights_only=True)
    assert second["global_step"] == 12 and second["lr_schedulers"][0]["total_steps"] == 12
    assert second["lr_schedulers"][0]["_last_lr"][0] == 0.0  # decayed to 0 at the new end
    conv = "classifier.net.layers.1.0.weight"
    moved = (second["state_dict"][conv] - first["state_dict"][conv]).abs().max().item()
    assert moved > 0.01, moved  # at learning rate 0 (the bug) Muon's norm rescale alone moved it by < 1e-3


def test_under_ddp_the_ranks_agree_on_a_stop_every_8_batches_not_every_batch():
    """The agreement is a collective (a host sync on GPUs): once per 8 steps, at the same batch on every rank."""
    stopper = StopOnSignal()
    agreed = []
    ddp = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=lambda stop, all: agreed.append(stop) or stop))
    for batch_idx in range(20):
        stopper.on_train_batch_start(ddp, None, None, batch_idx)
    assert agreed == [False, False, False]  # batches 0, 8 and 16
    stopper.requested = signal.SIGTERM
    stopper.on_train_batch_start(ddp, None, None, 21)  # between agreements: go on
    with pytest.raises(Stopped) as stop:
        stopper.on_train_batch_start(ddp, None, None, 24)
    assert stop.value.code == 143 and agreed[-1] is True
    single = SimpleNamespace(world_size=1, strategy=None)  # one process: every batch, no collective
    with pytest.raises(Stopped):
        stopper.on_train_batch_start(single, None, None, 21)


def wait_for(condition, what: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"{what}: the process exited {process.returncode}:\n{process.communicate()[0]}"
        assert time.time() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.2)


def test_a_run_has_one_writer_and_a_dead_writer_does_not_block_it(folder_data: Path, tmp_path: Path, capsys,
                                                                   monkeypatch):  # fmt: skip
    """Two `fit --ckpt_path last` of one run at once: the second stops in one line naming the first (host, pid)
    and writes nothing; once the first is killed (SIGKILL: no clean-up), the run resumes, and a SIGTERM at its
    3rd step (signals.SignalAt) stops it there with a checkpoint."""
    common = ["--config", CONFIG, "--data.data_dir", str(folder_data), "--data.val_size", "12", "--data.batch_size",
              "8", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip
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
        assert refused == (
            f"error: run {run.resolve()} is being written by host {socket.gethostname()} pid {first.pid}: a run has "
            f"one writer. Wait for that process to end (or stop it), then try again")  # fmt: skip
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

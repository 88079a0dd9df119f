"""Stopping a run (SIGTERM, Ctrl-C) saves a checkpoint, says so in the exit code, and resumes from it."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIG, cli_command, cli_env, make_folder_data, run_cli


def wait_for(path_glob, root: Path, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(root.glob(path_glob))
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"nothing matched {path_glob} under {root} within {timeout} s")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_saves_checkpoint_exits_nonzero_and_resumes(sig, code, tmp_path):
    data = make_folder_data(tmp_path / "data", per_class=60, test_per_class=1)
    common = ["--config", CONFIG, "--data.data_dir", str(data), "--data.val_size", "12", "--data.batch_size", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]  # fmt: skip
    process = subprocess.Popen(cli_command(["fit", *common, "--trainer.max_epochs", "1000"]), cwd=tmp_path,
                               env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for("runs/cifar/*-fit/checkpoints/last.ckpt", tmp_path)  # an epoch is done: training is under way
    time.sleep(1.0)
    process.send_signal(sig)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == code, output

    run = next((tmp_path / "runs" / "cifar").glob("*-fit"))
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] > 0
    assert "resume with --ckpt_path last" in output

    resumed = run_cli(["fit", *common, "--ckpt_path", "last", "--trainer.max_epochs", str(saved["epoch"] + 2)],
                      tmp_path)  # fmt: skip
    assert f"--ckpt_path last: runs/cifar/{run.name}/checkpoints/last.ckpt" in resumed.stderr
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # the same run continues
    assert final["epoch"] == saved["epoch"] + 1 and final["global_step"] > saved["global_step"]

"""DDP through the real CLI on the CPU (gloo): Lightning's launcher and torchrun, the fast recipe, Ctrl-C and
SIGTERM; and the training shards of EpochShuffle."""

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (CLASSES, CONFIG, CPU_PRECISION, FAST, FAST_CONFIG, ROOT, app_messages, cli_command, cli_env,
                      make_folder_data, only, run_cli)

import wandb_records
from cifar.cli import main
from cifar.resume import EpochShuffle


TWO_CORES = {"OMP_NUM_THREADS": "1"}  # two ranks on two cores


def test_each_rank_trains_on_its_own_shard_and_resumes_in_it():
    size, seed = 11, 3  # odd: padded to 12, as DistributedSampler does
    shards = [list(EpochShuffle(size, seed, num_replicas=2, rank=r)) for r in range(2)]
    assert [len(s) for s in shards] == [6, 6]
    assert sorted(shards[0] + shards[1]) == sorted(list(range(size)) + [shards[0][0]])  # all, one repeated
    whole = list(EpochShuffle(size, seed))
    assert sorted(whole) == list(range(size)) and shards[0] == (whole + whole)[:12][0::2]

    sampler = EpochShuffle(size, seed, num_replicas=2, rank=1)
    sampler.set_epoch(4)
    epoch_4 = list(sampler)
    assert epoch_4 != shards[1]  # a new order every epoch
    sampler.skip = (4, 2)  # resumed after 2 samples of this rank's shard: the rest of the same shard
    assert list(sampler) == epoch_4[2:]


@contextlib.contextmanager
def in_process(cwd: Path):
    """Run one-process commands in this process (no new start-up), in `cwd`, on one thread as each rank has
    (TWO_CORES); yields the list the app's messages go to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch, app_messages() as said:
            patch.chdir(cwd)
            yield said
    finally:
        torch.set_num_threads(threads)


def csv_metrics(path: Path) -> dict[str, float]:
    rows = list(csv.DictReader(path.open()))
    return {k: float(v) for row in rows for k, v in row.items() if v and k.startswith("val_")}


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 main.py ARGS`, each rank on one core."""
    command = ["torchrun", "--standalone", "--nproc-per-node", "2", str(ROOT / "main.py"), *args]
    done = subprocess.run(command, cwd=cwd, env=cli_env(TWO_CORES), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_ddp_fit_by_torchrun_one_run_same_metrics_by_any_launcher(folder_data: Path, tmp_path: Path):
    """fit with torchrun; validate and test from its best checkpoint with Lightning's launcher, torchrun and
    one process: one run directory each, the same checkpoint on every rank, the same metrics."""
    # 48 images: 16 val, 32 train. 16 = 2 ranks x batch 8: DistributedSampler pads no sample twice into the
    # val set, so DDP's synced val metrics are over exactly the images a 1-process run sees.
    common = ["--config", CONFIG, "--data.data_dir", str(folder_data), "--data.val_size", "16", *FAST,
              "--seed_everything", "0", "--trainer.accelerator", "cpu"]  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    env = TWO_CORES
    torchrun(["fit", *common, *ddp], tmp_path)

    # One run directory, one config, one W&B run whose id ends the directory's name, checkpoints by rank 0.
    run = only((tmp_path / "runs" / "cifar").iterdir())
    assert (run / "config.yaml").is_file() and not list(run.glob("config-*.yaml"))
    run_id = json.loads((run / "run.json").read_text())["id"]
    run_file = only(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert run_file.name == f"run-{run_id}.wandb" and run.name.endswith(run_id)
    assert {p.name for p in (run / "checkpoints").glob("*.ckpt")} >= {"last.ckpt"}
    assert len(list((run / "checkpoints").glob("*.ckpt"))) == 2
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * 2  # 2 epochs x (32 images / (2 ranks x 8)): each rank its own half
    assert not {"strategy", "devices", "accelerator"} & last["run"]["config"]["trainer"].keys()  # not where it ran
    checkpoint_state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    best = Path(checkpoint_state["best_model_path"]).name
    history = wandb_records.history(run_file)
    val_loss = [row["val_loss"] for row in history if "val_loss" in row]
    assert len(val_loss) == 2 and all(math.isfinite(v) for v in val_loss)
    images = [row for row in history if "val/examples/captions" in row]
    assert len(images) == 2  # once per epoch, from rank 0 only

    # The best checkpoint validated by 2 processes (Lightning's launcher) and by 1 (this one): the same metrics,
    # synced over the ranks.
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "unused"]
    said_best = f"--ckpt_path best: runs/cifar/{run.name}/checkpoints/{best}"
    runs = {}
    for name, extra in (("ddp", ddp), ("single", [])):
        args = ["validate", *common, *extra, *logger, "--trainer.logger.name", name, "--ckpt_path", "best"]
        if extra:
            assert said_best in run_cli(args, tmp_path, env=env).stderr
        else:
            with in_process(tmp_path) as said:
                main(args)
            assert said_best in "\n".join(said)
        runs[name] = csv_metrics(only((tmp_path / "runs" / "cifar").glob(f"*-validate-*/{name}/version_0/metrics.csv")))
    assert runs["ddp"].keys() == runs["single"].keys() == {"val_loss", "val_acc"}
    for key in runs["ddp"]:
        assert runs["ddp"][key] == pytest.approx(runs["single"][key], rel=1e-6), (key, runs)
    assert runs["ddp"]["val_loss"] == pytest.approx(min(val_loss), rel=1e-6)  # what fit logged for that epoch

    # test from the DDP run's best checkpoint, in 2 processes (torchrun) and in 1 (this one): the same overall and
    # per-class accuracy (TestReport sums the ranks' confusion matrices; 12 test images = 2 x 6, no padding).
    tests = {}
    for name, extra in (("ddp", ddp), ("single", [])):
        args = ["test", *common, *extra, *logger, "--trainer.logger.name", name, "--ckpt_path", "best"]
        if extra:
            assert torchrun(args, tmp_path).stderr.count(said_best) == 1  # rank 0
        else:
            with in_process(tmp_path) as said:
                main(args)
            assert "\n".join(said).count(said_best) == 1
        metrics = only((tmp_path / "runs" / "cifar").glob(f"*-test-*/{name}/version_0/metrics.csv"))
        assert (metrics.parents[2] / "confusion_matrix.png").is_file()
        tests[name] = {k: float(v) for row in csv.DictReader(metrics.open()) for k, v in row.items() if v}
    assert {f"test_acc/{c}" for c in CLASSES} < tests["ddp"].keys() == tests["single"].keys()
    for key in tests["ddp"]:
        assert tests["ddp"][key] == pytest.approx(tests["single"][key], rel=1e-6), (key, tests)
    assert len(list((tmp_path / "runs" / "cifar").iterdir())) == 5  # fit, 2 x validate, 2 x test: nothing shared


def reported_metrics(root: Path) -> dict[str, float]:
    """The metrics a `test` run under `root` reports (test_acc, test_loss, test_acc/<class>)."""
    report = json.loads(only(root.glob("*-test-*/test_report.json")).read_text())
    return {k: float(v) for k, v in report["metrics"].items()}


@pytest.mark.slow
def test_fast_recipe_trains_past_the_whitening_freeze_under_ddp_like_one_process(folder_data: Path, tmp_path: Path):
    """configs/fast.yaml on 2 processes for more epochs than the whitening bias trains (3), then test --ckpt_path
    last: no crash when the bias stops, and the test metrics close to a 1-process run with the same global batch."""
    common = ["--config", FAST_CONFIG, "--data.data_dir", str(folder_data), "--data.val_size", "0",
              "--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "4", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--seed_everything", "0", "--trainer.accelerator", "cpu",
              # the SGD learning rates scaled down to batch 16 (README); unscaled, 4 epochs of 48 images
              # land anywhere from 33% to 100% test accuracy, on one process or two, depending on the seed
              "--model.optimizer.init_args.bias_lr", "0.85", "--model.optimizer.init_args.head_lr", "10.7",
              *CPU_PRECISION]  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.batch_size", "8"]  # 2 x 8 = 16 per step
    tests = {}
    for name, extra in (("ddp", ddp), ("single", ["--data.batch_size", "16"])):
        root = ["--trainer.default_root_dir", f"runs/{name}"]
        if name == "ddp":  # 2 processes by Lightning's launcher
            run_cli(["fit", *common, *root, *extra], tmp_path, env=TWO_CORES)
        else:
            with in_process(tmp_path):
                main(["fit", *common, *root, *extra])
        last = torch.load(only((tmp_path / "runs" / name).glob("*-fit-*/checkpoints/last.ckpt")), weights_only=True)
        assert (last["epoch"], last["global_step"]) == (3, 4 * 3)  # 48 images / 16 per step, 4 epochs
        with in_process(tmp_path):  # each checkpoint tested by one process, this one
            main(["test", *common, *root, "--data.batch_size", "16", "--ckpt_path", "last"])
        tests[name] = reported_metrics(tmp_path / "runs" / name)
    assert tests["ddp"].keys() == tests["single"].keys() >= {"test_acc", "test_loss"}
    assert tests["ddp"]["test_acc"] == pytest.approx(tests["single"]["test_acc"], abs=0.1)  # 12 test images
    assert tests["ddp"]["test_loss"] == pytest.approx(tests["single"]["test_loss"], abs=0.15)  # 0.27 vs 0.35 seen


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "to_group", "code"), [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
                         ids=["ctrl-c-to-the-process-group", "sigterm-to-rank-0-only"])  # fmt: skip
def test_a_signal_stops_every_rank_at_one_batch_with_a_checkpoint(sig, to_group, code, tmp_path: Path):
    """Ctrl-C in a terminal (SIGINT to every process) or a scheduler's SIGTERM to the launching process only:
    exit 128 + signal, a checkpoint, every process gone within seconds."""
    data = make_folder_data(tmp_path / "data", per_class=20, test_per_class=1)  # 48 trained on: 12 steps an epoch
    training = tmp_path / "in-training"  # written by rank 0 at step 15, in the second epoch
    args = ["fit", "--config", CONFIG, "--data.data_dir", str(data), "--data.val_size", "12", "--data.batch_size", "2",
            "--trainer.max_epochs", "1000", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.callbacks+=signals.SignalAt", "--trainer.callbacks.step", "15",
            "--trainer.callbacks.touch", str(training)]  # fmt: skip
    process = subprocess.Popen(cli_command(args), cwd=tmp_path, env=cli_env(TWO_CORES), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not training.exists():  # the ranks are training, past the first epoch's checkpoint
            assert time.time() < deadline and process.poll() is None, f"not at step 15 within 120 s: {process.poll()}"
            time.sleep(0.1)
        os.killpg(process.pid, sig) if to_group else process.send_signal(sig)
        output = process.communicate(timeout=60)[0]
        deadline = time.time() + 20
        while subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True).returncode == 0:  # any left?
            assert time.time() < deadline, "a rank is still running 20 s after the launcher exited"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == code, output
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert f"stopped by {name} before the run finished: checkpoint saved to" in output
    run = only((tmp_path / "runs" / "cifar").iterdir())
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] >= 15  # the stop's checkpoint, not the first epoch's (step 12)

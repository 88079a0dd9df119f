"""DDP: a real 2-process fit on the CPU (gloo) through the CLI, and the training shards of EpochShuffle."""

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, CONFIG, FAST, run_cli

import wandb_records
from cifar.cli import cluster_job_name
from cifar.data import EpochShuffle
from cifar.errors import UserError


def only(paths) -> Path:
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


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


def test_cluster_jobs_share_one_run_name(monkeypatch):
    for key in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert cluster_job_name("fit") is None  # one process: a timestamped directory
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert cluster_job_name("fit") == "torchrun-job7-fit"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --standalone or --rdzv-id
    with pytest.raises(UserError, match="--rdzv-id"):
        cluster_job_name("fit")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    assert cluster_job_name("test") == "slurm-1234.1-test"


def csv_metrics(path: Path) -> dict[str, float]:
    rows = list(csv.DictReader(path.open()))
    return {k: float(v) for row in rows for k, v in row.items() if v and k.startswith("val_")}


@pytest.mark.slow
def test_ddp_fit_on_two_cpu_processes_one_run_same_metrics(folder_data: Path, tmp_path: Path):
    # 48 images: 16 val, 32 train. 16 = 2 ranks x batch 8: DistributedSampler pads no sample twice into the
    # val set, so DDP's synced val metrics are over exactly the images a 1-process run sees.
    common = ["--config", CONFIG, "--data.data_dir", str(folder_data), "--data.val_size", "16", *FAST,
              "--seed_everything", "0", "--trainer.accelerator", "cpu"]  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    env = {"OMP_NUM_THREADS": "1"}  # two ranks on two cores
    run_cli(["fit", *common, *ddp], tmp_path, env=env)

    # One run directory, one config, one W&B run whose id is the directory's name, checkpoints by rank 0.
    run = only((tmp_path / "runs" / "cifar").iterdir())
    assert (run / "config.yaml").is_file() and not list(run.glob("config-*.yaml"))
    run_file = only(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert run_file.name == f"run-{run.name}.wandb"
    assert {p.name for p in (run / "checkpoints").glob("*.ckpt")} >= {"last.ckpt"}
    assert len(list((run / "checkpoints").glob("*.ckpt"))) == 2
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * 2  # 2 epochs x (32 images / (2 ranks x 8)): each rank its own half
    checkpoint_state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    best = Path(checkpoint_state["best_model_path"]).name
    history = wandb_records.history(run_file)
    val_loss = [row["val_loss"] for row in history if "val_loss" in row]
    assert len(val_loss) == 2 and all(math.isfinite(v) for v in val_loss)
    images = [row for row in history if "val/examples/captions" in row]
    assert len(images) == 2  # once per epoch, from rank 0 only

    # The best checkpoint validated by 2 processes and by 1: the same metrics, synced over the ranks.
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "unused"]
    runs = {}
    for name, extra in (("ddp", ddp), ("single", [])):
        result = run_cli(["validate", *common, *extra, *logger, "--trainer.logger.name", name,
                          "--ckpt_path", "best"], tmp_path, env=env)  # fmt: skip
        assert f"--ckpt_path best: runs/cifar/{run.name}/checkpoints/{best}" in result.stderr
        runs[name] = csv_metrics(only((tmp_path / "runs" / "cifar").glob(f"*-validate/{name}/version_0/metrics.csv")))
    assert runs["ddp"].keys() == runs["single"].keys() == {"val_loss", "val_acc"}
    for key in runs["ddp"]:
        assert runs["ddp"][key] == pytest.approx(runs["single"][key], rel=1e-6), (key, runs)
    assert runs["ddp"]["val_loss"] == pytest.approx(min(val_loss), rel=1e-6)  # what fit logged for that epoch

    # test from the DDP run's best checkpoint, in 2 processes and in 1: the same overall and per-class
    # accuracy (TestReport sums the ranks' confusion matrices; 12 test images = 2 x 6, no padding).
    tests = {}
    for name, extra in (("ddp", ddp), ("single", [])):
        result = run_cli(["test", *common, *extra, *logger, "--trainer.logger.name", name, "--ckpt_path", "best"],
                         tmp_path, env=env)  # fmt: skip
        assert f"--ckpt_path best: runs/cifar/{run.name}/checkpoints/{best}" in result.stderr
        metrics = only((tmp_path / "runs" / "cifar").glob(f"*-test/{name}/version_0/metrics.csv"))
        assert (metrics.parents[2] / "confusion_matrix.png").is_file()
        tests[name] = {k: float(v) for row in csv.DictReader(metrics.open()) for k, v in row.items() if v}
    assert {f"test_acc/{c}" for c in CLASSES} < tests["ddp"].keys() == tests["single"].keys()
    for key in tests["ddp"]:
        assert tests["ddp"][key] == pytest.approx(tests["single"][key], rel=1e-6), (key, tests)
    assert len(list((tmp_path / "runs" / "cifar").iterdir())) == 5  # fit, 2 x validate, 2 x test: nothing shared

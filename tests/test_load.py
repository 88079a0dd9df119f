"""Load: a fit on the 50,000 shared CIFAR-10 images keeps memory bounded and does not grow across epochs."""

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import CONFIG, CPU_PRECISION, ROOT, run_cli

SHARED = ROOT.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason=f"needs the shared images at {SHARED}")
def test_fit_on_50k_images_memory_is_bounded_and_flat(tmp_path: Path):
    """All 50,000 images in memory, 5 epochs, each training on 8 of its batches (the per-epoch work that could pile
    up, a whole validation pass with its pictures, stays whole): peak RSS under 2 GB, and RSS after the fifth epoch
    within 5% of that after the second."""
    (tmp_path / "data").mkdir()
    if shutil.which("tar"):  # ten times as fast as tarfile on 50,000 files
        subprocess.run(["tar", "-xzf", str(SHARED), "-C", str(tmp_path / "data")], check=True)
    else:
        with tarfile.open(SHARED) as tar:
            tar.extractall(tmp_path / "data", filter="data")
    times = tmp_path / "times.json"
    run_cli(["fit", "--config", CONFIG, "--data.data_dir", str(tmp_path / "data"), "--trainer.max_epochs", "5",
             "--trainer.limit_train_batches", "8", "--data.batch_size", "256", "--model.channels_last", "true",
             "--trainer.precision", "bf16-mixed", *CPU_PRECISION, "--model.optimizer.init_args.lr", "2e-3",
             "--trainer.enable_progress_bar", "false", "--trainer.callbacks+", "bench.timer.BatchTimer",
             "--trainer.callbacks.output", str(times)], tmp_path)  # fmt: skip
    result = json.loads(times.read_text())
    rss = result["epoch_rss_mb"]
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; RSS after each epoch (MB): {[round(r) for r in rss]}")
    assert len(rss) == 5 and len(result["starts"]) == 5 * 8
    assert result["peak_rss_mb"] < 2048
    assert abs(rss[4] - rss[1]) / rss[1] < 0.05

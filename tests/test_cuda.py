"""On a CUDA GPU: the whole app, the device paths (data on the GPU, bf16, a mid-epoch resume, checkpoints that
cross devices) and the training step's host syncs. Skipped without a GPU, so CI stays green; `bench/gpu/run.sh`
runs them on a lent one (`pytest -m cuda`). Its CPU dry run sets CIFAR_CUDA_TESTS_ON=cpu: the same tests then run
on the CPU accelerator, which finds the tests' own bugs before a GPU is spent on them.
"""

import csv
import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (CLASSES, FAST_RECIPE, ROOT, ScalarReads, make_folder_data, only, run_cli,
                      stopped_run_resumes_exactly)
from lightning.pytorch import Callback

ON = os.environ.get("CIFAR_CUDA_TESTS_ON", "gpu")  # Lightning's accelerator name: gpu, or cpu for the dry run
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON == "gpu" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEVICE = ["--trainer.accelerator", ON, "--trainer.devices", "1"]
RECIPES = {
    "cifar": ["--config", str(ROOT / "configs" / "cifar.yaml"), "--data.batch_size", "8"],
    "fast": ["--config", str(ROOT / "configs" / "fast.yaml"), "--data.batch_size", "16",
             "--trainer.precision", "bf16-mixed"],  # fmt: skip
}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
# Epochs to learn the 3 colours: the fast recipe's rates are for batch 1536; at batch 16, 2 epochs in bf16 left it at
# chance (test_acc 1/3) on the CPU, 4 reach 1.0 (seeds 0, 1).
EPOCHS = {"cifar": "2", "fast": "4"}



@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_folder_data(tmp_path / "data", per_class=24, test_per_class=4)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fit_test_predict_export_on_the_device(recipe, data, tmp_path):
    """The user's path on the GPU, in new processes: fit, `test --ckpt_path best`, predict, export (ONNX)."""
    common = [*RECIPES[recipe], "--data.data_dir", str(data), *DEVICE]
    fit = run_cli(["fit", *common, *QUIET, "--data.val_size", "12", "--trainer.max_epochs", EPOCHS[recipe],
                   "--trainer.check_val_every_n_epoch", "1", "--seed_everything", "0"], tmp_path)  # fmt: skip
    if ON == "gpu":
        assert "GPU available: True (cuda), used: True" in fit.stdout + fit.stderr
    run = only((tmp_path / "runs" / recipe).glob("*-fit-*"))
    best = torch.load(only(run.glob("checkpoints/epoch=*.ckpt")), map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in best["state_dict"].values())  # loaded with map_location
    test = run_cli(["test", *common, "--ckpt_path", "best", "--trainer.enable_progress_bar", "false"], tmp_path)
    report = json.loads(only((tmp_path / "runs" / recipe).glob("*-test-*/test_report.json")).read_text())
    assert report["metrics"]["test_acc"] >= 0.5, test.stdout  # 3 classes told apart by colour: learnable

    predict = run_cli(["predict", *common, *QUIET, "--ckpt_path", "best", "--data.predict_dir",
                       str(data / "test" / "cat")], tmp_path)  # fmt: skip
    written = next(line for line in (predict.stdout + predict.stderr).splitlines() if "Predictions for" in line)
    rows = list(csv.DictReader((tmp_path / written.split(" written to ")[1].strip()).open()))
    assert len(rows) == 4 and {row["predicted"] for row in rows} <= set(CLASSES)

    run_cli(["export", "--config", RECIPES[recipe][1], "--ckpt_path", "best", "--format", "onnx"], tmp_path)
    assert only(run.glob("checkpoints/*.onnx")).stat().st_size > 0


def weights_after_fit(tmp_path: Path, data: Path, name: str, *options: str) -> dict:
    run_cli(["fit", *RECIPES["fast"], "--trainer.precision", "32", "--data.data_dir", str(data), *DEVICE, *QUIET,
             "--data.val_size", "0", "--trainer.max_epochs", "2", "--seed_everything", "1", "--trainer.deterministic",
             "true", "--trainer.default_root_dir", name, *options], tmp_path)  # fmt: skip
    checkpoint = only((tmp_path / name).glob("*-fit-*/checkpoints/last.ckpt"))
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def test_data_on_the_device_or_not_trains_the_same_weights(data, tmp_path):
    """`data.data_on_device` only moves where batches are gathered and augmented: same seed, same weights."""
    on = weights_after_fit(tmp_path, data, "on", "--data.data_on_device", "true")
    off = weights_after_fit(tmp_path, data, "off", "--data.data_on_device", "false")
    for name, tensor in on.items():
        torch.testing.assert_close(off[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_sigterm_mid_epoch_on_the_device_resumes_exactly(tmp_path):
    """tests/test_fault.py's check (conftest's `stopped_run_resumes_exactly`), fast recipe (augmentation drawn on
    the device), on the device."""
    stopped_run_resumes_exactly(signal.SIGTERM, 143, [*FAST_RECIPE, *DEVICE], tmp_path)


@pytest.mark.parametrize(("trained", "tested"), [("cpu", ON), (ON, "cpu")])
def test_a_checkpoint_moves_between_cpu_and_device(trained, tested, data, tmp_path):
    """Saved on one device, tested on the other: the same accuracy as where it was trained."""
    common = [*RECIPES["fast"], "--trainer.precision", "32", "--data.data_dir", str(data), *QUIET]
    run_cli(["fit", *common, "--trainer.accelerator", trained, "--data.val_size", "0", "--trainer.max_epochs", "2"],
            tmp_path)  # fmt: skip
    last = only((tmp_path / "runs" / "fast").glob("*-fit-*/checkpoints/last.ckpt"))
    accuracy = {}
    for where, device in (("there", trained), ("moved", tested)):
        run_cli(["test", *common, "--ckpt_path", str(last), "--trainer.accelerator", device,
                 "--trainer.default_root_dir", where], tmp_path)  # fmt: skip
        report = only((tmp_path / where).glob("*-test-*/test_report.json"))
        accuracy[where] = json.loads(report.read_text())["metrics"]["test_acc"]
    assert accuracy["moved"] == pytest.approx(accuracy["there"], abs=1 / 12)  # 12 test images: one may flip


class SyncsPerStep(Callback):
    """Host syncs between the starts of consecutive training batches, as CUDA reports them
    (`torch.cuda.set_sync_debug_mode`), with tensor -> number reads (which the CPU dry run sees) as a floor."""

    STEPS: list[tuple[int, int, list[str]]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.reads, self.previous = ScalarReads().__enter__(), None
        self.caught = warnings.catch_warnings(record=True)
        self.warned = self.caught.__enter__()
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.previous is not None:
            syncs = [str(w.message).splitlines()[0] for w in self.warned if "synchroniz" in str(w.message)]
            SyncsPerStep.STEPS.append((self.previous, max(len(syncs), self.reads.count), syncs))
        self.warned.clear()
        self.reads.count, self.previous = 0, trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        self.caught.__exit__(None, None, None)
        self.reads.__exit__(None, None, None)


def test_a_training_step_on_the_device_syncs_only_to_log(data, tmp_path, monkeypatch):
    """The fast recipe on the device, data there too: no host sync between batches, but one on the steps whose
    loss goes to the logger. What CUDA reported is in the failure message."""
    from cifar.cli import main

    monkeypatch.chdir(tmp_path)
    SyncsPerStep.STEPS.clear()
    main(["fit", *RECIPES["fast"], "--data.data_dir", str(data), *DEVICE, "--data.val_size", "0",
          "--data.batch_size", "8", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "3",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
          "--trainer.callbacks+=test_cuda.SyncsPerStep"])  # fmt: skip
    steps = SyncsPerStep.STEPS
    assert len(steps) == 2 * (9 - 1)  # 72 images / 8, 2 epochs
    assert all(count <= 1 for step, count, _ in steps if (step + 1) % 3 == 0), steps
    assert all(count == 0 for step, count, _ in steps if (step + 1) % 3), steps

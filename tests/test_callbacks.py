"""Callbacks and the system, in process: other loggers than W&B, and the pieces that need no CLI."""

from pathlib import Path

import pytest
import torch
from conftest import CLASSES, FAST, only, options
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from cifar.callbacks import ImagePredictionLogger, captioned_grid
from cifar.cli import main
from cifar.data import CIFAR10DataModule
from cifar.module import LitModel
from cifar.nets import TutorialCNN


def fit_one_epoch(folder_data: Path, root: Path, logger) -> ImagePredictionLogger:
    callback = ImagePredictionLogger(num_samples=5)
    trainer = Trainer(max_epochs=1, logger=logger, callbacks=[callback], default_root_dir=str(root),
                      enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(LitModel(TutorialCNN(num_classes=3), num_classes=3), CIFAR10DataModule(str(folder_data), 8, 12))
    return callback


def test_image_logger_writes_a_png_grid_without_wandb(folder_data, tmp_path):
    callback = fit_one_epoch(folder_data, tmp_path, CSVLogger(str(tmp_path)))
    grids = list((tmp_path / "val_examples").glob("*.png"))
    assert [g.name for g in grids] == ["epoch=000-step=5.png"]  # one per epoch, sanity pass skipped
    assert Image.open(grids[0]).size == (8 * 150, 1 * (96 + 24))
    assert len(callback.samples[0]) == 5


def test_image_logger_with_no_logger_at_all(folder_data, tmp_path):
    fit_one_epoch(folder_data, tmp_path, False)
    assert len(list((tmp_path / "val_examples").glob("*.png"))) == 1


def test_image_logger_sends_a_grid_to_tensorboard(folder_data, tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    fit_one_epoch(folder_data, tmp_path, logger)
    events = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert events and b"val/examples" in events[0].read_bytes()


def test_samples_are_fixed_by_seed():
    images = torch.arange(100 * 3 * 32 * 32, dtype=torch.int32).reshape(100, 3, 32, 32).to(torch.uint8)
    dataset = type("D", (), {"images": images, "targets": torch.arange(100), "__len__": lambda self: 100})()
    first = ImagePredictionLogger(num_samples=8, seed=3).pick_samples(dataset)[1]
    again = ImagePredictionLogger(num_samples=8, seed=3).pick_samples(dataset)[1]
    other = ImagePredictionLogger(num_samples=8, seed=4).pick_samples(dataset)[1]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_captioned_grid_colours_right_and_wrong():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    grid = captioned_grid(images, ["Pred: cat, Label: cat", "Pred: dog, Label: cat"], [True, False])
    pixels = torch.tensor(list(grid.getdata())).reshape(grid.size[1], grid.size[0], 3)
    captions = pixels[96:].int()
    greenish = lambda p: (p[..., 1] > p[..., 0] + 50) & (p[..., 1] > p[..., 2] + 50)  # noqa: E731
    reddish = lambda p: (p[..., 0] > p[..., 1] + 50) & (p[..., 0] > p[..., 2] + 50)  # noqa: E731
    assert greenish(captions[:, :150]).any() and not reddish(captions[:, :150]).any()  # right: green text
    assert reddish(captions[:, 150:300]).any() and not greenish(captions[:, 150:300]).any()  # wrong: red


def test_model_takes_uint8_and_normalizes_like_the_tutorial():
    model = LitModel(TutorialCNN(num_classes=len(CLASSES)), num_classes=len(CLASSES))
    seen = {}
    model.net.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    assert model(images).shape == (2, len(CLASSES))
    expected = (torch.tensor([0, 128, 255]) / 255 - 0.5) / 0.5  # ToTensor then Normalize(0.5, 0.5)
    assert torch.allclose(seen["x"][0, :, 0, 0], expected, atol=1e-6)


def test_logged_metrics_are_exact_per_stage(folder_data, tmp_path):
    """val/test accuracy and loss are over the whole split (weighted by batch size), each stage its own."""
    dm = CIFAR10DataModule(str(folder_data), batch_size=5, val_size=12)  # batches of 5, 5, 2: weights matter
    model = LitModel(TutorialCNN(num_classes=3), num_classes=3)
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(model, dm)
    val = trainer.validate(model, dm, verbose=False)[0]
    test = trainer.test(model, dm, verbose=False)[0]
    model.eval()
    for split, logged in ((dm.val_dataset, val), (dm.test_dataset, test)):
        stage = "val" if split is dm.val_dataset else "test"
        with torch.no_grad():
            logits = model(split.images)
        accuracy = (logits.argmax(1) == split.targets).float().mean().item()
        loss = torch.nn.functional.cross_entropy(logits, split.targets).item()
        assert logged[f"{stage}_acc"] == pytest.approx(accuracy, abs=1e-6)
        assert logged[f"{stage}_loss"] == pytest.approx(loss, rel=1e-5)


SAVE_DIR = ["--trainer.logger.save_dir", "."]  # required to parse; the CLI puts the logs in the run directory


@pytest.mark.parametrize("logger", [["CSVLogger", *SAVE_DIR], ["TensorBoardLogger", *SAVE_DIR], ["false"]],
                         ids=lambda args: args[0])  # fmt: skip
def test_without_wandb_the_app_trains_and_writes_its_pictures(logger, folder_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = options(folder_data, *FAST, "--trainer.max_epochs", "1", "--trainer.enable_model_summary", "false",
                     "--trainer.logger", *logger, val_size=12)  # fmt: skip
    main(["fit", *common])
    main(["test", *common, "--ckpt_path", "last"])
    fit, test = (only(Path("runs/cifar").glob(f"*-{stage}-*")) for stage in ("fit", "test"))
    assert Image.open(only(fit.glob("val_examples/*.png"))).size == (8 * 150, 2 * (96 + 24))  # 12 val images
    assert Image.open(test / "test_examples.png").size == (8 * 150, 2 * (96 + 24))  # 12 test images
    assert Image.open(test / "confusion_matrix.png").size[0] > 200
    if logger[0] == "CSVLogger":
        header = only(test.glob("lightning_logs/*/metrics.csv")).read_text().splitlines()[0]
        assert {"test_acc", *[f"test_acc/{c}" for c in CLASSES]} <= set(header.split(","))


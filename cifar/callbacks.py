"""Callbacks declared in the YAML config: validation images with their predictions, and a CSV of predictions."""

import csv
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from cifar.errors import UserError


class ImagePredictionLogger(Callback):
    """After each validation epoch, show a fixed set of validation images captioned "Pred: cat, Label: dog".

    The samples are drawn once, with `seed`, from the data module's validation set, so every epoch
    shows the same images. W&B gets a list of captioned images and TensorBoard an image grid, at the
    trainer's global step; with any other logger, or none, a PNG grid with the captions is written
    under the run directory. The sanity-check pass is skipped.

    Args:
        num_samples: Number of validation images to show.
        seed: Seed that picks the images.
    """

    def __init__(self, num_samples: int = 32, seed: int = 0):
        super().__init__()
        self.num_samples = num_samples
        self.seed = seed
        self.samples: tuple[Tensor, Tensor] | None = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self.samples is None:
            self.samples = self.pick_samples(trainer.datamodule.val_dataset)
        images, labels = self.samples
        if len(images) == 0:
            return
        with torch.no_grad():
            preds = pl_module(images.to(pl_module.device)).argmax(dim=-1).cpu()
        classes = trainer.datamodule.classes
        captions = [f"Pred: {classes[p]}, Label: {classes[y]}" for p, y in zip(preds.tolist(), labels.tolist())]
        step = trainer.global_step
        wrote = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                hwc = list(images.permute(0, 2, 3, 1).numpy())  # un-normalized uint8 pixels
                logger.log_image(key="val/examples", images=hwc, step=step, caption=captions)
                wrote = True
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/examples", make_grid(images, nrow=8), global_step=step)
        if not wrote:
            path = Path(trainer.default_root_dir) / "val_examples" / f"epoch={trainer.current_epoch:03d}-step={step}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            captioned_grid(images, captions, correct=(preds == labels).tolist()).save(path)

    def pick_samples(self, dataset) -> tuple[Tensor, Tensor]:
        n = min(self.num_samples, len(dataset))
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:n].sort().values
        return dataset.images[index], dataset.targets[index]


def captioned_grid(images: Tensor, captions: list[str], correct: list[bool], columns: int = 8, zoom: int = 3):
    """A PIL image: each uint8 image enlarged `zoom` times, its caption below in green (right) or red (wrong)."""
    size, text_height = images.shape[-1] * zoom, 24
    cell_width = max(size, 150)
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_width, rows * (size + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption, ok) in enumerate(zip(images, captions, correct)):
        x, y = (i % columns) * cell_width, (i // columns) * (size + text_height)
        tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
        grid.paste(tile, (x + (cell_width - size) // 2, y))
        draw.text((x + 2, y + size + 4), caption, fill=(0, 128, 0) if ok else (200, 0, 0))
    return grid


class PredictionCSVWriter(BasePredictionWriter):
    """Writes `predict` results as CSV: file, predicted class, confidence, then one probability per class.

    Args:
        output: CSV path; by default `predictions.csv` in the run directory. An existing file is never
            overwritten: the run stops with an error instead.
    """

    def __init__(self, output: str | None = None):
        super().__init__(write_interval="epoch")
        self.output = output

    def path(self, trainer: Trainer) -> Path:
        return Path(self.output) if self.output else Path(trainer.default_root_dir) / "predictions.csv"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict" and trainer.world_size > 1:  # each rank would hold only its shard of the rows
            raise UserError("predict writes one CSV from one process: run it with --trainer.devices 1 "
                            "(and no --trainer.num_nodes)")  # fmt: skip
        if stage == "predict" and self.path(trainer).exists():  # say so before the work, not after
            raise UserError(f"{self.path(trainer)} already exists: choose another --output or move it away")

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices) -> None:
        path = self.path(trainer)
        files = trainer.datamodule.predict_files
        classes = trainer.datamodule.classes
        probs = torch.cat(predictions).float().cpu()
        confidence, predicted = probs.max(dim=-1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", newline="") as f:  # "x": fail rather than overwrite
            writer = csv.writer(f)
            writer.writerow(["file", "predicted", "confidence", *[f"p_{name}" for name in classes]])
            for file, label, conf, row in zip(files, predicted.tolist(), confidence.tolist(), probs.tolist()):
                writer.writerow([str(file), classes[label], f"{conf:.6f}", *[f"{p:.6f}" for p in row]])
        rank_zero_info(f"Predictions for {len(files)} images written to {path}")

"""Callbacks declared in the YAML config: validation images with their predictions, a report at the end of
`test`, and a CSV of predictions."""

import csv
import json
import textwrap
from itertools import product
from pathlib import Path

import torch
import wandb
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageDraw
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import make_grid

from cifar.errors import UserError
from cifar.run import OVERLAPS, evaluation_of


class ImagePredictionLogger(Callback):
    """After each validation epoch, show a fixed set of validation images captioned "Pred: cat, Label: dog".

    The samples are drawn once, with `seed`, from the data module's validation set, so every epoch
    shows the same images. W&B gets a list of captioned images and a table (`val/predictions`: image,
    label, prediction, confidence, one probability per class, to sort and filter in the UI), TensorBoard
    an image grid, at the trainer's global step; with any other logger, or none, a PNG grid with the
    captions is written under the run directory. The sanity-check pass is skipped.

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
            probs = pl_module.evaluate(images.to(pl_module.device)).float().softmax(dim=-1).cpu()  # with its TTA
        preds = probs.argmax(dim=-1)
        classes = trainer.datamodule.classes
        captions = captions_of(preds, labels, classes)
        step = trainer.global_step
        wrote = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                hwc = list(images.permute(0, 2, 3, 1).numpy())  # un-normalized uint8 pixels
                logger.log_image(key="val/examples", images=hwc, step=step, caption=captions)
                logger.log_table("val/predictions", *prediction_rows(images, labels, probs, classes), step=step)
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
        return dataset.images[index].cpu(), dataset.targets[index].cpu()  # the data may live on the GPU


def prediction_rows(images: Tensor, labels: Tensor, probs: Tensor, classes: list[str]) -> tuple[list[str], list]:
    """Columns and rows of a W&B table, one row per image: image, label, prediction, confidence, p_<class>..."""
    confidence, predicted = probs.max(dim=-1)
    columns = ["image", "label", "prediction", "confidence", *[f"p_{name}" for name in classes]]
    rows = zip(images.permute(0, 2, 3, 1).cpu().numpy(), labels.tolist(), predicted.tolist(), confidence.tolist(),
               probs.tolist())  # fmt: skip
    return columns, [[wandb.Image(hwc), classes[y], classes[p], c, *row] for hwc, y, p, c, row in rows]


def captions_of(preds: Tensor, labels: Tensor, classes: list[str]) -> list[str]:
    return [f"Pred: {classes[p]}, Label: {classes[y]}" for p, y in zip(preds.tolist(), labels.tolist())]


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


class TestReport(Callback):
    """At the end of `test`: per-class accuracy (`test_acc/<class>`, every logger); for W&B the confusion matrix
    (`test/confusion_matrix`) and the `num_mistakes` most confident mistakes (`test/mistakes`); in the run directory
    `confusion_matrix.png`, `test_examples.png` (right in green, wrong in red) and `test_report.json`: the metrics,
    the checkpoint, its fit run, the data evaluated and how many of its images trained the checkpoint (`overlap`,
    null when the checkpoint has no record of its training data).

    It keeps on the model's device only probabilities and labels (a few bytes an image) and the images it shows.
    Under DDP the counts are every rank's; the W&B chart, the images and the mistakes rank zero's share.

    Args:
        num_samples: Number of test images in test_examples.png.
        num_mistakes: Number of most confidently wrong test images logged to W&B.
    """

    def __init__(self, num_samples: int = 32, num_mistakes: int = 16):
        super().__init__()
        self.num_samples = num_samples
        self.num_mistakes = num_mistakes
        self.written = False  # this test's figures, once on_test_epoch_end has made them

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = len(trainer.datamodule.classes)
        # Summed over every rank's share by torchmetrics itself at `compute`.
        self.confusion = MulticlassConfusionMatrix(n, validate_args=False).to(pl_module.device)
        self.probs: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.samples: list[Tensor] = []
        self.mistakes: list[Tensor] = []  # images, labels, probs of the most confident mistakes so far
        self.written = False

    def on_test_batch_end(self, trainer, pl_module, outputs: Tensor, batch, batch_idx: int, dataloader_idx: int = 0):
        images, labels = batch
        probs = outputs.float().softmax(dim=-1)
        self.confusion.update(probs, labels)
        self.probs.append(probs)
        self.labels.append(labels)
        if (seen := sum(map(len, self.samples))) < self.num_samples:
            self.samples.append(images[: self.num_samples - seen])
        wrong = probs.argmax(dim=-1) != labels
        candidates = [images[wrong], labels[wrong], probs[wrong]]
        if self.mistakes:
            candidates = [torch.cat(pair) for pair in zip(self.mistakes, candidates)]
        top = candidates[2].max(dim=-1).values.topk(min(self.num_mistakes, len(candidates[0]))).indices
        self.mistakes = [c[top] for c in candidates]  # most confident first

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.probs:
            return
        classes = trainer.datamodule.classes
        confusion = self.confusion.compute().cpu()  # rows: label
        for name, right, total in zip(classes, confusion.diag().tolist(), confusion.sum(dim=1).tolist()):
            if total:  # a class with no test image has no accuracy
                pl_module.log(f"test_acc/{name}", right / total, rank_zero_only=True)
        if not trainer.is_global_zero:
            return
        probs, labels = torch.cat(self.probs), torch.cat(self.labels)
        preds = probs.argmax(dim=-1)
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                chart = wandb.plot.confusion_matrix(y_true=labels.tolist(), preds=preds.tolist(), class_names=classes,
                                                    title="Test confusion matrix")  # fmt: skip
                logger.log_metrics({"test/confusion_matrix": chart}, step=step)
                if len(self.mistakes[0]):
                    logger.log_table("test/mistakes", *prediction_rows(*self.mistakes, classes), step=step)
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        provenance = self.provenance(trainer)
        confusion_figure(confusion, classes, provenance).savefig(run_dir / "confusion_matrix.png", dpi=100)
        images = torch.cat(self.samples).cpu()
        preds, labels = preds[: len(images)].cpu(), labels[: len(images)].cpu()
        captions = captions_of(preds, labels, classes)
        captioned_grid(images, captions, correct=(preds == labels).tolist()).save(run_dir / "test_examples.png")
        self.written = True

    @staticmethod
    def provenance(trainer: Trainer) -> dict:
        """The checkpoint tested, its fit run, the data evaluated and its overlap, as the run records them."""
        evaluation = evaluation_of(trainer) or {}
        ckpt_path = str(trainer.ckpt_path) if trainer.ckpt_path else None
        return {"checkpoint": ckpt_path, "fit_run": evaluation.get("fit_run"), "data": evaluation.get("data"),
                "overlap": evaluation.get("overlap"), "note": evaluation.get("note")}  # fmt: skip

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (trainer.is_global_zero and self.written):
            return
        run_dir = Path(trainer.default_root_dir)
        metrics = {name: value.item() for name, value in trainer.callback_metrics.items()}
        report = {**self.provenance(trainer), "metrics": metrics}
        (run_dir / "test_report.json").write_text(json.dumps(report, indent=1) + "\n")
        rank_zero_info(f"Test report written to {run_dir / 'test_report.json'}, {run_dir / 'confusion_matrix.png'} "
                       f"and {run_dir / 'test_examples.png'}")  # fmt: skip


def confusion_figure(confusion: Tensor, classes: list[str], provenance: dict | None = None):
    """A matplotlib Figure: the confusion matrix as a heatmap with the counts written in the cells, titled with
    the checkpoint, its fit run and the data (`TestReport.provenance`)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    n = len(classes)
    width = max(6.0, 2 + 0.6 * n)  # inches: room for the title and the provenance lines
    figure = Figure(figsize=(width, 2.2 + 0.6 * n), layout="constrained")
    axes = figure.subplots()
    heatmap = axes.imshow(confusion.numpy(), cmap="Blues")
    axes.set_xticks(range(n), classes, rotation=45, ha="right")
    axes.set_yticks(range(n), classes)
    axes.set(xlabel="prediction", ylabel="label", title=f"Test confusion matrix ({int(confusion.sum())} images)")
    if provenance and provenance["checkpoint"]:
        lines = [f"checkpoint {Path(provenance['checkpoint']).name} of run {provenance['fit_run'] or 'unknown'}",
                 f"data: {provenance['data']}"]  # fmt: skip
        if provenance["overlap"]:
            lines.append(f"{OVERLAPS.upper()}: {provenance['overlap']} images")
        text = "\n".join(textwrap.fill(line, width=int(17 * width)) for line in lines)  # ~17 characters an inch at 7 pt
        figure.suptitle(text, fontsize=7, color="red" if provenance["overlap"] else "black")
    dark = confusion.max().item() / 2
    for row, column in product(range(n), range(n)):
        count = confusion[row, column].item()
        axes.text(column, row, count, ha="center", va="center", color="white" if count > dark else "black")
    figure.colorbar(heatmap, ax=axes)
    return figure


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


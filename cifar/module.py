"""The LightningModule: the classification *system* around a plain network.

It owns what every backbone shares: uint8 -> normalized float on the model's device, cross-entropy,
one torchmetrics Accuracy per stage (the tutorial shared one object across stages, mixing their
counts), and the optimizer. The network itself arrives ready-made from the config (`model.net`).
"""

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from cifar.nets import TutorialCNN


class LitModel(LightningModule):
    """Image classifier: takes uint8 image batches (N, 3, H, W) and returns logits.

    Args:
        net: The network, chosen by `class_path`; its `num_classes` is linked from the data.
        num_classes: Number of classes, for the metrics (linked from `data.num_classes`).
        optimizer: Optimizer, called with the parameters (default: the tutorial's Adam, lr 2e-4).
        mean: Per-channel mean subtracted from pixels scaled to [0, 1] (tutorial: 0.5).
        std: Per-channel standard deviation the pixels are divided by (tutorial: 0.5).
    """

    def __init__(
        self,
        net: nn.Module = lazy_instance(TutorialCNN),
        num_classes: int = 10,
        optimizer: OptimizerCallable = lambda params: torch.optim.Adam(params, lr=2e-4),
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ):
        super().__init__()
        # Under LightningCLI, `net` and `optimizer` are stored as their class_path/init_args dicts,
        # so checkpoints hold no pickled objects and `load_from_checkpoint` can rebuild the net.
        self.save_hyperparameters()
        self.net = net
        self.optimizer = optimizer
        # Folded into one multiply-add on 0..255 pixels; not saved: they come from the config.
        self.register_buffer("scale", 1 / (255 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1),
                             persistent=False)  # fmt: skip
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """uint8 images (N, 3, H, W) -> logits (N, num_classes)."""
        return self.net(images.float() * self.scale - self.shift)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_acc.update(logits, labels)  # computed once per epoch, not per step
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)  # train_loss_step, _epoch
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), prog_bar=True)
        accuracy.update(logits, labels)
        self.log(f"{stage}_acc", accuracy, prog_bar=True)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities (N, num_classes) for a batch of (images, indices into the predict set)."""
        images, _ = batch
        return self(images).softmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())

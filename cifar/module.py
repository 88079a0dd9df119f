"""The model every command runs (`Classifier`; served as `Probabilities`) and what trains it (`LitModel`: loss,
metrics, optimizer, schedule)."""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from cifar import cpu
from cifar.errors import UserError
from cifar.nets import TutorialCNN

STAGES = ("train", "val", "test")


def tta_logits(net: nn.Module, x: Tensor, tta: int) -> Tensor:
    """The mean logits of `net` over views of the normalized images x (N, C, H, W). tta 0: x; 1: x and its mirror;
    2: also both shifted a pixel up-left and down-right (6 passes, the shifts weighted 1/2: airbench's level 2)."""
    if tta == 0:
        return net(x)

    def mirrored(x: Tensor) -> Tensor:
        return (net(x) + net(x.flip(-1))) / 2

    if tta == 1:
        return mirrored(x)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    # Copied into x's layout: a compiled net would recompile for the slices' strides (tests/test_hotpath.py).
    up_left, down_right = (torch.empty_like(x).copy_(view) for view in (padded[..., :h, :w], padded[..., 2:, 2:]))
    shifted = (mirrored(up_left) + mirrored(down_right)) / 2
    return (mirrored(x) + shifted) / 2


class Classifier(nn.Module):
    """uint8 images (N, 3, H, W) -> logits (N, classes): normalize, the network, test-time augmentation.
    The arguments are `LitModel`'s of the same names."""

    def __init__(self, net: nn.Module, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), tta: int = 0,
                 channels_last: bool = False):  # fmt: skip
        super().__init__()
        self.net, self.tta = net, tta
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        # (pixels / 255 - mean) / std as one multiply-add on 0..255 pixels; not saved: they come from the config.
        mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1 / (255 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or float) pixels (N, 3, H, W) -> normalized float, in the network's memory format."""
        return (images.float() * self.scale - self.shift).contiguous(memory_format=self.memory_format)

    def forward(self, images: Tensor, tta: int | None = None, fraction: float = 1.0) -> Tensor:
        """Logits with `tta` (default: this model's) views for the `fraction` of the images the plain pass is least
        sure of (lowest top softmax probability; at least one image), the plain logits for the rest."""
        x = self.normalize(images)
        tta = self.tta if tta is None else tta
        if tta == 0 or fraction >= 1:
            return tta_logits(self.net, x, tta)
        logits = self.net(x)
        least = logits.softmax(-1).amax(-1).topk(max(1, math.ceil(fraction * len(x))), largest=False).indices
        logits[least] = tta_logits(self.net, x[least], tta).to(logits.dtype)
        return logits


class Probabilities(nn.Module):
    """The model as `predict`, `export` and `serve` run it: uint8 images (N, 3, H, W) -> class probabilities
    (N, classes), with the model's test-time augmentation for every image."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier  # not the LightningModule: it cannot be traced without a Trainer

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images).softmax(dim=-1)


class LitModel(LightningModule):
    """Trains a `Classifier`: uint8 image batches (N, 3, H, W) -> logits. Training batches mixed by the data
    (mixup, cutmix) come with soft targets (N, classes): the loss takes them, and `train_acc` counts a prediction
    right when it is the dominant label (the image with the larger share).

    Args:
        net: The network, chosen by `class_path`; its `num_classes` is linked from the data.
        num_classes: Number of classes, for the metrics (linked from `data.num_classes`).
        optimizer: Optimizer, called with the parameters (default: the tutorial's Adam, lr 2e-4).
        scheduler: Learning-rate schedule, stepped per optimizer step (`cifar.optim.PiecewiseLinearLR`,
            `cifar.optim.WarmupCosineLR`, or any of torch's); null: constant.
        label_smoothing: Label smoothing of the training loss (validation and test report plain cross-entropy).
        tta: Test-time augmentation, averaging logits: 0 none, 1 the image and its mirror, 2 also both shifted by one
            pixel (6 passes; airbench's level 2).
        tta_fraction: In validate and test, the share of each batch's least confident images that get `tta` (hiverge's
            record: 0.25, in about half the time); predict, serve and export: all, so no answer depends on the batch.
        mean: Per-channel mean subtracted from pixels scaled to [0, 1] (tutorial: 0.5).
        std: Per-channel standard deviation the pixels are divided by (tutorial: 0.5).
        channels_last: Run the network in channels_last memory format (faster convolutions on most CPUs and GPUs).
        compile: Compile the network with `torch.compile` (slower start, faster steps where it helps).
        classes: Class names, index = label (linked from `data.classes`), kept in checkpoints to name served outputs.
        freeze_after: Parameters that train for the first epochs only: name in this module (e.g. `net.whiten.bias`)
            -> epochs (a fraction counts in batches), each in its own optimizer group, then learning rate 0 (and on
            one process no gradient); null: none.
        freeze_schedule: `step`: the scheduled rate for those epochs, then 0; `linear`: from the optimizer's initial
            rate linearly to 0 over them, whatever the scheduler does (airbench94_muon's whitening bias).
    """

    def __init__(
        self,
        net: nn.Module = lazy_instance(TutorialCNN),
        num_classes: int = 10,
        optimizer: OptimizerCallable = lambda params: torch.optim.Adam(params, lr=2e-4),
        scheduler: LRSchedulerCallable | None = None,
        label_smoothing: ClosedUnitInterval = 0.0,
        tta: Literal[0, 1, 2] = 0,
        tta_fraction: ClosedUnitInterval = 1.0,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.5, 0.5, 0.5),
        channels_last: bool = False,
        compile: bool = False,
        classes: list[str] | None = None,
        freeze_after: dict[str, PositiveFloat] | None = None,
        freeze_schedule: Literal["step", "linear"] = "step",
    ):
        super().__init__()  # no save_hyperparameters: a CLI checkpoint holds its whole config once (cifar/run.py)
        if tta_fraction == 0:
            raise UserError("tta_fraction must be in (0, 1], not 0")
        self.classifier = Classifier(net, mean, std, tta, channels_last)
        if compile:
            net.compile()  # in place: parameter names, and so checkpoints, stay those of the plain net
        self.optimizer, self.scheduler = optimizer, scheduler
        self.num_classes, self.classes = num_classes, classes
        self.label_smoothing, self.tta_fraction = label_smoothing, tta_fraction
        # Plain floats: they go into the optimizer's state, and checkpoints read with `weights_only=True` refuse
        # jsonargparse's checked types (subclasses of float).
        self.freeze_after = {name: float(epochs) for name, epochs in (freeze_after or {}).items()}
        self.freeze_schedule = freeze_schedule
        names = [name for name, _ in self.classifier.named_parameters()]
        if unknown := [name for name in self.freeze_after if name not in names]:
            raise UserError(f"freeze_after: the model has no parameter {unknown[0]!r} (it has e.g. {names[0]!r})")
        # Updated on the device every step, logged once per epoch (`self.log`: ~1 ms a call on the CPU, an update
        # ~0.05 ms). Input checks off: each reads a tensor on the host (`nans.any()`, `torch.unique`), a GPU sync.
        self.losses = nn.ModuleDict({f"{s}_loss": MeanMetric(nan_strategy="disable") for s in STAGES})
        scores = MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False)})
        self.scores = nn.ModuleDict({f"{s}_scores": scores.clone(prefix=f"{s}_") for s in STAGES})

    @property
    def net(self) -> nn.Module:
        return self.classifier.net

    def normalize(self, images: Tensor) -> Tensor:
        return self.classifier.normalize(images)

    def forward(self, images: Tensor) -> Tensor:
        """uint8 images (N, 3, H, W) -> logits (N, num_classes), without test-time augmentation (training)."""
        return self.classifier(images, tta=0)

    def evaluate(self, images: Tensor, fraction: float = 1.0) -> Tensor:
        """Logits for validation, test and predict: with the model's `tta` (for the least confident `fraction`)."""
        return self.classifier(images, fraction=fraction)

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if "bf16" in precision and self.trainer.strategy.root_device.type == "cpu" and cpu.has_bf16() is False:
            rank_zero_warn(
                f"this CPU has no bf16 instructions (AVX512-BF16, AMX): --trainer.precision {precision} is emulated, "
                "about 16x slower a step than 32-bit on an AVX2 AMD EPYC (cifar/cpu.py); pass "
                "--trainer.precision 32-true"
            )
        # Data-dependent init (AirbenchNet's whitening). A resumed fit then loads its checkpoint over it.
        if stage == "fit" and hasattr(self.net, "init_from_data"):
            images = self.trainer.datamodule.train_dataset.images[:5000]
            self.net.init_from_data(self.normalize(images.to(self.device)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._step(batch, "train")
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:  # the steps Lightning sends to the loggers
            # Not in the progress bar: Lightning would keep it there for the rest of the epoch and read it back as
            # a number at every batch, a host sync per step on a GPU (tests/test_hotpath.py counts them).
            self.log("train_loss_step", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The batch's logits, for callbacks that report on the test set (`TestReport`)."""
        return self._step(batch, "test")[1].detach()

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        """(loss, logits) of a batch of labels (N,) or, mixed training batches (`--data.mixup_alpha`, `cutmix_alpha`),
        soft targets (N, classes): the loss takes them as they are; the accuracy, their dominant label (the larger
        share of a mixed image; an even mix, the lower class index)."""
        images, labels = batch
        logits = self(images) if stage == "train" else self.evaluate(images, self.tta_fraction)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        # One value per image rather than `weight=len(labels)`: with nan_strategy "disable", torchmetrics
        # 1.9 drops the weight, and a short last batch would count as much as a full one.
        self.losses[f"{stage}_loss"].update(loss.detach().expand(len(labels)))
        self.scores[f"{stage}_scores"].update(logits.detach(), labels.argmax(-1) if labels.ndim == 2 else labels)
        return loss, logits

    def _log_epoch(self, stage: str) -> None:
        self.log(f"{stage}_loss", self.losses[f"{stage}_loss"], prog_bar=True)  # read once per epoch
        self.log_dict(self.scores[f"{stage}_scores"], prog_bar=stage != "train")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities (N, num_classes) for a batch of (images, indices into the predict set)."""
        return self.evaluate(batch[0]).softmax(dim=-1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state, mine = checkpoint["state_dict"], self.state_dict()  # before Lightning's strict load, a page of traceback
        differ = [k for k in mine if k in state and mine[k].shape != state[k].shape] or sorted(set(mine) ^ set(state))
        if differ:
            shapes = " vs ".join(str(tuple(s[differ[0]].shape)) if differ[0] in s else "none" for s in (state, mine))
            raise UserError(f"the checkpoint's network differs from the one this command builds ({differ[0]}: {shapes}):"
                            f" the data has another number of classes, or --config or --model.net name another network")

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Learning rate 0 (which also stops momentum and weight decay), before the batch's optimizer step: it overrides
        # the scheduler. On one process a frozen parameter also stops getting gradients, as the record detaches its
        # whitening bias: the backward then skips the first layer's input gradient (bench/RESULTS.md). Under DDP every
        # parameter must get a gradient every step, so there it only stands still.
        progress = self.current_epoch + batch_idx / self.trainer.num_training_batches  # in epochs
        for group in [g for o in self.trainer.optimizers for g in o.param_groups if "freeze_after" in g]:
            frozen = progress >= group["freeze_after"]
            if self.freeze_schedule == "linear":
                group["lr"] = group["initial_lr"] * max(0.0, 1 - progress / group["freeze_after"])
            elif frozen:  # step: the scheduler's rate until then
                group["lr"] = 0.0
            for param in group["params"]:
                param.requires_grad_(not frozen or self.trainer.world_size > 1)

    def configure_optimizers(self):
        named = {n: p for n, p in self.classifier.named_parameters() if p.requires_grad or n in self.freeze_after}
        groups = [{"params": [p for name, p in named.items() if name not in self.freeze_after]}]
        groups += [{"params": [named[name]], "freeze_after": epochs} for name, epochs in self.freeze_after.items()]
        optimizer = self.optimizer(groups)  # torch optimizers and Muon keep the extra "freeze_after" key
        for group in optimizer.param_groups:
            if "freeze_after" in group:
                group.setdefault("initial_lr", group["lr"])  # its lr at epoch 0; LambdaLR reads the same key
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:  # "the whole fit": known only now
            scheduler.total_steps = self.trainer.estimated_stepping_batches
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

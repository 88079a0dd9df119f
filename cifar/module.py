"""The LightningModule: the classification *system* around a plain network.

It owns what every backbone shares: uint8 -> normalized float on the model's device, cross-entropy,
torchmetrics per stage (the tutorial shared one Accuracy object across stages, mixing their counts),
and the optimizer. The network itself arrives ready-made from the config (`model.net`).
"""

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar.errors import UserError
from cifar.nets import TutorialCNN


def normalize(images: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """uint8 pixels -> (pixels / 255 - mean) / std, as one multiply-add (scale = 1 / (255 std), shift = mean / std)."""
    return images.float() * scale - shift


def tta_logits(net: nn.Module, x: Tensor, tta: int) -> Tensor:
    """The mean logits of `net` over test-time views of the normalized images x (N, C, H, W).

    tta 0: x alone; 1: x and its mirror; 2: also the mirrored pair shifted one pixel up-left and one
    down-right (6 passes, airbench's level 2, the shifted pairs weighted 1/2 together).
    """
    if tta == 0:
        return net(x)

    def mirrored(x: Tensor) -> Tensor:
        return (net(x) + net(x.flip(-1))) / 2

    if tta == 1:
        return mirrored(x)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:, 2:])) / 2
    return (mirrored(x) + shifted) / 2


def tta_least_confident(net: nn.Module, x: Tensor, tta: int, fraction: float) -> Tensor:
    """`tta_logits` for the `fraction` of the images in x that the plain pass is least sure of (lowest top
    softmax probability; at least one image), the plain pass's logits for the rest (hiverge's cifar10-speedrun
    evaluates its least confident 25% this way, in about half the time of full TTA)."""
    if tta == 0 or fraction >= 1:
        return tta_logits(net, x, tta)
    logits = net(x)
    k = max(1, math.ceil(fraction * len(x)))
    least = logits.softmax(-1).amax(-1).topk(k, largest=False).indices
    logits[least] = tta_logits(net, x[least], tta).to(logits.dtype)
    return logits


class LitModel(LightningModule):
    """Image classifier: takes uint8 image batches (N, 3, H, W) and returns logits.

    Args:
        net: The network, chosen by `class_path`; its `num_classes` is linked from the data.
        num_classes: Number of classes, for the metrics (linked from `data.num_classes`).
        optimizer: Optimizer, called with the parameters (default: the tutorial's Adam, lr 2e-4).
        scheduler: Learning-rate schedule, called with the optimizer and stepped after every optimizer step
            (e.g. `cifar.optim.PiecewiseLinearLR`, whose `total_steps` is set to the fit's); null: constant.
        label_smoothing: Cross-entropy label smoothing of the training loss (validation and test report plain
            cross-entropy).
        tta: Test-time augmentation in validate, test and predict: 0 none, 1 averages the logits of each image
            and its mirror, 2 also those of copies shifted by one pixel (6 passes; airbench's level 2).
        tta_fraction: In validate and test, the share of each batch's images that get `tta`: those the plain
            pass is least confident of; the rest keep its logits (hiverge's record: 0.25, for speed). Predict,
            serve and export always give every image the full `tta`, so an image's answer never depends on the
            others in its batch.
        mean: Per-channel mean subtracted from pixels scaled to [0, 1] (tutorial: 0.5).
        std: Per-channel standard deviation the pixels are divided by (tutorial: 0.5).
        channels_last: Run the network in channels_last memory format (faster convolutions on most CPUs and GPUs).
        compile: Compile the network with `torch.compile` (slower start, faster steps where it helps).
        classes: Class names, index = label (linked from `data.classes`): saved in checkpoints, so that
            `export` and servers can name the model's outputs without the data.
        freeze_after: Parameters that train for the first epochs only: name in this module (e.g.
            `net.whiten.bias`) -> epochs (a fraction counts in batches). Each gets its own optimizer group, whose
            learning rate goes to 0 after those epochs, as `freeze_schedule` says; null: none.
        freeze_schedule: How `freeze_after` groups reach learning rate 0: `step` trains them at the optimizer's
            and scheduler's rate for their epochs, then at 0; `linear` takes their rate linearly from the
            optimizer's initial one to 0 over their epochs, whatever the scheduler does (airbench94_muon's
            whitening bias).
    """

    def __init__(
        self,
        net: nn.Module = lazy_instance(TutorialCNN),
        num_classes: int = 10,
        optimizer: OptimizerCallable = lambda params: torch.optim.Adam(params, lr=2e-4),
        scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        tta: int = 0,
        tta_fraction: float = 1.0,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        channels_last: bool = False,
        compile: bool = False,
        classes: list[str] | None = None,
        freeze_after: dict[str, float] | None = None,
        freeze_schedule: Literal["step", "linear"] = "step",
    ):
        super().__init__()
        # Under LightningCLI, `net`, `optimizer` and `scheduler` are stored as their class_path/init_args dicts,
        # so checkpoints hold no pickled objects and `load_from_checkpoint` can rebuild the net. Built in Python,
        # they are the objects themselves, which `torch.load(weights_only=True)` refuses (and a lambda may not
        # pickle at all): those are left out, as Lightning advises for modules (hence its warning is muted), and
        # `load_from_checkpoint(path, net=...)` passes them back.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        objects = [k for k in ("net", "optimizer", "scheduler") if not isinstance(self.hparams.get(k), dict | None)]
        if objects:
            self.save_hyperparameters(ignore=objects)  # again: also out of `hparams_initial`, which loggers get
        self.net = net
        self.optimizer, self.scheduler = optimizer, scheduler
        self.label_smoothing = label_smoothing
        if tta not in (0, 1, 2):
            raise ValueError(f"tta must be 0, 1 or 2, not {tta}")
        self.tta = tta
        if not 0 < tta_fraction <= 1:
            raise UserError(f"tta_fraction must be in (0, 1], not {tta_fraction}")
        self.tta_fraction = tta_fraction
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        if compile:
            self.net.compile()  # in place: parameter names, and so checkpoints, stay those of the plain net
        self.freeze_after, self.freeze_schedule = freeze_after or {}, freeze_schedule
        names = [name for name, _ in self.named_parameters()]
        for name, epochs in self.freeze_after.items():
            if name not in names:
                raise UserError(f"freeze_after: the model has no parameter {name!r} (it has e.g. {names[0]!r})")
            if epochs <= 0:
                raise UserError(f"freeze_after: {name!r} must train for more than 0 epochs, not {epochs}")
        # Folded into one multiply-add on 0..255 pixels; not saved: they come from the config.
        self.register_buffer("scale", 1 / (255 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1),
                             persistent=False)  # fmt: skip
        # One loss mean and one accuracy per stage, updated on the device every step and logged once per
        # epoch: `self.log` costs about 1 ms a call on the CPU, a Metric update ~0.05 ms. Their input checks
        # are off because each one reads a tensor on the host (`if nans.any()`, `torch.unique`): a GPU sync.
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro", validate_args=False))

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images (N, 3, H, W) -> normalized float, in the network's memory format."""
        return normalize(images, self.scale, self.shift).contiguous(memory_format=self.memory_format)

    def forward(self, images: Tensor) -> Tensor:
        """uint8 images (N, 3, H, W) -> logits (N, num_classes)."""
        return self.net(self.normalize(images))

    def evaluate(self, images: Tensor, fraction: float = 1.0) -> Tensor:
        """Logits for validation, test and predict: the mean over the `tta` views of each image (of the least
        confident `fraction` of them)."""
        return tta_least_confident(self.net, self.normalize(images), self.tta, fraction)

    def setup(self, stage: str) -> None:
        # Data-dependent init (AirbenchNet's whitening). A resumed fit then loads its checkpoint over it.
        if stage == "fit" and hasattr(self.net, "init_from_data"):
            images = self.trainer.datamodule.train_dataset.images[:5000]
            self.net.init_from_data(self.normalize(images.to(self.scale.device)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._step(batch, "train")
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:  # the steps Lightning sends to the loggers
            self.log("train_loss_step", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The batch's logits, for callbacks that report on the test set (`TestReport`)."""
        return self._step(batch, "test")[1].detach()

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        """(loss, logits) of a batch; updates the stage's metrics."""
        images, labels = batch
        logits = self(images) if stage == "train" else self.evaluate(images, self.tta_fraction)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        # One value per image rather than `weight=len(labels)`: with nan_strategy "disable", torchmetrics
        # 1.9 drops the weight, and a short last batch would count as much as a full one.
        getattr(self, f"{stage}_loss").update(loss.detach().expand(len(labels)))
        getattr(self, f"{stage}_acc").update(logits.detach(), labels)
        return loss, logits

    def _log_epoch(self, stage: str) -> None:
        self.log(f"{stage}_loss", getattr(self, f"{stage}_loss"), prog_bar=stage != "train")
        self.log(f"{stage}_acc", getattr(self, f"{stage}_acc"), prog_bar=stage != "train")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities (N, num_classes) for a batch of (images, indices into the predict set)."""
        images, _ = batch
        return self.evaluate(images).softmax(dim=-1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves no RNG state: keep it, so a resumed run draws what the uninterrupted one would.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"]["torch"])
            if "cuda" in checkpoint["rng_state"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(checkpoint["rng_state"]["cuda"])

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # A learning rate that reaches 0, not `requires_grad_(False)`: DDP needs the same parameters to get
        # gradients every step (and lr 0 also stops momentum and weight decay from moving them). This runs before
        # the batch's optimizer step, so it overrides whatever the scheduler set after the previous step.
        progress = self.current_epoch + batch_idx / self.trainer.num_training_batches  # in epochs
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                if "freeze_after" not in group:
                    continue
                if self.freeze_schedule == "linear":
                    group["lr"] = group["initial_lr"] * max(0.0, 1 - progress / group["freeze_after"])
                elif progress >= group["freeze_after"]:  # step: the scheduler's rate until then
                    group["lr"] = 0.0

    def configure_optimizers(self):
        named = {name: p for name, p in self.named_parameters() if p.requires_grad or name in self.freeze_after}
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

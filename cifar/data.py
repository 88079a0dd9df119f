"""CIFAR10DataModule: read the images once into uint8 tensors in memory, split them by seed, serve whole batches.

Batches are (uint8 images (N, 3, 32, 32), int64 labels (N,)), gathered with one tensor index per
batch (`__getitems__`), never one PIL image per sample; training batches are augmented on the device
(`cifar/augment.py`) and the model normalizes them there. It exposes what it read and drew (`sources`, `split`);
whether a checkpoint may be evaluated on it is `cifar/run.py`'s decision.
"""

from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cifar import readers
from cifar.augment import BatchAugment
from cifar.errors import UserError
from cifar.resume import EpochShuffle, ResumableLoader, batch_generator, epoch_progress

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def count(size: int | float, total: int, name: str) -> int:
    """A size given as a count (int) or a fraction of `total` (float in [0, 1))."""
    n = round(size * total) if isinstance(size, float) else size
    if not (0 <= n < total) or (isinstance(size, float) and not 0 <= size < 1):
        raise UserError(f"--data.{name}={size} is out of range: give a count in [0, {total}) or a fraction in [0, 1)")
    return n


def split_indices(n: int, seed: int, val_size: int | float, test_size: int | float | None):
    """(train, val, test) indices of a pool of `n` images: one random order drawn with `seed`, test first;
    the generator comes back too, for draws that must follow the split (augment's mirrored half)."""
    generator = torch.Generator().manual_seed(seed)
    n_test = 0 if test_size is None else count(test_size, n, "test_size")
    n_val = count(val_size, n - n_test, "val_size")
    order = torch.randperm(n, generator=generator)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test], generator


class TensorBatches(Dataset):
    """Images and targets held as two tensors; a DataLoader fetches a whole batch with one index op."""

    def __init__(self, images: Tensor, targets: Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        # The index goes to the images' device first, without waiting: a CPU index into GPU tensors would be a
        # blocking copy at every batch.
        index = torch.tensor(indices).to(self.images.device, non_blocking=True)
        return self.images[index], self.targets[index]


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """collate_fn for TensorBatches: the batch is already stacked."""
    return batch


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 from the official python release or from image folders, held in memory as uint8.

    Args:
        data_dir: Folder holding `cifar-10-batches-py/` (official release) or `train/<class>/*` and
            `test/<class>/*` image folders (PNG or JPEG, classes in sorted order).
        batch_size: Images per batch, for every stage.
        val_size: Validation images held out of the training set: a count, or a fraction in [0, 1).
        test_size: Test images held out of the training set instead of using the data's test split
            (for data without one, like a train-only image folder): a count, a fraction, or null.
            With a checkpoint, `seed`, `val_size` and `test_size` are the checkpoint's, like all its config.
        num_workers: DataLoader worker processes; 0 is right for in-memory tensors.
        seed: Seed of the train/val/test split: the same seed gives the same split in every process.
        download: Download the official release into `data_dir` when no data is there.
        predict_dir: Folder of your own PNG/JPEG images (any size, resized to 32x32) for `predict`.
        skip_bad_images: Skip (and count) files in image folders that are not readable images, instead of
            stopping with an error that names the first one.
        flip: Horizontal flips of training batches: `random`, `alternating` (airbench) or `none` (cifar/augment.py).
        translate: Shift each training image by up to this many pixels in x and y (reflected border); 0: off.
        brightness: Shift each training image's pixels by one random amount in [-brightness, brightness], in
            standard deviations of the training pixels (per channel); 0: off.
        contrast: Scale each training image's deviation from the training pixels' mean by one random factor
            in [1 - contrast, 1 + contrast]; 0: off. With `brightness`, the jitter of hiverge's
            cifar10-speedrun (0.14 and 0.13 there): on normalized images, (x + shift) * factor.
        cutout: Set one random square of this side (pixels, wholly inside the image) of each training image to
            the training pixels' mean (airbench96: 12); 0: off.
        policy: An augmentation policy of torchvision (`transforms.v2`), after `translate`, each training image
            drawing its own ops: `randaugment` (Cubuk et al. 2020: `randaugment_ops` random ops of strength
            `randaugment_magnitude`), `trivialaugment` (TrivialAugmentWide, Muller & Hutter 2021: one random op
            of random strength), `autoaugment` (Cubuk et al. 2019, the CIFAR-10 policy); `none`: off. Image by
            image in Python: about 0.25-0.5 ms an image on a CPU core.
        randaugment_ops: Ops applied in turn to each image by `randaugment` (torchvision: 2).
        randaugment_magnitude: Strength of `randaugment`'s ops, 0 to 30 (torchvision: 9).
        erasing: Random erasing (Zhong et al. 2020), after `cutout`: the probability that a training image gets
            one random rectangle (2-33% of its area, height/width 0.3 to 3.3: torchvision's RandomErasing) set to
            `erasing_fill` (torchvision's usual p: 0.5, timm's: 0.25); 0: off.
        erasing_fill: What erased pixels become: `random`, each normal in normalized units (timm's "pixel" mode), or
            `mean`, the training pixels' mean (torchvision's 0 after normalizing).
        mixup_alpha: Mixup (Zhang et al. 2018): each training image blended with another of its batch, and their
            labels alike, by a share drawn from Beta(alpha, alpha) once a batch (timm: 0.8); 0: off.
        cutmix_alpha: Cutmix (Yun et al. 2019): a box of another image of the batch pasted into each, the labels
            mixed by the box's area, drawn from Beta(alpha, alpha) once a batch (timm: 1.0); 0: off. With both
            alphas on, each batch gets one of the two, at even odds. With either on, the loss takes soft targets
            and the train accuracy counts a prediction right when it is the target's dominant label.
        mix_prob: The probability that a batch is mixed, when `mixup_alpha` or `cutmix_alpha` is on (timm: 1.0).
        data_on_device: When training on a GPU (any accelerator), keep the decoded images there (CIFAR-10:
            180 MB of uint8), so batches are gathered and augmented there and never cross the bus (with
            `num_workers` 0 only: worker processes cannot index GPU memory).
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: PositiveInt = 32,
        val_size: NonNegativeInt | NonNegativeFloat = 5000,
        test_size: NonNegativeInt | NonNegativeFloat | None = None,
        num_workers: NonNegativeInt = 0,
        seed: int = 0,
        download: bool = True,
        predict_dir: str | None = None,
        skip_bad_images: bool = False,
        flip: Literal["none", "random", "alternating"] = "none",
        translate: NonNegativeInt = 0,
        brightness: NonNegativeFloat = 0.0,
        contrast: NonNegativeFloat = 0.0,
        cutout: NonNegativeInt = 0,
        policy: Literal["none", "randaugment", "trivialaugment", "autoaugment"] = "none",
        randaugment_ops: PositiveInt = 2,
        randaugment_magnitude: NonNegativeInt = 9,
        erasing: ClosedUnitInterval = 0.0,
        erasing_fill: Literal["random", "mean"] = "random",
        mixup_alpha: NonNegativeFloat = 0.0,
        cutmix_alpha: NonNegativeFloat = 0.0,
        mix_prob: ClosedUnitInterval = 1.0,
        data_on_device: bool = True,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size, self.num_workers = batch_size, num_workers
        # Plain numbers: jsonargparse's checked types are subclasses, which checkpoints read with
        # `weights_only=True` refuse (the split goes into every checkpoint).
        self.val_size, self.test_size = [x if x is None else int(x) if isinstance(x, int) else float(x)
                                         for x in (val_size, test_size)]  # fmt: skip
        self.seed = seed
        self.download, self.skip_bad_images, self.data_on_device = download, skip_bad_images, data_on_device
        self.predict_dir = Path(predict_dir) if predict_dir else None
        if randaugment_magnitude > 30:
            raise UserError(f"--data.randaugment_magnitude {randaugment_magnitude} is out of range: give 0 to 30")
        self.augment = BatchAugment(flip, translate, brightness, contrast, cutout, policy, randaugment_ops,
                                    randaugment_magnitude, erasing, erasing_fill, mixup_alpha, cutmix_alpha,
                                    mix_prob)  # fmt: skip
        self.predict_files: list[Path] = []
        self.predict_dataset: TensorBatches | None = None
        self.sources: dict[str, dict] = {}  # "train"/"test": readers.source() of each split read
        self.split: dict | None = None  # the split options and the counts they gave, once the training pool is read
        self.train_sampler: EpochShuffle | None = None  # its seed (the run's, or a resumed checkpoint's) seeds augmentation
        self.val_index = self.test_index = None  # into the training pool: what validate and test evaluate

    @property
    def format(self) -> str | None:
        return readers.detect_format(self.data_dir)

    @cached_property
    def classes(self) -> list[str]:
        """Class names, index = label: the official release's, or the training folder's class folders."""
        if self.format == "official":
            return readers.official_classes(self.data_dir)
        if self.format == "folder":
            return readers.folder_classes(self.data_dir / "train")
        if self.download:
            return CIFAR10_CLASSES  # what prepare_data will download
        raise UserError(readers.missing_data_message(self.data_dir))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare_data(self) -> None:
        """Download the official release when nothing is there (the only place that downloads)."""
        if self.format is None:
            if not self.download:
                raise UserError(readers.missing_data_message(self.data_dir))
            readers.download_official(self.data_dir)

    def setup(self, stage: str) -> None:
        """Read what `stage` needs, once (the CLI sets the data up before the trainer does), and move it to the
        device the trainer runs on."""
        if stage == "predict":
            if self.predict_dataset is None:
                self.predict_dataset = self._read_predict_dir()
            return
        if stage == "test" and self.test_size is None:  # the data's own test split: no need to read train
            if "test" not in self.sources:
                self.test_dataset = TensorBatches(*self._read(train=False))
                rank_zero_info(f"Data: {self.describe()}: {len(self.test_dataset)} test images")
        elif self.split is None:
            self._split()
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if self.data_on_device and device.type != "cpu" and self.num_workers == 0:  # workers cannot touch GPU memory
            for name in ("train_dataset", "val_dataset", "test_dataset"):
                if hasattr(self, name):
                    dataset = getattr(self, name)
                    setattr(self, name, TensorBatches(dataset.images.to(device), dataset.targets.to(device)))

    def describe(self) -> str:
        kind = "official CIFAR-10 release" if self.format == "official" else "image folders"
        return f"{kind} in {self.data_dir}, {self.num_classes} classes"

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        """A split's images and labels; its source (with fingerprint) goes to `self.sources`."""
        split = "train" if train else "test"
        files = None
        if self.format == "official":
            images, labels, _ = readers.read_official(self.data_dir, train)
        elif not (split_dir := self.data_dir / split).is_dir():
            raise UserError(f"{self.data_dir} has no test split ({split_dir} is missing): add test/<class>/ folders "
                            f"there, hold out part of the training images with --data.test_size 5000, or evaluate "
                            f"on the validation images with `validate`")  # fmt: skip
        else:
            files, labels = readers.list_folder(split_dir, self.classes, strict=not self.skip_bad_images)
            images, labels = readers.read_folder(split_dir, files, labels, self.skip_bad_images)
        # The count of images read, not of files listed: the split is drawn over what was read.
        self.sources[split] = readers.source(self.data_dir, split, files=files, images=len(images))
        return images, labels

    def _split(self) -> None:
        images, labels = self._read(train=True)
        # Seeded by `seed` alone: the same split in fit, and in test run later elsewhere.
        train, val, test, generator = split_indices(len(images), self.seed, self.val_size, self.test_size)
        self.val_index, self.test_index = val, test
        self.split = {"seed": self.seed, "val_size": self.val_size, "test_size": self.test_size,
                      "train": len(train), "val": len(val), "test": len(test)}  # fmt: skip
        self.train_dataset = TensorBatches(images[train], labels[train])
        self.augment.prepare(self.train_dataset.images, generator)
        self.val_dataset = TensorBatches(images[val], labels[val])
        self.test_dataset = TensorBatches(images[test], labels[test])  # used only when test_size is set
        held_out = f", {len(test)} test (held out)" if self.test_size is not None else ""
        rank_zero_info(f"Data: {self.describe()}: {len(train)} train, {len(val)} val{held_out} (split seed {self.seed})")

    def _read_predict_dir(self) -> TensorBatches:
        if self.predict_dir is None:
            raise UserError("predict needs your images: pass --data.predict_dir DIR (a folder of PNG/JPEG files)")
        if not self.predict_dir.is_dir():
            raise UserError(f"--data.predict_dir {self.predict_dir} is not a folder")
        files = readers.image_files(self.predict_dir, strict=False)
        if not files:
            raise UserError(f"no PNG or JPEG images in {self.predict_dir}")
        images, kept = readers.read_images(files, skip_bad=self.skip_bad_images)
        self.predict_files = [files[i] for i in kept]
        return TensorBatches(images, torch.arange(len(images)))

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Augment training batches where they now are (the model's device), whole batches at a time; with mixup or
        cutmix, the labels become soft targets (N, classes)."""
        if not (self.trainer and self.trainer.training):
            return batch
        images, labels = batch
        self.augment.to(images.device)  # once: a no-op when its statistics are already there
        epoch = self.trainer.current_epoch
        place = epoch_progress(self.trainer).ready  # this batch's place in the epoch: ready only after this hook
        seed = self.train_sampler.seed if self.train_sampler else torch.initial_seed()
        generator = batch_generator(images.device, seed, self.trainer.global_rank, epoch, place)
        return self.augment.mix(self.augment(images, epoch, generator), labels, self.num_classes, generator)

    def _loader(self, dataset: TensorBatches, sampler: Sampler | None = None, loader=DataLoader) -> DataLoader:
        return loader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                      collate_fn=keep_batch, persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        # Seeded by the run's seed (seed_everything), not the split seed: new runs, new orders. Rank 0's seed,
        # since ranks started by torchrun or srun each draw their own when none is configured. A resumed run
        # then takes the checkpoint's (ResumableLoader.load_state_dict).
        seed, world, rank = torch.initial_seed(), 1, 0
        if self.trainer is not None:
            seed = self.trainer.strategy.broadcast(seed)
            world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = self.train_sampler = EpochShuffle(len(self.train_dataset), seed, num_replicas=world, rank=rank)
        loader = self._loader(self.train_dataset, sampler, loader=ResumableLoader)
        loader.trainer = self.trainer
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset)

"""CIFAR10DataModule: decode once into uint8 tensors in memory, split by seed, serve whole batches.

Batches are (uint8 images (N, 3, 32, 32), int64 labels (N,)), gathered with one tensor index per
batch (`__getitems__`), never one PIL image per sample; the model normalizes them on its device.
"""

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cifar import datasets, provenance
from cifar.errors import UserError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class TensorBatches(Dataset):
    """Images and targets held as two tensors; a DataLoader fetches a whole batch with one index op."""

    def __init__(self, images: Tensor, targets: Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.tensor(indices)
        return self.images[index], self.targets[index]


class EpochShuffle(DistributedSampler):
    """A new random order every epoch that depends only on the run's seed and the epoch number; under DDP,
    this rank's shard of it.

    Lightning calls `set_epoch` at the start of each epoch, so a run resumed from a checkpoint sees
    exactly the order the uninterrupted run would have seen (a stock RandomSampler draws from the
    global RNG, whose state a checkpoint does not hold). `skip` resumes one epoch part-way through.

    With `num_replicas` ranks, rank r takes every num_replicas-th index of the epoch's order from r on,
    after padding the order with its own start (as DistributedSampler does) so all ranks have the same
    number of batches. It is a DistributedSampler so that Lightning keeps it (and the loader around it)
    as it is, rather than wrapping it in a DistributedSamplerWrapper that would not pass `set_epoch` on.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size = size
        self.skip: tuple[int, int] | None = None  # (epoch, samples of this rank's shard already trained on)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order = (order * self.num_replicas)[: self.total_size]  # padded to a multiple of num_replicas
        shard = order[self.rank :: self.num_replicas]
        start = self.skip[1] if self.skip and self.skip[0] == self.epoch else 0
        self.skip = None
        return iter(shard[start:])


class ResumableLoader(DataLoader):
    """A DataLoader whose place in the epoch goes into checkpoints, so a run stopped mid-epoch (SIGTERM,
    Ctrl-C) resumes with the next batch, not with a fresh pass. Lightning saves and restores the state of
    any loader that has `state_dict`/`load_state_dict`.

    The place is Lightning's own count of completed batches (`trained_batches`, set by the data module):
    the loader's count of batches handed out runs ahead of it, since Lightning fetches one batch early.
    Under DDP the ranks step in lockstep, so the count rank 0 saves is every rank's place in its own shard
    (resuming mid-epoch needs the same number of ranks; at an epoch's end any number will do).

    The sampler's seed goes in too: a run resumed without the same `--seed_everything` keeps the saved
    run's epoch orders.
    """

    trained_batches: Callable[[], int] = staticmethod(lambda: 0)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "samples": self.trained_batches() * self.batch_size,
                "seed": self.sampler.seed}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.sampler.skip = (state["epoch"], state["samples"])
        self.sampler.seed = state.get("seed", self.sampler.seed)  # older checkpoints have none: this run's


def reflect(index: Tensor, size: int) -> Tensor:
    """Indices past either edge mirrored back inside (edge not repeated), as `F.pad(mode="reflect")`."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def translate(images: Tensor, max_shift: int) -> Tensor:
    """Each image shifted by its own random (dy, dx) in [-max_shift, max_shift]^2 pixels, the border filled
    by reflection: one gather for the whole batch, any dtype (uint8 here), on the images' device."""
    n, _, h, w = images.shape
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2, n, 1), device=images.device)
    rows = reflect(torch.arange(h, device=images.device) + dy, h)  # (n, h)
    cols = reflect(torch.arange(w, device=images.device) + dx, w)  # (n, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (n, h, w, c) -> (n, c, h, w)


def jitter(images: Tensor, mean: Tensor, std: Tensor, brightness: float, contrast: float) -> Tensor:
    """Brightness and contrast jitter, one random draw per image: in normalized units z = (x - mean) / std,
    z -> (z + u * brightness) * (1 + v * contrast) with u, v uniform in [-1, 1]. Float pixels in, float out."""
    n = len(images)
    shift = (torch.rand(n, 1, 1, 1, device=images.device) * 2 - 1) * brightness
    factor = (torch.rand(n, 1, 1, 1, device=images.device) * 2 - 1) * contrast + 1
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    return (images.float() - mean + shift * std) * factor + mean  # the same, back in pixels


def channel_statistics(images: Tensor, chunk: int = 5000) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), in pixel units, in float64
    chunks (no float copy of the whole set)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in images.split(chunk):
        part = part.transpose(0, 1).reshape(images.shape[1], -1).double()
        total += part.sum(1)
        squares += part.square().sum(1)
    count = images.numel() / images.shape[1]
    mean = total / count
    return mean.float(), (squares / count - mean.square()).sqrt().float()


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
            With a checkpoint (validate, test, resumed fit), `seed`, `val_size` and `test_size` are the
            checkpoint's, for the data it trained on, unless set on the command line (cifar/provenance.py).
        num_workers: DataLoader worker processes; 0 is right for in-memory tensors.
        seed: Seed of the train/val/test split: the same seed gives the same split in every process.
        download: Download the official release into `data_dir` when no data is there.
        predict_dir: Folder of your own PNG/JPEG images (any size, resized to 32x32) for `predict`.
        skip_bad_images: Skip (and count) files in image folders that are not readable images, instead of
            stopping with an error that names the first one.
        flip: Horizontal flips of training batches on the device: `random` flips each image with probability
            1/2; `alternating` flips a half once (drawn with `seed`, so the same in every process and on
            resume), then every image in every odd epoch, so each image is seen both ways in two epochs
            (airbench); `none`.
        translate: Shift each training image by up to this many pixels in x and y (reflected border), on the
            device; 0: off.
        brightness: Shift each training image's pixels by one random amount in [-brightness, brightness], in
            standard deviations of the training pixels (per channel), on the device; 0: off.
        contrast: Scale each training image's deviation from the training pixels' mean by one random factor
            in [1 - contrast, 1 + contrast], on the device; 0: off. With `brightness`, the jitter of hiverge's
            cifar10-speedrun (0.14 and 0.13 there): on normalized images, (x + shift) * factor.
        data_on_device: When training on a GPU (any accelerator), keep the decoded images there (CIFAR-10:
            180 MB of uint8), so batches are gathered and augmented there and never cross the bus (with
            `num_workers` 0 only: worker processes cannot index GPU memory).
        allow_overlap: Evaluate a checkpoint even on images it trained on (a split other than its own);
            the results are then marked "overlaps training data". Without it, that is an error.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 32,
        val_size: int | float = 5000,
        test_size: int | float | None = None,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = True,
        predict_dir: str | None = None,
        skip_bad_images: bool = False,
        flip: Literal["none", "random", "alternating"] = "none",
        translate: int = 0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        data_on_device: bool = True,
        allow_overlap: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.val_size, self.test_size = val_size, test_size
        self.num_workers = num_workers
        self.seed = seed
        self.download = download
        self.predict_dir = Path(predict_dir) if predict_dir else None
        self.skip_bad_images = skip_bad_images
        self.flip, self.translate, self.data_on_device = flip, translate, data_on_device
        self.brightness, self.contrast = brightness, contrast
        self.allow_overlap = allow_overlap
        self.predict_files: list[Path] = []
        self.listed: dict[str, tuple[list[Path], list[int]]] = {}  # "train"/"test": image folder files, labels
        self.sources: dict[str, dict] = {}  # "train"/"test": datasets.source() of each split read
        self.loaded_record: list[dict] | None = None  # the training record of the checkpoint restored
        self.evaluation: dict | None = None  # what validate/test evaluated, checked against the checkpoint

    @property
    def format(self) -> str | None:
        return datasets.detect_format(self.data_dir)

    @cached_property
    def classes(self) -> list[str]:
        """Class names, index = label. Read at start-up so that `num_classes` can configure the model; for image
        folders the training files are listed then too, so a stray file stops the command before a run is made."""
        if self.format == "official":
            return datasets.official_classes(self.data_dir)
        if self.format == "folder":
            classes = datasets.folder_classes(self.data_dir / "train")
            self.listed["train"] = datasets.list_folder(self.data_dir / "train", classes, strict=not self.skip_bad_images)
            return classes
        if self.download:
            return CIFAR10_CLASSES  # what prepare_data will download
        raise UserError(datasets.missing_data_message(self.data_dir))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare_data(self) -> None:
        """Download the official release when nothing is there (the only place that downloads)."""
        if self.format is None:
            if not self.download:
                raise UserError(datasets.missing_data_message(self.data_dir))
            datasets.download_official(self.data_dir)

    def setup(self, stage: str) -> None:
        self.loaded_record = self.evaluation = None  # each trainer call restores and checks its own checkpoint
        if stage == "predict":
            self.predict_dataset = self._read_predict_dir()
            return
        if stage == "test" and self.test_size is None:  # the data's own test split: no need to read train
            self.test_dataset = TensorBatches(*self._read_split(train=False))
            self.test_index = torch.arange(len(self.test_dataset))
            rank_zero_info(f"Data: {self.describe()}: {len(self.test_dataset)} test images")
        elif not hasattr(self, "train_dataset"):
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

    def _read_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """A split's images and labels; its source (with fingerprint) goes to `self.sources`."""
        split = "train" if train else "test"
        if self.format == "official":
            images, labels, _ = datasets.read_official(self.data_dir, train)
            self.sources[split] = datasets.source(self.data_dir, split, images=len(images))
            return images, labels
        split_dir = self.data_dir / split
        if not split_dir.is_dir():
            raise UserError(f"{self.data_dir} has no test split ({split_dir} is missing): add test/<class>/ "
                            f"folders there, or hold out part of the training images with --data.test_size 5000")
        classes = self.classes  # lists train/ when first read
        if split not in self.listed:
            self.listed[split] = datasets.list_folder(split_dir, classes, strict=not self.skip_bad_images)
        files, labels = self.listed[split]
        self.sources[split] = datasets.source(self.data_dir, split, files=files)
        return datasets.read_folder(split_dir, files, labels, self.skip_bad_images)

    def _split(self) -> None:
        images, labels = self._read_split(train=True)
        # A fixed generator: the same seed gives the same split in fit, and in test run later elsewhere.
        generator = torch.Generator().manual_seed(self.seed)
        train, val, test = provenance.split_indices(len(images), generator, self.val_size, self.test_size)
        self.val_index, self.test_index = val, test  # into the training pool: what validate and test evaluate
        self.split = {"seed": self.seed, "val_size": self.val_size, "test_size": self.test_size,
                      "train": len(train), "val": len(val), "test": len(test)}  # fmt: skip
        self.held_out = torch.cat([val, test]).sort().values.int()  # never trained on
        self.train_dataset = TensorBatches(images[train], labels[train])
        if self.brightness or self.contrast:  # the jitter's units: the training pixels' mean and std per channel
            self.pixel_mean, self.pixel_std = channel_statistics(self.train_dataset.images)
        if self.flip == "alternating":  # a random half starts mirrored; on_after_batch_transfer flips odd epochs
            # Drawn next from the split's generator, not the run's seed: every DDP rank, and a resumed run
            # whatever its --seed_everything, mirrors the same half.
            mirrored = torch.rand(len(train), generator=generator) < 0.5
            self.train_dataset.images[mirrored] = self.train_dataset.images[mirrored].flip(-1)
        self.val_dataset = TensorBatches(images[val], labels[val])
        self.test_dataset = TensorBatches(images[test], labels[test])  # used only when test_size is set
        held_out = f", {len(test)} test (held out)" if self.test_size is not None else ""
        rank_zero_info(f"Data: {self.describe()}: {len(train)} train, {len(val)} val{held_out} (split seed {self.seed})")

    def state_dict(self) -> dict:
        """What fit trained on, for every checkpoint (cifar/provenance.py): the restored checkpoint's record, and
        this fit's split if it differs."""
        if not hasattr(self, "split"):  # no training pool was read (not fit)
            return {}
        entry = {"source": self.sources["train"], "split": self.split, "held_out": self.held_out}
        record = list(self.loaded_record or [])
        last = record[-1] if record else None
        same_data = last and last["source"]["fingerprint"] == entry["source"]["fingerprint"]
        if not (same_data and torch.equal(last["held_out"], entry["held_out"])):  # a resumed fit on another split
            record.append(entry)
        return {"trained_on": record}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint is being restored (fit, validate, test): check what this command evaluates against it."""
        self.loaded_record = state.get("trained_on")
        self.check_evaluation()

    def check_evaluation(self) -> None:
        """Once per command with a checkpoint: the images it evaluates against what the checkpoint trained on
        (rules 2-4 of cifar/provenance.py), said in one line, kept in `self.evaluation`."""
        ckpt_path = self.trainer.ckpt_path if self.trainer else None
        if self.evaluation is not None or not ckpt_path or self.trainer.state.fn == "predict":
            return
        if self.trainer.state.fn == "test" and self.test_size is None:
            source, index, split = self.sources["test"], self.test_index, None
        else:  # fit's and validate's validation images; test's held-out test images
            index = self.test_index if self.trainer.state.fn == "test" else self.val_index
            source, split = self.sources["train"], {k: self.split[k] for k in provenance.SPLIT_OPTIONS}
        what = "test" if self.trainer.state.fn == "test" else "validation"
        self.evaluation = provenance.check(source, index, what, split, self.loaded_record, ckpt_path, self.allow_overlap)
        rank_zero_info(f"Evaluating {self.evaluation['data']}: {self.evaluation['note']}")

    def teardown(self, stage: str) -> None:
        if self.evaluation and self.evaluation["overlap"]:  # after Lightning's table of results
            rank_zero_info(f"The results above: {self.evaluation['note']}")

    def _read_predict_dir(self) -> TensorBatches:
        if self.predict_dir is None:
            raise UserError("predict needs your images: pass --data.predict_dir DIR (a folder of PNG/JPEG files)")
        if not self.predict_dir.is_dir():
            raise UserError(f"--data.predict_dir {self.predict_dir} is not a folder")
        self.predict_files = datasets.image_files(self.predict_dir, strict=False)
        if not self.predict_files:
            raise UserError(f"no PNG or JPEG images in {self.predict_dir}")
        images, skipped = datasets.read_images(self.predict_files, skip_bad=self.skip_bad_images)
        if skipped:
            print(f"skipped {len(skipped)} unreadable image(s) in {self.predict_dir}, e.g. {skipped[0]}")
            bad = set(skipped)
            self.predict_files = [p for p in self.predict_files if p not in bad]
        return TensorBatches(images, torch.arange(len(images)))

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Augment training batches where they now are (the model's device), whole batches at a time."""
        if not (self.trainer and self.trainer.training):
            return batch
        images, labels = batch
        if self.flip == "random":
            mirrored = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
        elif self.flip == "alternating" and self.trainer.current_epoch % 2 == 1:
            images = images.flip(-1)
        if self.translate:
            images = translate(images, self.translate)
        if self.brightness or self.contrast:  # float pixels from here on: the model normalizes them as it does uint8
            if self.pixel_mean.device != images.device:  # once, not a host-to-device copy every step
                self.pixel_mean, self.pixel_std = self.pixel_mean.to(images.device), self.pixel_std.to(images.device)
            images = jitter(images, self.pixel_mean, self.pixel_std, self.brightness, self.contrast)
        return images, labels

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
        sampler = EpochShuffle(len(self.train_dataset), seed, num_replicas=world, rank=rank)
        loader = self._loader(self.train_dataset, sampler, loader=ResumableLoader)
        loader.trained_batches = lambda: self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return loader

    def val_dataloader(self) -> DataLoader:
        self.check_evaluation()  # a checkpoint with no record: load_state_dict was not called
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        self.check_evaluation()
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset)

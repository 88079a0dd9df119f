"""Readers: each turns one on-disk format into uint8 tensors, once, with errors that name the file.

Formats under `data_dir`:
- the official CIFAR-10 python release, `cifar-10-batches-py/` (what torchvision downloads), every
  file checked against the official MD5 before it is unpickled;
- an image-folder tree, `train/<class>/*.png|jpg` and optionally `test/<class>/*`, classes in sorted order.
"""

import hashlib
import os
import pickle
import socket
from pathlib import Path
from urllib.error import URLError

import torch
from torch import Tensor
from torchvision.datasets import CIFAR10
from torchvision.datasets.folder import find_classes
from torchvision.datasets.utils import check_integrity
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import resize

from cifar.errors import UserError, first_line

IMAGE_SIZE = 32  # pixels; every image is resized to IMAGE_SIZE x IMAGE_SIZE if it is not already
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
OFFICIAL_DIR = CIFAR10.base_folder  # "cifar-10-batches-py"
DOWNLOAD_TIMEOUT = 30  # seconds without a byte before a download gives up


def detect_format(data_dir: Path) -> str | None:
    """'official', 'folder', or None when `data_dir` holds neither."""
    if (data_dir / OFFICIAL_DIR).is_dir():
        return "official"
    if (data_dir / "train").is_dir():
        return "folder"
    return None


def missing_data_message(data_dir: Path) -> str:
    return (
        f"no CIFAR-10 data in {data_dir.resolve()}: looked for {OFFICIAL_DIR}/ (the official python release) "
        f"and train/<class>/ (image folders). Put one of them there, point --data.data_dir at it, "
        f"or set --data.download true on a machine that can reach {CIFAR10.url}"
    )


def download_official(data_dir: Path) -> None:
    """Download and extract the official release with torchvision, which checks the archive's MD5."""
    archive = data_dir / CIFAR10.filename
    corrupt = archive.exists() and not check_integrity(str(archive), CIFAR10.tgz_md5)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # torchvision's urlopen has none: never hang
    try:
        CIFAR10(str(data_dir), train=True, download=True)
    except (URLError, OSError) as error:
        why = f"{archive} fails its MD5 checksum and downloading a fresh copy failed" if corrupt else "downloading CIFAR-10 failed"
        raise UserError(f"{why} ({error}); {missing_data_message(data_dir)}") from error
    except RuntimeError as error:  # torchvision: the downloaded archive failed its checksum
        raise UserError(f"the downloaded CIFAR-10 archive {archive} fails its MD5 checksum ({error}); "
                        f"delete it and try again") from error  # fmt: skip
    finally:
        socket.setdefaulttimeout(previous_timeout)


def verify_official(data_dir: Path, train: bool) -> None:
    """Check each file of the official release against the official MD5 before anything unpickles it."""
    files = (CIFAR10.train_list if train else CIFAR10.test_list) + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    for name, md5 in files:
        path = data_dir / OFFICIAL_DIR / name
        if not path.is_file():
            raise UserError(f"{path} is missing from the official CIFAR-10 release; restore it or delete "
                            f"{path.parent} and download again (--data.download true)")  # fmt: skip
        if not check_integrity(str(path), md5):
            raise UserError(f"{path} fails its MD5 checksum against the official CIFAR-10 release (corrupt or "
                            f"modified); delete {path.parent} and download again (--data.download true)")  # fmt: skip


def source(data_dir: Path, split: str, images: int, files: list[Path] | None = None) -> dict:
    """Where a split's images come from, as a checkpoint records it (plain types): format, split, path, the number of
    images read and a fingerprint.

    The fingerprint is cheap and independent of where the data lives: for image folders (`files`: the split's
    listing) a SHA-256 of the file paths relative to the split's folder, with their sizes; for the official release,
    of the official MD5s of the split's batches (checked before they were read). Two copies of the same data have the
    same fingerprint; a folder with one file more or less does not.
    """
    official = files is None
    path = data_dir / (OFFICIAL_DIR if official else split)
    if official:
        lines = [f"{name}\t{md5}\n" for name, md5 in (CIFAR10.train_list if split == "train" else CIFAR10.test_list)]
    else:
        lines = [f"{file.relative_to(path).as_posix()}\t{os.stat(file).st_size}\n" for file in files]
    digest = hashlib.sha256("".join(lines).encode())
    return {"format": "official" if official else "folder", "split": split, "path": str(path.resolve()),
            "images": images, "fingerprint": digest.hexdigest()[:16]}  # fmt: skip


def describe_source(source: dict) -> str:
    """'image folders in /data/train (50000 images, fingerprint 51a0c7f568ef28c5)'."""
    kind = f"official CIFAR-10 {source['split']} batches" if source["format"] == "official" else "image folders"
    return f"{kind} in {source['path']} ({source['images']} images, fingerprint {source['fingerprint']})"


def read_official(data_dir: Path, train: bool) -> tuple[Tensor, Tensor, list[str]]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,), class names) of one split of the official release."""
    verify_official(data_dir, train)
    dataset = CIFAR10(str(data_dir), train=train, download=False)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.long), list(dataset.classes)


def official_classes(data_dir: Path) -> list[str]:
    """Class names from `batches.meta` (checksummed first: it is a pickle)."""
    meta = data_dir / OFFICIAL_DIR / CIFAR10.meta["filename"]
    if not check_integrity(str(meta), CIFAR10.meta["md5"]):
        raise UserError(f"{meta} is missing or fails its MD5 checksum; delete {meta.parent} and download again")
    with open(meta, "rb") as f:
        return list(pickle.load(f, encoding="latin1")[CIFAR10.meta["key"]])


def folder_classes(split_dir: Path) -> list[str]:
    try:
        classes, _ = find_classes(str(split_dir))
    except FileNotFoundError as error:
        raise UserError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image>.png|jpg") from error
    return classes


def list_folder(split_dir: Path, classes: list[str], strict: bool = True) -> tuple[list[Path], list[int]]:
    """The image files of an image-folder split, whose class folders must match `classes`, and their labels.

    Only lists (no decoding): a file that is not PNG/JPEG is an error naming it when `strict`, else skipped.
    """
    found = folder_classes(split_dir)
    if found != classes:
        raise UserError(f"class folders of {split_dir} ({', '.join(found)}) differ from the training "
                        f"classes ({', '.join(classes)})")  # fmt: skip
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = image_files(split_dir / name, strict=strict)
        paths += files
        labels += [label] * len(files)
    return paths, labels


def read_folder(split_dir: Path, paths: list[Path], labels: list[int], skip_bad: bool = False) -> tuple[Tensor, Tensor]:
    """(images, labels) of the listed files of an image-folder split (`list_folder`); see `read_images`."""
    images, kept = read_images(paths, skip_bad)
    if not kept:
        raise UserError(f"no readable images in the class folders of {split_dir}")
    return images, torch.tensor(labels, dtype=torch.long)[kept]


def image_files(folder: Path, strict: bool) -> list[Path]:
    """Sorted image files of a folder (recursively); hidden files are ignored, others are an error when `strict`
    and skipped with a note otherwise."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others and strict:
        raise UserError(f"{others[0]} is not a PNG or JPEG image ({len(others)} such file(s) in {folder}); "
                        f"move non-image files out of the data folders, or pass --data.skip_bad_images true")  # fmt: skip
    if others:
        print(f"skipping {len(others)} non-image file(s) in {folder}, e.g. {others[0].name}")
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def read_images(paths: list[Path], skip_bad: bool = False) -> tuple[Tensor, list[int]]:
    """Decode image files to one uint8 tensor (N, 3, IMAGE_SIZE, IMAGE_SIZE), resizing where needed, and the indices
    into `paths` of the files read. A file that does not decode is an error naming it, or with `skip_bad` skipped
    and counted."""
    images = torch.empty(len(paths), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    kept, skipped = [], []
    for i, path in enumerate(paths):
        try:
            images[len(kept)] = decode(read_file(str(path)))
        except RuntimeError as error:
            if not skip_bad:
                raise UserError(f"cannot decode {path} as an image ({first_line(error)}); "
                                f"replace or remove it, or pass --data.skip_bad_images true") from error  # fmt: skip
            skipped.append(path)
            continue
        kept.append(i)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) in {skipped[0].parent}, e.g. {skipped[0]}")
    return images[: len(kept)], kept


def decode(data: Tensor) -> Tensor:
    """An encoded PNG/JPEG (uint8 bytes, 1-D) as a uint8 RGB image (3, IMAGE_SIZE, IMAGE_SIZE), resized if needed:
    what `predict` and `serve` give the model. RuntimeError when it is not a whole PNG/JPEG image."""
    image = decode_image(data, mode=ImageReadMode.RGB)
    if image.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        image = resize(image, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
    return image

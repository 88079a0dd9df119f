"""CIFAR10DataModule on generated data: both formats, the seeded split, and the real download code."""

import hashlib
import http.server
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, OFFICIAL_CLASSES, cli_env, make_official_data
from PIL import Image
from torchvision.datasets import CIFAR10

from cifar.data import CIFAR10DataModule, keep_batch
from cifar.resume import EpochShuffle, ResumableLoader
from cifar.errors import UserError


def test_official_format_matches_the_pickled_batches(official_data):
    data_dir, _ = official_data
    dm = CIFAR10DataModule(str(data_dir), val_size=0)
    assert dm.classes == OFFICIAL_CLASSES and dm.num_classes == 4
    dm.setup("fit")
    with open(data_dir / CIFAR10.base_folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    first = torch.from_numpy(batch["data"][0].reshape(3, 32, 32))
    images, labels = dm.train_dataset.images, dm.train_dataset.targets
    assert images.dtype == torch.uint8 and images.shape == (60, 3, 32, 32)
    matches = [(torch.equal(img, first) and lab == batch["labels"][0]) for img, lab in zip(images, labels)]
    assert any(matches)  # CHW layout and label kept through the split
    dm.setup("test")
    assert len(dm.test_dataset) == 12


def test_image_folder_reads_png_and_jpeg_and_resizes_other_sizes(folder_data):
    Image.new("RGB", (64, 48), (255, 0, 0)).save(folder_data / "train" / "cat" / "big.png")
    dm = CIFAR10DataModule(str(folder_data), val_size=0)
    assert dm.classes == CLASSES
    dm.setup("fit")
    assert dm.train_dataset.images.shape == (3 * 16 + 1, 3, 32, 32)
    red = dm.train_dataset.images[(dm.train_dataset.images[:, 0] == 255).flatten(1).all(1)]
    assert len(red) == 1 and (red[0, 1:] == 0).all()  # the 64x48 red image, now 32x32


def test_batches_are_whole_uint8_tensors(folder_data):
    dm = CIFAR10DataModule(str(folder_data), batch_size=8, val_size=12)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_split_sizes_counts_fractions_and_held_out_test(folder_data):
    dm = CIFAR10DataModule(str(folder_data), val_size=0.25, test_size=6)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (32, 10, 6)  # 0.25 of the 42 left after the test
    rows = lambda ds: {tuple(x.flatten()[:64].tolist()) for x in ds.images}  # noqa: E731
    assert not rows(dm.train_dataset) & rows(dm.val_dataset) and not rows(dm.val_dataset) & rows(dm.test_dataset)


def test_alternating_flips_mirror_a_half_chosen_by_the_split_seed_alone(folder_data):
    """The half that starts mirrored follows data.seed, not torch's global seed (seed_everything): every DDP
    rank and a resumed run mirror the same images."""

    def mirrored(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        flipped = CIFAR10DataModule(str(folder_data), val_size=12, seed=seed, flip="alternating")
        plain = CIFAR10DataModule(str(folder_data), val_size=12, seed=seed)
        flipped.setup("fit")
        plain.setup("fit")
        images, originals = flipped.train_dataset.images, plain.train_dataset.images
        same = (images == originals).flatten(1).all(1)
        assert (same | (images == originals.flip(-1)).flatten(1).all(1)).all()  # the same split, some mirrored
        return ~same

    mask = mirrored(seed=0, global_seed=1)
    assert 0 < mask.sum() < len(mask)
    assert torch.equal(mirrored(seed=0, global_seed=2), mask)
    assert not torch.equal(mirrored(seed=1, global_seed=1), mask)


def test_the_training_orders_seed_goes_into_the_loaders_state(folder_data):
    """A loader built with another seed (a run resumed with another --seed_everything) takes the saved one's
    seed from its state, and so its orders."""
    dm = CIFAR10DataModule(str(folder_data), val_size=12)
    dm.setup("fit")

    def loader(seed: int, epoch: int = 2) -> ResumableLoader:
        sampler = EpochShuffle(len(dm.train_dataset), seed)
        loader = ResumableLoader(dm.train_dataset, batch_size=8, sampler=sampler, collate_fn=keep_batch)
        loader.sampler.set_epoch(epoch)
        return loader

    images = lambda loader: torch.cat([batch for batch, _ in loader])  # noqa: E731
    saved = loader(seed=1)
    state = saved.state_dict()
    assert state == {"epoch": 2, "samples": 0, "seed": 1}
    resumed = loader(seed=2)
    resumed.load_state_dict(state)
    assert torch.equal(images(resumed), images(saved))
    resumed.sampler.set_epoch(3)
    assert torch.equal(images(resumed), images(loader(seed=1, epoch=3)))  # every later epoch too


def split_digest(data_dir: str, seed: int) -> str:
    """A digest of the validation and test images and labels that the split with this seed holds out."""
    dm = CIFAR10DataModule(data_dir, val_size=10, test_size=5, seed=seed)
    dm.setup("fit")
    digest = hashlib.sha256()
    for ds in (dm.val_dataset, dm.test_dataset):
        digest.update(ds.images.numpy().tobytes())
        digest.update(ds.targets.numpy().tobytes())
    return digest.hexdigest()


def test_split_is_the_same_in_every_process_for_the_same_seed(folder_data):
    """The split in a new process with another string hash seed (PYTHONHASHSEED) is this process's."""
    here = os.environ.get("PYTHONHASHSEED")  # unset or "random": this process's hash seed is random
    other = "2" if here == "1" else "1"
    script = f"from test_data import split_digest; print(split_digest({str(folder_data)!r}, 7))"
    env = {"PYTHONPATH": cli_env()["PYTHONPATH"], "PYTHONHASHSEED": other, "PATH": ""}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == split_digest(str(folder_data), 7)
    assert split_digest(str(folder_data), 7) != split_digest(str(folder_data), 8)


@pytest.fixture
def cifar_server(tmp_path: Path, monkeypatch):
    """A local HTTP server standing in for the CIFAR-10 host; yields the folder it serves."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.server_address[1]}/{CIFAR10.filename}")
    yield served
    server.shutdown()


def serve_archive(served: Path, tmp_path: Path, monkeypatch) -> None:
    """Pack a generated official release the way the real archive is packed, and patch its checksums."""
    source = tmp_path / "source"
    table = make_official_data(source)
    with tarfile.open(served / CIFAR10.filename, "w:gz") as tar:
        tar.add(source / CIFAR10.base_folder, arcname=CIFAR10.base_folder)
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5((served / CIFAR10.filename).read_bytes()).hexdigest())
    monkeypatch.setattr(CIFAR10, "train_list", table["train_list"])
    monkeypatch.setattr(CIFAR10, "test_list", table["test_list"])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": table["meta_md5"]})


def test_download_fetches_checks_and_extracts_the_release(cifar_server, tmp_path, monkeypatch):
    serve_archive(cifar_server, tmp_path, monkeypatch)
    dm = CIFAR10DataModule(str(tmp_path / "data"), val_size=10, download=True)
    assert dm.num_classes == 10  # before download: the official class list
    dm.prepare_data()
    assert dm.format == "official"
    dm.setup("fit")
    assert len(dm.train_dataset) == 50 and len(dm.val_dataset) == 10


def test_download_of_a_corrupt_archive_fails_clearly(cifar_server, tmp_path, monkeypatch):
    serve_archive(cifar_server, tmp_path, monkeypatch)
    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)  # what arrives is not what was published
    dm = CIFAR10DataModule(str(tmp_path / "data"), download=True)
    with pytest.raises(UserError, match="downloaded CIFAR-10 archive .* fails its MD5 checksum"):
        dm.prepare_data()
    assert dm.format is None  # nothing extracted that could later pass as data


def test_predict_dir_skips_non_images_and_keeps_file_order(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(mine / "b.jpg")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(mine / "sub" / "a.png")
    (mine / "notes.md").write_text("x")
    dm = CIFAR10DataModule(str(tmp_path / "unused"), download=True, predict_dir=str(mine))
    dm.setup("predict")
    assert [p.relative_to(mine).as_posix() for p in dm.predict_files] == ["b.jpg", "sub/a.png"]
    assert dm.predict_dataset.images.shape == (2, 3, 32, 32)


def test_skip_bad_images_skips_and_counts(folder_data, capsys):
    (folder_data / "train" / "cat" / "notes.txt").write_text("x")
    (folder_data / "train" / "dog" / "0001.png").write_bytes(b"not a png")
    dm = CIFAR10DataModule(str(folder_data), val_size=0, skip_bad_images=True)
    dm.setup("fit")
    out = capsys.readouterr().out
    assert "skipping 1 non-image file(s)" in out and "skipped 1 unreadable image(s)" in out
    assert len(dm.train_dataset) == 3 * 16 - 1
    assert dm.train_dataset.targets.tolist().count(2) == 15  # the dog that could not be read is gone


def test_an_interrupted_download_is_not_taken_for_data_and_is_fetched_again(cifar_server, tmp_path, monkeypatch):
    serve_archive(cifar_server, tmp_path, monkeypatch)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    whole = (cifar_server / CIFAR10.filename).read_bytes()
    (data_dir / CIFAR10.filename).write_bytes(whole[: len(whole) // 2])  # what a dropped connection leaves
    dm = CIFAR10DataModule(str(data_dir), val_size=10, download=True)
    dm.prepare_data()
    assert (data_dir / CIFAR10.filename).read_bytes() == whole
    dm.setup("fit")
    assert len(dm.train_dataset) == 50


def test_predict_dir_with_a_broken_image_fails_or_skips_it_keeping_files_and_images_aligned(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(mine / "a.png")
    (mine / "b.png").write_bytes(b"broken")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(mine / "c.png")
    with pytest.raises(UserError, match="cannot decode .*b.png"):
        CIFAR10DataModule(str(tmp_path), download=True, predict_dir=str(mine)).setup("predict")
    dm = CIFAR10DataModule(str(tmp_path), download=True, predict_dir=str(mine), skip_bad_images=True)
    dm.setup("predict")
    assert [p.name for p in dm.predict_files] == ["a.png", "c.png"]
    assert dm.predict_dataset.images[0, 0, 0, 0] == 255 and dm.predict_dataset.images[1, 2, 0, 0] == 255


def test_a_data_source_fingerprint_follows_the_files_not_their_place(folder_data, official_data, tmp_path):
    """The source a checkpoint records, as the data module reads it: the same fingerprint for a copy elsewhere, another
    for one file more or changed; the count is of the images read."""

    def source(data_dir: Path, stage: str = "fit", **options) -> dict:
        dm = CIFAR10DataModule(str(data_dir), val_size=0, **options)
        dm.setup(stage)
        return dm.sources["test" if stage == "test" else "train"]

    here = source(folder_data)
    assert here["format"] == "folder" and here["images"] == 48 and here["path"] == str((folder_data / "train").resolve())
    copy = tmp_path / "copy"
    shutil.copytree(folder_data, copy)
    assert source(copy)["fingerprint"] == here["fingerprint"] != source(copy, "test")["fingerprint"]
    Image.new("RGB", (32, 32)).save(copy / "train" / "cat" / "extra.png")
    assert source(copy)["fingerprint"] != here["fingerprint"]
    (copy / "train" / "cat" / "extra.png").write_bytes(b"x" * 10)  # same name, other size: and not an image
    assert source(copy, skip_bad_images=True)["fingerprint"] != here["fingerprint"]
    assert source(copy, skip_bad_images=True)["images"] == 48  # 49 files listed, 48 read: the split is drawn over 48

    data_dir, _ = official_data  # the official batches: their (here patched) MD5s, whatever the folder
    train, test = source(data_dir), source(data_dir, "test")
    assert train["format"] == "official" and train["fingerprint"] != test["fingerprint"]
    assert (train["images"], test["images"]) == (60, 12)
    dm = CIFAR10DataModule(str(data_dir), val_size=6, test_size=6)
    dm.setup("fit")
    assert dm.sources["train"] == train  # what fit's checkpoints record
    assert len(dm.val_index) + len(dm.test_index) == 12

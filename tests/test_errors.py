"""Every mistake a user can make ends in one `error: ...` line, exit code 2, no traceback, nothing lost."""

import shutil
from pathlib import Path

import pytest
from conftest import CONFIG, FAST, cli_error, options
from torchvision.datasets import CIFAR10

UNREACHABLE = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: connection refused at once


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(CIFAR10, "url", UNREACHABLE)


def fit(data_dir, *extra: str) -> list[str]:
    return ["fit", *options(data_dir, *FAST, *extra, val_size=4)]


def test_missing_data_offline_says_where_it_looked_and_what_to_do(tmp_path, capsys):
    message = cli_error(fit(tmp_path / "nowhere", "--data.download", "false"), capsys)
    assert f"no CIFAR-10 data in {tmp_path / 'nowhere'}" in message
    assert "cifar-10-batches-py/" in message and "train/<class>/" in message and "--data.download true" in message
    assert not (tmp_path / "runs").exists()  # a run that never started leaves no folder


def test_empty_data_dir_with_download_fails_fast_when_offline(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    message = cli_error(fit(tmp_path / "empty"), capsys)
    assert "downloading CIFAR-10 failed" in message and "Connection refused" in message


def test_corrupt_archive_is_reported_and_not_used(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / CIFAR10.filename).write_bytes(b"not a tar.gz")
    message = cli_error(fit(tmp_path / "data"), capsys)
    assert f"{tmp_path / 'data' / CIFAR10.filename} fails its MD5 checksum and downloading a fresh copy failed" in message


def test_batch_file_failing_its_checksum_is_named(official_data, capsys):
    data_dir, _ = official_data
    batch = data_dir / CIFAR10.base_folder / "data_batch_3"
    content = bytearray(batch.read_bytes())
    content[-10] ^= 0xFF
    batch.write_bytes(bytes(content))
    message = cli_error(fit(data_dir), capsys)
    assert f"{batch} fails its MD5 checksum" in message
    assert batch.read_bytes() == bytes(content)  # the user's file is left as it was


def test_image_folder_without_classes(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    assert "no class folders in" in cli_error(fit(tmp_path / "data"), capsys)


def test_non_image_file_in_a_class_folder_is_named(folder_data, capsys):
    stray = folder_data / "train" / "cat" / "notes.txt"
    stray.write_text("hello")
    assert f"{stray} is not a PNG or JPEG image" in cli_error(fit(folder_data), capsys)
    assert not Path("runs").exists()  # failed before the trainer set up: no run folder


def test_undecodable_image_is_named(folder_data, capsys):
    broken = folder_data / "train" / "dog" / "0003.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert f"cannot decode {broken}" in cli_error(fit(folder_data), capsys)


def test_unknown_config_key_on_the_command_line_and_in_a_file(folder_data, tmp_path, capsys):
    assert "--data.bacth_size" in cli_error(fit(folder_data, "--data.bacth_size", "8"), capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(CONFIG).read_text() + "data:\n  bacth_size: 8\n")
    assert "bacth_size" in cli_error(["fit", "--config", str(bad)], capsys)


def test_wrong_type(folder_data, capsys):
    message = cli_error(fit(folder_data, "--data.batch_size", "many"), capsys)
    assert "data.batch_size" in message and "many" in message


def test_bad_trainer_value(folder_data, capsys):
    message = cli_error(fit(folder_data, "--trainer.accelerator", "mps"), capsys)  # Apple GPUs only
    assert "MPSAccelerator" in message and "not available" in message


def test_out_of_range_split_size(folder_data, capsys):
    assert "--data.val_size=1.5 is out of range" in cli_error(fit(folder_data, "--data.val_size", "1.5"), capsys)


def test_ckpt_path_that_does_not_exist(folder_data, capsys):
    assert "no.ckpt does not exist" in cli_error(["test", *options(folder_data, "--ckpt_path", "no.ckpt")], capsys)


def test_ckpt_path_that_is_not_a_checkpoint(folder_data, tmp_path, capsys):
    fake = tmp_path / "model.ckpt"
    fake.write_text("just text")
    message = cli_error(["test", *options(folder_data, "--ckpt_path", str(fake))], capsys)
    assert f"{fake} is not a readable Lightning checkpoint" in message


def test_best_before_any_fit(folder_data, capsys):
    message = cli_error(["test", *options(folder_data, "--ckpt_path", "best")], capsys)
    assert "--ckpt_path best: no run with checkpoints under runs/cifar/" in message and "Run fit" in message


def test_test_split_missing_from_a_train_only_folder(folder_data, capsys):
    shutil.rmtree(folder_data / "test")
    message = cli_error(["test", *options(folder_data)], capsys)
    assert "has no test split" in message and "--data.test_size" in message


def test_predict_without_a_folder(folder_data, capsys):
    message = cli_error(["predict", *options(folder_data)], capsys)
    assert "--data.predict_dir" in message


def test_a_checkpoint_whose_network_the_command_cannot_build_is_refused_in_one_line(fitted, official_data, capsys,
                                                                                   tmp_path, monkeypatch):  # fmt: skip
    """The shared fit has 3 classes; the official-format data 4: the model built for the data cannot take the
    checkpoint's weights (Lightning's strict load would end in a page of traceback)."""
    data_dir, _ = official_data
    last = fitted.run / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)  # the validate run's folder
    message = cli_error(["validate", *options(data_dir, "--ckpt_path", str(last), logger=False)], capsys)
    assert "the checkpoint's network differs from the one this command builds" in message
    assert "(3, " in message and "(4, " in message and "another number of classes" in message

"""Honest evaluation through the real CLI: a checkpoint is scored on the images it held out, never silently on
images it trained on (README, "Runs")."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import wandb
from conftest import (CONFIG, FAST, OFFICIAL_CLASSES, app_messages, class_images, cli_error, fitted_copy,
                      make_folder_data, only, options, run_cli, wandb_env)
from PIL import Image

import wandb_records
from cifar.cli import load_model, main
from cifar.data import CIFAR10DataModule, split_indices


def held_out_options(data: Path) -> list[str]:
    """The options of every command on `held_out_fit`'s data (its copy's): configs/cifar.yaml, batch 8, 1 epoch."""
    return options(data, *FAST, "--trainer.max_epochs", "1")


@pytest.fixture(scope="module")
def held_out_fit(tmp_path_factory) -> SimpleNamespace:
    """One fit, in this process, shared by the module's tests: 48 training images of image folders with no test/
    folder (like the shared JPEGs), 12 held out for validation and 6 for testing, 30 trained on; configs/cifar.yaml
    with its W&B logger (offline: no API key). Read-only: a test that runs a command works on `fitted_copy(held_out_fit,
    tmp_path)`. Fields: root (the working directory), data, run (the fit's run directory), last (its last.ckpt,
    loaded)."""
    root = tmp_path_factory.mktemp("held-out")
    data = make_folder_data(root / "data", per_class=16)  # 48 training images
    shutil.rmtree(data / "test")  # train-only
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for key, value in wandb_env(root).items():
            patch.setenv(key, value) if value is not None else patch.delenv(key, raising=False)
        main(["fit", *held_out_options(data), "--data.val_size", "12", "--data.test_size", "6"])
        wandb.finish()  # as the process's exit would
    run = only((root / "runs/cifar").glob("*-fit-*"))
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    return SimpleNamespace(root=root, data=data, run=run, fit=None, last=last)


def test_a_fit_records_the_split_it_held_out(held_out_fit):
    (entry,) = held_out_fit.last["run"]["trained_on"]
    assert entry["split"] == {"seed": 0, "val_size": 12, "test_size": 6, "train": 30, "val": 12, "test": 6}
    assert entry["source"]["format"] == "folder" and entry["source"]["images"] == 48
    assert len(entry["held_out"]) == 18 and held_out_fit.last["run"]["name"] == held_out_fit.run.name
    assert json.loads((held_out_fit.run / "run.json").read_text())["trained_on"][0]["split"]["test"] == 6


@pytest.fixture(scope="module")
def tested_by_default(held_out_fit, tmp_path_factory) -> SimpleNamespace:
    """`test --ckpt_path best` on a copy of the held-out fit, in a new process, with no split option repeated.
    Fields: those of the copy, plus test (the CompletedProcess), tested (its run directory), report (its
    test_report.json)."""
    copy = fitted_copy(held_out_fit, tmp_path_factory.mktemp("tested-by-default"))
    copy.test = run_cli(["test", *held_out_options(copy.data), "--ckpt_path", "best"], copy.root)
    copy.tested = only((copy.root / "runs/cifar").glob("*-test-*"))
    copy.report = json.loads((copy.tested / "test_report.json").read_text())
    return copy


def test_by_default_a_checkpoint_is_tested_on_the_images_it_held_out(tested_by_default):
    """In a new process with no split option repeated: the checkpoint's config (its split: seed 0, val_size 12,
    test_size 6) gives the 6 images the fit held out, and says so."""
    output = tested_by_default.test.stdout + tested_by_default.test.stderr
    assert re.search(r"Config: checkpoint \S+/checkpoints/epoch=0-\S+'s", output), output
    assert re.search(r"Evaluating 6 test images held out of image folders in \S+ \(48 images, fingerprint "
                     r"[0-9a-f]{16}\) by split seed 0, val_size 12, test_size 6: none of them trained", output), output
    report, fit = tested_by_default.report, tested_by_default.run
    assert report["fit_run"] == fit.name
    assert Path(report["checkpoint"]).parent == Path("runs/cifar") / fit.name / "checkpoints"
    assert report["overlap"] == 0 and report["data"].startswith("6 test images held out of image folders")


def test_the_accuracy_printed_is_the_checkpoints_on_exactly_the_held_out_images(tested_by_default):
    dm = CIFAR10DataModule(str(tested_by_default.data), val_size=12, test_size=6)
    dm.setup("fit")
    model = load_model(tested_by_default.run / "checkpoints" / Path(tested_by_default.report["checkpoint"]).name)
    with torch.no_grad():
        right = (model.eval().evaluate(dm.test_dataset.images).argmax(-1) == dm.test_dataset.targets).float()
    printed = float(re.search(r"test_acc\s*│\s*([0-9.]+)", tested_by_default.test.stdout)[1])
    assert tested_by_default.report["metrics"]["test_acc"] == pytest.approx(right.mean().item()) == pytest.approx(printed)


def test_the_evaluation_is_recorded_in_the_run_and_in_wandb(tested_by_default):
    fit, tested = tested_by_default.run, tested_by_default.tested
    evaluated = json.loads((tested / "run.json").read_text())["evaluated"]
    assert evaluated["fit_run"] == fit.name and evaluated["images"] == 6 and evaluated["overlap"] == 0
    run_file = only(tested.glob("wandb/offline-run-*/run-*.wandb"))
    assert wandb_records.summary(run_file)["fit_run"] == fit.name
    assert wandb_records.config(run_file)["evaluated"]["data"] == tested_by_default.report["data"]


def nothing_written(copy: SimpleNamespace) -> None:
    """Refused before anything was written: no run folder but the fit's, the fit's record as it was."""
    assert [p.name for p in (copy.root / "runs/cifar").iterdir()] == [copy.run.name]
    assert len(json.loads((copy.run / "run.json").read_text())["starts"]) == 1


def test_a_test_set_overlapping_the_training_images_is_refused_in_one_line(held_out_fit, tmp_path, monkeypatch,
                                                                           capsys):  # fmt: skip
    """24 test images = the 6 held out for testing + the 12 for validation + 6 trained on."""
    copy = fitted_copy(held_out_fit, tmp_path)
    monkeypatch.chdir(tmp_path)
    error = cli_error(["test", *held_out_options(copy.data), "--ckpt_path", "best", "--data.test_size", "24"], capsys)
    assert f"6 of the 24 test images were used to train checkpoint runs/cifar/{copy.run.name}" in error
    assert "--allow_overlap true" in error
    nothing_written(copy)


def test_another_split_seed_is_refused_for_validate_and_for_a_resumed_fit(held_out_fit, tmp_path, monkeypatch, capsys):
    copy = fitted_copy(held_out_fit, tmp_path)
    monkeypatch.chdir(tmp_path)
    common = held_out_options(copy.data)
    error = cli_error(["validate", *common, "--ckpt_path", "best", "--data.seed", "1"], capsys)
    assert re.search(r"[1-9]\d* of the 12 validation images were used to train", error), error
    error = cli_error(["fit", *common, "--ckpt_path", "last", "--data.seed", "1", "--trainer.max_epochs", "2"], capsys)
    assert "validation images were used to train" in error
    nothing_written(copy)  # the refused resume recorded no start


def test_allow_overlap_evaluates_and_marks_the_output_the_report_and_wandb(held_out_fit, tmp_path, monkeypatch):
    copy = fitted_copy(held_out_fit, tmp_path)
    monkeypatch.chdir(tmp_path)
    with app_messages() as said:
        main(["test", *held_out_options(copy.data), "--ckpt_path", "best", "--data.test_size", "24",
              "--allow_overlap", "true"])  # fmt: skip
        wandb.finish()  # as the process's exit would: the run's files complete
    said = "\n".join(said)
    assert re.search(r"Evaluating 24 test images .*: overlaps training data, 6 of the 24", said), said
    assert re.search(r"The results above: overlaps training data, 6 of the 24", said), said  # after Lightning's table
    tested = only((tmp_path / "runs/cifar").glob("*-test-*"))
    assert json.loads((tested / "test_report.json").read_text())["overlap"] == 6
    run_file = only(tested.glob("wandb/offline-run-*/run-*.wandb"))
    assert wandb_records.summary(run_file)["overlaps_training_data"] == 6
    assert "overlaps-training-data" in wandb_records.tags(run_file)


def with_a_test_folder(held_out_fit, where: Path) -> SimpleNamespace:
    """A copy of the held-out fit whose data tree has gained its own test/ folder (6 images): data the checkpoint
    never saw."""
    copy = fitted_copy(held_out_fit, where)
    make_folder_data(where / "more", per_class=16, test_per_class=2)
    shutil.copytree(where / "more/test", copy.data / "test")
    return copy


@pytest.fixture(scope="module")
def tested_on_separate_data(held_out_fit, tmp_path_factory) -> SimpleNamespace:
    """The held-out fit's best checkpoint tested, in this process, on its data tree's own test/ folder once added
    (the split chosen on the command line: `--data.test_size null`; the checkpoint's split holds its test images out
    of train/), with `--model.tta 1` typed on the command line. Fields: those of the copy, plus said (what the app
    said) and tested (the test's run directory)."""
    copy = with_a_test_folder(held_out_fit, tmp_path_factory.mktemp("separate"))
    with pytest.MonkeyPatch.context() as patch, app_messages() as said:
        patch.chdir(copy.root)
        for key, value in wandb_env(copy.root).items():
            patch.setenv(key, value) if value is not None else patch.delenv(key, raising=False)
        main(["test", *held_out_options(copy.data), "--ckpt_path", "best", "--data.test_size", "null",
              "--model.tta", "1"])  # fmt: skip
        wandb.finish()
    copy.said, copy.tested = "\n".join(said), only((copy.root / "runs/cifar").glob("*-test-*"))
    return copy


def test_separate_data_is_said_to_be_other_data(tested_on_separate_data):
    said, data = tested_on_separate_data.said, tested_on_separate_data.data
    assert re.search(rf"Evaluating test images: image folders in {data / 'test'} \(6 images, fingerprint [0-9a-f]+\): "
                     rf"other data than checkpoint", said), said  # fmt: skip


def test_a_model_option_on_the_command_line_wins_over_the_checkpoints(tested_on_separate_data, held_out_fit):
    """LightningCLI puts the checkpoint's hyperparameters over the config; an option typed on the command line
    still wins (tta: 0 in the checkpoint, 1 typed)."""
    tested = tested_on_separate_data.tested
    assert held_out_fit.last["run"]["config"]["model"]["tta"] == 0
    assert "\n  tta: 1\n" in (tested / "config.yaml").read_text()
    assert wandb_records.config(only(tested.glob("wandb/offline-run-*/run-*.wandb")))["config"]["model"]["tta"] == 1


def test_a_checkpoint_with_no_record_loads_and_says_so_once(held_out_fit, tmp_path, monkeypatch, capsys):
    """A checkpoint from before these records (no training record, no run): tested, said once; no split to adopt."""
    copy = with_a_test_folder(held_out_fit, tmp_path)
    torch.save({k: v for k, v in held_out_fit.last.items() if k != "run"}, tmp_path / "old.ckpt")
    monkeypatch.chdir(tmp_path)
    with app_messages() as said:
        main(["test", *held_out_options(copy.data), "--ckpt_path", str(tmp_path / "old.ckpt"), "--data.test_size",
              "null"])  # fmt: skip
    assert "\n".join(said).count("kept no record of its data") == 1
    assert re.search(r"test_acc\s*│\s*[0-9.]+", capsys.readouterr().out)


def quiet(data_dir: Path) -> list[str]:
    """The tutorial config on `data_dir`, one epoch of batch 8, no logger: the run layer without W&B's start-up."""
    return options(data_dir, *FAST, "--trainer.max_epochs", "1", logger=False)


def test_official_data_evaluates_a_checkpoint_with_no_record_or_trained_on_other_data(official_data, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    """The official release's images are counted once read: a checkpoint with no training record validates on a
    fraction of it, and one trained on image folders tests on images held out of it (both used to end in a
    TypeError)."""
    data_dir, _ = official_data  # 60 training images, 12 test images, the 4 OFFICIAL_CLASSES
    folders = tmp_path / "folders"  # image folders with the same classes: the network fits both
    for label, name in enumerate(OFFICIAL_CLASSES):
        (folders / "train" / name).mkdir(parents=True)
        for i, pixels in enumerate(class_images(label, 6, np.random.default_rng(label))):
            Image.fromarray(pixels).save(folders / "train" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    main(["fit", *quiet(folders), "--data.val_size", "4"])
    trained = only(Path("runs/cifar").glob("*-fit-*/checkpoints/last.ckpt"))
    checkpoint = torch.load(trained, weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k != "run"}, "python.ckpt")  # as saved from Python

    with app_messages() as said:
        main(["validate", *quiet(data_dir), "--ckpt_path", "python.ckpt", "--data.val_size", "0.2"])
    validated = json.loads(only(Path("runs/cifar").glob("*-validate-*/run.json")).read_text())["evaluated"]
    assert validated["images"] == 12 and validated["overlap"] is None  # 0.2 of 60
    assert "official CIFAR-10 train batches" in validated["data"] and "kept no record" in "\n".join(said)

    with app_messages() as said:
        main(["test", *quiet(data_dir), "--ckpt_path", str(trained), "--data.test_size", "10"])
    tested = json.loads(only(Path("runs/cifar").glob("*-test-*/run.json")).read_text())["evaluated"]
    assert tested["images"] == 10 and tested["overlap"] == 0 and "other data than checkpoint" in "\n".join(said)


def test_with_unreadable_images_skipped_the_images_checked_are_the_images_evaluated(tmp_path, monkeypatch, capsys):
    """The split is drawn over the images read (47 of 48 files here), in fit, in the record and in the check."""
    data = make_folder_data(tmp_path / "data", per_class=16)
    shutil.rmtree(data / "test")
    (data / "train" / "cat" / "0003.png").write_bytes(b"not a png")
    common = [*quiet(data), "--data.skip_bad_images", "true", "--data.val_size", "12", "--data.test_size", "6"]
    monkeypatch.chdir(tmp_path)
    main(["fit", *common])
    (entry,) = torch.load(only(Path("runs/cifar").glob("*-fit-*/checkpoints/last.ckpt")), weights_only=True)["run"][
        "trained_on"
    ]
    assert entry["source"]["images"] == 47 and entry["split"]["train"] == 29 and len(entry["held_out"]) == 18

    with app_messages() as said:
        main(["test", *quiet(data), "--data.skip_bad_images", "true", "--ckpt_path", "last"])  # the checkpoint's split
    said = "\n".join(said)
    assert re.search(r"Evaluating 6 test images held out of image folders in \S+ \(47 images, .*none of them trained",
                     said), said  # fmt: skip

    # Another seed: the overlap said is the one of the 6 images this split evaluates, among the 47 read.
    trained = torch.ones(47, dtype=torch.bool)
    trained[entry["held_out"].long()] = False
    expected = int(trained[split_indices(47, 1, 12, 6)[2]].sum())
    error = cli_error(["test", *common[:-6], "--ckpt_path", "last", "--data.seed", "1"], capsys)
    assert f"{expected} of the 6 test images" in error


def test_a_lineage_with_an_unrecorded_ancestor_is_never_said_to_have_trained_on_none(fitted, tmp_path, monkeypatch):
    """A checkpoint with no training record (saved from Python, or by an older version), fine-tuned on another
    split: the child's record says "unknown, plus this split", and its test says the overlap is unknown, never
    "none of them" (the ancestor trained on most of the images)."""
    copy = fitted_copy(fitted, tmp_path)
    ancestor = torch.load(copy.run / "checkpoints" / "last.ckpt", weights_only=True)
    del ancestor["run"]
    torch.save(ancestor, tmp_path / "ancestor.ckpt")
    monkeypatch.chdir(tmp_path)
    common = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", CONFIG, "--ckpt_path", "ancestor.ckpt", "--data.seed", "1", "--data.test_size", "12",
          "--data.val_size", "6", "--trainer.max_epochs", "3", *common])  # fmt: skip
    child = only(set((tmp_path / "runs/cifar").glob("*-fit-*")) - {copy.run}) / "checkpoints" / "last.ckpt"
    unknown, entry = torch.load(child, weights_only=True)["run"]["trained_on"]
    assert "ancestor.ckpt" in unknown["unknown"] and entry["split"]["seed"] == 1

    with app_messages() as said:
        main(["test", "--ckpt_path", str(child), *common])
    report = json.loads(only((tmp_path / "runs/cifar").glob("*-test-*/test_report.json")).read_text())
    assert report["overlap"] is None and "is unknown" in report["note"]
    assert said and "none of them" not in "\n".join(said)

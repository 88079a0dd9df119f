"""Honest evaluation through the real CLI: a checkpoint is scored on the images it held out, never silently on
images it trained on (README, "Runs")."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from conftest import CONFIG, FAST, OFFICIAL_CLASSES, class_images, fitted_copy, make_folder_data, only, run_cli
from PIL import Image

import wandb_records
from cifar.cli import load_model, main
from cifar.data import CIFAR10DataModule, split_indices


def said(caplog) -> str:
    """What the app said on its console (Lightning's rank-zero logger), not what other libraries logged: W&B also
    logs the run's config, which quotes these lines, through Python's logging."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "lightning.pytorch.utilities.rank_zero")


def main_exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code


def test_a_checkpoint_is_tested_on_what_it_held_out_and_refused_on_what_it_trained_on(tmp_path, monkeypatch, capsys,
                                                                                     caplog):
    data = make_folder_data(tmp_path / "data", per_class=16)  # 48 training images
    shutil.rmtree(data / "test")  # train-only, like the shared JPEGs
    common = ["--config", CONFIG, "--data.data_dir", str(data), *FAST, "--trainer.max_epochs", "1"]
    with monkeypatch.context() as patch:  # the fit in this process, the test below in a new one
        patch.chdir(tmp_path)
        main(["fit", *common, "--data.val_size", "12", "--data.test_size", "6"])
        wandb.finish()  # as the process's exit would
    fit = only((tmp_path / "runs/cifar").glob("*-fit-*"))
    last = torch.load(fit / "checkpoints/last.ckpt", weights_only=True)
    (entry,) = last["run"]["trained_on"]
    assert entry["split"] == {"seed": 0, "val_size": 12, "test_size": 6, "train": 30, "val": 12, "test": 6}
    assert entry["source"]["format"] == "folder" and entry["source"]["images"] == 48
    assert len(entry["held_out"]) == 18 and last["run"]["name"] == fit.name
    assert json.loads((fit / "run.json").read_text())["trained_on"][0]["split"]["test"] == 6

    # The default, in a new process, with no split option repeated: the 6 images fit held out.
    test = run_cli(["test", *common, "--ckpt_path", "best"], tmp_path)
    output = test.stdout + test.stderr
    assert re.search(r"Config: checkpoint \S+/checkpoints/epoch=0-\S+'s, then --config files and the command line",
                     output)  # its split (seed 0, val_size 12, test_size 6) with the rest  # fmt: skip
    assert re.search(r"Evaluating 6 test images held out of image folders in \S+ \(48 images, fingerprint "
                     r"[0-9a-f]{16}\) by split seed 0, val_size 12, test_size 6: none of them trained", output), output
    assert re.search(r"test_acc\s*│\s*[0-9.]+", test.stdout)
    tested = only((tmp_path / "runs/cifar").glob("*-test-*"))
    report = json.loads((tested / "test_report.json").read_text())
    assert report["fit_run"] == fit.name and Path(report["checkpoint"]).parent == Path("runs/cifar") / fit.name / "checkpoints"
    assert report["overlap"] == 0 and report["data"].startswith("6 test images held out of image folders")
    # The accuracy is that of the checkpoint on exactly those 6 images, as printed.
    dm = CIFAR10DataModule(str(data), val_size=12, test_size=6)
    dm.setup("fit")
    model = load_model(fit / "checkpoints" / Path(report["checkpoint"]).name)
    with torch.no_grad():
        right = (model.eval().evaluate(dm.test_dataset.images).argmax(-1) == dm.test_dataset.targets).float()
    printed = float(re.search(r"test_acc\s*│\s*([0-9.]+)", test.stdout)[1])
    assert report["metrics"]["test_acc"] == pytest.approx(right.mean().item()) == pytest.approx(printed)
    evaluated = json.loads((tested / "run.json").read_text())["evaluated"]
    assert evaluated["fit_run"] == fit.name and evaluated["images"] == 6 and evaluated["overlap"] == 0
    run_file = only(tested.glob("wandb/offline-run-*/run-*.wandb"))
    assert wandb_records.summary(run_file)["fit_run"] == fit.name
    assert wandb_records.config(run_file)["evaluated"]["data"] == report["data"]

    # In-process from here (the same CLI, without a new start-up each time): errors on stderr, the rest logged.
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO")
    # A test set that overlaps the training images: 24 = the 6 test + the 12 validation + 6 trained on.
    assert main_exit_code(["test", *common, "--ckpt_path", "best", "--data.test_size", "24"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: 6 of the 24 test images were used to train checkpoint runs/cifar/" + fit.name), error
    assert "--allow_overlap true" in error and "leave --data.seed, --data.val_size and --data.test_size off" in error
    # Another split seed: the validation set of validate, and of a resumed fit, are refused alike.
    assert main_exit_code(["validate", *common, "--ckpt_path", "best", "--data.seed", "1"]) == 2
    assert re.match(r"error: [1-9]\d* of the 12 validation images were used to train", capsys.readouterr().err.splitlines()[-1])
    assert main_exit_code(["fit", *common, "--ckpt_path", "last", "--data.seed", "1", "--trainer.max_epochs", "2"]) == 2
    assert "validation images were used to train" in capsys.readouterr().err
    # Refused before anything was written: no run folder, no W&B run, the fit run's record as it was.
    assert sorted(p.name for p in (tmp_path / "runs/cifar").iterdir()) == sorted([fit.name, tested.name])
    assert len(json.loads((fit / "run.json").read_text())["starts"]) == 1  # the refused resume recorded no start

    # The override: evaluated, and marked in the output, the report and the W&B run.
    caplog.clear()
    main(["test", *common, "--ckpt_path", "best", "--data.test_size", "24", "--allow_overlap", "true"])
    assert re.search(r"Evaluating 24 test images .*: overlaps training data, 6 of the 24 images trained", said(caplog))
    assert "The results above: overlaps training data, 6 of the 24" in said(caplog)  # after Lightning's table
    wandb.finish()  # as the process's exit would: the run's files complete
    overridden = max((tmp_path / "runs/cifar").glob("*-test-*"))
    assert json.loads((overridden / "test_report.json").read_text())["overlap"] == 6
    run_file = only(overridden.glob("wandb/offline-run-*/run-*.wandb"))
    assert wandb_records.summary(run_file)["overlaps_training_data"] == 6
    assert "overlaps-training-data" in wandb_records.tags(run_file)

    # Separate data is fine, said in one line: the tree's own test/ folder, once added (its split chosen on the
    # command line: the checkpoint's split holds its test images out of train/).
    make_folder_data(tmp_path / "more", per_class=16, test_per_class=2)
    shutil.copytree(tmp_path / "more/test", data / "test")
    caplog.clear()
    main(["test", *common, "--ckpt_path", "best", "--data.test_size", "null", "--model.tta", "1"])
    assert re.search(rf"Evaluating test images: image folders in {data / 'test'} \(6 images, fingerprint [0-9a-f]+\): "
                     rf"other data than checkpoint", said(caplog)), said(caplog)
    # A model option typed on the command line wins over the checkpoint's (which LightningCLI puts over it).
    wandb.finish()
    separate = max((tmp_path / "runs/cifar").glob("*-test-*"))
    assert "\n  tta: 1\n" in (separate / "config.yaml").read_text() and last["run"]["config"]["model"]["tta"] == 0
    assert wandb_records.config(only(separate.glob("wandb/offline-run-*/run-*.wandb")))["config"]["model"]["tta"] == 1

    # A checkpoint from before these records (no training record, no run): loads, said once; no split to adopt.
    old = {k: v for k, v in last.items() if k != "run"}
    torch.save(old, tmp_path / "old.ckpt")
    caplog.clear()
    main(["test", *common, "--ckpt_path", str(tmp_path / "old.ckpt"), "--data.test_size", "null"])
    assert said(caplog).count("kept no record of its data") == 1
    assert re.search(r"test_acc\s*│\s*[0-9.]+", capsys.readouterr().out)


def quiet(data_dir: Path) -> list[str]:
    """The tutorial config on `data_dir`, one epoch of batch 8, no logger: the run layer without W&B's start-up."""
    return ["--config", CONFIG, "--data.data_dir", str(data_dir), *FAST, "--trainer.max_epochs", "1",
            "--trainer.logger", "false"]  # fmt: skip


def test_official_data_evaluates_a_checkpoint_with_no_record_or_trained_on_other_data(official_data, tmp_path,
                                                                                      monkeypatch, caplog):  # fmt: skip
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
    caplog.set_level("INFO")
    main(["fit", *quiet(folders), "--data.val_size", "4"])
    trained = only(Path("runs/cifar").glob("*-fit-*/checkpoints/last.ckpt"))
    checkpoint = torch.load(trained, weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k != "run"}, "python.ckpt")  # as saved from Python

    main(["validate", *quiet(data_dir), "--ckpt_path", "python.ckpt", "--data.val_size", "0.2"])
    validated = json.loads(only(Path("runs/cifar").glob("*-validate-*/run.json")).read_text())["evaluated"]
    assert validated["images"] == 12 and validated["overlap"] is None  # 0.2 of 60
    assert "official CIFAR-10 train batches" in validated["data"] and "kept no record" in said(caplog)

    main(["test", *quiet(data_dir), "--ckpt_path", str(trained), "--data.test_size", "10"])
    tested = json.loads(only(Path("runs/cifar").glob("*-test-*/run.json")).read_text())["evaluated"]
    assert tested["images"] == 10 and tested["overlap"] == 0 and "other data than checkpoint" in said(caplog)


def test_with_unreadable_images_skipped_the_images_checked_are_the_images_evaluated(tmp_path, monkeypatch, caplog,
                                                                                    capsys):  # fmt: skip
    """The split is drawn over the images read (47 of 48 files here), in fit, in the record and in the check."""
    data = make_folder_data(tmp_path / "data", per_class=16)
    shutil.rmtree(data / "test")
    (data / "train" / "cat" / "0003.png").write_bytes(b"not a png")
    common = [*quiet(data), "--data.skip_bad_images", "true", "--data.val_size", "12", "--data.test_size", "6"]
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO")
    main(["fit", *common])
    (entry,) = torch.load(only(Path("runs/cifar").glob("*-fit-*/checkpoints/last.ckpt")), weights_only=True)["run"][
        "trained_on"
    ]
    assert entry["source"]["images"] == 47 and entry["split"]["train"] == 29 and len(entry["held_out"]) == 18

    main(["test", *quiet(data), "--data.skip_bad_images", "true", "--ckpt_path", "last"])  # the checkpoint's split
    assert re.search(r"Evaluating 6 test images held out of image folders in \S+ \(47 images, .*none of them trained",
                     said(caplog)), said(caplog)  # fmt: skip

    # Another seed: the overlap said is the one of the 6 images this split evaluates, among the 47 read.
    trained = torch.ones(47, dtype=torch.bool)
    trained[entry["held_out"].long()] = False
    expected = int(trained[split_indices(47, 1, 12, 6)[2]].sum())
    assert main_exit_code(["test", *common[:-6], "--ckpt_path", "last", "--data.seed", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {expected} of the 6 test images")


def test_a_lineage_with_an_unrecorded_ancestor_is_never_said_to_have_trained_on_none(fitted, tmp_path, monkeypatch,
                                                                                      caplog):  # fmt: skip
    """A checkpoint with no training record (saved from Python, or by an older version), fine-tuned on another
    split: the child's record says "unknown, plus this split", and its test says the overlap is unknown, never
    "none of them" (the ancestor trained on most of the images)."""
    copy = fitted_copy(fitted, tmp_path)
    ancestor = torch.load(copy.run / "checkpoints" / "last.ckpt", weights_only=True)
    del ancestor["run"]
    torch.save(ancestor, tmp_path / "ancestor.ckpt")
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO")
    common = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", CONFIG, "--ckpt_path", "ancestor.ckpt", "--data.seed", "1", "--data.test_size", "12",
          "--data.val_size", "6", "--trainer.max_epochs", "3", *common])  # fmt: skip
    child = only(set((tmp_path / "runs/cifar").glob("*-fit-*")) - {copy.run}) / "checkpoints" / "last.ckpt"
    unknown, entry = torch.load(child, weights_only=True)["run"]["trained_on"]
    assert "ancestor.ckpt" in unknown["unknown"] and entry["split"]["seed"] == 1

    main(["test", "--ckpt_path", str(child), *common])
    report = json.loads(only((tmp_path / "runs/cifar").glob("*-test-*/test_report.json")).read_text())
    assert report["overlap"] is None and "is unknown" in report["note"]
    assert "none of them" not in said(caplog)

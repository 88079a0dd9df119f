"""Honest evaluation through the real CLI: a checkpoint is scored on the images it held out, never silently on
images it trained on (cifar/run.py, rule 7)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import wandb
from conftest import CONFIG, FAST, make_folder_data, only, run_cli

import wandb_records
from cifar.cli import main
from cifar.data import CIFAR10DataModule
from cifar.module import LitModel



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
    assert "Split: the checkpoint's (seed 0, val_size 12, test_size 6)" in output
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
    model = LitModel.load_from_checkpoint(fit / "checkpoints" / Path(report["checkpoint"]).name, weights_only=True)
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
    assert "--data.allow_overlap true" in error and "leave --data.seed, --data.val_size and --data.test_size off" in error
    # Another split seed: the validation set of validate, and of a resumed fit, are refused alike.
    assert main_exit_code(["validate", *common, "--ckpt_path", "best", "--data.seed", "1"]) == 2
    assert re.match(r"error: [1-9]\d* of the 12 validation images were used to train", capsys.readouterr().err.splitlines()[-1])
    assert main_exit_code(["fit", *common, "--ckpt_path", "last", "--data.seed", "1", "--trainer.max_epochs", "2"]) == 2
    assert "validation images were used to train" in capsys.readouterr().err

    # The override: evaluated, and marked in the output, the report and the W&B run.
    caplog.clear()
    main(["test", *common, "--ckpt_path", "best", "--data.test_size", "24", "--data.allow_overlap", "true"])
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
    assert "\n  tta: 1\n" in (separate / "config.yaml").read_text() and last["hyper_parameters"]["tta"] == 0
    assert wandb_records.config(only(separate.glob("wandb/offline-run-*/run-*.wandb")))["tta"] == 1

    # A checkpoint from before these records (no training record, no run): loads, said once; no split to adopt.
    old = {k: v for k, v in last.items() if k != "run"}
    torch.save(old, tmp_path / "old.ckpt")
    caplog.clear()
    main(["test", *common, "--ckpt_path", str(tmp_path / "old.ckpt"), "--data.test_size", "null"])
    assert said(caplog).count("carries no record of its training data") == 1 and "Split:" not in said(caplog)
    assert re.search(r"test_acc\s*│\s*[0-9.]+", capsys.readouterr().out)

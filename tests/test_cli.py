"""The real CLI: fit -> `test --ckpt_path best` in new processes -> predict, in both data formats; the offline W&B
run; runs started together; the test report; W&B without an API key."""

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import wandb
from conftest import (CLASSES, FAST, OFFICIAL_CLASSES, SECRET, app_messages, cli_command, cli_env, cli_error,
                      fitted_copy, make_official_data, only, options, run_cli)
from PIL import Image
from torchvision.datasets import CIFAR10

import wandb_records
from cifar.cli import main


@pytest.fixture(params=["folder", "official"])
def dataset(request, tmp_path: Path):
    """(the shared fit copied here, or None, data_dir, checksum table or None, class names) for each format the
    app reads. The image folders are the session's shared fit (`fitted`, by a user with an API key who chose
    offline mode); the official release is fitted here, with the key too."""
    if request.param == "folder":
        copy = fitted_copy(request.getfixturevalue("fitted"), tmp_path)
        return copy, copy.data, None, CLASSES
    return None, tmp_path / "data", make_official_data(tmp_path / "data"), OFFICIAL_CLASSES


def test_fit_then_test_best_then_predict(dataset, tmp_path: Path):
    shared, data_dir, checksums, classes = dataset
    key = {"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"}  # a user with an API key who chose offline mode
    if shared:  # configs/cifar.yaml's default data_dir, data/, as the shared fit used it
        common = ["--config", "configs/cifar.yaml", "--data.val_size", "12", *FAST]
    else:
        common = options(data_dir, *FAST, val_size=12)
        run_cli(["fit", *common], tmp_path, checksums, env=key)

    # One run directory with the resolved config, both checkpoints, and the offline W&B run.
    run = only((tmp_path / "runs" / "cifar").glob("*-fit-*"))
    run_id = json.loads((run / "run.json").read_text())["id"]
    assert run.name.endswith(f"-fit-{run_id}") and only(run.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
    assert "data_dir: " + ("data" if shared else str(data_dir)) in (run / "config.yaml").read_text()
    checkpoints = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2, checkpoints
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # no pickled objects
    assert last["run"]["config"]["model"]["net"]["class_path"] == "cifar.nets.TutorialCNN"
    assert last["state_dict"]["classifier.net.classifier.5.weight"].shape[0] == len(classes)  # linked from the data
    best = Path(last["callbacks"][only(k for k in last["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_path"])

    # test in a new process evaluates that best checkpoint.
    test = run_cli(["test", *common, "--ckpt_path", "best"], tmp_path, checksums, env=key)
    assert f"--ckpt_path best: runs/cifar/{run.name}/checkpoints/{best.name}" in test.stderr
    assert f"Restoring states from the checkpoint path at runs/cifar/{run.name}/checkpoints/{best.name}" in test.stderr
    assert re.search(r"test_acc\s*│\s*[0-9.]+", test.stdout), test.stdout

    # predict: PNG and JPEG of other sizes and modes, resized; one CSV row per image.
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.new("RGB", (200, 120), (200, 10, 10)).save(mine / "red.png")
    Image.new("L", (16, 16), 90).save(mine / "gray.jpg")
    Image.new("RGBA", (33, 31), (0, 0, 255, 128)).save(mine / "blue.png")
    (mine / "README.txt").write_text("not an image")
    with pytest.MonkeyPatch.context() as patch, app_messages() as said:  # in this process: no third start-up
        patch.chdir(tmp_path)
        for name, value in key.items():
            patch.setenv(name, value)
        if checksums:
            patch.setattr(CIFAR10, "train_list", checksums["train_list"])
            patch.setattr(CIFAR10, "test_list", checksums["test_list"])
            patch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": checksums["meta_md5"]})
        main(["predict", *common, "--ckpt_path", "best", "--data.predict_dir", str(mine)])
        wandb.finish()  # as the process's exit would: the run's files complete
    where = re.search(r"Predictions for 3 images written to (\S+)", "\n".join(said))
    assert where, said
    rows = list(csv.DictReader(open(tmp_path / where.group(1))))
    assert [Path(r["file"]).name for r in rows] == ["blue.png", "gray.jpg", "red.png"]
    assert list(rows[0]) == ["file", "predicted", "confidence", *[f"p_{c}" for c in classes]]
    for row in rows:
        probs = [float(row[f"p_{c}"]) for c in classes]
        assert abs(sum(probs) - 1) < 1e-4 and row["predicted"] == classes[probs.index(max(probs))]
        assert float(row["confidence"]) == pytest.approx(max(probs), abs=1e-6)

    # No API key in anything the runs wrote (configs, W&B files, logs, checkpoints).
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_wandb_offline_run_holds_captioned_images_metrics_and_config(fitted):
    """The shared fit's offline W&B run (fitted: 2 epochs, 12 validation images, batch 8)."""
    run_file = only(fitted.run.glob("wandb/offline-run-*/run-*.wandb"))
    history = wandb_records.history(run_file)

    images = [row for row in history if "val/examples/captions" in row]
    steps_per_epoch = (3 * 16 - 12) // 8 + 1  # 36 training images, batch 8 -> 5 steps
    assert [row["trainer/global_step"] for row in images] == [steps_per_epoch, 2 * steps_per_epoch]  # no sanity pass
    captions = [row["val/examples/captions"] for row in images]
    assert len(captions[0]) == 12  # all 12 validation images (fewer than num_samples=32)
    pattern = re.compile(rf"Pred: ({'|'.join(CLASSES)}), Label: ({'|'.join(CLASSES)})")
    assert all(pattern.fullmatch(c) for c in captions[0] + captions[1]), captions
    labels = [[c.split("Label: ")[1] for c in epoch] for epoch in captions]
    assert labels[0] == labels[1]  # the same images every epoch

    # Beside them, one table per epoch of the same images: image, label, prediction, confidence, p_<class>.
    rows = [row for row in history if "val/predictions/_type" in row]
    assert [row["trainer/global_step"] for row in rows] == [steps_per_epoch, 2 * steps_per_epoch]
    tables = [wandb_records.table(run_file, row, "val/predictions") for row in rows]
    for table, epoch_labels in zip(tables, labels):
        assert table["columns"] == ["image", "label", "prediction", "confidence", *[f"p_{c}" for c in CLASSES]]
        assert [r[1] for r in table["data"]] == epoch_labels
        for _, _, prediction, confidence, *probs in table["data"]:
            assert confidence == max(probs) and prediction == CLASSES[probs.index(confidence)]
            assert sum(probs) == pytest.approx(1, abs=1e-5)
    stored = [paths for _, kind, paths in wandb_records.artifacts(run_file) if kind == "run_table"]
    assert stored and all("val/predictions.table.json" in p and len(p) == 12 + 1 for p in stored)  # + 12 images

    logged = set().union(*history)
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= logged
    config = wandb_records.config(run_file)
    data = config["config"]["data"]  # the whole resolved CLI config, as the user gave it
    assert (data["data_dir"], data["val_size"], data["batch_size"]) == ("data", 12, 8)
    assert config["config"]["trainer"]["default_root_dir"] == "runs/cifar"
    assert config["config"]["trainer"]["callbacks"][2]["class_path"] == "cifar.callbacks.ImagePredictionLogger"


def test_runs_started_together_never_collide_and_best_last_follow_the_latest_start(folder_data: Path, tmp_path: Path):
    common = options(folder_data, *FAST, "--trainer.max_epochs", "1", val_size=12)
    # Two fits started in the same second: two directories, two W&B runs with random ids.
    started = [subprocess.Popen(cli_command(["fit", *common]), cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    assert all(p.wait(timeout=300) == 0 for p in started), [p.stderr.read() for p in started]
    runs = sorted((tmp_path / "runs" / "cifar").glob("*-fit-*"), key=lambda r: json.loads((r / "run.json").read_text())["starts"])
    ids = [json.loads((r / "run.json").read_text())["id"] for r in runs]
    assert len(runs) == 2 and ids[0] != ids[1] and all(len(i) == 8 for i in ids)
    assert [only(r.glob("wandb/offline-run-*/run-*.wandb")).name for r in runs] == [f"run-{i}.wandb" for i in ids]
    first_config = (runs[0] / "config.yaml").read_text()

    # best and last: the run that started last, whatever the file times say.
    for checkpoint in (runs[0] / "checkpoints").glob("*.ckpt"):
        os.utime(checkpoint, (4e9, 4e9))  # the earlier run's files touched, as a copy or a backup would
    with pytest.MonkeyPatch.context() as patch, app_messages() as said:  # in this process: no third start-up
        patch.chdir(tmp_path)
        main(["test", *common, "--ckpt_path", "best"])
    assert f"--ckpt_path best: runs/cifar/{runs[1].name}/checkpoints/epoch=0-" in "\n".join(said)
    assert (runs[0] / "config.yaml").read_text() == first_config  # untouched by the others
    assert only((tmp_path / "runs" / "cifar").glob("*-test-*")).joinpath("config.yaml").exists()


def test_test_report_in_wandb_and_as_pngs(folder_data: Path, tmp_path: Path, monkeypatch):
    """`test` logs per-class accuracy, a confusion matrix and the most confident mistakes, and writes two PNGs."""
    monkeypatch.chdir(tmp_path)
    with app_messages() as said:
        main(["test", *options(folder_data, *FAST)])  # untrained
        wandb.finish()  # as the process's exit would: the run's files complete
    run = only((tmp_path / "runs" / "cifar").glob("*-test-*"))
    assert f"Test report written to runs/cifar/{run.name}/test_report.json, runs/cifar/{run.name}/confusion_matrix.png" in "\n".join(said)
    assert Image.open(run / "confusion_matrix.png").size[0] > 200
    assert Image.open(run / "test_examples.png").size == (8 * 150, 2 * (96 + 24))  # 12 test images, 8 a row

    run_file = only(run.glob("wandb/offline-run-*/run-*.wandb"))
    history = wandb_records.history(run_file)
    logged = {key: value for row in history for key, value in row.items()}
    assert {f"test_acc/{c}" for c in CLASSES} <= set(logged)  # also printed in the test table
    confusion = wandb_records.table(run_file, logged, "test/confusion_matrix_table")
    assert confusion["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert len(confusion["data"]) == 9 and sum(r[2] for r in confusion["data"]) == 12  # 3 x 3 cells, 12 images
    for name in CLASSES:
        right = next(r[2] for r in confusion["data"] if r[0] == r[1] == name)
        assert logged[f"test_acc/{name}"] == pytest.approx(right / 4)  # 4 test images per class
    assert "_wandb/visualize/test/confusion_matrix" in wandb_records.config(run_file)  # drawn as a chart

    mistakes = wandb_records.table(run_file, logged, "test/mistakes")["data"]
    assert len(mistakes) == min(16, 12 - sum(r[2] for r in confusion["data"] if r[0] == r[1]))
    assert all(label != prediction for _, label, prediction, *_ in mistakes)
    confidences = [r[3] for r in mistakes]
    assert confidences == sorted(confidences, reverse=True)  # most confident first


def test_wandb_mode_set_between_two_commands_in_one_process_is_the_second_ones(folder_data: Path, tmp_path: Path,
                                                                               monkeypatch):
    """W&B reads WANDB_MODE at a process's first run only: a second `main()` in the process, by a user who now has an
    API key and chose offline mode, still logs offline (not online, which fails here with no server)."""
    monkeypatch.chdir(tmp_path)
    main(["test", *options(folder_data, *FAST)])  # no API key: offline
    wandb.finish()
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["test", *options(folder_data, *FAST)])
    wandb.finish()
    assert len(list((tmp_path / "runs" / "cifar").glob("*-test-*/wandb/offline-run-*"))) == 2


def test_without_an_api_key_wandb_logs_offline_with_checkpoints_as_model_artifacts(folder_data: Path, tmp_path: Path,
                                                                                   capsys, monkeypatch):  # fmt: skip
    fit = run_cli(["fit", *options(folder_data, *FAST, "--trainer.max_epochs", "1", "--trainer.logger.init_args.log_model",
                                   "true", val_size=12)], tmp_path)  # fmt: skip
    assert "W&B: no API key configured (`wandb login` or WANDB_API_KEY), so this run logs offline" in fit.stderr
    run = only((tmp_path / "runs" / "cifar").glob("*-fit-*"))
    run_file = only(run.glob("wandb/offline-run-*/run-*.wandb"))
    models = [paths for name, kind, paths in wandb_records.artifacts(run_file) if kind == "model"]
    assert models and all(paths == ["model.ckpt"] for paths in models)  # uploaded by `wandb sync`
    assert "log_model: true" in (run / "config.yaml").read_text()  # the user's config, as given

    # offline: true in the config wins, and Lightning's WandbLogger refuses log_model with it: one line.
    monkeypatch.chdir(tmp_path)
    refused = cli_error(["fit", *options(folder_data, *FAST, "--trainer.logger.init_args.offline", "true",
                                         "--trainer.logger.init_args.log_model", "true")], capsys)  # fmt: skip
    assert "log_model" in refused and "offline: true" in refused

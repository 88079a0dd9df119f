"""LitModel and CIFAR10DataModule used from Python with a plain Trainer, not the CLI: the checkpoint holds no
pickled objects, reloads with the network passed back, and the CLI tests that very model."""

import re

import pytest
import torch
from conftest import app_messages, options
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from cifar.cli import main
from cifar.data import CIFAR10DataModule
from cifar.module import LitModel
from cifar.nets import TutorialCNN


def test_a_model_built_in_python_checkpoints_without_pickled_objects(folder_data, tmp_path, capsys):
    model = LitModel(net=TutorialCNN(num_classes=3), num_classes=3)  # and the default optimizer, a lambda
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints")
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[checkpoint])
    data = CIFAR10DataModule(str(folder_data), val_size=12, batch_size=8)
    trainer.fit(model, data)
    path = checkpoint.best_model_path

    saved = torch.load(path, weights_only=True)  # what the app loads with: no code can run
    assert not saved.get("hyper_parameters")  # the CLI's checkpoints hold their config in their run record

    loaded = LitModel.load_from_checkpoint(path, net=TutorialCNN(num_classes=3), weights_only=True)
    images = data.val_dataset.images[:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), model.eval()(images))

    with pytest.MonkeyPatch.context() as patch, app_messages() as said:  # the CLI, in this process
        patch.chdir(tmp_path)
        main(["test", *options(folder_data, "--ckpt_path", str(path), val_size=12, logger=False, progress_bar=False)])
    # The CLI tests the very model: its printed accuracy is this model's on the data's test split.
    data.setup("test")
    with torch.no_grad():
        right = model(data.test_dataset.images).argmax(-1) == data.test_dataset.targets
    printed = float(re.search(r"test_acc\s*│\s*([0-9.]+)", capsys.readouterr().out)[1])
    assert printed == pytest.approx(right.float().mean().item(), abs=1e-6)
    assert "kept no record of its data" in "\n".join(said)  # written outside the CLI: said, not refused

"""Weight averaging (Lightning's EMAWeightAveraging, declared in the config) and exact resume with every
regularizer on: the checkpoint's weights are the average, which test, predict, export and serve score, and a fit
resumed mid-way resumes the average, the raw weights and every batch's draws."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import only, options

REGULARIZERS = ["--data.flip", "random", "--data.translate", "2", "--data.policy", "trivialaugment", "--data.erasing",
                "0.5", "--data.mixup_alpha", "0.2", "--data.cutmix_alpha", "1.0", "--data.mix_prob", "0.8",
                "--model.label_smoothing", "0.1"]  # fmt: skip
EMA = ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "0.5"]


def test_a_resumed_fit_with_every_regularizer_and_ema_is_exact_and_test_scores_the_average(folder_data, tmp_path,
                                                                                           monkeypatch):  # fmt: skip
    """The real CLI: 2 epochs straight, or resumed from the straight run's first epoch, give the same average and raw
    weights (each batch's draws come from its own key, whatever ran before in the process). Two fits, not
    test_fault's three: a second checkpoint callback keeps every epoch, and the resumed run goes on in the straight
    run's folder (the app resumes a run where its checkpoint is), writing its last.ckpt anew. Then `test` of that
    checkpoint reports the loss of the averaged weights, which export (and serve, which loads the same way) hold."""
    from cifar.cli import main
    from cifar.data import CIFAR10DataModule
    from cifar.cli import load_model

    monkeypatch.chdir(tmp_path)
    common = options(folder_data, "--seed_everything", "3", "--trainer.deterministic", "true", "--trainer.max_epochs", "2",
                     *REGULARIZERS, *EMA, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                     "--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.filename", "every-{epoch}",
                     val_size=12, batch_size=12, progress_bar=False, logger=False)  # fmt: skip
    main(["fit", *common])
    checkpoints = only(Path().glob("runs/cifar/*-fit-*/checkpoints"))
    a = torch.load(checkpoints / "last.ckpt", weights_only=True)
    main(["fit", *common, "--ckpt_path", str(checkpoints / "every-epoch=0.ckpt")])
    b = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (checkpoints / "every-epoch=1-v1.ckpt").exists()  # the resumed run's second epoch
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 6)
    for key in ("state_dict", "current_model_state"):  # the average, and the weights that train on
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=1e-5, atol=1e-6, msg=f"{key}: {name}")
    average, raw = a["state_dict"], a["current_model_state"]
    head = "classifier.net.classifier.5.weight"  # the last layer of the tutorial CNN
    assert not torch.equal(average[head], raw[head])

    main(["test", "--ckpt_path", str(checkpoints / "last.ckpt")])
    reported = json.loads(only(Path().glob("runs/cifar/*-test-*/test_report.json")).read_text())["metrics"]
    model = load_model(checkpoints / "last.ckpt")  # what export and serve run
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, average[name], msg=name)
    data = CIFAR10DataModule(str(folder_data))
    data.setup("test")
    with torch.no_grad():
        losses = []
        for weights in (average, raw):
            model.load_state_dict(weights)
            losses.append(F.cross_entropy(model(data.test_dataset.images), data.test_dataset.targets).item())
    assert reported["test_loss"] == pytest.approx(losses[0], abs=1e-5)
    assert abs(losses[1] - losses[0]) > 1e-4  # the raw weights would have reported another loss

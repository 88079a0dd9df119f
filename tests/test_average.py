"""Weight averaging: Lightning's EMAWeightAveraging declared in the config. The checkpoint's weights are the average;
validation, test, predict, export and serve score it, and a resumed fit resumes it."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIG, only

EMA = ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "0.5"]


def test_ema_weights_are_what_test_and_export_score_and_a_resumed_fit_resumes_them(folder_data, tmp_path, monkeypatch):
    from cifar.cli import main
    from cifar.data import CIFAR10DataModule
    from cifar.export import load_model

    monkeypatch.chdir(tmp_path)
    common = ["--config", CONFIG, "--data.data_dir", str(folder_data), "--data.val_size", "12", "--data.batch_size",
              "8", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--seed_everything", "3",
              "--trainer.deterministic", "true", *EMA]  # fmt: skip
    main(["fit", *common, "--trainer.max_epochs", "2", "--trainer.default_root_dir", "straight"])
    main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.default_root_dir", "resumed"])
    main(["fit", *common, "--trainer.max_epochs", "2", "--trainer.default_root_dir", "resumed", "--ckpt_path", "last"])
    a, b = (torch.load(only(Path(root).glob("*-fit-*/checkpoints/last.ckpt")), weights_only=True)
            for root in ("straight", "resumed"))  # fmt: skip
    assert a["global_step"] == b["global_step"] == 10
    for key in ("state_dict", "current_model_state"):  # the average and the raw weights, both resumed exactly
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=1e-5, atol=1e-6, msg=f"{key}: {name}")
    raw, average = a["current_model_state"], a["state_dict"]
    assert not torch.equal(raw["classifier.net.classifier.4.weight"], average["classifier.net.classifier.4.weight"])

    main(["test", "--ckpt_path", str(only(Path("straight").glob("*-fit-*/checkpoints/last.ckpt")))])
    reported = json.loads(only(Path("straight").glob("*-test-*/test_report.json")).read_text())["metrics"]
    model, _ = load_model(only(Path("straight").glob("*-fit-*/checkpoints/last.ckpt")))  # export's and serve's
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, average[name], msg=name)
    data = CIFAR10DataModule(str(folder_data))
    data.setup("test")
    images, labels = data.test_dataset.images, data.test_dataset.targets
    with torch.no_grad():
        ema_loss = F.cross_entropy(model(images), labels).item()
        model.load_state_dict(raw)
        raw_loss = F.cross_entropy(model(images), labels).item()
    assert reported["test_loss"] == pytest.approx(ema_loss, abs=1e-5)
    assert abs(raw_loss - ema_loss) > 1e-4  # the test would tell them apart

"""export: a checkpoint as ONNX, torch.export and TorchScript files that map uint8 images to the LitModel's
probabilities, loaded by onnxruntime, `torch.export.load` and `torch.jit.load` alone."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, CONFIG, cli_error, exit_code, fitted_copy, run_exported

from cifar.cli import load_model, main
from cifar.export import EXPORTERS
from cifar.module import LitModel, Probabilities
from cifar.nets import AirbenchNet, TutorialCNN


@pytest.fixture
def best(fitted, tmp_path: Path, monkeypatch) -> Path:
    """The shared fit (configs/cifar.yaml, 2 epochs) copied to tmp_path, the working directory; returns its best
    checkpoint."""
    run = fitted_copy(fitted, tmp_path).run
    monkeypatch.chdir(tmp_path)
    return next(p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")


def export(*args: str) -> None:
    main(["export", "--config", CONFIG, *args])  # in-process: the same CLI, without a second start-up


def test_every_format_gives_the_checkpoints_probabilities_and_class_names(best: Path, tmp_path: Path):
    model = load_model(best)
    for fmt in ("onnx", "torch_export", "torchscript"):
        export("--ckpt_path", "best", "--format", fmt, "--output", f"out/model.{fmt}")
        for n in (5, 1):  # not the batch size exported with: the batch axis is free
            images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
            with torch.no_grad():
                expected = model(images).softmax(dim=-1)
                probs, classes = run_exported(fmt, tmp_path / "out" / f"model.{fmt}", images)
            assert probs.numpy() == pytest.approx(expected.numpy(), abs=1e-5), fmt
            assert classes == CLASSES
    export("--ckpt_path", str(best), "--format", "torch_export")  # no --output: beside the checkpoint
    assert best.with_suffix(".pt2").is_file()


def test_export_mistakes_end_in_one_error_line(best: Path, tmp_path: Path, capsys, monkeypatch):
    def error(*args: str) -> str:
        return cli_error(["export", "--config", CONFIG, *args], capsys)

    (tmp_path / "taken.onnx").write_text("keep me")
    assert "taken.onnx already exists" in error("--ckpt_path", "best", "--output", "taken.onnx")
    assert (tmp_path / "taken.onnx").read_text() == "keep me"
    assert "format" in error("--ckpt_path", "best", "--format", "tflite")
    assert "does not exist" in error("--ckpt_path", "nowhere.ckpt")
    assert "--ckpt_path is required" in error()
    # An onnx that is installed but does not load: here, as with protobuf's VersionError for an onnx built against
    # another protobuf major version (a GPU machine's image with newer wheels beside it, issue 28).
    (tmp_path / "broken" / "onnx").mkdir(parents=True)
    (tmp_path / "broken" / "onnx" / "__init__.py").write_text("raise RuntimeError('mismatched Protobuf versions')\n")
    monkeypatch.syspath_prepend(tmp_path / "broken")
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    line = error("--ckpt_path", "best", "--format", "onnx", "--output", "model.onnx")
    assert "needs the onnx and onnxscript packages, importable (RuntimeError: mismatched Protobuf versions)" in line


def test_export_is_a_tool_with_its_own_help_and_the_model_options(capsys):
    assert exit_code(["export", "--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"--{option}" in usage for option in ("config", "ckpt_path", "format", "output", "model.tta"))
    assert not any(group in usage for group in ("--trainer", "--data", "--seed_everything", "--root"))
    assert exit_code(["--help"]) == 0
    assert "tools: export, serve, sweep (main.py TOOL --help)" in capsys.readouterr().out


def test_export_reads_its_checkpoint_once_and_takes_model_options_over_its_config(best: Path, tmp_path: Path,
                                                                                  monkeypatch):  # fmt: skip
    """The checkpoint's config, then the command line: `--model.tta 1` exports the mirrored average, from one
    read of the checkpoint."""
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, *args, **kwargs: reads.append(path) or load(path, *args, **kwargs))
    path = tmp_path / "model.pt2"
    main(["export", "--ckpt_path", str(best), "--format", "torch_export", "--output", str(path), "--model.tta", "1"])
    assert reads == [best]
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    model = LitModel(net=TutorialCNN(num_classes=len(CLASSES)), num_classes=len(CLASSES), tta=1).eval()
    model.load_state_dict(load(best, weights_only=True)["state_dict"])
    with torch.no_grad():
        expected = model.evaluate(images).softmax(dim=-1)
    probs, _ = run_exported("torch_export", path, images)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torch_export", "torchscript"])
def test_export_bakes_in_the_models_test_time_augmentation(fmt: str, tmp_path: Path):
    """A model whose `tta` is 2 (6 views) exports as the same function `predict` computes (the net with
    skip connections of configs/fast96.yaml: its ops are a superset of the plain net's)."""
    model = LitModel(net=AirbenchNet(num_classes=3, widths=(8, 16, 16), depth=3), num_classes=3, tta=2).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.evaluate(images).softmax(dim=-1).numpy()
        assert not expected == pytest.approx(model(images).softmax(dim=-1).numpy(), abs=1e-5)  # TTA changes them
        served = Probabilities(model.classifier).eval().requires_grad_(False)
        path = tmp_path / f"model.{fmt}"
        EXPORTERS[fmt](served, images[:2], CLASSES, path)
        probs, _ = run_exported(fmt, path, images)
    assert probs.numpy() == pytest.approx(expected, abs=1e-5)

"""Nets made for 32x32 images: timm models by name (`TimmNet`, with a CIFAR stem for ResNets) and `WideResNet`. Their
stems, sizes and mistakes; fitted from the command line, then exported and served as the app does it."""

from pathlib import Path

import pytest
import torch
from conftest import CLASSES, CONFIG, cli_error, exit_code, run_exported
from torch import nn

from cifar.cli import load_model, main
from cifar.errors import UserError
from cifar.nets import TimmNet, WideResNet
from cifar.serve import ClassifierAPI

TINY_RESNET = {"channels": [8, 16, 32, 64]}  # timm's ResNet and ResNetV2 take their stage widths


def first_stage_input(net: nn.Module, stage: nn.Module) -> torch.Size:
    """The shape of what `stage` of `net` gets from a batch of two 32x32 images; checks the logits' shape too."""
    seen = []
    hook = stage.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["resnet18", "resnet18d", "resnetv2_18"])  # plain, deep, pre-activation stems
def test_the_cifar_stem_keeps_32x32_maps_up_to_the_first_stage(name: str):
    net = TimmNet(name, num_classes=3, options=TINY_RESNET)
    stages = net.model.layer1 if hasattr(net.model, "layer1") else net.model.stages[0]
    assert first_stage_input(net, stages)[-2:] == (32, 32)
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert (first.kernel_size, first.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())

    imagenet = TimmNet(name, num_classes=3, cifar_stem=False, options=TINY_RESNET)
    stages = imagenet.model.layer1 if hasattr(imagenet.model, "layer1") else imagenet.model.stages[0]
    assert first_stage_input(imagenet, stages)[-2:] == (8, 8)  # timm's own stem: stride 2, then max-pool 2


def test_wide_resnet_groups_run_at_32_16_8_pixels_with_dropout_between_convs():
    net = WideResNet(num_classes=3, depth=10, widen_factor=2, dropout=0.3)
    blocks = [m for m in net.features if m.__class__.__name__ == "WideBlock"]
    assert len(blocks) == 3  # (10 - 4) / 6 = 1 per group
    shapes = [first_stage_input(net, block) for block in blocks]
    assert [tuple(s[1:]) for s in shapes] == [(16, 32, 32), (32, 32, 32), (64, 16, 16)]  # 16, 16k, 32k channels
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(net.train()(x), net(x))  # dropout draws differ
        assert torch.equal(net.eval()(x), net(x))


def test_full_size_nets_have_the_papers_parameter_counts():
    count = lambda net: sum(p.numel() for p in net.parameters())
    with torch.device("meta"):  # no memory, no initialization time
        assert count(TimmNet("resnet18")) == 11_173_962  # kuangliu/pytorch-cifar's ResNet18, layer for layer
        assert count(TimmNet("resnet18", cifar_stem=False)) == 11_181_642  # + 64 * 3 * (49 - 9): a 7x7 conv
        assert count(WideResNet()) == 36_479_194  # WRN-28-10: the paper's 36.5M
        assert count(WideResNet(depth=16, widen_factor=8)) == 10_961_370  # WRN-16-8: 11.0M


def test_net_mistakes_are_user_errors_that_say_what_to_do():
    with pytest.raises(UserError, match=r"'resnet1800' is not a timm model: see timm.list_models\('resnet\*'\)"):
        TimmNet("resnet1800")
    with torch.device("meta"), pytest.raises(UserError, match="not convnext_atto .*cifar_stem false"):
        TimmNet("convnext_atto")
    with torch.device("meta"):
        assert TimmNet("convnext_atto", num_classes=3, cifar_stem=False).model.num_classes == 3
    with pytest.raises(UserError, match="options: timm's resnet18 does not take them"):
        TimmNet("resnet18", options={"no_such_option": 1})
    for depth in (12, 4):
        with pytest.raises(UserError, match=f"depth {depth}: a WideResNet's depth is 6n \\+ 4"):
            WideResNet(depth=depth)


@pytest.mark.parametrize(("config", "name"), [("resnet18", "TimmNet"), ("wrn28_10", "WideResNet")])
def test_the_classic_configs_full_size_nets_export_and_serve_their_probabilities(config, name, one_step_fits,
                                                                                 tmp_path: Path):  # fmt: skip
    """configs/resnet18.yaml and configs/wrn28_10.yaml as they are (ResNet-18, WRN-28-10), fitted for one step on
    tiny data and tested by the config loop (tests/test_config.py), then exported in both formats and served."""
    ckpt = one_step_fits[config].checkpoint
    model = load_model(ckpt)  # strict: every weight
    assert type(model.net).__name__ == name
    if name == "TimmNet":
        assert model.net.model.conv1.stride == (1, 1)  # rebuilt with its CIFAR stem
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(images).softmax(dim=-1)
    for fmt in ("onnx", "torch_export"):
        path = tmp_path / f"model.{fmt}"
        main(["export", "--ckpt_path", str(ckpt), "--format", fmt, "--output", str(path)])
        probs, classes = run_exported(fmt, path, images)
        assert probs.numpy() == pytest.approx(expected.numpy(), abs=1e-5), fmt
        assert classes == CLASSES

    api = ClassifierAPI(load_model(ckpt), top=1, max_batch_size=4, batch_timeout=0.0)  # what `serve` runs on each batch
    api.setup("cpu")
    requests = [api.decode_request(images[:2].numpy()), api.decode_request(images[2:].numpy())]  # one batch of two
    answers = [api.encode_response(output) for output in api.unbatch(api.predict(api.batch(requests)))]
    top = [prediction[0] for answer in answers for prediction in answer["predictions"]]
    assert [p["class"] for p in top] == [CLASSES[c] for c in expected.argmax(-1).tolist()]
    assert [p["probability"] for p in top] == pytest.approx(expected.amax(-1).tolist(), abs=1e-5)


def test_the_nets_are_documented_and_configured_from_the_command_line(tmp_path: Path, monkeypatch, capsys):
    def printed(*args: str) -> str:
        capsys.readouterr()
        code = exit_code(list(args))
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out

    text = printed("fit", "--model.net.help", "cifar.nets.TimmNet")
    assert "--model.net.cifar_stem" in text and "resnetv2_" in text  # the families it covers
    text = printed("fit", "--model.net.help", "cifar.nets.WideResNet")
    assert "--model.net.widen_factor" in text and "Dropout probability between the two convs" in text
    config = printed(
        "fit",
        "--config",
        CONFIG,
        "--model.net",
        "cifar.nets.TimmNet",
        "--model.net.init_args.name",
        "resnet18",
        "--print_config",
    )
    assert "name: resnet18" in config and "cifar_stem: true" in config and "pretrained: false" in config

    monkeypatch.chdir(tmp_path)  # where the failed fit's run directory goes
    error = cli_error(["fit", "--config", CONFIG, "--trainer.logger", "false", "--model.net", "cifar.nets.WideResNet",
                       "--model.net.init_args.depth", "12"], capsys)  # fmt: skip
    assert "--model.net.init_args.depth 12" in error and "6n + 4" in error

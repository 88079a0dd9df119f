"""The fast recipe's parts (configs/fast.yaml), each on tiny data: nets, Muon, schedule, augmentation, TTA."""

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, FAST_CONFIG, ROOT, ScalarReads, cli_error, make_folder_data, only, options
from lightning.pytorch import Callback, Trainer

from cifar.augment import translate
from cifar.cli import load_model, main
from cifar.data import CIFAR10DataModule
from cifar.errors import UserError
from cifar.module import LitModel
from cifar.nets import AirbenchNet, TutorialCNN
from cifar.optim import Muon, PiecewiseLinearLR, WarmupCosineLR, orthogonalize

TINY = ["--data.batch_size", "16", "--data.val_size", "12", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.precision", "32"]  # fmt: skip


def training_at(epoch: int, batch: int = 0, **more) -> SimpleNamespace:
    """What a data module reads of its Trainer while training (epoch, this batch's place in it, rank), faked."""
    progress = SimpleNamespace(current=SimpleNamespace(ready=batch))
    return SimpleNamespace(training=True, current_epoch=epoch, global_rank=0, **more,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))  # fmt: skip


def test_translate_is_a_reflected_shift_of_each_image_within_range():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(translate(images, 0), images)
    shifted = translate(images, 2)
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect")
    views = torch.stack([padded[:, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)], 1)
    matches = (views == shifted.float()[:, None]).flatten(2).all(-1)  # (image, shift)
    assert matches.any(1).all()  # every output is one of the 25 reflected shifts of its own image
    assert matches[:, 12].float().mean() < 0.5  # and most are not the unshifted centre (p = 1/25)
    assert shifted.dtype == torch.uint8


def test_flips_on_training_batches_only(folder_data):
    dm = CIFAR10DataModule(str(folder_data), val_size=12, flip="alternating", translate=0)
    dm.setup("fit")
    batch = (dm.train_dataset.images[:4], dm.train_dataset.targets[:4])
    dm.trainer = training_at(epoch=0)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], batch[0])
    dm.trainer.current_epoch = 1  # odd epochs: every image mirrored
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], batch[0].flip(-1))
    dm.trainer.training = False  # validation and test batches are never augmented
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], batch[0])

    plain = CIFAR10DataModule(str(folder_data), val_size=12)
    plain.setup("fit")  # alternating also starts a random half of the training images mirrored
    flipped = (dm.train_dataset.images == plain.train_dataset.images.flip(-1)).flatten(1).all(1)
    same = (dm.train_dataset.images == plain.train_dataset.images).flatten(1).all(1)
    assert (flipped | same).all() and 0 < flipped.sum() < len(flipped)

    dm = CIFAR10DataModule(str(folder_data), val_size=12, flip="random")
    dm.trainer = training_at(epoch=0)
    images = torch.randint(0, 256, (256, 3, 4, 4), dtype=torch.uint8)
    out = dm.on_after_batch_transfer((images, torch.zeros(256)), 0)[0]
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert ((out == images).flatten(1).all(1) | mirrored).all() and 0.3 < mirrored.float().mean() < 0.7


def test_brightness_and_contrast_jitter_each_training_image_in_normalized_units(folder_data):
    dm = CIFAR10DataModule(str(folder_data), val_size=12, brightness=0.2, contrast=0.3)
    dm.setup("fit")
    pixels = dm.train_dataset.images.double()
    mean, std = pixels.mean((0, 2, 3)).view(1, 3, 1, 1), pixels.std((0, 2, 3), correction=0).view(1, 3, 1, 1)
    torch.testing.assert_close(dm.augment.pixel_mean.view(1, 3, 1, 1).double(), mean, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dm.augment.pixel_std.view(1, 3, 1, 1).double(), std, rtol=1e-5, atol=1e-4)
    dm.trainer = training_at(epoch=0)
    images = dm.train_dataset.images[:24]
    out = dm.on_after_batch_transfer((images, torch.zeros(24)), 0)[0].double()
    z, z_out = (images.double() - mean) / std, (out - mean) / std
    # z_out = (z + shift) * factor per image: factor from the spread, shift from the mean
    factor = z_out.flatten(1).std(1) / z.flatten(1).std(1)
    shift = z_out.flatten(1).mean(1) / factor - z.flatten(1).mean(1)
    torch.testing.assert_close(z_out, (z + shift.view(-1, 1, 1, 1)) * factor.view(-1, 1, 1, 1), rtol=1e-5, atol=1e-5)
    assert ((factor - 1).abs() <= 0.3 + 1e-6).all() and (shift.abs() <= 0.2 + 1e-6).all()
    assert factor.std() > 0.05 and shift.std() > 0.03  # one draw per image
    dm.trainer.training = False  # evaluation batches: untouched uint8
    assert dm.on_after_batch_transfer((images, torch.zeros(24)), 0)[0] is images


def test_cutout_sets_one_square_per_training_image_to_the_pixel_mean(folder_data):
    dm = CIFAR10DataModule(str(folder_data), val_size=12, cutout=5)
    dm.setup("fit")
    fill = dm.augment.pixel_mean.round().to(torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(dm.augment.pixel_mean, dm.train_dataset.images.float().mean((0, 2, 3)))
    images = dm.train_dataset.images[:24]
    dm.trainer = training_at(epoch=0)
    out = dm.on_after_batch_transfer((images, torch.zeros(24)), 0)[0]
    changed = (out != images).any(1)  # (n, h, w)
    corners = []
    for image, square in zip(out, changed):  # the changed pixels lie in one 5x5 square, all of it the mean
        rows, cols = square.any(1).nonzero().flatten(), square.any(0).nonzero().flatten()
        top, left = int(rows.max()) - 4, int(cols.max()) - 4
        assert rows.min() >= top and cols.min() >= left and top >= 0 and left >= 0
        assert (image[:, top : top + 5, left : left + 5] == fill[0]).all()
        corners.append((top, left))
    assert len(set(corners)) > 12  # each image its own square
    assert torch.equal(dm.on_after_batch_transfer((images, torch.zeros(24)), 0)[0], out)  # the batch's generator
    dm.trainer.training = False
    assert dm.on_after_batch_transfer((images, torch.zeros(24)), 0)[0] is images

    too_big = CIFAR10DataModule(str(folder_data), val_size=12, cutout=33)
    with pytest.raises(UserError, match="--data.cutout 33 is larger than the"):
        too_big.setup("fit")


def test_deeper_conv_groups_put_all_but_their_first_conv_under_a_skip_connection():
    two = AirbenchNet(num_classes=3, widths=(8, 16, 16))  # airbench94's layout, which older checkpoints hold
    assert [k for k in two.layers[1].state_dict() if k.endswith("weight")] == ["0.weight", "2.weight", "4.weight", "5.weight"]
    three = AirbenchNet(num_classes=3, widths=(8, 16, 32), depth=3).eval()
    assert sum(isinstance(m, torch.nn.Conv2d) for m in three.modules()) == 1 + 3 * 3
    group = three.layers[2]
    x = torch.randn(2, 8, 16, 16)
    first = torch.nn.Sequential(*list(group)[:4])(x)  # conv -> pool -> BN -> act
    with torch.no_grad():
        group[4][-2].weight.zero_()  # the skipped branch's last conv: the branch adds only its BN's bias
        group[4][-1].bias.fill_(0.5)
    torch.testing.assert_close(group(x), group[5](first + 0.5))
    assert three(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(UserError, match="at least 2 convs"):
        AirbenchNet(depth=1)


def test_silu_replaces_gelu_in_the_conv_groups_only():
    net = AirbenchNet(num_classes=3, widths=(8, 16, 16), activation="silu")
    kinds = [type(m).__name__ for m in net.modules() if isinstance(m, torch.nn.GELU | torch.nn.SiLU)]
    assert kinds == ["GELU"] + ["SiLU"] * 6  # after the whitening, then two per conv group
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_airbench_net_whitens_patches_and_fits_any_size():
    net = AirbenchNet(num_classes=3)
    images = torch.randn(200, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    images[:, 1] += images[:, 0]  # correlated channels: whitening must undo this
    net.init_from_data(images)
    with torch.no_grad():
        out = F.conv2d(images, net.whiten.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = out.T @ out / len(out)
    torch.testing.assert_close(covariance, torch.eye(12), atol=0.02, rtol=0)
    assert net(images[:2]).shape == (2, 3) and net(torch.randn(2, 3, 40, 40)).shape == (2, 3)
    # hiverge's SVD of the patch covariance gives the same filters (in another order, up to sign)
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12)
    u, singular, _ = torch.linalg.svd(patches.T @ patches / len(patches))
    by_svd = (u / torch.sqrt(singular + 5e-4)).T
    ours = net.whiten.weight[:12].reshape(12, -1)
    torch.testing.assert_close((ours @ by_svd.T).abs().amax(1), ours.square().sum(1), rtol=1e-3, atol=1e-3)
    assert sum(p.numel() for p in AirbenchNet().parameters()) == pytest.approx(1.97e6, rel=0.02)


def test_muon_orthogonalizes_filter_updates_and_uses_sgd_for_the_rest():
    g = torch.randn(64, 288)
    s = torch.linalg.svdvals(orthogonalize(g, steps=5).float())
    assert 0.5 < s.min() and s.max() < 1.3  # all directions move alike, whatever g's spectrum

    net = AirbenchNet(num_classes=3)
    optimizer = Muon([p for p in net.parameters() if p.requires_grad], lr=0.1, bias_lr=2.0, head_lr=3.0)
    kinds = {g["kind"]: g for g in optimizer.param_groups}
    assert all(p.ndim == 4 for p in kinds["muon"]["params"]) and kinds["head"]["params"] == [net.head.weight]
    assert (kinds["muon"]["lr"], kinds["bias"]["lr"], kinds["head"]["lr"]) == (0.1, 2.0, 3.0)
    conv = net.layers[1][0].weight
    F.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 3, (8,))).backward()
    before = conv.detach().clone()
    optimizer.step()
    assert not torch.equal(before, conv) and conv.norm().item() == pytest.approx(len(conv) ** 0.5, rel=0.05)


def test_piecewise_linear_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = PiecewiseLinearLR(optimizer, points=[0, 0.25, 1], values=[0.2, 1, 0.0], total_steps=8)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(8):
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.4, 1.2, 2.0, 5 / 3, 4 / 3, 1.0, 2 / 3, 1 / 3, 0.0])
    with pytest.raises(ValueError, match="points must rise"):
        PiecewiseLinearLR(optimizer, points=[0, 0.5], values=[1, 0])
    steps = PiecewiseLinearLR(optimizer, points=[0, 0.5, 0.5, 1], values=[1, 1, 0.1, 0.1], total_steps=4)
    assert [steps.multiplier(step) for step in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.1])  # a repeated point


def test_warmup_cosine_schedule_is_torchs_cosine_after_a_linear_warmup():
    """WarmupCosineLR: linear from start to 1 over the warmup, then torch's CosineAnnealingLR curve over the rest;
    with no warmup, exactly CosineAnnealingLR with T_max the fit's steps and eta_min end x lr."""
    param = torch.nn.Parameter(torch.zeros(1))

    def rates(make, steps: int) -> list[float]:
        optimizer = torch.optim.SGD([param], lr=0.1)
        schedule = make(optimizer)
        lrs = [optimizer.param_groups[0]["lr"]]  # the first step's, set when the schedule is built
        for _ in range(steps):
            optimizer.step()
            schedule.step()
            lrs.append(optimizer.param_groups[0]["lr"])
        return lrs

    ours = rates(lambda o: WarmupCosineLR(o, end=0.01, total_steps=10), 10)
    torchs = rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.001), 10)
    assert ours == pytest.approx(torchs) and ours[-1] == pytest.approx(0.001)
    warm = rates(lambda o: WarmupCosineLR(o, warmup=0.2, start=0.1, total_steps=10), 10)
    assert warm[:3] == pytest.approx([0.01, 0.055, 0.1])  # linear from 0.1 x lr to lr over 2 of 10 steps
    assert warm[2:] == pytest.approx(rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8), 8))
    with pytest.raises(ValueError, match="warmup is a fraction"):
        WarmupCosineLR(torch.optim.SGD([param], lr=0.1), warmup=1.0)


class RecordFreeze(Callback):
    """At each optimizer step: the learning rate of the `freeze_after` group and whether the whitening bias
    has a gradient; after each epoch (and before the first): every parameter."""

    def __init__(self):
        self.lrs, self.has_grad, self.weights = [], [], []

    def snapshot(self, pl_module) -> None:
        self.weights.append({name: p.detach().clone() for name, p in pl_module.classifier.named_parameters()})

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshot(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        (group,) = [g for g in optimizer.param_groups if "freeze_after" in g]
        self.lrs.append(group["lr"])
        self.has_grad.append(pl_module.net.whiten.bias.grad is not None)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.snapshot(pl_module)


@pytest.mark.parametrize("schedule", ["step", "linear"])
def test_freeze_after_takes_the_learning_rate_to_zero_then_holds_the_parameter(schedule, folder_data):
    """airbench's whitening bias: its own Muon (SGD) group, trained for 2 epochs, at the scheduler's rate (step)
    or at a rate falling linearly to 0 whatever the scheduler does (linear), then at 0, and on one process without
    gradients from then on (the DDP test trains past the freeze on two: there it keeps them)."""
    model = LitModel(AirbenchNet(num_classes=3, widths=(8, 16, 16)), num_classes=3,
                     optimizer=partial(Muon, lr=0.05, bias_lr=0.05, head_lr=0.05), scheduler=PiecewiseLinearLR,
                     freeze_after={"net.whiten.bias": 2}, freeze_schedule=schedule)  # fmt: skip
    record = RecordFreeze()
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[record])  # fmt: skip
    trainer.fit(model, CIFAR10DataModule(str(folder_data), val_size=12, batch_size=16))  # 36 images: 3 batches

    if schedule == "linear":
        expected = [0.05 * max(0.0, 1 - (epoch + batch / 3) / 2) for epoch in range(3) for batch in range(3)]
    else:  # PiecewiseLinearLR's decay from 1 to 0 over the 9 steps, then 0 from the third epoch
        expected = [0.05 * (1 - step / 9) if step < 6 else 0.0 for step in range(9)]
    assert record.lrs == pytest.approx(expected) and record.lrs[6:] == [0.0] * 3
    assert record.has_grad == [True] * 6 + [False] * 3  # the backward skips it once it is frozen
    start, *after_epoch = record.weights
    bias = "net.whiten.bias"
    assert not torch.equal(start[bias], after_epoch[0][bias])  # trains in the first epochs
    assert not torch.equal(after_epoch[0][bias], after_epoch[1][bias])
    assert torch.equal(after_epoch[1][bias], after_epoch[2][bias])  # bit for bit: lr 0 moves nothing
    assert not torch.equal(after_epoch[1]["net.head.weight"], after_epoch[2]["net.head.weight"])  # the rest trains

    model = LitModel(TutorialCNN(num_classes=3), num_classes=3, freeze_after={"net.features.0.bias": 1})
    groups = model.configure_optimizers().param_groups  # the default Adam keeps the extra key too
    assert [(g.get("freeze_after"), g.get("initial_lr")) for g in groups] == [(None, None), (1, 2e-4)]
    (frozen,) = groups[1]["params"]
    assert frozen is model.net.features[0].bias and all(p is not frozen for p in groups[0]["params"])


def test_freeze_after_names_a_parameter_of_the_model():
    with pytest.raises(UserError, match=r"no parameter 'net.whiten.bais' \(it has e.g. 'net.whiten.weight'\)"):
        LitModel(AirbenchNet(num_classes=3), num_classes=3, freeze_after={"net.whiten.bais": 3})


@pytest.mark.parametrize("option", [["--model.freeze_after", "{net.whiten.bias: 0}"], ["--model.tta", "3"],
                                    ["--data.batch_size", "0"], ["--data.brightness", "-0.1"]])  # fmt: skip
def test_the_config_types_refuse_out_of_range_values_in_one_line(option, capsys):
    """Ranges are the arguments' types (jsonargparse's PositiveInt, PositiveFloat, Literal...), checked on parsing."""
    assert option[0][2:] in cli_error(["fit", "--config", FAST_CONFIG, *option], capsys)


def test_freeze_after_a_fraction_of_an_epoch_counts_in_batches(folder_data):
    """hiverge's whitening bias: trained for 0.19 epochs, its rate falling linearly to 0; here half an epoch of 3
    batches: full rate at batch 0, a third at batch 1 (1/3 epoch in), 0 from batch 2 on."""
    model = LitModel(AirbenchNet(num_classes=3, widths=(8, 16, 16)), num_classes=3,
                     optimizer=partial(Muon, lr=0.05, bias_lr=0.05, head_lr=0.05),
                     freeze_after={"net.whiten.bias": 0.5}, freeze_schedule="linear")  # fmt: skip
    record = RecordFreeze()
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[record])  # fmt: skip
    trainer.fit(model, CIFAR10DataModule(str(folder_data), val_size=12, batch_size=16))  # 36 images: 3 batches
    assert record.lrs == pytest.approx([0.05, 0.05 / 3, 0.0, 0.0, 0.0, 0.0])
    start, first, second = record.weights
    bias = "net.whiten.bias"
    assert not torch.equal(start[bias], first[bias]) and torch.equal(first[bias], second[bias])


def test_tta_averages_mirrored_and_shifted_views():
    model = LitModel(TutorialCNN(num_classes=3), num_classes=3, tta=2).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = model.normalize(images)
    net = model.net
    mirrored = lambda v: (net(v) + net(v.flip(-1))) / 2  # noqa: E731
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = (mirrored(x) + (mirrored(padded[..., :32, :32]) + mirrored(padded[..., 2:, 2:])) / 2) / 2
    with torch.no_grad():
        torch.testing.assert_close(model.evaluate(images), expected.detach())
        model.classifier.tta = 1
        torch.testing.assert_close(model.evaluate(images), mirrored(x).detach())
        model.classifier.tta = 0
        torch.testing.assert_close(model.evaluate(images), model(images))


def test_tta_fraction_gives_the_views_to_the_least_confident_images_in_validation_only():
    """hiverge's evaluation: the plain pass for every image, the full TTA for the least confident quarter."""
    model = LitModel(TutorialCNN(num_classes=3), num_classes=3, tta=2, tta_fraction=0.25).eval()
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 3, (8,))
    with torch.no_grad():
        plain, full = model(images), model.evaluate(images)
        least = plain.softmax(-1).amax(-1).argsort()[:2]  # 25% of 8
        expected = plain.clone()
        expected[least] = full[least]
        torch.testing.assert_close(model.evaluate(images, 0.25), expected)
        assert not torch.allclose(expected, full)  # the other six kept the plain logits
        _, logits = model._step((images, labels), "val")
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(model.predict_step((images, labels), 0), full.softmax(-1))  # predict: every image
        torch.testing.assert_close(model.evaluate(images[:1], 0.25), full[:1])  # at least one image gets the views
    with pytest.raises(UserError, match=r"tta_fraction must be in \(0, 1\], not 0"):
        LitModel(TutorialCNN(num_classes=3), num_classes=3, tta=2, tta_fraction=0)


def test_label_smoothing_applies_to_the_training_loss_only():
    model = LitModel(TutorialCNN(num_classes=3), num_classes=3, label_smoothing=0.2)
    images, labels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])
    logits = model(images)
    loss, train_logits = model._step((images, labels), "train")
    torch.testing.assert_close(train_logits, logits)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.2).item(), rel=1e-5)
    model._step((images, labels), "val")
    assert model.losses["val_loss"].compute().item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_fast_config_fits_and_tests_without_validation(tmp_path, monkeypatch):
    """configs/fast.yaml end to end on tiny data: whitening from the data, the schedule over the whole fit,
    the whitening bias frozen after its epochs, TTA in test; and `val_size 0` (all images train) works."""

    data = make_folder_data(tmp_path / "data", per_class=24)
    monkeypatch.chdir(tmp_path)
    common = options(data, *TINY, "--data.test_size", "6", config=FAST_CONFIG)
    main(["fit", *common, "--data.val_size", "0", "--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "4",
          "--trainer.callbacks+", "ModelCheckpoint", "--trainer.callbacks.init_args.save_top_k", "-1",
          "--trainer.callbacks.init_args.monitor", "train_loss", "--trainer.callbacks.init_args.filename", "{epoch}",
          "--trainer.callbacks.init_args.save_on_train_epoch_end", "true"])  # fmt: skip
    (run,) = Path("runs/fast").glob("*-fit*")
    ckpt = {p.name: torch.load(p, weights_only=True) for p in (run / "checkpoints").glob("*.ckpt")}
    assert {"epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt", "epoch=3.ckpt", "last.ckpt"} <= set(ckpt)
    state = lambda name: ckpt[name]["state_dict"]  # noqa: E731
    whiten = state("last.ckpt")["classifier.net.whiten.weight"]
    assert whiten.abs().sum() > 0 and torch.equal(whiten, state("epoch=0.ckpt")["classifier.net.whiten.weight"])  # fixed
    bias = lambda name: state(name)["classifier.net.whiten.bias"]  # noqa: E731
    assert not torch.equal(bias("epoch=1.ckpt"), bias("epoch=2.ckpt"))  # trained for 3 epochs (freeze_after)
    assert torch.equal(bias("epoch=2.ckpt"), bias("epoch=3.ckpt"))  # then fixed
    groups = ckpt["last.ckpt"]["optimizer_states"][0]["param_groups"]  # the config's values, not Adam's leftovers
    assert [(g["kind"], g["initial_lr"], g.get("freeze_after")) for g in groups] == [
        ("muon", 0.205, None), ("bias", 88.0, None), ("head", 831.7, None), ("bias", 88.0, 3)]  # fmt: skip
    assert groups[1]["weight_decay"] * 88.0 == pytest.approx(0.0016)
    assert ckpt["last.ckpt"]["run"]["config"]["model"]["freeze_after"] == {"net.whiten.bias": 3}
    schedule = ckpt["last.ckpt"]["lr_schedulers"][0]
    assert schedule["total_steps"] == ckpt["last.ckpt"]["global_step"] == 4 * 5  # 66 train images / 16 per batch
    assert schedule["_last_lr"][0] == pytest.approx(0.0, abs=1e-9)  # decayed to zero at the last step

    main(["test", *common, "--ckpt_path", "last"])  # with TTA on the least confident quarter
    report = json.loads(only(Path("runs/fast").glob("*-test-*/test_report.json")).read_text())
    dm = CIFAR10DataModule(str(data), val_size=12, test_size=6)  # the split typed in `common`: 6 test images
    dm.setup("test")
    model = load_model(run / "checkpoints" / "last.ckpt")  # the model the test scored
    with torch.no_grad():  # one batch of 6: the least confident quarter of the batch, as the test step has it
        right = model.evaluate(dm.test_dataset.images, 0.25).argmax(-1) == dm.test_dataset.targets
    assert report["metrics"]["test_acc"] == pytest.approx(right.float().mean().item())


def test_the_95_percent_config_is_the_fast_recipe_wider_and_longer(one_step_fits):
    """configs/fast95.yaml: fast.yaml's recipe (optimizer, schedule, augmentation, TTA) with the net's widths
    128/384/384 and 15 epochs; it builds that net, fits and tests end to end (one step here: one_step_fits)."""
    import yaml

    fast, fast95 = (yaml.safe_load((ROOT / "configs" / name).read_text()) for name in ("fast.yaml", "fast95.yaml"))
    assert fast95["model"]["net"]["init_args"].pop("widths") == [128, 384, 384]
    assert (fast95["trainer"].pop("max_epochs"), fast95["trainer"].pop("check_val_every_n_epoch")) == (15, 15)
    assert fast95["trainer"].pop("default_root_dir") == "runs/fast95"
    for key in ("max_epochs", "check_val_every_n_epoch", "default_root_dir"):
        fast["trainer"].pop(key)
    assert fast95 == fast  # nothing else differs

    shapes = one_step_fits["fast95"].shapes  # the fitted model's weights
    assert shapes["classifier.net.head.weight"] == (len(CLASSES), 384)


def test_the_96_percent_config_is_the_95_percent_one_with_airbench96s_changes(one_step_fits):
    """configs/fast96.yaml: fast95.yaml with airbench96's net (128/384/512, 3 convs a group), 4-pixel shifts,
    12-pixel cutout and more epochs; it builds that net, fits, and its checkpoint tests (one step: one_step_fits)."""
    import yaml

    fast95, fast96 = (yaml.safe_load((ROOT / "configs" / name).read_text()) for name in ("fast95.yaml", "fast96.yaml"))
    net = fast96["model"]["net"]["init_args"]
    assert (net.pop("widths"), net.pop("depth")) == ([128, 384, 512], 3)
    assert (fast96["data"].pop("translate"), fast96["data"].pop("cutout")) == (4, 12)
    epochs = fast96["trainer"].pop("max_epochs")
    assert fast96["trainer"].pop("check_val_every_n_epoch") == epochs > 15
    assert fast96["trainer"].pop("default_root_dir") == "runs/fast96"
    for key in ("max_epochs", "check_val_every_n_epoch", "default_root_dir"):
        fast95["trainer"].pop(key)
    fast95["model"]["net"]["init_args"].pop("widths")
    fast95["data"].pop("translate")
    assert fast96 == fast95  # nothing else differs

    shapes = one_step_fits["fast96"].shapes  # the fitted model's weights
    assert shapes["classifier.net.head.weight"] == (len(CLASSES), 512)
    assert shapes["classifier.net.layers.3.4.3.weight"] == (512, 512, 3, 3)  # the third conv of group 3


def test_any_torchvision_model_plugs_in_from_the_command_line(folder_data, tmp_path, monkeypatch, capsys):
    """(Lightning's EMA from the command line: tests/test_average.py.)"""
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(ROOT / "configs" / "cifar.yaml"), "--data.data_dir", str(folder_data), *TINY,
              "--trainer.max_epochs", "1", "--model.net", "cifar.nets.TorchvisionNet"]  # fmt: skip
    main(["fit", *common, "--model.net.init_args.name", "resnet18"])
    (run,) = Path("runs/cifar").glob("*-fit*")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["run"]["config"]["model"]["net"]["init_args"]["name"] == "resnet18"
    assert last["state_dict"]["classifier.net.model.fc.weight"].shape == (len(CLASSES), 512)  # num_classes linked

    error = cli_error(["fit", *common, "--model.net.init_args.name", "resnet1800"], capsys)
    assert "'resnet1800'" in error and "not a torchvision classification model" in error


def test_data_moves_to_the_accelerator_once(folder_data, monkeypatch):
    """On a GPU the uint8 images live on the device, moved there once at set-up, never per batch; "meta" stands
    in for it here (no GPU in CI)."""
    moves = []
    to = torch.Tensor.to

    def counted(tensor, *args, **kwargs):
        moved = to(tensor, *args, **kwargs)
        if moved.device != tensor.device:
            moves.append(tuple(tensor.shape))
        return moved

    monkeypatch.setattr(torch.Tensor, "to", counted)
    monkeypatch.setattr("cifar.data.batch_generator", lambda *args: None)  # "meta" has no random generator
    dm = CIFAR10DataModule(str(folder_data), val_size=12, test_size=6, flip="random", brightness=0.1)
    dm.trainer = training_at(epoch=0, strategy=SimpleNamespace(root_device=torch.device("meta")), world_size=1)
    dm.setup("fit")
    dm.setup("validate")  # Lightning sets up each stage: nothing moves twice
    assert {dm.train_dataset.images.device.type, dm.val_dataset.targets.device.type} == {"meta"}
    datasets = sorted([(30, 3, 32, 32), (30,), (12, 3, 32, 32), (12,), (6, 3, 32, 32), (6,)])
    assert sorted(moves) == datasets  # images and labels of train, val and test: once each
    for batch in dm._loader(dm.train_dataset):  # every batch of an epoch, augmented where it is
        images, _ = dm.on_after_batch_transfer(batch, 0)
        assert images.device.type == "meta"
    # and the jitter's statistics, once, and each batch's index (30 images: one batch): never images again
    assert sorted(moves) == sorted([*datasets, (3,), (3,), (30,)])
    off = CIFAR10DataModule(str(folder_data), val_size=12, data_on_device=False)
    off.trainer = dm.trainer
    off.setup("fit")
    assert off.train_dataset.images.device.type == "cpu"


def test_a_training_step_never_reads_a_tensor_back_to_the_host():
    """The hot path (batch augmentation, forward, metric updates, backward, Muon step) and an evaluation
    step with TTA on the least confident quarter: any read of a tensor's value on the host there (`.item()`,
    `.tolist()`, `if tensor:`, or one inside an op: `aten._local_scalar_dense`, counted as tests/test_hotpath.py
    counts them for a whole fit) would be a GPU sync every step."""

    model = LitModel(AirbenchNet(num_classes=3, widths=(8, 16, 16)), num_classes=3, tta=2, tta_fraction=0.25)
    dm = CIFAR10DataModule("unused", flip="random", translate=2, brightness=0.1, contrast=0.1)
    dm.augment.pixel_mean, dm.augment.pixel_std = torch.full((3,), 120.0), torch.full((3,), 60.0)
    dm.trainer = training_at(epoch=1)
    optimizer = Muon(model.parameters(), lr=0.1, bias_lr=0.1, head_lr=0.1)
    batch = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 3, (8,))

    with ScalarReads() as reads:
        loss, _ = model._step(dm.on_after_batch_transfer(batch, 0), "train")
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model._step(batch, "val")
    assert reads.count == 0
    assert model.scores["train_scores"]["acc"].compute().item() >= 0 and model.losses["val_loss"].compute().item() > 0


@pytest.mark.parametrize("has_bf16", [False, True])
def test_muon_iterates_in_float32_on_a_cpu_without_bf16_instructions(has_bf16, monkeypatch):
    """Emulated bf16 matmuls are ~37x slower than float32 (an AVX2 EPYC): Newton-Schulz multiplies in float32 on
    such a CPU, in bf16 on one with bf16 instructions."""
    monkeypatch.setattr("cifar.cpu.has_bf16", lambda: has_bf16)
    dtypes, matmul = set(), torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: dtypes.add(a.dtype) or matmul(a, b))
    assert orthogonalize(torch.randn(16, 72), steps=2).dtype == torch.float32
    assert dtypes == {torch.bfloat16 if has_bf16 else torch.float32}

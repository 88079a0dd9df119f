"""The regularizers of whole training batches (cifar/augment.py): torchvision's policies image by image, mixup and
cutmix, random erasing; each drawn from the batch's own key, so resume is exact and each DDP rank draws its own."""

import pytest
import torch
from conftest import ScalarReads, exit_code
from torchvision.transforms import v2

from cifar.augment import BatchAugment, each_image, erase, mix, seeded
from cifar.resume import batch_generator

POLICIES = ["randaugment", "trivialaugment", "autoaugment"]


def smooth_images(n: int, size: int = 16) -> torch.Tensor:
    """n copies of one image with structure every op changes (gradients, not noise, so a rotate shows)."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size]).to(torch.uint8)
    return image.expand(n, -1, -1, -1).contiguous()


@pytest.mark.parametrize("policy", POLICIES)
def test_each_image_draws_its_own_policy_op(policy):
    """32 copies of one image through the policy: many different results, uint8 as they came; the policy called on
    the batch (torchvision's way) gives one result for all, which is the pitfall each_image avoids."""
    images = smooth_images(32)
    augment = BatchAugment(policy=policy)
    out = augment(images, 0, batch_generator(images.device, 0, 0, 0, 0))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert len(torch.unique(out.flatten(1), dim=0)) >= 8
    torch.manual_seed(0)
    whole = augment.policy(images)
    assert len(torch.unique(whole.flatten(1), dim=0)) == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_draws_depend_on_the_batch_alone_and_leave_the_global_state_alone(policy):
    """(seed, rank, epoch, batch) alone fix the policy's draws, whatever the global random state; the global state
    after the batch is the one before it; another rank draws other ops."""
    images = smooth_images(16)
    augment = BatchAugment(policy=policy)

    def draw(seed=1, rank=0, epoch=0, batch=5):
        return augment(images, epoch, batch_generator(images.device, seed, rank, epoch, batch))

    torch.manual_seed(0)
    first = draw()
    torch.manual_seed(123)  # another global state: no effect
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    assert torch.equal(draw(), first)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    for other in (dict(rank=1), dict(batch=6), dict(epoch=2), dict(seed=2)):
        assert not torch.equal(draw(**other), first), other


def test_seeded_restores_the_global_state_even_when_the_op_fails():
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError), seeded(7, torch.device("cpu")):
        a = torch.rand(3)
        raise RuntimeError
    assert torch.equal(torch.get_rng_state(), before)
    with seeded(7, torch.device("cpu")):
        assert torch.equal(torch.rand(3), a)
    assert torch.equal(torch.get_rng_state(), before)


def test_each_image_is_the_policy_image_by_image_in_the_seeded_state():
    """each_image is exactly torchvision's transform on each image in turn, in the state seeded with the key."""
    images = smooth_images(6)
    transform = v2.TrivialAugmentWide()
    torch.manual_seed(11)
    expected = torch.stack([transform(image) for image in images])
    assert torch.equal(each_image(transform, images, 11), expected)


def test_mixup_targets_are_the_images_shares():
    """Mixup: each image is lambda of itself and 1 - lambda of its partner in the reversed batch, and its target the
    same mix of their one-hot labels (rows summing to 1); the dominant label is the one with the larger share."""
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randperm(10)  # distinct: each row's two shares can be read off
    mixed, targets = mix(images, labels, 10, key=3, mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0)
    assert targets.shape == (10, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(10))
    lam = targets[torch.arange(10), labels]
    assert ((lam > 0) & (lam < 1)).all() and torch.equal(lam, lam[:1].expand(10))  # one lambda a batch
    torch.testing.assert_close(targets[torch.arange(10), labels.flip(0)], 1 - lam)
    expected = images.float() * lam[0] + images.flip(0).float() * (1 - lam[0])
    torch.testing.assert_close(mixed, expected)
    dominant = labels if lam[0] > 0.5 else labels.flip(0)
    assert torch.equal(targets.argmax(-1), dominant)


def test_cutmix_lambda_is_the_share_of_the_image_left():
    """Cutmix: one box of each image is its partner's; the target's own share is the area left, over many draws
    (boxes clipped at the border included)."""
    images = (torch.arange(8) * 20).view(8, 1, 1, 1).expand(8, 3, 16, 16).to(torch.uint8)  # image i: all 20 * i
    labels = torch.arange(8)
    for key in range(20):
        mixed, targets = mix(images, labels, 8, key=key, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0)
        assert mixed.dtype == torch.uint8
        pasted = (mixed != images).any(1).float().mean((1, 2))  # (8,) share of each image from its partner
        torch.testing.assert_close(targets[torch.arange(8), labels], 1 - pasted)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))


def test_mix_prob_and_the_switch_between_mixup_and_cutmix():
    """With both alphas on, batches get mixup (float pixels) or cutmix (uint8) at even odds, and `prob` of them are
    mixed at all; the rest keep their images and one-hot targets."""
    images, labels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.arange(4)
    kinds = []
    for key in range(400):
        mixed, targets = mix(images, labels, 4, key=key, mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.6)
        if torch.equal(targets, torch.eye(4)):
            kinds.append("none" if mixed is images else "cutmix")  # a cutmix box can be empty after clipping
        else:
            kinds.append("mixup" if mixed.is_floating_point() else "cutmix")
    assert 0.33 < kinds.count("none") / 400 < 0.47
    assert 0.22 < kinds.count("mixup") / 400 < 0.38 and 0.22 < kinds.count("cutmix") / 400 < 0.38


def test_mix_draws_depend_on_the_batch_alone():
    """BatchAugment.mix: the same batch (seed, rank, epoch, batch) mixes alike whatever the global random state,
    another rank or batch otherwise; with no alpha on, labels pass through as they are (no soft targets)."""
    augment = BatchAugment(mixup_alpha=0.2, cutmix_alpha=1.0)
    images, labels = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])

    def draw(seed=1, rank=0, epoch=0, batch=5):
        return augment.mix(images, labels, 3, batch_generator(images.device, seed, rank, epoch, batch))

    torch.manual_seed(0)
    first = draw()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert all(torch.equal(a, b) for a, b in zip(draw(), first))
    assert torch.equal(torch.get_rng_state(), state)
    for other in (dict(rank=1), dict(batch=6), dict(epoch=2), dict(seed=2)):
        assert not all(torch.equal(a, b) for a, b in zip(draw(**other), first)), other
    assert BatchAugment().mix(images, labels, 3, batch_generator(images.device, 1, 0, 0, 5)) == (images, labels)


def test_erasing_sets_one_rectangle_inside_about_p_of_the_images():
    """Random erasing of 2000 images: about p of them get one whole rectangle (inside the image, never all of it) of
    the fill; the erased areas are distributed as torchvision's RandomErasing draws them."""
    n, size, p = 2000, 16, 0.4
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    mean, std = torch.tensor([200.0, 150.0, 100.0]), torch.tensor([1.0, 1.0, 1.0])
    out = erase(images, p, "mean", mean, std, torch.Generator().manual_seed(0))
    mask = (out != 0).all(1)  # (n, h, w)
    assert torch.equal((out != 0).any(1), mask)  # every channel of an erased pixel
    assert torch.equal(
        out.permute(0, 2, 3, 1)[mask], torch.tensor([200, 150, 100], dtype=torch.uint8).expand(int(mask.sum()), 3)
    )
    erased = mask.flatten(1).any(1)
    assert abs(erased.float().mean() - p) < 0.04
    rows, cols = mask.any(2), mask.any(1)  # (n, h), (n, w): the box spanned
    assert torch.equal(mask.flatten(1).sum(1), rows.sum(1) * cols.sum(1))  # the mask fills its box: a rectangle
    assert (rows.sum(1) < size).all() and (cols.sum(1) < size).all()
    ours = mask.flatten(1).sum(1)[erased].float().mean() / size**2
    torchvision = v2.RandomErasing(p=1.0)
    torch.manual_seed(0)
    theirs = torch.stack([(torchvision(torch.ones(3, size, size)) == 0).all(0).float().mean() for _ in range(2000)])
    assert abs(ours - theirs.mean()) < 0.015, (ours, theirs.mean())


def test_erasing_random_fill_is_per_pixel_and_drawn_from_the_batch():
    augment = BatchAugment(erasing=1.0)
    augment.prepare(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), torch.Generator().manual_seed(0))
    images = torch.zeros(16, 3, 8, 8, dtype=torch.uint8)
    out = augment(images, 0, batch_generator(images.device, 1, 0, 0, 5))
    erased = out[(out != 0).all(1, keepdim=True).expand_as(out)]
    assert len(erased) > 100 and len(torch.unique(erased)) > 20  # mean +- std of the pixels, not one value
    torch.manual_seed(9)
    assert torch.equal(augment(images, 0, batch_generator(images.device, 1, 0, 0, 5)), out)
    assert not torch.equal(augment(images, 0, batch_generator(images.device, 1, 1, 0, 5)), out)  # rank 1


def test_the_options_are_in_print_config_and_documented_in_help(capsys):
    """`fit --print_config` lists each option at its default (off), `--print_config=comments` and `fit --help` with
    its doc; a magnitude past torchvision's 31 bins is the user's error, said in one line."""
    import yaml

    from cifar.data import CIFAR10DataModule
    from cifar.errors import UserError

    options = {"policy": "none", "randaugment_ops": 2, "randaugment_magnitude": 9, "erasing": 0.0,
               "erasing_fill": "random", "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0}  # fmt: skip
    assert exit_code(["fit", "--print_config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert {name: data[name] for name in options} == options
    assert exit_code(["fit", "--print_config=comments"]) == 0
    commented = " ".join(line.strip("# ") for line in capsys.readouterr().out.splitlines())  # YAML comments, wrapped
    assert exit_code(["fit", "--help"]) == 0
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps the docs
    docs = ["each training image drawing its own ops", "Ops applied in turn to each image by `randaugment`",
            "Random erasing (Zhong et al. 2020)", "What erased pixels become", "Mixup (Zhang et al. 2018)",
            "Cutmix (Yun et al. 2019)", "counts a prediction right when it is the target's dominant label",
            "The probability that a batch is mixed"]  # fmt: skip
    for doc in docs:
        assert doc in usage and doc in commented, doc
    with pytest.raises(UserError, match="randaugment_magnitude 31 is out of range"):
        CIFAR10DataModule(randaugment_magnitude=31)


def test_the_model_trains_on_soft_targets_and_scores_their_dominant_label():
    """LitModel's training step on mixed targets: the loss is cross-entropy with the target probabilities (label
    smoothing on top), train_acc the share of predictions that are the target's dominant label."""
    import torch.nn.functional as F

    from cifar.module import LitModel
    from cifar.nets import TutorialCNN

    torch.manual_seed(0)
    model = LitModel(net=TutorialCNN(num_classes=4), num_classes=4, label_smoothing=0.1)
    images, labels = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 4, (32,))
    _, targets = mix(images, labels, 4, key=1, mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0)
    loss, logits = model._step((images, targets), "train")
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, label_smoothing=0.1))
    right = (logits.argmax(-1) == targets.argmax(-1)).float().mean()
    assert 0 < right < 1  # the check below can tell the dominant label from another
    torch.testing.assert_close(model.scores["train_scores"].compute()["train_acc"], right)


def test_erasing_and_mixing_read_nothing_back_to_the_host():
    """No `.item()` and the like in erasing and mixing (on a GPU, each would be a host sync every step): the mix's
    draws are host numbers from the batch's key; F.one_hot, which reads the labels' range, is not used."""

    augment = BatchAugment(erasing=0.5, mixup_alpha=0.2, cutmix_alpha=1.0)
    augment.prepare(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), torch.Generator().manual_seed(0))
    images, labels = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (16,))
    with ScalarReads() as reads:
        for batch in range(8):  # both kinds of mix among them
            generator = batch_generator(images.device, 1, 0, 0, batch)
            augment.mix(augment(images, 0, generator), labels, 10, generator)
    assert reads.count == 0

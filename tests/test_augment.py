"""The regularizers of whole training batches (cifar/augment.py): torchvision's policies image by image, mixup and
cutmix, random erasing; each drawn from the batch's own key, so resume is exact and each DDP rank draws its own."""

import pytest
import torch
from torchvision.transforms import v2

from cifar.augment import BatchAugment, batch_generator, each_image, seeded

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

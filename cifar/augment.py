"""Training-time augmentation of whole uint8 batches (N, 3, H, W) where they are (on the GPU when training there):
flips, shifts, brightness and contrast jitter, cutout; one draw per image from the batch's own generator, no loop
over images in Python. The policies of torchvision (RandAugment, TrivialAugmentWide, AutoAugment) draw from the
global random state, one op for a whole batch: they run image by image, in a forked global state seeded from the
batch's key (`seeded`)."""

import contextlib
import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from cifar.errors import UserError
from cifar.resume import batch_key


def reflect(index: Tensor, size: int) -> Tensor:
    """Indices past either edge mirrored back inside (edge not repeated), as `F.pad(mode="reflect")`."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


@contextlib.contextmanager
def seeded(key: int, device: torch.device):
    """The one place that lends the global random state to library ops that only draw from it: inside, it is seeded
    with `key` (the CPU's, and `device`'s when a GPU); after, it is as it was. One intra-op thread meanwhile on the
    CPU: ops on single images are too small to share out, and the pool's handoffs cost up to 100x the op on a busy
    machine (bench/RESULTS.md)."""
    cuda = [device] if device.type == "cuda" else []
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(key)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(key)  # this device's only (torch.manual_seed would reseed every GPU)
        try:
            torch.set_num_threads(1)
            yield
        finally:
            torch.set_num_threads(threads)


POLICIES = {
    "randaugment": lambda ops, magnitude: v2.RandAugment(num_ops=ops, magnitude=magnitude),
    "trivialaugment": lambda ops, magnitude: v2.TrivialAugmentWide(),
    "autoaugment": lambda ops, magnitude: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
}


def each_image(transform: nn.Module, images: Tensor, key: int | None) -> Tensor:
    """`transform` applied to each image on its own, so each draws its own op and magnitude (a torchvision policy
    called on a batch draws once for all of it), in the global random state seeded with `key` (None: as it is)."""
    with seeded(key, images.device) if key is not None else contextlib.nullcontext():
        return torch.stack([transform(image) for image in images])


def translate(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Each image shifted by its own random (dy, dx) in [-max_shift, max_shift]^2 pixels, the border reflected:
    one gather for the whole batch, any dtype."""
    n, _, h, w = images.shape
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2, n, 1), device=images.device, generator=generator)
    rows = reflect(torch.arange(h, device=images.device) + dy, h)  # (n, h)
    cols = reflect(torch.arange(w, device=images.device) + dx, w)  # (n, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (n, h, w, c) -> (n, c, h, w)


def jitter(images: Tensor, mean: Tensor, std: Tensor, brightness: float, contrast: float,
           generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Brightness and contrast jitter, one random draw per image: in normalized units z = (x - mean) / std,
    z -> (z + u * brightness) * (1 + v * contrast) with u, v uniform in [-1, 1]. Float pixels in, float out."""
    n = len(images)
    shift = (torch.rand(n, 1, 1, 1, device=images.device, generator=generator) * 2 - 1) * brightness
    factor = (torch.rand(n, 1, 1, 1, device=images.device, generator=generator) * 2 - 1) * contrast + 1
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    return (images.float() - mean + shift * std) * factor + mean  # the same, back in pixels


def cutout(images: Tensor, size: int, fill: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each image with one random size x size square (wholly inside it) set to `fill` (per channel, in pixels: the
    training pixels' mean, which is 0 once normalized, as airbench96's cutout of normalized images)."""
    n, _, h, w = images.shape
    top = torch.randint(0, h - size + 1, (n, 1), device=images.device, generator=generator)
    left = torch.randint(0, w - size + 1, (n, 1), device=images.device, generator=generator)
    y, x = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    rows, cols = (y >= top) & (y < top + size), (x >= left) & (x < left + size)  # (n, h), (n, w)
    square = (rows[:, :, None] & cols[:, None, :])[:, None]  # (n, 1, h, w)
    fill = fill.to(images.dtype) if images.is_floating_point() else fill.round().to(images.dtype)
    return torch.where(square, fill.view(1, -1, 1, 1), images)


def erase(images: Tensor, p: float, fill: Literal["random", "mean"], mean: Tensor, std: Tensor,
          generator: torch.Generator | None = None, scale=(0.02, 0.33), ratio=(0.3, 3.3),
          tries: int = 10) -> Tensor:  # fmt: skip
    """Random erasing (Zhong et al. 2020) as torchvision's `RandomErasing` draws it, for the whole batch at once:
    with probability `p`, one rectangle of each image (area a `scale` fraction, height/width a `ratio`, the first of
    `tries` draws that fits, none if none fits) set to `fill`: `random`, each pixel normal in normalized units
    (mean + std * z, timm's "pixel" mode); `mean`, the training pixels' mean (0 once normalized, torchvision's)."""
    n, _, h, w = images.shape
    device = images.device
    area = h * w * torch.empty(n, tries, device=device).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, tries, device=device).uniform_(*map(math.log, ratio), generator=generator)
    heights, widths = (area * log_ratio.exp()).sqrt().round(), (area / log_ratio.exp()).sqrt().round()
    fits = (heights < h) & (widths < w)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 when none does: then not erased)
    height, width = heights.gather(1, first), widths.gather(1, first)  # (n, 1)
    erased = (torch.rand(n, 1, device=device, generator=generator) < p) & fits.any(1, keepdim=True)
    top = (torch.rand(n, 1, device=device, generator=generator) * (h - height + 1)).floor()
    left = (torch.rand(n, 1, device=device, generator=generator) * (w - width + 1)).floor()
    y, x = torch.arange(h, device=device), torch.arange(w, device=device)
    rows, cols = (y >= top) & (y < top + height) & erased, (x >= left) & (x < left + width)  # (n, h), (n, w)
    rectangle = (rows[:, :, None] & cols[:, None, :])[:, None]  # (n, 1, h, w)
    value = mean.view(1, -1, 1, 1)  # broadcast: the mean fill costs no more than cutout
    if fill == "random":  # in place: one batch-sized tensor
        value = torch.randn(images.shape, device=device, generator=generator).mul_(std.view(1, -1, 1, 1)).add_(value)
    if not images.is_floating_point():
        value = value.round().clamp_(0, 255)
    return torch.where(rectangle, value.to(images.dtype), images)


def mix(images: Tensor, labels: Tensor, num_classes: int, key: int, mixup_alpha: float, cutmix_alpha: float,
        prob: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019) of a whole batch, as timm's `Mixup` (mode "batch"):
    with probability `prob`, each image mixed with the batch's reverse (`images.flip(0)`), by a share lambda ~
    Beta(alpha, alpha): mixup blends the pixels (float out); cutmix pastes one box of about 1 - lambda of the area
    (clipped to the image, lambda then recomputed from the pasted area). One of the two at random when both alphas
    are > 0. Labels (N,) -> targets (N, num_classes), rows summing to 1 (one-hot when not mixed). The draws (a few
    numbers a batch) come from a host generator seeded with `key`: no device sync, nor the global random state."""
    rng = np.random.default_rng(key)
    # Not F.one_hot: it reads the labels' range back to the host, a sync per step on a GPU.
    targets = (labels[:, None] == torch.arange(num_classes, device=labels.device)).float()
    if rng.random() >= prob or not (mixup_alpha > 0 or cutmix_alpha > 0):
        return images, targets
    cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if cutmix else rng.beta(mixup_alpha, mixup_alpha))
    if cutmix:
        h, w = images.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images = images.clone()
        images[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)
    else:
        images = images.float() * lam + images.flip(0).float() * (1 - lam)
    return images, targets * lam + targets.flip(0) * (1 - lam)


def channel_statistics(images: Tensor, chunk: int = 5000) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W) in pixels, summed in float64 chunks
    (no float copy of the whole set)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in images.split(chunk):
        part = part.transpose(0, 1).reshape(images.shape[1], -1).double()
        total += part.sum(1)
        squares += part.square().sum(1)
    count = images.numel() / images.shape[1]
    mean = total / count
    return mean.float(), (squares / count - mean.square()).sqrt().float()


class BatchAugment(nn.Module):
    """flip, then translate, then a policy (uint8 in and out), then brightness/contrast jitter, then cutout, then
    random erasing (`forward`, image by image draws), then mixup or cutmix (`mix`, of the whole batch), each off at
    its default; the arguments are the data module's (`--data.*`), which documents them. The order is timm's and the
    papers': the crop's geometry first, the policy on the cropped uint8 image, what works in normalized units
    (jitter, erasing) after, mixing images last (it mixes the augmented images, and their labels). `random` flips
    each image with probability 1/2; `alternating` (airbench) flips a random half of the training set once
    (`prepare`), then every image in every odd epoch: each is seen both ways in two epochs."""

    def __init__(self, flip: Literal["none", "random", "alternating"] = "none", translate: int = 0,
                 brightness: float = 0.0, contrast: float = 0.0, cutout: int = 0,
                 policy: Literal["none", "randaugment", "trivialaugment", "autoaugment"] = "none",
                 randaugment_ops: int = 2, randaugment_magnitude: int = 9, erasing: float = 0.0,
                 erasing_fill: Literal["random", "mean"] = "random", mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mix_prob: float = 1.0):  # fmt: skip
        super().__init__()
        self.flip, self.translate, self.brightness, self.contrast = flip, translate, brightness, contrast
        self.cutout, self.erasing, self.erasing_fill = cutout, erasing, erasing_fill
        self.mixup_alpha, self.cutmix_alpha, self.mix_prob = mixup_alpha, cutmix_alpha, mix_prob
        self.policy = None if policy == "none" else POLICIES[policy](randaugment_ops, randaugment_magnitude)
        # The jitter's units, cutout's and erasing's fill, per channel, in pixels (`prepare`): buffers follow the
        # batches' device.
        self.register_buffer("pixel_mean", torch.zeros(3), persistent=False)
        self.register_buffer("pixel_std", torch.ones(3), persistent=False)

    def prepare(self, train_images: Tensor, generator: torch.Generator) -> None:
        """Once per training set, in place: the jitter's, cutout's and erasing's statistics, the mirrored half of
        `alternating` (drawn from `generator`, the split's: every DDP rank and every resume mirrors the same half)."""
        if self.cutout > min(train_images.shape[-2:]):
            raise UserError(
                f"--data.cutout {self.cutout} is larger than the {tuple(train_images.shape[-2:])} images: "
                f"pass a side of at most {min(train_images.shape[-2:])} pixels, or 0 for none"
            )
        if self.brightness or self.contrast or self.cutout or self.erasing:
            self.pixel_mean, self.pixel_std = channel_statistics(train_images)
        if self.flip == "alternating":
            mirrored = torch.rand(len(train_images), generator=generator) < 0.5
            train_images[mirrored] = train_images[mirrored].flip(-1)

    def forward(self, images: Tensor, epoch: int, generator: torch.Generator | None = None) -> Tensor:
        """A training batch, uint8 (float when jittered: the model normalizes either alike); the random choices
        come from `generator` (on the images' device; None: the global RNG)."""
        if self.flip == "random":
            mirrored = torch.rand(len(images), device=images.device, generator=generator) < 0.5
            images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
        elif self.flip == "alternating" and epoch % 2 == 1:
            images = images.flip(-1)
        if self.translate:
            images = translate(images, self.translate, generator)
        if self.policy is not None:
            key = None if generator is None else batch_key(generator.initial_seed(), "policy")
            images = each_image(self.policy, images, key)
        if self.brightness or self.contrast:
            images = jitter(images, self.pixel_mean, self.pixel_std, self.brightness, self.contrast, generator)
        if self.cutout:
            images = cutout(images, self.cutout, self.pixel_mean, generator)
        if self.erasing:
            images = erase(images, self.erasing, self.erasing_fill, self.pixel_mean, self.pixel_std, generator)
        return images

    @property
    def mixes(self) -> bool:
        """Whether training batches come with soft targets (N, classes) rather than labels (N,): mixup or cutmix on."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def mix(self, images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator | None = None):
        """(images, targets) of a training batch after `forward`: mixed (`mix`) when `mixes`, else as they came. The
        draws: from a key derived from `generator`'s seed (None: from the global random state)."""
        if not self.mixes:
            return images, labels
        key = batch_key(generator.initial_seed(), "mix") if generator is not None else int(torch.randint(2**62, ()))
        return mix(images, labels, num_classes, key, self.mixup_alpha, self.cutmix_alpha, self.mix_prob)

"""Training-time augmentation of whole uint8 batches (N, 3, H, W) where they are (on the GPU when training there):
flips, shifts, brightness and contrast jitter, cutout; one draw per image from the batch's own generator, no loop
over images in Python. The policies of torchvision (RandAugment, TrivialAugmentWide, AutoAugment) draw from the
global random state, one op for a whole batch: they run image by image, in a forked global state seeded from the
batch's key (`seeded`)."""

import contextlib
import hashlib
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from cifar.errors import UserError


def reflect(index: Tensor, size: int) -> Tensor:
    """Indices past either edge mirrored back inside (edge not repeated), as `F.pad(mode="reflect")`."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def batch_key(*parts) -> int:
    """A seed in [0, 2**63) that depends on `parts` alone (e.g. run seed, DDP rank, epoch, batch in the epoch)."""
    key = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") >> 1  # seeds are < 2**63


def batch_generator(device: torch.device, seed: int, rank: int, epoch: int, batch: int) -> torch.Generator:
    """The random generator of one training batch, on `device`, seeded by (run seed, DDP rank, epoch, batch in the
    epoch) alone: a resumed run draws the same augmentation for the same batch whatever ran before, and each rank
    draws its own (a shared stream would give every rank the same flips and shifts). Seeding: no device sync. Draws
    that cannot take it derive their own key from its seed: `batch_key(generator.initial_seed(), "name")`."""
    return torch.Generator(device).manual_seed(batch_key(seed, rank, epoch, batch))


@contextlib.contextmanager
def seeded(key: int, device: torch.device):
    """The one place that lends the global random state to library ops that only draw from it: inside, it is seeded
    with `key` (the CPU's, and `device`'s when a GPU); after, it is as it was. One intra-op thread meanwhile on the
    CPU: ops on single images are too small to share out, and the pool's handoffs cost up to 100x the op on a busy
    machine (a 32x32 rotate: 90 us alone, 2-20 ms with 2 threads while another process ran)."""
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
    """flip, then translate, then a policy (uint8 in and out), then brightness/contrast jitter, then cutout, each off
    at its default; the arguments are the data module's (`--data.*`), which documents them. The order is timm's and
    the papers': geometry of the crop first, the policy on the cropped uint8 image, then what works on normalized
    pixels. `random` flips each image with probability 1/2; `alternating` (airbench) flips a random half of the
    training set once (`prepare`), then every image in every odd epoch: each is seen both ways in two epochs."""

    def __init__(self, flip: Literal["none", "random", "alternating"] = "none", translate: int = 0,
                 brightness: float = 0.0, contrast: float = 0.0, cutout: int = 0,
                 policy: Literal["none", "randaugment", "trivialaugment", "autoaugment"] = "none",
                 randaugment_ops: int = 2, randaugment_magnitude: int = 9):  # fmt: skip
        super().__init__()
        self.flip, self.translate, self.brightness, self.contrast = flip, translate, brightness, contrast
        self.cutout = cutout
        self.policy = None if policy == "none" else POLICIES[policy](randaugment_ops, randaugment_magnitude)
        # The jitter's units and cutout's fill, per channel, in pixels (`prepare`): buffers follow the batches' device.
        self.register_buffer("pixel_mean", torch.zeros(3), persistent=False)
        self.register_buffer("pixel_std", torch.ones(3), persistent=False)

    def prepare(self, train_images: Tensor, generator: torch.Generator) -> None:
        """Once per training set, in place: the jitter's and cutout's statistics, the mirrored half of `alternating`
        (drawn from `generator`, the split's, so every DDP rank and every resume mirrors the same half)."""
        if self.cutout > min(train_images.shape[-2:]):
            raise UserError(
                f"--data.cutout {self.cutout} is larger than the {tuple(train_images.shape[-2:])} images: "
                f"pass a side of at most {min(train_images.shape[-2:])} pixels, or 0 for none"
            )
        if self.brightness or self.contrast or self.cutout:
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
        return images

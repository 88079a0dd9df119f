"""Networks (`model.net.class_path`): plain `nn.Module`s, normalized float images (N, 3, H, W) -> logits. A net
that needs data to initialize defines `init_from_data(images)`: LitModel calls it at the start of a new fit with up
to 5,000 normalized training images (a resumed fit restores the weights instead)."""

from typing import Literal

import torch
import torchvision
from torch import Tensor, nn

from cifar.errors import UserError


class TutorialCNN(nn.Module):
    """The W&B Lightning tutorial's CNN: conv 32-32-64-64 (3x3, no padding), two 2x2 max pools, FC 512-128.

    Args:
        num_classes: Number of output logits (linked from `data.num_classes`).
        image_size: Height and width of the input images, in pixels.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        side = ((image_size - 4) // 2 - 4) // 2  # two unpadded 3x3 convs before each pool
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 512), nn.ReLU(),
            nn.Linear(512, 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class TorchvisionNet(nn.Module):
    """Any torchvision classification model by name, e.g. `resnet18`, `mobilenet_v3_small`, `vit_b_16`. ImageNet
    models downsample 32x32 images heavily; they train, but well below nets made for CIFAR.

    Args:
        name: A name from `torchvision.models.list_models(torchvision.models)`.
        num_classes: Number of output logits (linked from `data.num_classes`).
        weights: Pretrained weights, e.g. `DEFAULT` (downloaded by torchvision; needs their `num_classes`); null: none.
    """

    def __init__(self, name: str = "resnet18", num_classes: int = 10, weights: str | None = None):
        super().__init__()
        if name not in torchvision.models.list_models(torchvision.models):
            raise UserError(f"{name!r} is not a torchvision classification model: see torchvision.models.list_models()")
        self.model = torchvision.models.get_model(name, weights=weights, num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class Residual(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class ConvGroup(nn.Sequential):
    """conv 3x3 -> max pool 2 -> BN -> act -> conv 3x3 -> BN -> act (BN with a bias but no scale); from `depth` 3
    on: conv -> pool -> BN -> act -> x + (conv -> BN -> act -> ... -> conv -> BN)(x) -> act."""

    def __init__(self, channels_in: int, channels_out: int, batchnorm_momentum: float, activation: str = "gelu",
                 depth: int = 2):  # fmt: skip
        def norm() -> nn.BatchNorm2d:  # airbench's momentum 0.6 keeps 60% of the old statistics: torch's 0.4
            bn = nn.BatchNorm2d(channels_out, eps=1e-12, momentum=1 - batchnorm_momentum)
            bn.weight.requires_grad_(False)  # a scale would only duplicate the next conv's
            return bn

        def conv(channels: int) -> nn.Conv2d:
            return nn.Conv2d(channels, channels_out, 3, padding="same", bias=False)

        act = {"gelu": nn.GELU, "silu": nn.SiLU}[activation]
        first = [conv(channels_in), nn.MaxPool2d(2), norm(), act()]
        if depth == 2:  # airbench94/95: a plain stack (and the layout of every checkpoint before `depth`)
            super().__init__(*first, conv(channels_out), norm(), act())
        else:
            inner = [m for _ in range(depth - 2) for m in (conv(channels_out), norm(), act())]
            super().__init__(*first, Residual(*inner, conv(channels_out), norm()), act())
        for layer in self.modules():  # identity on the first channels: each group starts near a skip path
            if isinstance(layer, nn.Conv2d):
                nn.init.dirac_(layer.weight.data[: layer.in_channels])


class AirbenchNet(nn.Module):
    """The airbench94 network (K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024), written from
    its description: a frozen 2x2 patch-whitening conv, three conv groups (`ConvGroup`) of widths 64/256/256, a
    global max pool and a bias-free linear head; about 2M parameters and 0.28 GFLOPs per 32x32 image. No residual
    connections at depth 2: Dirac-initialized convs give the same head start. airbench95: widths 128/384/384;
    airbench96: 128/384/512 and `depth: 3`.

    Args:
        num_classes: Number of output logits (linked from `data.num_classes`).
        widths: Channels of the three conv groups.
        batchnorm_momentum: Fraction of the running BatchNorm statistics kept at each step.
        whiten_kernel_size: Side of the image patches the first layer whitens; it has 2 * 3 * side^2 channels.
        activation: Nonlinearity of the conv groups: `gelu` (airbench) or `silu` (hiverge's cifar10-speedrun,
            the 2025 record); the whitened input always goes through a GELU.
        depth: Convs per group, at least 2; from 3 on, all but the first are under a skip connection.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256),
                 batchnorm_momentum: float = 0.6, whiten_kernel_size: int = 2,
                 activation: Literal["gelu", "silu"] = "gelu", depth: int = 2):  # fmt: skip
        super().__init__()
        if depth < 2:
            raise UserError(f"--model.net.init_args.depth {depth}: a conv group has at least 2 convs")
        k = whiten_kernel_size
        self.whiten = nn.Conv2d(3, 2 * 3 * k * k, k, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data's patch covariance, then fixed
        inputs = (self.whiten.out_channels, *widths[:2])
        groups = [ConvGroup(c_in, c_out, batchnorm_momentum, activation, depth) for c_in, c_out in zip(inputs, widths)]
        self.layers = nn.Sequential(nn.GELU(), *groups)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.head.weight.data /= self.head.weight.data.std()  # unit-variance logits before the 1/width below

    def forward(self, x: Tensor) -> Tensor:
        # The global max over the last map (airbench: MaxPool2d(3) over its 3x3; this takes any image size) as `amax`:
        # AdaptiveMaxPool2d has no deterministic CUDA backward, so `--trainer.deterministic true` would stop on a GPU.
        x = self.layers(self.whiten(x)).amax((2, 3))
        return self.head(x) / x.size(-1)

    @torch.no_grad()
    def init_from_data(self, images: Tensor, eps: float = 5e-4) -> None:
        """Whitening: the first layer's filters are the eigenvectors of the covariance of the images'
        k x k patches, scaled by 1/sqrt(eigenvalue + eps), each once positive and once negated. (hiverge's record
        takes them from an SVD of that covariance: for a symmetric matrix the same vectors and values.)"""
        k = self.whiten.kernel_size[0]
        patches = images.float().cpu().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, 3 * k * k)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat((filters, -filters)).to(self.whiten.weight))

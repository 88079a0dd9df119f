"""Networks (`model.net.class_path`): plain `nn.Module`s, normalized float images (N, 3, H, W) -> logits. A net
that needs data to initialize defines `init_from_data(images)`: LitModel calls it at the start of a new fit with up
to 5,000 normalized training images (a resumed fit restores the weights instead)."""

import re
from typing import Any, Literal

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
    models downsample 32x32 images heavily; they train, but well below nets made for CIFAR (`TimmNet` with its
    CIFAR stem, `WideResNet`).

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


def cifar_stem_(model: nn.Module) -> None:
    """Rebuild a timm ResNet's (v1 or v2) ImageNet stem for 32x32 images in place: its first conv (the 7x7 or the
    first of a deep stem's three 3x3) becomes a 3x3 stride-1 conv, and the max-pool (with BiT's padding) an identity,
    so the first stage sees 32x32 maps (He et al. 2016, section 4.2; kuangliu/pytorch-cifar's ResNet18)."""
    from timm.models import ResNet

    if isinstance(model, ResNet):  # conv1: a Conv2d, or a deep stem's Sequential of three; then maxpool
        deep = isinstance(model.conv1, nn.Sequential)
        parent, conv_name = (model.conv1, "0") if deep else (model, "conv1")
        pool_parent, pools = model, ["maxpool"]
    else:  # ResNetV2: stem.conv, or stem.conv1 of a deep stem; then stem.pool, after stem.pad in BiT models
        parent, conv_name = model.stem, "conv1" if hasattr(model.stem, "conv1") else "conv"
        pool_parent, pools = model.stem, [name for name in ("pad", "pool") if hasattr(model.stem, name)]
    conv = getattr(parent, conv_name)
    # The conv's own class (BiT's StdConv2d standardizes its weights), initialized as timm initializes ResNets.
    stem = type(conv)(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    setattr(parent, conv_name, stem.to(conv.weight))  # its device and dtype
    for name in pools:
        setattr(pool_parent, name, nn.Identity())


class TimmNet(nn.Module):
    """A timm model by name, with a stem for 32x32 images where that is standard (ResNets).

    timm: R. Wightman, "PyTorch Image Models", github.com/huggingface/pytorch-image-models; e.g. `resnet18`,
    `resnet34`, `resnext50_32x4d`, `wide_resnet50_2`, `resnetv2_18` (pre-activation), `convnext_atto`. With
    `cifar_stem` (the default), a ResNet's first conv is 3x3 stride 1 and its max-pool is gone: `resnet18` is then
    the CIFAR ResNet-18 of He et al. 2016 as kuangliu/pytorch-cifar writes it (11.17M parameters; timm initializes
    each block's last BatchNorm scale to 0: `options: {zero_init_last: false}` keeps torch's 1).

    Args:
        name: A name from `timm.list_models()`, e.g. `timm.list_models('resnet*')`.
        num_classes: Number of output logits (linked from `data.num_classes`).
        cifar_stem: Give the net a stem for 32x32 images: a 3x3 stride-1 first conv and no max-pool. Covers timm's
            ResNet class (resnet*, resnext*, wide_resnet*, seresnet*, ecaresnet*, resnetrs*, resnest*, res2net*,
            skresnet*; not the *ts and *_clip nets, which timm builds otherwise) and its pre-activation ResNetV2
            (resnetv2_*); false: the net as timm builds it.
        pretrained: Start from timm's ImageNet weights (downloaded from the Hugging Face Hub; the head is new, and
            so is the first conv with `cifar_stem`); false: random initialization, nothing downloaded.
        options: More keyword arguments for `timm.create_model`, e.g. `{drop_rate: 0.2, drop_path_rate: 0.1}`
            (dropout before the head, stochastic depth) or `{channels: [32, 64, 128, 256]}` (a ResNet's widths).
    """

    def __init__(self, name: str = "resnet18", num_classes: int = 10, cifar_stem: bool = True,
                 pretrained: bool = False, options: dict[str, Any] | None = None):  # fmt: skip
        super().__init__()
        import timm  # here, not at the top: importing timm takes about a second, which every command would pay
        from timm.models import ResNet, ResNetV2

        if not timm.is_model(name):
            pattern = re.match(r"[a-z]*", name).group() + "*"  # the name's family: resnet1800 -> resnet*
            raise UserError(f"{name!r} is not a timm model: see timm.list_models('{pattern}')")
        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **(options or {}))
        except TypeError as error:  # an option this model's constructor does not take
            raise UserError(f"--model.net.init_args.options: timm's {name} does not take them ({error})") from None
        if cifar_stem:
            if not isinstance(self.model, (ResNet, ResNetV2)):
                raise UserError(f"--model.net.init_args.cifar_stem covers timm's ResNet and ResNetV2 families, not "
                                f"{name} ({type(self.model).__name__}): pass --model.net.init_args.cifar_stem false")  # fmt: skip
            cifar_stem_(self.model)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class WideBlock(nn.Module):
    """A pre-activation basic block: BN -> ReLU -> conv 3x3 (stride) -> BN -> ReLU -> dropout -> conv 3x3, plus
    the input, or a 1x1 conv of the pre-activated input where the shape changes (as the paper's code does)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, dropout: float):
        super().__init__()
        self.preact = nn.Sequential(nn.BatchNorm2d(channels_in), nn.ReLU(inplace=True))
        self.residual = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride, padding=1, bias=False),
            nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
        )  # fmt: skip
        same = channels_in == channels_out and stride == 1
        self.shortcut = None if same else nn.Conv2d(channels_in, channels_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.preact(x)
        return self.residual(activated) + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-k for 32x32 images (S. Zagoruyko and N. Komodakis, "Wide Residual Networks", 2016).

    As in the paper and its code (github.com/szagoruyko/wide-residual-networks): a 3x3 conv of 16 channels, three
    groups of (depth - 4) / 6 pre-activation basic blocks (`WideBlock`) of widths 16k, 32k, 64k at strides 1, 2, 2,
    BN -> ReLU, global average pool, linear. WRN-28-10: 36.5M parameters, 5.2 GFLOPs per 32x32 image; the paper's
    3.89% error on CIFAR-10 (with `dropout: 0.3`, SGD momentum 0.9 lr 0.1 over 200 epochs, weight decay 5e-4, flips
    and 4-pixel crops).

    Args:
        num_classes: Number of output logits (linked from `data.num_classes`).
        depth: Conv and linear layers: 6n + 4 for n blocks per group (28: 4; 16: 2; 10: 1).
        widen_factor: k, the width multiplier of the groups (10 for WRN-28-10).
        dropout: Dropout probability between the two convs of each block (the paper: 0 or 0.3).
    """

    def __init__(self, num_classes: int = 10, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise UserError(f"--model.net.init_args.depth {depth}: a WideResNet's depth is 6n + 4 (10, 16, 22, ...)")
        if widen_factor < 1 or not 0 <= dropout < 1:
            raise UserError(f"WideResNet: widen_factor {widen_factor} must be >= 1 and dropout {dropout} in [0, 1)")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False)]
        for channels_in, channels_out, stride in zip(widths, widths[1:], (1, 2, 2)):
            for i in range(blocks):
                layers.append(WideBlock(channels_in if i == 0 else channels_out, channels_out, stride if i == 0 else 1,
                                        dropout))  # fmt: skip
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True))
        self.head = nn.Linear(widths[3], num_classes)
        for layer in self.modules():  # the paper's code's initialization (BatchNorm: torch's scale 1, shift 0)
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))  # the global average pool (8x8 for 32x32 images)


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

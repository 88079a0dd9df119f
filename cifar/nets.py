"""Networks: plain `nn.Module`s that map a normalized float batch (N, 3, H, W) to logits (N, classes).

Pick one in the config with `model.net.class_path`; `num_classes` is linked from the data module.
"""

from torch import Tensor, nn


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

"""The W&B tutorial's pipeline, reproduced faithfully (../shared/tutorial), as the baseline to beat.

Its DataModule (torchvision CIFAR10: one PIL image per sample -> ToTensor -> Normalize, DataLoader
batch 32, no workers), its LitModel (log_softmax + nll, one Accuracy shared by all stages, train_acc
logged on every step), WandbLogger (offline here), EarlyStopping, ModelCheckpoint and its
ImagePredictionLogger. The only change: the images come from an image-folder tree (the shared JPEG
files) instead of the official download, held exactly as torchvision's CIFAR10 holds them (one
numpy uint8 array (N, 32, 32, 3)), so `__getitem__` is torchvision's own.

    python bench/tutorial.py DATA_DIR --steps 400 --output times.json
"""

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, random_split
from torchmetrics import Accuracy
from torchvision import transforms
from torchvision.datasets import CIFAR10

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timer import BatchTimer  # noqa: E402
from cifar.readers import folder_classes, list_folder, read_folder  # noqa: E402


class TreeCIFAR10(CIFAR10):
    """torchvision's CIFAR10 (its __getitem__: Image.fromarray, then the transform) over an image-folder tree."""

    def __init__(self, root: Path, transform):  # no super().__init__: it would look for the download
        images, labels = read_folder(root / "train", *list_folder(root / "train", folder_classes(root / "train")))
        self.data = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3), as torchvision stores it
        self.targets = labels.tolist()
        self.transform, self.target_transform = transform, None


class CIFAR10DataModule(pl.LightningDataModule):
    def __init__(self, batch_size, data_dir: str = "./"):
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        self.num_classes = 10

    def setup(self, stage=None):
        if stage == "fit" or stage is None:
            cifar_full = TreeCIFAR10(Path(self.data_dir), transform=self.transform)
            self.cifar_train, self.cifar_val = random_split(cifar_full, [45000, 5000])

    def train_dataloader(self):
        return DataLoader(self.cifar_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.cifar_val, batch_size=self.batch_size)


class ImagePredictionLogger(pl.callbacks.Callback):
    def __init__(self, val_samples, num_samples=32):
        super().__init__()
        self.num_samples = num_samples
        self.val_imgs, self.val_labels = val_samples

    def on_validation_epoch_end(self, trainer, pl_module):
        val_imgs = self.val_imgs.to(device=pl_module.device)
        val_labels = self.val_labels.to(device=pl_module.device)
        logits = pl_module(val_imgs)
        preds = torch.argmax(logits, -1)
        trainer.logger.experiment.log({"examples": [
            wandb.Image(x, caption=f"Pred:{pred}, Label:{y}")
            for x, pred, y in zip(val_imgs[: self.num_samples], preds[: self.num_samples], val_labels[: self.num_samples])
        ]})  # fmt: skip


class LitModel(pl.LightningModule):
    def __init__(self, input_shape, num_classes, learning_rate=2e-4):
        super().__init__()
        self.save_hyperparameters()
        self.learning_rate = learning_rate
        self.conv1 = nn.Conv2d(3, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 32, 3, 1)
        self.conv3 = nn.Conv2d(32, 64, 3, 1)
        self.conv4 = nn.Conv2d(64, 64, 3, 1)
        self.pool1 = torch.nn.MaxPool2d(2)
        self.pool2 = torch.nn.MaxPool2d(2)
        n_sizes = self._get_conv_output(input_shape)
        self.fc1 = nn.Linear(n_sizes, 512)
        self.fc2 = nn.Linear(512, 128)
        self.fc3 = nn.Linear(128, num_classes)
        self.accuracy = Accuracy(task="multiclass", num_classes=num_classes)

    def _get_conv_output(self, shape):
        batch_size = 1
        input = torch.autograd.Variable(torch.rand(batch_size, *shape))
        output_feat = self._forward_features(input)
        return output_feat.data.view(batch_size, -1).size(1)

    def _forward_features(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool1(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = self.pool2(F.relu(self.conv4(x)))
        return x

    def forward(self, x):
        x = self._forward_features(x)
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        preds = torch.argmax(logits, dim=1)
        acc = self.accuracy(preds, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, logger=True)
        self.log("train_acc", acc, on_step=True, on_epoch=True, logger=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        preds = torch.argmax(logits, dim=1)
        acc = self.accuracy(preds, y)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", acc, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--output", required=True)
    parser.add_argument("--save-dir", default="runs/bench-tutorial")
    args = parser.parse_args()

    dm = CIFAR10DataModule(batch_size=32, data_dir=args.data_dir)
    dm.setup()
    val_samples = next(iter(dm.val_dataloader()))
    model = LitModel((3, 32, 32), dm.num_classes)
    Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    wandb_logger = WandbLogger(project="wandb-lightning", job_type="train", offline=True, save_dir=args.save_dir)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=args.steps,  # one epoch cut short; the rest as written
        logger=wandb_logger, default_root_dir=args.save_dir,
        callbacks=[pl.callbacks.EarlyStopping(monitor="val_loss"), ImagePredictionLogger(val_samples),
                   pl.callbacks.ModelCheckpoint(), BatchTimer(args.output)],
    )  # fmt: skip
    trainer.fit(model, dm)
    wandb.finish()


if __name__ == "__main__":
    main()

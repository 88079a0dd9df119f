"""The ceiling: a plain PyTorch loop, same CNN, batch size and optimizer, data already normalized in memory
(on the GPU when there is one, as the app's `data_on_device`).

    python bench/raw_loop.py DATA_DIR --steps 400 --output times.json [--batch-size 32] [--channels-last]
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar.readers import folder_classes, list_folder, read_folder  # noqa: E402
from cifar.nets import TutorialCNN  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    train = args.data_dir / "train"
    images, labels = read_folder(train, *list_folder(train, folder_classes(train)))
    x = (images.float() / 255 - 0.5) / 0.5  # normalized once: no per-batch conversion at all
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, labels = x.contiguous(memory_format=fmt).to(device), labels.to(device)
    model = TutorialCNN(num_classes=10).to(device, memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    order = torch.randperm(len(x), device=device)
    starts = []
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()  # time finished work, as bench.timer.BatchTimer does
        starts.append(time.perf_counter())
        index = order[(step * args.batch_size) % (len(x) - args.batch_size):][: args.batch_size]
        loss = F.cross_entropy(model(x[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.output.write_text(json.dumps({"batch_size": args.batch_size, "starts": starts, "peak_rss_mb": peak_mb}))


if __name__ == "__main__":
    main()

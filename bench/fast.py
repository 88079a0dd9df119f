"""Time to accuracy of a fast recipe through the real CLI: wall time and held-out accuracy, several seeds.

    python bench/fast.py --seeds 0 1 2                          # configs/fast.yaml on the lossless PNGs
    python bench/fast.py --config configs/fast.yaml --data ../shared/data/cifar10-train-jpeg.tar.gz

Each seed is one fresh `python main.py fit --config CONFIG --seed_everything SEED` process on the image folders
in `--data`: by default the lossless copy of the 50k official training images (`../shared/data`), the
reference for accuracy (a `.tar.gz` is unpacked once into `data/<its name>/`, git-ignored). 45k images train;
a 5k split held out of them (the data's split seed, the same for every run) is the validation set, evaluated
once at the end with the recipe's test-time augmentation. The time is the process's wall clock, start-up,
decoding and the final evaluation included; the fit loop's own time comes from the run's log. Anything after
`--` is passed to main.py (e.g. `-- --trainer.max_epochs 10`).
"""

import argparse
import contextlib
import csv
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSLESS = ROOT.parent / "shared" / "data" / "cifar10-train-png.tar.gz"


def unpacked(data: str) -> str:
    """An image-folder tree: `data` itself, or the folder a `.tar.gz` of one is unpacked into (once)."""
    if not data.endswith(".tar.gz"):
        return str(Path(data).resolve())
    folder = ROOT / "data" / Path(data).name.removesuffix(".tar.gz")
    done = folder / ".unpacked"  # written last: a half-unpacked folder is unpacked again
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xzf", str(Path(data).resolve()), "-C", str(folder)], check=True)
        done.write_text(data)
    return str(folder)


def run(config: str, seed: int, data: str, extra: list[str], keep: str | None) -> dict:
    kept = contextlib.nullcontext(str(Path(keep, f"seed{seed}").resolve())) if keep else None
    with kept or tempfile.TemporaryDirectory() as root:
        command = [sys.executable, "main.py", "fit", "--config", config, "--seed_everything", str(seed),
                   "--data.data_dir", data, "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false",
                   "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", root,
                   "--trainer.callbacks+=bench.timer.FitTimer", *extra]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"seed {seed} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        (metrics,) = Path(root).glob("*-fit-*/**/metrics.csv")
        rows = [row for row in csv.DictReader(metrics.open()) if row.get("val_acc")]
        phases = re.search(r"fit phases: .*", done.stdout + done.stderr)  # bench.timer.FitTimer's line
        fit = re.search(r"fit loop: ([0-9.]+) s", phases.group(0)) if phases else None
    return {"seconds": seconds, "val_acc": float(rows[-1]["val_acc"]), "epochs": int(rows[-1]["epoch"]) + 1,
            "fit": float(fit.group(1)) if fit else None, "phases": phases.group(0) if phases else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fast.yaml")
    parser.add_argument("--data", default=str(LOSSLESS), help="image-folder tree with train/<class>/, or a .tar.gz of one "
                        "(default: the lossless 50k official training images in ../shared/data)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", help="keep each seed's run (checkpoints, metrics) in KEEP/seed<N>, not in a temporary folder")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]

    import torch  # only for the report

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.config} on {args.data} {' '.join(extra)}", flush=True)  # fmt: skip
    results, data = [], unpacked(args.data)
    for seed in args.seeds:
        results.append(run(args.config, seed, data, extra, args.keep))
        r = results[-1]
        loop = f" (fit loop {r['fit']:.0f} s)" if r["fit"] is not None else ""
        print(f"  seed {seed}: val_acc (TTA) {r['val_acc']:.4f} after {r['epochs']} epochs, {r['seconds']:.0f} s wall{loop}",
              f"\n    {r['phases']}" if r["phases"] else "", flush=True)  # fmt: skip
    accs, secs = [r["val_acc"] for r in results], [r["seconds"] for r in results]
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    print(f"\n{len(results)} seeds: val_acc mean {statistics.mean(accs):.4f}, std {spread(accs):.4f}, "
          f"min {min(accs):.4f}, max {max(accs):.4f}; wall mean {statistics.mean(secs):.0f} s, max {max(secs):.0f} s")


if __name__ == "__main__":
    main()

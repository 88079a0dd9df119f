"""Training throughput in one run, same machine: the tutorial's pipeline vs this app (real CLI) vs a raw loop.

    python bench/throughput.py --data data --steps 400 --repeats 3

Each measurement is a fresh process that trains one epoch cut to `--steps` batches of the tutorial's
CNN (then validates, untimed, as an epoch end does); the first
`--warmup` batches (start-up, allocator warm-up, compilation) are dropped and the median time per
batch over the rest gives images/s. Every pipeline runs `--repeats` times, interleaved, and the
median is reported. Extra app configurations (channels_last, bf16-mixed, bigger batches,
torch.compile) are measured the same way. Peak RSS is each process's maximum resident set size.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

APP = ["main.py", "fit", "--config", "configs/cifar.yaml", "--trainer.max_epochs", "1",
       "--trainer.enable_progress_bar", "false", "--trainer.callbacks+", "bench.timer.BatchTimer"]  # fmt: skip
APP_OPTIONS = {
    "app channels_last": ["--model.channels_last", "true"],
    "app bf16-mixed": ["--trainer.precision", "bf16-mixed"],
    "app batch 256": ["--data.batch_size", "256"],
    "app compile": ["--model.compile", "true"],
    "app batch 256 channels_last bf16": ["--data.batch_size", "256", "--model.channels_last", "true",
                                         "--trainer.precision", "bf16-mixed"],  # fmt: skip
    "app batch 512 channels_last bf16": ["--data.batch_size", "512", "--model.channels_last", "true",
                                         "--trainer.precision", "bf16-mixed"],  # fmt: skip
}


def command(name: str, data: str, steps: int, output: str) -> list[str]:
    if "batch 512" in name:
        steps = min(steps, 45000 // 512)  # one epoch at most
    elif "batch 256" in name:
        steps = min(steps, 45000 // 256)
    if name == "tutorial":
        return [sys.executable, "bench/tutorial.py", data, "--steps", str(steps), "--output", output]
    if name == "raw loop":
        return [sys.executable, "bench/raw_loop.py", data, "--steps", str(steps), "--output", output]
    extra = APP_OPTIONS.get(name, [])
    return [sys.executable, *APP, "--trainer.callbacks.output", output, "--data.data_dir", data,
            "--trainer.limit_train_batches", str(steps), "--trainer.default_root_dir", "runs/bench", *extra]  # fmt: skip


def measure(name: str, data: str, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        output = str(Path(tmp) / "times.json")
        env = {**os.environ, "WANDB_SILENT": "true"}
        run = subprocess.run(command(name, data, steps, output), cwd=ROOT, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        result = json.loads(Path(output).read_text())
    starts = result["starts"][min(warmup, len(result["starts"]) // 4) :]  # big batches: fewer batches to drop
    per_batch = statistics.median(b - a for a, b in zip(starts, starts[1:]))
    return {"images_per_s": result["batch_size"] / per_batch, "peak_rss_mb": result["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="image-folder tree with train/<class>/ (the shared JPEGs)")
    parser.add_argument("--steps", type=int, default=400, help="training batches per measurement (fewer for big batches)")
    parser.add_argument("--warmup", type=int, default=50, help="batches dropped at the start")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--options", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the app's speed options")  # fmt: skip
    args = parser.parse_args()

    import torch  # only for the report

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; steps {args.steps}, warmup {args.warmup}, repeats {args.repeats}")  # fmt: skip
    names = ["tutorial", "app", "raw loop"] + (list(APP_OPTIONS) if args.options else [])
    runs = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:
            runs[name].append(measure(name, str(Path(args.data).resolve()), args.steps, args.warmup))
            print(f"  repeat {repeat + 1}: {name:34s} {runs[name][-1]['images_per_s']:8.0f} images/s", flush=True)
    print(f"\n{'pipeline':36s} {'images/s (median)':>18s} {'min':>7s} {'max':>7s} {'peak RSS MB':>12s}")
    median = {}
    for name, results in runs.items():
        speeds = [r["images_per_s"] for r in results]
        median[name] = statistics.median(speeds)
        rss = max(r["peak_rss_mb"] for r in results)
        print(f"{name:36s} {median[name]:18.0f} {min(speeds):7.0f} {max(speeds):7.0f} {rss:12.0f}")
    print(f"\napp / tutorial = {median['app'] / median['tutorial']:.2f}   (target >= 1.3)")
    print(f"app / raw loop = {median['app'] / median['raw loop']:.2f}   (target >= 0.9)")
    best = max(median, key=median.get)
    print(f"fastest: {best}, {median[best]:.0f} images/s = {median[best] / median['tutorial']:.2f} x tutorial")


if __name__ == "__main__":
    main()

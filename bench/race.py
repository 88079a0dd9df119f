"""The CPU race: the record's own script against `main.py fit --config configs/fast.yaml`, back to back, same data.

    python bench/race.py --seeds 0 1 2                   # the lossless PNGs of ../shared/data, 45k train / 5k held out
    python bench/race.py --record ~/cifar10-speedrun     # a clone of hiverge/cifar10-speedrun (else cloned from GitHub)
    python bench/race.py --precision float32             # both in float32 (the default on a CPU without bf16)
    python bench/race.py --smoke                         # 3 steps each in float32: checks the harness, not the race

The record is hiverge's `cifar10_speedrun.py` at commit 5cd49b1 (94.01% in 2.015 s on an A100). Its code is not
ours and is not committed: this script reads it from a clone of the public repository (checking the file's SHA-256)
and writes a CPU copy beside a temporary run by the changes in `CHANGES`, each with its reason. They move it to the
CPU and change nothing of its recipe: its network, Muon, hyperparameters, augmentation and step count (7.59
epochs: 221 steps on 45k) stay. Both sides then read the same PNGs with the same decoder, split as the app splits
them (split seed 0: 45k train, 5k evaluated with each side's own TTA), and run with glibc's malloc set as the app
sets it. For each seed the record runs, then the app, each a fresh process timed whole (start-up, decoding, W&B,
checkpoints, the final evaluation); the app with its config's own logger (W&B, offline), as a user runs it.
Prints each run with its median seconds a step in each epoch (the record's steps timed by a clock read added to its
loop, the app's by `bench.timer.BatchTimer`), both means, and the ratio app / record of the mean whole-process times.
fast.yaml trains in bf16, as the record ran in half, and that needs a CPU with bf16 instructions (AVX512-BF16 or
AMX): without them each bf16 step is emulated, minutes a step. There both sides run in float32 (the app as it advises
on such a CPU, `--trainer.precision 32-true`; the record's half in float32 too), and the header says so.
"""

import argparse
import hashlib
import json
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from bench.fast import LOSSLESS, unpacked  # noqa: E402
from cifar.cpu import has_bf16  # noqa: E402
from wandb_records import history  # noqa: E402  (an offline W&B run file's records, as the tests read them)

REPOSITORY, COMMIT, FILE = "https://github.com/hiverge/cifar10-speedrun", "5cd49b1", "cifar10_speedrun.py"
SHA256 = "d1e1f6991cc3e1758c0bbc0e728c86a4b3119dd42a9233075b2edb9735d0ba91"  # of FILE at COMMIT

# Put first in the copy: the data (decoded by the app's reader, split by the app's split), a host timer in place of
# CUDA events, and the precision (bf16 autocast, as fast.yaml's bf16-mixed; RACE_DTYPE=float32: float32 throughout).
PRELUDE = '''import json as _json
import time as _time
from pathlib import Path as _Path

import torch as _torch
from cifar.data import split_indices as _split_indices
from cifar.readers import folder_classes as _folder_classes, list_folder as _list_folder, read_folder as _read_folder

_FLOAT32 = os.environ.get("RACE_DTYPE") == "float32"  # a host without bf16 instructions: float32 throughout
_AUTOCAST = dict(device_type="cpu", dtype=_torch.bfloat16, enabled=not _FLOAT32)
_HALF = _torch.float32 if _FLOAT32 else _torch.bfloat16  # what it kept in half: Muon's momentum, the staging buffer
_STEPS = int(os.environ.get("RACE_STEPS") or 0)  # 0: the record's own count
_DATA = {}


def race_data(train):
    """The app's 45k/5k split of the PNG folder RACE_DATA_DIR, as the record's loader keeps it: uint8 NHWC."""
    if not _DATA:
        start, folder = _time.perf_counter(), _Path(os.environ["RACE_DATA_DIR"], "train")
        classes = _folder_classes(folder)
        images, labels = _read_folder(folder, *_list_folder(folder, classes))
        kept, held_out, _, _ = _split_indices(len(images), 0, 5000, None)
        for split, index in ((True, kept), (False, held_out)):
            _DATA[split] = {"images": images[index].permute(0, 2, 3, 1).contiguous(), "labels": labels[index],
                            "classes": classes}
        print(f"decoded {len(kept)} train + {len(held_out)} held-out PNGs in {_time.perf_counter() - start:.1f} s")
    return _DATA[train]


_STARTS = []  # when each training step began (s), for the per-epoch step times


def _save_starts(per_epoch):
    if os.environ.get("RACE_TIMES"):
        with open(os.environ["RACE_TIMES"], "w") as f:
            _json.dump({"starts": _STARTS, "epochs": [i // per_epoch for i in range(len(_STARTS))]}, f)


class _HostEvent:
    def record(self):
        self.at = _time.perf_counter()

    def elapsed_time(self, end):  # milliseconds, as CUDA events give it
        return 1e3 * (end.at - self.at)

'''

# (text in the record, its replacement, how many times it occurs, why). Applied in order; each must match exactly.
CHANGES = [
    ("import uuid\n", "import uuid\n" + PRELUDE, 1, "the prelude, after `import os`"),
    ("torch.backends.cudnn.benchmark = True\n", "", 1, "CUDA only"),
    ("@torch.compile(fullgraph=True)\ndef", "def", 1, "no torch.compile: the app's fast.yaml does not compile either"),
    ("    @torch.compile(fullgraph=True)\n", "", 1, "as above"),
    ("\n@torch.compile()\n", "\n", 3, "as above"),
    ("    @torch.compile()\n", "", 1, "as above"),
    ('@torch.compile(mode="max-autotune", fullgraph=True)\n    ', "", 1, "as above"),
    ('    model.compile(mode="max-autotune")\n', "", 1, "as above"),
    ("dtype=torch.half)\nCIFAR_STD", "dtype=torch.float)\nCIFAR_STD", 1, "fp32 data and weights, bf16 autocast"),
    ("(0.247, 0.2435, 0.2616), dtype=torch.half)", "(0.247, 0.2435, 0.2616), dtype=torch.float)", 1, "as above"),
    ("(self.images.half() / 255)", "(self.images.float() / 255)", 1, "as above"),
    ("        for mod in self.modules():\n            mod.half()\n", "", 1, "as above"),
    ("torch.half", "_HALF", 5, "Muon's momentum and the staging buffer: bf16 as they were half (or float32)"),
    (".pin_memory()", "", 1, "pinned memory needs CUDA"),
    ('device="cuda"', 'device="cpu"', 1, "the CPU"),
    ("if not os.path.exists(data_path):", "if False:  # the PNGs, not a download", 1, "no internet, same data"),
    ('torch.load(data_path, map_location=torch.device("cuda"), weights_only=True)', "race_data(train)", 1,
     "as above"),
    ("torch.cuda.Event(enable_timing=True)", "_HostEvent()", 2, "a host timer: the CPU runs synchronously"),
    ("        torch.cuda.synchronize()\n        nonlocal", "        nonlocal", 1, "as above"),
    ("    total_train_steps = ceil(7.59 * len(train_loader))\n",
     "    total_train_steps = min(_STEPS or 10**9, ceil(7.59 * len(train_loader)))\n", 1, "--smoke's short run"),
    ("        outputs = model(inputs, whiten_bias_grad=whiten_bias_grad)\n        loss = ",
     "        with torch.autocast(**_AUTOCAST):\n            outputs = model(inputs, whiten_bias_grad=whiten_bias_grad)\n"
     "        loss = ", 1, "bf16 where it ran half"),
    ("    logits = infer(model, loader, tta_level)\n",
     "    with torch.autocast(**_AUTOCAST):\n        logits = infer(model, loader, tta_level)\n", 1, "as above"),
    ("            # Determine if we should train whiten bias\n",
     "            _STARTS.append(_time.perf_counter())\n            # Determine if we should train whiten bias\n", 1,
     "the step times, as bench.timer.BatchTimer takes the app's"),
    ("    tta_val_acc = evaluate(model, test_loader, tta_level=2)\n",
     "    _save_starts(len(train_loader))\n    tta_val_acc = evaluate(model, test_loader, tta_level=2)\n", 1,
     "as above"),
    ("    train_acc = evaluate(model, train_loader, tta_level=0)\n", "    train_acc = float('nan')\n", 1,
     "after its timer, its accuracy on the 45k it trained on: not the race's figure, and the app does not compute it"),
    ("CifarNet().cuda()", "CifarNet()", 1, "the CPU"),
    ('    main("warmup", model)\n', "", 1, "its warm-up run on noise compiles kernels: nothing to compile here"),
    ("for run in range(200):", "for run in range(1):", 1, "one run a process: the race times whole processes"),
    ("        torch.cuda.empty_cache()\n        torch.cuda.synchronize()\n        torch.cuda._sleep(int(6000000000))\n",
     "", 1, "CUDA only"),
]


def record_source(record: str | None, cache: Path) -> str:
    """FILE at COMMIT from the clone `record`, or from a clone made under `cache`; its SHA-256 checked."""
    clone = Path(record) if record else cache / "cifar10-speedrun"
    if not clone.exists():
        subprocess.run(["git", "clone", "--quiet", REPOSITORY, str(clone)], check=True)
    text = subprocess.run(["git", "-C", str(clone), "show", f"{COMMIT}:{FILE}"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    if hashlib.sha256(text.encode()).hexdigest() != SHA256:
        raise SystemExit(f"{clone}: {FILE} at {COMMIT} is not the file these changes were written for")
    return text


def cpu_copy(text: str) -> str:
    for old, new, times, why in CHANGES:
        if text.count(old) != times:
            raise SystemExit(f"the record's file has {text.count(old)} of {old!r}, not {times} ({why})")
        text = text.replace(old, new)
    return text


def timed(command: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def epoch_step_times(path: Path) -> list[float]:
    """The median seconds a step took in each epoch, from step start times (the last step of each epoch, which
    carries the epoch's end, and the first of the next, are not in the same epoch's list)."""
    timed_steps = json.loads(path.read_text())
    medians = []
    for epoch in sorted(set(timed_steps["epochs"])):
        starts = [t for t, e in zip(timed_steps["starts"], timed_steps["epochs"]) if e == epoch]
        if len(starts) > 1:
            medians.append(statistics.median(b - a for a, b in zip(starts, starts[1:])))
    return medians


def run_record(script: Path, data: str, env: dict) -> dict:
    times = script.with_name("record_times.json")
    seconds, output = timed([sys.executable, str(script)], {**env, "RACE_DATA_DIR": data, "RACE_TIMES": str(times)},
                            script.parent)  # fmt: skip
    acc = re.search(r"Accuracies: Mean: ([0-9.]+)", output)  # its TTA accuracy on the 5k held out
    timed_region = re.search(r"Times \(s\): +Mean: ([0-9.]+)", output)  # its own timer: training and the TTA
    return {"seconds": seconds, "acc": float(acc.group(1)), "steps": epoch_step_times(times),
            "timed": float(timed_region.group(1))}  # fmt: skip


def run_app(config: str, seed: int, data: str, env: dict, extra: list[str], root: Path) -> dict:
    """A user's `fit` with the config's own logger; bench.timer.BatchTimer (one clock read a step) for the step times."""
    times = root.with_name(f"{root.name}_times.json")
    command = [sys.executable, "main.py", "fit", "--config", config, "--seed_everything", str(seed), "--data.data_dir",
               data, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
               "--trainer.callbacks+=bench.timer.BatchTimer", "--trainer.callbacks.output", str(times), *extra]  # fmt: skip
    seconds, output = timed(command, {**env, "WANDB_MODE": "offline"}, ROOT)
    (logged,) = root.glob("*-fit-*/wandb/offline-run-*/run-*.wandb")  # the config's W&B logger, offline
    acc = [row["val_acc"] for row in history(logged) if "val_acc" in row][-1]
    return {"seconds": seconds, "acc": acc, "steps": epoch_step_times(times)}


def host() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    isa = {True: "bf16 instructions", False: "no bf16 instructions", None: "bf16 instructions unknown"}[has_bf16()]
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {isa}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # each run's line as it ends
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fast.yaml")
    parser.add_argument("--data", default=str(LOSSLESS), help="image-folder tree with train/<class>/, or a .tar.gz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--record", help="a clone of hiverge/cifar10-speedrun (default: cloned into a temporary one)")
    parser.add_argument("--precision", choices=["bf16", "float32"], help="both sides' precision; default: bf16 where "
                        "the CPU has bf16 instructions, else float32 (the app's advice there: --trainer.precision "
                        "32-true; the record's half then float32 too)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="3 steps each, float32: checks the harness only")
    args = parser.parse_args()
    precision = "float32" if args.smoke else args.precision or ("float32" if has_bf16() is False else "bf16")

    # glibc's malloc as the app sets it for fit (cifar/cpu.py), for both; the environment's own settings win.
    env = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647", **os.environ, "PYTHONPATH": str(ROOT)}
    extra = ["--trainer.precision", "32-true"] if precision == "float32" else []
    env.update(RACE_DTYPE=precision)
    if args.smoke:
        env.update(RACE_STEPS="3")
        extra += ["--trainer.max_steps", "3", "--trainer.check_val_every_n_epoch", "1", "--trainer.val_check_interval",
                  "3"]  # fmt: skip
    print(f"host: {host()}\ndata: {args.data}; the record {REPOSITORY} at {COMMIT}; the app {args.config}; both in "
          f"{precision}")  # fmt: skip
    data, results = unpacked(args.data), {"record": [], "app": []}
    with tempfile.TemporaryDirectory() as work:
        script = Path(work, "record_cpu.py")
        script.write_text(cpu_copy(record_source(args.record, Path(work))))
        for seed in args.seeds:
            results["record"].append(run_record(script, data, env))
            results["app"].append(run_app(args.config, seed, data, env, extra, Path(work, f"app{seed}")))
            for side in results:
                r = results[side][-1]
                steps = " ".join(f"{t:.2f}" for t in r["steps"])
                timed_region = f" ({r['timed']:.0f} s by its own timer)" if "timed" in r else ""
                print(f"  seed {seed}: {side:6} {r['seconds']:6.0f} s whole process{timed_region}, accuracy "
                      f"{r['acc']:.4f}; median s a step, each epoch: {steps}")  # fmt: skip
    means = {side: (statistics.mean(r["seconds"] for r in rs), statistics.mean(r["acc"] for r in rs))
             for side, rs in results.items()}  # fmt: skip
    for side, (seconds, acc) in means.items():
        print(f"{side}: mean {seconds:.0f} s, accuracy {acc:.4f} over {len(args.seeds)} run(s)")
    print(f"ratio app / record: {means['app'][0] / means['record'][0]:.2f}x the record's whole-process time")


if __name__ == "__main__":
    main()

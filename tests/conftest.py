"""Tiny data sets in every format the app reads, and a runner for the real CLI in a subprocess.

The official CIFAR-10 format is checked against the official MD5s; tests make their own tiny
batches, so they patch torchvision's checksum table to theirs (in-process with monkeypatch; in a
subprocess through `run_cli(..., checksums=...)`). Everything runs offline: W&B in offline mode.
"""

import contextlib
import csv
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import wandb
import yaml
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.datasets import CIFAR10

from cifar.cpu import has_bf16

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
CONFIG = str(ROOT / "configs" / "cifar.yaml")
FAST_CONFIG = str(ROOT / "configs" / "fast.yaml")
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "sweep.yaml")  # sweep.yaml: a W&B sweep
CLASSES = ["bird", "cat", "dog"]  # not 10: proves num_classes flows from the data to the model
OFFICIAL_CLASSES = ["apple", "boat", "car", "dog"]
# The configs train in bf16-mixed. A CPU without bf16 instructions emulates each bf16 op, up to 16x slower a step
# (bench/RESULTS.md): tests that fit a config as it is train in 32-bit there, as the app advises (cifar/cpu.py).
CPU_PRECISION = ["--trainer.precision", "32-true"] if has_bf16() is False else []
# Small enough to run in seconds: batch 8, 2 epochs.
FAST = ["--data.batch_size", "8", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]


def pytest_configure(config):
    """In a pytest-xdist worker (pyproject.toml's addopts: one per core), this process and the processes it starts
    use their share of the cores: PyTorch's OpenMP threads busy-wait, so two workers with a thread per core each
    run the compute-bound tests up to ten times slower (docs/testing.md)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# Fixtures that fit or serve once for many tests (every config fitted one step; a module's fit; a server): the tests
# using one run on one pytest-xdist worker (--dist loadgroup), which makes it once.
SHARED_FIXTURES = ("one_step_fits", "held_out_fit", "server")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """The slow tests first (marked slow, or using one_step_fits), so that no worker starts one last while the others
    have nothing left; the tests of each of SHARED_FIXTURES in one group."""
    items.sort(key=lambda item: not (item.get_closest_marker("slow") or "one_step_fits" in item.fixturenames))
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


# Runs the CLI with torchvision's CIFAR-10 checksum table replaced by the test data's (JSON in argv[1]).
PATCHED_MAIN = """
import json, sys
from torchvision.datasets import CIFAR10
table = json.loads(sys.argv.pop(1))
if table:
    CIFAR10.train_list, CIFAR10.test_list = table["train_list"], table["test_list"]
    CIFAR10.meta = {**CIFAR10.meta, "md5": table["meta_md5"]}
from cifar.cli import main
main()
"""


def only(paths) -> Path:
    """The one path of `paths` (a glob), or an assertion naming what there was."""
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


@contextlib.contextmanager
def app_messages():
    """What the app says on its console while in-process commands run (Lightning's rank-zero logger, where
    `--ckpt_path best: ...` and the like go), as a list of messages that fills as they come."""
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def exit_code(args: list[str]) -> int:
    """The exit code of `main(args)` in this process (the real CLI), which must end in SystemExit: an error (2),
    `--help` or `--print_config` (0)."""
    from cifar.cli import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code


def cli_error(args: list[str], capsys) -> str:
    """The one `error: ...` line of `main(args)` in this process, after asserting what every user mistake gets:
    exit code 2, no traceback, exactly one `error:` line on stderr."""
    capsys.readouterr()  # what earlier commands of the test wrote
    assert exit_code(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def options(data_dir, *extra: str, config: str = CONFIG, val_size=None, batch_size=None, epochs=None,
            logger: bool | None = None, progress_bar: bool | None = None) -> list[str]:
    """The common option list of a command: `--config CONFIG --data.data_dir DATA_DIR`, then each keyword given
    (None: left off, the config's value), then `extra`. `logger=False` is `--trainer.logger false`,
    `progress_bar=False` is `--trainer.enable_progress_bar false`."""
    args = ["--config", str(config), "--data.data_dir", str(data_dir)]
    for option, value in (("--data.val_size", val_size), ("--data.batch_size", batch_size),
                          ("--trainer.max_epochs", epochs)):  # fmt: skip
        if value is not None:
            args += [option, str(value)]
    for option, value in (("--trainer.logger", logger), ("--trainer.enable_progress_bar", progress_bar)):
        if value is not None:
            args += [option, str(value).lower()]
    return [*args, *extra]


def sweep_file(where: Path, data_dir: Path, parameters: dict, *fit_options: str, name: str = "sweep", logger=False,
               **keys) -> Path:  # fmt: skip
    """A W&B sweep file `<where>/<name>.yaml` whose trials fit `data_dir` with configs/cifar.yaml for 2 epochs (no
    progress bar, no logger unless `logger` is None: the config's W&B; `fit_options` after), on `parameters`;
    `keys` (method, metric, ...) over random, val_loss minimized."""
    command = ["${env}", "${interpreter}", "${program}", "fit", *options(data_dir, val_size=12, epochs=2, logger=logger,
               progress_bar=False), *fit_options, "${args}"]  # fmt: skip
    spec = {"method": "random", "metric": {"name": "val_loss", "goal": "minimize"}, "parameters": parameters,
            "command": command, **keys}  # fmt: skip
    (where / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return where / f"{name}.yaml"


def sweep_trials(folder: Path) -> list[dict]:
    """The rows of a sweep's trials.csv."""
    with (folder / "trials.csv").open() as f:
        return list(csv.DictReader(f))


STEPS_PER_EPOCH = (3 * 20 - 12) // 4  # stopped_run_resumes_exactly's data: 60 images, 12 for validation, batch 4
STOP_AT = STEPS_PER_EPOCH + 5  # mid-way through the second epoch, after the first epoch's checkpoint
# The fast recipe's augmentation draws random numbers for each batch before Lightning's stop check: its
# variant proves that a stop between the draw and the step does not shift the resumed run's draws.
FAST_RECIPE = ["--config", FAST_CONFIG, "--trainer.precision", "32",  # 1000 epochs: the same schedule in every run
               "--model.scheduler.init_args.total_steps", str(1000 * STEPS_PER_EPOCH)]  # fmt: skip


def stopped_run_resumes_exactly(sig: signal.Signals, code: int, recipe: list[str], tmp_path: Path) -> None:
    """Stop a real fit mid-training (the process gets `sig` at a fixed step, mid-epoch, from signals.SignalAt) and
    assert it exits `code`; then `--ckpt_path last` continues it in the same run, with no batch lost or repeated:
    the final weights equal those of a run that was never stopped (same seed). `recipe`: options after
    `--config configs/cifar.yaml` (FAST_RECIPE: the fast recipe; a device's options)."""
    from cifar.cli import main

    data = make_folder_data(tmp_path / "data", per_class=20, test_per_class=1)
    common = ["--config", CONFIG, *recipe, "--data.data_dir", str(data), "--data.val_size", "12", "--data.batch_size",
              "4", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--seed_everything", "5",
              "--trainer.deterministic", "true"]  # fmt: skip
    root = "runs/fast" if FAST_CONFIG in recipe else "runs/cifar"
    signal_at = ["--trainer.callbacks+=signals.SignalAt", "--trainer.callbacks.step", str(STOP_AT),
                 "--trainer.callbacks.signal", sig.name]  # fmt: skip
    process = subprocess.Popen(cli_command(["fit", *common, "--trainer.max_epochs", "1000", *signal_at]),
                               cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output = process.communicate(timeout=300)[0]
    finally:
        process.kill()  # if it never stopped
    assert process.returncode == code, output

    run = only((tmp_path / root).glob("*-fit-*"))
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    if sig == signal.SIGKILL:  # no clean-up: the checkpoint of the first epoch's end
        assert saved["global_step"] == STEPS_PER_EPOCH and saved["epoch"] == 0
    else:  # stopped at the next batch boundary, with a checkpoint
        assert saved["global_step"] == STOP_AT and saved["epoch"] == 1
        assert "resume with --ckpt_path last" in output

    # The resume, then the run never stopped, in this process: nothing of the stopped process is in its memory.
    epochs = str(saved["epoch"] + 2)
    with pytest.MonkeyPatch.context() as patch, app_messages() as said:
        patch.chdir(tmp_path)
        main(["fit", *common, "--ckpt_path", "last", "--trainer.max_epochs", epochs])
        assert f"--ckpt_path last: {root}/{run.name}/checkpoints/last.ckpt" in "\n".join(said)
        final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # the same run continues
        assert final["epoch"] == saved["epoch"] + 1
        assert final["global_step"] == (saved["epoch"] + 2) * STEPS_PER_EPOCH  # no step lost or counted twice
        main(["fit", *common, "--trainer.max_epochs", epochs, "--trainer.default_root_dir", "straight"])
    straight = torch.load(only((tmp_path / "straight").glob("*-fit-*/checkpoints/last.ckpt")), weights_only=True)
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


class ScalarReads(TorchDispatchMode):
    """Counts tensor -> Python number conversions (`.item()`, `float(t)`, `if t:`): on a GPU each is a host sync,
    the host waiting for every queued kernel."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def run_exported(fmt: str, path: Path, images: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Probabilities and class names from an exported file (`onnx`, `torch_export`, `torchscript`), with its own
    runtime only."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path))
        (probs,) = session.run(None, {"images": images.numpy()})
        return torch.from_numpy(probs), json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    extra = {"classes.json": ""}
    if fmt == "torch_export":
        program = torch.export.load(str(path), extra_files=extra)
        return program.module()(images), json.loads(extra["classes.json"])
    return torch.jit.load(str(path), _extra_files=extra)(images), json.loads(extra["classes.json"])


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def class_images(label: int, n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """n noisy RGB images (n, size, size, 3) uint8 whose mean colour depends on the label (learnable)."""
    base = np.zeros(3)
    base[label % 3] = 170
    noise = rng.integers(0, 85, size=(n, size, size, 3))
    return (base + noise).clip(0, 255).astype(np.uint8)


def make_folder_data(root: Path, per_class: int = 16, test_per_class: int = 4) -> Path:
    """train/<class>/ and test/<class>/ with PNG and JPEG files."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, pixels in enumerate(class_images(label, n, rng)):
                Image.fromarray(pixels).save(folder / f"{i:04d}.{'png' if i % 2 else 'jpg'}")
    return root


def make_official_data(root: Path, per_batch: int = 12, test_count: int = 12) -> dict:
    """cifar-10-batches-py/ in the official pickle format; returns the checksum table for it."""
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)

    def write_batch(name: str, n: int) -> list[str]:
        labels = [int(x) for x in rng.integers(0, len(OFFICIAL_CLASSES), size=n)]
        rows = np.stack([class_images(y, 1, rng)[0].transpose(2, 0, 1).reshape(-1) for y in labels])
        batch = {
            "batch_label": name,
            "labels": labels,
            "data": rows,
            "filenames": ["x.png"] * n,
        }  # py2 str keys read back as str
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        return [name, md5(folder / name)]

    train_list = [write_batch(f"data_batch_{i}", per_batch) for i in range(1, 6)]
    test_list = [write_batch("test_batch", test_count)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": OFFICIAL_CLASSES, "num_cases_per_batch": per_batch}, f)
    return {"train_list": train_list, "test_list": test_list, "meta_md5": md5(folder / "batches.meta")}


@pytest.fixture
def folder_data(tmp_path: Path) -> Path:
    return make_folder_data(tmp_path / "folder-data")


@pytest.fixture
def official_data(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """(data_dir, checksums); the checksums are also patched in this process."""
    table = make_official_data(tmp_path / "official-data")
    monkeypatch.setattr(CIFAR10, "train_list", table["train_list"])
    monkeypatch.setattr(CIFAR10, "test_list", table["test_list"])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": table["meta_md5"]})
    return tmp_path / "official-data", table


@pytest.fixture(autouse=True)
def hermetic_wandb(tmp_path: Path, monkeypatch):
    """Keep W&B's settings and cache out of the home directory; never reach a server."""
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / ".wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / ".wandb-data"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    # In-process runs leave these behind: the address of this process's wandb-core service, which a
    # subprocess would try to share, and Lightning's last seed, which a subprocess would adopt.
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    yield
    if wandb.run is not None:  # left by an in-process command (Lightning finishes none); a process would end it
        wandb.finish()


def cli_command(args: list[str], checksums: dict | None = None) -> list[str]:
    if not checksums:  # main.py itself: Lightning's DDP launcher re-runs sys.argv, which `-c` cannot be
        return [sys.executable, str(ROOT / "main.py"), *args]
    return [sys.executable, "-c", PATCHED_MAIN, json.dumps(checksums), *args]


def cli_env(env: dict | None = None) -> dict:
    """This process's environment for a CLI subprocess: the repository (for `cifar`) and tests/ (for test-side
    callbacks such as `signals.SignalAt`) put before any PYTHONPATH already set; `env` on top, None unsets. What
    an in-process command of the same test left in os.environ is not passed on (see hermetic_wandb): the address
    of this process's wandb-core service, which the subprocess would share (its run's last records could then
    come after it exits), and Lightning's last seed."""
    path = os.pathsep.join([str(ROOT), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    merged = {**os.environ, "PYTHONPATH": path, "WANDB_SERVICE": None, "PL_GLOBAL_SEED": None, **(env or {})}
    return {key: value for key, value in merged.items() if value is not None}


def run_cli(args: list[str], cwd: Path, checksums: dict | None = None, env: dict | None = None, check=True):
    """Run `python main.py ARGS` (the real CLI) in a new process; returns the CompletedProcess."""
    result = subprocess.run(cli_command(args, checksums), cwd=cwd, capture_output=True, text=True, timeout=600,
                            env=cli_env(env))  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def wandb_env(root: Path) -> dict:
    """hermetic_wandb's settings, for a session fixture (which runs outside any test's monkeypatch): W&B's
    settings and cache under `root`, W&B's own mode, and nothing an in-process run left in os.environ."""
    return {"WANDB_CONFIG_DIR": str(root / ".wandb-config"), "WANDB_CACHE_DIR": str(root / ".wandb-cache"),
            "WANDB_DATA_DIR": str(root / ".wandb-data"), "WANDB_MODE": None, "WANDB_SERVICE": None,
            "PL_GLOBAL_SEED": None}  # fmt: skip


SECRET = "fake-api-key-0123456789abcdef0123456789abcdef"  # a W&B API key that must not end up in any file


@pytest.fixture(scope="session")
def fitted(tmp_path_factory) -> SimpleNamespace:
    """One fit shared by the tests that evaluate, predict with, export or serve a fitted run: the design card's
    `fit --config configs/cifar.yaml` in a folder holding configs/ and data/ (3 classes, 48 training images: 12
    validation, 36 trained on at batch 8, 5 steps an epoch; 12 test images), 2 epochs (FAST), in a new process,
    by a user with an API key who chose offline mode (WANDB_MODE=offline).

    Treat it as read-only: a test that runs a command in it (which adds a run, or writes beside a checkpoint)
    works on a copy, `fitted_copy(fitted, tmp_path)`. Fields: root (the folder, the fit's working directory),
    data (root/data), run (its run directory), fit (the CompletedProcess).

    Not for a test that resumes the run: a copy resumes into `last-v1.ckpt`, not `last.ckpt` (the checkpoint's
    ModelCheckpoint state names the folder it was saved in; moved, Lightning forgets its `last_model_path`).
    """
    root = tmp_path_factory.mktemp("fitted")
    shutil.copytree(ROOT / "configs", root / "configs")
    data = make_folder_data(root / "data")  # configs/cifar.yaml reads data/: train/ and test/ image folders
    fit = run_cli(["fit", "--config", "configs/cifar.yaml", "--data.val_size", "12", *FAST], root,
                  env={**wandb_env(root), "WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"})  # fmt: skip
    return SimpleNamespace(root=root, data=data, run=only((root / "runs" / "cifar").glob("*-fit-*")), fit=fit)


def fitted_copy(fitted: SimpleNamespace, where: Path) -> SimpleNamespace:
    """A copy of the shared fit's folder (configs/, data/, runs/) at `where` (which may exist), with the fields of
    `fitted` pointing into it: run directories and checkpoints name their paths relative to the folder."""
    shutil.copytree(fitted.root, where, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".wandb-*"))
    return SimpleNamespace(root=where, data=where / "data", run=where / fitted.run.relative_to(fitted.root),
                           fit=fitted.fit)  # fmt: skip


@pytest.fixture(scope="session")
def one_step_fits(tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Every CLI config in configs/ (CONFIGS), as it is (its logger too: W&B, offline without an API key), parsed
    by the real CLI in this process, built, and fitted for one training step on tiny data (the folder images, batch
    4, one validation batch where the config validates after the first epoch); then its last checkpoint tested on
    one batch. {config name: Built's record of the fit, plus `checkpoint`: its last.ckpt, and `test`: the test run's
    test_report.json}."""
    from probes import Built

    from cifar.cli import main

    root = tmp_path_factory.mktemp("one-step")
    data = make_folder_data(root / "data")
    fits = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for key, value in wandb_env(root).items():
            patch.setenv(key, value) if value is not None else patch.delenv(key, raising=False)
        for config in CONFIGS:
            common = options(data, *CPU_PRECISION, config=config, batch_size=4, progress_bar=False)
            fitted = set(root.glob("runs/*/*-fit-*"))
            main(["fit", *common, "--data.val_size", "4", "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
                  "1", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                  "--trainer.callbacks+=probes.Built", "--trainer.callbacks.name", config.stem])  # fmt: skip
            wandb.finish()  # as the process's exit would
            tested = set(root.glob("runs/*/*-test-*"))
            main(["test", *common, "--ckpt_path", "last", "--trainer.limit_test_batches", "1"])
            wandb.finish()
            (run,) = set(root.glob("runs/*/*-test-*")) - tested
            fits[config.stem] = Built.fits.pop(config.stem)
            (fit,) = set(root.glob("runs/*/*-fit-*")) - fitted
            fits[config.stem].checkpoint = fit.resolve() / "checkpoints" / "last.ckpt"
            fits[config.stem].test = json.loads((run / "test_report.json").read_text())
    return fits

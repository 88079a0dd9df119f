"""The training hot path, checked on the CPU for what would cost on a GPU: host syncs per step, where a batch's
index lives, ops with no deterministic CUDA backward, `model.compile` recompiles, per-batch augmentation draws;
and on the CPU itself, glibc keeping freed memory for the next step."""

from pathlib import Path

import pytest
import torch
from conftest import FAST_CONFIG, ScalarReads, options
from lightning.pytorch import Callback
from torch.utils._python_dispatch import TorchDispatchMode


class SyncsPerStep(Callback):
    """The scalar reads between the starts of consecutive training batches of one epoch: the step, its hooks,
    Lightning's logging and the progress bar. Filled in `STEPS` as (global step, reads)."""

    STEPS: list[tuple[int, int]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.mode, self.previous = ScalarReads().__enter__(), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.previous is not None:
            SyncsPerStep.STEPS.append((self.previous, self.mode.count))
        self.mode.count, self.previous = 0, trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module):
        self.mode.__exit__(None, None, None)


def test_a_training_step_reads_no_tensor_back_but_the_logged_loss(folder_data, tmp_path, monkeypatch):
    """configs/fast.yaml through the CLI, progress bar and logger on: between two training batches nothing is read
    back to the host, except on the steps sent to the logger (one read: the step's loss). On a GPU each read is a
    host sync; a progress-bar value read at every batch made two per step."""
    from cifar.cli import main

    monkeypatch.chdir(tmp_path)
    SyncsPerStep.STEPS.clear()
    main(["fit", *options(folder_data, "--trainer.precision", "32", "--trainer.log_every_n_steps", "3",
                          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
                          "--trainer.callbacks+=test_hotpath.SyncsPerStep", config=FAST_CONFIG, val_size=0,
                          batch_size=4, epochs=2)])  # fmt: skip
    steps = SyncsPerStep.STEPS
    assert len(steps) == 2 * (12 - 1)  # 48 images / 4 per batch, 2 epochs; the last batch of each has no successor
    logged = [reads for step, reads in steps if (step + 1) % 3 == 0]
    assert logged and all(reads == 1 for reads in logged), steps
    assert all(reads == 0 for step, reads in steps if (step + 1) % 3), steps


def test_a_batch_is_gathered_with_an_index_on_the_images_device():
    """Data on the GPU (`data_on_device`): the batch's index goes there first, so the gather runs there with no
    blocking copy of a CPU index. The `meta` device stands in for the GPU: every tensor an op sees is on it."""
    from cifar.data import TensorBatches

    devices = []

    class Devices(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.index.Tensor:
                flat = [args[0], *args[1]]
                devices.append({t.device.type for t in flat if isinstance(t, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    data = TensorBatches(torch.zeros(10, 3, 4, 4, dtype=torch.uint8, device="meta"), torch.zeros(10, device="meta"))
    with Devices():
        images, labels = data.__getitems__([3, 1, 4])
    assert images.shape == (3, 3, 4, 4) and labels.shape == (3,)
    assert devices == [{"meta"}, {"meta"}]


# aten ops whose CUDA kernels PyTorch documents as nondeterministic with no deterministic alternative
# (`torch.use_deterministic_algorithms`): under `--trainer.deterministic true` they raise on a GPU.
NONDETERMINISTIC_ON_CUDA = ("adaptive_max_pool2d_backward", "adaptive_avg_pool3d_backward", "avg_pool3d_backward",
                            "max_pool3d_with_indices_backward", "fractional_max_pool", "max_unpool",
                            "reflection_pad3d_backward", "replication_pad", "upsample_", "nll_loss2d",
                            "_ctc_loss", "embedding_bag", "grid_sampler", "histc", "bincount", "kthvalue", "median")


@pytest.mark.parametrize("net", ["cifar.nets.TutorialCNN", "cifar.nets.AirbenchNet"])
def test_a_training_step_uses_no_op_without_a_deterministic_cuda_kernel(net):
    """`--trainer.deterministic true` (README) must hold on a GPU: the ops of a training step (forward, loss,
    backward) recorded on the CPU, against PyTorch's list. AirbenchNet's AdaptiveMaxPool2d was one."""
    import importlib

    from cifar.module import LitModel

    module, name = net.rsplit(".", 1)
    model = LitModel(net=getattr(importlib.import_module(module), name)(num_classes=10))
    ops = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(func.name())
            return func(*args, **(kwargs or {}))

    images, labels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    with Ops():
        torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1).backward()
    assert any("convolution_backward" in op for op in ops)  # the backward was recorded
    assert not [op for op in ops if any(bad in op for bad in NONDETERMINISTIC_ON_CUDA)]


def test_each_batch_draws_its_augmentation_from_its_own_generator():
    """(seed, rank, epoch, batch) alone fix a batch's flips, shifts and jitter: the same in a resumed run whatever
    the global random state, different on each DDP rank and at each batch."""
    from cifar.augment import BatchAugment
    from cifar.resume import batch_generator

    augment = BatchAugment(flip="random", translate=2, brightness=0.2, contrast=0.2)
    augment.prepare(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), torch.Generator().manual_seed(0))
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)

    def draw(seed=1, rank=0, epoch=0, batch=5):
        return augment(images, epoch, batch_generator(images.device, seed, rank, epoch, batch))

    torch.manual_seed(0)
    first = draw()
    torch.manual_seed(123)  # another global state: no effect
    assert torch.equal(draw(), first)
    for other in (dict(rank=1), dict(batch=6), dict(epoch=2), dict(seed=2)):
        assert not torch.equal(draw(**other), first), other


def test_a_compiled_net_recompiles_only_for_the_last_batch_and_for_evaluation(folder_data, tmp_path, monkeypatch):
    """`--model.compile true` on a fit with validation every epoch (a short last batch, TTA on the least confident
    quarter): Dynamo compiles the training step, recompiles once for the short batch (then with a dynamic batch
    size, which TTA's subsets reuse) and once for evaluation (no grad), far under its limit, past which it would
    run eager. The TTA views are copied into the batch's layout: their strides cost a recompile before.
    Guards are Dynamo's, whatever the backend: `eager` spares the test inductor's code generation."""
    import logging

    import torch._dynamo

    from cifar.cli import main

    compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compile(self, backend="eager", **kwargs))
    recompiles = []
    handler = logging.Handler()
    handler.emit = lambda record: recompiles.append(record.getMessage())
    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)  # torch's loggers do not propagate: a handler of our own hears them
    logging.getLogger("torch._dynamo").addHandler(handler)
    monkeypatch.chdir(tmp_path)
    try:
        main(["fit", *options(folder_data, "--trainer.check_val_every_n_epoch", "1", "--trainer.precision", "32",
                              "--model.compile", "true", config=FAST_CONFIG, val_size=10, batch_size=16, epochs=2,
                              logger=False, progress_bar=False)])  # fmt: skip
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    recompiles = [message for message in recompiles if "Recompiling function forward" in message]
    assert len(recompiles) == 2, recompiles
    assert "size mismatch at index 0" in recompiles[0] and "grad_mode" in recompiles[1]
    assert len(recompiles) < torch._dynamo.config.recompile_limit


FREED_MEMORY_PROBE = """
import sys, torch
from cifar.cpu import keep_freed_memory
applied = keep_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20  # MB
for _ in range(3):
    block = torch.ones(2**26)  # 256 MB, past glibc's largest mmap threshold (32 MB)
    held = rss()
    del block
print(applied, held - rss())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc (Linux)")
@pytest.mark.parametrize("environ", [{}, {"MALLOC_ARENA_MAX": "2"}], ids=["default", "user_malloc_settings"])
def test_freed_memory_is_kept_for_the_next_step_unless_the_user_tuned_malloc(environ, monkeypatch):
    """Under glibc, a freed 256 MB block stays in the process (the next step reuses it) rather than being
    unmapped and faulted in again; the user's own MALLOC_* settings are left alone."""
    import subprocess
    import sys

    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    done = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], capture_output=True, text=True, check=True)
    applied, released = done.stdout.split()
    if environ:
        assert (applied, int(released) > 200) == ("False", True)  # glibc's default: unmapped on free
    else:
        assert (applied, int(released) < 50) == ("True", True)


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_says_to_train_in_32_bit(has_bf16, folder_data, tmp_path, monkeypatch,
                                                                         recwarn):  # fmt: skip
    """Emulated bf16 is ~16x slower a step than 32-bit (an AVX2 EPYC): a bf16 fit on such a CPU says so and what to
    pass instead; on a CPU with bf16 instructions it says nothing."""
    from cifar.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cifar.cpu.has_bf16", lambda: has_bf16)
    main(["fit", *options(folder_data, "--trainer.precision", "bf16-mixed", val_size=12, epochs=1, logger=False)])
    said = [str(w.message) for w in recwarn if "no bf16 instructions" in str(w.message)]
    assert (said and "--trainer.precision 32-true" in said[0]) if not has_bf16 else not said, said

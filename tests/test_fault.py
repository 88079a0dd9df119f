"""Stopping a run (SIGTERM, Ctrl-C) saves a checkpoint, says so in the exit code, and resumes from it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (CPU_PRECISION, FAST_CONFIG, FAST_RECIPE, cli_env, cli_error, fitted_copy, options, only, run_cli,
                      stopped_run_resumes_exactly)

@pytest.mark.parametrize(("sig", "code", "recipe"), [(signal.SIGTERM, 143, []), (signal.SIGINT, 130, []),
                                                     (signal.SIGKILL, -9, []), (signal.SIGTERM, 143, FAST_RECIPE)],
                         ids=["SIGTERM", "SIGINT", "SIGKILL", "SIGTERM-fast-recipe"])  # fmt: skip
def test_stopped_run_resumes_exactly_where_it_stopped(sig, code, recipe, tmp_path):
    """Stop a real fit mid-training at a fixed step; `--ckpt_path last` continues it in the same run to the weights
    of a run never stopped (conftest's `stopped_run_resumes_exactly`, which test_cuda.py runs on the device)."""
    stopped_run_resumes_exactly(sig, code, recipe, tmp_path)


def test_resume_parity_two_epochs_straight_or_one_plus_one(folder_data, tmp_path, monkeypatch):
    from cifar.cli import main
    from cifar.resume import RandomState

    restores = []  # the commands that hand RandomState a checkpoint (Lightning: every one that restores)
    restore = RandomState.on_load_checkpoint
    monkeypatch.setattr(RandomState, "on_load_checkpoint",
                        lambda self, trainer, *args: restores.append(trainer.state.fn) or restore(self, trainer, *args))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    common = options(folder_data, "--seed_everything", "3", "--trainer.deterministic", "true", val_size=12,
                     batch_size=8, progress_bar=False, logger=False)  # fmt: skip
    main(["fit", *common, "--trainer.max_epochs", "2", "--trainer.default_root_dir", "straight"])
    main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.default_root_dir", "resumed"])
    main(["fit", *common, "--trainer.max_epochs", "2", "--trainer.default_root_dir", "resumed", "--ckpt_path", "last"])

    (straight,), (resumed,) = Path("straight").glob("*-fit-*"), Path("resumed").glob("*-fit-*")  # one run each
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 10)
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    best = lambda c: c["callbacks"][next(k for k in c["callbacks"] if k.startswith("ModelCheckpoint"))]  # noqa: E731
    assert best(a)["best_model_score"] == best(b)["best_model_score"]
    assert Path(best(b)["best_model_path"]).name == Path(best(a)["best_model_path"]).name
    assert len(list(resumed.glob("config*.yaml"))) == 2  # the first config kept, the resume's beside it
    assert "rng_state" in a and restores == ["fit"]
    set_states = []
    monkeypatch.setattr(torch, "set_rng_state", set_states.append)
    main(["validate", *common, "--trainer.default_root_dir", "resumed", "--ckpt_path", "last"])
    assert restores == ["fit", "validate"] and set_states == []  # validate leaves this process's random state alone


def test_under_ddp_the_ranks_agree_on_a_stop_every_8_batches_not_every_batch():
    """The agreement is a collective (a host sync on GPUs): once per 8 steps, at the same batch on every rank."""
    from cifar.resume import Stopped, StopOnSignal

    stopper = StopOnSignal()
    agreed = []
    ddp = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=lambda stop, all: agreed.append(stop) or stop))
    for batch_idx in range(20):
        stopper.on_train_batch_start(ddp, None, None, batch_idx)
    assert agreed == [False, False, False]  # batches 0, 8 and 16
    stopper.requested = signal.SIGTERM
    stopper.on_train_batch_start(ddp, None, None, 21)  # between agreements: go on
    with pytest.raises(Stopped) as stop:
        stopper.on_train_batch_start(ddp, None, None, 24)
    assert stop.value.code == 143 and agreed[-1] is True
    single = SimpleNamespace(world_size=1, strategy=None)  # one process: every batch, no collective
    with pytest.raises(Stopped):
        stopper.on_train_batch_start(single, None, None, 21)


def test_random_state_is_restored_on_the_cuda_devices_there_are(monkeypatch):
    """A checkpoint saved on 8 GPUs resumed where 2 are visible: their generators, not an IndexError."""
    from cifar.resume import RandomState

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, int(state[0]))))
    cpu = torch.get_rng_state()
    checkpoint = {"rng_state": {"torch": cpu, "cuda": [torch.tensor([100 + i], dtype=torch.uint8) for i in range(8)]}}
    torch.rand(3)  # moves this process's generator on
    RandomState().on_load_checkpoint(SimpleNamespace(state=SimpleNamespace(fn="fit")), None, checkpoint)
    assert restored == [(0, 100), (1, 101)] and torch.equal(torch.get_rng_state(), cpu)


def test_a_save_that_dies_halfway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    from cifar.resume import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process is stopped in the middle of writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_a_corrupt_newest_checkpoint_is_named_not_used(fitted, tmp_path, capsys, monkeypatch):
    fitted_copy(fitted, tmp_path)  # the shared fit, copied here
    monkeypatch.chdir(tmp_path)
    common = options("data", val_size=12, progress_bar=False, logger=False)
    run = only(Path("runs/cifar").glob("*-fit-*"))
    for ckpt in ("last", "best"):  # `best`: the file run.json names, which a corrupt last.ckpt does not hide
        name = "last.ckpt" if ckpt == "last" else json.loads((run / "run.json").read_text())["best"]
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a full disk
        message = cli_error(["test", *common, "--ckpt_path", ckpt], capsys)
        assert f"{path} is not a readable Lightning checkpoint" in message


@pytest.mark.slow
def test_online_wandb_with_no_server_fails_fast_with_advice(folder_data, tmp_path):
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "local-" + "0" * 40, "WANDB_INIT_TIMEOUT": "5"}
    started = time.time()
    result = run_cli(["fit", *options(folder_data, "--trainer.logger.init_args.offline", "false", val_size=12, epochs=1)],
                     tmp_path, env=env, check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "W&B could not start the run" in errors[0] and "offline true" in errors[0]
    assert "0" * 40 not in result.stdout + result.stderr
    assert time.time() - started < 60


def test_resumed_wandb_run_keeps_its_id_and_both_parts_are_syncable(folder_data, tmp_path, monkeypatch):
    import wandb

    from cifar.cli import main

    common = options(folder_data, val_size=12, batch_size=8, progress_bar=False)
    with monkeypatch.context() as patch:  # the first part in this process, the second in a new one
        patch.chdir(tmp_path)
        main(["fit", *common, "--trainer.max_epochs", "1"])
        wandb.finish()  # as the process's exit would
    run_cli(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"], tmp_path)
    (run,) = (tmp_path / "runs" / "cifar").glob("*-fit-*")
    parts = sorted((run / "wandb").glob("offline-run-*"))
    run_id = json.loads((run / "run.json").read_text())["id"]
    assert len(parts) == 2 and all(p.name.endswith(f"-{run_id}") for p in parts)  # one W&B id, kept on resume
    # `python -m wandb`, not `wandb`: where wandb is installed with --target (the GPU machine), no script is on PATH
    dry_run = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(run / "wandb")],
                             capture_output=True, text=True, cwd=tmp_path, env=cli_env({"WANDB_MODE": "offline"}),
                             timeout=120)  # fmt: skip
    assert "Would sync 2 run(s)" in dry_run.stdout + dry_run.stderr


def test_fast_recipe_resumed_without_its_seed_ends_with_the_same_weights(folder_data, tmp_path, monkeypatch):
    """configs/fast.yaml (alternating flips, shifts, whitening bias stopped after 3 epochs) resumed with
    `--ckpt_path last` and no `--seed_everything`: the seed-dependent parts (order, mirrored half, augmentation
    draws) come from the run, so the weights equal an uninterrupted run's."""
    from cifar.cli import main

    monkeypatch.chdir(tmp_path)
    common = options(folder_data, "--trainer.enable_model_summary", "false", "--model.scheduler.init_args.total_steps",
                     "12", *CPU_PRECISION, config=FAST_CONFIG, val_size=0, batch_size=16, logger=False,
                     progress_bar=False)
    # total_steps 12: 4 epochs x 3 steps, whatever max_epochs says
    main(["fit", *common, "--seed_everything", "7", "--trainer.max_epochs", "4", "--trainer.default_root_dir", "straight"])
    main(["fit", *common, "--seed_everything", "7", "--trainer.max_epochs", "2", "--trainer.default_root_dir", "resumed"])
    monkeypatch.delenv("PL_GLOBAL_SEED")  # Lightning keeps the last seed here: a new process would not have it
    main(["fit", *common, "--trainer.max_epochs", "4", "--trainer.default_root_dir", "resumed", "--ckpt_path", "last"])

    (straight,), (resumed,) = Path("straight").glob("*-fit-*"), Path("resumed").glob("*-fit-*")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (3, 12)
    assert not torch.equal(a["state_dict"]["classifier.net.whiten.bias"], torch.zeros_like(a["state_dict"]["classifier.net.whiten.bias"]))
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)

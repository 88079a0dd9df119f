"""Checkpoints from strangers never run code; the same seed gives the same run."""

import os
from pathlib import Path

import torch
from conftest import FAST, cli_error, options

from cifar.cli import main


class Payload:
    """What a malicious checkpoint carries: unpickling it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(folder_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload(marker)}}, evil)
    for subcommand in ("test", "validate", "predict", "fit"):
        message = cli_error([subcommand, *options(folder_data, "--data.predict_dir", str(folder_data), "--ckpt_path",
                                                  str(evil))], capsys)  # fmt: skip
        assert f"{evil} is not a readable Lightning checkpoint" in message
    assert not marker.exists()


def test_same_seed_same_weights_and_metrics(folder_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *options(folder_data, *FAST, "--trainer.max_epochs", "1", "--seed_everything", "7",
                            "--trainer.deterministic", "true", "--trainer.logger", "false", val_size=12)]  # fmt: skip
    main(args)
    main(args)
    runs = sorted(Path("runs/cifar").glob("*-fit-*"))
    assert len(runs) == 2
    first, second = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in runs)
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), name
    best = [c["callbacks"][next(k for k in c["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_score"]
            for c in (first, second)]  # fmt: skip
    assert torch.equal(best[0], best[1])  # the same val_loss

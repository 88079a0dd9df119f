"""The config is the CLI: print_config round-trips, and configs/cifar.yaml is what README's command generates."""

import re
import shlex
from pathlib import Path

import yaml
from conftest import CONFIG, CONFIGS, ROOT, exit_code
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args


def print_config(args: list[str], capsys) -> str:
    assert exit_code(args) == 0
    return capsys.readouterr().out


def test_print_config_round_trip(tmp_path, capsys):
    printed = print_config(["fit", "--print_config"], capsys)
    defaults = yaml.safe_load(printed)
    assert defaults["model"]["net"]["class_path"] == "cifar.nets.TutorialCNN"
    assert defaults["model"]["optimizer"]["init_args"]["lr"] == 2e-4  # the tutorial's recipe is the default
    assert defaults["data"]["batch_size"] == 32 and defaults["data"]["val_size"] == 5000
    (tmp_path / "printed.yaml").write_text(printed)
    assert print_config(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"], capsys) == printed


def readme_regenerate_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(python main.py fit [^`]*?> configs/cifar.yaml)\n```", readme)
    assert block, "README.md lost the command that regenerates configs/cifar.yaml"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    assert words[:2] == ["python", "main.py"] and words[-2:] == [">", "configs/cifar.yaml"]
    return words[2:-2]


def test_configs_cifar_yaml_is_what_the_readme_command_generates(tmp_path, capsys):
    generated = tmp_path / "generated.yaml"
    generated.write_text(print_config(readme_regenerate_command(), capsys))
    from_file = print_config(["fit", "--config", CONFIG, "--print_config"], capsys)
    from_generated = print_config(["fit", "--config", str(generated), "--print_config"], capsys)
    assert yaml.safe_load(from_file) == yaml.safe_load(from_generated)


def test_every_config_parses_builds_and_takes_a_training_step(one_step_fits):
    """Each CLI config in configs/ (configs/sweep.yaml is a W&B sweep, with its own test below), as it is: parsed by
    the real CLI, its trainer, logger, callbacks, model and data built, one training step taken, and its last
    checkpoint tested (the fixture one_step_fits)."""
    assert {"cifar", "fast", "fast95", "fast96", "resnet18", "wrn28_10", "wrn28_10_autoaugment"} <= set(one_step_fits)
    assert list(one_step_fits) == [c.stem for c in CONFIGS]
    for name, fit in one_step_fits.items():
        assert fit.global_step == 1, name
        assert fit.loggers == ["WandbLogger"], name  # every config logs to W&B
        assert Path(fit.test["checkpoint"]).name == "last.ckpt" and fit.test["fit_run"], (name, fit.test)
        metrics = fit.test["metrics"]  # a loss of 0.0: a net sure of one class after a step at lr 0.1 (wrn28_10)
        assert 0 <= metrics["test_acc"] <= 1 and 0 <= metrics["test_loss"] < float("inf"), (name, fit.test)


def test_configs_cifar_yaml_declares_logger_and_callbacks(one_step_fits):
    """What the CLI builds from configs/cifar.yaml: a W&B logger not told to be offline (W&B's own settings
    decide), and each of the config's callbacks once, besides the app's own and Lightning's."""
    built = one_step_fits["cifar"]
    assert built.loggers == ["WandbLogger"] and built.wandb_offline == [False]
    declared = ["EarlyStopping", "ModelCheckpoint", "ImagePredictionLogger", "PredictionCSVWriter", "TestReport"]
    assert {name: built.callbacks.count(name) for name in declared} == dict.fromkeys(declared, 1), built.callbacks
    assert {"StopOnSignal", "RandomState"} <= set(built.callbacks)  # the app's, always there


def sweep_values(spec: dict) -> list:
    """The values a sweep parameter can take: its list, its one value, or the ends of its range."""
    return spec.get("values") or ([spec["value"]] if "value" in spec else [spec["min"], spec["max"]])


def test_every_sweep_parameter_is_a_cli_argument_with_each_of_its_values(capsys, monkeypatch):
    """configs/sweep.yaml's command, with each value as the W&B agent passes it, is a valid `fit` command."""
    monkeypatch.chdir(ROOT)  # where `wandb agent` runs the command
    sweep = yaml.safe_load((ROOT / "configs" / "sweep.yaml").read_text())
    assert (ROOT / sweep["program"]).is_file() and sweep["metric"] == {"name": "val_acc", "goal": "maximize"}
    command = sweep["command"]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"] and command[-1] == "${args}"
    for key, spec in sweep["parameters"].items():
        for value in sweep_values(spec):
            flags = create_sweep_command_args({"args": {key: {"value": value}}})["args"]  # what ${args} becomes
            printed = yaml.safe_load(print_config([*command[3:-1], *flags, "--print_config"], capsys))
            for part in key.split("."):
                printed = printed[part]
            assert printed == value, (key, value)

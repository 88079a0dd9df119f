"""The config is the CLI: print_config round-trips, and configs/cifar.yaml is what README's command generates."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import CONFIG, ROOT

from cifar.cli import main


def print_config(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
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


def test_configs_cifar_yaml_declares_logger_and_callbacks():
    config = yaml.safe_load(Path(CONFIG).read_text())
    assert config["trainer"]["logger"]["class_path"].endswith("WandbLogger")
    assert config["trainer"]["logger"]["init_args"]["offline"] is True  # no account, no network: still works
    names = [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]]
    assert names == ["EarlyStopping", "ModelCheckpoint", "ImagePredictionLogger", "PredictionCSVWriter"]

"""Config loading, inheritance, overrides and the one-line errors (exit code 2, nothing written)."""

import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_is_valid(preset):
    config = load_config(preset)
    assert config.train.epochs >= 1


def test_inheritance_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {train_shards: a, val_shards: b}\ntrain: {epochs: 7, batch_size: 4}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain: {batch_size: 8}\n")
    config = load_config(child, ["optim.lr=2e-4", "train.epochs=3"])
    assert (config.train.epochs, config.train.batch_size, config.optim.lr) == (3, 8, 2e-4)
    assert config.data.train_shards == "a"


def test_v2_preset_expresses_its_recipe():
    config = load_config(REPO / "configs" / "airogs_v2.yaml")
    assert [p.from_epoch for p in config.unfreeze.phases] == [0, 5]
    assert config.unfreeze.phases[1].train == "last_50_layers" and config.unfreeze.phases[1].lr == 1e-5
    assert (config.loss.name, config.loss.gamma, config.loss.alpha) == ("focal", 1.5, 0.75)
    assert config.model.head_dropout == [0.3, 0.3, 0.2] and config.optim.weight_decay == 5e-4


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train_shards: a, val_shards: b}\n" + text)
    return path


BAD_CASES = {
    "unknown key": ("train: {epohcs: 3}\n", "train.epohcs", "did you mean 'train.epochs'"),
    "wrong type": ("train: {epochs: three}\n", "train.epochs", "expected int"),
    "dropout out of range": ("model: {head_widths: [8], head_dropout: [1.0]}\n", "model.head_dropout[0]", "outside"),
    "negative lr": ("optim: {lr: -0.001}\n", "optim.lr", "outside"),
    "unfreeze beyond last epoch": ("train: {epochs: 4}\nunfreeze: {phases: [{from_epoch: 0, train: head}, "
                                   "{from_epoch: 6, train: all}]}\n", "unfreeze.phases[1].from_epoch", "never run"),
    "accumulation below 1": ("train: {accumulation_steps: 0}\n", "train.accumulation_steps", "outside"),
    "bad phase spec": ("unfreeze: {phases: [{from_epoch: 0, train: last_layers}]}\n",
                       "unfreeze.phases[0].train", "last_N_layers"),
    "unknown lr scaling": ("optim: {lr_scaling: cubic, reference_global_batch: 32}\n", "optim.lr_scaling",
                           "expected one of 'none', 'linear', 'sqrt'"),
    "lr scaling without reference": ("optim: {lr_scaling: linear}\n", "optim.lr_scaling",
                                     "needs optim.reference_global_batch"),
    "reference batch below 1": ("optim: {reference_global_batch: 0}\n", "optim.reference_global_batch", "outside"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_raises_naming_file_and_key(tmp_path, case):
    text, key, fragment = BAD_CASES[case]
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert str(path) in message and key in message and fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["unknown key", "negative lr", "unfreeze beyond last epoch", "unknown lr scaling"])
def test_cli_exits_2_and_writes_nothing(tmp_path, case):
    text, key, _ = BAD_CASES[case]
    path = _write(tmp_path, text + f"run_root: {tmp_path / 'runs'}\n")
    result = subprocess.run([sys.executable, "-m", "dist_train.main", "--config", str(path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "runs").exists()


def test_cli_override_error_names_set(tmp_path):
    path = _write(tmp_path, "")
    result = subprocess.run([sys.executable, "-m", "dist_train.main", "--config", str(path), "--set",
                             "trian.epochs=2"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "--set: trian.epochs: unknown key (did you mean 'train'?)" in result.stderr


def test_out_of_range_override_is_blamed_on_set():
    with pytest.raises(ConfigError) as raised:
        load_config(REPO / "configs" / "demo.yaml", ["optim.lr=-1"])
    assert str(raised.value) == "--set: optim.lr: -1.0 is outside (0.0, 10.0]"


@pytest.mark.parametrize("name", ["airogs_v1_baseline", "airogs_v2", "airogs_v3", "demo", "demo_v1", "demo_v2"])
def test_every_recipe_states_the_global_batch_it_was_tuned_at(name):
    """The users' Keras recipes ran at a global batch of 32; the demos at 16 per rank on 2 ranks."""
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert config.optim.reference_global_batch == 32 and config.optim.lr_scaling == "none"


@pytest.mark.parametrize("override", ["optim.lr={", "train.epochs=[1", "name=@x"])
def test_a_set_value_that_is_not_yaml_is_one_line_naming_set(override, tmp_path):
    """Before: a yaml.scanner/parser traceback from the command line, also under --nproc-per-node."""
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as raised:
        load_config(_write(tmp_path, ""), [override])
    message = str(raised.value)
    assert message.startswith(f"--set: {key}: ") and "not a valid YAML value" in message and "\n" not in message
    assert f"'{key}=\"{value}\"'" in message


def test_a_binary_file_as_config_is_one_line(tmp_path):
    """Before: UnicodeDecodeError (e.g. --config given a fundus JPEG)."""
    image = tmp_path / "image.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xdb")
    with pytest.raises(ConfigError) as raised:
        load_config(image)
    assert str(raised.value).startswith(f"{image}: ") and "not a text file" in str(raised.value)


@pytest.mark.parametrize("text, key", [("foo: 1\n", "foo"), ("loss: 3\n", "loss")])
def test_a_top_level_mistake_in_a_file_with_a_base_names_that_file(tmp_path, text, key):
    """Before, the error named configs/test_tiny.yaml (the base), where the key is not."""
    child = tmp_path / "mine.yaml"
    child.write_text(f"base: {REPO / 'configs' / 'test_tiny.yaml'}\n{text}")
    with pytest.raises(ConfigError) as raised:
        load_config(child)
    assert str(raised.value).startswith(f"{child}: {key}")

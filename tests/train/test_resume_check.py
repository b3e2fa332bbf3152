"""Resuming under a changed config: refused in one line when the checkpoint cannot take it, listed when it
can; a fresh start (`--resume none`) moves an earlier run aside instead of appending to its history.

The unit tests compare against hand-written expectations; the run tests use the real CLI
(`python -m dist_train.main`, and torchrun for two ranks) on real shards, and the blocking cases are
the ones a real resume was seen to die on (DCP: "Missing key in checkpoint state_dict").
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.config import load_config
from dist_train.train.resume_check import comparable, config_changes

from conftest import write_shards

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "test_tiny.yaml")
TINY = ("model.backbone=test_efficientnet", "train.epochs=1", "train.steps_per_epoch=2")


# ---------------------------------------------------------------- config_changes, by hand


@pytest.fixture(scope="module")
def saved() -> dict:
    return comparable(load_config(CONFIG, ["data.train_shards=a", "data.val_shards=b"]))


def changed(saved: dict, **dotted) -> dict:
    new = copy.deepcopy(saved)
    for key, value in dotted.items():
        node = new
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return new


def test_an_identical_config_has_no_changes(saved):
    assert config_changes(saved, copy.deepcopy(saved)) == ([], [])


@pytest.mark.parametrize("key, value, expected", [
    ("model__backbone", "resnet18", "model.backbone: resnet10t -> resnet18"),
    ("model__head_widths", [32], "model.head_widths: [16] -> [32]"),
    ("model__head_batchnorm", False, "model.head_batchnorm: true -> false"),
    ("model__head_dropout", [0.1, 0.2], "model.head_dropout: [0.1] -> [0.1, 0.2]"),
    ("engine__kind", "deepspeed", "engine.kind: ddp -> deepspeed"),
    ("engine__zero_stage", 2, "engine.zero_stage: 0 -> 2"),
    ("optim__name", "sgd", "optim.name: adamw -> sgd"),
    ("model__global_pool", "avg", "model.global_pool: null -> avg"),
])
def test_a_change_the_checkpoint_cannot_load_blocks(saved, key, value, expected):
    assert config_changes(saved, changed(saved, **{key: value})) == ([expected], [])


@pytest.mark.parametrize("key, value, expected", [
    ("data__image_size", 48, "data.image_size: 32 -> 48"),
    ("train__epochs", 5, "train.epochs: 2 -> 5"),
    ("optim__lr", 0.01, "optim.lr: 0.001 -> 0.01"),
    ("model__head_dropout", [0.4], "model.head_dropout: [0.1] -> [0.4]"),
    ("model__drop_rate", 0.2, "model.drop_rate: 0.0 -> 0.2"),
    ("loss__name", "focal", "loss.name: bce -> focal"),
])
def test_a_change_that_resumes_is_allowed_and_listed(saved, key, value, expected):
    assert config_changes(saved, changed(saved, **{key: value})) == ([], [expected])


def test_another_unfreeze_split_blocks_but_a_phase_lr_does_not(saved):
    two_phases = [{**saved["unfreeze"]["phases"][0], "train": "head"},
                  {**saved["unfreeze"]["phases"][0], "from_epoch": 1, "train": "all"}]
    blocking, _ = config_changes(saved, changed(saved, unfreeze__phases=two_phases))
    assert blocking == ["unfreeze.phases[0].train: all -> head", "unfreeze.phases[1].train: (unset) -> all"]
    new_lr = [{**saved["unfreeze"]["phases"][0], "lr": 0.01}]
    assert config_changes(saved, changed(saved, unfreeze__phases=new_lr)) == \
        ([], ["unfreeze.phases[0].lr: null -> 0.01"])


def test_layer_decay_on_or_off_blocks_but_another_value_does_not(saved):
    """On/off changes the optimizer's groups (DCP then dies on "Missing key ... param_groups.2.lr")."""
    decayed = changed(saved, optim__layer_decay=0.65)
    assert config_changes(saved, decayed) == (["optim.layer_decay: null -> 0.65"], [])
    assert config_changes(decayed, saved) == (["optim.layer_decay: 0.65 -> null"], [])
    assert config_changes(decayed, changed(saved, optim__layer_decay=0.75)) == \
        ([], ["optim.layer_decay: 0.65 -> 0.75"])
    before_the_option = copy.deepcopy(saved)
    del before_the_option["optim"]["layer_decay"]
    assert config_changes(before_the_option, saved) == ([], [])
    assert config_changes(before_the_option, decayed) == (["optim.layer_decay: null -> 0.65"], [])


def test_a_checkpoint_from_before_an_option_resumes_under_its_default(saved):
    """A key the saved config lacks is the option's default (before, 'model.normalize: (unset) -> timm' refused
    every checkpoint written before the option); another value than the default still blocks."""
    before_the_option = copy.deepcopy(saved)
    del before_the_option["model"]["normalize"], before_the_option["model"]["global_pool"]
    assert config_changes(before_the_option, saved) == ([], [])
    assert config_changes(before_the_option, changed(saved, model__normalize="imagenet")) == \
        (["model.normalize: timm -> imagenet"], [])


def test_compile_never_blocks(saved):
    """Both engines compile what they run and save the plain module (tests/train/test_engine_compile.py)."""
    assert config_changes(saved, changed(saved, model__compile=True)) == ([], ["model.compile: false -> true"])
    deepspeed = changed(saved, engine__kind="deepspeed")
    assert config_changes(deepspeed, changed(deepspeed, model__compile=True)) == ([], ["model.compile: false -> true"])


def test_how_to_resume_is_not_a_change(saved):
    assert config_changes(saved, changed(saved, checkpoint__resume="none")) == ([], [])


# ---------------------------------------------------------------- the real command


def run_env() -> dict[str, str]:
    keep = {name: value for name, value in os.environ.items()
            if not name.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "DIST_TRAIN_FAULT"))}
    return {**keep, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


LAUNCHERS = {
    "main": ["-m", "dist_train.main"],
    "train.py 2 ranks": [str(REPO / "launch" / "train.py"), "--nproc-per-node", "2"],
    "torchrun 2 ranks": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dist_train.main"],
}
"""train.py refuses before it starts torchrun; under torchrun itself rank 0 refuses and rank 1 learns it."""


def train(shards: Path, run_root: Path, *extra: str, resume: str = "auto", launcher: str = "main"):
    command = [sys.executable, *LAUNCHERS[launcher], "--config", CONFIG, "--resume", resume, "--set",
               f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
               f"run_root={run_root}", *TINY, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=run_env(), cwd=REPO)


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != ".lock"}


def text_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trial(tmp_path_factory) -> tuple[Path, Path]:
    """A finished one-epoch run (shards, run root), copied by each test that changes it."""
    shards = tmp_path_factory.mktemp("resume_shards")
    write_shards(shards, "train", [16])
    write_shards(shards, "val", [8])
    run_root = tmp_path_factory.mktemp("resume_trial")
    result = train(shards, run_root, resume="none")
    assert result.returncode == 0, result.stderr[-3000:]
    return shards, run_root


@pytest.fixture
def copied(trial, tmp_path) -> tuple[Path, Path]:
    shards, run_root = trial
    shutil.copytree(run_root, tmp_path / "runs")
    return shards, tmp_path / "runs"


@pytest.mark.parametrize("launcher", ["main", "train.py 2 ranks",
                                      pytest.param("torchrun 2 ranks", marks=pytest.mark.slow)])
def test_resume_under_another_architecture_is_refused_in_one_line_and_changes_nothing(copied, launcher):
    shards, run_root = copied
    before = tree_hashes(run_root)
    result = train(shards, run_root, "model.backbone=resnet10t", "model.head_widths=[32]", launcher=launcher)
    errors = [line for line in text_lines(result.stderr) if line.startswith("error:")]
    if launcher == "torchrun 2 ranks":  # torchrun adds its own failure report; each rank said why, and ended
        assert result.returncode != 0 and len(errors) == 2 and len(set(errors)) == 1, result.stderr[-3000:]
    else:
        assert result.returncode == 2 and len(text_lines(result.stderr)) == 1, result.stderr[-3000:]
    for expected in ("model.backbone: test_efficientnet -> resnet10t", "model.head_widths: [16] -> [32]",
                     "--resume none", "--set name="):
        assert expected in errors[0], errors[0]
    assert tree_hashes(run_root) == before, "a refused resume changed the run directory"


def test_resume_with_a_harmless_change_lists_it_and_resumes(copied):
    shards, run_root = copied
    result = train(shards, run_root, "data.image_size=48", "train.epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if "changed setting(s)" in line]
    assert warning and "data.image_size: 32 -> 48" in warning[0] and "train.epochs: 1 -> 2" in warning[0]
    assert "resumed from" in result.stderr and "step 2" in result.stderr, result.stderr[-3000:]


def test_an_unreadable_resume_path_is_refused_in_one_line(copied, tmp_path):
    shards, run_root = copied
    result = train(shards, run_root, resume=str(tmp_path / "no_such_checkpoint"))
    lines = text_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert str(tmp_path / "no_such_checkpoint") in lines[0] and "--resume none" in lines[0], lines[0]


def test_a_fresh_start_moves_the_earlier_run_aside_whole(copied):
    shards, run_root = copied
    run_dir = run_root / "test_tiny"
    before = tree_hashes(run_dir)
    old_records = (run_dir / "metrics.jsonl").read_text().splitlines()
    result = train(shards, run_root, resume="none")
    assert result.returncode == 0, result.stderr[-3000:]
    aside = [path for path in run_root.iterdir() if path.name.startswith("test_tiny.")]
    assert len(aside) == 1 and tree_hashes(aside[0]) == before, "the earlier run was not kept intact"
    moved = [line for line in result.stderr.splitlines() if "moved the earlier run" in line]
    assert moved and str(aside[0]) in moved[0], result.stderr[-3000:]
    new_records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [record["step"] for record in new_records if record["kind"] == "train"]
    assert train_steps == [1, 2], "the fresh run's history is not a single history of its own"
    assert len(old_records) > 0 and not [r for r in new_records if r["kind"] == "resume"]


def test_resume_auto_without_a_checkpoint_sets_the_earlier_history_aside(trial, tmp_path):
    """An attempt that ended before its first checkpoint left a metrics.jsonl; the rerun starts at step 0.
    Before, its records were appended after that attempt's, so the history showed steps 1, 2 twice."""
    shards, _ = trial
    run_dir = tmp_path / "runs" / "test_tiny"
    run_dir.mkdir(parents=True)
    earlier = '{"kind": "train", "step": 1, "epoch": 0, "loss": 0.7}\n'
    (run_dir / "metrics.jsonl").write_text(earlier)
    result = train(shards, tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    aside = sorted(run_dir.glob("metrics.*.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == earlier
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[0] == 1, steps
    assert any("history moved to" in line and str(aside[0]) in line for line in result.stderr.splitlines())

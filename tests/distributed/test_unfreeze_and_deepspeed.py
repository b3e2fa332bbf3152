"""Real 2-rank DeepSpeed ZeRO-2 runs on CPU: gated unfreezing, exact resume, a 2 -> 1 world-size change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_train.config import load_config
from dist_train.evaluation.inference import export
from dist_train.model.network import build_model, load_for_inference
from dist_train.train.distributed import seed_everything

from conftest import write_shards
from run_helpers import REPO, consolidated_weights, kill_after_checkpoint, latest_checkpoint, run_training

CONFIG = str(REPO / "configs" / "test_tiny.yaml")
PHASES = "unfreeze.phases=[{from_epoch: 0, train: head}, {from_epoch: 1, train: last_1_blocks, lr: 0.01}]"
pytestmark = pytest.mark.slow


def checkpoint_weights(engine: str, folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The consolidated model of a checkpoint, through each engine's own consolidation helper."""
    if engine == "ddp":
        return consolidated_weights(folder, scratch)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="deepspeed")


def settings(shards: Path, run_root: Path, engine: str = "deepspeed", *extra: str) -> list[str]:
    return [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", f"run_root={run_root}",
            "train.deterministic=true", f"engine.kind={engine}", "engine.zero_stage=2", "train.epochs=2",
            "checkpoint.every_steps=2", "checkpoint.keep_last=100", "train.accumulation_steps=2",
            "train.batch_size=4", "optim.weight_decay=0.1", PHASES, *extra]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_unfroze_on_schedule(run_dir: Path, engine: str, overrides: list[str], scratch: Path) -> None:
    """Backbone bitwise at its initial values through epoch 0 (frozen), only the last block moved in epoch 1."""
    config = load_config(CONFIG, [o for o in overrides if o.startswith(("model.", "train.seed"))])
    seed_everything(config.train.seed, True)
    initial = build_model(config.model).state_dict()
    epoch_ends = [e["path"] for e in history(run_dir) if e["kind"] == "checkpoint"]
    states = [json.loads((Path(p) / "trainer.json").read_text())["trainer"] for p in epoch_ends]
    ends = {state["epoch"]: path for state, path in zip(states, epoch_ends) if state["epoch_start_step"] ==
            state["step"]}
    after_epoch0 = checkpoint_weights(engine, Path(ends[1]), scratch / "e0.pt")
    after_epoch1 = checkpoint_weights(engine, Path(ends[2]), scratch / "e1.pt")
    backbone = [n for n, t in initial.items() if n.startswith("backbone.") and t.is_floating_point()
                and "running" not in n]
    for name in backbone:
        assert torch.equal(after_epoch0[name], initial[name]), f"{name} moved while frozen"
    moved = [name for name in backbone if not torch.equal(after_epoch1[name], initial[name])]
    assert moved and all(name.startswith("backbone.layer4") for name in moved), moved
    phases = [r for r in history(run_dir) if r["kind"] == "phase"]
    assert [p["phase"] for p in phases] == [0, 1]
    assert phases[1]["trainable_params"] > phases[0]["trainable_params"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    write_shards(root, "train", [20, 20, 20, 9])
    write_shards(root, "val", [13, 8])
    return root


def test_zero2_unfreezes_resumes_exactly_and_on_another_world_size(shards, tmp_path):
    overrides = settings(shards, tmp_path / "a")
    straight = run_training(2, CONFIG, overrides, resume="none")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_unfroze_on_schedule(tmp_path / "a" / "test_tiny", "deepspeed", overrides, tmp_path)
    exported = export(latest_checkpoint(tmp_path / "a" / "test_tiny"), tmp_path / "export" / "model.safetensors")
    model, meta = load_for_inference(exported)
    consolidated = checkpoint_weights("deepspeed", latest_checkpoint(tmp_path / "a" / "test_tiny"), tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, consolidated[name]), name
    assert meta["model"]["backbone"] == "resnet10t"

    killed_at = kill_after_checkpoint(2, CONFIG, settings(shards, tmp_path / "b"),
                                      tmp_path / "b" / "test_tiny" / "checkpoints", min_step=2)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed = run_training(2, CONFIG, settings(shards, tmp_path / "b"), resume="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = checkpoint_weights("deepspeed", latest_checkpoint(tmp_path / "a" / "test_tiny"), tmp_path)
    got = checkpoint_weights("deepspeed", latest_checkpoint(tmp_path / "b" / "test_tiny"), tmp_path)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    kill_after_checkpoint(1, CONFIG, settings(shards, tmp_path / "c"), tmp_path / "c" / "test_tiny" / "checkpoints",
                          min_step=killed_at + 2, resume="auto")
    back_to_two = run_training(2, CONFIG, settings(shards, tmp_path / "c"), resume="auto")
    assert back_to_two.returncode == 0, back_to_two.stderr[-3000:]
    records = history(tmp_path / "c" / "test_tiny")
    resumes = [(r["saved_world_size"], r["world_size"]) for r in records if r["kind"] == "resume"]
    assert resumes == [(2, 1), (1, 2)]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and len([r for r in records if r["kind"] == "eval"]) == 2
    assert records[-1]["kind"] == "summary" and records[-1]["epochs_done"] == 2


def test_ddp_frozen_backbone_is_bitwise_unchanged_and_unfreezes_on_schedule(shards, tmp_path):
    overrides = settings(shards, tmp_path, "ddp")
    result = run_training(2, CONFIG, overrides, resume="none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_unfroze_on_schedule(tmp_path / "test_tiny", "ddp", overrides, tmp_path)

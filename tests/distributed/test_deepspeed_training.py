"""Real 2-rank DeepSpeed ZeRO-2 runs on CPU: exact resume, a 2 -> 1 world-size change, gated unfreezing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_shards
from dist_train.config import load_config
from dist_train.distributed import seed_everything
from dist_train.model import build_model
from run_helpers import REPO, kill_after_checkpoint, latest_checkpoint, run_training

CONFIG = str(REPO / "configs" / "test_tiny.yaml")
pytestmark = pytest.mark.slow


def deepspeed_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own fp32 consolidation of a ZeRO checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="deepspeed")


def settings(shards: Path, run_root: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", f"run_root={run_root}",
            "train.deterministic=true", "engine.kind=deepspeed", "engine.zero_stage=2", "train.epochs=2",
            "checkpoint.every_steps=2", "train.accumulation_steps=2", "train.batch_size=4", *extra]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    write_shards(root, "train", [20, 20, 20, 9])
    write_shards(root, "val", [13, 8])
    return root


def test_zero2_resumes_exactly_and_on_another_world_size(shards, tmp_path):
    straight = run_training(2, CONFIG, settings(shards, tmp_path / "a"), resume="none")
    assert straight.returncode == 0, straight.stderr[-3000:]
    kill_after_checkpoint(2, CONFIG, settings(shards, tmp_path / "b"), tmp_path / "b" / "test_tiny" / "checkpoints",
                          min_step=2)
    shutil.copytree(tmp_path / "b", tmp_path / "c")

    resumed = run_training(2, CONFIG, settings(shards, tmp_path / "b"), resume="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = deepspeed_weights(latest_checkpoint(tmp_path / "a" / "test_tiny"))
    got = deepspeed_weights(latest_checkpoint(tmp_path / "b" / "test_tiny"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    one_rank = run_training(1, CONFIG, settings(shards, tmp_path / "c"), resume="auto")
    assert one_rank.returncode == 0, one_rank.stderr[-3000:]
    records = history(tmp_path / "c" / "test_tiny")
    resume = [r for r in records if r["kind"] == "resume"][-1]
    assert (resume["saved_world_size"], resume["world_size"]) == (2, 1)
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and len([r for r in records if r["kind"] == "eval"]) == 2
    assert records[-1]["kind"] == "summary" and records[-1]["epochs_done"] == 2


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_frozen_backbone_is_bitwise_unchanged_and_unfreezes_on_schedule(shards, tmp_path, engine):
    phases = "unfreeze.phases=[{from_epoch: 0, train: head}, {from_epoch: 1, train: last_1_blocks, lr: 0.01}]"
    overrides = settings(shards, tmp_path, phases, f"engine.kind={engine}", "optim.weight_decay=0.1",
                         "checkpoint.keep_last=10", "checkpoint.every_steps=1000")
    result = run_training(2, CONFIG, overrides, resume="none")
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config(CONFIG, [o for o in overrides if o.startswith(("model.", "train.seed"))])
    seed_everything(config.train.seed, True)
    initial = build_model(config.model).state_dict()
    run_dir = tmp_path / "test_tiny"
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    weights = [_weights(engine, folder, tmp_path / f"{folder.name}.pt") for folder in checkpoints]
    after_epoch0, after_epoch1 = weights
    backbone = [n for n in initial if n.startswith("backbone.") and initial[n].is_floating_point()
                and "running" not in n and "num_batches" not in n]
    for name in backbone:
        assert torch.equal(after_epoch0[name], initial[name]), f"{name} moved while frozen"
    moved = [name for name in backbone if not torch.equal(after_epoch1[name], initial[name])]
    assert moved and all(name.startswith("backbone.layer4") for name in moved), moved
    phases_logged = [r for r in history(run_dir) if r["kind"] == "phase"]
    assert [p["phase"] for p in phases_logged] == [0, 1]
    assert phases_logged[1]["trainable_params"] > phases_logged[0]["trainable_params"]


def _weights(engine: str, folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    if engine == "deepspeed":
        return deepspeed_weights(folder)
    from run_helpers import consolidated_weights

    return consolidated_weights(folder, scratch)

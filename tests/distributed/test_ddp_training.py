"""Real 2-rank DDP runs on CPU (gloo): equal steps, exactly-once evaluation, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_shards
from run_helpers import REPO, consolidated_weights, kill_after_checkpoint, latest_checkpoint, run_training

CONFIG = str(REPO / "configs" / "test_tiny.yaml")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uneven")
    write_shards(root, "train", [24, 24, 24, 24, 5])
    write_shards(root, "val", [17, 6])
    return root


def overrides(shards: Path, run_root: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
            f"run_root={run_root}", "train.deterministic=true", *extra]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["kind"] == kind]


def test_two_ranks_train_evaluate_once_and_resume_exactly(uneven_shards, tmp_path):
    """One uninterrupted run against one SIGKILLed mid-epoch and resumed: bitwise-identical weights."""
    extra = ("train.epochs=2", "checkpoint.every_steps=2", "data.workers=1", "model.head_dropout=[0.3]")
    straight = run_training(2, CONFIG, overrides(uneven_shards, tmp_path / "a", *extra), resume="none")
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_a = tmp_path / "a" / "test_tiny"
    evals = records(run_a, "eval")
    assert [e["n"] for e in evals] == [23, 23]
    predictions = (run_a / "predictions_val.csv").read_text().splitlines()[1:]
    assert len({line.split(",")[0] for line in predictions}) == 23

    killed_at = kill_after_checkpoint(2, CONFIG, overrides(uneven_shards, tmp_path / "b", *extra),
                                      tmp_path / "b" / "test_tiny" / "checkpoints", min_step=3)
    resumed = run_training(2, CONFIG, overrides(uneven_shards, tmp_path / "b", *extra), resume="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_b = tmp_path / "b" / "test_tiny"
    assert "resumed from" in resumed.stderr and f"step {killed_at}" in resumed.stderr

    weights_a = consolidated_weights(latest_checkpoint(run_a), tmp_path / "a.pt")
    weights_b = consolidated_weights(latest_checkpoint(run_b), tmp_path / "b.pt")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert (run_a / "predictions_val.csv").read_text() == (run_b / "predictions_val.csv").read_text()
    steps_b = [r["step"] for r in records(run_b, "train")]
    assert steps_b == sorted(set(steps_b)), "metrics history repeats or goes back after resume"

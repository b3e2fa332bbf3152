"""The training-health rules, alone and as they stop a real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dist_train.train.health import starved_of_positives, val_loss_rising

from conftest import write_shards

REPO = Path(__file__).resolve().parents[2]


def test_val_loss_rising_needs_every_step_up():
    assert val_loss_rising([0.5, 0.6, 0.7], 2)
    assert not val_loss_rising([0.5, 0.6, 0.55], 2)
    assert not val_loss_rising([0.6, 0.7], 2)
    assert val_loss_rising([0.9, 0.4, 0.5], 1)
    assert not val_loss_rising([0.5, 0.5], 1)


def test_starved_of_positives_counts_against_the_limit():
    assert starved_of_positives(4, 4) and not starved_of_positives(3, 4) and not starved_of_positives(99, None)


def test_a_run_that_never_predicts_a_positive_stops_with_advice(tmp_path):
    write_shards(tmp_path, "train", [40], positive_every=1000)
    write_shards(tmp_path, "val", [20], positive_every=4)
    result = subprocess.run([sys.executable, "-m", "dist_train.main", "--config", "configs/test_tiny.yaml",
                             "--set", f"data.train_shards={tmp_path}/train-*.tar",
                             f"data.val_shards={tmp_path}/val-*.tar", f"run_root={tmp_path}/runs", "train.epochs=6",
                             "health.max_epochs_without_positives=2", "loss.name=focal", "loss.alpha=0.25",
                             "optim.lr=0.05"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1
    assert "predicted no positive on the training data for 2 epochs" in result.stderr
    assert "loss.pos_weight=auto" in result.stderr
    evals = [json.loads(line) for line in (tmp_path / "runs" / "test_tiny" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert len(evals) < 6, "the run went on to its last epoch"
    counts = [e["train_predicted_positives"] for e in evals]
    assert counts[-2:] == [0, 0], "it stopped without a streak of 2 epochs without positives"
    assert not any(a == b == 0 for a, b in zip(counts[:-2], counts[1:-1])), "it missed an earlier streak"

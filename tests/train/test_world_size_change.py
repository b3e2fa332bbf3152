"""A resume on another world size keeps the LR schedule's place and each epoch's sample count.

Oracle: an uninterrupted 1-rank run of the same schedule (cosine after a 1.5-epoch warmup, so the
interruption falls inside the warmup and the cosine follows). Each optimizer step after the resume must
use the LR the uninterrupted run used at the same fraction of training, within one step of the resumed
run's epoch length; the interrupted epoch must see its samples once, within one global batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_train.data.stream import TrainStream, make_loader
from dist_train.train.checkpoint import read_pointer
from dist_train.train.loop import Trainer

from multiprocess import run_on_ranks
from run_helpers import tiny_config

pytestmark = pytest.mark.slow
SETTINGS = ("train.epochs=4", "train.batch_size=4", "schedule.kind=cosine", "schedule.warmup_epochs=1.5",
            "checkpoint.every_steps=3", "train.log_every_steps=1", "eval.every_epochs=4")
TRAIN_SAMPLES = 96


class Crash(Exception):
    """Stands for a node failure in the middle of epoch 1."""


def _crash_in_epoch_1(env, shards, run_root: Path, after_micro_batches: int) -> None:
    def loader(dataset, *args):
        for index, batch in enumerate(make_loader(dataset, *args)):
            if isinstance(dataset, TrainStream) and dataset.epoch == 1 and index == after_micro_batches:
                raise Crash()
            yield batch

    try:
        Trainer(tiny_config(shards, run_root, *SETTINGS), env, loader_factory=loader).train()
    except Crash:
        return


def _resume(env, shards, run_root: Path) -> dict:
    cfg = tiny_config(shards, run_root, *SETTINGS)
    root = cfg.run_dir / "checkpoints"
    trainer = Trainer(cfg, env, resume_from=root / str(read_pointer(root / "latest")))
    trainer.train()
    return {"steps_per_epoch": trainer.steps_per_epoch, "resumed_step": trainer._resumed["step"]}


def _uninterrupted(env, shards, run_root: Path) -> int:
    trainer = Trainer(tiny_config(shards, run_root, *SETTINGS), env)
    trainer.train()
    return trainer.steps_per_epoch


def train_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "train"]


@pytest.mark.parametrize("saved_world, resumed_world", [(2, 1), (1, 2)])
def test_lr_and_epoch_samples_survive_a_world_size_change(saved_world, resumed_world, make_shards, tmp_path):
    shards = make_shards(train=[48, 48], val=[16])
    steps_uninterrupted = run_on_ranks(_uninterrupted, 1, shards, tmp_path / "whole")[0]
    oracle = [(record["epoch"], record["lr"][0]) for record in train_records(tmp_path / "whole" / "test_tiny")]
    run_on_ranks(_crash_in_epoch_1, saved_world, shards, tmp_path / "split", 7)
    resumed = run_on_ranks(_resume, resumed_world, shards, tmp_path / "split")[0]
    after = [r for r in train_records(tmp_path / "split" / "test_tiny") if r["step"] > resumed["resumed_step"]]
    window = 1 / resumed["steps_per_epoch"] + 1e-9
    for record in after:
        near = [lr for fraction, lr in oracle if abs(fraction - record["epoch"]) <= window]
        assert near and min(near) - 1e-12 <= record["lr"][0] <= max(near) + 1e-12, \
            f"step {record['step']} at epoch {record['epoch']:.3f}: lr {record['lr'][0]:.3e}, uninterrupted {near}"
    assert after[-1]["epoch"] == pytest.approx(4.0)
    saved_batch, resumed_batch = 4 * saved_world, 4 * resumed_world
    done_before = (resumed["resumed_step"] - 96 // saved_batch) * saved_batch
    done_after = sum(1 for r in after if 1 < r["epoch"] <= 2 + 1e-9) * resumed_batch
    assert abs(done_before + done_after - TRAIN_SAMPLES) <= max(saved_batch, resumed_batch)
    assert steps_uninterrupted == TRAIN_SAMPLES // 4

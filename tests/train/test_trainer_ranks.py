"""The Trainer on real gloo ranks (tests/multiprocess.py): what only shows with more than one rank.

Each rank-level function returns what the test compares; the oracles are the other rank's value
(buffers, error messages) and the step an epoch ends at.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from dist_train.data.stream import EvalStream, make_loader
from dist_train.errors import CheckpointError, TrainingStopped
from dist_train.train import preemption
from dist_train.train.checkpoint import read_pointer, read_trainer_state
from dist_train.train.loop import Trainer

from multiprocess import run_on_ranks, world_size
from run_helpers import tiny_config as tiny


@pytest.fixture(autouse=True)
def no_notice_left():
    yield
    preemption.clear()


def _notice_during_evaluation(env, shards, run_root: Path) -> dict:
    def loader(dataset, *args):
        if isinstance(dataset, EvalStream):
            preemption.request()
        return make_loader(dataset, *args)

    cfg = tiny(shards, run_root, "train.epochs=3")
    trainer = Trainer(cfg, env, loader_factory=loader)
    try:
        trainer.train()
    except preemption.Preempted:
        pass
    preemption.clear()
    root = cfg.run_dir / "checkpoints"
    saved = read_trainer_state(root / str(read_pointer(root / "latest")))["trainer"]
    resumed = Trainer(cfg, env, resume_from=root / str(read_pointer(root / "latest")))
    summary = resumed.train()
    return {"steps_per_epoch": trainer.steps_per_epoch, "saved": saved, "epochs_done": summary["epochs_done"]}


@world_size(1, 2)
def test_a_notice_during_evaluation_checkpoints_at_the_end_of_that_epoch(world_size, make_shards, tmp_path):
    """Seen after the evaluation, not at the next epoch's first optimizer step; the rerun finishes the run."""
    results = run_on_ranks(_notice_during_evaluation, world_size, make_shards(), tmp_path)
    for result in results:
        assert result["saved"]["epoch"] == 1
        assert result["saved"]["step"] == result["steps_per_epoch"]
        assert result["saved"]["best_epoch"] == 0
        assert result["epochs_done"] == 3


def _buffers_at_evaluation(env, shards, run_root: Path) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def loader(dataset, *args):
        if isinstance(dataset, EvalStream):
            seen.append(torch.cat([b.detach().double().flatten() for b in trainer.engine.module.buffers()]))
        return make_loader(dataset, *args)

    trainer = Trainer(tiny(shards, run_root, "train.epochs=1"), env, loader_factory=loader)
    trainer.train()
    return seen


@pytest.mark.parametrize("engine", ["ddp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_every_rank_scores_with_rank_0s_batchnorm_statistics(engine, make_shards, tmp_path):
    """Ranks train on different batches, so their running statistics differ until the loop syncs them."""
    shards = make_shards()
    rank0, rank1 = run_on_ranks(_buffers_with_engine, 2, shards, tmp_path, engine)
    assert len(rank0) == len(rank1) == 1
    assert torch.equal(rank0[0], rank1[0])


def _buffers_with_engine(env, shards, run_root: Path, engine: str) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def loader(dataset, *args):
        if isinstance(dataset, EvalStream):
            seen.append(torch.cat([b.detach().double().flatten() for b in trainer.engine.module.buffers()
                                   if b.is_floating_point()]))
        return make_loader(dataset, *args)

    trainer = Trainer(tiny(shards, run_root, "train.epochs=1", f"engine.kind={engine}"), env, loader_factory=loader)
    trainer.train()
    return seen


def _rank0_cannot_write_predictions(env, shards, run_root: Path) -> tuple[str, float]:
    cfg = tiny(shards, run_root, "train.epochs=2")
    if env.is_main:
        (cfg.run_dir / "predictions_val.csv").mkdir(parents=True)
    trainer = Trainer(cfg, env)
    started = time.monotonic()
    try:
        trainer.train()
    except TrainingStopped as error:
        return str(error), time.monotonic() - started
    return "no error", 0.0


@pytest.mark.slow
def test_a_failure_on_rank_0_alone_ends_every_rank_with_its_message(make_shards, tmp_path):
    """predictions_val.csv is a folder on rank 0's side: every rank stops at once with rank 0's one line."""
    (message0, seconds0), (message1, seconds1) = run_on_ranks(_rank0_cannot_write_predictions, 2, make_shards(),
                                                              tmp_path)
    assert message0 == message1
    assert "rank 0 failed in evaluation" in message0 and "predictions_val.csv" in message0
    assert seconds1 < 30


def _rank0_cannot_publish(env, shards, run_root: Path) -> tuple[str, float]:
    trainer = Trainer(tiny(shards, run_root, "train.epochs=1"), env)
    started = time.monotonic()
    try:
        trainer.train()
    except CheckpointError as error:
        return str(error), time.monotonic() - started
    return "no error", 0.0


@pytest.mark.slow
def test_a_checkpoint_rank_0_cannot_publish_ends_every_rank_with_its_message(make_shards, tmp_path, monkeypatch):
    """An OSError while rank 0 writes trainer.json and publishes (DIST_TRAIN_FAULT, rank 0 only): no rank
    is left in the barrier that used to follow; both end with rank 0's line, the previous checkpoint named."""
    monkeypatch.setenv("DIST_TRAIN_FAULT", "fail@checkpoint.before_publish")
    monkeypatch.setenv("DIST_TRAIN_FAULT_RANK", "0")
    (message0, _), (message1, seconds1) = run_on_ranks(_rank0_cannot_publish, 2, make_shards(), tmp_path)
    assert message0 == message1 and "could not write checkpoint" in message0 and "injected failure" in message0
    assert seconds1 < 60


def _evaluate_with_bootstrap(env, shards, run_root: Path) -> dict:
    cfg = tiny(shards, run_root, "train.epochs=1", "eval.bootstrap=100000", "engine.timeout_s=20")
    trainer = Trainer(cfg, env)
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    if not env.is_main:
        return {"seconds": seconds}
    lines = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "eval": [line for line in lines if line["kind"] == "eval"],
            "warnings": [line["message"] for line in lines if line["kind"] == "warning"]}


@pytest.mark.slow
def test_rank_0s_bootstrap_stops_before_the_other_ranks_wait_longer_than_the_timeout(make_shards, tmp_path):
    """100,000 resamples take rank 0 about 15 min here, while rank 1 waits in a broadcast (60 s process-group
    timeout in this harness): the oracle is that rank 1 finishes at all. The resampling stops at half of
    engine.timeout_s (10 s) and says so."""
    rank0, rank1 = run_on_ranks(_evaluate_with_bootstrap, 2, make_shards(), tmp_path)
    (record,) = rank0["eval"]
    assert 0 < record["bootstrap_resamples"] < 100000
    assert len(record["alpha_ci"]) == len(record["beta_ci"]) == 2
    assert any("eval.bootstrap" in message and "engine.timeout_s" in message for message in rank0["warnings"])
    assert rank1["seconds"] < 50

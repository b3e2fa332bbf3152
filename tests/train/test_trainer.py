"""The Trainer in-process at world size 1, on real tiny shards: each test runs in seconds.

Oracles: an uninterrupted run (resume), hand-computed checkpoint names (retention), the weights just
before a non-finite step (NaN stop), the configured patience (early stop). Multi-rank behaviour of the
same loop is in test_trainer_ranks.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_train.data.stream import make_loader
from dist_train.errors import TrainingStopped
from dist_train.train.checkpoint import read_pointer
from dist_train.train.distributed import DistEnv
from dist_train.train.loop import Trainer

from run_helpers import tiny_config as tiny


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.engine.module.state_dict().items()}


def latest(trainer: Trainer) -> Path:
    root = trainer.run_dir / "checkpoints"
    return root / str(read_pointer(root / "latest"))


def test_resume_mid_epoch_ends_bitwise_where_an_uninterrupted_run_ends(make_shards, tmp_path):
    shards = make_shards(train=[20, 20], val=[12])
    settings = ("train.epochs=2", "train.accumulation_steps=2", "train.batch_size=4")
    whole = Trainer(tiny(shards, tmp_path / "whole", *settings), DistEnv())
    whole.train()
    first = Trainer(tiny(shards, tmp_path / "split", *settings), DistEnv())
    first.enter_phase(0)
    first.run_steps(0, 3)
    first.save_checkpoint()
    first.tracker.finish(first.summary())
    second = Trainer(tiny(shards, tmp_path / "split", *settings), DistEnv(), resume_from=latest(first))
    assert (second.state.step, second.state.epoch) == (3, 0)
    second.train()
    assert second.state.step == whole.state.step
    expected, got = weights(whole), weights(second)
    assert all(torch.equal(expected[name], got[name]) for name in expected), "resumed weights differ"


def test_retention_keeps_the_newest_and_the_best(make_shards, tmp_path):
    trainer = Trainer(tiny(make_shards(), tmp_path, "train.epochs=3", "checkpoint.every_steps=1",
                           "checkpoint.keep_last=2"), DistEnv())
    trainer.train()
    steps_per_epoch = trainer.steps_per_epoch
    last = 3 * steps_per_epoch
    names = sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("step-*"))
    best = read_pointer(trainer.run_dir / "checkpoints" / "best")
    expected = {f"step-{last - 1:08d}", f"step-{last:08d}", best}
    assert set(names) == expected
    assert read_pointer(trainer.run_dir / "checkpoints" / "latest") == f"step-{last:08d}"


EARLY_STOPPING = ("train.epochs=6", "optim.lr=1e-12", "model.head_batchnorm=false",
                  "unfreeze.phases=[{from_epoch: 0, train: head}]")
"""A frozen backbone (BatchNorm in eval mode), no head BatchNorm and a negligible LR keep the model constant,
so the patience rule must fire."""


def early_stopped_run(shards, run_root: Path) -> Trainer:
    """A run the patience rule stopped, checked against the rule replayed over its logged alphas."""
    trainer = Trainer(tiny(shards, run_root, *EARLY_STOPPING, "eval.early_stopping_patience=2"), DistEnv())
    summary = trainer.train()
    alphas = [record["alpha"] for record in history(trainer.run_dir) if record["kind"] == "eval"]
    best, without, stopped_after = float("-inf"), 0, None
    for epoch, alpha in enumerate(alphas):
        best, without = (alpha, 0) if alpha > best else (best, without + 1)
        if without >= 2:
            stopped_after = epoch
            break
    assert stopped_after is not None and stopped_after < 5
    assert summary["epochs_done"] == stopped_after + 1 == len(alphas)
    return trainer


def test_early_stopping_ends_after_patience_evaluations_without_improvement(make_shards, tmp_path):
    early_stopped_run(make_shards(), tmp_path)


def test_an_early_stopped_run_resumed_trains_nothing_unless_patience_is_raised(make_shards, tmp_path, caplog):
    """The oracle: the run as the patience rule left it. Resumed as it is, it trains no step (before, it
    trained until the rule fired again); with a patience the count has not reached, it trains on."""
    stopped = early_stopped_run(make_shards(), tmp_path)

    def progress() -> list[dict]:
        return [record for record in history(stopped.run_dir) if record["kind"] in ("train", "eval")]

    before = progress()
    again = Trainer(tiny(make_shards(), tmp_path, *EARLY_STOPPING, "eval.early_stopping_patience=2"), DistEnv(),
                    resume_from=latest(stopped))
    again.train()
    assert again.state.step == stopped.state.step and progress() == before
    assert "stopped early after epoch" in caplog.text and "eval.early_stopping_patience" in caplog.text
    patient = Trainer(tiny(make_shards(), tmp_path, *EARLY_STOPPING, "eval.early_stopping_patience=100"),
                      DistEnv(), resume_from=latest(stopped))
    patient.train()
    assert patient.state.epoch == 6 and patient.state.step > stopped.state.step


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_health_rule_stops_a_model_that_never_predicts_a_positive(make_shards, tmp_path):
    trainer = Trainer(tiny(make_shards(), tmp_path, "train.epochs=4", "optim.lr=1e-12",
                           "health.max_epochs_without_positives=2"), DistEnv())
    with torch.no_grad():
        trainer.engine.module.head[-1].bias.fill_(-100.0)
    with pytest.raises(TrainingStopped, match="predicted no positive"):
        trainer.train()
    assert trainer.state.epoch == 2


def test_a_non_finite_loss_stops_before_its_update_reaches_the_weights(make_shards, tmp_path):
    """The second micro-batch carries NaN pixels; the parameters after the stop are those before that step.

    (BatchNorm's running statistics saw the NaN forward; the stop keeps them out of every checkpoint.)"""
    snapshots: list[dict[str, torch.Tensor]] = []

    def poisoned_loader(dataset, *args):
        for index, batch in enumerate(make_loader(dataset, *args)):
            if index == 1:
                snapshots.append(weights(trainer))
                batch.images = torch.full_like(batch.images, float("nan"))
            yield batch

    trainer = Trainer(tiny(make_shards(), tmp_path, "train.epochs=1"), DistEnv(), loader_factory=poisoned_loader)
    with pytest.raises(TrainingStopped, match="non-finite loss at optimizer step 2"):
        trainer.train()
    assert trainer.state.step == 1
    parameters = dict(trainer.engine.module.named_parameters())
    assert all(torch.equal(snapshots[0][name], parameters[name]) for name in parameters)


def test_a_resume_trains_with_the_configs_lr_not_the_checkpoints(make_shards, tmp_path):
    """Loading an optimizer's state restores its groups' LRs; the resumed run's config must win.

    Oracle: a constant schedule, so every logged LR after the resume is the new optim.lr exactly."""
    shards = make_shards()
    first = Trainer(tiny(shards, tmp_path, "train.epochs=1", "optim.lr=1e-3", "optim.weight_decay=0.01"), DistEnv())
    first.train()
    cfg = tiny(shards, tmp_path, "train.epochs=2", "optim.lr=5e-2", "optim.weight_decay=0.2")
    second = Trainer(cfg, DistEnv(), resume_from=latest(first), config_changes=["optim.lr: 0.001 -> 0.05"])
    assert {group["weight_decay"] for group in second.engine.optimizer.param_groups if group["decay"]} == {0.2}
    second.train()
    resumed = [r for r in history(second.run_dir) if r["kind"] == "train" and r["step"] > first.state.step]
    assert resumed and all(r["lr"][0] == pytest.approx(5e-2) for r in resumed)
    event = next(r for r in history(second.run_dir) if r["kind"] == "resume")
    assert event["config_changes"] == ["optim.lr: 0.001 -> 0.05"]


def test_training_above_the_shards_size_warns_with_the_rebuild_command(synthetic_shards, tmp_path):
    """synthetic_shards were built at 48 px (tests/conftest.py); a 64 px run upsamples every image."""
    from dist_train.config import load_config

    from run_helpers import REPO

    cfg = load_config(str(REPO / "configs" / "test_tiny.yaml"), [
        f"data.train_shards={synthetic_shards}/train-*.tar", f"data.val_shards={synthetic_shards}/val-*.tar",
        f"run_root={tmp_path}", "data.image_size=64", "train.epochs=1", "train.steps_per_epoch=1"])
    trainer = Trainer(cfg, DistEnv())
    summary = trainer.train()
    warnings = [r["message"] for r in history(trainer.run_dir) if r["kind"] == "warning"]
    assert any("larger than the 48 px" in w and "--size 64" in w for w in warnings), warnings
    assert summary["warnings"] == warnings


def test_a_preempted_run_leaves_the_report_to_the_run_that_finishes(make_shards, tmp_path):
    """The report (export + Grad-CAM on the CPU) would eat into a preemption's grace period; the
    requeued run that finishes writes it."""
    from dist_train.train import preemption

    def noticed_loader(dataset, *args):
        for index, batch in enumerate(make_loader(dataset, *args)):
            if index == 1:
                preemption.request()
            yield batch

    cfg = tiny(make_shards(), tmp_path, "train.epochs=1", "tracking.html_report=true")
    try:
        with pytest.raises(preemption.Preempted):
            Trainer(cfg, DistEnv(), loader_factory=noticed_loader).train()
    finally:
        preemption.clear()
    checkpoints = cfg.run_dir / "checkpoints"
    saved = checkpoints / str(read_pointer(checkpoints / "latest"))
    assert saved.is_dir() and not (cfg.run_dir / "report.html").exists()
    Trainer(cfg, DistEnv(), resume_from=saved).train()
    assert (cfg.run_dir / "report.html").is_file()


def test_gpu_decode_from_shards_of_another_size_warns_that_the_workers_decode(synthetic_shards, tmp_path):
    """nvJPEG takes only images at data.image_size; 48 px shards for a 32 px run all decode in the workers."""
    from dist_train.config import load_config

    from run_helpers import REPO

    cfg = load_config(str(REPO / "configs" / "test_tiny.yaml"), [
        f"data.train_shards={synthetic_shards}/train-*.tar", f"data.val_shards={synthetic_shards}/val-*.tar",
        f"run_root={tmp_path}", "data.image_size=32", "data.decode=cuda", "train.epochs=1", "train.steps_per_epoch=1"])
    trainer = Trainer(cfg, DistEnv())
    assert any("built at 48 px, not data.image_size=32" in w and "--size 32" in w for w in trainer.warnings), \
        trainer.warnings
    trainer.tracker.finish(trainer.summary())


def test_a_run_resumed_after_its_best_epoch_still_names_its_best_checkpoint(make_shards, tmp_path, caplog):
    """One epoch: its evaluation is the best, and its checkpoint is both latest and best. Before, that
    checkpoint's state was saved before it was named best, so the rerun's summary said "no best checkpoint".
    The oracle is the checkpointer's best pointer."""
    cfg = tiny(make_shards(), tmp_path, "train.epochs=1")
    first = Trainer(cfg, DistEnv())
    first.train()
    best = read_pointer(first.run_dir / "checkpoints" / "best")
    assert best is not None and best == read_pointer(first.run_dir / "checkpoints" / "latest")
    with caplog.at_level("WARNING", logger="dist_train.train.loop"):
        rerun = Trainer(cfg, DistEnv(), resume_from=latest(first))
        summary = rerun.train()
    assert summary["best_checkpoint"] == best and rerun.state.step == first.state.step
    assert any("nothing is trained" in record.getMessage() for record in caplog.records)

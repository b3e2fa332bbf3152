"""The step flags read one step late: a non-finite loss still never reaches the weights or the optimizer.

A `nan_loss@3` fault (dist_train/faults.py; on rank 1 only when there are two) makes step 3's loss
non-finite. Oracle: a fresh run of the same seeds stopped after 2 steps; after the stop, parameters and
optimizer state must equal it bitwise on every rank, for DDP (the update is skipped on the device and
the flags read after the next step is queued) and DeepSpeed (the flags read before each update). How
many training batches the faulty run drew tells which path ran: DDP's host ran one step ahead.
The gate's parts are checked against torch's own optimizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train import faults
from dist_train.data.stream import TrainStream, make_loader
from dist_train.errors import TrainingStopped
from dist_train.train.engine import gate
from dist_train.train.engine.zero import torch_optimizer
from dist_train.train.loop import Trainer

from multiprocess import run_on_ranks
from run_helpers import tiny_config as tiny

BAD_STEP = 3
SETTINGS = ("train.epochs=1", "train.steps_per_epoch=6", "train.batch_size=4", "train.log_every_steps=100",
            "optim.name=adamw", "optim.weight_decay=0.05")


def _state(trainer: Trainer) -> dict[str, Any]:
    """Parameters and every tensor of the torch optimizer's state, by position (same order in both runs)."""
    inner = torch_optimizer(trainer.engine.optimizer)
    optimizer = [{key: value.clone() for key, value in entry.items()} for entry in inner.state.values()]
    params = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}
    return {"params": params, "optimizer": optimizer, "step": trainer.state.step}


def _stopped_and_oracle(env, shards, run_root: Path, engine: str) -> dict[str, Any]:
    """The faulty run (until it stops) and the oracle run of BAD_STEP - 1 steps, on this rank."""
    drawn = []

    def counting(dataset, *args):
        for batch in make_loader(dataset, *args):
            if isinstance(dataset, TrainStream) and batch.keys:
                drawn.append(len(batch.keys))
            yield batch

    settings = (*SETTINGS, f"engine.kind={engine}", "engine.zero_stage=2")
    faulty = Trainer(tiny(shards, run_root / "faulty", *settings), env, loader_factory=counting)
    try:
        faulty.train()
        message = "no stop"
    except TrainingStopped as error:
        message = str(error)
    oracle = Trainer(tiny(shards, run_root / "oracle", *settings), env)
    oracle.enter_phase(0)
    oracle.run_steps(0, BAD_STEP - 1)
    return {"message": message, "drawn": len(drawn), "late": faulty.engine.gates_on_device,
            "stopped": _state(faulty), "oracle": _state(oracle)}


def _assert_last_good_state(result: dict[str, Any]) -> None:
    assert f"non-finite loss at optimizer step {BAD_STEP}" in result["message"]
    stopped, oracle = result["stopped"], result["oracle"]
    assert stopped["step"] == oracle["step"] == BAD_STEP - 1
    assert all(torch.equal(stopped["params"][name], oracle["params"][name]) for name in oracle["params"])
    assert len(stopped["optimizer"]) == len(oracle["optimizer"]) > 0
    for got, expected in zip(stopped["optimizer"], oracle["optimizer"]):
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected), "optimizer state moved"


def _fault(monkeypatch, world: int) -> None:
    """nan_loss at BAD_STEP, on rank 1 only with two ranks (the others learn it through the all-reduce)."""
    spec, rank = f"nan_loss@{BAD_STEP}", "1" if world > 1 else None
    monkeypatch.setenv("DIST_TRAIN_FAULT", spec)
    monkeypatch.setattr(faults, "_SPEC", spec)
    if rank:
        monkeypatch.setenv("DIST_TRAIN_FAULT_RANK", rank)
    monkeypatch.setattr(faults, "_RANK", rank)


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_ddp_skips_the_bad_update_on_the_device_and_stops_at_the_last_good_step(world, make_shards, tmp_path,
                                                                               monkeypatch):
    _fault(monkeypatch, world)
    for result in run_on_ranks(_stopped_and_oracle, world, make_shards(train=[24, 24]), tmp_path, "ddp"):
        assert result["late"], "the DDP engine should gate its updates on the device"
        assert result["drawn"] == BAD_STEP + 1, "the host should have queued one step past the bad one"
        _assert_last_good_state(result)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_deepspeed_reads_the_flags_before_the_update_and_stops_at_the_last_good_step(world, make_shards,
                                                                                     tmp_path, monkeypatch):
    _fault(monkeypatch, world)
    results = run_on_ranks(_stopped_and_oracle, world, make_shards(train=[24, 24]), tmp_path, "deepspeed",
                           spawn=True)
    for result in results:
        assert not result["late"]
        assert result["drawn"] == BAD_STEP
        _assert_last_good_state(result)


def _final_weights(env, shards, run_root: Path, late: bool) -> dict[str, torch.Tensor]:
    trainer = Trainer(tiny(shards, run_root, *SETTINGS, "train.epochs=2"), env)
    trainer.engine.gates_on_device = late
    trainer.train()
    return _state(trainer)["params"]


def test_a_clean_run_gated_on_the_device_ends_bitwise_where_the_host_checked_run_ends(make_shards, tmp_path):
    """Oracle: the same run with every step's flags read before its update (the engine told it cannot gate)."""
    shards = make_shards(train=[24, 24])
    (late,) = run_on_ranks(_final_weights, 1, shards, tmp_path / "late", True)
    (checked,) = run_on_ranks(_final_weights, 1, shards, tmp_path / "checked", False)
    assert all(torch.equal(late[name], checked[name]) for name in checked)


def _optimizers(kind: type[torch.optim.Optimizer], **options: Any) -> tuple[torch.optim.Optimizer, ...]:
    torch.manual_seed(0)
    weights = [torch.randn(8, 4, 3, 3), torch.randn(16)]
    built = []
    for _ in range(2):
        params = [w.clone().requires_grad_() for w in weights]
        built.append(kind([{"params": params[:1], "weight_decay": 0.05}, {"params": params[1:],
                                                                          "weight_decay": 0.0}], **options))
    return built[0], gate.fused_twin(built[1])


def _steps(optimizer: torch.optim.Optimizer, steps: int, skip: torch.Tensor | None = None) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step() if skip is None else gate.step_unless(optimizer, skip)


@pytest.mark.parametrize("kind,options", [(torch.optim.AdamW, {"lr": 1e-2}), (torch.optim.Adam, {"lr": 1e-2}),
                                          (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9})])
def test_the_fused_twin_steps_like_the_optimizer_it_replaces_and_skips_on_the_device(kind, options):
    original, twin = _optimizers(kind, **options)
    assert gate.can_skip_on_device(twin) and not gate.can_skip_on_device(original)
    _steps(original, 3)
    _steps(twin, 3, skip=torch.zeros((), dtype=torch.bool))
    params = [p for group in original.param_groups for p in group["params"]]
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(params, twin_params))
    before = [p.detach().clone() for p in twin_params]
    state = [{key: value.clone() for key, value in entry.items()} for entry in twin.state.values()]
    _steps(twin, 2, skip=torch.ones((), dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(before, twin_params)), "a skipped step moved a weight"
    for got, expected in zip(twin.state.values(), state):
        assert all(torch.equal(got[key], expected[key]) for key in expected), "a skipped step moved the state"

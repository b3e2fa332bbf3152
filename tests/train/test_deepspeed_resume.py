"""DeepSpeed checkpoints resume on another world size, 2 -> 1 -> 2 ranks, for ZeRO stages 0, 1 and 2.

ZeRO-0 writes no `*_optim_states.pt`, so DeepSpeed's universal converter cannot read it; it loads
directly (nothing is partitioned). Stages 1-2 go through the converter. Oracles: the module's
parameters and buffers on the saving ranks at save time (a resume must restore them bitwise), and the
number of optimizer steps taken so far (Adam's step counter must come back with the weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.train.checkpoint import read_pointer
from dist_train.train.engine.zero import torch_optimizer
from dist_train.train.loop import Trainer

from multiprocess import run_on_ranks
from run_helpers import tiny_config as tiny

pytestmark = pytest.mark.slow
STAGES = (0, 1, 2)


def _tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm statistics) of the plain module."""
    return {name: value.detach().clone() for name, value in trainer.engine.module.state_dict().items()}


def _adam_steps(trainer: Trainer) -> int:
    """The largest step counter in the torch optimizer's state (0 when it holds none)."""
    state = torch_optimizer(trainer.engine.optimizer).state
    return max((int(entry["step"]) for entry in state.values() if "step" in entry), default=0)


def _leg(env, shards, run_root: Path, stage: int, resume: bool, steps: int) -> dict[str, Any]:
    """Resume from the latest checkpoint (or start), train `steps` optimizer steps, save.

    Returns the tensors and Adam steps just after the load, and the tensors at the save."""
    cfg = tiny(shards, run_root, "engine.kind=deepspeed", f"engine.zero_stage={stage}", "train.epochs=2",
               "train.steps_per_epoch=4", "train.batch_size=4")
    root = cfg.run_dir / "checkpoints"
    trainer = Trainer(cfg, env, resume_from=root / str(read_pointer(root / "latest")) if resume else None)
    loaded, loaded_steps = _tensors(trainer), _adam_steps(trainer)
    trainer.enter_phase(trainer.state.epoch)
    stats = trainer.run_steps(trainer.state.epoch, steps)
    trainer.save_checkpoint()
    trainer.tracker.finish(trainer.summary())
    return {"loaded": loaded, "loaded_steps": loaded_steps, "saved": _tensors(trainer),
            "step": trainer.state.step, "loss": stats.loss_sum / max(stats.samples, 1)}


def _assert_resumed(stage: int, leg: dict[str, Any], saved: dict[str, torch.Tensor], steps_before: int,
                    steps: int) -> None:
    assert leg["loaded"].keys() == saved.keys()
    differing = [name for name in saved if not torch.equal(leg["loaded"][name], saved[name])]
    assert not differing, f"ZeRO-{stage}: tensors not restored exactly: {differing[:5]}"
    assert leg["loaded_steps"] == steps_before, f"ZeRO-{stage}: Adam's step counter was not restored"
    assert leg["step"] == steps_before + steps
    assert torch.isfinite(torch.tensor(leg["loss"]))
    moved = any(not torch.equal(leg["saved"][name], saved[name]) for name in saved)
    assert moved, f"ZeRO-{stage}: training did not continue"


def _every_stage(env, shards, run_root: Path, resume: bool, steps: int) -> dict[int, dict[str, Any]]:
    """One `_leg` per ZeRO stage in the same processes: importing DeepSpeed costs more than a leg."""
    return {stage: _leg(env, shards, run_root / f"zero{stage}", stage, resume, steps) for stage in STAGES}


def test_a_deepspeed_checkpoint_resumes_on_one_rank_and_back_on_two(make_shards, tmp_path):
    shards = make_shards()
    first = run_on_ranks(_every_stage, 2, shards, tmp_path, False, 2, spawn=True)
    (alone,) = run_on_ranks(_every_stage, 1, shards, tmp_path, True, 1, spawn=True)
    again = run_on_ranks(_every_stage, 2, shards, tmp_path, True, 1, spawn=True)
    for stage in STAGES:
        saved = first[0][stage]["saved"]
        assert all(torch.equal(saved[name], first[1][stage]["saved"][name]) for name in saved), "ranks diverged"
        _assert_resumed(stage, alone[stage], saved, steps_before=2, steps=1)
        for leg in again:
            _assert_resumed(stage, leg[stage], alone[stage]["saved"], steps_before=3, steps=1)

"""A head-only phase under DeepSpeed runs the backward of the head alone, as DDP does.

DeepSpeed registers every parameter at initialisation; a frozen one used to stay `requires_grad` and
get its gradient zeroed by a hook, so autograd ran the whole backbone's backward for nothing. Oracle:
the DDP run of the same config, counted the same way: tensor hooks on every parameter count the
gradients autograd computes per step. The backbone must get none under either engine, the head the
same number, and the frozen backbone must not move.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.train.loop import Trainer

from multiprocess import run_on_ranks
from run_helpers import tiny_config as tiny

STEPS = 3


def _gradients_computed(env, shards, run_root: Path, engine: str, stage: int) -> dict[str, Any]:
    cfg = tiny(shards, run_root, f"engine.kind={engine}", f"engine.zero_stage={stage}", "train.epochs=1",
               f"train.steps_per_epoch={STEPS}", "train.batch_size=4", "unfreeze.phases=[{from_epoch: 0, train: head}]")
    trainer = Trainer(cfg, env)
    named = dict(trainer.engine.module.named_parameters())
    counts: Counter[str] = Counter()
    for name, param in named.items():
        if param.requires_grad:
            part = name.split(".")[0]
            param.register_hook(lambda grad, part=part: counts.update([part]))
    backbone = {name: p.detach().clone() for name, p in named.items() if name.startswith("backbone.")}
    trainer.enter_phase(0)
    trainer.run_steps(0, STEPS)
    still = all(torch.equal(value, named[name]) for name, value in backbone.items())
    return {"counts": dict(counts), "backbone_still": still}


def _deepspeed_stages(env, shards, run_root: Path) -> dict[int, dict[str, Any]]:
    return {stage: _gradients_computed(env, shards, run_root / f"zero{stage}", "deepspeed", stage)
            for stage in (0, 2)}


@pytest.mark.slow
def test_a_head_only_phase_under_deepspeed_computes_no_backbone_gradient(make_shards, tmp_path):
    shards = make_shards(train=[16, 16])
    (ddp,) = run_on_ranks(_gradients_computed, 1, shards, tmp_path / "ddp", "ddp", 0)
    assert ddp["counts"].get("backbone", 0) == 0 and ddp["counts"]["head"] > 0 and ddp["backbone_still"]
    (stages,) = run_on_ranks(_deepspeed_stages, 1, shards, tmp_path, spawn=True)
    for stage, result in stages.items():
        assert result["counts"].get("backbone", 0) == 0, f"ZeRO-{stage} ran the frozen backbone's backward"
        assert result["counts"]["head"] == ddp["counts"]["head"]
        assert result["backbone_still"], f"ZeRO-{stage}: the frozen backbone moved"

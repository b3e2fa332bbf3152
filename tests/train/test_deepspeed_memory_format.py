"""model.channels_last under DeepSpeed: every stage initialises, and the convolutions run in channels_last.

DeepSpeed's initial broadcast views each parameter as bytes, which a channels_last weight refuses; and
ZeRO 1-2 rebind the parameters to contiguous views of flat buffers. Oracle: the DDP engine with the same
config, whose convolutions all run in channels_last (`is_contiguous(memory_format=channels_last)`
of each Conv2d's output during a training step, recorded by forward hooks); DeepSpeed must match it at
every stage, train (the weights move and stay finite) and, at ZeRO-0, keep channels_last weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.train.loop import Trainer

from multiprocess import run_on_ranks
from run_helpers import tiny_config as tiny

STAGES = (0, 1, 2)


def _conv_layouts(env, shards, run_root: Path, engine: str, stage: int) -> dict[str, Any]:
    """Whether each conv ran in channels_last (its output's layout) in two training steps; weights' layout, movement."""
    cfg = tiny(shards, run_root, f"engine.kind={engine}", f"engine.zero_stage={stage}", "model.channels_last=true",
               "train.epochs=1", "train.steps_per_epoch=2", "train.batch_size=4")
    trainer = Trainer(cfg, env)
    convs = [m for m in trainer.engine.module.modules() if isinstance(m, torch.nn.Conv2d)]
    seen: list[bool] = []
    for conv in convs:
        conv.register_forward_hook(
            lambda _m, _in, output: seen.append(output.is_contiguous(memory_format=torch.channels_last)))
    before = [p.detach().clone() for p in trainer.engine.module.parameters()]
    trainer.enter_phase(0)
    trainer.run_steps(0, 2)
    after = list(trainer.engine.module.parameters())
    return {"inputs": seen, "convs": len(convs),
            "weights": [conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs],
            "moved": any(not torch.equal(a, b) for a, b in zip(before, after)),
            "finite": all(bool(torch.isfinite(p).all()) for p in after)}


def _deepspeed_stages(env, shards, run_root: Path) -> dict[int, dict[str, Any]]:
    """All stages in one process: importing DeepSpeed costs more than a run."""
    return {stage: _conv_layouts(env, shards, run_root / f"zero{stage}", "deepspeed", stage) for stage in STAGES}


@pytest.mark.slow
def test_deepspeed_runs_channels_last_convolutions_at_every_zero_stage(make_shards, tmp_path):
    shards = make_shards(train=[16, 16])
    (ddp,) = run_on_ranks(_conv_layouts, 1, shards, tmp_path / "ddp", "ddp", 0)
    assert ddp["inputs"] and all(ddp["inputs"]) and all(ddp["weights"]), "the oracle itself is not channels_last"
    (stages,) = run_on_ranks(_deepspeed_stages, 1, shards, tmp_path, spawn=True)
    for stage, result in stages.items():
        assert len(result["inputs"]) == len(ddp["inputs"]), f"ZeRO-{stage}: another number of conv calls"
        assert all(result["inputs"]), f"ZeRO-{stage}: a convolution ran in contiguous (NCHW) layout"
        assert result["moved"] and result["finite"], f"ZeRO-{stage}: did not train"
    assert all(stages[0]["weights"]), "ZeRO-0 keeps the module's parameters: they should be channels_last again"

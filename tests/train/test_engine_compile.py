"""`model.compile` wraps what the engine runs, outside DDP, leaves the module's keys plain, and trains.

Compiling the module before the DDP wrap (as before) loses DDP's overlap of the backward with its
bucketed all-reduce; compiling the wrapper keeps it. torch.compile is lazy, so the first checks build the
engines for real without paying for a compilation; the last ones compile and run three steps (inductor's
C++ backend on the CPU) against the eager run.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from dist_train.train.loop import Trainer

from multiprocess import run_on_ranks, world_size
from run_helpers import tiny_config


def _compiled_layers(env, shards, run_root) -> dict:
    trainer = Trainer(tiny_config(shards, run_root, "model.compile=true",
                                  "unfreeze.phases=[{from_epoch: 0, train: head}, {from_epoch: 1, train: all}]"), env)
    trainer.enter_phase(0)
    first = trainer.engine.wrapped
    trainer.enter_phase(1)
    second = trainer.engine.wrapped
    inner = type(second._orig_mod)
    return {"compiled": all(isinstance(w, torch._dynamo.eval_frame.OptimizedModule) for w in (first, second)),
            "recompiled": first is not second, "inner": inner.__name__,
            "keys_plain": not any("_orig_mod" in key for key in trainer.engine.module.state_dict())}


@world_size(1, 2)
def test_the_engine_compiles_the_ddp_wrapper_and_recompiles_after_a_phase_change(world_size, make_shards, tmp_path):
    results = run_on_ranks(_compiled_layers, world_size, make_shards(), tmp_path)
    expected_inner = DistributedDataParallel.__name__ if world_size > 1 else "GlaucomaNet"
    for result in results:
        assert result == {"compiled": True, "recompiled": True, "inner": expected_inner, "keys_plain": True}


def _losses(env, shards, run_root, engine: str, compiled: bool) -> list[float]:
    """Three optimizer steps' losses. Inductor draws dropout masks from its own RNG unless `fallback_random`;
    with it, a compiled step sees the eager step's masks, so only the arithmetic can differ."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    cfg = tiny_config(shards, run_root, f"engine.kind={engine}", f"model.compile={str(compiled).lower()}",
                      "train.epochs=1", "train.steps_per_epoch=3", "train.batch_size=4", "train.deterministic=true",
                      "train.log_every_steps=1")
    trainer = Trainer(cfg, env)
    trainer.enter_phase(0)
    trainer.run_steps(0, 3)
    trainer.tracker.finish(trainer.summary())
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if record["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU backend needs a C++ compiler (g++)")
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_a_compiled_run_executes_and_trains_as_the_eager_one(engine, make_shards, tmp_path):
    """torch.compile (inductor on the CPU, a real compilation) of what each engine runs: the same losses as the
    eager run within 1e-3 over three steps. Before this test no compiled step had ever executed here."""
    shards = make_shards(train=[16, 16])
    (eager,) = run_on_ranks(_losses, 1, shards, tmp_path / "eager", engine, False, spawn=True)
    (compiled,) = run_on_ranks(_losses, 1, shards, tmp_path / "compiled", engine, True, spawn=True)
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-3)

"""`model.compile` wraps what the engine runs, outside DDP, and leaves the module's keys plain.

Compiling the module before the DDP wrap (as before) loses DDP's overlap of the backward with its
bucketed all-reduce; compiling the wrapper keeps it. torch.compile is lazy, so these checks build the
engines for real without paying for a compilation.
"""

from __future__ import annotations

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

"""Run a test function on N real gloo ranks, as composer's `@world_size(1, 2)` does.

`run_on_ranks(fn, n, *args)` calls `fn(env, *args)` on every rank and returns each rank's value (rank
order). World size 1 runs in this process, with no process group, as a one-process run does (unless
`spawn=True`: DeepSpeed needs a group even for one rank); larger sizes are spawned processes that meet
over gloo on a free loopback port. `fn` must be a module-level
function (spawn imports it by name). An exception on any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port


def world_size(*sizes: int) -> pytest.MarkDecorator:
    """Parametrize a test over world sizes; sizes above 1 start processes and are marked slow."""
    params = [pytest.param(size, id=f"world_size={size}", marks=[pytest.mark.slow] if size > 1 else [])
              for size in sizes]
    return pytest.mark.parametrize("world_size", params)


def run_on_ranks(fn: Callable[..., Any], world: int, *args: Any, spawn: bool = False) -> list[Any]:
    if world == 1 and not spawn:
        from dist_train.train.distributed import DistEnv

        return [fn(DistEnv(), *args)]
    with tempfile.TemporaryDirectory() as scratch:
        mp.start_processes(_rank_main, args=(world, get_free_port(), scratch, fn, args), nprocs=world,
                           start_method="spawn")
        return [pickle.loads((Path(scratch) / f"rank{rank}.pkl").read_bytes()) for rank in range(world)]


def _rank_main(rank: int, world: int, port: int, scratch: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      DS_ACCELERATOR="cpu", WANDB_MODE="offline", WANDB_SILENT="true")
    from dist_train.train import distributed

    env = distributed.init_distributed("cpu", 60, always=True)
    try:
        result = fn(env, *args)
    finally:
        distributed.destroy()
    (Path(scratch) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))

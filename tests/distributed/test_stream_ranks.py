"""The shard stream under a real gloo group: 2 ranks x 2 DataLoader workers, uneven shards.

Each rank streams its own share and the keys meet on rank 0 through dist_train.train.distributed, as the
training loop's data do: equal batch counts, disjoint training samples, reproducible order per seed,
and exactly-once validation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from dist_train.config import DataConfig
from dist_train.data.stream import Decoder, EvalStream, TrainStream, iterate_shard, make_loader

from conftest import free_port, write_shards

pytestmark = pytest.mark.slow
WORLD, WORKERS, MICRO_BATCHES = 2, 2, 7


def _rank(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from dist_train.train import distributed

    env = distributed.init_distributed("cpu", 60)
    data = DataConfig(train_shards="-", val_shards="-", workers=WORKERS, shuffle_buffer=8)
    decoder = Decoder(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    train = sorted(str(p) for p in Path(root).glob("train-*.tar"))
    val = sorted(str(p) for p in Path(root).glob("val-*.tar"))
    runs = {}
    for name, seed, epoch in (("first", 0, 0), ("again", 0, 0), ("next_epoch", 0, 1)):
        stream = TrainStream(train, data, decoder, 4, env.rank, env.world_size, seed, epoch, MICRO_BATCHES, WORKERS)
        runs[name] = [batch.keys for batch in make_loader(stream, data, False) if batch.keys]
    scored = [key for batch in make_loader(EvalStream(val, decoder, 4, env.rank, env.world_size, WORKERS), data,
                                           False) for key in batch.keys]
    gathered = distributed.gather_to_main(env, {"runs": runs, "val": scored})
    if env.is_main:
        with open(out, "w") as handle:
            json.dump(gathered, handle)
    distributed.destroy()


def test_two_ranks_stream_disjoint_equal_reproducible_and_score_once(tmp_path):
    write_shards(tmp_path, "train", [9, 9, 9, 4, 2])
    write_shards(tmp_path, "val", [7, 3, 5])
    out = tmp_path / "gathered.json"
    mp.start_processes(_rank, args=(free_port(), str(tmp_path), str(out)), nprocs=WORLD, start_method="spawn")
    ranks = json.loads(out.read_text())
    for rank in ranks:
        assert len(rank["runs"]["first"]) == MICRO_BATCHES, "a rank ran a different number of batches"
        assert rank["runs"]["first"] == rank["runs"]["again"], "same seed and epoch, another order"
        assert rank["runs"]["first"] != rank["runs"]["next_epoch"]
    seen = [{key for batch in rank["runs"]["first"] for key in batch} for rank in ranks]
    assert not seen[0] & seen[1], "two ranks trained on the same sample in one epoch"
    all_val = sorted(s["__key__"] for p in sorted(tmp_path.glob("val-*.tar")) for s in iterate_shard(str(p)))
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == all_val

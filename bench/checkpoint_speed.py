"""Checkpoint save/load time and size: sharded DCP from 2 ranks against one torch.save, and async DCP's stall.

    python bench/checkpoint_speed.py [--ranks 2] [--repeats 3] [--backbone efficientnet_b0] [--workdir DIR]
                                     [--no-async] [--no-record]

The state is our model (efficientnet_b0 + default head) and AdamW after one step (so its moments
exist), as dist_train/train/checkpoint.py stores it. In interleaved rounds (best of --repeats), on --ranks
gloo processes with one thread each:

  dcp save        get_state_dict + dcp.save from every rank (the raw DCP cost)
  ours save       dist_train.train.checkpoint.Checkpointer.save: buffer broadcast, DCP, trainer.json, fsync of
                  every file, atomic rename and `latest` pointer (what a training run pays)
  torch.save      rank 0 writes model + optimizer state dicts to one file (other ranks wait);
                  "+ fsync" adds the flush to disk that our checkpoints pay for atomicity
  async save      dcp.async_save: the time until it returns (the training stall) and until its future
                  completes (thread executor; the process executor is tried with --async-process)
  dcp load        every rank: get_state_dict + dcp.load + set_state_dict (Checkpointer.restore)
  torch.load      every rank reads the one file and loads both state dicts

Times are the slowest rank's (a save is done when every rank is). Sizes are bytes on disk. Files are
written under --workdir (the page cache is warm for loads: it measures the software path, not the
disk). Appends a dated row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import append_row, free_port, load_average


def build_state(args):
    from dist_train.config import ModelConfig
    from dist_train.model.network import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=args.backbone, pretrained="none"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def timed(function) -> float:
    dist.barrier()
    started = time.perf_counter()
    function()
    return slowest(time.perf_counter() - started)


def rank_main(rank: int, world_size: int, port: int, queue, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dist_train.train import checkpoint
    from dist_train.train.distributed import DistEnv
    from dist_train.train.state import StreamState, TrainerState

    env = DistEnv(rank=rank, world_size=world_size)
    model, optimizer = build_state(args)
    from dist_train.config import config_from_dict
    from dist_train.train.engine.ddp import DDPEngine

    cfg = config_from_dict({"data": {"train_shards": "-", "val_shards": "-"}, "train": {"device": "cpu"}})
    engine = DDPEngine(model, optimizer, cfg, env)  # the product's engine: its DCP save, load and buffer sync
    root = Path(args.workdir) / "checkpoint-bench"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()
    single = root / "single.pt"

    def dcp_save(folder: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))

    def torch_save(sync: bool) -> None:
        if rank == 0:
            torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, single)
            if sync:
                fsync_file(single)
        dist.barrier()

    def torch_load() -> None:
        state = torch.load(single, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])

    checkpointer = checkpoint.Checkpointer(root / "ours", env, keep_last=1)
    parts, rank_parts, meta = {"trainer": TrainerState()}, {"position": StreamState()}, {"workers": 2}
    results: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    def one_round(index: int) -> dict[str, float]:
        round_results = {
            "dcp save": timed(lambda: dcp_save(root / f"dcp-{index}")),
            "ours save": timed(lambda: checkpointer.save(index + 1, engine, parts, rank_parts, meta)),
            "torch.save": timed(lambda: torch_save(False)),
            "torch.save + fsync": timed(lambda: torch_save(True)),
        }
        if args.async_save:
            for kind in ["thread"] + (["process"] if args.async_process else []):
                folder = root / f"async-{kind}-{index}"
                stall, total = async_round(dcp, get_state_dict, model, optimizer, folder, kind)
                round_results[f"async ({kind}) stall"] = stall
                round_results[f"async ({kind}) total"] = total
        ours_folder = root / "ours" / checkpoint.read_pointer(root / "ours" / "latest")
        saved = checkpoint.read_trainer_state(ours_folder)
        round_results["dcp load"] = timed(lambda: checkpointer.restore(ours_folder, saved, engine, parts, rank_parts))
        round_results["torch.load"] = timed(torch_load)
        if rank == 0:
            sizes.update({"dcp": folder_bytes(root / f"dcp-{index}"), "torch.save": folder_bytes(single),
                          "ours": folder_bytes(ours_folder)})
            print(f"  round {index + 1}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in round_results.items()),
                  flush=True)
        dist.barrier()
        if rank == 0:
            for old in root.glob(f"*-{index}"):
                shutil.rmtree(old, ignore_errors=True)
        return round_results

    for round_index in range(args.repeats):
        for name, seconds in one_round(round_index).items():
            results.setdefault(name, []).append(seconds)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        queue.put({"best": {k: min(v) for k, v in results.items()}, "sizes": sizes, "params": params})
    dist.barrier()
    dist.destroy_process_group()


def async_round(dcp, get_state_dict, model, optimizer, folder: Path, kind: str) -> tuple[float, float]:
    """(stall: until async_save returns, total: until its write completed), slowest rank."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    checkpointer_type = AsyncCheckpointerType.PROCESS if kind == "process" else AsyncCheckpointerType.THREAD
    dist.barrier()
    started = time.perf_counter()
    model_state, optim_state = get_state_dict(model, optimizer)
    future = dcp.async_save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder),
                            async_checkpointer_type=checkpointer_type)
    stall = time.perf_counter() - started
    result = future.upload_completion if hasattr(future, "upload_completion") else future
    result.result()
    total = time.perf_counter() - started
    return slowest(stall), slowest(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best counts")
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--no-async", dest="async_save", action="store_false")
    parser.add_argument("--async-process", action="store_true", help="also try the process-based async executor")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dist_train_bench"))
    parser.add_argument("--no-record", dest="record", action="store_false", help="print only (smoke runs)")
    args = parser.parse_args()
    load_before = load_average()
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(rank_main, args=(args.ranks, free_port(), queue, args), nprocs=args.ranks,
                       start_method="spawn")
    found = queue.get()
    best, sizes = found["best"], found["sizes"]
    loads = (min(load_before, load_average()), max(load_before, load_average()))
    mb = {name: size / 1e6 for name, size in sizes.items()}
    print(f"\n{args.backbone} + head ({found['params'] / 1e6:.2f} M params) + AdamW state, {args.ranks} ranks, "
          f"best of {args.repeats}, load avg {loads[0]:.1f}-{loads[1]:.1f}")
    for name, seconds in best.items():
        print(f"  {name:<24} {seconds * 1000:8.0f} ms")
    print(f"  size: DCP {mb['dcp']:.1f} MB, ours (DCP + trainer.json) {mb['ours']:.1f} MB, "
          f"torch.save {mb['torch.save']:.1f} MB")
    save_ratio = best["dcp save"] / best["torch.save"]
    load_ratio = best["dcp load"] / best["torch.load"]
    print(f"  DCP / torch.save: save {save_ratio:.2f}x, load {load_ratio:.2f}x the time")
    figures = (f"{args.backbone} + head ({found['params'] / 1e6:.2f} M params) + AdamW, {args.ranks} gloo ranks, best "
               f"of {args.repeats}, load avg {loads[0]:.1f}-{loads[1]:.1f}: save DCP {best['dcp save'] * 1000:.0f} ms, "
               f"ours (Checkpointer.save: DCP + fsync + atomic publish) {best['ours save'] * 1000:.0f} ms, "
               f"torch.save {best['torch.save'] * 1000:.0f} ms "
               f"({best['torch.save + fsync'] * 1000:.0f} ms with fsync); "
               f"load DCP {best['dcp load'] * 1000:.0f} ms, torch.load {best['torch.load'] * 1000:.0f} ms; size DCP "
               f"{mb['dcp']:.1f} MB, torch.save {mb['torch.save']:.1f} MB")
    for kind in ("thread", "process"):
        if f"async ({kind}) stall" in best:
            figures += (f"; async DCP ({kind}) stall {best[f'async ({kind}) stall'] * 1000:.0f} ms, done after "
                        f"{best[f'async ({kind}) total'] * 1000:.0f} ms")
    if args.record:
        append_row("checkpoint_speed", figures)


if __name__ == "__main__":
    main()

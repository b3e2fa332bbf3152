"""Our training step against a minimal PyTorch loop, Lightning and DeepSpeed, on the same model and batches.

    python bench/trainer_overhead.py [--image-size 128] [--batch-size 8] [--accumulation 2] [--steps 2]
                                     [--repeats 5] [--zero-stages 2] [--no-lightning] [--no-deepspeed]

efficientnet_b0 (with our default head) at --image-size px, fp32, data from memory (a few fixed random
batches per rank), every rank a torch.multiprocessing process with one thread, gloo. Measured in
interleaved rounds inside the same processes (rates: the best round of --repeats; ratios: the median
over rounds of the ratio measured within a round, which drifting background load cannot bias), each round
--steps optimizer steps of --accumulation micro-batches of --batch-size images per rank:

  ours        dist_train.train.loop.Trainer.run_steps itself (DDPEngine, loss, LR schedule, per-step health
              all-reduce, epoch statistics, logging), its DataLoader replaced by the in-memory batches;
  minimal     a hand-written loop: DDP (no_sync on accumulation micro-steps), BCE loss, AdamW;
  lightning   lightning.Trainer(strategy="ddp", accelerator="cpu", precision="32-true",
              accumulate_grad_batches), same module, batches and optimizer (2 ranks only);
  zero<k>     our Trainer with engine.kind=deepspeed, engine.zero_stage=k (2 ranks only).

Run once with 1 rank and once with 2 ranks. Prints images/s (all ranks together), our overhead over
the minimal loop (target <= 5%), ours against Lightning (target: ours >= Lightning), the 2-rank /
1-rank scaling (target >= 1.7x, meaningful only when the machine's 2 cores are otherwise idle: the
row records the load average), and ZeRO against DDP. Each ratio is also given in rank 0's CPU time
(time.process_time), which other jobs on a shared machine barely disturb, and the scaling is
projected from it. Appends a dated row to bench/RESULTS.md.
DeepSpeed's first start on a machine JIT-builds its shm op (~40 s, cached after).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from common import ROOT, append_row, free_port, load_average, verdict
from torch import nn

MEMORY_BATCHES = 4
"""Distinct in-memory batches per rank, cycled."""


# ---------------------------------------------------------------- shared inputs


def make_batches(rank: int, args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator),
             (torch.rand(args.batch_size, generator=generator) < 0.2).float()) for _ in range(MEMORY_BATCHES)]


def model_config():
    from dist_train.config import ModelConfig

    return ModelConfig(backbone="efficientnet_b0", pretrained="none")


def ensure_tiny_shards(workdir: Path) -> Path:
    """Our Trainer reads class counts from real shards at start; their pixels are never used here."""
    shards = workdir / "tiny-shards"
    if not (shards / "manifest.json").is_file():
        from dist_train.shards.build import BuildOptions, build
        from dist_train.shards.synthetic import generate

        generate(workdir / "tiny-images", 16, positive_rate=0.25, size=64, seed=0)
        build([workdir / "tiny-images"], workdir / "tiny-images" / "labels.csv", shards,
              BuildOptions(size=32, shard_size=4, workers=1, val_fraction=0.25))
    return shards


# ---------------------------------------------------------------- the contenders


class OursRunner:
    """dist_train's Trainer, `run_steps(epoch, steps)` per timed call, data from memory through its loader seam."""

    def __init__(self, env, args, batches, engine: str = "ddp", zero_stage: int = 0):
        from dist_train.config import config_from_dict
        from dist_train.data.stream import Batch
        from dist_train.train.loop import Trainer

        def memory_loader(stream, cfg, pin_memory, timeout_s=0):
            """The stream and its workers are not measured: the same batches, cycled, for as long as asked."""
            for index in itertools.count():
                images, labels = batches[index % len(batches)]
                yield Batch(images, labels, [f"k{index}-{i}" for i in range(len(labels))], 0, index + 1)

        shards = ensure_tiny_shards(Path(args.workdir))
        cfg = config_from_dict({
            "name": f"overhead-{engine}{zero_stage}-w{env.world_size}", "run_root": str(Path(args.workdir) / "runs"),
            "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                     "image_size": args.image_size},
            "model": {"backbone": "efficientnet_b0", "pretrained": "none"},
            "loss": {"name": "bce"}, "optim": {"name": "adamw", "lr": 1e-4},
            "train": {"batch_size": args.batch_size, "accumulation_steps": args.accumulation, "epochs": 1000,
                      "steps_per_epoch": args.steps, "device": "cpu", "precision": "fp32"},
            "engine": {"kind": engine, "zero_stage": zero_stage},
            "tracking": {"wandb": {"enabled": False}, "progress": "none", "html_report": False}})
        self.trainer = Trainer(cfg, env, loader_factory=memory_loader)
        self.trainer.enter_phase(0)

    def run(self, steps: int) -> tuple[float, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        self.trainer.run_steps(0, steps)
        return time.perf_counter() - started, time.process_time() - cpu_started


class MinimalRunner:
    """What one would write by hand: DDP, no_sync on accumulation micro-steps, BCE, AdamW."""

    def __init__(self, env, args, batches):
        from torch.nn.parallel import DistributedDataParallel

        from dist_train.model.network import build_model

        torch.manual_seed(0)
        self.module = build_model(model_config())
        self.model = DistributedDataParallel(self.module) if env.is_distributed else self.module
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-4)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.batches, self.accumulation, self.distributed = batches, args.accumulation, env.is_distributed
        self.model.train()

    def run(self, steps: int) -> tuple[float, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        for micro in range(steps * self.accumulation):
            images, labels = self.batches[micro % len(self.batches)]
            boundary = (micro + 1) % self.accumulation == 0
            sync = contextlib.nullcontext() if boundary or not self.distributed else self.model.no_sync()
            with sync:
                loss = self.loss_fn(self.model(images), labels) / self.accumulation
                loss.backward()
            if boundary:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, time.process_time() - cpu_started


class LightningRunner:
    """lightning.Trainer(strategy="ddp") on the same module; a callback times the post-warm-up batches."""

    def __init__(self, env, args, batches):
        import lightning as L

        from dist_train.model.network import build_model

        torch.manual_seed(0)
        network = build_model(model_config())

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.network, self.loss_fn = network, nn.BCEWithLogitsLoss()

            def training_step(self, batch, batch_idx):
                images, labels = batch
                return self.loss_fn(self.network(images), labels)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-4)

        class Timer(L.Callback):
            def __init__(self, warm: int, last: int):
                self.warm, self.last, self.started, self.ended = warm, last, None, None

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx == self.warm - 1:
                    self.started = (time.perf_counter(), time.process_time())
                if batch_idx == self.last - 1:
                    self.ended = (time.perf_counter(), time.process_time())

        self.lightning, self.module, self.timer_type = L, Module(), Timer
        self.batches, self.args, self.world_size = batches, args, env.world_size

    def run(self, steps: int) -> tuple[float, float]:
        accumulation, warm = self.args.accumulation, 1
        micro = (warm + steps) * accumulation
        data = [self.batches[index % len(self.batches)] for index in range(micro)]
        timer = self.timer_type(warm * accumulation, micro)
        trainer = self.lightning.Trainer(
            accelerator="cpu", devices=self.world_size, strategy="ddp", precision="32-true",
            accumulate_grad_batches=accumulation, max_epochs=1, max_steps=warm + steps, limit_train_batches=micro,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[timer])
        loader = torch.utils.data.DataLoader(data, batch_size=None)
        trainer.fit(self.module, train_dataloaders=loader)
        return timer.ended[0] - timer.started[0], timer.ended[1] - timer.started[1]


# ---------------------------------------------------------------- one process group


def rank_main(rank: int, world_size: int, port: int, queue, args) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
                       "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "bench", "OMP_NUM_THREADS": "1",
                       "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    from dist_train.train import distributed

    env = distributed.init_distributed("cpu", timeout_s=600)
    batches = make_batches(rank, args)
    runners = {"ours": OursRunner(env, args, batches), "minimal": MinimalRunner(env, args, batches)}
    if world_size > 1 and args.lightning:
        runners["lightning"] = LightningRunner(env, args, batches)
    if world_size > 1 and args.deepspeed:
        for stage in args.zero_stages:
            started = time.perf_counter()
            runners[f"zero{stage}"] = OursRunner(env, args, batches, engine="deepspeed", zero_stage=stage)
            if rank == 0:
                print(f"  [{world_size} ranks] DeepSpeed ZeRO-{stage} initialised in "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
    for name, runner in runners.items():
        if name != "lightning":
            runner.run(1)  # warm-up: first-step allocations, DDP bucket rebuild, optimizer state
    elapsed: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for round_index in range(args.repeats):
        # rotate the order each round, so no contender always follows the same one
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            distributed.barrier(env)
            wall, cpu_seconds = runners[name].run(args.steps)
            elapsed[name].append(wall)
            cpu[name].append(cpu_seconds)
        if rank == 0:
            print(f"  [{world_size} ranks] round {round_index + 1}: "
                  + ", ".join(f"{name} {times[-1]:.2f} s" for name, times in elapsed.items()), flush=True)
    images = args.steps * args.accumulation * args.batch_size * world_size
    if rank == 0:
        queue.put({"rate": {name: images / min(times) for name, times in elapsed.items()},
                   "elapsed": elapsed, "cpu": cpu})
    distributed.barrier(env)
    distributed.destroy()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def paired(elapsed: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of the time ratio measured within one round: robust to load that drifts."""
    return median([a / b for a, b in zip(elapsed[numerator], elapsed[denominator])])


def measure(world_size: int, args) -> dict[str, float]:
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(rank_main, args=(world_size, free_port(), queue, args), nprocs=world_size,
                       start_method="spawn")
    return queue.get()


def lightning_available() -> bool:
    try:
        import lightning  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch per rank")
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--zero-stages", default="2", help="comma-separated DeepSpeed ZeRO stages, e.g. 0,1,2")
    parser.add_argument("--no-lightning", dest="lightning", action="store_false")
    parser.add_argument("--no-deepspeed", dest="deepspeed", action="store_false")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dist_train_bench"))
    parser.add_argument("--no-record", dest="record", action="store_false", help="print only (smoke runs)")
    args = parser.parse_args()
    args.zero_stages = [int(stage) for stage in args.zero_stages.split(",") if stage.strip()]
    if args.lightning and not lightning_available():
        print("lightning is not installed (pip install -c constraints.txt lightning): skipping it")
        args.lightning = False
    os.chdir(ROOT)
    ensure_tiny_shards(Path(args.workdir))
    loads = [load_average()]
    print(f"efficientnet_b0 at {args.image_size} px, micro-batch {args.batch_size} x {args.accumulation} "
          f"accumulation, {args.steps} steps per round, {args.repeats} rounds")
    one_found = measure(1, args)
    loads.append(load_average())
    two_found = measure(2, args)
    loads.append(load_average())
    one, two = one_found["rate"], two_found["rate"]
    lines, figures = [], []
    for world, rates in ((1, one), (2, two)):
        lines.append(f"{world} rank(s) x 1 thread, best round: "
                     + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()) + " img/s")
    # time ratios within a round (median over rounds): ours/minimal - 1 is our overhead
    overhead1 = paired(one_found["elapsed"], "ours", "minimal") - 1
    overhead2 = paired(two_found["elapsed"], "ours", "minimal") - 1
    worst = max(overhead1, overhead2)
    cpu1 = paired(one_found["cpu"], "ours", "minimal") - 1
    cpu2 = paired(two_found["cpu"], "ours", "minimal") - 1
    scaling, scaling_minimal = two["ours"] / one["ours"], two["minimal"] / one["minimal"]
    # every rank does the same work per round in both runs: with 2 idle cores, 2 ranks would run
    # 2 x (CPU seconds per rank at 1 rank) / (CPU seconds per rank at 2 ranks) times as fast
    projected = 2 * median(one_found["cpu"]["ours"]) / median(two_found["cpu"]["ours"])
    lines.append(f"our overhead over the minimal loop (median paired): {overhead1 * 100:+.1f}% (1 rank), "
                 f"{overhead2 * 100:+.1f}% (2 ranks) (target <= 5%: {verdict(worst, 0.05, higher_is_better=False)})")
    lines.append(f"  in CPU time of rank 0 (insensitive to other jobs' load): {cpu1 * 100:+.1f}% (1 rank), "
                 f"{cpu2 * 100:+.1f}% (2 ranks)")
    figures.append(f"overhead vs minimal loop {overhead1 * 100:+.1f}% (1 rank) / {overhead2 * 100:+.1f}% (2 ranks) "
                   f"wall, {cpu1 * 100:+.1f}% / {cpu2 * 100:+.1f}% CPU time, target <= 5% "
                   f"{verdict(worst, 0.05, higher_is_better=False)}")
    if "lightning" in two:
        ratio = paired(two_found["elapsed"], "lightning", "ours")
        cpu_ratio = paired(two_found["cpu"], "lightning", "ours")
        lines.append(f"ours / Lightning speed (2 ranks, median paired): {ratio:.2f} "
                     f"(target >= 1: {verdict(ratio, 1.0)})")
        lines.append(f"  Lightning's CPU time / ours: {cpu_ratio:.2f}")
        figures.append(f"ours/Lightning speed {ratio:.2f} wall, {cpu_ratio:.2f} CPU time (target >= 1 "
                       f"{verdict(ratio, 1.0)})")
    elif not args.lightning:
        figures.append("Lightning not measured")
    lines.append(f"scaling 2 ranks / 1 rank (best rounds): ours {scaling:.2f}x, minimal {scaling_minimal:.2f}x "
                 f"(target >= 1.7x: {verdict(scaling, 1.7)}; needs 2 otherwise idle cores)")
    lines.append(f"  projected from CPU time per rank (2 idle cores): ours {projected:.2f}x "
                 f"(target >= 1.7x: {verdict(projected, 1.7)})")
    figures.append(f"scaling 2/1 ranks ours {scaling:.2f}x, minimal {scaling_minimal:.2f}x measured (target 1.7x "
                   f"{verdict(scaling, 1.7)}), {projected:.2f}x projected from CPU time per rank "
                   f"({verdict(projected, 1.7)})")
    for stage in args.zero_stages:
        if f"zero{stage}" in two:
            ratio = paired(two_found["elapsed"], "ours", f"zero{stage}")
            cpu_ratio = paired(two_found["cpu"], "ours", f"zero{stage}")
            lines.append(f"DeepSpeed ZeRO-{stage} speed / DDP (2 ranks, median paired): {ratio:.2f} wall, "
                         f"{cpu_ratio:.2f} CPU time")
            figures.append(f"ZeRO-{stage}/DDP speed {ratio:.2f} wall, {cpu_ratio:.2f} CPU time")
    print("\n".join(lines))
    summary = (f"efficientnet_b0 {args.image_size} px fp32, micro-batch {args.batch_size} x {args.accumulation} "
               f"accumulation, {args.steps} steps/round, {args.repeats} rounds (rates: best round; ratios: median "
               f"paired within rounds, wall and rank 0 CPU time), gloo, 1 thread/rank, "
               f"load avg {min(loads):.1f}-{max(loads):.1f}: 1 rank "
               + ", ".join(f"{n} {r:.1f}" for n, r in one.items()) + " img/s; 2 ranks "
               + ", ".join(f"{n} {r:.1f}" for n, r in two.items()) + " img/s; " + "; ".join(figures))
    if args.record:
        append_row("trainer_overhead", summary)


if __name__ == "__main__":
    main()

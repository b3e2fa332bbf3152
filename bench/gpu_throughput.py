"""One GPU: images/s of the full pipeline (shards -> augment -> train step) against the model alone.

    python bench/gpu_throughput.py [--image-size 512] [--batch-size 64] [--steps 30] [--workers CORES]
                                   [--compile] [--clahe] [--no-gpu-decode] [--n 256] [--workdir DIR]
    python bench/gpu_throughput.py --cpu-smoke      # no GPU: a tiny CPU run that proves every path executes

efficientnet_b0 (our default head) with bf16 autocast and channels_last (optionally torch.compile),
built by dist_train's own Trainer (train.device=cuda, train.precision=bf16, model.channels_last=true).
Measured one after another on the same engine, each --steps optimizer steps after a warm-up:

  model only      engine.train_micro_step + engine.step on random tensors already on the GPU, no host
                  sync until the end: the upper bound;
  loop, memory    Trainer.train_epoch on batches already on the GPU (its DataLoader replaced): the
                  loop's own cost (per-step host syncs, statistics, logging) on top of the model;
  full pipeline   Trainer.train_epoch as a run does it: shards -> DataLoader workers (PIL decode, 8-bit
                  augmentation, normalisation) -> pinned copy -> step;
  gpu decode      the product's data.decode=cuda path through the same Trainer: workers read shard bytes
                  and draw the augmentation parameters; dist_train.data.gpu_decode decodes the batch with
                  nvJPEG (torchvision.io.decode_jpeg(device="cuda")) and augments it batched on the GPU.
                  "gpu decode alone" times that device step by itself. With --clahe it is skipped
                  (per-epoch CLAHE has no GPU kernel; such runs build their shards with --clahe).

Also the host JPEG decode rate per core and the GPU decode rate alone, and peak GPU memory. Targets
(one H100): full pipeline >= 90% of model only; the users' v3 workload (b0 at 384 px, ~54k images x
20 epochs in <= 15 min) needs >= 1,200 img/s end to end (run with --image-size 384 --clahe for that).
The shards are --n synthetic images (cycled by the training stream, so the epoch can be any length).
Appends a dated row to bench/RESULTS.md with the GPU's name; a CPU smoke run records nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, append_row, load_average
from PIL import Image

V2_AUGMENT = {"rotation_deg": 15, "shift": 0.1, "brightness": [0.8, 1.2], "hflip": True}


# ---------------------------------------------------------------- data and the trainer


def ensure_shards(workdir: Path, n: int, size: int) -> Path:
    from dist_train.shards.build import BuildOptions, build
    from dist_train.shards.synthetic import generate

    raw = round(size * 1.4)
    images, shards = workdir / f"gpu-images-n{n}-s{raw}", workdir / f"gpu-shards-n{n}-{size}"
    if not (images / "labels.csv").is_file():
        started = time.perf_counter()
        generate(images, n, positive_rate=0.2, size=raw, seed=0)
        print(f"generated {n} images of ~{raw} px in {time.perf_counter() - started:.0f} s", flush=True)
    if not (shards / "manifest.json").is_file():
        build([images], images / "labels.csv", shards,
              BuildOptions(size=size, shard_size=max(1, n // 16), workers=min(os.cpu_count() or 1, 8),
                           val_fraction=0.1))
    return shards


def build_trainer(args, shards: Path, device: str, loader_factory=None, decode: str = "cpu"):
    """The product's Trainer on the bench shards; `loader_factory` replaces its DataLoader (data from memory)."""
    from dist_train.config import config_from_dict
    from dist_train.data.stream import make_loader
    from dist_train.train import distributed
    from dist_train.train.loop import Trainer

    cfg = config_from_dict({
        "name": f"gpu-throughput-{args.image_size}", "run_root": str(Path(args.workdir) / "runs"),
        "data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                 "image_size": args.image_size, "workers": args.workers, "augment": V2_AUGMENT,
                 "clahe": args.clahe, "shuffle_buffer": 64, "decode": decode},
        "model": {"backbone": "efficientnet_b0", "pretrained": "none", "channels_last": True,
                  "compile": args.compile},
        "loss": {"name": "bce"}, "optim": {"name": "adamw", "lr": 1e-4},
        "engine": engine_section(getattr(args, "engine", "ddp")),
        "train": {"batch_size": args.batch_size, "epochs": 1000, "steps_per_epoch": args.steps, "device": device,
                  "precision": "bf16" if device == "cuda" else "fp32", "log_every_steps": 10},
        "tracking": {"wandb": {"enabled": False}, "progress": "none", "html_report": False}})
    env = distributed.init_distributed(device, always=cfg.engine.kind == "deepspeed")
    trainer = Trainer(cfg, env, loader_factory=loader_factory or make_loader)
    trainer.enter_phase(0)
    return trainer


def engine_section(kind: str) -> dict:
    """DDP, or DeepSpeed at ZeRO-2 (the stage bench/gpu_check.py compares against DDP)."""
    return {"kind": kind, "zero_stage": 2 if kind == "deepspeed" else 0}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict, name: str):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        into[name] = torch.cuda.max_memory_allocated(device) / 2**30


# ---------------------------------------------------------------- the measurements


def model_only(trainer, args, device) -> float:
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, generator=generator)
    labels = (torch.rand(args.batch_size, device=device, generator=generator) < 0.2).float()
    engine = trainer.engine
    for _ in range(3):
        engine.forward_backward(images, labels, trainer.loss_fn, sync=True)
        engine.optimizer_step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        engine.forward_backward(images, labels, trainer.loss_fn, sync=True)
        engine.optimizer_step()
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


def trainer_epoch(trainer, steps: int, epoch: int, device) -> float:
    """Images/s of `steps` optimizer steps of a fresh `epoch` through the Trainer's own `run_steps`."""
    trainer.stream.reset()
    synchronize(device)
    started = time.perf_counter()
    trainer.run_steps(epoch, steps)
    synchronize(device)
    return steps * trainer.cfg.train.batch_size / (time.perf_counter() - started)


def memory_loader_factory(args, device):
    """Batches already on the device, as many as asked: the loop's own cost without the input pipeline."""
    from dist_train.data.stream import Batch

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = (torch.rand(args.batch_size, device=device) < 0.2).float()
    keys = [str(i) for i in range(args.batch_size)]

    def memory_loader(stream, cfg, pin_memory, timeout_s=0):
        for index in itertools.count():
            yield Batch(images, labels, keys, 0, index + 1)

    return memory_loader


def loop_on_memory(trainer, args, device) -> float:
    trainer_epoch(trainer, 3, 10_000, device)
    return trainer_epoch(trainer, args.steps, 10_001, device)


def full_pipeline(trainer, args, device) -> float:
    """One warm epoch (worker start, first shards), then the timed one; workers restart per epoch as in runs."""
    trainer_epoch(trainer, max(2, args.workers // 2), 20_000, device)
    return trainer_epoch(trainer, args.steps, 20_001, device)


def gpu_decode_pipeline(args, shards: Path, device_name: str, device) -> tuple[float, float]:
    """(images/s of a Trainer with data.decode=cuda, images/s of its device step alone).

    Without CUDA (the smoke run) the Trainer falls back to the CPU path, as runs do, and the device step
    runs on the CPU: every part still executes."""
    trainer = build_trainer(args, shards, device_name, decode="cuda")
    return full_pipeline(trainer, args, device), device_decode_rate(trainer, args, device)


def device_decode_rate(trainer, args, device) -> float:
    """Images/s of `gpu_decode.DeviceDecoder` (decode, augment) on --steps batches read here beforehand."""
    from dist_train.data.gpu_decode import DeviceDecoder
    from dist_train.data.stream import TrainStream

    cfg = trainer.cfg
    decoder = dataclasses.replace(trainer.decoders["train"], on_device=True)
    stream = TrainStream(trainer.train_urls, cfg.data, decoder, cfg.train.batch_size, 0, 1, cfg.train.seed, 30_000,
                         args.steps + 1, 1)
    batches = list(stream)
    step = DeviceDecoder(cfg.data.image_size, cfg.data.augment.interpolation, device)
    step(batches[0])
    synchronize(device)
    started = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    synchronize(device)
    return sum(len(batch.keys) for batch in batches[1:]) / (time.perf_counter() - started)


def host_decode_rate(shards: Path, count: int = 64) -> float:
    """Images/s of one core decoding the shard JPEGs to RGB (PIL), as the workers do."""
    import tarfile

    from dist_train.data.stream import shard_urls

    blobs = []
    with tarfile.open(shard_urls(str(shards / "train-*.tar"))[0]) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".jpg") and len(blobs) < count:
                blobs.append(tar.extractfile(member).read())
    started = time.perf_counter()
    for blob in blobs:
        np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    return len(blobs) / (time.perf_counter() - started)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n", type=int, default=256, help="synthetic images in the shards (cycled)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (model.compile)")
    parser.add_argument("--clahe", action="store_true", help="CLAHE preprocessing in the pipeline (v3)")
    parser.add_argument("--no-gpu-decode", dest="gpu_decode", action="store_false")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny run on the CPU: proves the script executes")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dist_train_bench"))
    parser.add_argument("--no-record", dest="record", action="store_false", help="print only (smoke runs)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file (bench/gpu_check.py)")
    args = parser.parse_args()
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.cpu_smoke:
        print("no CUDA GPU visible: this benchmark needs one for real figures; running the CPU smoke test instead "
              "(--cpu-smoke), which records nothing")
        args.cpu_smoke = True
    if args.cpu_smoke:
        args.image_size, args.batch_size, args.steps, args.workers, args.n = 64, 4, 2, 1, 32
        args.compile = False
    device_name = "cuda" if has_gpu and not args.cpu_smoke else "cpu"
    os.chdir(ROOT)
    shards = ensure_shards(Path(args.workdir), args.n, args.image_size)
    trainer = build_trainer(args, shards, device_name)
    device = trainer.env.device
    memory: dict[str, float] = {}
    rates: dict[str, float] = {}
    with peak_memory(device, memory, "model only"):
        rates["model only"] = model_only(trainer, args, device)
    memory_trainer = build_trainer(args, shards, device_name, memory_loader_factory(args, device))
    rates["loop, memory"] = loop_on_memory(memory_trainer, args, device)
    with peak_memory(device, memory, "full pipeline"):
        rates["full pipeline"] = full_pipeline(trainer, args, device)
    if args.gpu_decode and args.clahe:
        print("gpu decode skipped: per-epoch CLAHE (--clahe) has no GPU kernel; build the shards with --clahe")
    elif args.gpu_decode:
        rates["gpu decode pipeline"], rates["gpu decode alone"] = gpu_decode_pipeline(args, shards, device_name,
                                                                                      device)
    rates["host decode, 1 core"] = host_decode_rate(shards)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"\n{gpu}: efficientnet_b0 at {args.image_size} px, batch {args.batch_size}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, channels_last, "
          f"compile {args.compile}, clahe {args.clahe}, {args.workers} workers, {args.steps} steps")
    for name, rate in rates.items():
        print(f"  {name:<24} {rate:9.1f} img/s")
    for name, gib in memory.items():
        print(f"  peak GPU memory, {name:<12} {gib:6.2f} GiB")
    share = rates["full pipeline"] / rates["model only"]
    print(f"  full pipeline / model only = {share:.2f} (target >= 0.90)")
    if args.image_size == 384:
        print(f"  v3 workload (54k images x 20 epochs) at the full-pipeline rate: "
              f"{54_000 * 20 / rates['full pipeline'] / 60:.1f} min (target <= 15 min, >= 1,200 img/s)")
    if args.json:
        args.json.write_text(json.dumps({"device": gpu, "rates": rates, "peak_gib": memory, "share": share}))
    if args.cpu_smoke:
        print("\nCPU smoke run only: every path executed; run on a CUDA GPU for real figures (nothing recorded).")
        return
    figures = (f"{gpu}, efficientnet_b0 {args.image_size} px, batch {args.batch_size}, bf16 autocast, "
               f"channels_last, compile {args.compile}, clahe {args.clahe}, {args.workers} workers, host load avg "
               f"{load_average():.1f}: " + ", ".join(f"{name} {rate:.0f} img/s" for name, rate in rates.items())
               + f"; full/model {share:.2f} (target 0.90); peak memory "
               + ", ".join(f"{name} {gib:.1f} GiB" for name, gib in memory.items()))
    if args.record:
        append_row("gpu_throughput", figures)


if __name__ == "__main__":
    main()

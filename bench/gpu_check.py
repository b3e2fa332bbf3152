"""The GPU measurement as one command: everything issue 18 asks of one H100/H200, in about 8 minutes.

    python bench/gpu_check.py                 # on a GPU machine: measures, prints, appends rows to RESULTS.md
    python bench/gpu_check.py --cpu-smoke     # no GPU: every part at toy size on the CPU, records nothing

Parts, each in its own process (so one failure or hang costs only its own row, and torch.compile or
DeepSpeed state never leaks into the next measurement), each under its own time limit:

  throughput 384 / 512, compile off / on
        bench/gpu_throughput.py: EfficientNet-B0 in bf16 autocast with channels_last; model only vs the
        full pipeline (shards -> workers -> pinned copy -> Trainer step), CPU (PIL) vs GPU (nvJPEG)
        decode, peak GPU memory;
  engines
        DDP and DeepSpeed ZeRO-2 on one GPU, the same initial weights and the same fixed batches: the
        two loss curves must agree (largest relative difference printed against a 2% bf16 tolerance),
        with each engine's images/s and peak memory;
  projection
        the users' v3 workload (about 54,000 images at 384 px x 20 epochs) at the measured full-pipeline
        rate, against the 15-minute / 1,200 img/s aim.

The rows name the GPU, date and host load. Nothing here is timed in the test suite: its CPU smoke path
runs there (tests/test_bench_smoke.py) to keep the script executable for the day a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import ROOT, append_row, load_average

HERE = Path(__file__).resolve().parent
V3_IMAGES, V3_EPOCHS = 54_000, 20
AIM_MINUTES, AIM_RATE = 15.0, 1_200.0
LOSS_TOLERANCE = 0.02
"""Largest relative loss difference accepted between DDP and ZeRO-2 under bf16 autocast."""


# ---------------------------------------------------------------- parts, run as child processes


def throughput_part(image_size: int, compile_model: bool, smoke: bool, workdir: Path, timeout: float) -> dict:
    """bench/gpu_throughput.py in a child process; its figures come back through a JSON file."""
    out = workdir / f"throughput-{image_size}-{int(compile_model)}.json"
    command = [sys.executable, str(HERE / "gpu_throughput.py"), "--no-record", "--json", str(out),
               "--workdir", str(workdir)]
    command += ["--cpu-smoke"] if smoke else ["--image-size", str(image_size)]
    command += ["--compile"] if compile_model else []
    return _child(command, out, timeout)


def engine_part(kind: str, smoke: bool, workdir: Path, timeout: float) -> dict:
    out = workdir / f"engine-{kind}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--part", "engine", "--engine", kind,
               "--json", str(out), "--workdir", str(workdir)] + (["--cpu-smoke"] if smoke else [])
    return _child(command, out, timeout)


def _child(command: list[str], out: Path, timeout: float) -> dict:
    started = time.monotonic()
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if run.returncode != 0 or not out.is_file():
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {run.returncode}: {tail[0][:300]}"}
    return {**json.loads(out.read_text()), "seconds": time.monotonic() - started}


def measure_engine(kind: str, smoke: bool, workdir: Path) -> dict:
    """Losses, images/s and peak memory of `steps` optimizer steps on fixed random batches (in this process)."""
    from gpu_throughput import build_trainer, ensure_shards, synchronize

    size, batch, steps = (64, 8, 4) if smoke else (384, 64, 30)
    device_name = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    if device_name == "cpu":  # one thread: both engines then sum in the same order, as one GPU's kernels do
        torch.set_num_threads(1)
    args = SimpleNamespace(image_size=size, batch_size=batch, steps=steps, workers=0, clahe=False, compile=False,
                           workdir=str(workdir), engine=kind)
    trainer = build_trainer(args, ensure_shards(workdir, 32, size), device_name)
    device, engine = trainer.env.device, trainer.engine
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, device=device, generator=generator),
                (torch.rand(batch, device=device, generator=generator) < 0.2).float()) for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    synchronize(device)
    started = time.perf_counter()
    for images, labels in batches:
        images = images.contiguous(memory_format=torch.channels_last)
        _, loss = engine.forward_backward(images, labels, trainer.loss_fn, sync=True)
        engine.optimizer_step()
        losses.append(loss.detach().float())
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"losses": [float(value) for value in losses], "img_s": steps * batch / seconds, "peak_gib": peak}


# ---------------------------------------------------------------- the summary


def loss_disagreement(first: list[float], second: list[float]) -> float:
    """Largest |a - b| / max(|a|, 1e-6) over the steps both curves have."""
    return max((abs(a - b) / max(abs(a), 1e-6) for a, b in zip(first, second, strict=False)), default=float("nan"))


def throughput_figures(name: str, result: dict) -> str:
    if "error" in result:
        return f"{name}: {result['error']}"
    rates = ", ".join(f"{key} {value:.0f}" for key, value in result["rates"].items())
    memory = ", ".join(f"{key} {value:.1f} GiB" for key, value in result["peak_gib"].items())
    return f"{name}: {rates} img/s; full/model {result['share']:.2f} (aim 0.90); peak {memory or 'n/a'}"


def projection(result: dict) -> str:
    if "error" in result:
        return "v3 projection: no 384 px full-pipeline figure"
    rate = result["rates"]["full pipeline"]
    minutes = V3_IMAGES * V3_EPOCHS / rate / 60
    verdict = "met" if minutes <= AIM_MINUTES else "MISSED"
    return (f"v3 workload ({V3_IMAGES:,} images x {V3_EPOCHS} epochs at 384 px) at {rate:.0f} img/s: "
            f"{minutes:.1f} min (aim <= {AIM_MINUTES:.0f} min, >= {AIM_RATE:,.0f} img/s: {verdict})")


def engines_figures(ddp: dict, zero: dict) -> str:
    if "error" in ddp or "error" in zero:
        return f"engines: ddp {ddp.get('error', 'ok')}, zero2 {zero.get('error', 'ok')}"
    gap = loss_disagreement(ddp["losses"], zero["losses"])
    agree = "agree" if gap <= LOSS_TOLERANCE else "DISAGREE"
    return (f"engines (same batches, {len(ddp['losses'])} steps): DDP {ddp['img_s']:.0f} img/s, peak "
            f"{ddp['peak_gib']:.1f} GiB; ZeRO-2 {zero['img_s']:.0f} img/s, peak {zero['peak_gib']:.1f} GiB; "
            f"ZeRO-2/DDP speed {zero['img_s'] / ddp['img_s']:.2f}; losses {agree} (max relative gap {gap:.4f}, "
            f"tolerance {LOSS_TOLERANCE})")


def run_all(args) -> list[str]:
    deadline = time.monotonic() + args.budget_s
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def left(share: float) -> float:
        return max(30.0, (deadline - time.monotonic()) * share)

    sizes = [(384, False), (512, False), (384, True), (512, True)]
    if args.cpu_smoke:
        sizes = [(64, False)]
    results = {}
    for index, (size, compiled) in enumerate(sizes):
        results[(size, compiled)] = throughput_part(size, compiled, args.cpu_smoke, workdir,
                                                    left(1 / (len(sizes) - index + 1)))
    ddp = engine_part("ddp", args.cpu_smoke, workdir, left(0.5))
    zero = engine_part("deepspeed", args.cpu_smoke, workdir, left(1.0))
    lines = [throughput_figures(f"{size} px, compile {'on' if compiled else 'off'}", result)
             for (size, compiled), result in results.items()]
    lines.append(engines_figures(ddp, zero))
    lines.append(projection(results.get((384, False), {"error": "not run"})))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU; records nothing")
    parser.add_argument("--budget-s", type=float, default=480, help="wall-clock budget of all parts together")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dist_train_gpu_check"))
    parser.add_argument("--part", choices=("engine",), help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=("ddp", "deepspeed"), default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.part == "engine":
        args.json.write_text(json.dumps(measure_engine(args.engine, args.cpu_smoke, Path(args.workdir))))
        return
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("no CUDA GPU visible: running the CPU smoke path (--cpu-smoke), which records nothing")
        args.cpu_smoke = True
    lines = run_all(args)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu_smoke else "CPU (smoke)"
    print(f"\n{gpu}, host load avg {load_average():.1f}")
    for line in lines:
        print("  " + line)
    if args.cpu_smoke:
        print("\nCPU smoke run only: every part executed; run on a CUDA GPU for real figures (nothing recorded).")
        return
    for line in lines:
        append_row("gpu_check", f"{gpu}, bf16 autocast, channels_last, host load avg {load_average():.1f}: {line}")


if __name__ == "__main__":
    main()

"""Time to accuracy of the v1, v2 and v3 presets, scaled down to the synthetic set on 2 CPU ranks.

    python bench/time_to_accuracy.py [--presets v1,v2,v3] [--epochs 6] [--nproc 2] [--image-size 64]
                                     [--backbone resnet18] [--batch-size 16] [--run-root DIR]

Each preset keeps its recipe (head, loss, optimizer and LR, schedule, augmentation, unfreeze phases,
TTA, health rules) and is scaled the way `make demo` scales v3 (configs/demo.yaml): the demo's shards
(96 px synthetic fundus photographs, 1,200 train / 400 val; generated here when absent), 64 px input,
resnet18 from scratch, batch 16, one DataLoader worker, and --epochs epochs with the unfreeze epochs
scaled by the same factor as the epoch count (and, with --lr-scale, every learning rate multiplied:
the presets' rates are meant for longer runs; `make demo` gives v3 1e-3, 13.3 times its 7.5e-5).
Each run goes through `launch/train.py --nproc-per-node 2`, one after another; the figures come from
the runs' metrics.jsonl:

- wall time from the launch command to the first evaluation whose validation alpha >= 0.80 (and
  0.90), and that evaluation's epoch (0-based, as the loop logs it);
- the epoch of the first positive prediction, on the training data (the loop's
  epochs_to_first_positive) and on the validation set (first eval with a predicted positive).

The default scale takes about 10 minutes on 2 busy cores; run it in the background (nohup).
Appends one dated row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, append_row, load_average

PRESETS = {"v1": "configs/airogs_v1_baseline.yaml", "v2": "configs/airogs_v2.yaml", "v3": "configs/airogs_v3.yaml"}
PRESET_EPOCHS = {"v1": 30, "v2": 15, "v3": 20}
"""The presets' own epoch counts: their unfreeze epochs are scaled by epochs / these."""
UNFREEZE = {"v1": [{"from_epoch": 0, "train": "head"}],
            "v2": [{"from_epoch": 0, "train": "head", "lr": 1.0e-4},
                   {"from_epoch": 5, "train": "last_50_layers", "lr": 1.0e-5}],
            "v3": [{"from_epoch": 0, "train": "all"}]}
"""The presets' unfreeze phases (copied from configs/*.yaml, checked against them at start)."""
THRESHOLDS = (0.80, 0.90)
DEMO_SHARDS = ROOT / "data" / "shards" / "synthetic"


def ensure_shards(workdir: Path) -> Path:
    """The demo's shards if `make demo` made them, else the same recipe built under workdir."""
    if (DEMO_SHARDS / "manifest.json").is_file():
        return DEMO_SHARDS
    shards = workdir / "shards"
    if not (shards / "manifest.json").is_file():
        images = workdir / "images"
        python = sys.executable
        subprocess.run([python, "shards/synthetic.py", "--out", str(images), "--n", "1600", "--positive-rate",
                        "0.2", "--size", "160", "--seed", "0"], cwd=ROOT, check=True)
        subprocess.run([python, "shards/build.py", "--images", f"{images}/0", "--labels", f"{images}/labels.csv",
                        "--out", str(shards), "--size", "96", "--shard-size", "200", "--val-fraction", "0.25",
                        "--workers", "2"], cwd=ROOT, check=True)
    return shards


def check_unfreeze_matches_presets() -> None:
    """The scaled phases below are derived from the presets' own; fail loudly if a preset changed."""
    from dist_train.config import load_config

    for preset, path in PRESETS.items():
        phases = [{k: v for k, v in vars(p).items() if k in ("from_epoch", "train", "lr") and v is not None}
                  for p in load_config(ROOT / path).unfreeze.phases]
        if phases != UNFREEZE[preset]:
            raise SystemExit(f"{path}: unfreeze phases are now {phases}; update UNFREEZE in {__file__}")


def scaled_phases(preset: str, epochs: int, lr_scale: float) -> list[dict]:
    factor = epochs / PRESET_EPOCHS[preset]
    phases = [{**phase, "from_epoch": round(phase["from_epoch"] * factor)} for phase in UNFREEZE[preset]]
    return [{**phase, "lr": phase["lr"] * lr_scale} if "lr" in phase else phase for phase in phases]


def run_name(preset: str, lr_scale: float) -> str:
    return f"tta-{preset}" + ("" if lr_scale == 1 else f"-lrx{lr_scale:g}")


def overrides(preset: str, args: argparse.Namespace, shards: Path) -> list[str]:
    from dist_train.config import load_config

    phases = json.dumps(scaled_phases(preset, args.epochs, args.lr_scale))
    lr = load_config(ROOT / PRESETS[preset]).optim.lr * args.lr_scale
    return [f"name={run_name(preset, args.lr_scale)}", f"run_root={args.run_root}", f"optim.lr={lr:g}",
            f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
            f"data.image_size={args.image_size}", "data.workers=1", "data.shuffle_buffer=128",
            f"model.backbone={args.backbone}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
            "train.device=cpu", "train.log_every_steps=10", f"unfreeze.phases={phases}",
            "tracking.wandb.enabled=false", "tracking.html_report=false", "tracking.progress=none",
            "checkpoint.keep_last=1"]


def run_preset(preset: str, args: argparse.Namespace, shards: Path) -> dict:
    run_dir = Path(args.run_root) / run_name(preset, args.lr_scale)
    command = [sys.executable, "launch/train.py", "--nproc-per-node", str(args.nproc), "--config", PRESETS[preset],
               "--resume", "none", "--set", *overrides(preset, args, shards)]
    return {"preset": preset, **timed_run(command, run_dir)}


def timed_run(command: list[str], run_dir: Path) -> dict:
    """Run one training command (its output to RUN_DIR.log) and read its figures from metrics.jsonl."""
    shutil.rmtree(run_dir, ignore_errors=True)
    log_path = run_dir.with_name(run_dir.name + ".log")
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    finished = time.time()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    evals = [r for r in records if r["kind"] == "eval"]
    summary = next((r for r in records if r["kind"] == "summary"), {})
    result = {"exit": code, "total_s": finished - started, "log": str(log_path),
              "evals": [(r["epoch"], round(r["alpha"], 3)) for r in evals],
              "best_alpha": max((r["alpha"] for r in evals), default=None),
              "train_first_positive": summary.get("epochs_to_first_positive"),
              "val_first_positive": next((r["epoch"] for r in evals if r["predicted_positives"] > 0), None),
              "epochs_done": summary.get("epochs_done")}
    for threshold in THRESHOLDS:
        hit = next((r for r in evals if r["alpha"] >= threshold), None)
        result[threshold] = None if hit is None else (hit["epoch"], hit["time"] - started)
    return result


def describe(result: dict) -> str:
    parts = []
    for threshold in THRESHOLDS:
        hit = result[threshold]
        parts.append(f"α≥{threshold:.2f} " + ("not reached" if hit is None else f"epoch {hit[0]} at {hit[1]:.0f} s"))
    best = "-" if result["best_alpha"] is None else f"{result['best_alpha']:.3f}"
    return (f"{result['preset']}: {', '.join(parts)}; best α {best} in {result['epochs_done']} epochs "
            f"({result['total_s']:.0f} s); first positive epoch train {result['train_first_positive']}, "
            f"val {result['val_first_positive']}" + ("" if result["exit"] == 0 else f"; exit {result['exit']}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="v1,v2,v3")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply the presets' learning rates (13.33 gives v3 the demo's 1e-3)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dist_train_bench")
    parser.add_argument("--run-root", default=None, help="default: WORKDIR/tta-runs")
    parser.add_argument("--no-record", dest="record", action="store_false", help="print only (smoke runs)")
    args = parser.parse_args()
    args.run_root = str(Path(args.run_root or args.workdir / "tta-runs").resolve())
    Path(args.run_root).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    check_unfreeze_matches_presets()
    shards = ensure_shards(args.workdir)
    loads, results = [load_average()], []
    for preset in args.presets.split(","):
        result = run_preset(preset.strip(), args, shards)
        loads.append(load_average())
        print(describe(result), flush=True)
        print(f"  α per epoch: {result['evals']}  (log {result['log']})", flush=True)
        results.append(result)
    figures = (f"time to accuracy, synthetic demo shards (1,200 train / 400 val, 20% RG), {args.nproc} CPU ranks, "
               f"{args.backbone} from scratch at {args.image_size} px, batch {args.batch_size}, {args.epochs} "
               f"epochs, unfreeze epochs scaled, preset LRs x {args.lr_scale:g}, "
               f"load avg {min(loads):.1f}–{max(loads):.1f}: "
               + "; ".join(describe(r) for r in results))
    if args.record:
        append_row("time_to_accuracy", figures)


if __name__ == "__main__":
    main()

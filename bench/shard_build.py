"""Shard-build throughput beside the raw JPEG decode rates of the same files.

    python bench/shard_build.py [--n 200] [--size 2000] [--target 512] [--workers CORES] [--repeats 2]
                                [--workdir DIR]

Generates (or reuses, under --workdir) synthetic fundus photographs of about size x size,
then times in one run: a full PIL decode of every file, a draft-mode (DCT-scaled) decode
to about the target size, and shards/build.py's build at 1 and at --workers processes.
Rounds are interleaved and the best rate of each kind counts, since the machine is shared.
Prints the rates and ratios and appends a dated row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import append_row
from PIL import Image

from dist_train.shards.build import BuildOptions, build
from dist_train.shards.synthetic import generate


def decode_rate(paths: list[Path], draft_side: int | None) -> float:
    """Images per second of one process decoding every file to RGB pixels."""
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            if draft_side:
                image.draft("RGB", (draft_side, draft_side))
            image.convert("RGB")
    return len(paths) / (time.perf_counter() - started)


def build_rate(images: Path, out: Path, target: int, workers: int) -> float:
    """Images per second of a fresh build (no shard to reuse), one shard per ~worker share."""
    shutil.rmtree(out, ignore_errors=True)
    count = len(list(images.glob("*/*.jpg")))
    options = BuildOptions(size=target, shard_size=max(1, count // (4 * workers)), workers=workers)
    report = build([images], images / "labels.csv", out, options)
    return count / report.seconds


def ensure_images(workdir: Path, n: int, size: int) -> Path:
    images = workdir / f"fundus-n{n}-s{size}"
    if not (images / "labels.csv").exists():
        started = time.perf_counter()
        generate(images, n, positive_rate=0.2, size=size, seed=0)
        print(f"generated {n} images of ~{size} px in {time.perf_counter() - started:.0f} s")
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=2000, help="approximate side of the raw photographs")
    parser.add_argument("--target", type=int, default=512, help="side of the preprocessed shard images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best counts")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dist_train_bench")
    args = parser.parse_args()
    images = ensure_images(args.workdir, args.n, args.size)
    paths = sorted(images.glob("*/*.jpg"))
    megapixels = sum(w * h for w, h in (Image.open(p).size for p in paths)) / len(paths) / 1e6
    load = os.getloadavg()[0]
    rates = {"full": [], "draft": [], "single": [], "parallel": []}
    for _ in range(args.repeats):
        rates["full"].append(decode_rate(paths, None))
        rates["draft"].append(decode_rate(paths, round(args.target * 1.25)))
        rates["single"].append(build_rate(images, args.workdir / "shards", args.target, 1))
        rates["parallel"].append(build_rate(images, args.workdir / "shards", args.target, args.workers))
    full, draft, single, parallel = (max(r) for r in rates.values())
    figures = (f"{len(paths)} synthetic JPEGs of {megapixels:.1f} Mpx -> {args.target} px, best of "
               f"{args.repeats}, load avg {load:.1f}: full decode {full:.1f} img/s, draft decode {draft:.1f} "
               f"img/s ({draft / full:.1f}x), build 1 worker {single:.1f} img/s ({single / full:.2f}x full "
               f"decode), build {args.workers} workers {parallel:.1f} img/s ({parallel / single:.2f}x 1 worker)")
    print(figures)
    append_row("shard_build", figures)


if __name__ == "__main__":
    main()

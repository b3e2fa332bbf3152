"""What CLAHE costs per epoch in the Decoder, beside shards built with it once (`shards/build.py --clahe`).

    python bench/clahe_cost.py [--n 200] [--raw-size 800] [--sizes 384 512] [--workers 2] [--batch-size 32]
                               [--repeats 3] [--workdir DIR] [--no-record]

Generates (or reuses, under --workdir) --n synthetic fundus photographs of about --raw-size px and, at each
of --sizes, builds two shard sets of them afresh: raw, and with the v3 recipe's CLAHE applied by the builder
(timed: the one-off cost). Then, in interleaved rounds (the best of --repeats counts: the machine is shared),
one training epoch of each through the product's TrainStream + make_loader with --workers workers and the v3
recipe's augmentation: (a) raw shards with CLAHE in the Decoder, as data.clahe=true runs; (b) CLAHE shards with
data.clahe=false. Also, in one thread, the Decoder's milliseconds per image on each. Prints the figures, the
per-epoch saving and the epochs after which the build's extra time is paid back, and appends a dated row to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import ROOT, append_row, load_average
from PIL import Image

from dist_train.config import DataConfig, load_config
from dist_train.data.augment import Augmenter
from dist_train.data.preprocess import Clahe
from dist_train.data.stream import Decoder, TrainStream, iterate_shard, make_loader, shard_urls
from dist_train.data.transforms import apply_clahe
from dist_train.shards.build import BuildOptions, build
from dist_train.shards.synthetic import generate

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
V3 = load_config(str(ROOT / "configs" / "airogs_v3.yaml"), []).data
"""The recommended recipe: its CLAHE (2.0, 8x8) and augmentation are what a CLAHE run pays for per epoch."""
CLAHE = Clahe(V3.clahe_clip_limit, V3.clahe_tile_grid)


def ensure_images(workdir: Path, n: int, raw_size: int) -> Path:
    images = workdir / f"fundus-n{n}-s{raw_size}"
    if not (images / "labels.csv").exists():
        generate(images, n, positive_rate=0.2, size=raw_size, seed=0)
    return images


def build_seconds(images: Path, out: Path, size: int, clahe: Clahe | None, workers: int) -> float:
    """A fresh build (nothing to reuse): the one-off cost of each kind of shard set."""
    shutil.rmtree(out, ignore_errors=True)
    count = len(list(images.glob("*/*.jpg")))
    options = BuildOptions(size=size, shard_size=max(1, count // (2 * workers)), workers=workers, val_fraction=0.0,
                           clahe=clahe)
    return build([images], images / "labels.csv", out, options).seconds


def epoch_rate(shards: Path, args, size: int, clahe: Clahe | None, epoch: int) -> float:
    """Images/s of one training epoch, worker start-up included (the loop starts workers every epoch)."""
    cfg = DataConfig(train_shards=str(shards / "train-*.tar"), image_size=size, workers=args.workers,
                     augment=V3.augment)
    decoder = Decoder(size, MEAN, STD, clahe, Augmenter(V3.augment))
    stream = TrainStream(shard_urls(cfg.train_shards), cfg, decoder, args.batch_size, rank=0, world_size=1, seed=0,
                         epoch=epoch, micro_batches=max(1, args.n // args.batch_size), workers=args.workers)
    started, images = time.perf_counter(), 0
    for batch in make_loader(stream, cfg, pin_memory=False):
        images += len(batch.images)
    return images / (time.perf_counter() - started)


def best_ms(function: Callable[[int], object], count: int, repeats: int = 5) -> float:
    """Milliseconds per call of function(0..count-1), best of `repeats` passes: the least disturbed one."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for index in range(count):
            function(index)
        best = min(best, (time.perf_counter() - started) / count * 1000)
    return best


def stage_ms(raw: Path, built: Path, size: int, count: int = 16) -> dict[str, float]:
    """In this process, one thread: the Decoder on raw shards with CLAHE, on CLAHE shards without, and CLAHE alone."""
    torch.set_num_threads(1)
    samples = {kind: [s for url in shard_urls(str(folder / "train-*.tar")) for s in iterate_shard(url)][:count]
               for kind, folder in (("raw", raw), ("built", built))}
    with_clahe = Decoder(size, MEAN, STD, CLAHE, Augmenter(V3.augment))
    without = Decoder(size, MEAN, STD, None, Augmenter(V3.augment))
    pixels = [np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples["raw"]]
    count = len(pixels)
    return {"ms_per_epoch": best_ms(lambda i: with_clahe(samples["raw"][i], i), count),
            "ms_built": best_ms(lambda i: without(samples["built"][i], i), count),
            "ms_clahe": best_ms(lambda i: apply_clahe(pixels[i], *CLAHE), count)}


def measure(args, images: Path) -> tuple[dict, list[float]]:
    """Per size: build seconds of each kind, then interleaved epoch rounds and one-thread Decoder costs."""
    loads = [load_average()]
    sets = {size: {"raw": args.workdir / f"raw-{size}", "built": args.workdir / f"clahe-{size}"} for size in args.sizes}
    figures = {size: {"build_raw": build_seconds(images, sets[size]["raw"], size, None, args.workers),
                      "build_clahe": build_seconds(images, sets[size]["built"], size, CLAHE, args.workers),
                      "per_epoch": [], "built": []} for size in args.sizes}
    for round_index in range(args.repeats):
        for size in args.sizes:
            figures[size]["per_epoch"].append(epoch_rate(sets[size]["raw"], args, size, CLAHE, round_index))
            figures[size]["built"].append(epoch_rate(sets[size]["built"], args, size, None, round_index))
            loads.append(load_average())
            print(f"round {round_index + 1}, {size} px: per-epoch CLAHE {figures[size]['per_epoch'][-1]:.1f} img/s, "
                  f"CLAHE shards {figures[size]['built'][-1]:.1f} img/s", flush=True)
    for size in args.sizes:
        figures[size].update(stage_ms(sets[size]["raw"], sets[size]["built"], size))
    return figures, loads


def size_sentence(size: int, f: dict, n: int) -> str:
    """One size's figures: epoch rates, the saving per epoch, the build's extra cost and its break-even."""
    per_epoch, built = max(f["per_epoch"]), max(f["built"])
    saving_s = n / per_epoch - n / built
    extra_s = f["build_clahe"] - f["build_raw"]
    if extra_s <= 0:
        payback = "the CLAHE build took no longer"
    elif saving_s <= 0:
        payback = "no per-epoch saving measured to pay it back"
    else:
        payback = f"paid back after {extra_s / saving_s:.1f} epochs"
    return (f"{size} px: epoch per-epoch CLAHE {per_epoch:.1f} img/s vs CLAHE shards {built:.1f} img/s "
            f"({built / per_epoch:.2f}x, {saving_s:+.2f} s saved per epoch of {n}, "
            f"{saving_s / n * 1000:+.2f} ms/img); 1 thread best of 5: Decoder {f['ms_per_epoch']:.2f} vs "
            f"{f['ms_built']:.2f} ms/img, CLAHE alone {f['ms_clahe']:.2f} ms/img; "
            f"build raw {f['build_raw']:.1f} s, with CLAHE {f['build_clahe']:.1f} s "
            f"({extra_s / n * 1000:+.2f} ms/img once): {payback}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--raw-size", type=int, default=800, help="approximate side of the raw photographs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 512], help="shard and input sides")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best counts")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dist_train_bench_clahe")
    parser.add_argument("--no-record", dest="record", action="store_false", help="print only (smoke runs)")
    args = parser.parse_args()
    images = ensure_images(args.workdir, args.n, args.raw_size)
    figures, loads = measure(args, images)
    head = (f"{args.n} synthetic JPEGs of ~{args.raw_size} px, v3 recipe (CLAHE {CLAHE}, its augmentation), "
            f"{args.workers} workers, batch {args.batch_size}, best of {args.repeats} interleaved rounds, "
            f"load avg {min(loads):.1f}-{max(loads):.1f} (machine shared with other jobs)")
    row = head + ": " + "; ".join(size_sentence(size, figures[size], args.n) for size in args.sizes)
    print(row)
    if args.record:
        append_row("clahe_cost", row)


if __name__ == "__main__":
    main()

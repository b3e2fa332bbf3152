"""Images/s delivered to the training loop with a recipe's augmentation, beside its per-core ceiling and ImageFolder.

    python bench/data_throughput.py [--size 384] [--augment v3] [--clahe build] [--n 300] [--raw-size 700]
                                    [--workers 2] [--batch-size 32] [--repeats 3] [--workdir DIR] [--no-record]

Makes (or reuses, under --workdir) --n synthetic fundus photographs of about --raw-size px, builds
WebDataset shards of them at --size px (shards/build.py's preprocessing), and extracts the very same
shard JPEGs as individual files in an ImageFolder layout. The augmentation is the `data.augment` section
of configs/airogs_<--augment>.yaml (v3, the recommended recipe: rotation 15, zoom 0.1, brightness 0.8-1.2,
horizontal and vertical flips; v2: rotation 15, shift 0.1, brightness, hflip). A recipe with CLAHE (v3)
has it either in the shards (`--clahe build`, shards/build.py --clahe, the README's advice: the files
hold the CLAHE pixels, no epoch pays for it) or applied to every sample (`--clahe epoch`: raw shards,
CLAHE in our Decoder and in the torchvision transforms). Then, in interleaved rounds (the best of
--repeats counts, since the machine is shared), one epoch of each:

  (a) ours:        TrainStream + make_loader (dist_train/data/stream.py), --workers workers: shard read,
                   decode, CLAHE (epoch), the Augmenter on the 8-bit PIL image, then the batch's 8-bit
                   images normalised straight into a float32 batch in shared memory (Decoder.collate),
                   one of the few each worker reuses (dist_train/data/buffers.py), handed to the main process;
  (a0) ours as before that reuse: the same, but a new shared float batch for every batch (Decoder
                   reuse_buffers=False), whose pages the kernel faults in and zeroes each time;
  (b) torchvision: ImageFolder + DataLoader, same workers and batch size, the idiomatic transforms of the
                   same recipe (RandomAffine, ColorJitter brightness, flips on a uint8 tensor, ToDtype,
                   Normalize; CLAHE first with --clahe epoch);
  (c) decode-only: the same files decoded to RGB pixels by --workers DataLoader workers, nothing
                   returned: what JPEG decoding alone allows on these cores (for reference);
  (a') uint8 batches, normalised on the device: the product's TrainStream + make_loader, its decode and
                   Augmenter unchanged, but the decoder stops at the augmented uint8 pixels, so the workers
                   stack and ship uint8 batches (what GPU runs do: the device normalises; not included here).
  (a) and (a') with one worker: the same loaders with workers=1, whose CPU time per image (the worker's
                   process_time at each batch, steady) is the work of the whole pipeline (shard read, shuffle
                   buffer, decode, augmentation, batching, hand-over), not of the stages timed one by one;
                   (a)/that ceiling is how well the workers share the cores.

The per-core ceiling of (a) is min(workers, cores) x 1 / (its per-image CPU work), the work measured in one
thread: the 8-bit whole-sample decoder plus its share of normalising the batch into a reused shared float
batch (what a worker pays to hand a batch over); likewise for (a') with the uint8 decoder and its uint8 batch
stacked into a reused shared batch. The earlier hand-overs (into a new shared batch each time, as torch's
default_collate allocates; a float tensor per image, stacked into shared memory, or stacked and then moved
there) are printed beside it.
Each rate is given per epoch (worker start-up included, as every epoch pays it) and steady (after every
worker's first batch: what a long epoch approaches). Prints the rates, (a)/ceiling (target >= 0.85) and
(a)/(b) (target >= 1.5), the same for (a'), and a per-stage cost breakdown in one thread (decode, CLAHE,
Augmenter and its affine, to_normalised_tensor; per batch of 32 the stacks, their shared-memory moves, a
float batch stacked straight into shared memory as default_collate does in a worker, and the uint8
images normalised into a new and into a reused shared float batch, the product's way). From these it says
what bounds the pipeline. Appends a dated row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from common import ROOT, append_row, load_average, verdict
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.datasets import ImageFolder

from dist_train import compat
from dist_train.config import AugmentConfig, DataConfig, load_config
from dist_train.data.augment import Augmenter, to_normalised_tensor
from dist_train.data.decode import normalise_into
from dist_train.data.preprocess import Clahe
from dist_train.data.stream import Decoder, TrainStream, make_loader, shard_urls
from dist_train.data.transforms import apply_clahe
from dist_train.shards.build import BuildOptions, build
from dist_train.shards.synthetic import generate

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""efficientnet_b0's normalisation (timm resolves ImageNet's)."""
BATCH = 32
"""Images per batch in the per-batch stage costs."""
DECODER, UINT8 = "Decoder (ours, whole sample)", "uint8 decoder, whole sample (a')"
FLOAT_SHM, UINT8_SHM = "stack float + move to shared memory (batch)", "stack uint8 + move to shared memory (batch)"
AFFINE = "  F.affine PIL, nearest (the recipes' default)"
SHARED = "stack float into shared memory, default_collate's way (batch)"
UINT8_SHARED = "stack uint8 into shared memory, default_collate's way (batch)"
INTO = "uint8 images normalised into a new shared float batch (batch)"
INTO_REUSED = "uint8 images normalised into a reused shared float batch (batch)"
UINT8_REUSED = "stack uint8 into a reused shared batch (batch)"


class Recipe:
    """What a recipe makes the input pipeline do: its augmentation, and CLAHE in the shards or per sample."""

    def __init__(self, name: str, clahe_at: str):
        data = load_config(str(ROOT / "configs" / f"airogs_{name}.yaml"), []).data
        self.name, self.augment = name, data.augment
        clahe = Clahe(data.clahe_clip_limit, data.clahe_tile_grid) if data.clahe else None
        self.build_clahe = clahe if clahe_at == "build" else None
        self.epoch_clahe = clahe if clahe_at == "epoch" else None
        self.clahe_text = f"CLAHE {clahe} at {clahe_at}" if clahe else "no CLAHE"

    def decoder(self, size: int, normalise: bool = True, reuse: bool = True) -> Decoder:
        return Decoder(size, MEAN, STD, self.epoch_clahe, Augmenter(self.augment), normalise=normalise,
                       reuse_buffers=reuse)

    def describe(self) -> str:
        a = self.augment
        parts = [f"rotation {a.rotation_deg:g}", f"shift {a.shift:g}" if a.shift else "",
                 f"zoom {a.scale:g}" if a.scale else "", f"brightness {a.brightness[0]:g}-{a.brightness[1]:g}",
                 "hflip" if a.hflip else "", "vflip" if a.vflip else "", f"{a.interpolation} affine"]
        return f"{self.name} augmentation ({', '.join(p for p in parts if p)}), {self.clahe_text}"


# ---------------------------------------------------------------- data


def ensure_data(workdir: Path, args, recipe: Recipe) -> tuple[Path, Path]:
    """(shard folder, ImageFolder root holding the shards' own JPEG bytes as files)."""
    images = workdir / f"fundus-n{args.n}-s{args.raw_size}"
    tag = f"n{args.n}-s{args.raw_size}-{args.size}" + ("-clahe" if recipe.build_clahe else "")
    shards, files = workdir / f"shards-{tag}", workdir / f"files-{tag}"
    if not (images / "labels.csv").exists():
        started = time.perf_counter()
        generate(images, args.n, positive_rate=0.2, size=args.raw_size, seed=0)
        print(f"generated {args.n} images of ~{args.raw_size} px in {time.perf_counter() - started:.0f} s")
    if not (shards / "manifest.json").exists():
        shutil.rmtree(files, ignore_errors=True)
        options = BuildOptions(size=args.size, shard_size=max(1, args.n // 6), workers=2, val_fraction=0.0,
                               clahe=recipe.build_clahe)
        report = build([images], images / "labels.csv", shards, options)
        print(f"built shards at {args.size} px in {report.seconds:.0f} s")
    if not files.exists():
        extract_files(shards, files)
    return shards, files


def extract_files(shards: Path, files: Path) -> None:
    """The shards' JPEGs as <label>/<key>.jpg: ImageFolder reads the very bytes our stream decodes."""
    staging = files.with_name(files.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for url in shard_urls(str(shards / "train-*.tar")):
        with tarfile.open(url) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:
                if name.endswith(".jpg"):
                    key = name[: -len(".jpg")]
                    label = tar.extractfile(members[key + ".cls"]).read().decode().strip()
                    (staging / label).mkdir(parents=True, exist_ok=True)
                    (staging / label / name).write_bytes(tar.extractfile(members[name]).read())
    staging.rename(files)


# ---------------------------------------------------------------- the pipelines


def epoch_rates(loader, workers: int) -> tuple[float, float]:
    """Images/s over one epoch, worker start-up included (the loop restarts workers every epoch), and once
    every worker has delivered its first batch: the steady state that a long epoch approaches and the
    per-core ceiling describes (a 300-image epoch is 9 batches, of which start-up is a large part)."""
    started = time.perf_counter()
    arrivals, sizes = [], []
    for batch in loader:
        sizes.append(len(batch.images if hasattr(batch, "images") else batch[0]))
        arrivals.append(time.perf_counter())
    warm = min(max(workers, 1), len(arrivals) - 1)
    steady = sum(sizes[warm:]) / (arrivals[-1] - arrivals[warm - 1]) if warm > 0 else float("nan")
    return sum(sizes) / (arrivals[-1] - started), steady


class WorkerClock(IterableDataset):
    """The stream's batches, each with its worker's CPU time (all its threads, user + system) when it was made."""

    def __init__(self, stream: TrainStream):
        self.stream = stream

    def __iter__(self):
        for batch in self.stream:
            yield batch, time.process_time()


def one_worker_rates(shards: Path, args, epoch: int, decoder: Decoder, augment: AugmentConfig) -> tuple[float, float]:
    """Images per second of one worker's CPU time: over the epoch (its start-up included: a forked worker
    copies the parent's pages it touches), and steady (from its first batch to its last), the per-image work
    of everything a worker does (shard read, shuffle buffer, decode, augmentation, the batch into its reused
    shared tensor, the handle sent), where the stage costs time each stage on its own. The steady figure is
    the whole-pipeline ceiling's work, per epoch and steady alike, as the stage ceiling's is."""
    stream = ours_stream(shards, args, epoch, decoder, augment, workers=1)
    clocks, sizes = [], []
    for batch, clock in make_loader(WorkerClock(stream), stream.cfg, pin_memory=False):
        clocks.append(clock)
        sizes.append(len(batch.images))
    return sum(sizes) / clocks[-1], sum(sizes[1:]) / (clocks[-1] - clocks[0])


def ours_stream(shards: Path, args, epoch: int, decoder: Decoder, augment: AugmentConfig,
                workers: int | None = None) -> TrainStream:
    workers = args.workers if workers is None else workers
    cfg = DataConfig(train_shards=str(shards / "train-*.tar"), image_size=args.size, workers=workers,
                     augment=augment)
    return TrainStream(shard_urls(cfg.train_shards), cfg, decoder, args.batch_size, rank=0, world_size=1, seed=0,
                       epoch=epoch, micro_batches=args.n // args.batch_size, workers=workers)


def ours_loader(shards: Path, args, epoch: int, decoder: Decoder, augment: AugmentConfig) -> DataLoader:
    stream = ours_stream(shards, args, epoch, decoder, augment)
    return make_loader(stream, stream.cfg, pin_memory=False)


class PilClahe:
    """CLAHE on a PIL image with the product's apply_clahe: (b)'s counterpart of the Decoder's per-sample CLAHE."""

    def __init__(self, clahe: Clahe):
        self.clahe = clahe

    def __call__(self, image: Image.Image) -> Image.Image:
        return Image.fromarray(apply_clahe(np.asarray(image), self.clahe.clip_limit, self.clahe.tile_grid))


def torchvision_transform(recipe: Recipe) -> T.Compose:
    """The recipe's augmentation as one would write it with torchvision's v2 transforms."""
    a = recipe.augment
    steps: list[Callable] = [PilClahe(recipe.epoch_clahe)] if recipe.epoch_clahe else []
    steps += [T.PILToTensor(),
              T.RandomAffine(degrees=a.rotation_deg, translate=(a.shift, a.shift) if a.shift else None,
                             scale=(1 - a.scale, 1 + a.scale) if a.scale else None),
              T.ColorJitter(brightness=tuple(a.brightness))]
    steps += [T.RandomHorizontalFlip()] if a.hflip else []
    steps += [T.RandomVerticalFlip()] if a.vflip else []
    return T.Compose(steps + [T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


def torchvision_loader(files: Path, args, recipe: Recipe) -> DataLoader:
    dataset = ImageFolder(str(files), transform=torchvision_transform(recipe))
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      drop_last=True, prefetch_factor=2)


class DecodeOnly(Dataset):
    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        with Image.open(self.paths[index]) as image:
            image.convert("RGB").load()
        return 1


def decode_only_rate(files: Path, args) -> float:
    paths = sorted(files.glob("*/*.jpg"))
    loader = DataLoader(DecodeOnly(paths), batch_size=args.batch_size, num_workers=args.workers)
    started = time.perf_counter()
    images = sum(len(batch) for batch in loader)
    return images / (time.perf_counter() - started)


def measure_rates(shards: Path, files: Path, args, recipe: Recipe) -> tuple[dict[str, float], list[float]]:
    """Best images/s of each pipeline over interleaved rounds ("<key> steady": after start-up), and the loads seen."""
    ours, uint8 = recipe.decoder(args.size), recipe.decoder(args.size, normalise=False)
    fresh = recipe.decoder(args.size, reuse=False)
    loads = [load_average()]
    rates: dict[str, list[float]] = {}
    for round_index in range(args.repeats):
        found = {"a": epoch_rates(ours_loader(shards, args, round_index, ours, recipe.augment), args.workers),
                 "a0": epoch_rates(ours_loader(shards, args, round_index, fresh, recipe.augment), args.workers),
                 "b": epoch_rates(torchvision_loader(files, args, recipe), args.workers),
                 "c": (decode_only_rate(files, args), float("nan")),
                 "u8": epoch_rates(ours_loader(shards, args, round_index, uint8, recipe.augment), args.workers),
                 "a 1": one_worker_rates(shards, args, round_index, ours, recipe.augment),
                 "u8 1": one_worker_rates(shards, args, round_index, uint8, recipe.augment)}
        for key, (epoch, steady) in found.items():
            rates.setdefault(key, []).append(epoch)
            rates.setdefault(f"{key} steady", []).append(steady)
        loads.append(load_average())
        print(f"round {round_index + 1} (per epoch / steady): "
              + ", ".join(f"{key} {epoch:.1f} / {steady:.1f}" for key, (epoch, steady) in found.items())
              + " img/s", flush=True)
    return {key: max(values) for key, values in rates.items() if key != "c steady"}, loads


# ---------------------------------------------------------------- per-stage costs, one thread


def shared_batch(like: torch.Tensor, count: int) -> torch.Tensor:
    """An uninitialised batch of `count` tensors like `like`, in shared memory (the product's allocation)."""
    return compat.shared_empty((count, *like.shape), like.dtype)


def stack_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack straight into shared memory, as torch's default_collate does in a worker: one copy, not two."""
    return torch.stack(tensors, out=shared_batch(tensors[0], len(tensors)))


def normalise_into_shared(uint8s: list[torch.Tensor], like: torch.Tensor,
                          into: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's uint8 images converted into a shared float batch and normalised there in place
    (`decode.normalise_into`): a new one each time, or `into`, one the worker reuses (the product's hand-over,
    `Decoder.collate` into a `buffers.BatchBuffers` slot: no page to fault in and zero)."""
    return normalise_into(shared_batch(like, len(uint8s)) if into is None else into, uint8s, MEAN, STD)


def stage_functions(files: Path, size: int, recipe: Recipe, count: int) -> dict[str, Callable[[int], object]]:
    """Each stage the workers run, as a function of the sample index; '(batch)' ones act once per batch."""
    blobs = [p.read_bytes() for p in sorted(files.glob("*/*.jpg"))[:count]]
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    pixels = [np.asarray(p) for p in pil]
    augmenter, a = Augmenter(recipe.augment), recipe.augment
    affine = {"angle": 7.0, "translate": [int(0.05 * size), int(-0.03 * size)] if a.shift else [0, 0],
              "scale": 1.05 if a.scale else 1.0, "shear": [0.0, 0.0]}
    ours, uint8_decoder, tv = recipe.decoder(size), recipe.decoder(size, normalise=False), torchvision_transform(recipe)
    floats = [to_normalised_tensor(pixels[0], MEAN, STD)] * BATCH
    uint8s = [torch.from_numpy(pixels[0].copy()).permute(2, 0, 1).contiguous()] * BATCH
    clahe = PilClahe(recipe.epoch_clahe or Clahe(2.0, 8))
    reused_float, reused_uint8 = shared_batch(floats[0], BATCH), shared_batch(uint8s[0], BATCH)
    stages: dict[str, Callable[[int], object]] = {
        "PIL decode": lambda i: Image.open(io.BytesIO(blobs[i])).convert("RGB"),
        "CLAHE (per sample)": lambda i: clahe(pil[i]),
        "Augmenter (ours, PIL uint8)": lambda i: augmenter(pil[i], np.random.default_rng(i)),
        AFFINE: lambda i: F.affine(pil[i], **affine),
        "  (F.affine PIL, bilinear)": lambda i: F.affine(pil[i], **affine, interpolation=F.InterpolationMode.BILINEAR),
        "to_normalised_tensor": lambda i: to_normalised_tensor(pixels[i], MEAN, STD),
        DECODER: lambda i: ours({"jpg": blobs[i]}, i),
        UINT8: lambda i: uint8_decoder.worker_item({"jpg": blobs[i]}, i),
        "torchvision transforms (b)": lambda i: tv(pil[i]),
        "stack float (batch)": lambda i: torch.stack(floats),
        FLOAT_SHM: lambda i: torch.stack(floats).share_memory_(),
        SHARED: lambda i: stack_shared(floats),
        INTO: lambda i: normalise_into_shared(uint8s, floats[0]),
        INTO_REUSED: lambda i: normalise_into_shared(uint8s, floats[0], into=reused_float),
        "stack uint8 (batch)": lambda i: torch.stack(uint8s),
        UINT8_SHM: lambda i: torch.stack(uint8s).share_memory_(),
        UINT8_SHARED: lambda i: stack_shared(uint8s),
        UINT8_REUSED: lambda i: torch.stack(uint8s, out=reused_uint8),
    }
    if recipe.epoch_clahe is None:
        del stages["CLAHE (per sample)"]
    return stages


def stage_costs(files: Path, size: int, recipe: Recipe, count: int = 24) -> dict[str, float]:
    """Milliseconds per image (per batch of BATCH for '(batch)' stages), best of 3, in one thread."""
    torch.set_num_threads(1)
    count = min(count, len(list(files.glob("*/*.jpg"))))
    costs = {}
    for name, function in stage_functions(files, size, recipe, count).items():
        calls = 4 if "(batch)" in name else count
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for index in range(calls):
                function(index)
            best = min(best, (time.perf_counter() - started) / calls * 1000)
        costs[name] = best
    return costs


# ---------------------------------------------------------------- what the figures mean


def work_ms(costs: dict[str, float]) -> dict[str, float]:
    """Per-image CPU work (ms, one thread) of each way a worker can hand a batch over: the decoder plus its
    share of the batch's hand-over into shared memory. "a" and "u8" are what the product runs (8-bit images
    normalised into a shared float batch the worker reuses; a uint8 batch stacked into one); the others are
    the earlier hand-overs (into a new shared batch each time; a float tensor per image, stacked into shared
    memory, or stacked and then moved), measured in the same process."""
    return {"a": costs[UINT8] + costs[INTO_REUSED] / BATCH, "u8": costs[UINT8] + costs[UINT8_REUSED] / BATCH,
            "normalised into a new shared batch each time": costs[UINT8] + costs[INTO] / BATCH,
            "float per image, stacked into shared memory": costs[DECODER] + costs[SHARED] / BATCH,
            "float per image, plain stack, then moved to shared memory": costs[DECODER] + costs[FLOAT_SHM] / BATCH}


def ratios(best: dict[str, float], costs: dict[str, float], workers: int) -> dict[str, float]:
    """Each rate against its per-core ceiling (min(workers, cores) x 1 / its work) and against (b), per epoch
    and in the steady state."""
    cores = min(workers, os.cpu_count() or 1)
    work = work_ms(costs)
    found = {}
    for key in ("a", "u8"):
        for phase in ("", " steady"):
            found[f"{key}{phase}/ceiling"] = best[key + phase] * work[key] / (cores * 1000)
            found[f"{key}{phase}/b"] = best[key + phase] / best["b" + phase]
            found[f"{key}{phase}/whole"] = best[key + phase] / (cores * best[f"{key} 1 steady"])
    for phase in ("", " steady"):
        found[f"a{phase}/a0"] = best["a" + phase] / best["a0" + phase]
    return found


def whole_pipeline_text(best: dict[str, float], r: dict[str, float], workers: int) -> str:
    """The same pipelines with one worker (its CPU time per image): the work of everything a worker does,
    shard read, shuffle buffer and batching included, where the stage costs time each stage on its own."""
    cores = min(workers, os.cpu_count() or 1)
    parts = []
    for key, name in (("a", "(a)"), ("u8", "(a')")):
        ms = 1000 / best[f"{key} 1 steady"]
        parts.append(f"{name} {ms:.2f} ms/img, ceiling {cores} x 1/{ms:.2f} ms = {cores * 1000 / ms:.0f} img/s, "
                     f"{name}/that {r[key + '/whole']:.2f} per epoch, {r[key + ' steady/whole']:.2f} steady")
    return "whole pipeline, one worker's CPU time (workers=1, shard read to batch sent): " + "; ".join(parts)


def rate_text(best: dict[str, float], key: str) -> str:
    return f"{best[key]:.1f} img/s per epoch, {best[key + ' steady']:.1f} steady"


def bound_sentence(costs: dict[str, float], workers: int) -> str:
    """What bounds (a): its per-image worker work split into stages, and what the candidate hand-overs save."""
    cores = min(workers, os.cpu_count() or 1)
    parts = {"decode": costs["PIL decode"], "CLAHE": costs.get("CLAHE (per sample)", 0.0),
             "PIL augmentation": costs["Augmenter (ours, PIL uint8)"],
             "normalising into the reused shared float batch": costs[INTO_REUSED] / BATCH}
    parts = {name: ms for name, ms in parts.items() if ms}
    total = sum(parts.values())
    split = ", ".join(f"{name} {ms:.2f} ms ({ms / total:.0%})" for name, ms in parts.items())
    largest = max(parts, key=lambda name: parts[name])
    candidates = ", ".join(f"{name} {ms:.2f} ms/img (ceiling {cores * 1000 / ms:.0f} img/s)"
                           for name, ms in work_ms(costs).items() if name not in ("a", "u8"))
    return (f"bound: the workers' per-image CPU work, {total:.2f} ms in stages ({split}), led by {largest}; "
            f"earlier float hand-overs: {candidates}; the nearest PIL affine costs {costs[AFFINE]:.2f} ms "
            f"(bilinear {costs['  (F.affine PIL, bilinear)']:.2f} ms)")


def figures_text(args, recipe: Recipe, best: dict[str, float], loads: list[float], costs: dict[str, float]) -> str:
    """The RESULTS.md row: rates, both targets with their verdicts, the per-stage costs, the bound."""
    cores, work, r = min(args.workers, os.cpu_count() or 1), work_ms(costs), ratios(best, costs, args.workers)
    clahe = f", CLAHE {costs['CLAHE (per sample)']:.2f} ms" if "CLAHE (per sample)" in costs else ""
    return (f"{args.n} synthetic JPEGs at {args.size} px, {recipe.describe()}, {args.workers} workers, batch "
            f"{args.batch_size}, best of {args.repeats} (per epoch: worker start-up included, "
            f"{args.n // args.batch_size} batches; steady: after every worker's first batch), load avg "
            f"{min(loads):.1f}-{max(loads):.1f}: (a) ours {rate_text(best, 'a')}; (a0) ours with a new shared "
            f"batch per batch (before the reuse) {rate_text(best, 'a0')}, (a)/(a0) {r['a/a0']:.2f} per epoch, "
            f"{r['a steady/a0']:.2f} steady; per-core ceiling {cores} x "
            f"1/{work['a']:.2f} ms = {cores * 1000 / work['a']:.1f} img/s; (b) torchvision ImageFolder "
            f"{rate_text(best, 'b')}; (c) decode-only {best['c']:.1f} img/s; (a)/ceiling {r['a/ceiling']:.2f} per "
            f"epoch, {r['a steady/ceiling']:.2f} steady (target 0.85, {verdict(r['a/ceiling'], 0.85)} / "
            f"{verdict(r['a steady/ceiling'], 0.85)}); (a)/(b) {r['a/b']:.2f} per epoch, {r['a steady/b']:.2f} "
            f"steady (target 1.5, {verdict(r['a/b'], 1.5)} / {verdict(r['a steady/b'], 1.5)}); (a') uint8 "
            f"batches normalised on the device {rate_text(best, 'u8')}, ceiling {cores * 1000 / work['u8']:.1f} "
            f"img/s ((a')/ceiling {r['u8/ceiling']:.2f} / {r['u8 steady/ceiling']:.2f}, (a')/(b) {r['u8/b']:.2f} / "
            f"{r['u8 steady/b']:.2f}); per image 1 thread: decode {costs['PIL decode']:.2f} ms{clahe}, Augmenter "
            f"{costs['Augmenter (ours, PIL uint8)']:.2f} ms, to_normalised_tensor {costs['to_normalised_tensor']:.2f}"
            f" ms, our Decoder {costs[DECODER]:.2f} ms, uint8 decoder {costs[UINT8]:.2f} ms, torchvision transforms "
            f"{costs['torchvision transforms (b)']:.2f} ms; per batch of {BATCH}: stack float "
            f"{costs['stack float (batch)']:.0f} ms (with the move to shared memory {costs[FLOAT_SHM]:.0f} ms; "
            f"stacked into shared memory {costs[SHARED]:.0f} ms; uint8 normalised into a new shared batch "
            f"{costs[INTO]:.0f} ms, into a reused one {costs[INTO_REUSED]:.0f} ms), stack uint8 "
            f"{costs['stack uint8 (batch)']:.0f} ms (with the move {costs[UINT8_SHM]:.0f} ms, into a reused shared "
            f"batch {costs[UINT8_REUSED]:.0f} ms); {whole_pipeline_text(best, r, args.workers)}; "
            f"{bound_sentence(costs, args.workers)}")


def print_summary(args, best: dict[str, float], costs: dict[str, float]) -> None:
    cores, work, r = min(args.workers, os.cpu_count() or 1), work_ms(costs), ratios(best, costs, args.workers)
    names = {"a": "(a) ours (TrainStream + make_loader)", "a0": "(a0) ours, a new shared batch per batch",
             "b": "(b) torchvision ImageFolder + DataLoader",
             "c": "(c) decode-only", "u8": "(a') uint8 batches, normalised on the device"}
    for key, name in names.items():
        steady = f", {best[key + ' steady']:7.1f} steady" if key + " steady" in best else ""
        print(f"  {name:<46} {best[key]:7.1f} img/s per epoch{steady}")
    print(f"  per-core ceiling of (a): {cores} cores x 1/work = {cores * 1000 / work['a']:.1f} img/s; "
          f"of (a'): {cores * 1000 / work['u8']:.1f} img/s")
    for key, label, target in (("ceiling", "(a)/ceiling", 0.85), ("b", "(a)/(b)", 1.5)):
        epoch, steady = r[f"a/{key}"], r[f"a steady/{key}"]
        print(f"  {label} = {epoch:.2f} per epoch, {steady:.2f} steady (target >= {target}: "
              f"{verdict(epoch, target)} / {verdict(steady, target)})")
    print(f"  (a')/ceiling = {r['u8/ceiling']:.2f} / {r['u8 steady/ceiling']:.2f}, (a')/(b) = {r['u8/b']:.2f} / "
          f"{r['u8 steady/b']:.2f}")
    print(f"  (a)/(a0) = {r['a/a0']:.2f} per epoch, {r['a steady/a0']:.2f} steady (reused shared batches against a "
          f"new one per batch)")
    print(f"  {whole_pipeline_text(best, r, args.workers)}")
    print(f"\ncost in one thread (ms per image; '(batch)' lines per batch of {BATCH}):")
    for name, ms in costs.items():
        print(f"  {name:<62} {ms:7.2f}")
    print("\n" + bound_sentence(costs, args.workers))


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384, help="side of the shard images and of the input")
    parser.add_argument("--augment", choices=("v2", "v3"), default="v3",
                        help="whose data.augment section (configs/airogs_<name>.yaml)")
    parser.add_argument("--clahe", choices=("build", "epoch"), default="build",
                        help="for a recipe with CLAHE: in the shards (shards/build.py --clahe) or per sample")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--raw-size", type=int, default=700, help="approximate side of the raw photographs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best counts")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dist_train_bench")
    parser.add_argument("--no-record", dest="record", action="store_false", help="print only (smoke runs)")
    args = parser.parse_args()
    if args.n < args.batch_size:
        print(f"data_throughput: --n {args.n} is fewer than one batch of --batch-size {args.batch_size}: give --n "
              f"of at least {args.batch_size}", file=sys.stderr)
        raise SystemExit(2)
    return args


def main() -> None:
    args = parse_args()
    recipe = Recipe(args.augment, args.clahe)
    shards, files = ensure_data(args.workdir, args, recipe)
    best, loads = measure_rates(shards, files, args, recipe)
    costs = stage_costs(files, args.size, recipe)
    print(f"\n{args.n} images at {args.size} px, {recipe.describe()}, {args.workers} workers, batch "
          f"{args.batch_size}, best of {args.repeats}, load avg {min(loads):.1f}-{max(loads):.1f}")
    print_summary(args, best, costs)
    if args.record:
        append_row("data_throughput", figures_text(args, recipe, best, loads, costs))


if __name__ == "__main__":
    main()

"""Images/s delivered to the training loop at 512 px with the v2 augmentation, beside the alternatives.

    python bench/data_throughput.py [--n 300] [--raw-size 700] [--size 512] [--workers 2] [--batch-size 32]
                                    [--repeats 3] [--workdir DIR]

Makes (or reuses, under --workdir) --n synthetic fundus photographs of about --raw-size px, builds
WebDataset shards of them at --size px (shards/build.py's preprocessing), and extracts the very same
shard JPEGs as individual files in an ImageFolder layout. Then, in interleaved rounds (the best of
--repeats counts, since the machine is shared), one epoch of each:

  (a) ours:        TrainStream + make_loader (dist_train/data/stream.py), --workers workers, v2 augmentation
                   (rotation 15, shift 0.1, brightness 0.8-1.2, hflip). Its Decoder decodes, augments the
                   8-bit PIL image (Augmenter: PIL affine, enhancers, flips) and converts once with
                   to_normalised_tensor, so each worker stacks and ships normalised float32 batches;
  (b) torchvision: ImageFolder + DataLoader, same workers and batch size, the idiomatic v2 transforms
                   (RandomAffine, ColorJitter brightness, RandomHorizontalFlip on a uint8 tensor, then
                   ToDtype, Normalize);
  (c) decode-only: the same files decoded to RGB pixels by --workers DataLoader workers, nothing
                   returned: the limit a JPEG pipeline cannot exceed on these cores;
  (a') uint8 batches, normalised on the device: the product's TrainStream + make_loader, its decode and
                   its Augmenter unchanged, but the decoder stops at the augmented uint8 pixels, so the
                   workers stack and ship uint8 batches (4x fewer bytes between processes) and the
                   normalisation is left to the device (a fraction of a millisecond per batch on a GPU;
                   on this CPU it would cost the main process the "normalise a uint8 batch" line of the
                   breakdown, which the rate here does not include).

Prints the rates, the ratios (a)/(b) (target >= 1.5) and (a)/(c) (target >= 0.85), and a cost breakdown
in one thread of the stages the product's workers still run: per image the decode, the PIL Augmenter
(its nearest affine beside the optional bilinear one, and the brightness enhancer) and to_normalised_tensor; per
batch of 32 the torch.stack of a float batch and its move to shared memory (what a worker pays to hand a
batch to the main process), beside the same for a uint8 batch and the cost of normalising a uint8 batch
on this CPU. From these it says what bounds the pipeline. Appends a dated row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from common import append_row, load_average, verdict
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from dist_train.config import AugmentConfig, DataConfig
from dist_train.data.augment import Augmenter, to_normalised_tensor
from dist_train.data.stream import Decoder, TrainStream, make_loader, shard_urls
from dist_train.shards.build import BuildOptions, build
from dist_train.shards.synthetic import generate

V2_AUGMENT = AugmentConfig(rotation_deg=15, shift=0.1, brightness=[0.8, 1.2], hflip=True)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""efficientnet_b0's normalisation (timm resolves ImageNet's)."""
UINT8 = "uint8 decoder, whole sample (a')"


# ---------------------------------------------------------------- data


def ensure_data(workdir: Path, n: int, raw_size: int, size: int) -> tuple[Path, Path]:
    """(shard folder, ImageFolder root holding the shards' own JPEG bytes as files)."""
    images = workdir / f"fundus-n{n}-s{raw_size}"
    shards = workdir / f"shards-n{n}-s{raw_size}-{size}"
    files = workdir / f"files-n{n}-s{raw_size}-{size}"
    if not (images / "labels.csv").exists():
        started = time.perf_counter()
        generate(images, n, positive_rate=0.2, size=raw_size, seed=0)
        print(f"generated {n} images of ~{raw_size} px in {time.perf_counter() - started:.0f} s")
    if not (shards / "manifest.json").exists():
        shutil.rmtree(files, ignore_errors=True)
        report = build([images], images / "labels.csv", shards,
                       BuildOptions(size=size, shard_size=max(1, n // 6), workers=2, val_fraction=0.0))
        print(f"built shards at {size} px in {report.seconds:.0f} s")
    if not files.exists():
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
    return shards, files


# ---------------------------------------------------------------- the pipelines


def epoch_rate(loader, normalise_batch=None) -> float:
    """Images/s over one epoch, worker start-up included (the loop restarts workers every epoch)."""
    started = time.perf_counter()
    images = 0
    for batch in loader:
        pixels = batch.images if hasattr(batch, "images") else batch[0]
        if normalise_batch is not None:
            pixels = normalise_batch(pixels)
        images += len(pixels)
    return images / (time.perf_counter() - started)


def ours_loader(shards: Path, args, epoch: int, decoder) -> DataLoader:
    cfg = DataConfig(train_shards=str(shards / "train-*.tar"), image_size=args.size, workers=args.workers,
                     augment=V2_AUGMENT)
    urls = shard_urls(cfg.train_shards)
    micro_batches = args.n // args.batch_size
    stream = TrainStream(urls, cfg, decoder, args.batch_size, rank=0, world_size=1, seed=0, epoch=epoch,
                         micro_batches=micro_batches, workers=args.workers)
    return make_loader(stream, cfg, pin_memory=False)


def torchvision_transform(size: int) -> T.Compose:
    return T.Compose([
        T.PILToTensor(),
        T.RandomAffine(degrees=15, translate=(0.1, 0.1)),
        T.ColorJitter(brightness=(0.8, 1.2)),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(MEAN, STD),
    ])


def torchvision_loader(files: Path, args) -> DataLoader:
    dataset = ImageFolder(str(files), transform=torchvision_transform(args.size))
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


def normalise_uint8(batch: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return (batch.float() - mean) / std


# ---------------------------------------------------------------- per-stage costs, one thread


def stage_costs(files: Path, size: int, count: int = 24) -> dict[str, float]:
    """Milliseconds per image of each stage, best of 3, in this process with one thread.

    "(batch)" stages are timed once per 32 images and reported per batch.
    """
    torch.set_num_threads(1)
    blobs = [p.read_bytes() for p in sorted(files.glob("*/*.jpg"))[:count]]
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    pixels = [np.asarray(p) for p in pil]
    uint8 = [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in pixels]
    augmenter = Augmenter(V2_AUGMENT)
    translate = [int(0.05 * size), int(-0.03 * size)]
    ours = Decoder(size, MEAN, STD, None, augmenter)
    uint8_decoder = Decoder(size, MEAN, STD, None, augmenter, normalise=False)
    tv = torchvision_transform(size)
    float_batch = torch.stack([to_normalised_tensor(p, MEAN, STD) for p in pixels[:1]] * 32)
    uint8_batch = torch.stack(uint8[:1] * 32)
    stages = {
        "PIL decode": lambda i: Image.open(io.BytesIO(blobs[i])).convert("RGB"),
        "Augmenter (ours, PIL uint8)": lambda i: augmenter(pil[i], np.random.default_rng(i)),
        "  F.affine PIL, nearest (the default)": lambda i: F.affine(pil[i], angle=7.0, translate=translate,
                                                                   scale=1.0, shear=[0.0, 0.0]),
        "  (F.affine PIL, bilinear: augment.interpolation)": lambda i: F.affine(
            pil[i], angle=7.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
            interpolation=F.InterpolationMode.BILINEAR),
        "  F.adjust_brightness PIL": lambda i: F.adjust_brightness(pil[i], 1.1),
        "to_normalised_tensor": lambda i: to_normalised_tensor(pixels[i], MEAN, STD),
        "Decoder (ours, whole sample)": lambda i: ours({"jpg": blobs[i]}, i),
        UINT8: lambda i: uint8_decoder({"jpg": blobs[i]}, i),
        "torchvision transforms (b)": lambda i: tv(pil[i]),
        "  F.affine uint8 tensor, nearest (b)": lambda i: F.affine(uint8[i], angle=7.0, translate=translate,
                                                                   scale=1.0, shear=[0.0, 0.0]),
        "stack 32 float images (batch)": lambda i: torch.stack([float_batch[0]] * 32) if i == 0 else None,
        "  + move to shared memory (batch)": lambda i: (torch.stack([float_batch[0]] * 32).share_memory_()
                                                        if i == 0 else None),
        "stack 32 uint8 images (batch)": lambda i: torch.stack(uint8[:1] * 32) if i == 0 else None,
        "  + move to shared memory, uint8 (batch)": lambda i: (torch.stack(uint8[:1] * 32).share_memory_()
                                                               if i == 0 else None),
        "normalise 32 uint8 images (batch)": lambda i: normalise_uint8(uint8_batch) if i == 0 else None,
    }
    costs = {}
    for name, function in stages.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for index in range(count):
                function(index)
            best = min(best, (time.perf_counter() - started) / count * 1000)
        costs[name] = best * (count if "(batch)" in name else 1)
    return costs


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--raw-size", type=int, default=700, help="approximate side of the raw photographs")
    parser.add_argument("--size", type=int, default=512, help="side of the shard images and of the input")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best counts")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dist_train_bench")
    parser.add_argument("--no-record", dest="record", action="store_false", help="print only (smoke runs)")
    args = parser.parse_args()
    shards, files = ensure_data(args.workdir, args.n, args.raw_size, args.size)
    ours_decoder = Decoder(args.size, MEAN, STD, None, Augmenter(V2_AUGMENT))
    uint8_decoder = Decoder(args.size, MEAN, STD, None, Augmenter(V2_AUGMENT), normalise=False)
    loads = [load_average()]
    rates: dict[str, list[float]] = {"a": [], "b": [], "c": [], "u8": []}
    for round_index in range(args.repeats):
        rates["a"].append(epoch_rate(ours_loader(shards, args, round_index, ours_decoder)))
        rates["b"].append(epoch_rate(torchvision_loader(files, args)))
        rates["c"].append(decode_only_rate(files, args))
        rates["u8"].append(epoch_rate(ours_loader(shards, args, round_index, uint8_decoder)))
        loads.append(load_average())
        print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
              + " img/s", flush=True)
    best = {key: max(values) for key, values in rates.items()}
    costs = stage_costs(files, args.size)
    print(f"\n{args.n} images at {args.size} px, {args.workers} workers, batch {args.batch_size}, "
          f"best of {args.repeats}, load avg {min(loads):.1f}-{max(loads):.1f}")
    names = {"a": "(a) ours (TrainStream + make_loader)", "b": "(b) torchvision ImageFolder + DataLoader",
             "c": "(c) decode-only limit", "u8": "(a') uint8 batches, normalised on the device"}
    for key, rate in best.items():
        print(f"  {names[key]:<46} {rate:7.1f} img/s")
    ab, ac = best["a"] / best["b"], best["a"] / best["c"]
    print(f"  (a)/(b) = {ab:.2f} (target >= 1.5: {verdict(ab, 1.5)})")
    print(f"  (a)/(c) = {ac:.2f} (target >= 0.85: {verdict(ac, 0.85)})")
    print(f"  (a')/(a) = {best['u8'] / best['a']:.2f}, (a')/(b) = {best['u8'] / best['b']:.2f}, "
          f"(a')/(c) = {best['u8'] / best['c']:.2f}")
    print("\nper-image cost, one thread (ms; '(batch)' lines per batch of 32):")
    for name, ms in costs.items():
        print(f"  {name:<40} {ms:7.2f}")
    bound = bound_sentence(costs, args.workers, args.batch_size)
    print("\n" + bound)
    figures = (f"uint8 PIL augmentation, nearest affine: {args.n} synthetic JPEGs at {args.size} px, v2 augmentation, "
               f"{args.workers} workers, batch {args.batch_size}, best of {args.repeats}, load avg "
               f"{min(loads):.1f}-{max(loads):.1f}: (a) ours {best['a']:.1f} img/s, (b) torchvision ImageFolder "
               f"{best['b']:.1f} img/s, (c) decode-only {best['c']:.1f} img/s; (a)/(b) {ab:.2f} (target 1.5, "
               f"{verdict(ab, 1.5)}), (a)/(c) {ac:.2f} (target 0.85, {verdict(ac, 0.85)}); (a') uint8 batches "
               f"normalised on the device {best['u8']:.1f} img/s ((a')/(a) {best['u8'] / best['a']:.2f}, (a')/(b) "
               f"{best['u8'] / best['b']:.2f}); per image 1 thread: decode {costs['PIL decode']:.1f} ms, Augmenter "
               f"(PIL) {costs['Augmenter (ours, PIL uint8)']:.1f} ms (affine "
               f"{costs['  F.affine PIL, nearest (the default)']:.1f}"
               f" ms), to_normalised_tensor {costs['to_normalised_tensor']:.1f} ms, our Decoder "
               f"{costs['Decoder (ours, whole sample)']:.1f} ms, uint8 decoder {costs[UINT8]:.1f} ms, torchvision "
               f"transforms {costs['torchvision transforms (b)']:.1f} ms; per batch of 32: stack float "
               f"{costs['stack 32 float images (batch)']:.0f} ms (+ shared memory "
               f"{costs['  + move to shared memory (batch)']:.0f} ms), stack uint8 "
               f"{costs['stack 32 uint8 images (batch)']:.0f} ms (+ shared memory "
               f"{costs['  + move to shared memory, uint8 (batch)']:.0f} ms); {bound}")
    if args.record:
        append_row("data_throughput", figures)


def bound_sentence(costs: dict[str, float], workers: int, batch_size: int) -> str:
    """What bounds (a): its per-image worker work split into stages, beside the decode it cannot avoid."""
    per_batch = costs["  + move to shared memory (batch)"] / batch_size
    parts = {"decode": costs["PIL decode"], "PIL augmentation": costs["Augmenter (ours, PIL uint8)"],
             "to_normalised_tensor": costs["to_normalised_tensor"],
             "stack + shared memory of the float batch": per_batch}
    total = sum(parts.values())
    split = ", ".join(f"{name} {ms:.1f} ms ({ms / total:.0%})" for name, ms in parts.items())
    largest = max(parts, key=parts.get)
    return (f"bound: the workers' per-image CPU work, {total:.1f} ms ({split}; ceiling {workers} x "
            f"{1000 / total:.0f} = {workers * 1000 / total:.0f} img/s on idle cores), led by {largest}; the "
            f"augmentation's nearest PIL affine costs {costs['  F.affine PIL, nearest (the default)']:.1f} ms "
            f"(bilinear "
            f"{costs['  (F.affine PIL, bilinear: augment.interpolation)']:.1f} ms); the decode is "
            f"{costs['PIL decode'] / total:.0%} of it")


if __name__ == "__main__":
    main()

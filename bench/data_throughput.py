"""Images/s delivered to the training loop at 512 px with the v2 augmentation, beside the alternatives.

    python bench/data_throughput.py [--n 300] [--raw-size 700] [--size 512] [--workers 2] [--batch-size 32]
                                    [--repeats 3] [--workdir DIR]

Makes (or reuses, under --workdir) --n synthetic fundus photographs of about --raw-size px, builds
WebDataset shards of them at --size px (shards/build.py's preprocessing), and extracts the very same
shard JPEGs as individual files in an ImageFolder layout. Then, in interleaved rounds (the best of
--repeats counts, since the machine is shared), one epoch of each:

  (a) ours:        TrainStream + make_loader (dist_train/data.py), --workers workers, v2 augmentation
                   (rotation 15, shift 0.1, brightness 0.8-1.2, hflip), normalised float batches;
  (b) torchvision: ImageFolder + DataLoader, same workers and batch size, the idiomatic v2 transforms
                   (RandomAffine, ColorJitter brightness, RandomHorizontalFlip, ToDtype, Normalize);
  (c) decode-only: the same files decoded to RGB pixels by --workers DataLoader workers, nothing
                   returned: the limit a JPEG pipeline cannot exceed on these cores;
  (a') candidate:  TrainStream + make_loader with a decoder that augments on the uint8 PIL image (same
                   per-sample parameters) and delivers uint8 batches, normalisation left to the device
                   (a fraction of a millisecond per batch on a GPU; on this CPU it would cost the main
                   process the "normalise a uint8 batch" line of the breakdown): what
                   dist_train/augment.py and data.py could do instead.

Prints the rates, the ratios (a)/(b) (target >= 1.5) and (a)/(c) (target >= 0.85), and a per-image cost
breakdown of each stage in one thread, which says what bounds the pipeline. Appends a dated row to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, load_average, verdict  # noqa: E402

from dist_train.augment import Augmenter, to_normalised_tensor  # noqa: E402
from dist_train.config import AugmentConfig, DataConfig  # noqa: E402
from dist_train.data import Decoder, TrainStream, make_loader, sample_image_bytes, shard_urls  # noqa: E402
from dist_train.sharding import BuildOptions, build  # noqa: E402
from dist_train.synthetic import generate  # noqa: E402

V2_AUGMENT = AugmentConfig(rotation_deg=15, shift=0.1, brightness=[0.8, 1.2], hflip=True)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""efficientnet_b0's normalisation (timm resolves ImageNet's)."""
CANDIDATE = "candidate uint8 decoder (a')"


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


class Uint8Decoder:
    """The candidate: the same per-sample parameters as Augmenter, applied to the PIL image (uint8, C code)."""

    def __init__(self, image_size: int, cfg: AugmentConfig):
        self.image_size, self.cfg = image_size, cfg

    def __call__(self, sample, sample_seed: int) -> torch.Tensor:
        cfg, rng = self.cfg, np.random.default_rng(sample_seed)
        angle = float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
        shift = [int(round(rng.uniform(-cfg.shift, cfg.shift) * self.image_size)) for _ in range(2)]
        scale = float(rng.uniform(1 - cfg.scale, 1 + cfg.scale))
        brightness = float(rng.uniform(*cfg.brightness))
        contrast = float(rng.uniform(*cfg.contrast))
        hflip = cfg.hflip and rng.random() < 0.5
        with Image.open(io.BytesIO(sample_image_bytes(sample))) as image:
            image.draft("RGB", (self.image_size, self.image_size))
            image = image.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        if angle or any(shift) or scale != 1.0:
            image = F.affine(image, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0])
        if brightness != 1.0:
            image = ImageEnhance.Brightness(image).enhance(brightness)
        if contrast != 1.0:
            image = ImageEnhance.Contrast(image).enhance(contrast)
        if hflip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def normalise_uint8(batch: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return (batch.float() - mean) / std


# ---------------------------------------------------------------- per-stage costs, one thread


def stage_costs(files: Path, size: int, count: int = 24) -> dict[str, float]:
    """Milliseconds per image of each stage, best of 3, in this process with one thread."""
    torch.set_num_threads(1)
    blobs = [p.read_bytes() for p in sorted(files.glob("*/*.jpg"))[:count]]
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    pixels = [np.asarray(p) for p in pil]
    tensors = [to_normalised_tensor(p, MEAN, STD) for p in pixels]
    uint8 = [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in pixels]
    augmenter = Augmenter(V2_AUGMENT, MEAN, STD)
    translate = [int(0.05 * size), int(-0.03 * size)]
    ours = Decoder(size, MEAN, STD, None, augmenter)
    candidate = Uint8Decoder(size, V2_AUGMENT)
    tv = torchvision_transform(size)
    stages = {
        "PIL decode": lambda i: Image.open(io.BytesIO(blobs[i])).convert("RGB"),
        "to_normalised_tensor": lambda i: to_normalised_tensor(pixels[i], MEAN, STD),
        "Augmenter (ours, float)": lambda i: augmenter(tensors[i], np.random.default_rng(i)),
        "  F.affine float tensor": lambda i: F.affine(tensors[i], angle=7.0, translate=translate, scale=1.0,
                                                      shear=[0.0, 0.0]),
        "  F.affine uint8 tensor": lambda i: F.affine(uint8[i], angle=7.0, translate=translate, scale=1.0,
                                                      shear=[0.0, 0.0]),
        "  F.affine PIL": lambda i: F.affine(pil[i], angle=7.0, translate=translate, scale=1.0, shear=[0.0, 0.0]),
        "  un/re-normalise + clamp": lambda i: (((tensors[i] * augmenter.std + augmenter.mean).clamp_(0, 1)
                                                 - augmenter.mean) / augmenter.std),
        "Decoder (ours, whole sample)": lambda i: ours({"jpg": blobs[i]}, i),
        "torchvision transforms (b)": lambda i: tv(pil[i]),
        CANDIDATE: lambda i: candidate({"jpg": blobs[i]}, i),
        "stack 32 float images (batch)": lambda i: torch.stack(tensors[:1] * 32) if i == 0 else None,
        "normalise 32 uint8 images (batch)": lambda i: normalise_uint8(torch.stack(uint8[:1] * 32)) if i == 0 else None,
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
    ours_decoder = Decoder(args.size, MEAN, STD, None, Augmenter(V2_AUGMENT, MEAN, STD))
    candidate_decoder = Uint8Decoder(args.size, V2_AUGMENT)
    loads = [load_average()]
    rates: dict[str, list[float]] = {"a": [], "b": [], "c": [], "cand": []}
    for round_index in range(args.repeats):
        rates["a"].append(epoch_rate(ours_loader(shards, args, round_index, ours_decoder)))
        rates["b"].append(epoch_rate(torchvision_loader(files, args)))
        rates["c"].append(decode_only_rate(files, args))
        rates["cand"].append(epoch_rate(ours_loader(shards, args, round_index, candidate_decoder)))
        loads.append(load_average())
        print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
              + " img/s", flush=True)
    best = {key: max(values) for key, values in rates.items()}
    costs = stage_costs(files, args.size)
    print(f"\n{args.n} images at {args.size} px, {args.workers} workers, batch {args.batch_size}, "
          f"best of {args.repeats}, load avg {min(loads):.1f}-{max(loads):.1f}")
    names = {"a": "(a) ours (TrainStream + make_loader)", "b": "(b) torchvision ImageFolder + DataLoader",
             "c": "(c) decode-only limit", "cand": "(a') candidate: uint8 PIL augment, uint8 out"}
    for key, rate in best.items():
        print(f"  {names[key]:<44} {rate:7.1f} img/s")
    ab, ac = best["a"] / best["b"], best["a"] / best["c"]
    print(f"  (a)/(b) = {ab:.2f} (target >= 1.5: {verdict(ab, 1.5)})")
    print(f"  (a)/(c) = {ac:.2f} (target >= 0.85: {verdict(ac, 0.85)})")
    print(f"  (a')/(b) = {best['cand'] / best['b']:.2f}, (a')/(c) = {best['cand'] / best['c']:.2f}")
    print("\nper-image cost, one thread (ms):")
    for name, ms in costs.items():
        print(f"  {name:<34} {ms:7.2f}")
    bound = (f"bound: the float augmentation ({costs['Augmenter (ours, float)']:.1f} ms/img, of which affine on a "
             f"float tensor {costs['  F.affine float tensor']:.1f} ms vs {costs['  F.affine PIL']:.1f} ms on PIL) "
             f"costs more than the decode ({costs['PIL decode']:.1f} ms)")
    if ac < 0.85:
        print("\n" + bound)
    figures = (f"{args.n} synthetic JPEGs at {args.size} px, v2 augmentation, {args.workers} workers, batch "
               f"{args.batch_size}, best of {args.repeats}, load avg {min(loads):.1f}-{max(loads):.1f}: (a) ours "
               f"{best['a']:.1f} img/s, (b) torchvision ImageFolder {best['b']:.1f} img/s, (c) decode-only "
               f"{best['c']:.1f} img/s; (a)/(b) {ab:.2f} (target 1.5, {verdict(ab, 1.5)}), (a)/(c) {ac:.2f} "
               f"(target 0.85, {verdict(ac, 0.85)}); candidate (uint8 PIL augment, uint8 batches normalised on the "
               f"device) {best['cand']:.1f} img/s ((a')/(b) {best['cand'] / best['b']:.2f}); "
               f"per image 1 thread: decode {costs['PIL decode']:.1f} ms, our Decoder "
               f"{costs['Decoder (ours, whole sample)']:.1f} ms, torchvision transforms "
               f"{costs['torchvision transforms (b)']:.1f} ms, candidate decoder "
               f"{costs[CANDIDATE]:.1f} ms, stacking 32 float images {costs['stack 32 float images (batch)']:.0f} ms")
    if ac < 0.85:
        figures += "; " + bound
    if args.record:
        append_row("data_throughput", figures)


if __name__ == "__main__":
    main()

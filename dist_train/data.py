"""The WebDataset stream that feeds every rank: shard layout, equal-length epochs, exactly-once validation.

Every (rank, DataLoader worker) pair is a *slot*. Shards are dealt to slots so that no two slots read
the same sample: with at least as many shards as slots each slot owns whole shards; with fewer, the
slots sharing a shard take every k-th sample of it. Training slots cycle over their samples until
they have produced their fixed quota of batches, so every rank runs the same number of steps per
epoch whatever the shard sizes; validation slots read their share once, so every sample is scored
exactly once. Augmentation draws its parameters from a per-sample seed, so a run resumed mid-epoch
(raw samples skipped before decoding) sees the same pixels as a run never interrupted.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import json
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from dist_train.augment import Augmenter, to_normalised_tensor
from dist_train.config import DataConfig
from dist_train.transforms import apply_clahe

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


class DataError(RuntimeError):
    """A shard that cannot be read, or too many corrupt samples: the run must stop."""


@dataclass(frozen=True)
class SlotShare:
    """The shards one slot reads, and which of their samples it keeps (index % stride == offset)."""

    urls: tuple[str, ...]
    stride: int = 1
    offset: int = 0


def shard_urls(pattern: str) -> list[str]:
    """Expand a WebDataset URL pattern (braces, '::' lists, or a local glob such as train-*.tar)."""
    if "*" in pattern and "://" not in pattern and not pattern.startswith("pipe:"):
        urls = sorted(glob.glob(pattern))
    else:
        urls = expand_urls(pattern)
    if not urls:
        raise DataError(f"no shards match {pattern!r}")
    return list(urls)


def assign_slots(urls: list[str], num_slots: int) -> list[SlotShare]:
    """Deal shards to slots so that every sample belongs to exactly one slot."""
    if len(urls) >= num_slots:
        return [SlotShare(tuple(urls[slot::num_slots])) for slot in range(num_slots)]
    shares = []
    for slot in range(num_slots):
        shard = slot % len(urls)
        sharing = len(range(shard, num_slots, len(urls)))
        shares.append(SlotShare((urls[shard],), stride=sharing, offset=slot // len(urls)))
    return shares


def epoch_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (python's hash() is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------- raw samples


class _TailReader:
    """Wraps a shard stream and keeps its last bytes, to tell a complete tar from a truncated one.

    Python's streaming tar reader stops silently when a file ends early; a complete archive ends
    with an end-of-archive marker (two zero blocks), so the tail is checked once the stream is drained.
    """

    def __init__(self, stream: Any):
        self.stream, self.tail, self.total = stream, b"", 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.total += len(chunk)
        self.tail = (self.tail + chunk)[-1024:]
        return chunk

    def complete(self) -> bool:
        while self.read(1 << 16):
            pass
        return self.total % 512 == 0 and len(self.tail) == 1024 and not any(self.tail)

    def close(self) -> None:
        self.stream.close()


def iterate_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (undecoded bytes) of one shard; any read failure, truncation included, names the URL."""
    try:
        reader = _TailReader(gopen(url))
    except Exception as error:
        raise DataError(f"cannot open shard {url}: {type(error).__name__}: {error}") from None
    try:
        files = tariterators.tar_file_iterator(reader)
        yield from tariterators.group_by_keys({**f, "__url__": url} for f in files)
        if not reader.complete():
            raise DataError(f"shard {url} is truncated (no end-of-archive marker after {reader.total} bytes)")
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"cannot read shard {url}: {type(error).__name__}: {error}") from None
    finally:
        reader.close()


def iterate_share(share: SlotShare) -> Iterator[dict[str, Any]]:
    for url in share.urls:
        for index, sample in enumerate(iterate_shard(url)):
            if index % share.stride == share.offset:
                yield sample


def sample_label(sample: dict[str, Any]) -> int:
    raw = sample.get("cls")
    if raw is None:
        raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no .cls label")
    return int(raw.decode().strip() if isinstance(raw, bytes) else raw)


def sample_image_bytes(sample: dict[str, Any]) -> bytes:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image (.jpg/.png)")


def shuffled(samples: Iterator[dict[str, Any]], buffer_size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """A reservoir shuffle with an explicit RNG (webdataset's uses the global one)."""
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def cycled(share: SlotShare, seed: int, buffer_size: int) -> Iterator[dict[str, Any]]:
    """The slot's samples forever, each pass reshuffled (shard order and buffer) from (seed, pass)."""
    for cycle in range(1 << 62):
        rng = random.Random(epoch_seed(seed, cycle))
        urls = list(share.urls)
        rng.shuffle(urls)
        passed = iterate_share(SlotShare(tuple(urls), share.stride, share.offset))
        yielded = False
        for sample in shuffled(passed, buffer_size, rng):
            yielded = True
            yield sample
        if not yielded:
            return


def balanced(share: SlotShare, seed: int, buffer_size: int, positive_fraction: float) -> Iterator[dict[str, Any]]:
    """Positives with probability `positive_fraction`, each class cycled separately."""
    positives = (s for s in cycled(share, epoch_seed(seed, "pos"), buffer_size) if sample_label(s) == 1)
    negatives = (s for s in cycled(share, epoch_seed(seed, "neg"), buffer_size) if sample_label(s) == 0)
    rng = random.Random(epoch_seed(seed, "mix"))
    while True:
        source = positives if rng.random() < positive_fraction else negatives
        sample = next(source, None)
        if sample is None:
            raise DataError("class-balanced sampling needs both classes in every slot's shards")
        yield sample


# ---------------------------------------------------------------- decoding


@dataclass
class Decoder:
    """Bytes to a tensor: decode, resize, optional CLAHE, augmentation, then normalisation.

    With `normalise=False` it returns the 8-bit image (3xHxW uint8) and `augment.Normaliser` finishes
    the job on the GPU: a quarter of the bytes to stack, share between processes and copy.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    clahe: tuple[float, int] | None = None
    augmenter: Augmenter | None = None
    normalise: bool = True

    def __call__(self, sample: dict[str, Any], sample_seed: int) -> torch.Tensor:
        with Image.open(io.BytesIO(sample_image_bytes(sample))) as image:
            image.draft("RGB", (self.image_size, self.image_size))
            image = image.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        if self.clahe is not None:
            image = Image.fromarray(apply_clahe(np.asarray(image), clip_limit=self.clahe[0], tile_grid=self.clahe[1]))
        if self.augmenter is not None:
            image = self.augmenter(image, np.random.default_rng(sample_seed))
        if not self.normalise:
            return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()
        return to_normalised_tensor(np.asarray(image), self.mean, self.std)


@dataclass
class StreamPosition:
    """How far one rank got into its epoch stream: what a checkpoint stores to resume mid-epoch."""

    micro_batches: int = 0
    raw_positions: dict[int, int] = field(default_factory=dict)
    """Raw samples consumed per DataLoader worker."""

    def advance(self, batch: Batch) -> None:
        self.micro_batches += 1
        self.raw_positions[batch.worker] = batch.raw_position

    def to_json(self) -> dict[str, Any]:
        positions = {str(worker): raw for worker, raw in self.raw_positions.items()}
        return {"micro_batches": self.micro_batches, "raw_positions": positions}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StreamPosition:
        return cls(raw["micro_batches"], {int(k): v for k, v in raw["raw_positions"].items()})


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    worker: int = 0
    raw_position: int = 0
    """Raw samples this worker has consumed in the epoch after this batch (for exact resume)."""
    bad: list[tuple[str, str, str]] = field(default_factory=list)
    """(shard, key, reason) of corrupt samples skipped since the previous batch of this worker."""


def decode_batches(samples: Iterator[dict[str, Any]], decoder: Decoder, batch_size: int, seed: int,
                   worker: int, start_position: int = 0, keep_last: bool = False) -> Iterator[Batch]:
    """Group decoded samples into batches, skipping (and reporting) the ones that fail to decode."""
    images, labels, keys, bad = [], [], [], []
    position = start_position
    for sample in samples:
        position += 1
        key = str(sample.get("__key__"))
        try:
            label = sample_label(sample)
            images.append(decoder(sample, epoch_seed(seed, position, key)))
        except DataError:
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            log.warning("skipping corrupt sample %s in %s: %s", key, sample.get("__url__"), reason)
            bad.append((str(sample.get("__url__")), key, reason))
            continue
        labels.append(label)
        keys.append(key)
        if len(images) == batch_size:
            yield Batch(torch.stack(images), torch.tensor(labels, dtype=torch.float32), keys, worker, position, bad)
            images, labels, keys, bad = [], [], [], []
    if images and keep_last:
        yield Batch(torch.stack(images), torch.tensor(labels, dtype=torch.float32), keys, worker, position, bad)
    elif bad:
        yield Batch(torch.empty(0), torch.empty(0), [], worker, position, bad)


# ---------------------------------------------------------------- datasets


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """One epoch of training batches for one rank: exactly `micro_batches` of them, split over workers."""

    def __init__(self, urls: list[str], cfg: DataConfig, decoder: Decoder, batch_size: int, rank: int,
                 world_size: int, seed: int, epoch: int, micro_batches: int, workers: int,
                 resume: StreamPosition | None = None):
        super().__init__()
        self.urls, self.cfg, self.decoder, self.batch_size = urls, cfg, decoder, batch_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.micro_batches, self.workers = micro_batches, max(workers, 1)
        self.resume = copy.deepcopy(resume) if resume is not None else StreamPosition()

    def worker_quota(self, worker: int) -> int:
        """Batches this worker yields: DataLoader takes batches from workers in turn."""
        return len(range(worker, self.micro_batches, self.workers))

    def __iter__(self) -> Iterator[Batch]:
        physical, _ = _worker()
        # DataLoader asks worker 0 first; after a resume the next batch is due from another worker
        worker = (physical + self.resume.micro_batches) % self.workers
        slot = self.rank * self.workers + worker
        share = assign_slots(self.urls, self.world_size * self.workers)[slot]
        slot_seed = epoch_seed(self.seed, self.epoch, slot)
        if self.cfg.positive_fraction is not None:
            samples = balanced(share, slot_seed, self.cfg.shuffle_buffer, self.cfg.positive_fraction)
        else:
            samples = cycled(share, slot_seed, self.cfg.shuffle_buffer)
        start = self.resume.raw_positions.get(worker, 0)
        for _ in range(start):
            next(samples)
        done = len(range(worker, self.resume.micro_batches, self.workers))
        quota = self.worker_quota(worker)
        batches = decode_batches(samples, self.decoder, self.batch_size, slot_seed, worker, start)
        for batch in batches:
            if done >= quota:
                return
            done += bool(batch.keys)
            yield batch


class EvalStream(IterableDataset):
    """This rank's share of the validation set, each sample once, with its key."""

    def __init__(self, urls: list[str], decoder: Decoder, batch_size: int, rank: int, world_size: int,
                 workers: int):
        super().__init__()
        self.urls, self.decoder, self.batch_size = urls, decoder, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)

    def __iter__(self) -> Iterator[Batch]:
        worker, _ = _worker()
        share = assign_slots(self.urls, self.world_size * self.workers)[self.rank * self.workers + worker]
        yield from decode_batches(iterate_share(share), self.decoder, self.batch_size, 0, worker, keep_last=True)


def make_loader(dataset: IterableDataset, cfg: DataConfig, pin_memory: bool, timeout_s: float = 0) -> DataLoader:
    """A DataLoader over already-batched items; workers start per epoch so none outlive it.

    Its own generator keeps the worker base seed from drawing on the global RNG, which dropout uses:
    a run resumed mid-epoch must see the same dropout masks as one never interrupted. A worker that
    produces nothing for `timeout_s` raises here, on its own rank, instead of leaving the other ranks
    waiting in a collective.
    """
    return DataLoader(dataset, batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
                      prefetch_factor=cfg.prefetch_factor if cfg.workers > 0 else None,
                      persistent_workers=False, collate_fn=_identity, generator=torch.Generator(),
                      timeout=timeout_s if cfg.workers > 0 else 0)


def _identity(item: Batch) -> Batch:
    return item


# ---------------------------------------------------------------- counts


@dataclass(frozen=True)
class SplitCounts:
    samples: int
    positives: int


def find_manifest(setting: str, urls: list[str]) -> Path | None:
    if setting == "none":
        return None
    if setting != "auto":
        path = Path(setting)
        if not path.is_file():
            raise DataError(f"data.manifest: {path} does not exist")
        return path
    candidate = Path(urls[0]).parent / "manifest.json"
    return candidate if candidate.is_file() else None


def shard_preprocessing(urls: list[str], manifest_setting: str) -> dict[str, Any]:
    """The shard builder's preprocessing (size, JPEG quality, ...) from the manifest, if there is one."""
    manifest = find_manifest(manifest_setting, urls)
    return json.loads(manifest.read_text()).get("preprocessing", {}) if manifest else {}


def verify_against_manifest(urls: list[str], manifest_setting: str) -> list[str]:
    """Shards whose sha256 differs from the manifest's record (or that it does not list)."""
    manifest = find_manifest(manifest_setting, urls)
    if manifest is None:
        return [f"no manifest found for {urls[0]}: data.verify_shards needs one"]
    entries = {entry["name"]: entry for entry in json.loads(manifest.read_text())["shards"]}
    problems = []
    for url in urls:
        entry = entries.get(Path(url).name)
        if entry is None:
            problems.append(f"{url} is not listed in {manifest}")
            continue
        digest = hashlib.sha256()
        with open(url, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != entry["sha256"]:
            problems.append(f"{url} does not match its sha256 in {manifest}")
    return problems


def split_counts(urls: list[str], manifest_setting: str, cache_dir: Path | None = None) -> SplitCounts:
    """Sample and positive counts from the manifest's shard entries, or by one scan (cached)."""
    manifest = find_manifest(manifest_setting, urls)
    if manifest is not None:
        entries = {entry["name"]: entry for entry in json.loads(manifest.read_text())["shards"]}
        names = [Path(url).name for url in urls]
        if all(name in entries for name in names):
            return SplitCounts(sum(entries[n]["samples"] for n in names), sum(entries[n]["positives"] for n in names))
    return _scan_counts(urls, cache_dir)


def _scan_counts(urls: list[str], cache_dir: Path | None) -> SplitCounts:
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"counts-{hashlib.sha256(repr(urls).encode()).hexdigest()[:16]}.json"
        if cache.is_file():
            return SplitCounts(**json.loads(cache.read_text()))
    samples = positives = 0
    for url in urls:
        for sample in iterate_shard(url):
            samples += 1
            positives += sample_label(sample)
    counts = SplitCounts(samples, positives)
    if cache is not None:  # every rank may count at once: write aside, then rename
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(counts.__dict__))
        os.replace(staging, cache)
    return counts


def steps_per_epoch(train_samples: int, world_size: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps per rank so that one epoch sees about the whole training set once."""
    return max(1, math.floor(train_samples / (world_size * batch_size * accumulation)))

"""The WebDataset stream that feeds every rank: shard layout, equal-length epochs, exactly-once validation.

Every (rank, DataLoader worker) pair is a *slot*. Shards are dealt to slots so that no two slots read
the same sample and every sample belongs to exactly one slot. Training slots cycle over their samples
until they have produced their fixed quota of batches, so every rank runs the same number of steps per
epoch whatever the shard sizes; validation slots read their share once, so every sample is scored
exactly once.

A sample is drawn quota / (its slot's samples) times per epoch, so the deal follows the shards' sample
counts when they are known (manifest, or the one counting scan): the samples of all shards, in order,
are cut into one contiguous range per slot, sized in proportion to the slot's quota, and a shard may
be split between neighbouring slots. Every sample is then drawn at the same rate (to one sample per
slot), where a deal of whole shards cannot balance shards of uneven size. Without counts: with at
least as many shards as slots each slot owns whole shards; with fewer, the slots sharing a shard
take every k-th sample of it. Augmentation draws its parameters from a per-sample seed, so a run resumed mid-epoch
(raw samples skipped before decoding) sees the same pixels as a run never interrupted.

With `data.decode: cuda` the same streams run, but the Decoder stops after reading bytes: a Batch then carries
its JPEGs (`EncodedBatch`) and the augmentation parameters drawn in the worker, and `gpu_decode.DeviceDecoder`
finishes on the GPU; samples, order, quotas, positions and corrupt-sample accounting stay the CPU path's.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import glob
import hashlib
import itertools
import logging
import math
import random
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset.filters
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from dist_train.config import DataConfig
from dist_train.data.buffers import Lease, batch_buffer
from dist_train.data.decode import Decoder, EncodedBatch, EncodedSample
from dist_train.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPiece:
    """The samples of one shard a slot keeps: index in [start, stop) and index % stride == offset.

    `stop` None runs to the shard's real end, so the last piece of a shard still covers it all when a
    manifest's count is stale: every sample keeps exactly one owner whatever the counts said.
    """

    url: str
    stride: int = 1
    offset: int = 0
    start: int = 0
    stop: int | None = None

    def keeps(self, index: int) -> bool:
        return index >= self.start and index % self.stride == self.offset


@dataclass(frozen=True)
class SlotShare:
    """The pieces of shards one slot reads."""

    pieces: tuple[ShardPiece, ...]

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(piece.url for piece in self.pieces)


def shard_urls(pattern: str) -> list[str]:
    """Expand a WebDataset URL pattern (braces, '::' lists, or a local glob such as train-*.tar)."""
    if "*" in pattern and "://" not in pattern and not pattern.startswith("pipe:"):
        urls = sorted(glob.glob(pattern))
    else:
        urls = expand_urls(pattern)
    if not urls:
        raise DataError(f"no shards match {pattern!r}")
    return list(urls)


def assign_slots(urls: list[str], num_slots: int, shard_samples: Sequence[int] | None = None,
                 slot_weights: Sequence[int] | None = None) -> list[SlotShare]:
    """Deal shards to slots so that every sample belongs to exactly one slot (see the module docstring).

    With `shard_samples` (one count per url) slot s gets a share of the samples proportional to
    `slot_weights[s]` (default: equal shares); without, or when a weighted slot would get no sample
    at all, whole shards are dealt in turn.
    """
    if shard_samples is not None:
        if len(shard_samples) != len(urls):
            raise ValueError(f"assign_slots: {len(shard_samples)} sample counts for {len(urls)} shards")
        weights = list(slot_weights) if slot_weights is not None and sum(slot_weights) > 0 else [1] * num_slots
        if len(weights) != num_slots:
            raise ValueError(f"assign_slots: {len(weights)} slot weights for {num_slots} slots")
        shares = _deal_by_samples(urls, list(shard_samples), weights)
        if shares is not None:
            return shares
    return _deal_by_shards(urls, num_slots)


def _deal_by_shards(urls: list[str], num_slots: int) -> list[SlotShare]:
    """Whole shards in turn; with fewer shards than slots, the slots sharing a shard take every k-th sample."""
    if len(urls) >= num_slots:
        return [SlotShare(tuple(ShardPiece(url) for url in urls[slot::num_slots])) for slot in range(num_slots)]
    shares = []
    for slot in range(num_slots):
        shard = slot % len(urls)
        sharing = len(range(shard, num_slots, len(urls)))
        shares.append(SlotShare((ShardPiece(urls[shard], stride=sharing, offset=slot // len(urls)),)))
    return shares


def _deal_by_samples(urls: list[str], counts: list[int], weights: list[int]) -> list[SlotShare] | None:
    """One contiguous range of the concatenated samples per slot, sized by weight; None if one would be empty."""
    total, weight_total = sum(counts), sum(weights)
    bounds = [total * cumulative // weight_total for cumulative in itertools.accumulate(weights, initial=0)]
    if any(weight > 0 and low == high for weight, low, high in zip(weights, bounds, bounds[1:])):
        return None
    firsts = list(itertools.accumulate(counts, initial=0))
    pieces: list[list[ShardPiece]] = [[] for _ in weights]
    for url, first, end in zip(urls, firsts, firsts[1:]):
        if first == end:  # listed as empty: still owned by one slot, in case the count is stale
            pieces[_slot_at(bounds, first)].append(ShardPiece(url))
            continue
        slot = _slot_at(bounds, first)
        while slot < len(weights) and bounds[slot] < end:
            low, high = bounds[slot], bounds[slot + 1]
            if low < high:
                stop = None if high >= end else high - first
                pieces[slot].append(ShardPiece(url, start=max(low - first, 0), stop=stop))
            slot += 1
    return [SlotShare(tuple(share)) for share in pieces]


def _slot_at(bounds: list[int], position: int) -> int:
    """The slot whose range holds `position` (the last one for the very end)."""
    return min(bisect.bisect_right(bounds, position), len(bounds) - 1) - 1


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


def iterate_shard(url: str) -> Generator[dict[str, Any], None, None]:
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
    """The slot's samples, piece by piece; a piece that ends inside its shard stops reading there."""
    for piece in share.pieces:
        with contextlib.closing(iterate_shard(piece.url)) as samples:
            for index, sample in enumerate(samples):
                if piece.stop is not None and index >= piece.stop:
                    break
                if piece.keeps(index):
                    yield sample


def sample_label(sample: dict[str, Any]) -> int:
    raw = sample.get("cls")
    if raw is None:
        raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no .cls label")
    return int(raw.decode().strip() if isinstance(raw, bytes) else raw)


def shuffled(samples: Iterator[dict[str, Any]], buffer_size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """webdataset's buffer shuffle, drawing from `rng` (seeded per slot and pass), so a resumed run's
    order is the uninterrupted run's; its buffer fills completely before the first sample leaves."""
    return webdataset.filters.shuffle(buffer_size, initial=buffer_size, rng=rng)(samples)


def cycled(share: SlotShare, seed: int, buffer_size: int) -> Iterator[dict[str, Any]]:
    """The slot's samples forever, each pass reshuffled (shard order and buffer) from (seed, pass)."""
    for cycle in range(1 << 62):
        rng = random.Random(epoch_seed(seed, cycle))
        pieces = list(share.pieces)
        rng.shuffle(pieces)
        passed = iterate_share(SlotShare(tuple(pieces)))
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
    encoded: EncodedBatch | None = None
    """data.decode=cuda: the samples still to decode on the device (`images` is then empty)."""
    lease: Lease | None = None
    """The worker's slot `images` was written into (`buffers.py`), given back when its storage dies here."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in the main process: arm the lease, so the worker writes that slot again only once the
        last tensor on it is gone."""
        self.__dict__.update(state)
        if self.lease is not None:
            self.lease.arm(self.images)

    def pin_memory(self) -> Batch:
        """What the DataLoader's pinning thread calls (`data.pin_memory` on a GPU run): page-locked
        tensors, without which every `non_blocking` copy to the GPU is a synchronous one."""
        return dataclasses.replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())


def decode_batches(samples: Iterator[dict[str, Any]], decoder: Decoder, batch_size: int, seed: int,
                   worker: int, start_position: int = 0, keep_last: bool = False) -> Iterator[Batch]:
    """Group decoded samples into batches, skipping (and reporting) the ones that fail to decode."""
    images: list[Any] = []
    labels, keys, bad = [], [], []
    position = start_position
    for sample in samples:
        position += 1
        key = str(sample.get("__key__"))
        try:
            label = sample_label(sample)
            images.append(decoder.worker_item(sample, epoch_seed(seed, position, key)))
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
            yield _batch(decoder, images, labels, keys, worker, position, bad)
            images, labels, keys, bad = [], [], [], []
    if images and keep_last:
        yield _batch(decoder, images, labels, keys, worker, position, bad)
    elif bad:
        yield Batch(torch.empty(0), torch.empty(0), [], worker, position, bad)


def _batch(decoder: Decoder, images: list[Any], labels: list[int], keys: list[str], worker: int, position: int,
           bad: list[tuple[str, str, str]]) -> Batch:
    """The decoder's batch of the images (`Decoder.collate`: in a worker, written straight into one of its
    reusable shared tensors, which a tensor stacked and sent would be copied into again), or (bytes-only
    Decoder) the encoded samples for the device to decode."""
    targets = torch.tensor(labels, dtype=torch.float32)
    if isinstance(images[0], EncodedSample):
        encoded = EncodedBatch.of(images)
        return Batch(torch.empty(0, dtype=torch.uint8), targets, keys, worker, position, bad, encoded)
    out, lease = batch_buffer(*decoder.batch_layout(images), reuse=decoder.reuse_buffers)
    return Batch(decoder.collate(images, out), targets, keys, worker, position, bad, lease=lease)


# ---------------------------------------------------------------- datasets


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """One epoch of training batches for one rank: exactly `micro_batches` of them, split over workers.

    `shard_samples` (samples per url, e.g. SplitCounts.per_shard) deals samples to slots in proportion
    to their quotas, so every sample is drawn at the same rate; None deals whole shards.
    """

    def __init__(self, urls: list[str], cfg: DataConfig, decoder: Decoder, batch_size: int, rank: int,
                 world_size: int, seed: int, epoch: int, micro_batches: int, workers: int,
                 resume: StreamPosition | None = None, shard_samples: Sequence[int] | None = None):
        super().__init__()
        self.urls, self.cfg, self.decoder, self.batch_size = urls, cfg, decoder, batch_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.micro_batches, self.workers = micro_batches, max(workers, 1)
        self.resume = copy.deepcopy(resume) if resume is not None else StreamPosition()
        self.shard_samples = shard_samples

    def worker_quota(self, worker: int) -> int:
        """Batches this worker yields: DataLoader takes batches from workers in turn."""
        return len(range(worker, self.micro_batches, self.workers))

    def slot_shares(self) -> list[SlotShare]:
        """Every slot's share (slot = rank * workers + worker), the same on every rank."""
        quotas = [self.worker_quota(worker) for worker in range(self.workers)] * self.world_size
        return assign_slots(self.urls, self.world_size * self.workers, self.shard_samples, quotas)

    def __iter__(self) -> Iterator[Batch]:
        physical, _ = _worker()
        # DataLoader asks worker 0 first; after a resume the next batch is due from another worker
        worker = (physical + self.resume.micro_batches) % self.workers
        slot = self.rank * self.workers + worker
        share = self.slot_shares()[slot]
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
        if done >= quota:
            return
        for batch in decode_batches(samples, self.decoder, self.batch_size, slot_seed, worker, start):
            done += bool(batch.keys)
            yield batch
            if done >= quota:  # before asking for another: that would decode a batch nobody takes
                return


class EvalStream(IterableDataset):
    """This rank's share of the validation set, each sample once, with its key.

    With `shard_samples` every slot scores an equal number of samples, so no rank waits for another.
    """

    def __init__(self, urls: list[str], decoder: Decoder, batch_size: int, rank: int, world_size: int,
                 workers: int, shard_samples: Sequence[int] | None = None):
        super().__init__()
        self.urls, self.decoder, self.batch_size = urls, decoder, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.shard_samples = shard_samples

    def __iter__(self) -> Iterator[Batch]:
        worker, _ = _worker()
        shares = assign_slots(self.urls, self.world_size * self.workers, self.shard_samples)
        share = shares[self.rank * self.workers + worker]
        yield from decode_batches(iterate_share(share), self.decoder, self.batch_size, 0, worker, keep_last=True)


def make_loader(dataset: IterableDataset, cfg: DataConfig, pin_memory: bool, timeout_s: float = 0,
                worker_init_fn: Callable[[int], None] | None = None) -> DataLoader:
    """A DataLoader over already-batched items; workers start per epoch so none outlive it.

    Its own generator keeps the worker base seed from drawing on the global RNG, which dropout uses:
    a run resumed mid-epoch must see the same dropout masks as one never interrupted. A worker that
    produces nothing for `timeout_s` raises here, on its own rank, instead of leaving the other ranks
    waiting in a collective.
    """
    return DataLoader(dataset, batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
                      prefetch_factor=cfg.prefetch_factor if cfg.workers > 0 else None,
                      persistent_workers=False, collate_fn=_identity, generator=torch.Generator(),
                      timeout=timeout_s if cfg.workers > 0 else 0, worker_init_fn=worker_init_fn)


def _identity(item: Any) -> Any:
    """collate_fn: with batch_size=None each already-batched item comes as is, not in the list torch types."""
    return item


def steps_per_epoch(train_samples: int, world_size: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps per rank so that one epoch sees about the whole training set once."""
    return max(1, math.floor(train_samples / (world_size * batch_size * accumulation)))

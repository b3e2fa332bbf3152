"""The shard stream: slot layout, equal epochs, exactly-once validation, resume, bad samples.

These run each rank's stream in one process (a stream takes rank and world size as arguments, like
webdataset's splitters read RANK/WORLD_SIZE), with real DataLoader workers; the multi-process
versions with real gloo groups are in tests/distributed/.
"""

from __future__ import annotations

import itertools
import json
import random
import tarfile
from collections import Counter

import pytest
import torch

from dist_train.config import DataConfig
from dist_train.data.manifest import split_counts
from dist_train.data.stream import (
    Decoder,
    EvalStream,
    StreamPosition,
    TrainStream,
    assign_slots,
    iterate_shard,
    iterate_share,
    make_loader,
    shard_urls,
)

from dist_train.errors import DataError

from conftest import write_shards

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def decoder(size=32):
    return Decoder(size, MEAN, STD)


def all_keys(paths):
    return [sample["__key__"] for path in paths for sample in iterate_shard(str(path))]


COUNTS_GIVEN = {"unknown": lambda sizes: None, "exact": list, "stale": lambda sizes: [max(n - 3, 0) for n in sizes],
                "overstated": lambda sizes: [n + 4 for n in sizes], "one listed empty": lambda sizes: [0] + sizes[1:]}
"""Sample counts handed to the deal: none, the real ones, or a manifest out of date with the shards."""


@pytest.mark.parametrize("counts", sorted(COUNTS_GIVEN))
@pytest.mark.parametrize("shards,slots", [(5, 4), (3, 4), (1, 3), (2, 6), (7, 2), (4, 4)])
def test_every_sample_belongs_to_exactly_one_slot(tmp_path, shards, slots, counts):
    sizes = [5 + i for i in range(shards)]
    paths = write_shards(tmp_path, "val", sizes)
    urls = [str(p) for p in paths]
    owned = [s["__key__"] for share in assign_slots(urls, slots, COUNTS_GIVEN[counts](sizes))
             for s in iterate_share(share)]
    assert Counter(owned) == Counter(all_keys(paths))


def piece_sizes(share, sizes_by_url):
    """Samples a share holds, counted from its pieces' index rules over each shard's true size."""
    return sum(sum(1 for index in range(piece.start, sizes_by_url[piece.url] if piece.stop is None else piece.stop)
                   if index % piece.stride == piece.offset) for piece in share.pieces)


def expected_draws(stream, sizes_by_url):
    """Expected draws per sample per epoch, slot by slot: a slot cycles over its samples for its quota."""
    held = [piece_sizes(share, sizes_by_url) for share in stream.slot_shares()]
    quotas = [stream.worker_quota(worker) for worker in range(stream.workers)] * stream.world_size
    return [quota * stream.batch_size / samples for quota, samples in zip(quotas, held)]


def counted_stream(urls, sizes, world, workers, micro_batches, batch=4):
    data = DataConfig(train_shards="x", val_shards="y", workers=workers)
    return TrainStream(urls, data, decoder(), batch, 0, world, 0, 0, micro_batches, workers, shard_samples=sizes)


@pytest.mark.parametrize("world,workers,micro_batches", [(8, 4, 170), (32, 1, 44), (4, 8, 351)])
def test_uneven_shards_are_drawn_at_one_rate_when_counts_are_known(world, workers, micro_batches):
    """100 shards of 50..400 samples over 32 slots: dealt by count, rates differ by 30% and more (issue 14.13)."""
    rng = random.Random(13)
    sizes = [rng.randint(50, 400) for _ in range(100)]
    urls = [f"/shards/train-{index:06d}.tar" for index in range(100)]
    draws = expected_draws(counted_stream(urls, sizes, world, workers, micro_batches), dict(zip(urls, sizes)))
    assert max(draws) / min(draws) <= 1.05


def test_two_ranks_two_workers_draw_every_sample_at_one_rate(tmp_path):
    """The 2-rank x 2-worker layout of tests/distributed with uneven shards, expected and as streamed.

    Realised: within a slot every pass draws each sample once, so at one rate every sample's draw count
    is within one of every other's; whole shards dealt in turn give some samples 1 draw and others 4.
    """
    sizes = [90, 90, 90, 40, 20]
    urls = [str(p) for p in write_shards(tmp_path, "train", sizes)]
    by_url = dict(zip(urls, sizes))
    draws = expected_draws(counted_stream(urls, sizes, 2, 2, 7), by_url)
    assert max(draws) / min(draws) <= 1.05, "expected"
    drawn = Counter()
    for rank in range(2):
        data = DataConfig(train_shards="x", val_shards="y", workers=2, shuffle_buffer=8)
        stream = TrainStream(urls, data, decoder(), 4, rank, 2, 0, 0, 70, 2, shard_samples=sizes)
        drawn.update(key for batch in make_loader(stream, data, False) for key in batch.keys)
    assert sum(drawn.values()) == 2 * 70 * 4 and set(drawn) == set(all_keys(urls))
    assert max(drawn.values()) - min(drawn.values()) <= 1, "as streamed"


def stream_keys(urls, rank, world, workers, epoch, micro_batches, seed=0, resume=None, batch=4, **cfg):
    data = DataConfig(train_shards="x", val_shards="y", workers=workers, shuffle_buffer=8, **cfg)
    stream = TrainStream(urls, data, decoder(), batch, rank, world, seed, epoch, micro_batches, workers,
                         resume=resume)
    return [b for b in make_loader(stream, data, False) if b.keys]


class CountingDecoder(Decoder):
    """The test decoder, counting the samples it decodes (in this process: the loader has no workers)."""

    def __init__(self):
        super().__init__(32, MEAN, STD)
        self.decoded = 0

    def worker_item(self, sample, sample_seed):
        self.decoded += 1
        return super().worker_item(sample, sample_seed)


@pytest.mark.parametrize("resumed_after", [0, 4, 6])
def test_an_epoch_decodes_only_the_samples_it_delivers(tmp_path, resumed_after):
    """The oracle: the batches left in the epoch times the batch size (no sample is corrupt). Before, each
    worker decoded one more batch after its last, and threw it away: a batch per worker per epoch (in
    bench/data_throughput.py's 9-batch epoch, 2 of 11 batches decoded), and the epoch's end waited for it."""
    urls = [str(p) for p in write_shards(tmp_path, "train", [16, 16])]
    data = DataConfig(train_shards="x", val_shards="y", workers=0, shuffle_buffer=8)
    position = StreamPosition()
    for batch in stream_keys(urls, 0, 1, 0, epoch=0, micro_batches=6)[:resumed_after]:
        position.advance(batch)
    counting = CountingDecoder()
    stream = TrainStream(urls, data, counting, 4, 0, 1, 0, 0, 6, 0, resume=position)
    delivered = [batch for batch in make_loader(stream, data, False) if batch.keys]
    assert len(delivered) == 6 - resumed_after
    assert counting.decoded == (6 - resumed_after) * 4


def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path):
    urls = [str(p) for p in write_shards(tmp_path, "train", [20, 20, 20, 20, 3])]
    counts = [len(stream_keys(urls, rank, 2, 2, epoch=0, micro_batches=9)) for rank in range(2)]
    assert counts == [9, 9]


def test_training_slots_are_disjoint_and_cover_the_set(tmp_path):
    paths = write_shards(tmp_path, "train", [12, 12, 12, 12, 12])
    urls = [str(p) for p in paths]
    seen_by_rank = []
    for rank in range(2):
        batches = stream_keys(urls, rank, 2, 2, epoch=1, micro_batches=16)
        seen_by_rank.append({key for batch in batches for key in batch.keys})
    assert not seen_by_rank[0] & seen_by_rank[1]
    assert seen_by_rank[0] | seen_by_rank[1] == set(all_keys(paths))


def test_order_is_reproducible_per_seed_and_changes_per_epoch(tmp_path):
    urls = [str(p) for p in write_shards(tmp_path, "train", [16, 16, 16])]
    first = [b.keys for b in stream_keys(urls, 0, 1, 2, epoch=0, micro_batches=6)]
    again = [b.keys for b in stream_keys(urls, 0, 1, 2, epoch=0, micro_batches=6)]
    next_epoch = [b.keys for b in stream_keys(urls, 0, 1, 2, epoch=1, micro_batches=6)]
    other_seed = [b.keys for b in stream_keys(urls, 0, 1, 2, epoch=0, micro_batches=6, seed=7)]
    assert first == again
    assert first != next_epoch and first != other_seed


@pytest.mark.parametrize("workers,cut", [(0, 3), (2, 5), (2, 1)])
def test_resume_mid_epoch_neither_repeats_nor_skips(tmp_path, workers, cut):
    urls = [str(p) for p in write_shards(tmp_path, "train", [13, 9, 11], corrupt={"train-01-0004"})]
    full = stream_keys(urls, 1, 2, workers, epoch=2, micro_batches=10)
    position = StreamPosition()
    for batch in full[:cut]:
        position.advance(batch)
    restored = StreamPosition.from_json(position.to_json())
    rest = stream_keys(urls, 1, 2, workers, epoch=2, micro_batches=10, resume=restored)
    assert [b.keys for b in full[:cut] + rest] == [b.keys for b in full]
    for expected, got in zip(full[cut:], rest):
        assert torch.equal(expected.images, got.images)


@pytest.mark.parametrize("with_counts", [False, True])
@pytest.mark.parametrize("shards,world,workers", [(2, 3, 2), (5, 2, 2), (1, 2, 1), (4, 1, 0)])
def test_validation_scores_every_sample_exactly_once(tmp_path, shards, world, workers, with_counts):
    sizes = [7 + 3 * i for i in range(shards)]
    paths = write_shards(tmp_path, "val", sizes)
    urls = [str(p) for p in paths]
    data = DataConfig(train_shards="x", val_shards="y", workers=workers)
    keys = []
    for rank in range(world):
        stream = EvalStream(urls, decoder(), 4, rank, world, workers, shard_samples=sizes if with_counts else None)
        keys += [key for batch in make_loader(stream, data, False) for key in batch.keys]
    assert Counter(keys) == Counter(all_keys(paths))


def test_corrupt_jpeg_is_skipped_and_named(tmp_path):
    paths = write_shards(tmp_path, "val", [10], corrupt={"val-00-0003"})
    stream = EvalStream([str(paths[0])], decoder(), 4, 0, 1, 1)
    batches = list(itertools.chain(stream))
    keys = [key for batch in batches for key in batch.keys]
    bad = [entry for batch in batches for entry in batch.bad]
    assert "val-00-0003" not in keys and len(keys) == 9
    assert bad[0][0] == str(paths[0]) and bad[0][1] == "val-00-0003"


def test_truncated_tar_names_the_url(tmp_path):
    path = write_shards(tmp_path, "val", [10])[0]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 + 100])
    with pytest.raises(DataError, match=str(path)):
        list(iterate_shard(str(path)))


def test_missing_shard_names_the_url(tmp_path):
    missing = tmp_path / "val-000009.tar"
    with pytest.raises(DataError, match=str(missing)):
        list(iterate_shard(str(missing)))


def test_glob_and_brace_patterns(tmp_path):
    paths = write_shards(tmp_path, "train", [2, 2, 2])
    assert shard_urls(str(tmp_path / "train-*.tar")) == [str(p) for p in paths]
    assert shard_urls(str(tmp_path / "train-{000000..000002}.tar")) == [str(p) for p in paths]
    with pytest.raises(DataError, match="no shards"):
        shard_urls(str(tmp_path / "nothing-*.tar"))


def test_counts_without_manifest_scan_once_and_cache(tmp_path):
    paths = write_shards(tmp_path / "s", "train", [6, 4], positive_every=2)
    urls = [str(p) for p in paths]
    counts = split_counts(urls, "auto", tmp_path / "cache")
    expected_positives = sum(int(s["cls"]) for p in paths for s in tarfile_samples(p))
    assert (counts.samples, counts.positives, counts.per_shard) == (10, expected_positives, (6, 4))
    assert list((tmp_path / "cache").glob("counts-*.json"))
    assert split_counts(urls, "auto", tmp_path / "cache") == counts  # from the cache


def test_counts_from_the_manifest_give_each_shard_its_own(tmp_path):
    paths = write_shards(tmp_path, "train", [6, 4, 9])
    entries = [{"name": p.name, "samples": n, "positives": 1} for p, n in zip(paths, [6, 4, 9])]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": entries}))
    counts = split_counts([str(p) for p in paths], "auto")
    assert (counts.samples, counts.positives, counts.per_shard) == (19, 3, (6, 4, 9))


def tarfile_samples(path):
    """An independent reader: the stdlib's tarfile, not webdataset."""
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            if member.name.endswith(".cls"):
                yield {"cls": archive.extractfile(member).read().decode()}


def test_class_balanced_sampling_reaches_the_requested_fraction(tmp_path):
    urls = [str(p) for p in write_shards(tmp_path, "train", [30, 30], positive_every=10)]
    data = DataConfig(train_shards="x", val_shards="y", workers=0, shuffle_buffer=8, positive_fraction=0.5)
    stream = TrainStream(urls, data, decoder(), 8, 0, 1, 0, 0, 40, 0)
    labels = torch.cat([batch.labels for batch in make_loader(stream, data, False)])
    assert len(labels) == 320
    assert 0.4 < labels.mean().item() < 0.6


def test_uint8_decoding_normalised_on_the_device_equals_normalising_in_workers(tmp_path):
    from dist_train.config import AugmentConfig
    from dist_train.data.augment import Augmenter, Normaliser

    paths = write_shards(tmp_path, "train", [6])
    augment = Augmenter(AugmentConfig(rotation_deg=10, shift=0.1, brightness=[0.8, 1.2], hflip=True))
    in_workers = Decoder(32, MEAN, STD, (2.0, 8), augment)
    on_device = Decoder(32, MEAN, STD, (2.0, 8), augment, normalise=False)
    samples = list(iterate_shard(str(paths[0])))
    raw = torch.stack([on_device(sample, index) for index, sample in enumerate(samples)])
    assert raw.dtype == torch.uint8
    expected = torch.stack([in_workers(sample, index) for index, sample in enumerate(samples)])
    torch.testing.assert_close(Normaliser(MEAN, STD, torch.device("cpu"))(raw), expected, rtol=1e-5, atol=1e-5)


def test_a_batch_pins_its_tensors_when_the_loader_pins(monkeypatch):
    """The DataLoader's own pinning function on a Batch: without `Batch.pin_memory` it returns the batch
    unpinned. No GPU here, so `Tensor.pin_memory` is replaced by a marker that records what it pinned."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from dist_train.data.stream import Batch

    pinned: list[torch.Tensor] = []

    def mark(tensor, *args, **kwargs):
        pinned.append(tensor)
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", mark)
    batch = Batch(torch.zeros(2, 3, 4, 4), torch.ones(2), ["a", "b"], worker=1, raw_position=7)
    result = pin_memory(batch)
    assert isinstance(result, Batch) and result.keys == ["a", "b"] and result.raw_position == 7
    assert [tensor.shape for tensor in pinned] == [batch.images.shape, batch.labels.shape]
    assert result.images is not batch.images


class _SharedInWorker(torch.utils.data.IterableDataset):
    """The validation stream's batches, reported from inside the worker: shared already, and their pixels."""

    def __init__(self, stream: EvalStream):
        self.stream = stream

    def __iter__(self):
        for batch in self.stream:
            yield batch.images.is_shared(), batch.images.clone()


def test_workers_stack_batches_straight_into_shared_memory(tmp_path):
    """A plain torch.stack in the worker is copied into shared memory again when sent (bench/data_throughput.py:
    62 ms of a 34 ms-able hand-over per batch of 32 at 384 px); the product stacks there directly."""
    paths = [str(path) for path in write_shards(tmp_path, "val", [10])]
    loader = torch.utils.data.DataLoader(_SharedInWorker(EvalStream(paths, decoder(), 4, 0, 1, 1)),
                                         batch_size=None, num_workers=1)
    shared, images = zip(*loader, strict=True)
    assert all(shared), "a batch was stacked outside shared memory in the worker"
    in_process = [batch.images for batch in EvalStream(paths, decoder(), 4, 0, 1, 1)]
    assert not any(image.is_shared() for image in in_process)  # outside a worker: a plain stack
    expected = [torch.stack([decoder()(sample, 0) for sample in samples[start:start + 4]])
                for samples in [list(iterate_shard(paths[0]))] for start in range(0, 10, 4)]
    assert [image.shape for image in images] == [image.shape for image in expected] == \
        [image.shape for image in in_process]
    assert all(torch.equal(got, want) for got, want in zip(images, expected, strict=True))

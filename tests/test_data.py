"""The shard stream: slot layout, equal epochs, exactly-once validation, resume, bad samples.

These run each rank's stream in one process (a stream takes rank and world size as arguments, like
webdataset's splitters read RANK/WORLD_SIZE), with real DataLoader workers; the multi-process
versions with real gloo groups are in tests/distributed/.
"""

from __future__ import annotations

import itertools
import tarfile
from collections import Counter

import pytest
import torch

from dist_train.config import DataConfig
from dist_train.data import (
    DataError,
    Decoder,
    EvalStream,
    StreamPosition,
    TrainStream,
    assign_slots,
    iterate_shard,
    make_loader,
    shard_urls,
    split_counts,
)

from conftest import write_shards

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def decoder(size=32):
    return Decoder(size, MEAN, STD)


def all_keys(paths):
    return [sample["__key__"] for path in paths for sample in iterate_shard(str(path))]


@pytest.mark.parametrize("shards,slots", [(5, 4), (3, 4), (1, 3), (2, 6), (7, 2), (4, 4)])
def test_every_sample_belongs_to_exactly_one_slot(tmp_path, shards, slots):
    paths = write_shards(tmp_path, "val", [5 + i for i in range(shards)])
    urls = [str(p) for p in paths]
    owned = []
    for share in assign_slots(urls, slots):
        for url in share.urls:
            owned += [s["__key__"] for i, s in enumerate(iterate_shard(url)) if i % share.stride == share.offset]
    assert sorted(owned) == sorted(all_keys(paths))


def stream_keys(urls, rank, world, workers, epoch, micro_batches, seed=0, resume=None, batch=4, **cfg):
    data = DataConfig(train_shards="x", val_shards="y", workers=workers, shuffle_buffer=8, **cfg)
    stream = TrainStream(urls, data, decoder(), batch, rank, world, seed, epoch, micro_batches, workers,
                         resume=resume)
    return [b for b in make_loader(stream, data, False) if b.keys]


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


@pytest.mark.parametrize("shards,world,workers", [(2, 3, 2), (5, 2, 2), (1, 2, 1), (4, 1, 0)])
def test_validation_scores_every_sample_exactly_once(tmp_path, shards, world, workers):
    paths = write_shards(tmp_path, "val", [7 + 3 * i for i in range(shards)])
    urls = [str(p) for p in paths]
    data = DataConfig(train_shards="x", val_shards="y", workers=workers)
    keys = []
    for rank in range(world):
        stream = EvalStream(urls, decoder(), 4, rank, world, workers)
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
    assert (counts.samples, counts.positives) == (10, expected_positives)
    assert list((tmp_path / "cache").glob("counts-*.json"))


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
    from dist_train.augment import Augmenter, Normaliser
    from dist_train.config import AugmentConfig

    paths = write_shards(tmp_path, "train", [6])
    augment = Augmenter(AugmentConfig(rotation_deg=10, shift=0.1, brightness=[0.8, 1.2], hflip=True))
    in_workers = Decoder(32, MEAN, STD, (2.0, 8), augment)
    on_device = Decoder(32, MEAN, STD, (2.0, 8), augment, normalise=False)
    samples = list(iterate_shard(str(paths[0])))
    raw = torch.stack([on_device(sample, index) for index, sample in enumerate(samples)])
    assert raw.dtype == torch.uint8
    expected = torch.stack([in_workers(sample, index) for index, sample in enumerate(samples)])
    torch.testing.assert_close(Normaliser(MEAN, STD, torch.device("cpu"))(raw), expected, rtol=1e-5, atol=1e-5)

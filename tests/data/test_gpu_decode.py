"""data.decode=cuda, run with device "cpu": the oracle is the CPU path (PIL Decoder + Augmenter) on the same shards.

Stated tolerance: decoding is bitwise (torchvision's libjpeg on the CPU; nvJPEG on a GPU may differ by a
level or two, not measured here). Augmented, over 48 images of these shards: bilinear 99.989% of pixels
identical, 99.999% within 1 level, mean |difference| 0.0001; nearest 99.988% identical, mean 0.003 (max 55:
a pixel where PIL's fixed-point affine and the float64 source point fall on different sides of a pixel
edge). Asserted: >= 99.9% identical and mean <= 0.05 (nearest); >= 99.95% within 1 and mean <= 0.01
(bilinear). Keys, labels, order, resume positions and corrupt-sample lists are identical.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dist_train.config import AugmentConfig, DataConfig
from dist_train.data.augment import Augmenter
from dist_train.data.gpu_decode import DeviceDecoder
from dist_train.data.stream import (
    Batch,
    Decoder,
    EvalStream,
    StreamPosition,
    TrainStream,
    _batch,
    make_loader,
    shard_urls,
)
from dist_train.errors import DataError
from dist_train.train.distributed import DistEnv
from dist_train.train.loop import Trainer

from conftest import REPO, ShardSet, jpeg_bytes, write_shards
from run_helpers import tiny_config

SIZE = 32
AUGMENT = dict(rotation_deg=15, shift=0.1, scale=0.1, brightness=[0.8, 1.2], contrast=[0.8, 1.2], hflip=True,
               vflip=True)
CPU = torch.device("cpu")


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def gray_jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def headless_jpeg(seed: int) -> bytes:
    """A JPEG header and end marker with no scan: passes the workers' check, fails nvJPEG/libjpeg and PIL."""
    good = jpeg_bytes(seed, SIZE)
    return good[:good.index(b"\xff\xda")] + b"\xff\xd9"


def write_odd_shard(path: Path, prefix: str, with_headless: bool) -> dict[str, int]:
    """PNG, gray, larger-than-training-size, truncated and garbage samples (and optionally a headless JPEG)."""
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(big, "JPEG")
    samples = {"png": png_bytes(1), "gray": gray_jpeg(2), "big": big.getvalue(), "cut": jpeg_bytes(3)[:300],
               "junk": b"not a jpeg at all", "ok": jpeg_bytes(4)}
    if with_headless:
        samples["headless"] = headless_jpeg(5)
    labels = {}
    with wds.TarWriter(str(path)) as writer:
        for index, (name, data) in enumerate(samples.items()):
            key = f"{prefix}-{name}"
            extension = "png" if name == "png" else "jpg"
            writer.write({"__key__": key, extension: data, "cls": str(index % 2).encode()})
            labels[key] = index % 2
    return labels


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-decode")
    write_shards(root, "train", [14, 10], corrupt={"train-01-0003"})
    write_odd_shard(root / "train-000002.tar", "train-odd", with_headless=False)
    write_shards(root, "val", [9, 8], corrupt={"val-00-0002"})
    write_odd_shard(root / "val-000002.tar", "val-odd", with_headless=True)
    return root


def data_config(shards: Path, interpolation: str = "nearest", workers: int = 0) -> DataConfig:
    return DataConfig(train_shards=f"{shards}/train-*.tar", val_shards=f"{shards}/val-*.tar", image_size=SIZE,
                      shuffle_buffer=8, workers=workers, augment=AugmentConfig(**AUGMENT, interpolation=interpolation))


def decoder(cfg: DataConfig, on_device: bool, augment: bool = True) -> Decoder:
    augmenter = Augmenter(cfg.augment) if augment else None
    return Decoder(SIZE, (0.0,) * 3, (1.0,) * 3, None, augmenter, normalise=False, on_device=on_device)


def train_stream(cfg: DataConfig, on_device: bool, resume: StreamPosition | None = None) -> TrainStream:
    return TrainStream(shard_urls(cfg.train_shards), cfg, decoder(cfg, on_device), batch_size=4, rank=0,
                       world_size=1, seed=3, epoch=1, micro_batches=12, workers=max(cfg.workers, 1), resume=resume)


def on_device(batches: list[Batch], cfg: DataConfig) -> list[Batch]:
    return [DeviceDecoder(SIZE, cfg.augment.interpolation, CPU)(batch) for batch in batches]


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_device_path_gives_the_cpu_paths_samples_order_and_pixels(shards, interpolation):
    cfg = data_config(shards, interpolation)
    expected = list(train_stream(cfg, on_device=False))
    encoded = list(train_stream(cfg, on_device=True))
    assert all(batch.encoded is not None for batch in encoded if batch.keys)
    got = on_device(encoded, cfg)
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert [b.labels.tolist() for b in got] == [b.labels.tolist() for b in expected]
    assert [(b.worker, b.raw_position) for b in got] == [(b.worker, b.raw_position) for b in expected]
    assert [[(url, key) for url, key, _ in b.bad] for b in got] == [[(url, key) for url, key, _ in b.bad]
                                                                    for b in expected]
    bad_keys = {key for b in expected for _, key, _ in b.bad}
    assert bad_keys == {"train-01-0003", "train-odd-cut", "train-odd-junk"}
    seen = {key for b in expected for key in b.keys}
    assert {"train-odd-png", "train-odd-gray", "train-odd-big"} <= seen, "the worker-decoded fallbacks took part"
    cpu_pixels = torch.cat([b.images for b in expected if b.keys]).int()
    device_pixels = torch.cat([b.images for b in got if b.keys]).int()
    difference = (cpu_pixels - device_pixels).abs().float()
    if interpolation == "bilinear":
        assert (difference <= 1).float().mean() >= 0.9995 and difference.mean() <= 0.01
    else:
        assert (difference == 0).float().mean() >= 0.999 and difference.mean() <= 0.05


def test_device_path_resumed_mid_epoch_yields_the_uninterrupted_keys_and_pixels(shards):
    cfg = data_config(shards, workers=2)
    whole = on_device(list(make_loader(train_stream(cfg, on_device=True), cfg, False)), cfg)
    position = StreamPosition()
    for batch in whole[:5]:
        position.advance(batch)
    resumed = on_device(list(make_loader(train_stream(cfg, True, resume=position), cfg, False)), cfg)
    assert [b.keys for b in resumed] == [b.keys for b in whole[5:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, whole[5:]))
    cpu_keys = [b.keys for b in make_loader(train_stream(cfg, on_device=False), cfg, False)]
    assert [b.keys for b in whole] == cpu_keys


def eval_keys(cfg: DataConfig, on_device_decode: bool) -> tuple[list[str], list[str]]:
    """Scored and corrupt keys over 2 ranks x 2 workers, each batch through the device step as the Trainer does."""
    scored, bad = [], []
    for rank in range(2):
        stream = EvalStream(shard_urls(cfg.val_shards), decoder(cfg, on_device_decode, augment=False), 4, rank, 2,
                            cfg.workers)
        for batch in map(DeviceDecoder(SIZE, "nearest", CPU), make_loader(stream, cfg, False)):
            scored += batch.keys
            bad += [key for _, key, _ in batch.bad]
    return scored, bad


def test_eval_stream_on_device_scores_each_validation_sample_once(shards):
    cfg = data_config(shards, workers=2)
    scored, bad = eval_keys(cfg, on_device_decode=True)
    cpu_scored, cpu_bad = eval_keys(cfg, on_device_decode=False)
    assert len(scored) == len(set(scored)), "a validation sample was scored twice"
    assert set(scored) == set(cpu_scored) and sorted(bad) == sorted(cpu_bad)
    assert sorted(bad) == ["val-00-0002", "val-odd-cut", "val-odd-headless", "val-odd-junk"]
    assert len(scored) + len(bad) == 9 + 8 + 7


def test_a_jpeg_the_device_cannot_decode_is_dropped_and_named_and_the_rest_decoded(shards):
    """The whole-batch decode fails on the headless JPEG; one by one, the others still decode as on the CPU."""
    url = str(shards / "val-000002.tar")
    samples = [{"__key__": "a", "jpg": jpeg_bytes(11), "__url__": url},
               {"__key__": "b", "jpg": headless_jpeg(12), "__url__": url},
               {"__key__": "c", "jpg": gray_jpeg(13), "__url__": url}]
    cfg = data_config(shards)
    bytes_only = decoder(cfg, True, augment=False)
    encoded = [bytes_only.worker_item(sample, 0) for sample in samples]
    batch = DeviceDecoder(SIZE, "nearest", CPU)(_batch(bytes_only, encoded, [1, 0, 1], ["a", "b", "c"], 0, 3, []))
    assert batch.keys == ["a", "c"] and batch.labels.tolist() == [1.0, 1.0]
    assert [(where, key) for where, key, _ in batch.bad] == [(url, "b")]
    cpu = decoder(cfg, False, augment=False)
    assert torch.equal(batch.images, torch.stack([cpu(samples[0], 0), cpu(samples[2], 0)]))


def test_cuda_decode_with_per_epoch_clahe_is_refused_in_one_line_before_anything_runs(shards, tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                          str(REPO / "configs" / "test_tiny.yaml"), "--set", f"data.train_shards={shards}/train-*.tar",
                          f"data.val_shards={shards}/val-*.tar", f"run_root={tmp_path}", "data.decode=cuda",
                          "data.clahe=true"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.decode" in lines[0] and "--clahe" in lines[0], run.stderr
    assert not any(tmp_path.iterdir()), "a refused run wrote files"


def test_cuda_decode_without_cuda_says_so_once_and_trains_on_the_cpu_path(make_shards, tmp_path, caplog):
    config = tiny_config(make_shards(train=[16], val=[8]), tmp_path, "data.decode=cuda", "train.epochs=1")
    with caplog.at_level(logging.WARNING, logger="dist_train.data.gpu_decode"):
        trainer = Trainer(config, DistEnv())
        summary = trainer.train()
    said = [record for record in caplog.records if "data.decode=cuda" in record.getMessage()]
    assert len(said) == 1 and "CPU workers" in said[0].getMessage()
    assert not trainer.decoders["train"].on_device and summary["epochs_done"] == 1


def test_trainer_with_device_decoders_trains_counts_corrupt_samples_and_scores_as_the_cpu_path(shards, tmp_path):
    """The Trainer's two hooks (training batches, evaluation loader), driven with decoders made for the device."""
    cpu = Trainer(tiny_config(ShardSet(shards), tmp_path / "cpu", "train.batch_size=4"), DistEnv())
    device = Trainer(tiny_config(ShardSet(shards), tmp_path / "device", "train.batch_size=4"), DistEnv())
    device.decoders = {name: Decoder(SIZE, d.mean, d.std, None, d.augmenter, d.normalise, on_device=True)
                       for name, d in device.decoders.items()}
    expected, got = cpu._score(), device._score()
    assert got.keys == expected.keys and sorted(k for _, k, _ in got.bad) == sorted(k for _, k, _ in expected.bad)
    torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(expected.scores), rtol=0, atol=1e-6)
    device.enter_phase(0)
    stats = device.run_steps(0, device.steps_per_epoch)
    assert stats.samples == device.steps_per_epoch * 4
    assert {key for _, key in device.bad_samples.this_epoch} == {"train-01-0003", "train-odd-cut", "train-odd-junk"}



def test_a_training_batch_with_no_decodable_sample_stops_the_run_in_one_line(shards, tmp_path):
    """Skipped, such a batch would leave this rank a step short of the others (the workers counted it): the
    oracle is the stream's quota, which the CPU path meets by refilling and the device path cannot."""
    bad = tmp_path / "headless"
    bad.mkdir()
    with wds.TarWriter(str(bad / "train-000000.tar")) as writer:
        for index in range(8):
            writer.write({"__key__": f"headless-{index}", "jpg": headless_jpeg(20 + index), "cls": b"1"})
    config = tiny_config(ShardSet(shards), tmp_path / "run", "train.batch_size=4",
                         f"data.train_shards={bad}/train-*.tar")
    device = Trainer(config, DistEnv())
    device.decoders = {name: Decoder(SIZE, d.mean, d.std, None, d.augmenter, d.normalise, on_device=True)
                       for name, d in device.decoders.items()}
    device.enter_phase(0)
    with pytest.raises(DataError) as refused:
        device.run_steps(0, device.steps_per_epoch)
    message = str(refused.value)
    assert "\n" not in message and "headless-" in message and "data.decode=cpu" in message

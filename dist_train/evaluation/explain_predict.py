"""`predict.py --explain DIR`: a Grad-CAM overlay for every image the command scores.

The overlays must show what the scores came from, so the inputs are rebuilt the way `Predictor` builds
them: raw images through the shard builder's crop and resize and the JPEG re-encode at the export's
quality, shard samples as stored, then the export's decoder (CLAHE, normalisation). A test holds the
model's scores on these tensors equal to `Predictor`'s. Images that cannot be read are skipped here
without a word: the scoring pass has already named them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch

from dist_train.data.decode import Decoder
from dist_train.data.preprocess import raw_image_clahe
from dist_train.data.stream import iterate_shard
from dist_train.data.transforms import BadImageError
from dist_train.errors import DataError
from dist_train.evaluation.explain import write_overlays
from dist_train.evaluation.inference import Predictor


def explain_images(predictor: Predictor, images: dict[str, Path], out_dir: Path, batch_size: int = 32) -> int:
    """Overlays of raw images (id -> path) as `out_dir/<id>.png`; returns how many were written."""
    samples = (pair for pair in map(_raw_sample(predictor), sorted(images.items())) if pair)
    decoder = predictor.decoder(raw_image_clahe(predictor.meta["preprocess"]))
    return _write_all(predictor, decoder, samples, out_dir, batch_size)


def explain_shards(predictor: Predictor, urls: list[str], out_dir: Path, batch_size: int = 32) -> int:
    """Overlays of every sample of the shards, named by sample key; returns how many were written."""
    return _write_all(predictor, predictor.shards_decoder(urls), _shard_samples(urls), out_dir, batch_size)


def _raw_sample(predictor: Predictor):
    """A raw image as the JPEG bytes of a shard sample, as `Predictor.score_images` prepares it (None if unreadable)."""

    def prepare(item: tuple[str, Path]) -> tuple[str, bytes] | None:
        key, path = item
        try:
            return key, predictor.prepare(path)
        except (BadImageError, OSError):
            return None

    return prepare


def _shard_samples(urls: list[str]) -> Iterator[tuple[str, bytes]]:
    for url in urls:
        try:
            for sample in iterate_shard(url):
                image = next((sample[ext] for ext in ("jpg", "jpeg", "png") if ext in sample), None)
                if image is not None:
                    yield sample["__key__"], image
        except DataError:
            continue


def _write_all(predictor: Predictor, decoder: Decoder, samples: Iterable[tuple[str, bytes]], out_dir: Path,
               batch_size: int) -> int:
    pre, written = predictor.meta["preprocess"], 0
    iterator = iter(samples)
    while chunk := list(islice(iterator, batch_size)):
        keys, tensors = [], []
        for key, image in chunk:
            try:
                tensors.append(decoder({"jpg": image}, 0))
            except (OSError, ValueError):
                continue
            keys.append(key)
        if keys:
            written += len(write_overlays(predictor.model, torch.stack(tensors), keys, out_dir, tuple(pre["mean"]),
                                          tuple(pre["std"])))
    return written

"""The device half of `data.decode: cuda`: a batch of JPEG bytes to the 8-bit images the CPU path would give.

The DataLoader workers run the very same streams as on the CPU path (so samples, order, quotas, resume
positions and exactly-once validation are the CPU path's) but stop after reading bytes and drawing each
sample's augmentation parameters (`decode.Decoder(on_device=True)`). Here nvJPEG decodes the whole
batch in one call (`torchvision.io.decode_jpeg(list, device=...)`) and `augment.augment_batch` applies the
worker's parameters; `augment.Normaliser` follows, as for every GPU run. The same code runs with device
"cpu" (libjpeg), which is how the tests compare it with the CPU path.

The workers send nvJPEG only complete RGB/gray JPEGs at the training size (header and end marker checked;
anything else they decode with PIL as the CPU path does, so what PIL rejects is a corrupt sample there too).
A batch call still fails as a whole when one JPEG is bad inside, so on failure each image is decoded
alone; one that nvJPEG refuses is decoded by PIL on the host as the CPU path would, and only one PIL
rejects too joins `batch.bad` - the one place the paths differ: that batch is one sample short, where
the CPU path would have filled it with the next sample. A training batch with no sample left stops the
run (`DeviceDecoder.training_batch`): skipping it would leave the rank a step short. Per-epoch CLAHE has no GPU kernel: the
config refuses it with data.decode=cuda (build the shards with --clahe instead).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from dist_train.config import DataConfig
from dist_train.data.augment import Augmenter, augment_batch
from dist_train.data.decode import Decoder, EncodedBatch, decode_rgb
from dist_train.data.stream import Batch
from dist_train.errors import DataError

log = logging.getLogger(__name__)


def decodes_on_device(cfg: DataConfig, device: torch.device) -> bool:
    """Whether this run decodes on the GPU: data.decode=cuda on a CUDA device; otherwise the CPU path,
    said once in the log so a run that asked for the GPU and did not get it is visible."""
    if cfg.decode != "cuda":
        return False
    if device.type == "cuda":
        return True
    log.warning("data.decode=cuda but this run has no CUDA device (%s): decoding in the CPU workers instead",
                device)
    return False


def size_warning(cfg: DataConfig, shard_preprocessing: dict[str, Any]) -> str | None:
    """data.decode=cuda sends nvJPEG only JPEGs at data.image_size: from shards built at another size every
    image is decoded in the workers, which the run would otherwise not show."""
    built = shard_preprocessing.get("size")
    if cfg.decode != "cuda" or built is None or built == cfg.image_size:
        return None
    return (f"data.decode=cuda: the shards were built at {built} px, not data.image_size={cfg.image_size}; nvJPEG "
            f"takes only images at the training size, so every image is decoded in the workers: rebuild the shards "
            f"with shards/build.py --size {cfg.image_size}")


def run_decoders(cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...], clahe: tuple[float, int] | None,
                 device: torch.device) -> dict[str, Decoder]:
    """A run's training and evaluation decoders on `device`. On a GPU, workers hand over 8-bit images and the
    GPU normalises; on a CPU, workers normalise. `clahe`: what the decoder applies (clahe_plan's `in_decoder`,
    None for shards built with it). With data.decode=cuda on a GPU the workers only read bytes and a
    `DeviceDecoder` decodes them."""
    in_workers, on_device = device.type != "cuda", decodes_on_device(cfg, device)
    train = Decoder(cfg.image_size, mean, std, clahe, Augmenter(cfg.augment), in_workers, on_device)
    return {"train": train, "eval": Decoder(cfg.image_size, mean, std, clahe, None, in_workers, on_device)}


class DeviceDecoder:
    """Decode (and augment, when the workers drew parameters) a Batch's encoded samples on `device`."""

    def __init__(self, image_size: int, interpolation: str, device: torch.device | str):
        self.image_size, self.interpolation, self.device = image_size, interpolation, torch.device(device)

    def __call__(self, batch: Batch) -> Batch:
        """The batch with 3xHxW uint8 images on the device; a batch decoded in the workers passes as it is."""
        encoded = batch.encoded
        if encoded is None:
            return batch
        images, failures = self._decode(encoded)
        kept = [index for index, image in enumerate(images) if image is not None]
        decoded = [image for image in images if image is not None]
        bad = [(encoded.urls[index], batch.keys[index], reason) for index, reason in failures]
        for shard, key, reason in bad:
            log.warning("skipping corrupt sample %s in %s: %s", key, shard, reason)
        if not kept:
            return dataclasses.replace(batch, images=torch.empty(0), labels=torch.empty(0), keys=[],
                                       bad=batch.bad + bad, encoded=None)
        stacked = torch.stack(decoded)
        if encoded.params is not None:
            stacked = augment_batch(stacked, encoded.params[kept], self.interpolation)
        return dataclasses.replace(batch, images=stacked, labels=batch.labels[kept],
                                   keys=[batch.keys[index] for index in kept], bad=batch.bad + bad, encoded=None)

    def training_batch(self, batch: Batch) -> Batch:
        """As a call, but a training batch none of whose samples decodes is a DataError.

        The workers counted it towards this rank's quota of micro-batches, and the CPU path's refilling
        cannot happen here: skipped, it would leave this rank one step short of the others (a collective
        paired with the wrong one, or a hang) and its resume position off by one batch."""
        decoded = self(batch)
        if batch.encoded is not None and not decoded.keys:
            shard, key, reason = decoded.bad[-1]
            raise DataError(f"no sample of a training batch decodes ({len(batch.keys)} bad, last {key} in {shard}: "
                            f"{reason}); data.decode=cuda cannot replace them: train with data.decode=cpu, which "
                            f"skips corrupt samples, or rebuild the shard (shards/build.py verify names them)")
        return decoded

    def _decode(self, encoded: EncodedBatch) -> tuple[list[torch.Tensor | None], list[tuple[int, str]]]:
        """Every payload as a 3xHxW uint8 tensor on the device (None where it failed), and why each failed."""
        payloads = encoded.payloads()
        images: list[torch.Tensor | None] = [None] * len(payloads)
        jpegs = [index for index, shape in enumerate(encoded.shapes) if shape is None]
        for index, shape in enumerate(encoded.shapes):
            if shape is not None:
                images[index] = payloads[index].view(shape).permute(2, 0, 1).to(self.device)
        failures: list[tuple[int, str]] = []
        if not jpegs:
            return images, failures
        try:
            decoded = decode_jpeg([payloads[index] for index in jpegs], mode=ImageReadMode.RGB, device=self.device)
            for index, image in zip(jpegs, decoded):
                images[index] = image
        except RuntimeError:
            for index in jpegs:
                images[index], reason = self._decode_one(payloads[index])
                if reason is not None:
                    failures.append((index, reason))
        return images, failures

    def _decode_one(self, payload: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
        """One JPEG alone: on the device, else by PIL as the CPU path decodes it, else (None, the reason)."""
        try:
            return decode_jpeg(payload, mode=ImageReadMode.RGB, device=self.device), None
        except RuntimeError:
            pass
        try:
            pixels = np.asarray(decode_rgb(payload.numpy().tobytes(), self.image_size))
        except Exception as error:  # what decode_batches counts as a corrupt sample on the CPU path
            return None, f"{type(error).__name__}: {error}"
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(self.device), None

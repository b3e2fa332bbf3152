"""Shard samples to tensors, in a DataLoader worker: decode, resize, CLAHE, augmentation, normalisation.

The streams (stream.py) decide which samples a worker reads and in which order; this module only turns
one sample's bytes into what the worker hands on: the 8-bit image, which `Decoder.collate` normalises
into one float batch (CPU runs) or stacks (GPU runs normalise on the device), or with `data.decode: cuda`
the JPEG bytes and the augmentation parameters drawn from the sample's own seed
(`gpu_decode.DeviceDecoder` finishes on the GPU).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from dist_train.data.augment import Augmenter, AugmentParams, normalisation, to_normalised_tensor
from dist_train.data.transforms import apply_clahe
from dist_train.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


def sample_image_bytes(sample: dict[str, Any]) -> bytes:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image (.jpg/.png)")


def decode_rgb(data: bytes, image_size: int) -> Image.Image:
    """PIL's decode at the training size: JPEG DCT scaling (draft) when much larger, then a bilinear resize."""
    image: Image.Image
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (image_size, image_size))
        image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return image


JPEG_END = b"\xff\xd9"


def device_decodable(data: bytes, image_size: int) -> bool:
    """Whether nvJPEG can take these bytes as they are: a complete (end marker last) RGB or gray JPEG
    already at the training size.

    Only the header is parsed (PIL opens lazily). Anything else - PNG, CMYK, a truncated file, trailing
    bytes, another size (PIL's reduced-scale decode and resize have no exact GPU twin; shards are built at
    the training size) - is decoded in the worker as the CPU path does it, so a file PIL rejects is a
    corrupt sample on both paths."""
    if not data.endswith(JPEG_END):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.format == "JPEG" and image.mode in ("RGB", "L")
                    and image.size == (image_size, image_size))
    except Exception:  # the worker's full decode names the problem
        return False


def normalise_into(out: torch.Tensor, images: list[torch.Tensor], mean: tuple[float, ...],
                   std: tuple[float, ...]) -> torch.Tensor:
    """3xHxW uint8 `images` converted into the rows of the float batch `out`, then normalised in place:
    the same float operations as `to_normalised_tensor` per image, with no float tensor per image."""
    for row, image in zip(out, images):
        row.copy_(image)
    offset, scale = normalisation(mean, std)
    return out.sub_(offset).div_(scale)


def _chw(pixels: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 pixels as a 3xHxW uint8 tensor of its own (PIL's buffer is read-only and short-lived)."""
    return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class EncodedSample:
    """What a bytes-only Decoder hands on: JPEG bytes (`shape` None) or pixels it had to decode (H, W, 3)."""

    payload: bytes
    shape: tuple[int, ...] | None
    params: list[float] | None
    url: str = ""
    """The shard it came from, to name it if the device cannot decode it."""


@dataclass
class EncodedBatch:
    """A batch's payloads in one uint8 tensor (one shared-memory block from a worker, not N), and the
    (N, 8) augmentation parameters drawn in the worker (None: no augmentation)."""

    data: torch.Tensor
    lengths: list[int]
    shapes: list[tuple[int, ...] | None]
    params: torch.Tensor | None
    urls: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, samples: list[EncodedSample]) -> EncodedBatch:
        data = torch.from_numpy(np.frombuffer(b"".join(s.payload for s in samples), dtype=np.uint8).copy())
        rows = [s.params for s in samples]
        params = None if rows[0] is None else torch.tensor(rows, dtype=torch.float64)
        return cls(data, [len(s.payload) for s in samples], [s.shape for s in samples], params,
                   [s.url for s in samples])

    def payloads(self) -> list[torch.Tensor]:
        return list(torch.split(self.data, self.lengths))


@dataclass
class Decoder:
    """Bytes to a tensor: decode, resize, optional CLAHE, augmentation, then normalisation.

    With `normalise=False` it returns the 8-bit image (3xHxW uint8) and `augment.Normaliser` finishes
    the job on the GPU: a quarter of the bytes to stack, share between processes and copy. With
    `on_device=True` the workers' `worker_item` stops after reading bytes and drawing the augmentation
    parameters (an `EncodedSample`); `gpu_decode.DeviceDecoder` does the rest on the GPU. Calling it
    always decodes here, on the CPU.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    clahe: tuple[float, int] | None = None
    augmenter: Augmenter | None = None
    normalise: bool = True
    on_device: bool = False
    reuse_buffers: bool = True
    """In DataLoader workers, write batches into reused shared tensors (`buffers.py`); False: a new one per
    batch, as before (bench/data_throughput.py's baseline)."""

    def __post_init__(self) -> None:
        if self.on_device and self.clahe is not None:
            raise ValueError("Decoder(on_device=True) cannot run CLAHE: the config refuses data.decode=cuda with it")

    def worker_item(self, sample: dict[str, Any], sample_seed: int) -> torch.Tensor | EncodedSample:
        """What a DataLoader worker keeps of the sample until its batch is full: the 8-bit image (`collate`
        normalises the whole batch), or with `on_device` its bytes."""
        if self.on_device:
            return dataclasses.replace(self.encoded(sample_image_bytes(sample), sample_seed),
                                       url=str(sample.get("__url__")))
        return _chw(self._pixels(sample, sample_seed))

    def batch_layout(self, images: list[torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of `collate`'s batch of these `worker_item`s."""
        return (len(images), *images[0].shape), torch.float32 if self.normalise else images[0].dtype

    def collate(self, images: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """`worker_item`s as one batch, written into `out` (a worker's pooled shared tensor, `buffers.batch_buffer`)
        or a new tensor: the 8-bit images stacked, or, when this decoder normalises, normalised straight into
        one float batch, the values of `to_normalised_tensor` image by image. One float batch written once,
        instead of a float tensor per image stacked into shared memory, was a fifth of a worker's per-image
        work (bench/data_throughput.py)."""
        if out is None:
            shape, dtype = self.batch_layout(images)
            out = torch.empty(shape, dtype=dtype)
        if not self.normalise:
            return torch.stack(images, out=out)
        return normalise_into(out, images, self.mean, self.std)

    def __call__(self, sample: dict[str, Any], sample_seed: int) -> torch.Tensor:
        pixels = self._pixels(sample, sample_seed)
        if not self.normalise:
            return _chw(pixels)
        return to_normalised_tensor(pixels, self.mean, self.std)

    def _pixels(self, sample: dict[str, Any], sample_seed: int) -> np.ndarray:
        """The sample as HxWx3 uint8: decoded at the training size, CLAHE, augmentation."""
        image = decode_rgb(sample_image_bytes(sample), self.image_size)
        if self.clahe is not None:
            image = Image.fromarray(apply_clahe(np.asarray(image), clip_limit=self.clahe[0], tile_grid=self.clahe[1]))
        if self.augmenter is not None:
            image = self.augmenter(image, np.random.default_rng(sample_seed))
        return np.asarray(image)

    def encoded(self, data: bytes, sample_seed: int) -> EncodedSample:
        """The bytes (or, where nvJPEG cannot take them, the CPU path's pixels) and the sample's parameters,
        drawn from the same per-sample seed the CPU path draws them from."""
        params: AugmentParams | None = None
        if self.augmenter is not None:
            params = self.augmenter.draw(np.random.default_rng(sample_seed), self.image_size)
        row = params.row() if params is not None else None
        if device_decodable(data, self.image_size):
            return EncodedSample(data, None, row)
        pixels = np.asarray(decode_rgb(data, self.image_size))
        return EncodedSample(pixels.tobytes(), pixels.shape, row)

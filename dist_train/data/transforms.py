"""Fundus preprocessing shared by shard building, training and prediction.

One function decides how a raw photograph becomes a model input (crop to the fundus
disc, pad to a black square, resize), so the shards, the training pipeline and the
predictor cannot drift apart.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Union

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from dist_train.errors import UserError

ImageSource = Union[str, Path, bytes]

BOX_SEARCH_SIDE = 256
"""Longest side of the luminance map the disc is searched on: enough for a 1% accurate box."""
DRAFT_MARGIN = 1.25
"""JPEG draft decoding keeps the short side at least this many times the target size."""
MIN_DISC_AREA = 0.1
"""A bright region smaller than this fraction of the image is not taken for the disc."""
MAX_BLACK_LEVEL = 25
"""A darkest percentile above this means there is no black border to crop away."""


class BadImageError(UserError, ValueError):
    """An image that cannot be decoded completely (unreadable, truncated, empty)."""


def find_fundus_box(image: Image.Image) -> tuple[int, int, int, int]:
    """Crop box (left, top, right, bottom) of the fundus disc on its black border.

    Thresholds a median-filtered, downscaled luminance map well above the border's black
    level (which absorbs sensor noise and JPEG ringing) and boxes the largest bright
    region. Returns the whole image when no black border or no disc is found.
    """
    width, height = image.size
    full = (0, 0, width, height)
    factor = max(1, math.ceil(max(width, height) / BOX_SEARCH_SIDE))
    image = image if image.mode in ("L", "RGB") else image.convert("RGB")
    small = image.reduce(factor) if factor > 1 else image
    luminance = cv2.medianBlur(np.asarray(small.convert("L")), 5)
    black, bright = np.percentile(luminance, [1, 99])
    if black > MAX_BLACK_LEVEL or bright - black < 10:
        return full
    threshold = black + max(10.0, 0.1 * (bright - black))
    mask = (luminance > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return full
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = stats[largest]
    if area < MIN_DISC_AREA * mask.size:
        return full
    scale_x, scale_y = width / small.width, height / small.height
    return (
        max(0, math.floor(x * scale_x)),
        max(0, math.floor(y * scale_y)),
        min(width, math.ceil((x + w) * scale_x)),
        min(height, math.ceil((y + h) * scale_y)),
    )


def load_fundus(source: ImageSource, size: int) -> tuple[Image.Image, dict]:
    """Decode, crop to the fundus, pad to a black square and resize to size x size RGB.

    Large JPEGs are decoded at a reduced scale (libjpeg DCT scaling via Image.draft) while
    the fundus crop stays at least `size` pixels. `info` gives the original size and the
    crop box in original pixel coordinates. Raises BadImageError for unreadable input.
    """
    image, original_size = _decode(source, lambda full: int(min(full) / (size * DRAFT_MARGIN)))
    box = _to_original(find_fundus_box(image), image.size, original_size)
    side = max(box[2] - box[0], box[3] - box[1])
    if side * image.width / original_size[0] < size < side:
        image, _ = _decode(source, lambda full: side // size)
    crop = _square_crop(image, _to_decoded(box, original_size, image.size))
    return _resize(crop, size), {"original_size": list(original_size), "crop_box": list(box)}


def apply_clahe(rgb: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the lightness channel only.

    Equalising L in LAB sharpens the cup and vessels without shifting the colours the
    model also relies on.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def shard_jpeg(image: Image.Image, quality: int, clahe: tuple[float, int] | None = None) -> bytes:
    """The JPEG bytes a shard stores for a preprocessed fundus: CLAHE (clip limit, tile grid) first if asked.

    The shard builder and the predictor's raw-image path both encode through here, so a raw image scored by a
    model trained on CLAHE-at-build shards gets the very bytes its shard sample would have had.
    """
    if clahe is not None:
        image = Image.fromarray(apply_clahe(np.asarray(image.convert("RGB")), clip_limit=clahe[0], tile_grid=clahe[1]))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _open(source: ImageSource) -> Image.Image:
    """Open lazily (header only); decoding errors surface later in _decode."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        return Image.open(stream)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise BadImageError(f"cannot identify image: {error}") from error


def _decode(source: ImageSource, max_scale_for: Callable[[tuple[int, int]], int]):
    """Fully decode as RGB, JPEG-reduced by at most max_scale_for(original size).

    Returns (rgb, original_size). Truncated or corrupt data raises BadImageError.
    """
    image = _open(source)
    original_size = image.size
    max_scale = max_scale_for(original_size)
    if max_scale > 1:
        image.draft("RGB", (math.ceil(original_size[0] / max_scale), math.ceil(original_size[1] / max_scale)))
    try:
        image.load()
        return image.convert("RGB"), original_size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(f"cannot decode image: {error}") from error
    finally:
        image.close()


def _to_original(box, decoded_size, original_size) -> tuple[int, int, int, int]:
    """Map a box on the decoded image to original pixel coordinates."""
    sx, sy = original_size[0] / decoded_size[0], original_size[1] / decoded_size[1]
    left, top, right, bottom = box
    return (
        max(0, math.floor(left * sx)),
        max(0, math.floor(top * sy)),
        min(original_size[0], math.ceil(right * sx)),
        min(original_size[1], math.ceil(bottom * sy)),
    )


def _to_decoded(box, original_size, decoded_size) -> tuple[float, float, float, float]:
    sx, sy = decoded_size[0] / original_size[0], decoded_size[1] / original_size[1]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _resize(image: Image.Image, size: int) -> Image.Image:
    """Area averaging when shrinking (antialiased, twice as fast as Lanczos), Lanczos when enlarging."""
    if image.width > size:
        return Image.fromarray(cv2.resize(np.asarray(image), (size, size), interpolation=cv2.INTER_AREA))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _square_crop(image: Image.Image, box) -> Image.Image:
    """Square crop centred on box; Pillow fills the part outside the image with black."""
    left, top, right, bottom = box
    side = max(1, round(max(right - left, bottom - top)))
    x0 = round((left + right - side) / 2)
    y0 = round((top + bottom - side) / 2)
    return image.crop((x0, y0, x0 + side, y0 + side))

"""Training augmentation on 8-bit PIL images, and test-time augmentation views of normalised tensors.

Parameters are drawn from a generator the caller seeds per sample, so a sample's augmentation does not
depend on which samples came before it (exact mid-epoch resume) or on the worker that decoded it.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from dist_train.config import AugmentConfig

TTA_VIEWS = {"none": 1, "hflip": 2, "five_crop_hflip": 10}


def to_normalised_tensor(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """HxWx3 uint8 to a 3xHxW float tensor normalised with the backbone's mean and std, in one pass."""
    tensor = torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1).float()
    scale = torch.tensor([255.0 * s for s in std]).view(3, 1, 1)
    offset = torch.tensor([255.0 * m for m in mean]).view(3, 1, 1)
    return tensor.sub_(offset).div_(scale)


class Normaliser:
    """Normalise a uint8 batch where it already is (the GPU): what workers skip with Decoder(normalise=False)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        self.offset = torch.tensor([255.0 * m for m in mean], device=device).view(1, 3, 1, 1)
        self.scale = torch.tensor([255.0 * s for s in std], device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images if images.is_floating_point() else (images.float() - self.offset) / self.scale


class Augmenter:
    """Random affine, brightness/contrast and flips, as the recipes configure them.

    Works on the 8-bit PIL image, before the float conversion: PIL's affine and enhancers cost a
    fraction of the same operations on float tensors (see bench/data_throughput.py).
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        cfg = self.cfg
        angle = float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
        size = image.size[0]
        shift = [int(round(rng.uniform(-cfg.shift, cfg.shift) * size)) for _ in range(2)]
        scale = float(rng.uniform(1 - cfg.scale, 1 + cfg.scale))
        # the schema admits exactly two numbers (low, high) for each range
        brightness = float(rng.uniform(*cast("tuple[float, float]", cfg.brightness)))
        contrast = float(rng.uniform(*cast("tuple[float, float]", cfg.contrast)))
        hflip = cfg.hflip and rng.random() < 0.5
        vflip = cfg.vflip and rng.random() < 0.5
        if angle or any(shift) or scale != 1.0:
            image = F.affine(image, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0],
                             interpolation=F.InterpolationMode(cfg.interpolation))
        if brightness != 1.0:
            image = F.adjust_brightness(image, brightness)
        if contrast != 1.0:
            image = F.adjust_contrast(image, contrast)
        if hflip:
            image = F.horizontal_flip(image)
        if vflip:
            image = F.vertical_flip(image)
        return image


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views whose predicted probabilities are averaged: 1, 2 (flip) or 10 (five crops x flip)."""
    if mode == "none":
        return [images]
    if mode == "hflip":
        return [images, F.horizontal_flip(images)]
    size = images.shape[-1]
    crop = max(1, int(round(size * 0.875)))
    crops = [F.resize(view, [size, size], antialias=True) for view in F.five_crop(images, [crop, crop])]
    return crops + [F.horizontal_flip(view) for view in crops]

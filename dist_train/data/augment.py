"""Training augmentation on 8-bit PIL images or on 8-bit tensor batches, and test-time augmentation views.

Parameters are drawn from a generator the caller seeds per sample, so a sample's augmentation does not
depend on which samples came before it (exact mid-epoch resume) or on the worker that decoded it. Drawing
(`Augmenter.draw`) is apart from applying, so the GPU decode path (`data.decode: cuda`) draws the same
numbers in the workers and applies them to a whole batch on the device (`augment_batch`), with
torchvision's tensor kernels' arithmetic per sample.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

from dist_train.config import AugmentConfig

TTA_VIEWS = {"none": 1, "hflip": 2, "five_crop_hflip": 10}


def normalisation(mean: tuple[float, ...], std: tuple[float, ...],
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(255 * mean, 255 * std) as 1x3x1x1 float tensors: what every path subtracts from 8-bit pixels and
    divides by. One source, so the image, batch and device paths stay bitwise equal."""
    offset = torch.tensor([255.0 * m for m in mean], device=device).view(1, 3, 1, 1)
    return offset, torch.tensor([255.0 * s for s in std], device=device).view(1, 3, 1, 1)


def to_normalised_tensor(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """HxWx3 uint8 to a 3xHxW float tensor normalised with the backbone's mean and std, in one pass."""
    tensor = torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1).float()
    offset, scale = normalisation(mean, std)
    return tensor.sub_(offset[0]).div_(scale[0])


class Normaliser:
    """Normalise a uint8 batch where it already is (the GPU): what workers skip with Decoder(normalise=False)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        self.offset, self.scale = normalisation(mean, std, device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images if images.is_floating_point() else (images.float() - self.offset) / self.scale


@dataclass(frozen=True)
class AugmentParams:
    """One sample's augmentation: what `Augmenter.draw` drew, applied on a PIL image or a tensor row."""

    angle: float = 0.0
    shift_x: int = 0
    shift_y: int = 0
    scale: float = 1.0
    brightness: float = 1.0
    contrast: float = 1.0
    hflip: bool = False
    vflip: bool = False

    @property
    def moves(self) -> bool:
        return bool(self.angle or self.shift_x or self.shift_y or self.scale != 1.0)

    def row(self) -> list[float]:
        """The parameters as floats, one row of the (N, 8) tensor a batch carries to the device."""
        return [float(value) for value in astuple(self)]

    @classmethod
    def from_row(cls, row: list[float]) -> AugmentParams:
        angle, shift_x, shift_y, scale, brightness, contrast, hflip, vflip = row
        return cls(angle, int(shift_x), int(shift_y), scale, brightness, contrast, bool(hflip), bool(vflip))


class Augmenter:
    """Random affine, brightness/contrast and flips, as the recipes configure them.

    Works on the 8-bit PIL image, before the float conversion: PIL's affine and enhancers cost a
    fraction of the same operations on float tensors (see bench/data_throughput.py).
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return self.apply(image, self.draw(rng, image.size[0]))

    def draw(self, rng: np.random.Generator, size: int) -> AugmentParams:
        """The sample's parameters, in the order (and with the skipped draws) every earlier run made them."""
        cfg = self.cfg
        angle = float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
        shift = [int(round(rng.uniform(-cfg.shift, cfg.shift) * size)) for _ in range(2)]
        scale = float(rng.uniform(1 - cfg.scale, 1 + cfg.scale))
        # the schema admits exactly two numbers (low, high) for each range
        brightness = float(rng.uniform(*cast("tuple[float, float]", cfg.brightness)))
        contrast = float(rng.uniform(*cast("tuple[float, float]", cfg.contrast)))
        hflip = bool(cfg.hflip and rng.random() < 0.5)
        vflip = bool(cfg.vflip and rng.random() < 0.5)
        return AugmentParams(angle, shift[0], shift[1], scale, brightness, contrast, hflip, vflip)

    def apply(self, image: Image.Image, params: AugmentParams) -> Image.Image:
        if params.moves:
            image = F.affine(image, angle=params.angle, translate=[params.shift_x, params.shift_y],
                             scale=params.scale, shear=[0.0, 0.0],
                             interpolation=F.InterpolationMode(self.cfg.interpolation))
        if params.brightness != 1.0:
            image = adjust_brightness(image, params.brightness)
        if params.contrast != 1.0:
            image = F.adjust_contrast(image, params.contrast)
        if params.hflip:
            image = F.horizontal_flip(image)
        if params.vflip:
            image = F.vertical_flip(image)
        return image


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    """torchvision's `adjust_brightness` on a PIL image, as a 256-entry lookup table. That is PIL's
    ImageEnhance: a blend with a black image made for it, each pixel `factor * v` in 32-bit floats, clipped
    and truncated to 8 bits; the table holds those very values (tests/data/test_augment.py compares every
    value, over thousands of factors, with torchvision's), in 0.2 ms where the blend took 0.5 (384 px)."""
    table = np.clip(np.float32(factor) * np.arange(256, dtype=np.float32), 0, 255).astype(np.uint8)
    return image.point(table.tolist() * len(image.getbands()))


def augment_batch(images: torch.Tensor, params: torch.Tensor, interpolation: str = "nearest") -> torch.Tensor:
    """`Augmenter.apply` for a uint8 (N, 3, H, W) batch on any device, row i of `params` for image i.

    Each step follows PIL's arithmetic (the CPU path's), 8 bits after every step as there; rows whose
    factor is 1 come through unchanged, as the PIL path skips them."""
    params = params.to(device=images.device, dtype=torch.float64)
    if bool((params[:, 0:3].abs().sum(1) + (params[:, 3] - 1).abs()).any()):
        images = _affine_batch(images, params, interpolation)
    images = _scale_batch(images, params[:, 4])
    images = _contrast_batch(images, params[:, 5])
    images = torch.where(params[:, 6].bool().view(-1, 1, 1, 1), images.flip(-1), images)
    return torch.where(params[:, 7].bool().view(-1, 1, 1, 1), images.flip(-2), images)


def _affine_batch(images: torch.Tensor, params: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's affine, one matrix per image: torchvision's inverse matrix, PIL's sampling rules.

    PIL maps each output pixel centre to a source point; a point outside the image is fill (0), else
    nearest takes the pixel the point falls in and bilinear blends its neighbours with the edge pixel
    repeated, the result truncated to 8 bits. grid_sample's zero padding would instead darken every
    edge the rotation exposes, by up to a hundred levels."""
    count, channels, height, width = images.shape
    source = _source_points(params, height, width)
    inside = ((source >= 0) & (source < torch.tensor([width, height], device=images.device))).all(-1)
    if interpolation == "nearest":
        column = source[..., 0].floor().long().clamp_(0, width - 1)
        row = source[..., 1].floor().long().clamp_(0, height - 1)
        index = (row * width + column).view(count, 1, -1).expand(-1, channels, -1)
        moved = images.reshape(count, channels, -1).gather(2, index).view(count, channels, height, width)
    else:
        grid = (source / torch.tensor([0.5 * width, 0.5 * height], device=images.device) - 1).float()
        moved = nnf.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        moved = moved.floor_().to(torch.uint8)
    return torch.where(inside.unsqueeze(1), moved, torch.zeros((), dtype=torch.uint8, device=images.device))


def _source_points(params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H, W, 2) source (x, y) of every output pixel centre, in pixels from the image's top-left corner
    (in float64, as PIL computes them, so floors land where PIL's do)."""
    device = params.device
    matrices = [_get_inverse_affine_matrix([0.0, 0.0], angle, [shift_x, shift_y], scale, [0.0, 0.0])
                for angle, shift_x, shift_y, scale in params[:, :4].tolist()]
    theta = torch.tensor(matrices, dtype=torch.float64, device=device).view(-1, 2, 3)
    xs = torch.arange(width, dtype=torch.float64, device=device) + 0.5 - 0.5 * width
    ys = torch.arange(height, dtype=torch.float64, device=device) + 0.5 - 0.5 * height
    base = torch.stack([xs.expand(height, width), ys.unsqueeze(-1).expand(height, width),
                        torch.ones(height, width, dtype=torch.float64, device=device)], dim=-1)
    points = base.view(1, height * width, 3).expand(len(matrices), -1, -1).bmm(theta.transpose(1, 2))
    centre = torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float64, device=device)
    return (points + centre).view(-1, height, width, 2)


def _scale_batch(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness: pixel * factor, clamped and truncated to 8 bits (torchvision's adjust_brightness)."""
    if bool((factors == 1).all()):
        return images
    scaled = images.float().mul_(factors.float().view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)
    return torch.where((factors == 1).view(-1, 1, 1, 1), images, scaled)


def _contrast_batch(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Contrast as PIL's ImageEnhance does it: a blend towards the rounded mean of the 8-bit gray image
    (PIL's fixed-point RGB to L), truncated to 8 bits; torchvision's tensor kernel uses an unrounded mean."""
    if bool((factors == 1).all()):
        return images
    red, green, blue = images.to(torch.int32).unbind(-3)
    gray = (red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16
    mean = (gray.double().mean(dim=(-2, -1)) + 0.5).floor().float().view(-1, 1, 1, 1)
    ratio = factors.float().view(-1, 1, 1, 1)
    blended = (mean + ratio * (images.float() - mean)).clamp_(0, 255).to(torch.uint8)
    return torch.where((factors == 1).view(-1, 1, 1, 1), images, blended)


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

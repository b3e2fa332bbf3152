"""The PIL augmentation's own kernels against torchvision's, the oracle, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision.transforms.v2.functional as F
from PIL import Image

from dist_train.data.augment import adjust_brightness


def every_value(mode: str) -> Image.Image:
    """Each 8-bit value in every band (rolled per band, so no two bands agree), in a 256 x 4 image."""
    values = np.arange(256, dtype=np.uint8)
    if mode == "L":
        return Image.fromarray(np.tile(values, (4, 1)))
    return Image.fromarray(np.stack([np.tile(np.roll(values, 85 * band), (4, 1)) for band in range(3)], -1))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_brightness_by_lookup_equals_torchvision_for_every_value(mode):
    """5,000 factors over the configured ranges and beyond (darker, brighter, clipping at 255, near 1), plus
    the recipes' bounds: every pixel value of every band as torchvision's blend makes it."""
    image = every_value(mode)
    factors = [*np.random.default_rng(0).uniform(0.0, 2.5, 5000), 0.8, 1.2, 0.5, 1.5, 1 / 3, 0.9999999, 1.0000001]
    for factor in factors:
        expected = np.asarray(F.adjust_brightness(image, float(factor)))
        got = np.asarray(adjust_brightness(image, float(factor)))
        assert got.dtype == np.uint8 and np.array_equal(got, expected), factor

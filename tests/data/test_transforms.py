"""Fundus crop, decode and CLAHE, checked against images whose geometry the test draws itself."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, JpegImagePlugin

from dist_train.data.transforms import BadImageError, apply_clahe, find_fundus_box, load_fundus


def fundus_photo(width, height, center, radius, noise=4.0, vignette=0.6, seed=0) -> Image.Image:
    """An orange disc on a noisy black border, dimmer towards its edge, like a fundus camera's."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    distance = np.hypot(xs - center[0], ys - center[1]) / radius
    brightness = np.where(distance <= 1, 1 - vignette * distance**2, 0)
    image = brightness[:, :, None] * np.array([200, 90, 40]) + rng.normal(0, noise, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality=90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def disc_box(center, radius, width, height):
    return (max(0, center[0] - radius), max(0, center[1] - radius),
            min(width, center[0] + radius), min(height, center[1] + radius))


def assert_box_close(box, expected, tolerance):
    assert all(abs(a - b) <= tolerance for a, b in zip(box, expected)), (box, expected)


@pytest.mark.parametrize("width,height,center,radius", [
    (400, 300, (210, 150), 130),   # whole disc inside a 4:3 frame
    (400, 300, (200, 150), 170),   # disc clipped at top and bottom
    (300, 300, (120, 170), 100),   # off-centre disc
])
def test_box_matches_drawn_disc_despite_noise_vignetting_and_jpeg(width, height, center, radius):
    photo = Image.open(io.BytesIO(jpeg_bytes(fundus_photo(width, height, center, radius), quality=40)))
    assert_box_close(find_fundus_box(photo), disc_box(center, radius, width, height), tolerance=0.03 * radius)


def test_specks_and_caption_in_the_border_do_not_widen_the_box():
    photo = fundus_photo(400, 300, (200, 150), 120)
    draw = ImageDraw.Draw(photo)
    draw.rectangle((5, 5, 60, 18), fill=(255, 255, 255))
    for x, y in [(370, 20), (20, 280), (390, 290)]:
        draw.point((x, y), fill=(255, 255, 255))
    assert_box_close(find_fundus_box(photo), (80, 30, 320, 270), tolerance=4)


@pytest.mark.parametrize("fill", [(0, 0, 0), (120, 60, 30)])
def test_box_falls_back_to_the_whole_image_without_a_disc_on_black(fill):
    assert find_fundus_box(Image.new("RGB", (200, 150), fill)) == (0, 0, 200, 150)


def test_load_fundus_crops_pads_and_resizes():
    photo = fundus_photo(400, 300, (200, 150), 170, noise=0)
    image, info = load_fundus(jpeg_bytes(photo), 64)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert info["original_size"] == [400, 300]
    assert_box_close(info["crop_box"], (30, 0, 370, 300), tolerance=6)
    pixels = np.asarray(image).astype(float)
    padded_rows = pixels[:3].mean(), pixels[-3:].mean()
    assert max(padded_rows) < 8, "the disc clipped by the frame is padded with black rows"
    assert pixels[28:36, 28:36, 0].mean() > 150, "the disc centre stays in the centre"


def test_path_and_bytes_give_the_same_result(tmp_path):
    data = jpeg_bytes(fundus_photo(300, 240, (150, 120), 110))
    (tmp_path / "a.jpg").write_bytes(data)
    from_path, info_path = load_fundus(tmp_path / "a.jpg", 48)
    from_bytes, info_bytes = load_fundus(data, 48)
    assert info_path == info_bytes
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))


def test_large_jpeg_uses_draft_decoding_without_losing_quality(monkeypatch):
    center, radius = (1000, 760), 720
    photo = fundus_photo(2000, 1520, center, radius, noise=0, vignette=0.3)
    data = jpeg_bytes(photo, quality=95)
    requests = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        requests.append(size)
        return original_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    image, info = load_fundus(data, 128)
    assert requests and min(requests[0]) < 1520 / 2, "the decoder was asked for a reduced size"
    expected_box = disc_box(center, radius, 2000, 1520)
    assert_box_close(info["crop_box"], expected_box, tolerance=0.02 * radius)
    reference = photo.crop(expected_box).resize((128, 128), Image.Resampling.LANCZOS)
    difference = np.abs(np.asarray(image, float) - np.asarray(reference, float))
    assert difference.mean() < 4


def test_small_disc_in_a_large_frame_is_decoded_at_enough_resolution(monkeypatch):
    center, radius, size = (800, 800), 350, 256
    photo = fundus_photo(1600, 1600, center, radius, noise=0, vignette=0.3)
    scales = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, requested):
        result = original_draft(self, mode, requested)
        scales.append(1600 / result[1][2])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    image, info = load_fundus(jpeg_bytes(photo, quality=95), size)
    assert_box_close(info["crop_box"], disc_box(center, radius, 1600, 1600), tolerance=8)
    assert scales[0] > 2 * radius / size, "the first, cheap decode was too small for this disc"
    assert scales[-1] <= 2 * radius / size, "so the crop was decoded again at a finer scale"
    reference = photo.crop(disc_box(center, radius, 1600, 1600)).resize((size, size), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(image, float) - np.asarray(reference, float)).mean() < 4


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "truncated_png"])
def test_unreadable_images_raise_bad_image_error(damage, tmp_path):
    photo = fundus_photo(200, 160, (100, 80), 70)
    png = io.BytesIO()
    photo.save(png, "PNG")
    data = {"truncated": jpeg_bytes(photo)[:-600], "empty": b"", "garbage": b"not an image at all" * 50,
            "truncated_png": png.getvalue()[: len(png.getvalue()) // 2]}[damage]
    path = tmp_path / "broken.jpg"
    path.write_bytes(data)
    with pytest.raises(BadImageError):
        load_fundus(path, 32)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_clahe_raises_contrast_and_keeps_chroma():
    rng = np.random.default_rng(0)
    flat = cv2.GaussianBlur(rng.normal(0, 1, (128, 128)).astype(np.float32), (0, 0), 6)
    lightness = 120 + 8 * flat / flat.std()
    rgb = np.clip(lightness[:, :, None] * np.array([1.3, 0.7, 0.35]), 0, 255).astype(np.uint8)
    out = apply_clahe(rgb, clip_limit=2.0, tile_grid=8)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    gray_in = rgb.astype(float).mean(axis=2)
    gray_out = out.astype(float).mean(axis=2)
    assert gray_out.std() > 1.5 * gray_in.std()
    chroma_in = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 1:].astype(int)
    chroma_out = cv2.cvtColor(out, cv2.COLOR_RGB2LAB)[..., 1:].astype(int)
    assert np.median(np.abs(chroma_out - chroma_in)) <= 2, "only lightness is equalised"


def test_clahe_rejects_non_uint8_rgb():
    with pytest.raises(ValueError):
        apply_clahe(np.zeros((8, 8, 3), np.float32), 2.0, 8)
    with pytest.raises(ValueError):
        apply_clahe(np.zeros((8, 8), np.uint8), 2.0, 8)

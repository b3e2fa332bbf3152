"""Synthetic fundus photographs in the AIROGS layout, for tests, demos and benchmarks.

The label follows the vertical cup-to-disc ratio (the clinical sign of glaucoma) and the
cup is drawn large and pale enough to survive downscaling to 64 px, so a tiny CNN can
learn it in a few epochs; camera variation (exposure, blur, vignetting, eye side, disc
position, image size) keeps the task from being trivial.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

RG_CDR = (0.55, 0.85)
"""Vertical cup-to-disc ratio range of referable glaucoma."""
NRG_CDR = (0.28, 0.58)
"""Healthy range; it overlaps the glaucoma range a little, as graders' judgement does."""
CUP_RGB = np.array([255, 238, 205], np.float32)
RIM_RGB = np.array([232, 138, 92], np.float32)
VESSEL_KEEP = np.array([0.55, 0.35, 0.4], np.float32)
"""Per-channel light kept under a vessel: vessels are dark red."""


@dataclass(frozen=True)
class Geometry:
    """Where things are on one canvas, in pixels."""

    width: int
    height: int
    center: tuple[float, float]
    radius: float
    side: int
    disc: tuple[float, float]
    disc_radius: float
    cdr: float


GEOMETRY_FILE = "geometry.csv"
"""Sidecar beside labels.csv: where each image's optic disc is, so a saliency map can be checked against it."""
GEOMETRY_COLUMNS = ("id", "width", "height", "disc_x", "disc_y", "disc_radius")
"""Pixels of the written JPEG: its size, the disc centre (x right, y down) and the disc's horizontal radius."""


MARKER = ".dist_train_synthetic"
"""Written first into every folder generate() fills: a later call may overwrite only a folder holding it."""


def generate(out_dir, n: int, positive_rate: float = 0.03, size: int = 512, seed: int = 0,
             folders: int = 1, label_noise: float = 0.03) -> Path:
    """Write n JPEGs under out_dir/<folder>/, out_dir/labels.csv and out_dir/geometry.csv; return the CSV path.

    Exactly round(n * positive_rate) images are labelled RG; a `label_noise` fraction of
    each class is drawn with the other class's cup. The same seed gives byte-identical files.
    The geometry sidecar costs nothing: it records what the renderer drew anyway.
    """
    if n < 1 or not 0 <= positive_rate <= 1 or folders < 1 or size < 32:
        raise ValueError(f"need n >= 1, 0 <= positive_rate <= 1, folders >= 1, size >= 32; "
                         f"got n={n} positive_rate={positive_rate} folders={folders} size={size}")
    out_dir = Path(out_dir)
    _refuse_stale_images(out_dir, n, folders)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("written by shards/synthetic.py; a rerun may overwrite this folder\n")
    labels, looks_positive = _labels(n, positive_rate, label_noise, seed)
    rows, discs = [], []
    for index in range(n):
        key = f"TRAIN{index:06d}"
        folder = out_dir / str(index * folders // n)
        folder.mkdir(parents=True, exist_ok=True)
        jpeg, geometry = render(size, bool(looks_positive[index]), (seed, index))
        (folder / f"{key}.jpg").write_bytes(jpeg)
        rows.append((key, "RG" if labels[index] else "NRG"))
        discs.append(geometry_row(key, geometry))
    _write_csv(out_dir / GEOMETRY_FILE, GEOMETRY_COLUMNS, discs)
    return _write_csv(out_dir / "labels.csv", ("challenge_id", "class"), rows)


def _refuse_stale_images(out_dir: Path, n: int, folders: int) -> None:
    """A folder holding images this call would not rewrite (another --n or --folders) would be left with a
    labels.csv that lists only some of them: refused, so a same-seed rerun (make demo) still overwrites."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / MARKER).is_file() and not (out_dir / GEOMETRY_FILE).is_file():
        raise ValueError(f"--out {out_dir} is not empty and is not a synthetic set this command wrote (no {MARKER}): "
                         f"choose an empty --out, since photographs there would be overwritten")
    planned = {Path(str(index * folders // n)) / f"TRAIN{index:06d}.jpg" for index in range(n)}
    stale = sorted(str(path.relative_to(out_dir)) for path in out_dir.glob("*/TRAIN*.jpg")
                   if path.relative_to(out_dir) not in planned)
    if stale:
        raise ValueError(f"--out {out_dir} holds {len(stale)} images this run would not write (e.g. {stale[0]}, "
                         f"from another --n or --folders): choose an empty --out, or delete {out_dir} first")


def _write_csv(path: Path, header: tuple[str, ...], rows: list) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def geometry_row(key: str, geometry: Geometry) -> tuple:
    """The GEOMETRY_COLUMNS of one image, pixel positions rounded to 0.01 px."""
    return (key, geometry.width, geometry.height, round(geometry.disc[0], 2), round(geometry.disc[1], 2),
            round(geometry.disc_radius, 2))


def read_geometry(path) -> dict[str, dict[str, float]]:
    """geometry.csv as id -> {width, height, disc_x, disc_y, disc_radius}."""
    with open(path, newline="") as stream:
        return {row["id"]: {name: float(row[name]) for name in GEOMETRY_COLUMNS[1:]} for row in csv.DictReader(stream)}


def disc_in_crop(disc: dict[str, float], crop_box: list[float]) -> tuple[float, float, float]:
    """The disc (x, y, radius) in fractions of the side of the square the shard builder cropped and resized.

    `crop_box` is the sample's box in original pixels (the shard's .json); `load_fundus` crops a square of
    the box's longer side centred on it, so a position maps by one shift and one scale, the same for any size.
    """
    left, top, right, bottom = crop_box
    side = max(right - left, bottom - top)
    x0, y0 = (left + right - side) / 2, (top + bottom - side) / 2
    return (disc["disc_x"] - x0) / side, (disc["disc_y"] - y0) / side, disc["disc_radius"] / side


def replay_geometry(n: int, positive_rate: float = 0.03, size: int = 512, seed: int = 0,
                    label_noise: float = 0.03) -> dict[str, Geometry]:
    """The geometry `generate` drew for a set made with these arguments, without rendering: for a set written
    before the sidecar existed (the geometry is the renderer's first draws, so it replays exactly)."""
    _, looks_positive = _labels(n, positive_rate, label_noise, seed)
    return {f"TRAIN{index:06d}": _geometry(np.random.default_rng((seed, index)), size, bool(looks_positive[index]))
            for index in range(n)}


def render_jpeg(size: int, glaucomatous: bool, seed) -> bytes:
    """One synthetic photograph as JPEG bytes, fully determined by its arguments."""
    return render(size, glaucomatous, seed)[0]


def render(size: int, glaucomatous: bool, seed) -> tuple[bytes, Geometry]:
    """One synthetic photograph as JPEG bytes, and the geometry it was drawn with."""
    rng = np.random.default_rng(seed)
    geometry = _geometry(rng, size, glaucomatous)
    image = _fundus_background(rng, geometry)
    _draw_vessels(rng, geometry, image)
    _draw_disc(rng, geometry, image)
    image = _camera(rng, geometry, image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=int(rng.integers(88, 96)))
    return buffer.getvalue(), geometry


def _labels(n: int, positive_rate: float, label_noise: float, seed: int):
    """Exact class counts in a seeded order, and the noisy 'appearance' of each image."""
    rng = np.random.default_rng([seed, n])
    labels = np.zeros(n, bool)
    labels[: round(n * positive_rate)] = True
    labels = rng.permutation(labels)
    flipped = rng.random(n) < label_noise
    return labels, labels ^ flipped


def _geometry(rng: np.random.Generator, size: int, glaucomatous: bool) -> Geometry:
    height = int(round(size * rng.uniform(0.9, 1.1)))
    width = int(round(height * rng.choice([1.0, rng.uniform(1.05, 1.35)])))
    radius = height / 2 * rng.uniform(0.9, 1.06)
    center = (width / 2 + rng.normal(0, 0.015) * height, height / 2 + rng.normal(0, 0.015) * height)
    side = int(rng.choice([-1, 1]))
    disc = (center[0] + side * radius * rng.uniform(0.3, 0.38), center[1] + radius * rng.normal(0, 0.04))
    cdr = rng.uniform(*(RG_CDR if glaucomatous else NRG_CDR))
    return Geometry(width, height, center, radius, side, disc, radius * rng.uniform(0.18, 0.22), cdr)


def _fundus_background(rng: np.random.Generator, geometry: Geometry) -> np.ndarray:
    """Orange-red retina with low-frequency texture and a darker macula."""
    base = np.array([rng.uniform(175, 215), rng.uniform(70, 100), rng.uniform(25, 45)], np.float32)
    texture = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (geometry.width, geometry.height),
                         interpolation=cv2.INTER_CUBIC)
    image = base * (1 + 0.06 * texture)[:, :, None]
    macula = (geometry.center[0] - geometry.side * geometry.radius * 0.05, geometry.center[1])
    _blend(image, macula, (geometry.radius * 0.2,) * 2, np.float32(0.0), 0.45 * rng.uniform(0.8, 1.2), 1.0)
    return image


def _draw_vessels(rng: np.random.Generator, geometry: Geometry, image: np.ndarray) -> None:
    """Dark vessels arching from the disc rim around the macula, thinner as they branch."""
    mask = np.zeros((geometry.height, geometry.width), np.float32)
    step = geometry.radius * 0.07
    for index in range(int(rng.integers(8, 13))):
        vertical = 1 if index % 2 else -1
        angle = np.pi / 2 * vertical + rng.uniform(-0.9, 0.9)
        bend = geometry.side * vertical * rng.uniform(0.03, 0.12)
        turns = angle + np.cumsum(bend + rng.normal(0, 0.06, 18))
        heading = np.array([np.cos(angle), np.sin(angle)])
        start = np.array(geometry.disc) + geometry.disc_radius * 0.95 * heading
        points = start + np.cumsum(step * np.stack([np.cos(turns), np.sin(turns)], 1), 0)
        thickness = max(1, round(geometry.radius * rng.uniform(0.012, 0.028)))
        cv2.polylines(mask, [np.round(np.vstack([start, points])).astype(np.int32)], False, 1.0,
                      thickness, cv2.LINE_AA)
    image *= 1 - mask[:, :, None] * (1 - VESSEL_KEEP)


def _draw_disc(rng: np.random.Generator, geometry: Geometry, image: np.ndarray) -> None:
    """Bright optic disc with a pale cup whose vertical extent is cdr x the disc's."""
    disc_radii = (geometry.disc_radius, geometry.disc_radius * rng.uniform(1.0, 1.1))
    _blend(image, geometry.disc, disc_radii, RIM_RGB * rng.uniform(0.9, 1.05), 1.0, 0.12)
    cup_height = disc_radii[1] * geometry.cdr
    cup_center = (geometry.disc[0] + geometry.side * disc_radii[0] * rng.uniform(0, 0.1), geometry.disc[1])
    _blend(image, cup_center, (cup_height * rng.uniform(0.8, 1.0), cup_height), CUP_RGB, 1.0, 0.12)


def _camera(rng: np.random.Generator, geometry: Geometry, image: np.ndarray) -> np.ndarray:
    """Exposure, vignetting, black border, lens blur and sensor grain (2 px, cheap); returns uint8 RGB."""
    xs = (np.arange(geometry.width, dtype=np.float32) - geometry.center[0]) / geometry.radius
    ys = (np.arange(geometry.height, dtype=np.float32) - geometry.center[1]) / geometry.radius
    distance = np.sqrt(xs[None, :] ** 2 + ys[:, None] ** 2)
    vignette = 1 - np.float32(rng.uniform(0.2, 0.6)) * np.minimum(distance, 1) ** 3
    inside = np.clip((1 - distance) * np.float32(geometry.radius / 1.5) + 0.5, 0, 1)
    image *= (np.float32(rng.uniform(0.75, 1.15)) * vignette * inside)[:, :, None]
    sigma = rng.uniform(0, 1.2) * geometry.height / 512
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    grain = rng.standard_normal((geometry.height // 2 + 1, geometry.width // 2 + 1, 3), np.float32) * 2
    image += cv2.resize(grain, (geometry.width, geometry.height), interpolation=cv2.INTER_NEAREST)
    return np.clip(image, 0, 255).astype(np.uint8)


def _blend(image: np.ndarray, center, radii, value, strength: float, softness: float) -> None:
    """Blend `value` into an ellipse with a soft edge, touching only its bounding window.

    With value 0 and a softness of 1 this is a Gaussian-like darkening (the macula).
    """
    (cx, cy), (rx, ry) = center, radii
    reach = 1 + softness
    x0, x1 = max(0, int(cx - rx * reach)), min(image.shape[1], int(cx + rx * reach) + 2)
    y0, y1 = max(0, int(cy - ry * reach)), min(image.shape[0], int(cy + ry * reach) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.ogrid[y0:y1, x0:x1]
    distance = np.hypot((xs - cx) / rx, (ys - cy) / ry)
    weight = strength * np.clip((1 - distance) / (2 * softness) + 0.5, 0, 1).astype(np.float32)
    window = image[y0:y1, x0:x1]
    window += weight[:, :, None] * (value - window)

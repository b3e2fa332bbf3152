"""The synthetic AIROGS set: layout, determinism, and a label signal that survives 64 px."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dist_train.data.transforms import load_fundus
from dist_train.shards.synthetic import generate

ROOT = Path(__file__).resolve().parents[2]


def read_rows(labels_csv: Path) -> list[list[str]]:
    with open(labels_csv, newline="") as stream:
        return list(csv.reader(stream))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def balanced_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("balanced"), 80, positive_rate=0.5, size=128, seed=11)


def test_layout_matches_airogs(tmp_path):
    labels_csv = generate(tmp_path, 24, positive_rate=0.25, size=96, seed=1, folders=3)
    rows = read_rows(labels_csv)
    assert labels_csv == tmp_path / "labels.csv"
    assert rows[0] == ["challenge_id", "class"]
    assert [r[0] for r in rows[1:]] == [f"TRAIN{i:06d}" for i in range(24)]
    assert sorted({r[1] for r in rows[1:]}) == ["NRG", "RG"]
    assert sum(r[1] == "RG" for r in rows[1:]) == 6
    files = sorted(tmp_path.glob("*/*.jpg"))
    assert {p.parent.name for p in files} == {"0", "1", "2"}
    assert sorted(p.stem for p in files) == [r[0] for r in rows[1:]]
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert 0.85 * 96 <= image.height <= 1.15 * 96 and image.width >= image.height


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    generate(tmp_path / "a", 6, positive_rate=0.5, size=64, seed=4, folders=2)
    generate(tmp_path / "b", 6, positive_rate=0.5, size=64, seed=4, folders=2)
    generate(tmp_path / "c", 6, positive_rate=0.5, size=64, seed=5, folders=2)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    differing = tree_digest(tmp_path / "a").items() ^ tree_digest(tmp_path / "c").items()
    assert len(differing) >= 12


def pale_cup_pixels(rgb: np.ndarray) -> int:
    """Pixels far paler than the retina or the disc rim: only the cup has much blue."""
    return int((rgb[..., 2].astype(int) > 120).sum())


def test_cup_size_at_64_px_predicts_the_label(balanced_set):
    rows = read_rows(balanced_set)[1:]
    labels = np.array([r[1] == "RG" for r in rows])
    folder = balanced_set.parent / "0"
    cup_sizes = [pale_cup_pixels(np.asarray(load_fundus(folder / f"{r[0]}.jpg", 64)[0])) for r in rows]
    assert roc_auc_score(labels, cup_sizes) > 0.85
    assert np.median(np.array(cup_sizes)[labels]) > 1.6 * np.median(np.array(cup_sizes)[~labels])


def test_left_and_right_eyes_both_occur(balanced_set):
    sides = []
    for path in sorted((balanced_set.parent / "0").glob("*.jpg")):
        rgb = np.asarray(load_fundus(path, 64)[0])
        columns = np.nonzero((rgb[..., 2] > 120).any(axis=0))[0]
        if columns.size:
            sides.append(columns.mean() < 32)
    assert 0.25 < np.mean(sides) < 0.75


def test_cli_writes_the_set_and_rejects_bad_arguments(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("synthetic_cli", ROOT / "shards" / "synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--out", str(tmp_path), "--n", "4", "--size", "48", "--positive-rate", "0.5"]) == 0
    assert len(read_rows(tmp_path / "labels.csv")) == 5 and len(list((tmp_path / "0").glob("*.jpg"))) == 4
    assert cli.main(["--out", str(tmp_path / "x"), "--n", "0"]) == 2
    assert capsys.readouterr().err.startswith("error:")


# ---------------------------------------------------------------- the disc geometry sidecar


BEFORE_THE_SIDECAR = {
    "0/TRAIN000000.jpg": "b52d0fd8ed981a29dca45dcbc5713db5a3f3040f2c642d62bd7d9d74db43a95d",
    "1/TRAIN000005.jpg": "31008a5ac071c842ab4b222377b873041b40ae132343a572f0788824f4372078",
}
"""sha256 of two images written by the generator before it wrote geometry.csv (same arguments as below)."""


def pale_centroid(rgb: np.ndarray) -> tuple[float, float]:
    """Centre (x, y) of the cup's pale pixels: an estimate of the disc centre read from the pixels alone."""
    ys, xs = np.nonzero(rgb[..., 2].astype(int) > 120)
    return float(xs.mean()), float(ys.mean())


def test_the_sidecar_leaves_the_jpegs_byte_identical(tmp_path):
    generate(tmp_path, 6, positive_rate=0.5, size=64, seed=4, folders=2)
    digests = tree_digest(tmp_path)
    assert {name: digests[name] for name in BEFORE_THE_SIDECAR} == BEFORE_THE_SIDECAR
    assert (tmp_path / "geometry.csv").is_file()


def test_geometry_names_each_disc_where_its_pixels_are(balanced_set):
    import math

    from dist_train.shards.synthetic import read_geometry

    geometry = read_geometry(balanced_set.parent / "geometry.csv")
    assert sorted(geometry) == [row[0] for row in read_rows(balanced_set)[1:]]
    for key, disc in geometry.items():
        with Image.open(balanced_set.parent / "0" / f"{key}.jpg") as image:
            assert image.size == (disc["width"], disc["height"])
            x, y = pale_centroid(np.asarray(image.convert("RGB")))
        assert math.hypot(x - disc["disc_x"], y - disc["disc_y"]) < 0.5 * disc["disc_radius"], key


def test_replayed_geometry_equals_the_sidecar(balanced_set):
    from dist_train.shards.synthetic import read_geometry, replay_geometry

    written = read_geometry(balanced_set.parent / "geometry.csv")
    replayed = replay_geometry(80, positive_rate=0.5, size=128, seed=11)
    for key, disc in written.items():
        again = replayed[key]
        assert (again.width, again.height) == (disc["width"], disc["height"])
        assert (again.disc[0], again.disc[1], again.disc_radius) == pytest.approx(
            (disc["disc_x"], disc["disc_y"], disc["disc_radius"]), abs=0.006)


def test_disc_in_crop_follows_the_shard_builders_crop_and_resize(synthetic_shards):
    import io
    import json
    import math

    from dist_train.data.stream import iterate_shard
    from dist_train.shards.synthetic import disc_in_crop, read_geometry

    geometry = read_geometry(synthetic_shards.parent / "images" / "geometry.csv")
    checked = 0
    for shard in sorted(synthetic_shards.glob("val-*.tar")):
        for sample in iterate_shard(str(shard)):
            meta = json.loads(sample["json"])
            x, y, radius = disc_in_crop(geometry[sample["__key__"]], meta["crop_box"])
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                side = image.width
                cx, cy = pale_centroid(np.asarray(image.convert("RGB")))
            assert math.hypot(cx / side - x, cy / side - y) < 0.5 * radius, sample["__key__"]
            checked += 1
    assert checked >= 30


def test_a_folder_it_did_not_write_or_with_other_images_is_refused_and_a_same_rerun_is_not(tmp_path):
    """Before, `--n 10` into a 120-image set replaced labels.csv and left 110 images unlisted, and a folder of
    real photographs named TRAIN*.jpg would have been overwritten. The oracle: the files' bytes."""
    photos = tmp_path / "photos"
    (photos / "0").mkdir(parents=True)
    (photos / "0" / "TRAIN000000.jpg").write_bytes(b"a real photograph")
    with pytest.raises(ValueError, match="not a synthetic set"):
        generate(photos, 4, positive_rate=0.5, size=48)
    assert (photos / "0" / "TRAIN000000.jpg").read_bytes() == b"a real photograph"
    ours = tmp_path / "ours"
    generate(ours, 6, positive_rate=0.5, size=48)
    before = {path: path.read_bytes() for path in ours.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match=r"holds 2 images this run would not write \(e.g. 0/TRAIN000004.jpg"):
        generate(ours, 4, positive_rate=0.5, size=48)
    assert {path: path.read_bytes() for path in ours.rglob("*") if path.is_file()} == before
    generate(ours, 6, positive_rate=0.5, size=48)  # make demo's rerun: the same files again
    assert {path: path.read_bytes() for path in ours.rglob("*") if path.is_file()} == before

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

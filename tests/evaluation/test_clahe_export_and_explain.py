"""A model trained on shards built with `--clahe`, exported and used as users do; and `predict.py --explain`.

Oracles: the run's own logged validation scores (training's decoder on its CLAHE shards), and the
same images scored raw, which must go through the builder's CLAHE exactly once to land on them.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from eval_runs import OTHER_RUN, REPO, trained_export
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clahe_shards(synthetic_shards) -> Path:
    """The synthetic set's images built again, with CLAHE applied by the builder (same split, same size)."""
    out = synthetic_shards.parent / "clahe-shards"
    if not (out / "manifest.json").is_file():
        images = synthetic_shards.parent / "images"
        subprocess.run([sys.executable, str(REPO / "shards" / "build.py"), "--images", str(images / "0"),
                        "--labels", str(images / "labels.csv"), "--out", str(out), "--size", "48",
                        "--shard-size", "30", "--val-fraction", "0.25", "--workers", "1", "--clahe", "2.0,8"],
                       check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def clahe_run(clahe_shards, tmp_path_factory) -> Path:
    return trained_export(tmp_path_factory, clahe_shards, "clahe_at_build", "train.epochs=1", "eval.tta=none")


def predict(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/predict.py", *argv, "--progress", "none"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as handle:
        return {row["id"]: float(row["likelihood"]) for row in csv.DictReader(handle) if row["likelihood"]}


def logged_scores(run: Path) -> dict[str, float]:
    return scores(run / "predictions_val.csv")


def val_folder(shards: Path, tmp_path: Path) -> Path:
    """The validation images, raw, as a user would point --images at them."""
    samples = json.loads((shards / "manifest.json").read_text())["samples"]
    keys = [key for key, entry in samples.items() if entry["split"] == "val"]
    folder = tmp_path / "raw"
    folder.mkdir()
    for key in keys:
        (folder / f"{key}.jpg").write_bytes((shards.parent / "images" / "0" / f"{key}.jpg").read_bytes())
    return folder


def test_the_export_says_the_model_expects_clahe_applied_at_build(clahe_run):
    pre = json.loads((clahe_run / "export" / "model.json").read_text())["preprocess"]
    assert pre["clahe"] is True and pre["clahe_at"] == "build"
    assert (pre["clahe_clip_limit"], pre["clahe_tile_grid"]) == (2.0, 8)


def test_raw_images_get_the_builders_clahe_once_and_match_training(clahe_run, clahe_shards, tmp_path):
    logged = logged_scores(clahe_run)
    shards = predict("--model", str(clahe_run), "--shards", f"{clahe_shards}/val-*.tar", "--out",
                     str(tmp_path / "shards.csv"))
    raw = predict("--model", str(clahe_run), "--images", str(val_folder(clahe_shards, tmp_path)), "--out",
                  str(tmp_path / "raw.csv"))
    assert shards.returncode == 0 and raw.returncode == 0, shards.stderr + raw.stderr
    from_shards, from_raw = scores(tmp_path / "shards.csv"), scores(tmp_path / "raw.csv")
    assert from_shards.keys() == from_raw.keys() == logged.keys()
    assert all(abs(from_shards[k] - logged[k]) < 1e-6 and abs(from_raw[k] - logged[k]) < 1e-6 for k in logged)


def test_raw_shards_for_a_clahe_at_build_model_get_its_clahe_in_the_decoder(clahe_run, synthetic_shards, tmp_path):
    """The raw build of the same images: equalised after decoding instead, never skipped.

    At 48 px the two orders (CLAHE then JPEG, JPEG then CLAHE) moved these scores by 0.019 on average
    (max 0.06); skipping CLAHE moved them by 0.089 (max 0.15), so the bound tells the two apart."""
    logged = logged_scores(clahe_run)
    run = predict("--model", str(clahe_run), "--shards", f"{synthetic_shards}/val-*.tar", "--out",
                  str(tmp_path / "p.csv"))
    assert run.returncode == 0, run.stderr
    predicted = scores(tmp_path / "p.csv")
    assert predicted.keys() == logged.keys()
    assert sum(abs(predicted[k] - logged[k]) for k in logged) / len(logged) < 0.04


def test_clahe_shards_for_a_model_trained_without_clahe_are_refused_in_one_line(clahe_shards, synthetic_shards,
                                                                                  tmp_path_factory, tmp_path):
    plain = trained_export(tmp_path_factory, synthetic_shards, "other", *OTHER_RUN)
    run = predict("--model", str(plain), "--shards", f"{clahe_shards}/val-*.tar", "--out", str(tmp_path / "p.csv"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "built with --clahe 2,8" in lines[0] and "without --clahe" in lines[0], run.stderr
    assert not (tmp_path / "p.csv").exists()


def test_evaluate_refuses_clahe_shards_for_a_model_trained_without_clahe_in_one_line(clahe_shards, synthetic_shards,
                                                                                     tmp_path_factory, tmp_path):
    plain = trained_export(tmp_path_factory, synthetic_shards, "other", *OTHER_RUN)
    run = subprocess.run([sys.executable, "launch/evaluate.py", "--model", str(plain), "--shards",
                          f"{clahe_shards}/val-*.tar", "--out", str(tmp_path / "eval"), "--progress", "none"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "built with --clahe 2,8" in lines[0] and "without --clahe" in lines[0], run.stderr
    assert not (tmp_path / "eval").exists()


def test_explain_writes_one_overlay_per_scored_image(clahe_run, clahe_shards, tmp_path):
    folder = val_folder(clahe_shards, tmp_path)
    unreadable = sorted(folder.iterdir())[0]
    unreadable.write_bytes(b"")
    run = predict("--model", str(clahe_run), "--images", str(folder), "--out", str(tmp_path / "p.csv"),
                  "--explain", str(tmp_path / "cams"))
    assert run.returncode == 3, run.stderr
    written = sorted(path.stem for path in (tmp_path / "cams").glob("*.png"))
    assert written == sorted(scores(tmp_path / "p.csv")) and unreadable.stem not in written
    with Image.open(tmp_path / "cams" / f"{written[0]}.png") as overlay:
        assert overlay.width == 2 * overlay.height  # the input beside its map


def test_explain_into_a_folder_with_earlier_files_is_refused_before_scoring(clahe_run, clahe_shards, tmp_path):
    (tmp_path / "cams").mkdir()
    (tmp_path / "cams" / "earlier.png").write_bytes(b"keep me")
    run = predict("--model", str(clahe_run), "--images", str(val_folder(clahe_shards, tmp_path)), "--out",
                  str(tmp_path / "p.csv"), "--explain", str(tmp_path / "cams"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "--explain" in lines[0], run.stderr
    assert not (tmp_path / "p.csv").exists()
    assert (tmp_path / "cams" / "earlier.png").read_bytes() == b"keep me"

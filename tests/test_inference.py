"""Export, predict and evaluate a trained model: prediction reproduces the scores evaluation logged."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _scores(path: Path, key: str, value: str) -> dict[str, float]:
    with open(path, newline="") as handle:
        return {row[key]: float(row[value]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def trained_run(synthetic_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inference")
    _run("-m", "dist_train.main", "--config", "configs/test_tiny.yaml", "--resume", "none", "--set",
         f"data.train_shards={synthetic_shards}/train-*.tar", f"data.val_shards={synthetic_shards}/val-*.tar",
         f"run_root={root}", "train.epochs=2", "eval.tta=hflip", "data.clahe=true")
    return root / "test_tiny"


def test_predict_on_validation_shards_reproduces_the_logged_scores(trained_run, synthetic_shards, tmp_path):
    _run("launch/export.py", str(trained_run), "--out", str(tmp_path / "model.safetensors"))
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["preprocess"]["clahe"] is True and meta["tta"] == "hflip" and meta["threshold"] is not None
    _run("launch/predict.py", "--model", str(tmp_path / "model.safetensors"), "--shards",
         f"{synthetic_shards}/val-*.tar", "--out", str(tmp_path / "pred.csv"))
    logged = _scores(trained_run / "predictions_best.csv", "key", "score")
    predicted = _scores(tmp_path / "pred.csv", "id", "likelihood")
    assert predicted.keys() == logged.keys()
    assert all(abs(predicted[k] - logged[k]) < 1e-6 for k in logged)


def test_predict_on_raw_images_matches_the_shards(trained_run, synthetic_shards, tmp_path):
    _run("launch/export.py", str(trained_run))
    manifest = json.loads((synthetic_shards / "manifest.json").read_text())
    val_keys = sorted(key for key, entry in manifest["samples"].items() if entry["split"] == "val")[:12]
    folder = tmp_path / "images"
    folder.mkdir()
    for key in val_keys:
        (folder / f"{key}.jpg").symlink_to(synthetic_shards.parent / "images" / "0" / f"{key}.jpg")
    _run("launch/predict.py", "--model", str(trained_run), "--images", str(folder), "--out", str(tmp_path / "p.csv"))
    logged = _scores(trained_run / "predictions_best.csv", "key", "score")
    predicted = _scores(tmp_path / "p.csv", "id", "likelihood")
    assert sorted(predicted) == val_keys
    assert all(abs(predicted[k] - logged[k]) < 1e-6 for k in val_keys)


def test_evaluate_reports_the_official_metrics(trained_run, synthetic_shards, tmp_path):
    _run("launch/export.py", str(trained_run))
    _run("launch/evaluate.py", "--model", str(trained_run), "--shards", f"{synthetic_shards}/val-*.tar",
         "--out", str(tmp_path), "--bootstrap", "50")
    report = json.loads((tmp_path / "report.json").read_text())
    with open(tmp_path / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels, scores = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert report["alpha"] == pytest.approx(roc_auc_score(labels, scores, max_fpr=0.1), abs=1e-12)
    assert report["n"] == 40 and (tmp_path / "roc.png").stat().st_size > 1000
    assert report["alpha_ci"][0] <= report["alpha"] <= report["alpha_ci"][1]

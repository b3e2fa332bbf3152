"""Several exported models averaged by predict.py and evaluate.py, run as a user runs them.

The two members differ in backbone, image size, seed, CLAHE and TTA, so each must score through its
own export's preprocessing. Oracles: each member scored alone by predict.py (the ensemble must be their
mean within 1e-6), sklearn's ROC curve with the synthetic set's labels CSV (the ensemble's threshold is
the β point of those means), hand-made Scores for the combination rule, and the files themselves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from eval_runs import OTHER_RUN, TRAINED_RUN, call, load_cli, trained_export
from sklearn.metrics import roc_curve

from dist_train.errors import CoverageError
from dist_train.evaluation.ensemble import combine
from dist_train.evaluation.scoring import Scores

REPO = Path(__file__).resolve().parents[2]


predict_cli, evaluate_cli = load_cli("predict"), load_cli("evaluate")


def _run(*args: object) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _likelihoods(path: Path) -> dict[str, float]:
    return {row["id"]: float(row["likelihood"]) for row in _rows(path) if row["likelihood"]}


@pytest.fixture(scope="session")
def members(synthetic_shards, tmp_path_factory) -> tuple[Path, Path]:
    """Two export files trained differently (resnet10t 32 px CLAHE hflip; test_efficientnet 48 px, plain)."""
    first = trained_export(tmp_path_factory, synthetic_shards, "test_tiny", *TRAINED_RUN)
    second = trained_export(tmp_path_factory, synthetic_shards, "other", *OTHER_RUN)
    return first / "export" / "model.safetensors", second / "export" / "model.safetensors"


@pytest.fixture(scope="session")
def alone(members, synthetic_shards, tmp_path_factory) -> list[dict[str, float]]:
    """Each member's likelihoods on the validation shards, scored by predict.py with that member only."""
    out = tmp_path_factory.mktemp("alone")
    for index, member in enumerate(members):
        _run("launch/predict.py", "--model", member, "--shards", f"{synthetic_shards}/val-*.tar", "--out",
             out / f"{index}.csv", "--progress", "none")
    return [_likelihoods(out / f"{index}.csv") for index in range(len(members))]


@pytest.fixture(scope="session")
def evaluated(members, synthetic_shards, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """evaluate.py with both members on the labelled validation shards: the ensemble's threshold is chosen."""
    out = tmp_path_factory.mktemp("ensemble") / "eval"
    result = _run("launch/evaluate.py", "--model", members[0], "--model", members[1], "--shards",
                  f"{synthetic_shards}/val-*.tar", "--out", out, "--bootstrap", "0", "--progress", "none")
    return out, result


@pytest.fixture(scope="session")
def true_labels(synthetic_shards) -> dict[str, int]:
    with open(synthetic_shards.parent / "images" / "labels.csv", newline="") as handle:
        return {row["challenge_id"]: int(row["class"] == "RG") for row in csv.DictReader(handle)}


def _mean(alone: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(scores[key] for scores in alone) / len(alone) for key in alone[0]}


def _beta_threshold_by_hand(labels: list[int], scores: list[float]) -> float:
    """The last ROC point (all intermediate points kept) whose specificity is still >= 95%."""
    fpr, _tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    return float(thresholds[np.flatnonzero(1 - fpr >= 0.95)[-1]])


def _val_images(synthetic_shards: Path, tmp_path: Path, count: int = 6) -> Path:
    """A folder of the first `count` validation images as raw JPEGs, named by their ids."""
    manifest = json.loads((synthetic_shards / "manifest.json").read_text())
    keys = sorted(key for key, entry in manifest["samples"].items() if entry["split"] == "val")[:count]
    folder = tmp_path / "images"
    folder.mkdir()
    for key in keys:
        shutil.copyfile(synthetic_shards.parent / "images" / "0" / f"{key}.jpg", folder / f"{key}.jpg")
    return folder


# ---------------------------------------------------------------- the ensemble's scores and threshold


def test_members_preprocess_differently(members):
    """The precondition of the tests below: a shared decoder would not pass them."""
    metas = [json.loads(member.with_suffix(".json").read_text()) for member in members]
    assert [meta["preprocess"]["image_size"] for meta in metas] == [32, 48]
    assert [meta["preprocess"]["clahe"] for meta in metas] == [True, False]
    assert [meta["tta"] for meta in metas] == ["hflip", "none"]


def test_ensemble_likelihoods_are_the_mean_of_the_members_scored_alone(evaluated, alone):
    out, _result = evaluated
    rows = _rows(out / "predictions.csv")
    ensemble = _likelihoods(out / "predictions.csv")
    expected = _mean(alone)
    assert sorted(row["id"] for row in rows) == sorted(expected) and len(rows) == 40
    assert max(abs(ensemble[key] - expected[key]) for key in expected) < 1e-6
    assert max(abs(ensemble[key] - alone[0][key]) for key in expected) > 1e-3, "members must disagree"


def test_ensemble_threshold_is_chosen_for_the_ensemble_on_validation(evaluated, alone, members, true_labels):
    out, result = evaluated
    expected = _mean(alone)
    keys = sorted(expected)
    oracle = _beta_threshold_by_hand([true_labels[k] for k in keys], [expected[k] for k in keys])
    record = json.loads((out / "ensemble.json").read_text())
    assert record["threshold"] == pytest.approx(oracle, abs=1e-6)
    member_thresholds = [json.loads(m.with_suffix(".json").read_text())["threshold"] for m in members]
    assert all(abs(record["threshold"] - t) > 1e-6 for t in member_thresholds), "copied from a member"
    assert [(out / member).resolve() for member in record["members"]] == [m.resolve() for m in members]
    assert record["members_when_written"] == [str(m.resolve()) for m in members]
    assert record["sha256"] == [hashlib.sha256(m.read_bytes()).hexdigest() for m in members]
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == [str(m) for m in members]
    assert all(str(m) in result.stdout for m in members)
    for row in _rows(out / "predictions.csv"):
        likelihood = float(row["likelihood"])
        if abs(likelihood - oracle) > 1e-6:
            assert row["referable_glaucoma"] == str(int(likelihood >= oracle)), row


def test_predict_with_the_ensemble_file_averages_and_applies_its_threshold(evaluated, alone, synthetic_shards,
                                                                           tmp_path):
    out, _ = evaluated
    threshold = json.loads((out / "ensemble.json").read_text())["threshold"]
    result = _run("launch/predict.py", "--model", out / "ensemble.json", "--shards", f"{synthetic_shards}/val-*.tar",
                  "--out", tmp_path / "p.csv", "--progress", "none")
    expected = _mean(alone)
    rows = {row["id"]: row for row in _rows(tmp_path / "p.csv")}
    assert sorted(rows) == sorted(expected)
    assert all(abs(float(rows[k]["likelihood"]) - expected[k]) < 1e-6 for k in expected)
    clear = [k for k in expected if abs(expected[k] - threshold) > 1e-6]
    assert all(rows[k]["referable_glaucoma"] == str(int(expected[k] >= threshold)) for k in clear)
    assert "ensemble.json" in result.stdout and "models (2" in result.stdout


def test_an_image_no_member_can_read_is_one_row_with_its_error(evaluated, alone, synthetic_shards, tmp_path):
    out, _ = evaluated
    folder = _val_images(synthetic_shards, tmp_path)
    broken = sorted(p.stem for p in folder.iterdir())[1]
    (folder / f"{broken}.jpg").write_bytes(b"")
    code, stdout, stderr = call(predict_cli, "--model", out / "ensemble.json", "--images", folder,
                                 "--out", tmp_path / "p.csv", "--progress", "none")
    assert code == 3, stderr
    rows = _rows(tmp_path / "p.csv")
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == 6
    by_id = {row["id"]: row for row in rows}
    assert by_id[broken]["likelihood"] == "" and by_id[broken]["error"] == "empty file (0 bytes)"
    assert [line for line in stderr.splitlines() if line.startswith("skipped")] == [
        f"skipped {broken} ({folder / f'{broken}.jpg'}): empty file (0 bytes)"]
    expected = _mean(alone)
    assert all(abs(float(by_id[k]["likelihood"]) - expected[k]) < 1e-6 for k in by_id if k != broken)


def test_evaluate_with_the_ensemble_file_reports_at_its_threshold_and_chooses_none(evaluated, alone, true_labels,
                                                                                 synthetic_shards, tmp_path):
    """On another labelled set the ensemble's threshold is applied, not chosen again."""
    out, _ = evaluated
    threshold = json.loads((out / "ensemble.json").read_text())["threshold"]
    code, stdout, stderr = call(evaluate_cli, "--model", out / "ensemble.json", "--shards",
                                 f"{synthetic_shards}/val-*.tar", "--out", tmp_path / "eval", "--bootstrap", "0",
                                 "--progress", "none")
    assert code == 0, stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    expected = _mean(alone)
    predicted = {k for k, v in expected.items() if v >= threshold}
    positives = {k for k in expected if true_labels[k]}
    assert report["at_export_threshold"] == {"threshold": threshold, "source": str(out / "ensemble.json"),
                                             "tp": len(predicted & positives), "fp": len(predicted - positives),
                                             "fn": len(positives - predicted),
                                             "tn": len(set(expected) - predicted - positives)}
    assert not (tmp_path / "eval" / "ensemble.json").exists()


def test_predict_with_bare_exports_and_a_threshold_averages_them(members, alone, synthetic_shards, tmp_path):
    code, stdout, stderr = call(predict_cli, "--model", members[0], "--model", members[1], "--shards",
                                 f"{synthetic_shards}/val-*.tar", "--out", tmp_path / "p.csv", "--threshold", "0.5",
                                 "--progress", "none")
    assert code == 0, stderr
    expected = _mean(alone)
    rows = {row["id"]: row for row in _rows(tmp_path / "p.csv")}
    assert all(abs(float(rows[k]["likelihood"]) - expected[k]) < 1e-6 for k in expected)
    assert all(rows[k]["referable_glaucoma"] == str(int(expected[k] >= 0.5)) for k in expected)
    assert "threshold 0.5 from --threshold" in stdout


# ---------------------------------------------------------------- the combination rule, by hand


def test_combine_takes_the_mean_and_reports_a_sample_any_member_failed_once():
    first = Scores(["a", "b", "c"], [1, 0, 1], [0.9, 0.2, 0.4], 0.0, [("x.jpg", "d", "truncated")])
    second = Scores(["c", "a", "d"], [1, 1, 0], [0.6, 0.5, 0.3], 0.0, [("y.jpg", "b", "too small")])
    merged = combine([first, second], ["m1", "m2"])
    assert dict(zip(merged.keys, merged.scores)) == pytest.approx({"a": 0.7, "c": 0.5}, abs=1e-12)
    assert dict(zip(merged.keys, merged.labels)) == {"a": 1, "c": 1}
    assert sorted(merged.bad) == [("x.jpg", "d", "m1: truncated"), ("y.jpg", "b", "m2: too small")]


def test_combine_of_one_member_is_that_member():
    only = Scores(["a", "b"], [1, 0], [0.123456789, 0.9], 0.0, [("z.jpg", "c", "empty file (0 bytes)")])
    merged = combine([only], ["m1"])
    assert (merged.keys, merged.scores, merged.bad) == (only.keys, only.scores, only.bad)


def test_combine_refuses_members_that_saw_different_samples():
    with pytest.raises(CoverageError, match="different samples"):
        combine([Scores(["a", "b"], [0, 1], [0.1, 0.2], 0.0, []), Scores(["a"], [0], [0.3], 0.0, [])], ["m1", "m2"])


# ---------------------------------------------------------------- refusals


def _ensemble_file(path: Path, members: list[Path], threshold: float = 0.5) -> Path:
    """An ensemble.json written by hand (its documented format), digests by hashlib."""
    path.write_text(json.dumps({"format": "dist_train-ensemble/1", "members": [str(m) for m in members],
                                "sha256": [hashlib.sha256(m.read_bytes()).hexdigest() for m in members],
                                "threshold": threshold}))
    return path


def _copied_export(source: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copyfile(source, folder / "model.safetensors")
    shutil.copyfile(source.with_suffix(".json"), folder / "model.json")
    return folder / "model.safetensors"


@pytest.mark.parametrize("case", ["bare_without_threshold", "missing_member", "same_export_twice", "ensemble_and_more",
                                  "member_changed", "sidecar_as_model", "threshold_range", "malformed_ensemble"])
def test_predict_refuses_bad_members_in_one_line_before_any_work(members, synthetic_shards, tmp_path, case):
    first, second = members
    if case == "member_changed":
        copy = _copied_export(second, tmp_path / "copy")
        ensemble = _ensemble_file(tmp_path / "ensemble.json", [first, copy])
        copy.write_bytes(copy.read_bytes() + b" ")  # re-exported since: another digest
    else:
        ensemble = _ensemble_file(tmp_path / "ensemble.json", [first, second])
    if case == "malformed_ensemble":
        ensemble.write_text(json.dumps({**json.loads(ensemble.read_text()), "threshold": None}))
    models = {"bare_without_threshold": [first, second], "missing_member": [first, tmp_path / "nope.safetensors"],
              "same_export_twice": [first, first.parent.parent], "ensemble_and_more": [ensemble, first],
              "member_changed": [ensemble], "sidecar_as_model": [first.with_suffix(".json")],
              "threshold_range": [ensemble], "malformed_ensemble": [ensemble]}[case]
    extra = ["--threshold", "1.5"] if case == "threshold_range" else []
    argv = [arg for model in models for arg in ("--model", model)]
    out = tmp_path / "p.csv"
    code, stdout, stderr = call(predict_cli, *argv, "--shards", f"{synthetic_shards}/val-*.tar", "--out", out, *extra)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:"), stderr
    named = {"bare_without_threshold": "evaluate.py", "missing_member": "nope.safetensors",
             "same_export_twice": "give each model once", "ensemble_and_more": "only --model",
             "member_changed": "sha256", "sidecar_as_model": "not an ensemble file",
             "threshold_range": "--threshold 1.5", "malformed_ensemble": "numeric threshold"}[case]
    assert named in stderr, stderr
    assert not out.exists() and stdout == ""


def test_evaluate_keeps_an_earlier_ensemble_file_without_overwrite(members, synthetic_shards, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "ensemble.json").write_text("the user's earlier ensemble\n")
    code, _, stderr = call(evaluate_cli, "--model", members[0], "--model", members[1], "--shards",
                            f"{synthetic_shards}/val-*.tar", "--out", out, "--bootstrap", "0")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--overwrite" in stderr, stderr
    assert (out / "ensemble.json").read_text() == "the user's earlier ensemble\n" and len(list(out.iterdir())) == 1


def test_an_ensemble_folder_moved_with_its_exports_still_predicts(members, alone, synthetic_shards, tmp_path):
    """ensemble.json names its members relative to itself: a folder of exports + ensemble.json can be moved or
    copied to another machine (before, the absolute paths of the old place were refused as missing)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    copies = [_copied_export(member, bundle / name) for member, name in zip(members, ("a", "b"))]
    _run("launch/evaluate.py", "--model", copies[0], "--model", copies[1], "--shards", f"{synthetic_shards}/val-*.tar",
         "--out", bundle / "eval", "--bootstrap", "0", "--progress", "none")
    moved = bundle.rename(tmp_path / "moved")
    _run("launch/predict.py", "--model", moved / "eval" / "ensemble.json", "--shards", f"{synthetic_shards}/val-*.tar",
         "--out", tmp_path / "p.csv", "--progress", "none")
    expected, got = _mean(alone), _likelihoods(tmp_path / "p.csv")
    assert sorted(got) == sorted(expected) and all(abs(got[k] - expected[k]) < 1e-6 for k in expected)


def test_an_ensemble_file_moved_alone_still_finds_its_members_where_they_were(evaluated, alone, synthetic_shards,
                                                                               tmp_path):
    out, _ = evaluated
    alone_file = shutil.copyfile(out / "ensemble.json", tmp_path / "ensemble.json")
    _run("launch/predict.py", "--model", alone_file, "--shards", f"{synthetic_shards}/val-*.tar",
         "--out", tmp_path / "p.csv", "--progress", "none")
    expected, got = _mean(alone), _likelihoods(tmp_path / "p.csv")
    assert all(abs(got[k] - expected[k]) < 1e-6 for k in expected)


def test_an_export_beside_another_exports_json_is_one_line_before_any_scoring(members, synthetic_shards, tmp_path,
                                                                             capsys):
    """One member's .safetensors copied beside the other's .json (a hand-assembled folder). Before: a
    load_state_dict traceback listing hundreds of keys. The oracle: the two members' own backbones."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copyfile(members[1], mixed / "model.safetensors")
    shutil.copyfile(members[0].with_suffix(".json"), mixed / "model.json")
    backbone = json.loads((mixed / "model.json").read_text())["model"]["backbone"]
    out = tmp_path / "p.csv"
    code, stdout, stderr = call(predict_cli, "--model", mixed / "model.safetensors", "--shards",
                                f"{synthetic_shards}/val-*.tar", "--out", out, "--progress", "none")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert str(mixed / "model.safetensors") in stderr and backbone in stderr and "export the run again" in stderr
    assert not out.exists()

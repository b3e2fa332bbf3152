"""Export, predict and evaluate a trained model, run as a user runs them.

Oracles: the scores the training loop logged for its validation set (predictions_best.csv), the
synthetic set's own labels CSV with sklearn's metrics, and the files themselves (permissions, bytes).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from eval_runs import TRAINED_RUN, call, load_cli, trained_export
from sklearn.metrics import roc_auc_score

from conftest import write_shards

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["id", "label", "likelihood", "referable_glaucoma", "error"]
"""The one header every prediction CSV has, written out here by hand as the README documents it."""


predict_cli, evaluate_cli, export_cli = load_cli("predict"), load_cli("evaluate"), load_cli("export")


def _run(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                            preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS, reader.fieldnames
        return list(reader)


def _scores(path: Path) -> dict[str, float]:
    return {row["id"]: float(row["likelihood"]) for row in _rows(path) if row["likelihood"]}


def _lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


@pytest.fixture(scope="session")
def trained_run(synthetic_shards, tmp_path_factory) -> Path:
    return trained_export(tmp_path_factory, synthetic_shards, "test_tiny", *TRAINED_RUN)


@pytest.fixture(scope="session")
def logged(trained_run) -> dict[str, float]:
    return _scores(trained_run / "predictions_best.csv")


@pytest.fixture(scope="session")
def val_images(synthetic_shards) -> dict[str, Path]:
    """Validation key -> its raw JPEG, the first 12 in key order."""
    manifest = json.loads((synthetic_shards / "manifest.json").read_text())
    keys = sorted(key for key, entry in manifest["samples"].items() if entry["split"] == "val")[:12]
    return {key: synthetic_shards.parent / "images" / "0" / f"{key}.jpg" for key in keys}


@pytest.fixture(scope="session")
def true_labels(synthetic_shards) -> dict[str, int]:
    with open(synthetic_shards.parent / "images" / "labels.csv", newline="") as handle:
        return {row["challenge_id"]: int(row["class"] == "RG") for row in csv.DictReader(handle)}


def _folder(tmp_path: Path, images: dict[str, Path], name: str = "images") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for key, path in images.items():
        shutil.copyfile(path, folder / f"{key}.jpg")
    return folder


def _break(folder: Path, truncated: str, empty: str) -> tuple[Path, Path]:
    """Cut the end off one JPEG and empty another: the two ways a copy goes wrong."""
    cut, blank = folder / f"{truncated}.jpg", folder / f"{empty}.jpg"
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    blank.write_bytes(b"")
    return cut, blank


def _labels_csv(path: Path, labels: dict[str, int], names: tuple[str, str] = ("NRG", "RG"),
                header: str = "challenge_id,class") -> Path:
    path.write_text(header + "\n" + "".join(f"{key},{names[label]}\n" for key, label in sorted(labels.items())))
    return path


# ---------------------------------------------------------------- export


def test_export_is_group_readable_as_the_umask_allows(trained_run, tmp_path):
    _run("launch/export.py", str(trained_run), "--out", str(tmp_path / "a" / "model.safetensors"), umask=0o022)
    _run("launch/export.py", str(trained_run), "--out", str(tmp_path / "b" / "model.safetensors"), umask=0o077)
    for folder, expected in (("a", 0o644), ("b", 0o600)):
        for name in ("model.safetensors", "model.json"):
            assert stat.S_IMODE((tmp_path / folder / name).stat().st_mode) == expected, (folder, name)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("out", ["folder", "model.json"])
def test_export_refuses_an_out_that_is_not_a_safetensors_file(trained_run, tmp_path, out):
    """A folder, or a .json name the sidecar would overwrite: refused before the checkpoint is read."""
    before = sorted(tmp_path.iterdir())
    target = tmp_path if out == "folder" else tmp_path / out
    code, stdout, stderr = call(export_cli, trained_run, "--out", target)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and ".safetensors" in stderr, stderr
    assert sorted(tmp_path.iterdir()) == before


def test_export_of_a_checkpoint_with_a_corrupt_trainer_json_is_one_line(trained_run, tmp_path):
    """Before: a JSONDecodeError traceback (where --resume of the same checkpoint gave one line)."""
    root = trained_run / "checkpoints"
    folder = tmp_path / "ckpt"
    shutil.copytree(root / (root / "best").read_text().strip(), folder)
    (folder / "trainer.json").write_text('{"trainer": {"step": 4')
    code, stdout, stderr = call(export_cli, folder, "--out", tmp_path / "m.safetensors")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert str(folder / "trainer.json") in stderr and "JSONDecodeError" in stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_export_of_one_checkpoint_folder_goes_beside_the_runs_export_not_inside_the_checkpoint(trained_run,
                                                                                                 tmp_path):
    """Before, RUN/checkpoints/NAME/export/: deleted with the checkpoint when retention drops it."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    name = (run / "checkpoints" / "best").read_text().strip()
    code, stdout, stderr = call(export_cli, run / "checkpoints" / name)
    assert code == 0, stderr
    assert (run / "export" / f"{name}.safetensors").is_file() and (run / "export" / f"{name}.json").is_file()
    assert not (run / "checkpoints" / name / "export").exists()


def test_export_of_a_path_that_does_not_exist_says_so(tmp_path):
    code, _, stderr = call(export_cli, tmp_path / "runs" / "typo")
    assert code == 2 and "no such run directory or checkpoint folder" in stderr and "typo" in stderr


def test_export_over_an_earlier_export_needs_overwrite(trained_run, tmp_path):
    """Before, a second export (from another run, say) replaced the first without a word, and predict with it
    then scored with the other model. The oracle is the first export's bytes."""
    out = tmp_path / "model.safetensors"
    assert call(export_cli, trained_run, "--out", out)[0] == 0
    first = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "model.json")}
    (tmp_path / "model.json").write_text((tmp_path / "model.json").read_text())  # the sidecar alone also counts
    code, stdout, stderr = call(export_cli, trained_run, "--out", out)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--overwrite" in stderr and str(out) in stderr
    assert {name: (tmp_path / name).read_bytes() for name in first} == first
    (tmp_path / "model.safetensors").unlink()
    assert call(export_cli, trained_run, "--out", out)[0] == 2, "a sidecar left alone still holds an export"
    assert call(export_cli, trained_run, "--out", out, "--overwrite")[0] == 0
    assert (tmp_path / "model.safetensors").read_bytes() == first["model.safetensors"]


# ---------------------------------------------------------------- predict


def test_predict_on_validation_shards_reproduces_the_logged_scores(trained_run, synthetic_shards, logged, tmp_path):
    meta = json.loads((trained_run / "export" / "model.json").read_text())
    assert meta["preprocess"]["clahe"] is True and meta["tta"] == "hflip" and meta["threshold"] is not None
    _run("launch/predict.py", "--model", str(trained_run / "export" / "model.safetensors"), "--shards",
         f"{synthetic_shards}/val-*.tar", "--out", str(tmp_path / "pred.csv"))
    rows = _rows(tmp_path / "pred.csv")
    predicted = _scores(tmp_path / "pred.csv")
    assert predicted.keys() == logged.keys()
    assert all(abs(predicted[k] - logged[k]) < 1e-6 for k in logged)
    clear = [row for row in rows if abs(float(row["likelihood"]) - meta["threshold"]) > 1e-7]  # 8 digits written
    assert len(clear) >= len(rows) - 1
    assert all(row["referable_glaucoma"] == str(int(float(row["likelihood"]) >= meta["threshold"])) for row in clear)
    assert all(row["error"] == "" and row["label"] == "" for row in rows)


def test_predict_on_shards_skips_a_corrupt_sample_into_its_row(trained_run, tmp_path):
    write_shards(tmp_path / "shards", "val", [6], corrupt={"val-00-0002"})
    code, stdout, stderr = call(predict_cli, "--model", trained_run, "--shards", f"{tmp_path}/shards/val-*.tar",
                                 "--out", tmp_path / "p.csv", "--progress", "none")
    assert code == 3, stderr
    skipped = _lines(stderr, "skipped")
    assert len(skipped) == 1 and "val-00-0002" in skipped[0] and "val-000000.tar" in skipped[0], stderr
    rows = {row["id"]: row for row in _rows(tmp_path / "p.csv")}
    assert sorted(rows) == [f"val-00-{i:04d}" for i in range(6)]
    assert rows["val-00-0002"]["likelihood"] == "" and rows["val-00-0002"]["error"]
    assert all(rows[k]["likelihood"] for k in rows if k != "val-00-0002")


def test_predict_on_raw_images_matches_the_shards(trained_run, val_images, logged, tmp_path):
    folder = _folder(tmp_path, val_images)
    code, stdout, stderr = call(predict_cli, "--model", trained_run, "--images", folder, "--out", tmp_path / "p.csv")
    assert code == 0, stderr
    predicted = _scores(tmp_path / "p.csv")
    assert sorted(predicted) == sorted(val_images)
    assert all(abs(predicted[k] - logged[k]) < 1e-6 for k in val_images)


def test_predict_skips_unreadable_images_names_them_and_exits_3(trained_run, val_images, logged, tmp_path):
    folder = _folder(tmp_path, val_images)
    keys = sorted(val_images)
    cut, blank = _break(folder, keys[2], keys[5])
    code, stdout, stderr = call(predict_cli, "--model", trained_run, "--images", folder, "--out", tmp_path / "p.csv",
                                 "--progress", "none")
    assert code == 3, stderr
    skipped = _lines(stderr, "skipped")
    assert len(skipped) == 2 and str(cut) in skipped[0] + skipped[1] and str(blank) in skipped[0] + skipped[1]
    rows = {row["id"]: row for row in _rows(tmp_path / "p.csv")}
    assert sorted(rows) == keys
    for bad in (keys[2], keys[5]):
        assert rows[bad]["likelihood"] == "" and rows[bad]["referable_glaucoma"] == ""
    assert "truncated" in rows[keys[2]]["error"] and rows[keys[5]]["error"] == "empty file (0 bytes)"
    good = [k for k in keys if k not in (keys[2], keys[5])]
    assert all(abs(float(rows[k]["likelihood"]) - logged[k]) < 1e-6 for k in good)
    assert "10 scored, 2 skipped" in stdout


def test_predict_ids_are_paths_under_images_so_equal_names_stay_apart(trained_run, val_images, logged, tmp_path):
    first, second = sorted(val_images)[:2]
    for day, key in (("day1", first), ("day2", second)):
        (tmp_path / "in" / day).mkdir(parents=True)
        shutil.copyfile(val_images[key], tmp_path / "in" / day / "img001.jpg")
    code, _, stderr = call(predict_cli, "--model", trained_run, "--images", tmp_path / "in", "--out",
                            tmp_path / "p.csv")
    assert code == 0, stderr
    predicted = _scores(tmp_path / "p.csv")
    assert sorted(predicted) == ["day1/img001", "day2/img001"]
    assert abs(predicted["day1/img001"] - logged[first]) < 1e-6
    assert abs(predicted["day2/img001"] - logged[second]) < 1e-6


def test_predict_shows_progress_on_stderr(trained_run, val_images, tmp_path):
    folder = _folder(tmp_path, val_images)
    code, stdout, stderr = call(predict_cli, "--model", trained_run, "--images", folder, "--out", tmp_path / "p.csv",
                                 "--progress", "plain", "--batch-size", "4")
    assert code == 0, stderr
    assert any("12/12" in line for line in stderr.splitlines()), stderr
    assert "12/12" not in stdout


@pytest.mark.parametrize("case", ["no_folder", "no_images", "no_model", "no_shards", "out_exists", "out_is_dir",
                                  "batch_size", "device", "explain_file", "shards_folder", "model_not_export"])
def test_predict_bad_input_exits_2_in_one_line_before_any_work(trained_run, val_images, tmp_path, case):
    folder = _folder(tmp_path, dict(list(val_images.items())[:1]))
    no_images = tmp_path / "notes"
    no_images.mkdir()
    (no_images / "notes.txt").write_text("not an image")
    out = tmp_path / "p.csv"
    args = {"no_folder": ["--images", tmp_path / "nowhere"], "no_images": ["--images", no_images],
            "no_shards": ["--shards", f"{tmp_path}/val-*.tar"], "shards_folder": ["--shards", str(tmp_path)]
            }.get(case, ["--images", folder])
    model = {"no_model": tmp_path / "missing.safetensors", "model_not_export": no_images / "notes.txt"}.get(case,
                                                                                                          trained_run)
    extra = {"batch_size": ["--batch-size", "0"], "device": ["--device", "gpu"],
             "explain_file": ["--explain", no_images / "notes.txt"]}.get(case, [])
    if case == "out_exists":
        out.write_text("the user's earlier predictions\n")
    if case == "out_is_dir":
        out = tmp_path
    code, stdout, stderr = call(predict_cli, "--model", model, *args, "--out", out, *extra)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:"), stderr
    named = {"no_folder": "nowhere", "no_images": str(no_images), "no_model": "missing.safetensors",
             "no_shards": "val-*.tar", "out_exists": "--overwrite", "out_is_dir": str(tmp_path),
             "batch_size": "--batch-size", "device": "--device gpu: give cpu, cuda or cuda:N",
             "explain_file": "--explain", "shards_folder": "give its shards as a pattern",
             "model_not_export": "not an export"}[case]
    assert named in stderr, stderr
    if case == "out_exists":
        assert out.read_text() == "the user's earlier predictions\n"
    elif case != "out_is_dir":
        assert not out.exists()


# ---------------------------------------------------------------- evaluate


def test_evaluate_reports_the_official_metrics(trained_run, synthetic_shards, tmp_path):
    _run("launch/evaluate.py", "--model", str(trained_run), "--shards", f"{synthetic_shards}/val-*.tar",
         "--out", str(tmp_path), "--bootstrap", "50")
    report = json.loads((tmp_path / "report.json").read_text())
    rows = _rows(tmp_path / "predictions.csv")
    labels, scores = [int(r["label"]) for r in rows], [float(r["likelihood"]) for r in rows]
    assert report["alpha"] == pytest.approx(roc_auc_score(labels, scores, max_fpr=0.1), abs=1e-12)
    assert report["n"] == 40 and (tmp_path / "roc.png").stat().st_size > 1000
    assert report["alpha_ci"][0] <= report["alpha"] <= report["alpha_ci"][1]


@pytest.mark.parametrize("names", [("NRG", "RG"), ("0", "1")])
def test_evaluate_reads_labels_as_the_shard_builder_does(trained_run, val_images, logged, true_labels, tmp_path,
                                                         names):
    folder = _folder(tmp_path, val_images)
    wanted = {key: true_labels[key] for key in val_images}
    assert 0 < sum(wanted.values()) < len(wanted), "the oracle needs both classes"
    labels = _labels_csv(tmp_path / "labels.csv", {**true_labels}, names)
    code, stdout, stderr = call(evaluate_cli, "--model", trained_run, "--images", folder, "--labels", labels,
                                 "--out", tmp_path / "eval", "--bootstrap", "0")
    assert code == 0, stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    keys = sorted(val_images)
    assert report["auc"] == pytest.approx(roc_auc_score([wanted[k] for k in keys], [logged[k] for k in keys]),
                                          abs=1e-9)
    assert report["positives"] == sum(wanted.values())
    assert {row["id"]: int(row["label"]) for row in _rows(tmp_path / "eval" / "predictions.csv")} == wanted


def test_evaluate_skips_unreadable_images_and_exits_3(trained_run, val_images, true_labels, tmp_path):
    folder = _folder(tmp_path, val_images)
    keys = sorted(val_images, key=lambda k: (true_labels[k], k))  # two NRG images break, the RG ones stay
    _break(folder, keys[0], keys[1])
    labels = _labels_csv(tmp_path / "labels.csv", true_labels)
    code, stdout, stderr = call(evaluate_cli, "--model", trained_run, "--images", folder, "--labels", labels,
                                 "--out", tmp_path / "eval", "--bootstrap", "0", "--progress", "none")
    assert code == 3, stderr
    assert len(_lines(stderr, "skipped")) == 2
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n"] == 10 and sorted(r["id"] for r in report["rejected"]) == sorted(keys[:2])
    rows = {row["id"]: row for row in _rows(tmp_path / "eval" / "predictions.csv")}
    assert len(rows) == 12 and rows[keys[0]]["likelihood"] == "" and rows[keys[0]]["error"]


def test_evaluate_refuses_images_without_a_row_unless_skip_missing(trained_run, val_images, true_labels, tmp_path):
    folder = _folder(tmp_path, val_images)
    keys = sorted(val_images, key=lambda k: (true_labels[k], k))  # three NRG rows go, the RG ones stay
    labels = _labels_csv(tmp_path / "labels.csv", {k: v for k, v in true_labels.items() if k not in keys[:3]})
    argv = ["--model", trained_run, "--images", folder, "--labels", labels, "--out", tmp_path / "eval",
            "--bootstrap", "0"]
    code, _, stderr = call(evaluate_cli, *argv)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "3 images" in stderr and keys[0] in stderr and "--skip-missing" in stderr
    assert not (tmp_path / "eval").exists()
    code, stdout, stderr = call(evaluate_cli, *argv, "--skip-missing")
    assert code == 0, stderr
    assert "3 images" in stderr and keys[0] in stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n"] == 9 and report["skipped"]["unlabelled_images"] == 3


@pytest.mark.parametrize("case", ["wrong_header", "unknown_class", "no_folder", "empty_folder", "no_labels_file",
                                  "one_class", "labels_without_images", "out_holds_a_report"])
def test_evaluate_bad_input_exits_2_in_one_line_before_creating_out(trained_run, val_images, true_labels, tmp_path,
                                                                    case):
    folder = _folder(tmp_path, val_images)
    labels = tmp_path / "labels.csv"
    if case == "wrong_header":
        _labels_csv(labels, true_labels, header="id,label")
    elif case == "unknown_class":
        _labels_csv(labels, true_labels, names=("healthy", "glaucoma"))
    elif case == "one_class":
        _labels_csv(labels, dict.fromkeys(true_labels, 0))
    else:
        _labels_csv(labels, true_labels)
    out = tmp_path / "eval"
    if case == "out_holds_a_report":
        out.mkdir()
        (out / "report.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    args = {"no_folder": ["--images", tmp_path / "nowhere", "--labels", labels],
            "empty_folder": ["--images", tmp_path / "empty", "--labels", labels],
            "no_labels_file": ["--images", folder, "--labels", tmp_path / "nolabels.csv"],
            "labels_without_images": ["--labels", labels, "--shards", "x-*.tar"]}.get(
        case, ["--images", folder, "--labels", labels])
    code, stdout, stderr = call(evaluate_cli, "--model", trained_run, *args, "--out", out)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error:"), stderr
    named = {"wrong_header": "challenge_id", "unknown_class": "RG", "no_folder": "nowhere", "empty_folder": ".jpg",
             "no_labels_file": "nolabels.csv", "one_class": "NRG", "labels_without_images": "--labels",
             "out_holds_a_report": "--overwrite"}[case]
    assert named in stderr, stderr
    if case == "out_holds_a_report":
        assert (out / "report.json").read_text() == "{}" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists()


# ---------------------------------------------------------------- one set of columns


def test_every_prediction_csv_has_the_documented_columns(trained_run):
    for path in (trained_run / "predictions_val.csv", trained_run / "predictions_best.csv"):
        rows = _rows(path)
        assert rows and all(row["label"] in ("0", "1") and row["error"] == "" for row in rows)
    readme = (REPO / "README.md").read_text()
    assert ",".join(COLUMNS) in readme
    for cli in (predict_cli, evaluate_cli):
        assert ",".join(COLUMNS) in cli.__doc__


def test_evaluate_refuses_a_negative_bootstrap_count(trained_run, tmp_path, capsys):
    """Before: --bootstrap -5 was quietly taken as 0 (no intervals)."""
    with pytest.raises(SystemExit) as leaving:
        evaluate_cli.main(["--model", str(trained_run), "--shards", f"{tmp_path}/val-*.tar", "--out",
                           str(tmp_path / "eval"), "--bootstrap", "-5"])
    stderr = capsys.readouterr().err
    assert leaving.value.code == 2 and "--bootstrap -5" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "eval").exists()


def test_predict_with_an_export_without_a_threshold_says_why_referable_is_empty(trained_run, val_images, tmp_path):
    """Before: exit 0 with every referable_glaucoma empty, and only 'threshold none' on stdout."""
    export = tmp_path / "export"
    shutil.copytree(trained_run / "export", export)
    meta = json.loads((export / "model.json").read_text())
    (export / "model.json").write_text(json.dumps({**meta, "threshold": None}))
    folder = _folder(tmp_path, dict(list(val_images.items())[:2]))
    code, _, stderr = call(predict_cli, "--model", export / "model.safetensors", "--images", folder, "--out",
                           tmp_path / "p.csv", "--progress", "none")
    assert code == 0 and "has no threshold" in stderr and "--threshold" in stderr, stderr
    assert {row["referable_glaucoma"] for row in _rows(tmp_path / "p.csv")} == {""}
    code, _, stderr = call(predict_cli, "--model", export / "model.safetensors", "--images", folder, "--out",
                           tmp_path / "q.csv", "--progress", "none", "--threshold", "0.5")
    assert code == 0 and "has no threshold" not in stderr
    assert {row["referable_glaucoma"] for row in _rows(tmp_path / "q.csv")} <= {"0", "1"}

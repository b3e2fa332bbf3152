"""Scenario 6: a bad labels CSV given to shards/build.py: exit 2, one clear line, no output folder.

The CLI's `main(argv)` runs in this process (as tests/test_shards.py does); every case below is
refused before any image is read, and one valid CSV shows the same images and options do build.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
from fault_helpers import REPO, text_lines

from conftest import jpeg_bytes

_spec = importlib.util.spec_from_file_location("fault_shards_build_cli", REPO / "shards" / "build.py")
build_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_cli)

IDS = ("TRAIN000001", "TRAIN000002", "TRAIN000003", "TRAIN000004")
GOOD_ROWS = "TRAIN000001,NRG\nTRAIN000002,RG\nTRAIN000003,NRG\nTRAIN000004,NRG\n"

BAD_CSVS = {
    "unknown_class": ("challenge_id,class\n" + GOOD_ROWS.replace("TRAIN000002,RG", "TRAIN000002,GLAUCOMA"),
                      ("unknown class", "line 3", "TRAIN000002", "GLAUCOMA", "RG or NRG (or 1 or 0)")),
    "duplicate_id": ("challenge_id,class\n" + GOOD_ROWS + "TRAIN000003,RG\n",
                     ("duplicate id", "line 6", "TRAIN000003")),
    "missing_image": ("challenge_id,class\n" + GOOD_ROWS + "TRAIN000009,RG\n",
                      ("labelled ids without an image", "TRAIN000009")),
    "empty_file": ("", ("empty file",)),
    "wrong_header": ("id,label\n" + GOOD_ROWS, ("wrong header", "challenge_id", "class")),
    "header_only": ("challenge_id,class\n", ("no rows",)),
    "invalid_id": ("challenge_id,class\n" + GOOD_ROWS + "../TRAIN000005,RG\n",
                   ("invalid id", "../TRAIN000005", "without folder")),
    "id_with_extension": ("challenge_id,class\n" + GOOD_ROWS.replace("TRAIN000004,", "TRAIN000004.jpg,"),
                          ("invalid id", "TRAIN000004.jpg", "drop the extension", "TRAIN000004,")),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("label_images") / "0"
    folder.mkdir()
    for index, key in enumerate(IDS):
        (folder / f"{key}.jpg").write_bytes(jpeg_bytes(index, size=48))
    return folder


def run_build(images: Path, labels: Path, out: Path) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["--images", str(images), "--labels", str(labels), "--out", str(out), "--size", "32",
            "--shard-size", "4", "--workers", "1", "--val-fraction", "0.25"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = build_cli.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_labels_csv_is_refused_in_one_line(images, tmp_path, case):
    text, named = BAD_CSVS[case]
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    out = tmp_path / "shards"
    code, stdout, stderr = run_build(images, labels, out)
    assert code == 2, stderr
    lines = text_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert all(word in lines[0] for word in named), lines[0]
    if case != "missing_image":  # that one is about the image folders, and names the ids instead
        assert str(labels) in lines[0], lines[0]
    assert stdout == "" and not out.exists()


def test_missing_labels_file_is_refused(images, tmp_path):
    code, _, stderr = run_build(images, tmp_path / "nowhere.csv", tmp_path / "shards")
    assert code == 2 and "nowhere.csv" in stderr and len(text_lines(stderr)) == 1, stderr


def test_the_same_images_build_with_a_valid_csv(images, tmp_path):
    """The control: the refusals above come from the CSV, not from the images or options."""
    labels = tmp_path / "labels.csv"
    labels.write_text("challenge_id,class\n" + GOOD_ROWS)
    code, stdout, stderr = run_build(images, labels, tmp_path / "shards")
    assert code == 0, stderr
    assert (tmp_path / "shards" / "manifest.json").is_file()


@pytest.mark.parametrize("names", [("0", "1"), ("nrg", "rg")])
def test_zero_one_and_lower_case_classes_read_as_nrg_rg(images, tmp_path, names):
    """The AIROGS release writes RG/NRG; 0/1 and lower case mean the same, as evaluate.py reads them too."""
    labels = tmp_path / "labels.csv"
    labels.write_text("challenge_id,class\n" + GOOD_ROWS.replace("NRG", names[0]).replace(",RG", f",{names[1]}"))
    code, stdout, stderr = run_build(images, labels, tmp_path / "shards")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    positives = sum(totals["positives"] for totals in manifest["totals"].values())
    assert positives == 1 and len(manifest["samples"]) == 4  # GOOD_ROWS: TRAIN000002 is the one RG

"""Shard building end to end on a small synthetic set, read back with independent tools.

Oracles: the labels CSV and image folders themselves, GNU tar, plain webdataset, tarfile
and hashlib; never the manifest alone.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from dist_train.data.manifest import read_manifest
from dist_train.shards.synthetic import generate
from dist_train.shards.verify import unfinished_build

from conftest import write_shards

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
BUILD_ARGS = ["--size", str(SIZE), "--shard-size", "8", "--workers", "2", "--seed", "0"]

_spec = importlib.util.spec_from_file_location("shards_build_cli", ROOT / "shards" / "build.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def run_cli(*argv) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def build_into(out: Path, labels: Path, *extra, images=None) -> tuple[int, str, str]:
    images = images or [labels.parent]
    return run_cli("--images", *images, "--labels", labels, "--out", out, *BUILD_ARGS, *extra)


def csv_labels(labels: Path) -> dict[str, int]:
    with open(labels, newline="") as stream:
        return {row["challenge_id"]: int(row["class"] == "RG") for row in csv.DictReader(stream)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(out.glob("*.tar"))}


def gnu_tar_names(path: Path) -> list[str]:
    return subprocess.run(["tar", "-tf", str(path)], check=True, capture_output=True, text=True).stdout.split()


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read with tarfile in stored order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("images"), 60, positive_rate=0.2, size=112, seed=3, folders=2)


@pytest.fixture(scope="module")
def built(labels, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "shards"
    code, stdout, stderr = build_into(out, labels)
    assert code == 0, stderr
    assert "8 shards written, 0 reused" in stdout
    return out


def test_webdataset_reads_every_labelled_sample_once(built, labels):
    expected = csv_labels(labels)
    manifest = read_manifest(built)
    seen = {}
    for split in ("train", "val"):
        urls = sorted(str(p) for p in built.glob(f"{split}-*.tar"))
        samples = list(wds.WebDataset(urls, shardshuffle=False))
        totals = manifest["totals"][split]
        assert (len(samples), sum(s["cls"] == b"1" for s in samples)) == (totals["samples"], totals["positives"])
        for sample in samples:
            assert sample["__key__"] not in seen
            seen[sample["__key__"]] = int(sample["cls"])
            assert json.loads(sample["json"])["id"] == sample["__key__"]
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    assert seen == expected


def test_gnu_tar_lists_and_extracts_the_shards(built, labels, tmp_path):
    expected = csv_labels(labels)
    shards = sorted(built.glob("*.tar"))
    assert [p.name for p in shards] == [f"train-{i:06d}.tar" for i in range(6)] + ["val-000000.tar", "val-000001.tar"]
    for shard in shards:
        names = gnu_tar_names(shard)
        keys = sorted({name.partition(".")[0] for name in names})
        assert sorted(names) == sorted(f"{k}.{ext}" for k in keys for ext in ("cls", "jpg", "json"))
    subprocess.run(["tar", "-xf", str(shards[0]), "-C", str(tmp_path)], check=True)
    for cls_file in tmp_path.glob("*.cls"):
        assert int(cls_file.read_text()) == expected[cls_file.stem]
        meta = json.loads(cls_file.with_suffix(".json").read_text())
        assert set(meta) == {"id", "source_dir", "original_size", "crop_box"}
        assert meta["source_dir"] == next(labels.parent.glob(f"*/{cls_file.stem}.jpg")).parent.name
        with Image.open(cls_file.with_suffix(".jpg")) as image:
            assert image.size == (SIZE, SIZE)


def test_manifest_hashes_and_counts_match_the_files(built):
    manifest = read_manifest(built)
    assert manifest["format"] == "dist_train-shards/1"
    assert {s["name"] for s in manifest["shards"]} == set(shard_digests(built))
    for shard in manifest["shards"]:
        path = built / shard["name"]
        samples = tar_samples(path)
        assert shard["sha256"] == sha256(path) and shard["bytes"] == path.stat().st_size
        assert shard["keys_sha256"] == hashlib.sha256("\n".join(samples).encode()).hexdigest()
        assert shard["samples"] == len(samples)
        assert shard["positives"] == sum(s["cls"] == b"1" for s in samples.values())
        assert all(manifest["samples"][key]["shard"] == shard["name"] for key in samples)


def test_labels_csv_hash_is_the_files(built, labels):
    assert read_manifest(built)["labels_csv_sha256"] == sha256(labels)


def test_split_is_stratified_by_class(built, labels):
    expected = csv_labels(labels)
    records = read_manifest(built)["samples"]
    for label in (0, 1):
        keys = [k for k, v in expected.items() if v == label]
        in_val = sum(records[k]["split"] == "val" for k in keys)
        assert in_val == round(0.2 * len(keys)) and in_val > 0


def test_rebuild_is_byte_identical_and_the_seed_changes_the_split(built, labels, tmp_path):
    assert build_into(tmp_path / "again", labels)[0] == 0
    assert shard_digests(tmp_path / "again") == shard_digests(built)
    assert read_manifest(tmp_path / "again") == read_manifest(built)
    assert build_into(tmp_path / "seed1", labels, "--seed", "1")[0] == 0
    val_keys = {out: {k for k, v in read_manifest(out)["samples"].items() if v["split"] == "val"}
                for out in (built, tmp_path / "seed1")}
    assert val_keys[built] != val_keys[tmp_path / "seed1"]


def test_split_column_decides_the_split(labels, tmp_path):
    expected = csv_labels(labels)
    column_csv = tmp_path / "labels.csv"
    rows = [[key, "RG" if label else "NRG", "val" if i % 5 == 0 else "train"]
            for i, (key, label) in enumerate(sorted(expected.items()))]
    with open(column_csv, "w", newline="") as stream:
        csv.writer(stream).writerows([["challenge_id", "class", "fold"], *rows])
    code, _, stderr = build_into(tmp_path / "out", column_csv, "--split-column", "fold", images=[labels.parent])
    assert code == 0, stderr
    manifest = read_manifest(tmp_path / "out")
    assert {k for k, v in manifest["samples"].items() if v["split"] == "val"} == {r[0] for r in rows if r[2] == "val"}
    assert manifest["split"]["method"] == "column"


def test_val_dirs_hold_out_whole_folders(labels, tmp_path):
    held_out = labels.parent / "1"
    code, _, stderr = build_into(tmp_path / "out", labels, "--val-dirs", held_out)
    assert code == 0, stderr
    manifest = read_manifest(tmp_path / "out")
    val_keys = {k for k, v in manifest["samples"].items() if v["split"] == "val"}
    assert val_keys == {name.removesuffix(".jpg") for name in os.listdir(held_out)}
    assert all(v["source_dir"] == "1" for k, v in manifest["samples"].items() if k in val_keys)
    assert manifest["split"] == {"method": "dirs", "seed": 0, "val_dirs": ["1"]}


def edit_csv(labels: Path, case: str) -> str:
    lines = labels.read_text().splitlines()
    if case == "unknown_class":
        lines[3] = lines[3].split(",")[0] + ",MAYBE"
    elif case == "duplicate_id":
        lines.append(lines[1])
    elif case == "missing_image":
        lines.append("TRAIN999999,RG")
    elif case == "unlabelled_image":
        lines.pop()
    elif case == "wrong_header":
        lines[0] = "id,label"
    elif case == "empty":
        return ""
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("case,phrase", [
    ("unknown_class", "1 unknown class (line 4"),
    ("duplicate_id", "1 duplicate id (line 62"),
    ("missing_image", "1 labelled ids without an image (TRAIN999999)"),
    ("unlabelled_image", "1 images not in the labels CSV"),
    ("wrong_header", "wrong header"),
    ("empty", "empty file"),
])
def test_bad_labels_exit_2_with_one_error_line(labels, tmp_path, case, phrase):
    bad_csv = tmp_path / "labels.csv"
    bad_csv.write_text(edit_csv(labels, case))
    code, _, stderr = build_into(tmp_path / "out", bad_csv, images=[labels.parent])
    assert code == 2
    assert stderr.startswith("error:") and stderr.count("\n") == 1 and phrase in stderr, stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_labels_file_or_images_folder_exit_2(labels, tmp_path):
    code, _, stderr = build_into(tmp_path / "out", tmp_path / "nowhere.csv", images=[labels.parent])
    assert code == 2 and stderr.startswith("error:") and "no such file" in stderr
    code, _, stderr = build_into(tmp_path / "out", labels, images=[tmp_path / "nowhere"])
    assert code == 2 and "not a folder" in stderr


@pytest.mark.parametrize("inside", ["", "shards"], ids=["the images folder", "below it"])
def test_an_out_folder_among_the_images_is_refused_and_nothing_is_written(labels, tmp_path, inside):
    images = tmp_path / "images"
    shutil.copytree(labels.parent, images)
    before = sorted(path.relative_to(images) for path in images.rglob("*"))
    code, _, stderr = build_into(images / inside, images / "labels.csv", images=[images])
    assert code == 2 and stderr.startswith("error: --out") and stderr.count("\n") == 1, stderr
    assert "inside --images" in stderr and "outside the image folders" in stderr
    assert sorted(path.relative_to(images) for path in images.rglob("*")) == before


def test_skip_missing_builds_the_rest_and_counts_what_it_skipped(labels, tmp_path):
    loose_csv = tmp_path / "labels.csv"
    loose_csv.write_text(edit_csv(labels, "unlabelled_image") + "TRAIN999999,NRG\n")
    code, stdout, stderr = build_into(tmp_path / "out", loose_csv, "--skip-missing", images=[labels.parent])
    assert code == 0, stderr
    assert "skipped 1 labelled ids without an image and 1 images without a label" in stdout
    manifest = read_manifest(tmp_path / "out")
    assert manifest["skipped"] == {"missing_images": 1, "unlabelled_images": 1}
    assert len(manifest["samples"]) == 59 and "TRAIN000059" not in manifest["samples"]


def test_unreadable_images_are_rejected_and_counted(labels, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(labels.parent, images)
    truncated = images / "0" / "TRAIN000005.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-400])
    (images / "1" / "TRAIN000040.jpg").write_bytes(b"")
    code, stdout, stderr = build_into(tmp_path / "out", images / "labels.csv", "--max-rejected-fraction", "0.05")
    assert code == 0, stderr
    manifest = read_manifest(tmp_path / "out")
    assert [r["id"] for r in manifest["rejected"]] == ["TRAIN000005", "TRAIN000040"]
    assert "truncated" in manifest["rejected"][0]["reason"]
    assert sum(manifest["totals"][s]["samples"] for s in ("train", "val")) == 58
    assert "rejected 2" in stdout
    code, _, stderr = build_into(tmp_path / "strict", images / "labels.csv")
    assert code == 1 and stderr.startswith("error:") and "of 60 images" in stderr
    assert "--max-rejected-fraction" in stderr and not (tmp_path / "strict" / "manifest.json").exists()


def test_out_dir_of_another_csv_or_preprocessing_is_refused(built, labels, tmp_path):
    before = shard_digests(built)
    code, _, stderr = build_into(built, labels, "--size", "48")
    assert code == 2 and stderr.startswith("error:") and "preprocess" in stderr
    other_csv = tmp_path / "labels.csv"
    other_csv.write_text(labels.read_text().replace("NRG", "RG", 1))
    code, _, stderr = build_into(built, other_csv, images=[labels.parent])
    assert code == 2 and "another labels CSV" in stderr
    assert shard_digests(built) == before


def test_verify_passes_then_catches_corruption_loss_and_strays(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    code, stdout, _ = run_cli("verify", copy)
    assert code == 0 and "OK: 8 shards, 0 problems" in stdout
    corrupted = copy / "train-000002.tar"
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(corrupted, 0o644)
    corrupted.write_bytes(bytes(data))
    (copy / "val-000001.tar").unlink()
    shutil.copy(copy / "train-000000.tar", copy / "train-000099.tar")
    code, stdout, _ = run_cli("verify", copy)
    assert code == 1
    assert "train-000002.tar: sha256" in stdout and "val-000001.tar: missing" in stdout
    assert "train-000099.tar: not in the manifest" in stdout


def test_rerun_reuses_complete_shards(built, labels, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    stamps = {p.name: p.stat().st_mtime_ns for p in copy.glob("*.tar")}
    code, stdout, _ = build_into(copy, labels)
    assert code == 0 and "0 shards written, 8 reused" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("*.tar")} == stamps
    assert read_manifest(copy) == read_manifest(built)


KILLED_BUILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
from dist_train.shards.build import BuildOptions, build

def kill_after_first_shard(sidecar):
    os.killpg(0, signal.SIGKILL)

options = BuildOptions(size={size}, shard_size=8, workers=2, seed=0)
build([{images!r}], {labels!r}, {out!r}, options, on_shard_done=kill_after_first_shard)
"""


def test_killed_build_resumes_to_the_uninterrupted_result(built, labels, tmp_path):
    out = tmp_path / "out"
    kill_build_after_first_shard(labels, out)
    assert not (out / "manifest.json").exists()
    completed = {p.name.removesuffix(".json") for p in (out / ".parts").glob("*.tar.json")}
    assert completed and completed < set(shard_digests(built))
    stamps = {name: (out / name).stat().st_mtime_ns for name in completed}
    code, stdout, stderr = build_into(out, labels)
    assert code == 0, stderr
    assert f"{len(completed)} reused" in stdout
    assert {name: (out / name).stat().st_mtime_ns for name in completed} == stamps
    assert read_manifest(out) == read_manifest(built)
    assert shard_digests(out) == shard_digests(built)
    assert not list(out.rglob("*.tmp"))


def kill_build_after_first_shard(labels: Path, out: Path) -> None:
    script = KILLED_BUILD.format(root=str(ROOT), size=SIZE, images=str(labels.parent), labels=str(labels),
                                 out=str(out))
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], start_new_session=True,
                            capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()


UNFINISHED = "no manifest: the build did not finish; rerun the same build command to resume"


def test_verify_tells_an_unfinished_build(labels, tmp_path):
    kill_build_after_first_shard(labels, tmp_path / "out")
    assert list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "manifest.json").exists()
    code, stdout, stderr = run_cli("verify", tmp_path / "out")
    assert code == 1 and stderr.strip() == f"error: {tmp_path / 'out'}: {UNFINISHED}", stderr


def test_verify_tells_a_rebuild_that_did_not_finish_over_an_old_manifest(built, labels, tmp_path):
    """A rerun killed midway leaves the previous run's manifest: verify must not call the folder OK."""
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    kill_build_after_first_shard(labels, copy)
    code, stdout, stderr = run_cli("verify", copy)
    assert code == 1 and "the build did not finish; rerun the same build command to resume" in stderr, stderr
    assert build_into(copy, labels)[0] == 0
    assert run_cli("verify", copy)[0] == 0


def test_verify_of_a_folder_without_a_build_exits_2(tmp_path):
    code, _, stderr = run_cli("verify", tmp_path)
    assert code == 2 and "no manifest.json" in stderr and "shards/build.py" in stderr, stderr
    write_shards(tmp_path / "other_tool", "train", [4])
    assert unfinished_build(tmp_path / "other_tool") is None, "shards from another tool are not a failed build"
    code, _, stderr = run_cli("verify", tmp_path / "other_tool")
    assert code == 2 and "no manifest.json" in stderr, stderr
    code, _, stderr = run_cli("verify", tmp_path / "nowhere")
    assert code == 2 and "not a folder" in stderr, stderr


def test_degenerate_images_are_stored_with_a_warning_and_listed(labels, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(labels.parent, images)
    strip = images / "0" / "TRAIN000007.jpg"
    Image.new("RGB", (512, 40), (90, 40, 20)).save(strip, "JPEG")
    code, stdout, stderr = build_into(tmp_path / "out", images / "labels.csv")
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(strip) in warnings[0] and "512x40" in warnings[0] and "2:1" in warnings[0]
    manifest = read_manifest(tmp_path / "out")
    assert [(d["id"], d["original_size"]) for d in manifest["degenerate"]] == [("TRAIN000007", [512, 40])]
    assert "TRAIN000007" in manifest["samples"]
    code, _, stderr = build_into(tmp_path / "out", images / "labels.csv")
    assert code == 0 and "512x40" in stderr, "a resumed build warns again from its sidecars"


def test_max_shard_bytes_caps_every_shard(labels, tmp_path):
    limit = 40_000
    code, stdout, stderr = build_into(tmp_path / "out", labels, "--shard-size", "100", "--max-shard-bytes", limit)
    assert code == 0, stderr
    sizes = [p.stat().st_size for p in (tmp_path / "out").glob("train-*.tar")]
    assert len(sizes) > 1 and max(sizes) <= limit
    assert "warning" not in stdout


def test_read_manifest_checks_the_format(built, tmp_path):
    assert read_manifest(built) == read_manifest(built / "manifest.json")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError):
        read_manifest(tmp_path)


@pytest.mark.parametrize("change, named", [(["--val-fraction", "0.4"], "--val-fraction 0.2 (now 0.4)"),
                                           (["--shard-size", "5"], "--shard-size 8 (now 5)"),
                                           (["--seed", "1"], "--seed 0 (now 1)")])
def test_a_rebuild_with_another_split_or_shard_size_is_refused_and_changes_nothing(built, labels, tmp_path,
                                                                                  change, named):
    """Before, such a rebuild exited 0: validation samples moved into training, and val-000001.tar, which
    runs named, was deleted. The oracle is the folder's own files, byte for byte."""
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    before = {path.name: sha256(path) for path in copy.rglob("*") if path.is_file()}
    code, stdout, stderr = build_into(copy, labels, *change)
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
    assert named in stderr and str(copy) in stderr and "choose another --out" in stderr
    assert {path.name: sha256(path) for path in copy.rglob("*") if path.is_file()} == before


def test_a_labels_csv_without_a_referable_case_builds_with_a_warning_and_train_refuses_it(labels, tmp_path):
    """Before: built, trained and exported with exit 0 and no word (threshold null, every prediction empty).
    The oracle is the CSV itself, rewritten with every RG as NRG."""
    negatives = tmp_path / "labels.csv"
    negatives.write_text(labels.read_text().replace(",RG\n", ",NRG\n"))
    assert ",RG\n" not in negatives.read_text()
    code, _, stderr = build_into(tmp_path / "out", negatives, images=[labels.parent])
    assert code == 0
    assert "warning: train holds no RG (referable) samples among" in stderr and "warning: val holds no RG" in stderr
    run = subprocess.run([sys.executable, "-m", "dist_train.main", "--config", str(ROOT / "configs" / "test_tiny.yaml"),
                          "--set", f"data.train_shards={tmp_path}/out/train-*.tar",
                          f"data.val_shards={tmp_path}/out/val-*.tar", f"run_root={tmp_path / 'runs'}"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "data.train_shards" in lines[0] and "no referable (RG, label 1) sample" in lines[0]
    assert not (tmp_path / "runs").exists()

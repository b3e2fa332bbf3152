"""Build, resume and verify the WebDataset shards the training pipeline reads.

Layout of OUT (the contract with dist_train's data pipeline):
  train-000000.tar, val-000000.tar, ...  members <key>.jpg, <key>.cls ("0"/"1"), <key>.json
  manifest.json                          counts, hashes, split and per-sample records
  .parts/<shard>.json                    sidecar written when a shard completes (resume)
Shard contents depend only on the inputs and options, so a build killed midway and
re-run reproduces the uninterrupted result byte for byte.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dist_train.errors import DistTrainError, UserError
from dist_train.transforms import DRAFT_MARGIN, BadImageError, load_fundus

FORMAT = "dist_train-shards/1"
CLASSES = {"NRG": 0, "RG": 1, "0": 0, "1": 1}
"""Accepted values of the class column (case-insensitive): AIROGS writes RG/NRG, other tools 1/0."""
LABELS = (0, 1)
MAX_ASPECT_RATIO = 2.0
"""Fundus photographs are 1:1 to 3:2; a longer side beyond twice the shorter is a strip, a screenshot or a
stitched pair, stored (it may be right) but warned about and listed in the manifest's `degenerate`."""
UNFINISHED_MARKER = "unfinished"
"""Written in .parts/ when a build starts writing and removed with the manifest's publication, so a killed
rebuild that left an older manifest behind is still known as unfinished."""
SPLIT_VALUES = {"train": "train", "val": "val", "validation": "val"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
PARTS = ".parts"
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
SHOWN = 5
"""Offending rows named in an error message; the count covers the rest."""


_NOT_FINISHED = "the build did not finish; rerun the same build command to resume"


class ShardInputError(UserError, ValueError):
    """Bad labels, images or OUT folder: the CLI exits 2."""


class TooManyRejectedError(DistTrainError, RuntimeError):
    """More unreadable images than --max-rejected-fraction allows: the CLI exits 1."""


class UnfinishedBuildError(UserError, RuntimeError):
    """A shard folder whose build stopped before its manifest was written: verify exits 1."""


@dataclass(frozen=True)
class BuildOptions:
    size: int = 512
    """Side of the square preprocessed image."""
    quality: int = 95
    """JPEG quality of the stored image."""
    shard_size: int = 1000
    """Samples per shard (fewer when max_shard_bytes asks for it)."""
    max_shard_bytes: int | None = None
    """Target shard size; samples per shard are estimated from a probe of the inputs."""
    workers: int = 2
    seed: int = 0
    val_fraction: float = 0.2
    split_column: str | None = None
    val_dirs: tuple[str, ...] = ()
    max_rejected_fraction: float = 0.01
    skip_missing: bool = False

    def preprocessing(self) -> dict:
        return {"size": self.size, "quality": self.quality, "crop": "fundus_box", "pad": "black_square",
                "resample": "area_down_lanczos_up", "draft_margin": DRAFT_MARGIN, "version": 1}

    def split_record(self) -> dict:
        if self.split_column:
            return {"method": "column", "seed": self.seed, "column": self.split_column}
        if self.val_dirs:
            return {"method": "dirs", "seed": self.seed, "val_dirs": sorted(Path(d).name for d in self.val_dirs)}
        return {"method": "random", "seed": self.seed, "val_fraction": self.val_fraction}


@dataclass(frozen=True)
class Sample:
    key: str
    path: str
    source_dir: str
    label: int


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    samples: tuple[Sample, ...]
    plan_sha256: str
    """Hash of the options, labels and input files (size, mtime): a sidecar matching it is reusable."""


@dataclass
class BuildReport:
    manifest: dict
    written: int = 0
    reused: int = 0
    seconds: float = 0.0
    oversized: list[str] = field(default_factory=list)


def read_manifest(path_or_dir) -> dict:
    """The manifest of a shard folder (or the manifest file itself), format-checked."""
    path = Path(path_or_dir)
    path = path / "manifest.json" if path.is_dir() else path
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def split_totals(manifest: dict, split: str) -> tuple[int, int]:
    """(samples, positives) of a split, as the training pipeline sizes its epochs."""
    if split not in manifest["totals"]:
        raise ValueError(f"unknown split {split!r}; the manifest has {sorted(manifest['totals'])}")
    totals = manifest["totals"][split]
    return totals["samples"], totals["positives"]


def build(image_dirs: Iterable, labels_csv, out_dir, options: BuildOptions = BuildOptions(),
          on_shard_done: Callable[[dict], None] | None = None) -> BuildReport:
    """Preprocess and shard every labelled image; reuse shards completed by an earlier run.

    `on_shard_done(sidecar)` runs in this process after each shard is complete (tests use
    it to kill a build midway).
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    if not Path(labels_csv).is_file():
        raise ShardInputError(f"--labels {labels_csv}: no such file")
    csv_sha256 = _sha256_file(labels_csv)
    _check_out_dir(out_dir, csv_sha256, options)
    labels = read_labels(labels_csv, options.split_column)
    samples, skipped = match_samples(labels, find_images(image_dirs), options.skip_missing)
    splits = assign_splits(samples, labels, options)
    fingerprint = {"labels_csv_sha256": csv_sha256, "preprocessing": options.preprocessing()}
    per_shard = _samples_per_shard(samples, options)
    plans = plan_shards(splits, per_shard, options.seed, fingerprint)
    _prepare_out_dir(out_dir, plans)
    report = BuildReport(manifest={})
    sidecars = _run_jobs(plans, out_dir, options, len(samples), report, on_shard_done)
    sharding = {"shard_size": options.shard_size, "max_shard_bytes": options.max_shard_bytes,
                "samples_per_shard": per_shard}
    report.manifest = _manifest(fingerprint, options.split_record(), sharding, sidecars, skipped)
    _write_json_atomic(out_dir / "manifest.json", report.manifest)
    (out_dir / PARTS / UNFINISHED_MARKER).unlink()
    limit = options.max_shard_bytes
    report.oversized = [s["name"] for s in sidecars if limit and s["bytes"] > limit]
    report.seconds = time.monotonic() - started
    return report


def read_labels(labels_csv, split_column: str | None = None) -> dict[str, tuple[int, str | None]]:
    """challenge_id -> (label, split or None), rejecting the whole file on any bad row.

    Every problem is named with its lines and what the row should hold instead, so one run of the
    command lists everything to fix.
    """
    reader = _labels_reader(labels_csv, split_column)
    labels: dict[str, tuple[int, str | None]] = {}
    problems: dict[str, list[tuple[str, str]]] = {}
    for row in reader:
        key = (row["challenge_id"] or "").strip()
        label = CLASSES.get((row["class"] or "").strip().upper())
        split = SPLIT_VALUES.get((row[split_column] or "").strip().lower()) if split_column else None
        checks = {"invalid id": not key or any(c in key for c in "./\\ "), "duplicate id": key in labels,
                  "unknown class": label is None, f"{split_column} not train/val": split_column and not split}
        for problem in (name for name, failed in checks.items() if failed):
            problems.setdefault(problem, []).append((f"line {reader.line_num} {list(row.values())[:3]}", key))
        labels.setdefault(key, (label, split))
    if problems:
        named = (_label_problem(name, rows) for name, rows in problems.items())
        raise ShardInputError(f"{labels_csv}: " + "; ".join(named))
    if not labels:
        raise ShardInputError(f"{labels_csv}: no rows under the header")
    return labels


def _labels_reader(labels_csv, split_column: str | None) -> csv.DictReader:
    try:
        text = Path(labels_csv).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ShardInputError(f"{labels_csv}: not a UTF-8 text file ({error})") from error
    except OSError as error:
        raise ShardInputError(f"{labels_csv}: cannot read ({error.strerror})") from error
    if not text.strip():
        raise ShardInputError(f"{labels_csv}: empty file")
    reader = csv.DictReader(io.StringIO(text))
    wanted = ["challenge_id", "class"] + ([split_column] if split_column else [])
    if not set(wanted) <= set(reader.fieldnames or []):
        raise ShardInputError(f"{labels_csv}: wrong header {reader.fieldnames}; expected columns {wanted}")
    return reader


def _label_problem(name: str, rows: list[tuple[str, str]]) -> str:
    """The offending rows of one problem, then what a right row holds."""
    text = offenders(name, [where for where, _ in rows])
    if name == "unknown class":
        return f"{text}: the class must be RG or NRG (or 1 or 0)"
    if name == "duplicate id":
        return f"{text}: each image takes one row"
    if name == "invalid id":
        with_suffix = [key for _, key in rows if Path(key).suffix.lower() in IMAGE_SUFFIXES]
        if with_suffix:
            return (f"{text}: drop the extension, an id is the file name without it "
                    f"({Path(with_suffix[0]).stem}, not {with_suffix[0]})")
        return f"{text}: an id is the image file name without folder, extension or spaces (e.g. TRAIN000000)"
    return f"{text}: use train, val or validation"


def find_images(image_dirs: Iterable) -> dict[str, Path]:
    """Image stem -> path, searching each folder recursively; a stem found twice is an error."""
    images: dict[str, Path] = {}
    duplicates = []
    for root in map(Path, image_dirs):
        if not root.is_dir():
            raise ShardInputError(f"--images {root}: not a folder")
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            if path.stem in images:
                duplicates.append(f"{images[path.stem]} and {path}")
            images.setdefault(path.stem, path)
    if duplicates:
        raise ShardInputError(offenders("image ids found twice", duplicates)
                              + "; an id is the file name without extension, so keep one image per id")
    return images


def match_samples(labels: dict, images: dict[str, Path], skip_missing: bool) -> tuple[list[Sample], dict]:
    """Pair labels with image files; unmatched ones are errors unless skip_missing."""
    missing = sorted(set(labels) - set(images))
    unlabelled = sorted(set(images) - set(labels))
    if (missing or unlabelled) and not skip_missing:
        parts = [offenders("labelled ids without an image", missing) if missing else "",
                 offenders("images not in the labels CSV", [str(images[k]) for k in unlabelled])
                 if unlabelled else ""]
        raise ShardInputError("; ".join(p for p in parts if p) + " (--skip-missing ignores them)")
    folders: dict[str, set[Path]] = {}
    samples = []
    for key in sorted(set(labels) & set(images)):
        parent = images[key].parent
        folders.setdefault(parent.name, set()).add(parent.resolve())
        samples.append(Sample(key, str(images[key]), parent.name, labels[key][0]))
    clashes = [f"{name}: {sorted(map(str, paths))}" for name, paths in folders.items() if len(paths) > 1]
    if clashes:
        raise ShardInputError(offenders("source folder names used by several folders", clashes))
    if not samples:
        raise ShardInputError("no labelled image found")
    return samples, {"missing_images": len(missing), "unlabelled_images": len(unlabelled)}


def assign_splits(samples: list[Sample], labels: dict, options: BuildOptions) -> dict[str, list[Sample]]:
    """Train/val by CSV column, by held-out source folders, or stratified random by class."""
    if options.split_column:
        is_val = {s.key: labels[s.key][1] == "val" for s in samples}
    elif options.val_dirs:
        is_val = _val_by_dirs(samples, options.val_dirs)
    else:
        is_val = _val_stratified(samples, options.val_fraction, options.seed)
    splits = {"train": [s for s in samples if not is_val[s.key]], "val": [s for s in samples if is_val[s.key]]}
    if not splits["train"]:
        raise ShardInputError("the split leaves no training sample")
    return splits


def plan_shards(splits: dict[str, list[Sample]], per_shard: int, seed: int, fingerprint: dict) -> list[ShardPlan]:
    """Shuffle each split once with the seed, then cut it into consecutive shards."""
    plans = []
    for split_index, (split, samples) in enumerate(sorted(splits.items())):
        order = np.random.default_rng([seed, split_index]).permutation(len(samples))
        ordered = [samples[i] for i in order]
        for shard_index, start in enumerate(range(0, len(ordered), per_shard)):
            name = f"{split}-{shard_index:06d}.tar"
            chunk = tuple(ordered[start: start + per_shard])
            plans.append(ShardPlan(name, split, chunk, _plan_sha256(name, chunk, fingerprint)))
    return plans


def encode_sample(sample: Sample, size: int, quality: int) -> dict:
    """The sample's tar members; raises BadImageError for an unreadable image."""
    image, info = load_fundus(sample.path, size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    meta = {"id": sample.key, "source_dir": sample.source_dir, **info}
    return {"__key__": sample.key, "jpg": buffer.getvalue(), "cls": str(sample.label).encode(),
            "json": json.dumps(meta, sort_keys=True).encode()}


def write_shard(plan: ShardPlan, out_dir: Path, options: BuildOptions) -> dict:
    """Write one shard under a temporary name, publish it atomically, then its sidecar.

    Returns the sidecar; an existing shard whose sidecar and sha256 match is kept as is.
    """
    sidecar_path = out_dir / PARTS / f"{plan.name}.json"
    reusable = _reusable_sidecar(sidecar_path, out_dir / plan.name, plan.plan_sha256)
    if reusable:
        return {**reusable, "reused": True}
    temporary = out_dir / PARTS / f"{plan.name}.tmp"
    members, rejected, degenerate = {}, [], []
    with open(temporary, "wb") as stream:
        with wds.TarWriter(stream, mtime=0, user="", group="") as writer:
            for sample in plan.samples:
                try:
                    encoded = encode_sample(sample, options.size, options.quality)
                except BadImageError as error:
                    rejected.append({"id": sample.key, "path": sample.path, "reason": str(error)})
                    continue
                writer.write(encoded)
                members[sample.key] = sample
                degenerate += _degenerate(sample, json.loads(encoded["json"])["original_size"])
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, out_dir / plan.name)
    sidecar = {**_sidecar(plan, out_dir / plan.name, members, rejected), "degenerate": degenerate}
    _write_json_atomic(sidecar_path, sidecar)
    return {**sidecar, "reused": False}


def _degenerate(sample: Sample, original_size: list[int]) -> list[dict]:
    """[record] when the image is far from a fundus photograph's shape (MAX_ASPECT_RATIO), else []."""
    ratio = max(original_size) / max(1, min(original_size))
    if ratio <= MAX_ASPECT_RATIO:
        return []
    return [{"id": sample.key, "path": sample.path, "original_size": original_size, "aspect_ratio": round(ratio, 2)}]


def verify(out_dir) -> tuple[list[str], list[str]]:
    """Re-hash and decode every shard against the manifest: (report lines, problems).

    Raises ShardInputError for a folder that holds no build, UnfinishedBuildError for one whose build stopped.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ShardInputError(f"{out_dir}: not a folder")
    unfinished = unfinished_build(out_dir)
    if unfinished:
        raise UnfinishedBuildError(f"{out_dir}: {unfinished}")
    if not (out_dir / "manifest.json").is_file():
        raise ShardInputError(f"{out_dir}: no manifest.json: not a shard folder built by shards/build.py, "
                              "the only kind verify can check")
    manifest = read_manifest(out_dir)
    size = manifest["preprocessing"]["size"]
    lines, problems = [], []
    for shard in manifest["shards"]:
        shard_problems = _verify_shard(out_dir / shard["name"], shard, manifest["samples"], size)
        problems += [f"{shard['name']}: {p}" for p in shard_problems]
        lines.append(f"{'FAIL' if shard_problems else 'ok  '} {shard['name']} {shard['samples']} samples")
    listed = {s["name"] for s in manifest["shards"]}
    strays = sorted(p.name for p in out_dir.glob("*.tar") if p.name not in listed)
    problems += [f"{name}: not in the manifest" for name in strays]
    in_shards = sum(s["samples"] for s in manifest["shards"])
    if in_shards != len(manifest["samples"]):
        problems.append(f"manifest lists {len(manifest['samples'])} samples, its shards {in_shards}")
    return lines, problems


def unfinished_build(out_dir) -> str | None:
    """Why `out_dir` holds an unfinished shards/build.py build (for verify and the training preflight), or None.

    Only the builder's own traces count (.parts/), so shards written by other WebDataset tools pass.
    """
    out_dir = Path(out_dir)
    has_manifest = (out_dir / "manifest.json").exists()
    if not has_manifest and (out_dir / PARTS).is_dir():
        return f"no manifest: {_NOT_FINISHED}"
    if has_manifest and (out_dir / PARTS / UNFINISHED_MARKER).exists():
        return f"manifest.json is an earlier build's: {_NOT_FINISHED}"
    return None


def _verify_shard(path: Path, shard: dict, records: dict, size: int) -> list[str]:
    if not path.is_file():
        return ["missing"]
    problems = []
    if path.stat().st_size != shard["bytes"] or _sha256_file(path) != shard["sha256"]:
        problems.append("sha256 or size differs from the manifest")
    try:
        keys, positives, content_problems = _read_shard(path, size)
    except (tarfile.TarError, OSError) as error:
        return problems + [f"unreadable tar: {error}"]
    problems += content_problems
    if (len(keys), positives) != (shard["samples"], shard["positives"]):
        problems.append(f"holds {len(keys)} samples / {positives} positives, "
                        f"manifest says {shard['samples']} / {shard['positives']}")
    misplaced = [k for k in keys if records.get(k, {}).get("shard") != shard["name"]]
    if misplaced:
        problems.append(offenders("samples the manifest places elsewhere", misplaced))
    return problems


def _read_shard(path: Path, size: int) -> tuple[list[str], int, list[str]]:
    """Keys, positives and problems of one tar, decoding every image."""
    grouped: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in (m for m in tar if m.isfile()):
            key, _, extension = member.name.partition(".")
            grouped.setdefault(key, {})[extension] = tar.extractfile(member).read()
    problems, positives = [], 0
    for key, members in grouped.items():
        problem = _sample_problem(key, members, size)
        if problem:
            problems.append(f"{key}: {problem}")
        positives += members.get("cls") == b"1"
    return list(grouped), positives, problems


def _sample_problem(key: str, members: dict[str, bytes], size: int) -> str | None:
    if set(members) != {"jpg", "cls", "json"}:
        return f"members {sorted(members)}"
    if members["cls"] not in (b"0", b"1"):
        return f"class {members['cls']!r}"
    try:
        if json.loads(members["json"])["id"] != key:
            return "json id differs from the key"
        with Image.open(io.BytesIO(members["jpg"])) as image:
            image.load()
            return None if image.size == (size, size) else f"image size {image.size}"
    except (OSError, ValueError, KeyError) as error:
        return f"undecodable: {error}"


def _run_jobs(plans, out_dir, options, total_samples, report, on_shard_done) -> list[dict]:
    """Write shards in worker processes, stopping early once too many images are rejected."""
    allowed = options.max_rejected_fraction * total_samples
    sidecars, rejected = {}, []
    jobs = [(plan, out_dir, options) for plan in plans]
    pool = multiprocessing.Pool(options.workers) if options.workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap_unordered(_write_job, jobs) if pool else map(_write_job, jobs)
        with tqdm(total=total_samples, unit="img", desc=f"shards -> {out_dir}", disable=None) as progress:
            for sidecar in results:
                report.reused += sidecar.pop("reused")
                sidecars[sidecar["name"]] = sidecar
                rejected += sidecar["rejected"]
                progress.update(sidecar["samples"] + len(sidecar["rejected"]))
                if len(rejected) > allowed:
                    raise TooManyRejectedError(_too_many(rejected, total_samples, options))
                if on_shard_done:
                    on_shard_done(sidecar)
    finally:
        if pool:
            pool.terminate()
            pool.join()
    report.written = len(plans) - report.reused
    return [sidecars[plan.name] for plan in plans]


def _write_job(job) -> dict:
    return write_shard(*job)


def _manifest(fingerprint: dict, split: dict, sharding: dict, sidecars: list[dict], skipped: dict) -> dict:
    totals = {split: {"samples": 0, "positives": 0} for split in ("train", "val")}
    samples, rejected, degenerate = {}, [], []
    for sidecar in sidecars:
        totals[sidecar["split"]]["samples"] += sidecar["samples"]
        totals[sidecar["split"]]["positives"] += sidecar["positives"]
        samples.update({key: {"split": sidecar["split"], "source_dir": source_dir, "shard": sidecar["name"]}
                        for key, source_dir in sidecar["members"].items()})
        rejected += sidecar["rejected"]
        degenerate += sidecar.get("degenerate", [])
    shard_fields = ("name", "split", "samples", "positives", "bytes", "sha256", "keys_sha256")
    return {
        "format": FORMAT,
        **fingerprint,
        "split": split,
        "sharding": sharding,
        "shards": [{k: sidecar[k] for k in shard_fields} for sidecar in sidecars],
        "totals": totals,
        "samples": dict(sorted(samples.items())),
        "rejected": sorted(rejected, key=lambda r: r["id"]),
        "degenerate": sorted(degenerate, key=lambda r: r["id"]),
        "skipped": skipped,
    }


def _sidecar(plan: ShardPlan, path: Path, members: dict[str, Sample], rejected: list[dict]) -> dict:
    return {
        "name": plan.name, "split": plan.split, "plan_sha256": plan.plan_sha256,
        "samples": len(members), "positives": sum(s.label for s in members.values()),
        "bytes": path.stat().st_size, "sha256": _sha256_file(path),
        "keys_sha256": hashlib.sha256("\n".join(members).encode()).hexdigest(),
        "members": {key: sample.source_dir for key, sample in members.items()}, "rejected": rejected,
    }


def _reusable_sidecar(sidecar_path: Path, shard_path: Path, plan_sha256: str) -> dict | None:
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        return None
    if sidecar.get("plan_sha256") != plan_sha256 or not shard_path.is_file():
        return None
    if shard_path.stat().st_size != sidecar["bytes"] or _sha256_file(shard_path) != sidecar["sha256"]:
        return None
    return sidecar


def _plan_sha256(name: str, samples: tuple[Sample, ...], fingerprint: dict) -> str:
    """Covers the input files' size and mtime, so a replaced image invalidates its shard."""
    def identity(sample: Sample):
        stat = os.stat(sample.path)
        return [*asdict(sample).values(), stat.st_size, stat.st_mtime_ns]
    record = {"name": name, "fingerprint": fingerprint, "samples": [identity(s) for s in samples]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _samples_per_shard(samples: list[Sample], options: BuildOptions) -> int:
    """shard_size, lowered so a shard stays under max_shard_bytes by a probe's estimate."""
    if not options.max_shard_bytes:
        return options.shard_size
    probe = samples[:: max(1, len(samples) // 8)][:8]
    largest = 0
    for sample in probe:
        try:
            members = encode_sample(sample, options.size, options.quality)
        except BadImageError:
            continue
        blocks = [math.ceil(len(v) / TAR_BLOCK) + 1 for k, v in members.items() if k != "__key__"]
        largest = max(largest, TAR_BLOCK * sum(blocks))
    if not largest:
        return options.shard_size
    fitting = (options.max_shard_bytes - TAR_RECORD) / (1.25 * largest)
    return max(1, min(options.shard_size, int(fitting)))


def _val_stratified(samples: list[Sample], val_fraction: float, seed: int) -> dict[str, bool]:
    """Per class, a seeded round(val_fraction * class size) of the keys go to val."""
    is_val = {}
    for label in LABELS:
        keys = sorted(s.key for s in samples if s.label == label)
        order = np.random.default_rng([seed, label]).permutation(len(keys))
        val_count = round(val_fraction * len(keys))
        is_val.update({keys[i]: rank < val_count for rank, i in enumerate(order)})
    return is_val


def _val_by_dirs(samples: list[Sample], val_dirs: tuple[str, ...]) -> dict[str, bool]:
    held_out = {Path(d).resolve() for d in val_dirs}
    parents = {s.key: Path(s.path).parent.resolve() for s in samples}
    empty = sorted(str(d) for d in held_out if d not in set(parents.values()))
    if empty:
        raise ShardInputError(offenders("--val-dirs holding no labelled image", empty))
    return {key: parent in held_out for key, parent in parents.items()}


def _check_out_dir(out_dir: Path, csv_sha256: str, options: BuildOptions) -> None:
    """Refuse to mix shards from another labels CSV or another preprocessing into OUT."""
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists():
        return
    try:
        manifest = read_manifest(manifest_path)
    except ValueError as error:
        raise ShardInputError(f"{manifest_path}: not a shard manifest ({error})") from error
    if manifest["labels_csv_sha256"] != csv_sha256:
        raise ShardInputError(f"{out_dir} holds shards of another labels CSV "
                              f"(sha256 {manifest['labels_csv_sha256'][:12]}); choose another --out")
    if manifest["preprocessing"] != options.preprocessing():
        raise ShardInputError(f"{out_dir} holds shards preprocessed with {manifest['preprocessing']}; "
                              "choose another --out")


def _prepare_out_dir(out_dir: Path, plans: list[ShardPlan]) -> None:
    """Create OUT, drop temporaries of a killed run and shards the current plan no longer has."""
    (out_dir / PARTS).mkdir(parents=True, exist_ok=True)
    (out_dir / PARTS / UNFINISHED_MARKER).write_text("shards/build.py is writing this folder\n")
    for temporary in [*(out_dir / PARTS).glob("*.tmp"), *out_dir.glob("manifest.json.tmp")]:
        temporary.unlink()
    planned = {plan.name for plan in plans}
    for split in ("train", "val"):
        for path in out_dir.glob(f"{split}-*.tar"):
            if path.name not in planned:
                path.unlink()
                (out_dir / PARTS / f"{path.name}.json").unlink(missing_ok=True)


def _too_many(rejected: list[dict], total: int, options: BuildOptions) -> str:
    first = rejected[0]
    return (f"at least {len(rejected)} of {total} images unreadable, more than --max-rejected-fraction "
            f"{options.max_rejected_fraction} allows; first: {first['path']} ({first['reason']})")


def offenders(what: str, items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")
    return f"{len(items)} {what} ({shown})"


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Build, resume and verify the WebDataset shards the training pipeline reads.

Layout of OUT (the contract with dist_train's data pipeline):
  train-000000.tar, val-000000.tar, ...  members <key>.jpg, <key>.cls ("0"/"1"), <key>.json
  manifest.json                          counts, hashes, split and per-sample records
  .parts/<shard>.json                    sidecar written when a shard completes (resume)
Shard contents depend only on the inputs and options, so a build killed midway and
re-run reproduces the uninterrupted result byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from dist_train.data.manifest import FORMAT, read_manifest
from dist_train.data.preprocess import Clahe
from dist_train.data.transforms import DRAFT_MARGIN, BadImageError, load_fundus, shard_jpeg
from dist_train.errors import DistTrainError
from dist_train.shards.inputs import LABELS, ShardInputError, find_images, offenders, read_labels

MAX_ASPECT_RATIO = 2.0
"""Fundus photographs are 1:1 to 3:2; a longer side beyond twice the shorter is a strip, a screenshot or a
stitched pair, stored (it may be right) but warned about and listed in the manifest's `degenerate`."""
UNFINISHED_MARKER = "unfinished"
"""Written in .parts/ when a build starts writing and removed with the manifest's publication, so a killed
rebuild that left an older manifest behind is still known as unfinished."""
PARTS = ".parts"
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
_NOT_FINISHED = "the build did not finish; rerun the same build command to resume"
PRESET_SHARD_SIZES = {384: 5000, 512: 3000, 768: 1500}
"""--preset SIZE: samples per shard at the resolutions users train at, about 0.75 Gpx per shard. At JPEG quality 95
the synthetic fundus set stores 29/49/104 KB per image at 384/512/768 px (46/79/167 KB with --clahe) and real
photographs, with more texture, up to about twice that: 150-300 MB per shard raw, 230-470 MB CLAHE'd. Large
enough that a shard is read in long sequential runs and a set has tens of shards, not thousands; small enough
that a killed build redoes at most a minute or two of work per worker and the slots deal evenly."""


class TooManyRejectedError(DistTrainError, RuntimeError):
    """More unreadable images than --max-rejected-fraction allows: the CLI exits 1."""


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
    clahe: Clahe | None = None
    """CLAHE applied once after the resize (the Decoder's order), so training need not apply it every epoch."""

    def preprocessing(self) -> dict:
        """What the pixels went through; `clahe` only when applied, so raw builds keep their earlier record."""
        record = {"size": self.size, "quality": self.quality, "crop": "fundus_box", "pad": "black_square",
                  "resample": "area_down_lanczos_up", "draft_margin": DRAFT_MARGIN, "version": 1}
        return {**record, "clahe": self.clahe.record()} if self.clahe else record

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


def build(image_dirs: Iterable, labels_csv, out_dir, options: BuildOptions = BuildOptions(),
          on_shard_done: Callable[[dict], None] | None = None) -> BuildReport:
    """Preprocess and shard every labelled image; reuse shards completed by an earlier run.

    `on_shard_done(sidecar)` runs in this process after each shard is complete (tests use
    it to kill a build midway).
    """
    started = time.monotonic()
    out_dir, image_dirs = Path(out_dir), [Path(folder) for folder in image_dirs]
    if not Path(labels_csv).is_file():
        raise ShardInputError(f"--labels {labels_csv}: no such file")
    _check_out_outside_images(out_dir, image_dirs)
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


def encode_sample(sample: Sample, size: int, quality: int, clahe: Clahe | None = None) -> dict:
    """The sample's tar members; raises BadImageError for an unreadable image."""
    image, info = load_fundus(sample.path, size)
    meta = {"id": sample.key, "source_dir": sample.source_dir, **info}
    return {"__key__": sample.key, "jpg": shard_jpeg(image, quality, clahe), "cls": str(sample.label).encode(),
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
                    encoded = encode_sample(sample, options.size, options.quality, options.clahe)
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
            members = encode_sample(sample, options.size, options.quality, options.clahe)
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


def _check_out_outside_images(out_dir: Path, image_dirs: list[Path]) -> None:
    """Refuse an OUT that is, or lies inside, an --images folder: the build would write its shards,
    manifest and parts/ among the user's photographs, and clear `train-*.tar`/`val-*.tar` files there."""
    out = out_dir.resolve()
    for folder in image_dirs:
        if out == folder.resolve() or folder.resolve() in out.parents:
            raise ShardInputError(f"--out {out_dir} is inside --images {folder}: the shards would be written "
                                  f"among the images; choose an --out outside the image folders")


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
    _check_same_layout(out_dir, manifest, options)


def _check_same_layout(out_dir: Path, manifest: dict, options: BuildOptions) -> None:
    """Refuse another split or shard size over a finished build: rebuilt, a run's validation images could
    move into its training shards, and shards that runs name would be renumbered or deleted."""
    sharding = manifest.get("sharding", {})
    before = {**manifest.get("split", {}), **{key: sharding[key] for key in LAYOUT_KEYS if key in sharding}}
    now = {**options.split_record(), **{key: getattr(options, key) for key in LAYOUT_KEYS}}
    changed = [f"{_flag(key)} {value} (now {now.get(key)})" for key, value in before.items() if value != now.get(key)]
    if changed:
        raise ShardInputError(f"{out_dir} holds a build with {', '.join(changed)}; rebuilding it would move "
                              f"samples between train and val or renumber the shards runs name: choose another "
                              f"--out, or delete {out_dir} first")


LAYOUT_KEYS = ("shard_size", "max_shard_bytes")


def _flag(key: str) -> str:
    return {"column": "--split-column", "method": "split method"}.get(key, "--" + key.replace("_", "-"))


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

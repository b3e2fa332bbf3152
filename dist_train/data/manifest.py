"""The shard set's manifest (written by shards/build.py) and the counts the streams size their epochs by.

`read_manifest` is the one reader of manifest.json: the builder's verify, the training preflight's
preprocessing, sha256 verification and the per-shard sample counts all go through it. Without a
manifest (shards from another WebDataset tool), the counts come from one scan of the shards, cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_train.data.stream import iterate_shard, sample_label
from dist_train.errors import DataError

FORMAT = "dist_train-shards/1"
"""The manifest's format tag; a manifest with another is refused rather than misread."""


@dataclass(frozen=True)
class SplitCounts:
    samples: int
    positives: int
    per_shard: tuple[int, ...] | None = None
    """Samples of each url, in order: what the streams deal by (None from a count cached before it was kept)."""


def find_manifest(setting: str, urls: list[str]) -> Path | None:
    if setting == "none":
        return None
    if setting != "auto":
        path = Path(setting)
        if not path.is_file():
            raise DataError(f"data.manifest: {path} does not exist")
        return path
    candidate = Path(urls[0]).parent / "manifest.json"
    return candidate if candidate.is_file() else None


def read_manifest(path_or_dir: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder (or the manifest file itself): the one reader of it. Another format
    tag is refused rather than misread; a manifest without one (a hand-written one) is taken as ours."""
    path = Path(path_or_dir)
    path = path / "manifest.json" if path.is_dir() else path
    manifest = json.loads(path.read_text())
    if manifest.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def _shard_entries(manifest: Path) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in read_manifest(manifest)["shards"]}


def shard_preprocessing(urls: list[str], manifest_setting: str) -> dict[str, Any]:
    """The shard builder's preprocessing (size, JPEG quality, ...) from the manifest, if there is one."""
    manifest = find_manifest(manifest_setting, urls)
    return read_manifest(manifest).get("preprocessing", {}) if manifest else {}


def verify_against_manifest(urls: list[str], manifest_setting: str, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Shards whose sha256 differs from the manifest's record (or that it does not list).

    `share` = (rank, world size): this rank hashes every world-size-th shard, so a large shard set is
    verified by all ranks together in a fraction of the time one would take."""
    manifest = find_manifest(manifest_setting, urls)
    if manifest is None:
        return [f"no manifest found for {urls[0]}: data.verify_shards needs one"] if share[0] == 0 else []
    entries = _shard_entries(manifest)
    problems = []
    for url in urls[share[0]::share[1]]:
        entry = entries.get(Path(url).name)
        if entry is None:
            problems.append(f"{url} is not listed in {manifest}")
            continue
        digest = hashlib.sha256()
        with open(url, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != entry["sha256"]:
            problems.append(f"{url} does not match its sha256 in {manifest}")
    return problems


def manifest_counts(urls: list[str], manifest_setting: str) -> SplitCounts | None:
    """Sample and positive counts of `urls` from the manifest's shard entries; None without a manifest
    listing every one of them."""
    manifest = find_manifest(manifest_setting, urls)
    if manifest is None:
        return None
    entries = _shard_entries(manifest)
    names = [Path(url).name for url in urls]
    if not all(name in entries for name in names):
        return None
    per_shard = tuple(entries[name]["samples"] for name in names)
    return SplitCounts(sum(per_shard), sum(entries[name]["positives"] for name in names), per_shard)


def split_counts(urls: list[str], manifest_setting: str, cache_dir: Path | None = None) -> SplitCounts:
    """Sample and positive counts from the manifest's shard entries, or by one scan (cached)."""
    return manifest_counts(urls, manifest_setting) or _scan_counts(urls, cache_dir)


def _scan_counts(urls: list[str], cache_dir: Path | None) -> SplitCounts:
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"counts-{hashlib.sha256(repr(urls).encode()).hexdigest()[:16]}.json"
        if cache.is_file():
            return _counts_from_json(json.loads(cache.read_text()))
    per_shard, positives = [], 0
    for url in urls:
        labels = [sample_label(sample) for sample in iterate_shard(url)]
        per_shard.append(len(labels))
        positives += sum(labels)
    counts = SplitCounts(sum(per_shard), positives, tuple(per_shard))
    if cache is not None:  # every rank may count at once: write aside, then rename
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(dataclasses.asdict(counts)))
        os.replace(staging, cache)
    return counts


def _counts_from_json(raw: dict[str, Any]) -> SplitCounts:
    per_shard = raw.get("per_shard")
    return SplitCounts(raw["samples"], raw["positives"], tuple(per_shard) if per_shard is not None else None)

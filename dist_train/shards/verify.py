"""`shards/build.py verify`: re-hash and decode every shard of a finished build against its manifest."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import IO, cast

from PIL import Image

from dist_train.data.manifest import read_manifest
from dist_train.errors import UserError
from dist_train.shards.build import _NOT_FINISHED, PARTS, UNFINISHED_MARKER, _sha256_file
from dist_train.shards.inputs import ShardInputError, offenders


class UnfinishedBuildError(UserError, RuntimeError):
    """A shard folder whose build stopped before its manifest was written: verify exits 1."""


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
            # extractfile gives None only for members that are not regular files
            grouped.setdefault(key, {})[extension] = cast(IO[bytes], tar.extractfile(member)).read()
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



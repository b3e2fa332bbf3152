"""The labels CSV and the image folders, read one way for every command (build.py, evaluate.py, predict.py).

The CSV is AIROGS's `challenge_id,class`: the id is the file name without extension, the class RG/NRG
(or 1/0, any letter case); a mistake is named with what is accepted instead.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import cast

from dist_train.errors import UserError

CLASSES = {"NRG": 0, "RG": 1, "0": 0, "1": 1}
"""Accepted values of the class column (case-insensitive): AIROGS writes RG/NRG, other tools 1/0."""
LABELS = (0, 1)
SPLIT_VALUES = {"train": "train", "val": "val", "validation": "val"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SHOWN = 5
"""Offending rows named in an error message; the count covers the rest."""




class ShardInputError(UserError, ValueError):
    """Bad labels, images or OUT folder: the CLI exits 2."""


def read_labels(labels_csv, split_column: str | None = None) -> dict[str, tuple[int, str | None]]:
    """challenge_id -> (label, split or None), rejecting the whole file on any bad row.

    Every problem is named with its lines and what the row should hold instead, so one run of the
    command lists everything to fix.
    """
    reader = _labels_reader(labels_csv, split_column)
    labels: dict[str, tuple[int | None, str | None]] = {}
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
    return cast(dict[str, tuple[int, str | None]], labels)  # a None label raised above as "unknown class"


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


def offenders(what: str, items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")
    return f"{len(items)} {what} ({shown})"



"""Several exported models scored as one: per image, the mean of the members' probabilities.

Members may differ in backbone, image size, normalisation, CLAHE and TTA (different folds, seeds or
recipes): each one scores the images through its own export's preprocessing and TTA (a `Predictor`),
and only the resulting probabilities meet. They are averaged as probabilities, not logits, because
that is the scale every member is trained and thresholded on and the one its TTA already averages
over views (`scoring.score_stream`); a mean of logits lets one over-confident member (a logit of 12
against 2) outvote the others, and fold or seed models of one recipe calibrate alike in probability,
not in logit.

The threshold must belong to the ensemble: the mean of two members is not calibrated like either,
so copying one member's 95%-specificity cut-off would miss that specificity. `choose_threshold` is
the rule each export's threshold follows (β's operating point, `metrics.beta_threshold`), applied to
the ensemble's likelihoods on a labelled set; `launch/evaluate.py` with several `--model` writes it
into `ensemble.json` with the members' paths (relative to it, so a folder holding both can move) and
sha256 digests, and `--model ensemble.json` then gives predict.py (and evaluate.py on a test set) the
members and that threshold. A member re-exported since then has another digest and is refused: the
threshold was chosen for other weights.

Exactly once: an image any member could not score is one `bad` entry (the first reason), never a
likelihood averaged over fewer members; all others get the mean of every member.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_train.errors import CoverageError
from dist_train.evaluation import metrics
from dist_train.evaluation.inference import InputError, Predictor, export_file
from dist_train.evaluation.scoring import Scores, check_coverage

ENSEMBLE_FORMAT = "dist_train-ensemble/1"
ENSEMBLE_FILE = "ensemble.json"
COMBINE_RULE = "mean of the members' probabilities, each with its own preprocessing and TTA"
THRESHOLD_RULE = "beta operating point of the ensemble: specificity >= 0.95 on the labelled set evaluate.py scored"


@dataclass
class Ensemble:
    """The loaded members (in --model order), what to call them in outputs, and the threshold to apply.

    One member is the plain single-model case: its likelihoods are its own and its export's threshold
    applies. `threshold_source` says where `threshold` came from, for the log and report.json.
    """

    members: list[Predictor]
    names: list[str]
    threshold: float | None = None
    threshold_source: str = ""
    digests: list[str] = field(default_factory=list)

    def score_images(self, images: dict[str, Path], batch_size: int = 32, progress: str = "none") -> Scores:
        """Every member over the same raw images, then combined (see `combine`)."""
        return self._each(lambda member, desc: member.score_images(images, batch_size, progress, desc))

    def score_shards(self, urls: list[str], total: int, batch_size: int = 64, workers: int = 0,
                     progress: str = "none") -> Scores:
        """Every member over the same shards, then combined (see `combine`); every member's input checked first."""
        self.check_shards(urls)
        return self._each(lambda member, desc: member.score_shards(urls, total, batch_size, workers, progress, desc))

    def check_shards(self, urls: list[str]) -> None:
        """ClaheError (exit 2) when the shards are equalised unlike some member's training input: the CLIs
        call it among their input checks, before any member scores."""
        for member in self.members:
            member.shards_decoder(urls)

    def describe(self) -> str:
        """The log line naming the members and the threshold, so an output says what produced it."""
        where = f" from {self.threshold_source}" if self.threshold_source else ""
        threshold = "none" if self.threshold is None else f"{self.threshold:.8g}{where}"
        if len(self.names) == 1:
            return f"model: {self.names[0]}; threshold {threshold}"
        return f"models ({len(self.names)}, {COMBINE_RULE}): {', '.join(self.names)}; threshold {threshold}"

    def _each(self, score: Callable[[Predictor, str], Scores]) -> Scores:
        count = len(self.members)
        parts = [score(member, "scoring" if count == 1 else f"scoring {i}/{count}")
                 for i, member in enumerate(self.members, 1)]
        return combine(parts, self.names)


def combine(parts: list[Scores], names: list[str]) -> Scores:
    """One Scores: each key once, scored by every member (their mean) or in `bad` once.

    The members scored the same source, so each must have seen the same keys; anything else is a bug
    that would break exactly-once, and stops the run (CoverageError) instead of writing a partial CSV.
    """
    _check_same_samples(parts)
    bad = _first_failures(parts, names)
    every = [dict(zip(part.keys, part.scores)) for part in parts]
    labels = dict(zip(parts[0].keys, parts[0].labels))
    keys = [key for key in parts[0].keys if key not in bad]
    scores = [math.fsum(scored[key] for scored in every) / len(every) for key in keys]
    return Scores(keys, [labels[key] for key in keys], scores, 0.0, list(bad.values()))


def _check_same_samples(parts: list[Scores]) -> None:
    """Each member saw each sample once (scored or bad), and all saw the same ones."""
    seen = []
    for part in parts:
        samples = part.keys + [key for _where, key, _reason in part.bad]
        check_coverage(samples, None)
        seen.append(set(samples))
        if seen[-1] != seen[0]:
            raise CoverageError(f"the members scored different samples, e.g. {sorted(seen[-1] ^ seen[0])[:5]}")


def _first_failures(parts: list[Scores], names: list[str]) -> dict[str, tuple[str, str, str]]:
    """key -> (where, key, reason) for every key some member could not score, from the first such member."""
    failures: dict[str, list[tuple[str, str, str]]] = {}
    for part, name in zip(parts, names):
        for where, key, reason in part.bad:
            failures.setdefault(key, []).append((name, where, reason))
    return {key: _one_failure(key, entries, len(parts)) for key, entries in failures.items()}


def _one_failure(key: str, entries: list[tuple[str, str, str]], members: int) -> tuple[str, str, str]:
    """The reason as the member gave it when all failed; prefixed with the member when only some did, as
    their preprocessing differs (one member's resize can fail where another's does not)."""
    name, where, reason = entries[0]
    return where, key, reason if len(entries) == members else f"{name}: {reason}"


def choose_threshold(labels: list[int], likelihoods: list[float]) -> float:
    """The ensemble's threshold by the export's rule: β's operating point (specificity >= 95%)."""
    return metrics.beta_threshold(labels, likelihoods)


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class Members:
    """The checked --model list: the export files, and the ensemble file's threshold when one was given.

    Checking (each export present with its sidecar, no model twice, an ensemble file alone and its
    members unchanged) is apart from loading, so a command refuses a typo in the third --model, or an
    ensemble without a threshold, before the first model loads.
    """

    files: list[Path]
    threshold: float | None = None
    threshold_source: str = ""
    digests: list[str] = field(default_factory=list)

    @property
    def needs_threshold(self) -> bool:
        """Several bare exports: no threshold is theirs until one is chosen for them on labelled data."""
        return len(self.files) > 1 and self.threshold is None


def check_models(paths: list[Path]) -> Members:
    """The --model list (exports, run directories, or one ensemble.json) resolved and checked, nothing loaded."""
    ensembles = [path for path in paths if path.suffix == ".json"]
    if ensembles:
        if len(paths) > 1:
            raise InputError(f"--model {ensembles[0]}: an ensemble file names its members itself; give it as the "
                             "only --model")
        return _read_ensemble(ensembles[0])
    files = [_export_with_sidecar(path) for path in paths]
    _refuse_repeats(paths, files)
    return Members(files)


def load_ensemble(checked: Members, device: str = "cpu") -> Ensemble:
    """Every member loaded; a single bare export keeps its own export's threshold."""
    members = [Predictor.load(path, device) for path in checked.files]
    threshold, source = checked.threshold, checked.threshold_source
    if len(members) == 1 and not source:
        threshold, source = members[0].meta.get("threshold"), "the export"
    return Ensemble(members, [str(path) for path in checked.files], threshold, source, checked.digests)


def _export_with_sidecar(path: Path) -> Path:
    try:
        found = export_file(path)
    except FileNotFoundError as error:
        raise InputError(str(error)) from None
    if found.suffix != ".safetensors":
        raise InputError(f"--model {path}: not an export (a .safetensors file, or a run directory holding "
                         f"export/model.safetensors); make one with launch/export.py RUN")
    if not found.with_suffix(".json").is_file():
        raise InputError(f"--model {path}: {found.with_suffix('.json')} (the export's metadata) is missing; "
                         "export again with launch/export.py")
    return found


def _refuse_repeats(given: list[Path], files: list[Path]) -> None:
    seen: dict[Path, Path] = {}
    for path, found in zip(given, files):
        real = found.resolve()
        if real in seen:
            raise InputError(f"--model {path}: the same export ({found}) as an earlier --model {seen[real]}; "
                             "give each model once")
        seen[real] = path


def _read_ensemble(path: Path) -> Members:
    """The members and threshold of an ensemble.json, every member checked to be the export it was."""
    raw = _ensemble_json(path)
    files = [_export_with_sidecar(_member_path(path, index, raw)) for index in range(len(raw["members"]))]
    _refuse_repeats(files, files)
    digests = [sha256(file) for file in files]
    for file, recorded, now in zip(files, raw["sha256"], digests):
        if recorded != now:
            raise InputError(f"--model {path}: member {file} changed since its threshold was chosen (sha256 "
                             "differs); run launch/evaluate.py with its members again")
    return Members(files, float(raw["threshold"]), str(path), digests)


def _member_path(ensemble: Path, index: int, raw: dict[str, Any]) -> Path:
    """Member `index`: relative to the ensemble file's folder (the folder moved with its exports), else where
    it was when the file was written (the file alone moved); a member at neither is refused by the caller."""
    relative = ensemble.parent / raw["members"][index]
    written = raw.get("members_when_written")
    if relative.exists() or not isinstance(written, list) or len(written) != len(raw["members"]):
        return relative
    return Path(str(written[index]))


def _ensemble_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"--model {path}: no such file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"--model {path}: not a readable ensemble file ({error})") from None
    if not isinstance(raw, dict) or raw.get("format") != ENSEMBLE_FORMAT:
        raise InputError(f"--model {path}: not an ensemble file ({ENSEMBLE_FORMAT}, written by launch/evaluate.py "
                         "with several --model); for one model give its .safetensors export")
    members, digests = raw.get("members"), raw.get("sha256")
    if (not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members)
            or not isinstance(digests, list) or len(digests) != len(members)
            or not isinstance(raw.get("threshold"), (int, float))):
        raise InputError(f"--model {path}: needs members, sha256 (one per member) and a numeric threshold; "
                         "write it again with launch/evaluate.py")
    return raw


def sha256(path: Path) -> str:
    """The export file's digest, streamed (exports of large backbones are hundreds of MB)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_ensemble(path: Path, ensemble: Ensemble, threshold: float, validation: dict[str, Any]) -> Path:
    """ensemble.json: members (paths relative to its folder, and where they were; digests), how they are
    combined, and their threshold."""
    written = [Path(name).resolve() for name in ensemble.names]
    record = {"format": ENSEMBLE_FORMAT,
              "members": [os.path.relpath(member, path.parent.resolve()) for member in written],
              "members_when_written": [str(member) for member in written],
              "sha256": ensemble.digests or [sha256(Path(name)) for name in ensemble.names],
              "combine": COMBINE_RULE, "threshold": threshold, "threshold_rule": THRESHOLD_RULE,
              "validation": validation}
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(record, indent=2, default=float))
    staging.replace(path)
    return path

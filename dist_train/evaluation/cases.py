"""Which validation images a run's report explains, read and scored the way evaluation reads them.

A grader looks at a few images, not thousands: the most confident true positives (is the model right
for the right reason?), and the worst false negatives and false positives at the β operating point
(what does it miss, what fools it?). The model is the run's best checkpoint (else its latest), exported
to a temporary folder, so the images go through the export's own decoder (resize, CLAHE,
normalisation) exactly as `Predictor` scores them; the cases come from the predictions of that same
checkpoint (`predictions_best.csv`, else `predictions_val.csv`). Nothing is written into the run.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dist_train.data.stream import iterate_shard, shard_urls
from dist_train.errors import DataError
from dist_train.evaluation import metrics
from dist_train.evaluation.explain import cam_maps, find_target, to_rgb
from dist_train.evaluation.inference import Predictor, export
from dist_train.train import checkpoint

CATEGORIES = ("true positive", "false negative", "false positive")


class NothingToExplain(RuntimeError):
    """The run lacks what the maps need (a checkpoint, predictions, its val shards): the report says which."""


@dataclass(frozen=True)
class Case:
    category: str
    key: str
    label: int
    likelihood: float


@dataclass
class Explained:
    """One explained image: the case, the picture the model saw (HxWx3 uint8) and its map (HxW in [0, 1])."""

    case: Case
    rgb: np.ndarray
    cam: np.ndarray


@dataclass
class RunExplanation:
    """What the report shows: the explained cases, the threshold they were split at, the layer mapped."""

    cases: list[Explained]
    threshold: float
    layer: str
    predictions: str
    missing: list[str]


def select_cases(keys: list[str], labels: np.ndarray, likelihoods: np.ndarray, threshold: float,
                 k: int) -> list[Case]:
    """Up to k of each: the most confident true positives, the lowest-scored positives, the highest-scored
    negatives, at 'positive when likelihood >= threshold' (the metrics' rule). Ties keep the keys' order."""
    labels, likelihoods = np.asarray(labels).astype(int), np.asarray(likelihoods, dtype=float)
    predicted = likelihoods >= threshold
    groups = {"true positive": (labels == 1) & predicted, "false negative": (labels == 1) & ~predicted,
              "false positive": (labels == 0) & predicted}
    highest_first = {"true positive": True, "false negative": False, "false positive": True}
    cases = []
    for category in CATEGORIES:
        members = np.flatnonzero(groups[category])
        order = np.argsort(-likelihoods[members] if highest_first[category] else likelihoods[members], kind="stable")
        cases += [Case(category, keys[index], int(labels[index]), float(likelihoods[index]))
                  for index in members[order][:k]]
    return cases


def read_scored(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, labels, likelihoods) of a prediction CSV's scored rows."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("likelihood") and row.get("label")]
    return ([row["id"] for row in rows], np.array([int(row["label"]) for row in rows]),
            np.array([float(row["likelihood"]) for row in rows]))


def read_samples(urls: list[str], keys: list[str]) -> dict[str, dict[str, Any]]:
    """The raw samples (bytes, as in the shards) of `keys`, reading the shards once and stopping when all are found."""
    wanted, found = set(keys), {}
    for url in urls:
        for sample in iterate_shard(url):
            if sample["__key__"] in wanted:
                found[sample["__key__"]] = sample
        if len(found) == len(wanted):
            break
    return found


def check_checkpoint(run_dir: Path) -> None:
    """First, as the cheapest check and the usual reason: a run stopped before its first checkpoint has none."""
    root = run_dir / "checkpoints"
    if not any(checkpoint.read_pointer(root / name) for name in ("best", "latest")):
        raise NothingToExplain(f"{run_dir.name} has no checkpoint (checkpoints/best or latest)")


def load_model(run_dir: Path) -> Predictor:
    """The run's best (else latest) checkpoint as an exported model on the CPU, exported into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="explain-") as folder:
        return Predictor.load(export(run_dir, Path(folder) / "model.safetensors"))


def predictions_of_model(run_dir: Path) -> Path:
    """predictions_best.csv when the model is the best checkpoint, else the last evaluation's predictions."""
    best = run_dir / "predictions_best.csv"
    if checkpoint.read_pointer(run_dir / "checkpoints" / "best") and best.is_file():
        return best
    if (run_dir / "predictions_val.csv").is_file():
        return run_dir / "predictions_val.csv"
    raise NothingToExplain(f"{run_dir.name} has no predictions_val.csv to choose cases from")


def val_urls(run_dir: Path) -> list[str]:
    """The val shards the run's config names, resolved from the working directory as training resolved them."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    pattern = str((config.get("data") or {}).get("val_shards", ""))
    try:
        urls = shard_urls(pattern)
    except DataError:
        raise NothingToExplain(f"val shards {pattern!r} of {run_dir.name} not found from {Path.cwd()}") from None
    missing = [url for url in urls if "://" not in url and not Path(url).is_file()]
    if missing:
        raise NothingToExplain(f"val shards of {run_dir.name} missing: {', '.join(missing[:3])}")
    return urls


def explain_run(run_dir: Path, k: int = 3, layer: str | None = None) -> RunExplanation:
    """Maps for up to k cases of each category; raises NothingToExplain when the run cannot give them."""
    run_dir = Path(run_dir)
    check_checkpoint(run_dir)
    predictions = predictions_of_model(run_dir)
    keys, labels, scores = read_scored(predictions)
    threshold = metrics.beta_threshold(labels, scores) if len(set(labels.tolist())) == 2 else float("nan")
    cases = select_cases(keys, labels, scores, threshold, k)
    if not cases:
        raise NothingToExplain(f"{predictions.name} has no positive case to explain at threshold {threshold:.4g}")
    urls = val_urls(run_dir)
    samples = read_samples(urls, [case.key for case in cases])
    found = [case for case in cases if case.key in samples]
    if not found:
        raise NothingToExplain(f"none of the cases of {predictions.name} is in the val shards {urls[0]}...")
    explained, layer_name = map_cases(load_model(run_dir), found, samples, layer)
    return RunExplanation(explained, threshold, layer_name, predictions.name,
                          [case.key for case in cases if case.key not in samples])


def map_cases(predictor: Predictor, cases: list[Case], samples: dict[str, dict[str, Any]],
              layer: str | None) -> tuple[list[Explained], str]:
    """The cases' samples through the export's decoder, their maps, and the name of the layer mapped."""
    decoder, pre = predictor.decoder(), predictor.meta["preprocess"]
    images = torch.stack([decoder(samples[case.key], 0) for case in cases])
    maps = cam_maps(predictor.model, images, layer)
    pictures = to_rgb(images, pre["mean"], pre["std"])
    return ([Explained(case, rgb, cam) for case, rgb, cam in zip(cases, pictures, maps)],
            find_target(predictor.model, images, layer).name)

"""Distributed scoring: every rank scores its share, (key, label, score) meet on rank 0, once each.

Scoring uses the unwrapped module: DDP's forward would broadcast buffers (a collective) and ranks
score different numbers of batches, so any collective inside the loop could hang. The only
collectives are the gather at the end and the broadcast of rank 0's result.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_train.data.augment import tta_views
from dist_train.errors import CoverageError
from dist_train.train import distributed
from dist_train.train.distributed import DistEnv


@dataclass
class Scores:
    keys: list[str]
    labels: list[int]
    scores: list[float]
    loss_sum: float
    bad: list[tuple[str, str, str]]


@torch.no_grad()
def score_stream(module: nn.Module, loader: Any, device: torch.device, tta: str, loss_fn: nn.Module | None,
                 autocast_context: Any, prepare: Any = None) -> Scores:
    """This rank's (key, label, probability) over its share of the validation stream."""
    was_training = module.training
    module.eval()
    labels: list[int]
    keys, labels, scores, bad, loss_sum = [], [], [], [], 0.0
    for batch in loader:
        bad.extend(batch.bad)
        if not batch.keys:
            continue
        images = batch.images.to(device, non_blocking=True)
        images = prepare(images) if prepare is not None else images
        with autocast_context():
            view_logits = [module(view).float() for view in tta_views(images, tta)]
        probabilities = torch.stack([torch.sigmoid(logits) for logits in view_logits]).mean(0).cpu()
        if loss_fn is not None:
            loss_sum += float(loss_fn(view_logits[0].cpu(), batch.labels)) * len(batch.keys)
        keys.extend(batch.keys)
        labels.extend(int(label) for label in batch.labels.tolist())
        scores.extend(probabilities.tolist())
    module.train(was_training)
    return Scores(keys, labels, scores, loss_sum, bad)


def gather_scores(env: DistEnv, local: Scores, expected: int | None) -> Scores | None:
    """All ranks' scores on rank 0, checked for exactly-once coverage; None on other ranks."""
    gathered = distributed.gather_to_main(env, local)
    if gathered is None:
        return None
    merged = Scores([], [], [], 0.0, [])
    for part in gathered:
        merged.keys.extend(part.keys)
        merged.labels.extend(part.labels)
        merged.scores.extend(part.scores)
        merged.loss_sum += part.loss_sum
        merged.bad.extend(part.bad)
    check_coverage(merged.keys, expected, len(merged.bad))
    return merged


def check_coverage(keys: list[str], expected: int | None, skipped: int = 0) -> None:
    duplicates = len(keys) - len(set(keys))
    if duplicates:
        repeated = sorted({key for key in keys if keys.count(key) > 1})[:5]
        raise CoverageError(f"{duplicates} validation samples were scored twice, e.g. {repeated}")
    if expected is not None and len(keys) + skipped != expected:
        raise CoverageError(f"scored {len(keys)} validation samples (+{skipped} corrupt) but the manifest "
                            f"holds {expected}")


PREDICTION_COLUMNS = ("id", "label", "likelihood", "referable_glaucoma", "error")
"""The header of every prediction CSV: training's predictions_val.csv, predict.py and evaluate.py.

id: the sample key (shards) or the image path under --images without extension; label: 1 RG, 0 NRG, empty
when unknown; likelihood: the RG probability; referable_glaucoma: 1/0 at the export's threshold, empty
without one; error: why the sample could not be scored (its likelihood is then empty).
"""


def write_predictions(path: Path, scores: Scores, threshold: float | None = None, labelled: bool = True) -> None:
    """One row per sample, scored or skipped, sorted by id; written aside and renamed, so never half a file."""
    rows: list[list[Any]]
    rows = [[key, label if labelled else "", f"{score:.8g}", "" if threshold is None else int(score >= threshold),
             ""] for key, label, score in zip(scores.keys, scores.labels, scores.scores)]
    rows += [[key, "", "", "", reason] for _where, key, reason in scores.bad]
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        ordered: list[list[Any]] = sorted(rows, key=lambda row: row[0])
        writer.writerows(ordered)
    os.replace(staging, path)

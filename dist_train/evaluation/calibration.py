"""Calibration of the predicted likelihood: the reliability diagram's points and the expected calibration error.

α and β only rank images; a screening programme also reads the likelihood itself ("0.8 means 8 in 10
are referable"), and weighted BCE or focal loss shift it away from a frequency. The points are
scikit-learn's `calibration_curve` (equal-width bins); the ECE weights each bin's gap between observed
frequency and mean likelihood by the bin's share of images, with the same bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.calibration import calibration_curve


@dataclass(frozen=True)
class Reliability:
    """Per non-empty bin: observed positive fraction, mean likelihood, images; and the ECE over them."""

    observed: np.ndarray
    predicted: np.ndarray
    counts: np.ndarray
    ece: float


def reliability(labels: np.ndarray, likelihoods: np.ndarray, bins: int = 10) -> Reliability:
    """The reliability diagram of `likelihoods` against 0/1 `labels` over `bins` equal-width bins of [0, 1]."""
    labels, likelihoods = np.asarray(labels).astype(int), np.asarray(likelihoods, dtype=float)
    observed, predicted = calibration_curve(labels, likelihoods, n_bins=bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], likelihoods), minlength=bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts / counts.sum() * np.abs(observed - predicted)))
    return Reliability(observed, predicted, counts, ece)

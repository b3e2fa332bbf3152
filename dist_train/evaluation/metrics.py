"""The official AIROGS screening metrics, their confidence intervals, and the ROC figure.

α and β follow the challenge's own evaluation code, so numbers here are comparable to the
leaderboard: α is sklearn's McClish-standardised partial AUC over FPR ∈ [0, 0.1]; β is the
sensitivity at the last ROC operating point whose specificity is ≥ 95 %, read from the ROC
curve *with* intermediate points (`drop_intermediate=True` changes β on some inputs).

Inputs are checked up front so that a bad batch of scores fails with a message that names the
problem instead of an error from deep inside sklearn. A validation set holding one class only is
not an error (a tiny smoke run can draw one): the metrics that need both classes become NaN and
a `warnings.warn` says why.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

MAX_FPR = 0.1
"""α covers the 90–100 % specificity band, where a screening programme operates."""
TARGET_SPECIFICITY = 0.95
"""β is the sensitivity at this specificity."""

def _checked(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D arrays (labels int 0/1, scores float64), or a ValueError saying what is wrong."""
    labels = np.asarray(y_true).ravel()
    scores = np.asarray(y_score, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"y_true has {labels.size} entries but y_score has {scores.size}")
    if labels.size == 0:
        raise ValueError("no samples: y_true and y_score are empty")
    finite = np.isfinite(scores)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"y_score holds {int((~finite).sum())} NaN/Inf value(s), the first at index "
                         f"{first} ({scores[first]}): the model output diverged or was not gathered fully")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0/1 labels, found {np.unique(labels)[:5].tolist()}")
    return labels.astype(np.int64), scores


def _has_both_classes(labels: np.ndarray, metric: str) -> bool:
    """False (with a warning) when one class is missing: ROC metrics are undefined then."""
    positives = int(labels.sum())
    if 0 < positives < labels.size:
        return True
    present = "positives" if positives else "negatives"
    warnings.warn(f"{metric}: y_true holds only {present} ({labels.size} samples); "
                  "the ROC metrics are undefined and reported as NaN", RuntimeWarning, stacklevel=3)
    return False


def airogs_alpha(y_true, y_score) -> float:
    """α: `roc_auc_score(y_true, y_score, max_fpr=0.1)`, McClish-standardised (0.5 = chance)."""
    labels, scores = _checked(y_true, y_score)
    if not _has_both_classes(labels, "airogs_alpha"):
        return float("nan")
    return float(roc_auc_score(labels, scores, max_fpr=MAX_FPR))


def _beta_point(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    """(β, threshold, FPR) at the last point with specificity ≥ 0.95 − ε, as the challenge code picks it."""
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    good_specificity = np.flatnonzero(1 - fpr >= TARGET_SPECIFICITY - sys.float_info.epsilon)
    last = good_specificity[-1]
    return float(tpr[last]), float(thresholds[last]), float(fpr[last])


def airogs_beta(y_true, y_score) -> float:
    """β: sensitivity at 95 % specificity (the largest TPR among points with specificity ≥ 0.95)."""
    labels, scores = _checked(y_true, y_score)
    if not _has_both_classes(labels, "airogs_beta"):
        return float("nan")
    return _beta_point(labels, scores)[0]


def beta_threshold(y_true, y_score) -> float:
    """The score threshold (predict positive when score ≥ threshold) of β's operating point.

    That is the lowest threshold whose specificity is still ≥ 95 % (the challenge's last point);
    +inf means 'predict no positive'.
    """
    labels, scores = _checked(y_true, y_score)
    if not _has_both_classes(labels, "beta_threshold"):
        return float("nan")
    return _beta_point(labels, scores)[1]


def auc(y_true, y_score) -> float:
    """Full ROC AUC."""
    labels, scores = _checked(y_true, y_score)
    if not _has_both_classes(labels, "auc"):
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _raw_partial_area(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve over FPR ∈ [0, 0.1], the curve interpolated linearly at FPR 0.1."""
    fpr, tpr, _ = roc_curve(labels, scores)
    stop = int(np.searchsorted(fpr, MAX_FPR, side="right"))
    tpr_at_max = np.interp(MAX_FPR, fpr[stop - 1:stop + 1], tpr[stop - 1:stop + 1])
    fpr_band = np.append(fpr[:stop], MAX_FPR)
    tpr_band = np.append(tpr[:stop], tpr_at_max)
    return float(np.trapezoid(tpr_band, fpr_band))


def partial_auc_raw(y_true, y_score) -> float:
    """Unstandardised partial AUC over FPR ∈ [0, 0.1], divided by 0.1 so that a perfect model scores 1.

    Unlike α (McClish), a random model scores 0.05 here, not 0.5: kept for readers used to that scale.
    """
    labels, scores = _checked(y_true, y_score)
    if not _has_both_classes(labels, "partial_auc_raw"):
        return float("nan")
    return _raw_partial_area(labels, scores) / MAX_FPR


def confusion_at(y_true, y_score, threshold: float) -> dict[str, int]:
    """Counts when predicting positive for score ≥ threshold (a NaN threshold predicts no positive)."""
    labels, scores = _checked(y_true, y_score)
    predicted = scores >= threshold
    actual = labels == 1
    return {"tn": int((~predicted & ~actual).sum()), "fp": int((predicted & ~actual).sum()),
            "fn": int((~predicted & actual).sum()), "tp": int((predicted & actual).sum())}


def bootstrap_cis(y_true, y_score, metric_fns: dict[str, Callable[[np.ndarray, np.ndarray], float]], n: int,
                  seed: int = 0, deadline: float | None = None) -> tuple[dict[str, tuple[float, float]], int]:
    """95 % percentile intervals of each metric over up to `n` stratified bootstrap resamples, and how
    many were drawn: every metric is scored on the same resamples, and none is drawn after `deadline`
    (a `time.monotonic()` value) once at least one was.

    Resampling within each class keeps the prevalence fixed: with 1–3 % positives a plain
    resample often holds a handful of positives or none, which widens the interval for no reason.
    """
    labels, scores = _checked(y_true, y_score)
    nan = {name: (float("nan"), float("nan")) for name in metric_fns}
    if n <= 0 or not _has_both_classes(labels, "bootstrap_cis"):
        return nan, 0
    rng = np.random.default_rng(seed)
    positive_index, negative_index = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    values = np.empty((n, len(metric_fns)))
    drawn = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        while drawn < n and not (drawn and deadline is not None and time.monotonic() > deadline):
            sample = np.concatenate([rng.choice(positive_index, positive_index.size),
                                     rng.choice(negative_index, negative_index.size)])
            values[drawn] = [metric_fn(labels[sample], scores[sample]) for metric_fn in metric_fns.values()]
            drawn += 1
    bounds = np.nanpercentile(values[:drawn], [2.5, 97.5], axis=0)
    return {name: (float(bounds[0, column]), float(bounds[1, column])) for column, name in enumerate(metric_fns)}, drawn


def compute_all(y_true, y_score, bootstrap: int = 0, seed: int = 0,
                time_budget_s: float | None = None) -> dict[str, float | int | list[float]]:
    """Every evaluation figure in one dict; confusion counts are taken at the β threshold.

    Keys: alpha, beta, auc, pauc_raw, beta_threshold, tn, fp, fn, tp, n, positives, and
    alpha_ci/beta_ci/auc_ci ([low, high]) and bootstrap_resamples when `bootstrap` > 0; with
    `time_budget_s` the resampling stops after that many seconds (bootstrap_resamples says where).
    With one class only the ROC figures are NaN (one warning) and the counts are those of
    predicting no positive.
    """
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    labels, scores = _checked(y_true, y_score)
    result: dict[str, float | int | list[float]] = {"n": int(labels.size), "positives": int(labels.sum())}
    if _has_both_classes(labels, "compute_all"):
        beta, threshold, _fpr = _beta_point(labels, scores)
        result.update(alpha=float(roc_auc_score(labels, scores, max_fpr=MAX_FPR)), beta=beta,
                      auc=float(roc_auc_score(labels, scores)),
                      pauc_raw=_raw_partial_area(labels, scores) / MAX_FPR, beta_threshold=threshold)
    else:
        result.update(dict.fromkeys(("alpha", "beta", "auc", "pauc_raw", "beta_threshold"), float("nan")))
    result.update(confusion_at(labels, scores, float(cast(float, result["beta_threshold"]))))
    if bootstrap > 0:
        intervals, drawn = bootstrap_cis(labels, scores, {"alpha": airogs_alpha, "beta": airogs_beta, "auc": auc},
                                         bootstrap, seed, deadline)
        result.update({f"{name}_ci": list(interval) for name, interval in intervals.items()})
        result["bootstrap_resamples"] = drawn
    return result


def draw_roc(axes: Axes, y_true, y_score, label: str | None = None) -> None:
    """ROC curve on `axes`, with the FPR 0–0.1 band (α's domain) shaded and the β point marked."""
    labels, scores = _checked(y_true, y_score)
    axes.axvspan(0, MAX_FPR, color="tab:green", alpha=0.12, label="specificity 90–100 % (α)")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity (FPR)", ylabel="sensitivity (TPR)")
    if not _has_both_classes(labels, "draw_roc"):
        axes.set_title("ROC undefined: one class only")
        return
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    beta, _threshold, beta_fpr = _beta_point(labels, scores)
    axes.plot(fpr, tpr, linewidth=1.5, label=label or "ROC")
    axes.plot([beta_fpr], [beta], marker="o", color="tab:red", linestyle="none",
              label=f"β = {beta:.3f} at 95 % specificity")
    axes.set_title(f"α {roc_auc_score(labels, scores, max_fpr=MAX_FPR):.4f}   β {beta:.4f}   "
                   f"AUC {roc_auc_score(labels, scores):.4f}")
    axes.legend(loc="lower right", fontsize="small")


def plot_roc(y_true, y_score, path: str | Path) -> Path:
    """Write the ROC figure as a PNG; the Agg canvas directly: no pyplot state, no display."""
    figure = Figure(figsize=(5.5, 5), dpi=100, layout="constrained")
    draw_roc(figure.add_subplot(), y_true, y_score)
    figure.savefig(path, format="png")
    return Path(path)

"""dist_train.evaluation.metrics against oracles that share no code with it.

β's oracle sweeps every distinct threshold and counts by hand; α's is sklearn called the way the
challenge calls it; a small case is worked out on paper in `test_hand_computed_case`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dist_train.evaluation import metrics


def brute_force_beta(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(largest sensitivity, lowest threshold t) among thresholds with specificity ≥ 0.95 (predict score ≥ t).

    The challenge takes the last ROC point meeting the specificity, i.e. the lowest such threshold.
    """
    labels = np.asarray(labels)
    negatives, positives = int((labels == 0).sum()), int((labels == 1).sum())
    best_sensitivity, best_threshold = -1.0, math.nan
    for threshold in [math.inf, *sorted(set(scores.tolist()), reverse=True)]:
        predicted = scores >= threshold
        true_negatives = int(((labels == 0) & ~predicted).sum())
        true_positives = int(((labels == 1) & predicted).sum())
        if true_negatives / negatives >= 0.95 - 1e-12 and true_positives / positives >= best_sensitivity:
            best_sensitivity, best_threshold = true_positives / positives, threshold
    return best_sensitivity, best_threshold


def random_case(rng: np.random.Generator, size: int, positive_rate: float, decimals: int | None):
    """Scores with some signal; rounding to `decimals` creates ties, across classes too."""
    labels = (rng.random(size) < positive_rate).astype(int)
    labels[rng.integers(size)] = 1
    labels[rng.integers(size)] = 0 if labels.sum() > 1 else labels[0]
    if labels.min() == labels.max():
        labels[0] = 1 - labels[1]
    scores = rng.normal(size=size) + 1.5 * labels
    return labels, (np.round(scores, decimals) if decimals is not None else scores)


def test_hand_computed_case():
    # 20 negatives scoring 1..20; positives at 25, 19.5 and 4.5.
    # Thresholds: 25 → spec 1, sens 1/3; 20 → spec .95, sens 1/3; 19.5 → spec .95, sens 2/3; 19 → spec .9.
    # So β = 2/3 at threshold 19.5 (tp 2, fp 1, fn 1, tn 19).
    # AUC = (20 + 19 + 4) / 60. The ROC over FPR [0, .1] has area .05·1/3 + .05·2/3 = .05, so
    # pauc_raw = .5 and α = ½(1 + (.05 − .005)/(.1 − .005)) = 14/19.
    labels = np.array([0] * 20 + [1, 1, 1])
    scores = np.array([*range(1, 21), 25, 19.5, 4.5], dtype=float)
    result = metrics.compute_all(labels, scores)
    assert result["beta"] == pytest.approx(2 / 3)
    assert result["beta_threshold"] == 19.5
    assert (result["tn"], result["fp"], result["fn"], result["tp"]) == (19, 1, 1, 2)
    assert result["auc"] == pytest.approx(43 / 60)
    assert result["pauc_raw"] == pytest.approx(0.5)
    assert result["alpha"] == pytest.approx(14 / 19)
    assert (result["n"], result["positives"]) == (23, 3)


@pytest.mark.parametrize("seed", range(40))
def test_random_cases_match_oracles(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.choice([3, 5, 12, 40, 250, 2000]))
    positive_rate = float(rng.choice([0.01, 0.02, 0.03, 0.3]))
    labels, scores = random_case(rng, size, positive_rate, decimals=int(rng.choice([0, 1, 2, 6])))
    expected_beta, expected_threshold = brute_force_beta(labels, scores)
    assert metrics.airogs_beta(labels, scores) == pytest.approx(expected_beta, abs=1e-12)
    assert metrics.beta_threshold(labels, scores) == expected_threshold
    assert metrics.airogs_alpha(labels, scores) == roc_auc_score(labels, scores, max_fpr=0.1)
    assert metrics.auc(labels, scores) == roc_auc_score(labels, scores)
    confusion = metrics.confusion_at(labels, scores, expected_threshold)
    assert confusion["tp"] / labels.sum() == pytest.approx(expected_beta)
    assert sum(confusion.values()) == size


@pytest.mark.parametrize("seed", range(10))
def test_pauc_raw_is_alpha_before_standardisation(seed):
    labels, scores = random_case(np.random.default_rng(100 + seed), 500, 0.03, decimals=1)
    raw_area = metrics.partial_auc_raw(labels, scores) * 0.1
    mcclish = 0.5 * (1 + (raw_area - 0.005) / (0.1 - 0.005))
    assert metrics.airogs_alpha(labels, scores) == pytest.approx(mcclish, abs=1e-12)


def test_perfect_and_inverted_models():
    labels = np.array([0] * 50 + [1] * 2)
    perfect = labels + np.linspace(0, 0.5, labels.size)
    assert metrics.compute_all(labels, perfect)["beta"] == 1.0
    assert metrics.partial_auc_raw(labels, perfect) == pytest.approx(1.0)
    assert metrics.airogs_beta(labels, -perfect) == 0.0


@pytest.mark.parametrize("only", [0, 1])
def test_one_class_gives_nan_with_one_warning(only):
    labels, scores = np.full(30, only), np.linspace(0, 1, 30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = metrics.compute_all(labels, scores)
    assert len(caught) == 1 and "only" in str(caught[0].message)
    for key in ("alpha", "beta", "auc", "pauc_raw", "beta_threshold"):
        assert math.isnan(result[key])
    assert result["tp"] + result["fp"] == 0
    with pytest.warns(RuntimeWarning, match="only"):
        assert math.isnan(metrics.airogs_alpha(labels, scores))
    with pytest.warns(RuntimeWarning, match="only"):
        assert math.isnan(metrics.airogs_beta(labels, scores))


@pytest.mark.parametrize(("labels", "scores", "message"), [
    ([0, 1, 1], [0.1, 0.2], "3 entries but y_score has 2"),
    ([0, 1, 1], [0.1, float("nan"), 0.3], "NaN/Inf value.*index 1"),
    ([0, 1, 1], [0.1, 0.2, float("inf")], "NaN/Inf value.*index 2"),
    ([0, 2, 1], [0.1, 0.2, 0.3], "only 0/1 labels"),
    ([], [], "no samples"),
])
def test_bad_inputs_raise_clear_errors(labels, scores, message):
    for function in (metrics.airogs_alpha, metrics.airogs_beta, metrics.compute_all):
        with pytest.raises(ValueError, match=message):
            function(labels, scores)


def test_bootstrap_interval_brackets_point_and_is_seeded():
    labels, scores = random_case(np.random.default_rng(7), 1500, 0.03, decimals=None)
    result = metrics.compute_all(labels, scores, bootstrap=60, seed=3)
    for key in ("alpha", "beta", "auc"):
        low, high = result[f"{key}_ci"]
        assert low <= result[key] <= high and high - low < 0.6
    assert metrics.compute_all(labels, scores, bootstrap=60, seed=3)["beta_ci"] == result["beta_ci"]
    assert "alpha_ci" not in metrics.compute_all(labels, scores)


def test_plot_roc_writes_a_png(tmp_path):
    labels, scores = random_case(np.random.default_rng(1), 400, 0.03, decimals=2)
    path = metrics.plot_roc(labels, scores, tmp_path / "roc.png")
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert image.shape[0] > 300 and image.std() > 10

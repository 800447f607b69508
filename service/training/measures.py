"""Measures of a binary classifier's scores: AUROC with bootstrap intervals, calibration, thresholds.

Numpy only (no scikit-learn): the functions are small, and owning them keeps the figures on the model card
reproducible from this repository alone.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic, ties counted half.

    Args:
        labels: 0/1 array.
        scores: array of the same length; higher means more likely positive.

    Returns:
        The AUROC, or NaN when one class is absent.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # Average ranks over ties: each run of equal scores gets the mean of its 1-based positions.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [scores.size]))
    run_ranks = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_ranks, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def per_finding_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each column of ``scores`` [n, findings] against the same column of ``labels``."""
    return np.array([auroc(labels[:, k], scores[:, k]) for k in range(labels.shape[1])])


def bootstrap_indices(n: int, *, resamples: int, seed: int) -> np.ndarray:
    """Resamples of ``range(n)`` with replacement, [resamples, n], the same for a given seed.

    Every model compared on one test set is scored on these same resamples, so that differences between
    models get paired intervals.
    """
    if resamples < 1:
        raise ValueError("'resamples' must be at least 1")
    return np.random.default_rng([seed, n]).integers(0, n, size=(resamples, n))


def bootstrap_per_finding_auroc(labels: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per-finding AUROC on each resample: [resamples, findings]; NaN where a resample lacks a class."""
    return np.stack([per_finding_auroc(labels[rows], scores[rows]) for rows in indices])


def percentile_interval(samples: np.ndarray, *, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap samples (NaN samples ignored).

    Raises:
        ValueError: no sample is a number.
    """
    finite = np.asarray(samples, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ValueError("no finite bootstrap sample")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, (tail, 100.0 - tail))
    return float(low), float(high)


def macro(per_finding: np.ndarray) -> np.ndarray:
    """Mean over the last axis (findings), NaN findings left out; NaN only where every finding is NaN."""
    per_finding = np.asarray(per_finding, dtype=np.float64)
    counts = np.isfinite(per_finding).sum(axis=-1)
    sums = np.where(np.isfinite(per_finding), per_finding, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Logistic function, stable for large negative and positive logits."""
    logits = np.asarray(logits, dtype=np.float64)
    out = np.empty_like(logits)
    positive = logits >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-logits[positive]))
    exp = np.exp(logits[~positive])
    out[~positive] = exp / (1.0 + exp)
    return out


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """Expected calibration error of one finding: the |observed rate - mean probability| of equal-width
    probability bins, weighted by the share of cases in each bin.

    Args:
        labels: 0/1 array.
        probabilities: predicted probabilities in [0, 1], same length.
        bins: number of equal-width bins on [0, 1].

    Returns:
        The ECE, in [0, 1].
    """
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.size == 0:
        raise ValueError("no cases")
    # Bin b holds [b/bins, (b+1)/bins); a probability of exactly 1 goes into the last bin.
    which = np.minimum((probabilities * bins).astype(np.int64), bins - 1)
    observed = np.bincount(which, weights=labels, minlength=bins)
    predicted = np.bincount(which, weights=probabilities, minlength=bins)
    return float(np.abs(observed - predicted).sum() / labels.size)


def mean_expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """ECE of each finding (columns of [n, findings] arrays), averaged over findings."""
    return float(
        np.mean(
            [expected_calibration_error(labels[:, k], probabilities[:, k], bins=bins) for k in range(labels.shape[1])]
        )
    )


def _bce(logits: np.ndarray, labels: np.ndarray) -> float:
    # log(1 + exp(-|z|)) form: stable for large logits.
    return float(np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimizing the negative log-likelihood of sigmoid(logit / T).

    Golden-section search on log T in [1/8, 8]; NLL is unimodal in T for a fixed ranking.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    low, high = math.log(0.125), math.log(8.0)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a = high - ratio * (high - low)
    b = low + ratio * (high - low)
    fa, fb = _bce(logits / math.exp(a), labels), _bce(logits / math.exp(b), labels)
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = _bce(logits / math.exp(a), labels)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = _bce(logits / math.exp(b), labels)
    return math.exp((low + high) / 2.0)


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The probability threshold maximizing sensitivity + specificity - 1 (Youden's J).

    Returns 0.5 when one class is absent (no threshold separates anything).
    """
    labels = np.asarray(labels).astype(bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    # Sweep thresholds from high to low: at each distinct probability, everything at or above it is positive.
    order = np.argsort(-probabilities, kind="mergesort")
    sorted_probabilities = probabilities[order]
    true_positives = np.cumsum(labels[order])
    false_positives = np.cumsum(~labels[order])
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_probabilities)), probabilities.size - 1]
    j = true_positives[last_of_run] / n_pos - false_positives[last_of_run] / n_neg
    return float(sorted_probabilities[last_of_run[int(np.argmax(j))]])


def fit_calibration(labels: np.ndarray, logits: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-finding temperature (NLL on these cases) and Youden threshold on the calibrated probabilities.

    Args:
        labels: 0/1 array [n, findings], from a split that the model was not fit on (validation).
        logits: the model's logits on the same cases.

    Returns:
        (temperatures, thresholds), one per finding.
    """
    temperatures = [fit_temperature(logits[:, k], labels[:, k]) for k in range(labels.shape[1])]
    thresholds = [
        youden_threshold(labels[:, k], sigmoid(logits[:, k] / temperatures[k])) for k in range(labels.shape[1])
    ]
    return temperatures, thresholds

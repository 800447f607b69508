"""AUROC, bootstrap intervals, calibration error, temperature and thresholds on inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.training.measures import (
    auroc,
    bootstrap_indices,
    bootstrap_per_finding_auroc,
    expected_calibration_error,
    fit_temperature,
    macro,
    mean_expected_calibration_error,
    percentile_interval,
    sigmoid,
    youden_threshold,
)


def test_auroc_is_one_for_perfect_separation_and_zero_when_reversed() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])

    assert auroc(labels, scores) == 1.0
    assert auroc(labels, -scores) == 0.0


def test_auroc_counts_ties_as_half() -> None:
    labels = np.array([0, 1, 0, 1, 0, 1])

    assert auroc(labels, np.full(6, 0.7)) == 0.5
    # One positive tied with one negative at 0.5, everything else separated: 8 of 9 pairs + half a pair.
    assert auroc(np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.5, 0.5, 0.8, 0.9])) == pytest.approx(8.5 / 9)


def test_auroc_matches_pair_counting_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: many ties
    positives, negatives = scores[labels], scores[~labels]
    pairs = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()

    assert auroc(labels, scores) == pytest.approx(pairs / (positives.size * negatives.size))


def test_auroc_is_nan_without_both_classes() -> None:
    assert math.isnan(auroc(np.zeros(4), np.arange(4.0)))


def test_bootstrap_indices_are_reproducible_for_a_seed() -> None:
    a = bootstrap_indices(50, resamples=1000, seed=3)

    assert a.shape == (1000, 50)
    assert np.array_equal(a, bootstrap_indices(50, resamples=1000, seed=3))
    assert not np.array_equal(a, bootstrap_indices(50, resamples=1000, seed=4))


def test_bootstrap_interval_of_perfect_separation_is_one() -> None:
    labels = np.array([[0], [0], [0], [1], [1], [1]] * 10, dtype=float)
    scores = labels * 2.0 - 1.0
    resampled = bootstrap_per_finding_auroc(labels, scores, bootstrap_indices(60, resamples=1000, seed=0))

    assert percentile_interval(resampled[:, 0]) == (1.0, 1.0)


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_patients() -> None:
    rng = np.random.default_rng(1)

    def interval(n: int) -> tuple[float, float, float]:
        labels = (rng.random((n, 1)) < 0.3).astype(float)
        scores = rng.normal(labels, 1.0)  # true AUROC = Phi(1 / sqrt(2)) = 0.760
        resampled = bootstrap_per_finding_auroc(labels, scores, bootstrap_indices(n, resamples=1000, seed=0))
        low, high = percentile_interval(resampled[:, 0])
        return low, auroc(labels[:, 0], scores[:, 0]), high

    small_low, small_point, small_high = interval(100)
    large_low, large_point, large_high = interval(2000)

    assert small_low < small_point < small_high
    assert large_low < 0.760 < large_high
    assert large_high - large_low < 0.5 * (small_high - small_low)


def test_macro_leaves_out_undefined_findings() -> None:
    assert macro(np.array([0.8, np.nan, 0.6])) == pytest.approx(0.7)
    assert np.isnan(macro(np.array([np.nan, np.nan])))
    assert macro(np.array([[1.0, 0.5], [0.5, np.nan]])).tolist() == [0.75, 0.5]


def test_ece_of_a_perfectly_calibrated_model_is_near_zero() -> None:
    rng = np.random.default_rng(2)
    probabilities = rng.random((200_000, 2))
    labels = (rng.random((200_000, 2)) < probabilities).astype(float)

    assert mean_expected_calibration_error(labels, probabilities) < 0.005


def test_ece_of_an_overconfident_model_is_its_gap() -> None:
    labels = np.array([1.0, 0.0] * 500)

    assert expected_calibration_error(labels, np.full(1000, 0.9)) == pytest.approx(0.4)
    assert expected_calibration_error(labels, np.full(1000, 1.0)) == pytest.approx(0.5)  # p = 1 is in the last bin


def test_fit_temperature_recovers_the_temperature_of_the_data() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 3.0, 50_000)
    labels = (rng.random(50_000) < sigmoid(logits / 2.0)).astype(float)

    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)


def test_youden_threshold_separates_separable_classes() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    probabilities = np.array([0.1, 0.2, 0.3, 0.6, 0.7])

    threshold = youden_threshold(labels, probabilities)

    assert 0.3 < threshold <= 0.6
    assert np.array_equal(probabilities >= threshold, labels.astype(bool))


def test_sigmoid_is_stable_at_the_extremes() -> None:
    values = sigmoid(np.array([-1000.0, 0.0, 1000.0]))

    assert values.tolist() == [0.0, 0.5, 1.0]

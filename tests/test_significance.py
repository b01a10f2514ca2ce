"""Significance against a shared trend: the surrogate test against a naive enumeration and
its rejection rates on simulated series, the partial correlation against the textbook
formula, the flags for small data, and the verdict words."""

from __future__ import annotations

import doctest
import math
from itertools import permutations

import numpy as np
import pytest
from scipy import stats

from moepath.tracer import significance as significance_module
from moepath.tracer.errors import InputError
from moepath.tracer.significance import (
    check_limits,
    difference_correlation,
    false_discovery,
    partial_correlation,
    pearson_interval,
    too_small,
    trend_preserving_test,
    verdict,
)

SEEDS = 200
ALPHA = 0.05
CHECKPOINTS = 10  # the most the demo correlates over: 9! orderings, so 9999 random ones
# A monotone accuracy curve (logistic in step), as held-out accuracy rises during training.
SCORE = 1 / (1 + np.exp(-(np.arange(CHECKPOINTS) - CHECKPOINTS / 2) / 2))


def naive_trend_p(x, y) -> float:
    """Share of the orderings of x's changes, re-integrated from x[0], whose |r| with y is
    at least x's."""
    x = np.asarray(x, float)
    observed = abs(np.corrcoef(x, y)[0, 1])
    null = np.array([np.corrcoef(np.concatenate([[x[0]], x[0] + np.cumsum(order)]), y)[0, 1]
                     for order in permutations(np.diff(x))])
    return float(np.mean(np.abs(null) >= observed - 1e-12))


@pytest.mark.parametrize("seed", range(5))
def test_exact_trend_test_equals_a_naive_enumeration(seed):
    rng = np.random.default_rng(seed)
    x, y = np.cumsum(rng.normal(size=6)), np.sort(rng.random(6))
    test = trend_preserving_test(x, y)
    assert (test.exact, test.resamples, test.min_pvalue) == (True, 120, pytest.approx(1 / 120))
    assert test.statistic == pytest.approx(stats.pearsonr(x, y).statistic)
    assert test.pvalue == pytest.approx(naive_trend_p(x, y))


def test_surrogates_keep_start_end_and_changes_so_a_pure_trend_is_not_significant():
    # equal changes: every ordering is the series itself, p = 1 although r is 1
    line = np.arange(6.0)
    test = trend_preserving_test(line, line**2)
    assert test.statistic > 0.95 and test.pvalue == 1.0


def test_many_checkpoints_use_seeded_random_orderings():
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.normal(size=CHECKPOINTS))
    first, again = trend_preserving_test(x, SCORE), trend_preserving_test(x, SCORE)
    assert (first.exact, first.resamples, first.min_pvalue) == (False, 9999, 1 / 10000)
    assert first == again
    assert trend_preserving_test(x, SCORE, seed=1).pvalue != first.pvalue


def rejection_rates(make_metric, score=SCORE) -> tuple[float, float]:
    """Share of SEEDS simulated metrics rejected at ALPHA: (trend-preserving, plain Pearson)."""
    trend = pearson = 0
    for seed in range(SEEDS):
        metric = make_metric(np.random.default_rng(seed))
        trend += trend_preserving_test(metric, score).pvalue <= ALPHA
        pearson += stats.pearsonr(metric, score).pvalue <= ALPHA
    return trend / SEEDS, pearson / SEEDS


def test_a_random_walk_against_a_monotone_score_is_rejected_at_the_nominal_rate():
    def random_walk(rng):
        return np.cumsum(rng.normal(size=CHECKPOINTS))

    trend, pearson = rejection_rates(random_walk)
    # 99.9% of a Binomial(200, 0.05): 2 to 21 rejections
    low, high = stats.binom.interval(0.999, SEEDS, ALPHA)
    assert low / SEEDS <= trend <= high / SEEDS, trend  # measured: 0.055
    assert pearson > 0.4, pearson  # measured: 0.535, ten times the level


def test_a_metric_whose_changes_follow_the_score_s_is_found():
    found = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        changes = rng.exponential(size=CHECKPOINTS - 1)  # a monotone score, uneven steps
        score = np.concatenate([[0.0], np.cumsum(changes)])
        # the metric falls when the score rises, plus noise of half the changes' spread
        steps = -changes / changes.std() + 0.5 * rng.normal(size=CHECKPOINTS - 1)
        metric = np.concatenate([[5.0], 5.0 + np.cumsum(steps)])
        found += trend_preserving_test(metric, score).pvalue <= ALPHA
    assert found / SEEDS > 0.8, found / SEEDS  # measured: 0.94


def test_difference_correlation_is_pearson_of_the_changes():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=7).cumsum(), rng.normal(size=7).cumsum()
    expected = stats.pearsonr(np.diff(x), np.diff(y))
    assert difference_correlation(x, y) == pytest.approx((expected.statistic, expected.pvalue))
    assert all(map(math.isnan, difference_correlation([1, 2, 4], [1, 2, 3])))  # 2 changes
    assert all(map(math.isnan, difference_correlation([1, 2, 3, 4], [1, 2, 4, 5])))  # even


@pytest.mark.parametrize("seed", range(5))
def test_partial_correlation_equals_the_textbook_formula(seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=8).cumsum()
    x, y = z + rng.normal(size=8), 0.5 * z + rng.normal(size=8)
    r_xy, r_xz, r_yz = (np.corrcoef(a, b)[0, 1] for a, b in ((x, y), (x, z), (y, z)))
    expected = (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz**2) * (1 - r_yz**2))
    r, p = partial_correlation(x, y, z)
    assert r == pytest.approx(expected)
    t = expected * math.sqrt((8 - 3) / (1 - expected**2))  # n - 2 - 1 degrees of freedom
    assert p == pytest.approx(2 * stats.t.sf(abs(t), 8 - 3))


def test_partial_correlation_with_two_controls_and_degenerate_cases():
    rng = np.random.default_rng(7)
    controls = rng.normal(size=(9, 2))
    x, y = rng.normal(size=9), rng.normal(size=9)
    residual = [v - controls @ np.linalg.lstsq(np.column_stack([np.ones(9), controls]), v,
                                               rcond=None)[0][1:] for v in (x, y)]
    assert partial_correlation(x, y, controls)[0] == pytest.approx(
        np.corrcoef(*residual)[0, 1])
    assert all(map(math.isnan, partial_correlation(x, y, x)))  # the metric is the control
    assert all(map(math.isnan, partial_correlation(x[:3], y[:3], x[:3] ** 2)))  # no df left
    assert all(map(math.isnan, partial_correlation([], [], np.empty((0, 2)))))
    assert all(map(math.isnan, partial_correlation([], [], [])))


def test_pearson_interval_is_scipy_s():
    x, y = [1.0, 2.0, 3.0, 5.0, 4.0], [0.1, 0.3, 0.2, 0.6, 0.5]
    interval = stats.pearsonr(x, y).confidence_interval(0.95)
    assert pearson_interval(x, y) == pytest.approx((interval.low, interval.high))
    assert pearson_interval([1, 2, 3], [1, 3, 2]) == (-1.0, 1.0)


def test_false_discovery_adjusts_finite_p_values_only():
    adjusted = false_discovery([0.01, np.nan, 0.04, 0.03])
    assert np.isnan(adjusted[1])
    assert adjusted[[0, 2, 3]] == pytest.approx([0.03, 0.04, 0.04])


@pytest.mark.parametrize(("n", "size", "reason"), [
    (5, 20, None),
    (5, None, None),
    (5, float("nan"), None),
    (4, 20, "too few checkpoints (4 < 5)"),
    (10, 3, "group too small (3 < 20 samples)"),
    (3, 2, "too few checkpoints (3 < 5) and group too small (2 < 20 samples)"),
])
def test_too_small_says_why(n, size, reason):
    assert too_small(n, size) == reason


@pytest.mark.parametrize(("args", "words"), [
    ((0.01, 0.0002, 10), "survives the trend-preserving null (p=0.01)"),
    ((0.4, 0.0002, 10), "indistinguishable from a shared trend (p=0.4)"),
    ((0.33, 0.33, 4, "too few checkpoints (4 < 5)"),
     "too few checkpoints (4 < 5): cannot tell (trend-preserving p=0.33)"),
    ((0.01, 0.0002, 10, "group too small (3 < 20 samples)"),
     "group too small (3 < 20 samples): cannot tell (trend-preserving p=0.01)"),
    ((0.17, 0.17, 4),
     "cannot tell: with 4 checkpoints the trend-preserving p cannot go below 0.17 > 0.05"),
    ((math.nan, math.nan, 5, None, "loss is constant over the 5 checkpoints"),
     "cannot tell: loss is constant over the 5 checkpoints"),
    ((0.01, 0.0002, 10, None, None, 0.05, 0.2, 20),
     "survives the trend-preserving null (p=0.01) but not the correction for 20 tests (q=0.2)"),
    ((0.01, 0.0002, 10, None, None, 0.05, 0.04, 20),
     "survives the trend-preserving null (p=0.01)"),
])
def test_verdict_words(args, words):
    assert verdict(*args) == words


@pytest.mark.parametrize("limits", [(0, 20), (5, 0), (5.5, 20), (True, 20), (5, "20")])
def test_limits_are_whole_numbers_of_at_least_one(limits):
    with pytest.raises(InputError, match="must be a whole number of at least 1"):
        check_limits(*limits)


def test_doctests():
    assert doctest.testmod(significance_module).failed == 0

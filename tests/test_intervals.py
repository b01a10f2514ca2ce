"""Bootstrap intervals: coverage of a known mean at about the nominal rate, and the
resampled pair statistic against a naive recomputation."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from scipy import stats

from moepath.tracer import intervals as intervals_module
from moepath.tracer.errors import MetricError
from moepath.tracer.intervals import (
    MIN_SAMPLES,
    Interval,
    IntervalOptions,
    mean_interval,
    pair_mean_interval,
    sampled_pair_mean_interval,
)

REPETITIONS = 200
LEVEL = 0.95
# Coverage of 200 intervals is Binomial(200, p)/200, sd 0.0154 at p = 0.95. Bootstrap
# intervals undercover a little at small n (BCa on 40 normal values: 0.943 over 1000
# repetitions), so the band is 0.94 - 3 sd to 0.94 + 2.5 sd: [0.894, 0.978].
SD = np.sqrt(LEVEL * (1 - LEVEL) / REPETITIONS)
LOW, HIGH = LEVEL - 0.01 - 3 * SD, LEVEL - 0.01 + 2.5 * SD
TRUE_PAIR_MEAN = 2 / np.sqrt(np.pi)  # E|X - Y| for X, Y independent N(0, 1)


def coverage(interval_of, draw) -> float:
    """Share of REPETITIONS intervals (fresh data, fresh seed each) holding the truth."""
    rng = np.random.default_rng(0)
    hits = [interval_of(draw(rng), IntervalOptions(LEVEL, 1000, seed)) for seed in
            range(REPETITIONS)]
    print(f"coverage {np.mean(hits):.3f} of {REPETITIONS} (nominal {LEVEL})")
    return float(np.mean(hits))


def test_mean_interval_covers_the_true_mean_at_the_nominal_rate():
    def covered(x, options):
        i = mean_interval(x, options)
        return i.low <= 1.0 <= i.high

    rate = coverage(covered, lambda rng: rng.normal(1.0, 2.0, size=40))
    assert LOW <= rate <= HIGH, rate


def test_pair_mean_interval_covers_the_true_pair_mean_at_the_nominal_rate():
    def covered(y, options):
        i = pair_mean_interval(np.abs(y[:, None] - y[None]), options)
        return i.low <= TRUE_PAIR_MEAN <= i.high

    rate = coverage(covered, lambda rng: rng.normal(size=40))
    assert LOW <= rate <= HIGH, rate


def test_sampled_pair_interval_covers_the_true_pair_mean_at_the_nominal_rate():
    def covered(y, options):
        pair_rng = np.random.default_rng(options.seed + 1000)
        first = pair_rng.integers(0, len(y), 300)
        second = pair_rng.integers(0, len(y) - 1, 300)
        second += second >= first
        i = sampled_pair_mean_interval(first, second, np.abs(y[first] - y[second]), len(y),
                                       options)
        return i.low <= TRUE_PAIR_MEAN <= i.high

    rate = coverage(covered, lambda rng: rng.normal(size=40))
    assert LOW <= rate <= HIGH, rate


@pytest.mark.parametrize("integer, divided", [(False, False), (True, False), (True, True)])
def test_pair_statistic_is_the_mean_over_distinct_samples_of_a_resample(monkeypatch, integer,
                                                                       divided):
    """The resampled statistic, recomputed naively: pairs of positions of different samples,
    each divided by the larger divisor of its two samples."""
    rng = np.random.default_rng(3)
    d = rng.integers(0, 40, (12, 12)).astype(float) if integer else rng.random((12, 12))
    d = d + d.T
    np.fill_diagonal(d, 0)
    m = rng.integers(1, 5, 12).astype(float) if divided else np.ones(12)
    seen = []
    bootstrap = stats.bootstrap

    def spy(data, statistic, **kwargs):
        index = rng.integers(0, 12, size=(5, 12))
        seen.append((index, statistic(index)))
        return bootstrap(data, statistic, **kwargs)

    monkeypatch.setattr(intervals_module.stats, "bootstrap", spy)
    pair_mean_interval(d, IntervalOptions(resamples=50), divisor=m if divided else None)
    [(index, values)] = seen
    for row, value in zip(index, values, strict=True):
        naive = [d[a, b] / max(m[a], m[b]) for x, a in enumerate(row) for y, b in enumerate(row)
                 if x != y and a != b]
        assert value == pytest.approx(np.mean(naive), rel=1e-12)
    # every sample once: the observed mean over unordered pairs
    everyone = np.arange(12)[None]
    assert intervals_module._counts(everyone, 12).tolist() == [[1.0] * 12]


def test_the_pair_statistic_of_edit_distances_does_not_depend_on_the_order_of_samples():
    """Integer distances are summed exactly, so relabelling the samples (which reorders every
    sum a float product would round) leaves each resample's statistic bit for bit the same."""
    rng = np.random.default_rng(5)
    n = 300
    d = rng.integers(0, 900, (n, n)).astype(float)
    d = np.triu(d, 1) + np.triu(d, 1).T
    lengths = rng.integers(200, 901, n).astype(float)
    index = rng.integers(0, n, size=(64, n))
    perm = rng.permutation(n)
    relabelled = np.argsort(perm)  # sample perm[k] of the original is sample k relabelled
    mean = intervals_module._ResampledPairMean(d, lengths).statistic(index)
    again = intervals_module._ResampledPairMean(d[np.ix_(perm, perm)], lengths[perm]).statistic(
        relabelled[index])
    assert mean.tolist() == again.tolist()


def test_seeded_small_and_constant_groups():
    x = np.random.default_rng(0).normal(size=50)
    options = IntervalOptions(0.9, 500, seed=4)
    assert mean_interval(x, options) == mean_interval(x, options)
    assert mean_interval(x, options) != mean_interval(x, IntervalOptions(0.9, 500, seed=5))
    assert mean_interval(x[: MIN_SAMPLES - 1], options) is None
    assert mean_interval(x, IntervalOptions(resamples=0)) is None
    assert mean_interval(np.full(20, 2.5), options) == Interval(2.5, 2.5)
    assert pair_mean_interval(np.ones((20, 20)), options) == Interval(1.0, 1.0)
    wide = mean_interval(x, IntervalOptions(0.99, 500))
    narrow = mean_interval(x, IntervalOptions(0.5, 500))
    assert wide.low < narrow.low < narrow.high < wide.high


@pytest.mark.parametrize("level, resamples", [(0, 10), (1, 10), (0.95, -1), (0.95, 1.5),
                                              (True, 10)])
def test_bad_options(level, resamples):
    with pytest.raises(MetricError):
        IntervalOptions(level, resamples)


def test_docstrings():
    assert doctest.testmod(intervals_module).failed == 0

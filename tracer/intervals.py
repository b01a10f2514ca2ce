"""Bootstrap intervals over samples for a group's metrics (docs/method.md "Uncertainty").

A group's metrics are means over its samples (consistency, pathway length, routing
entropy) or over its pairs of samples (pathway distance). Both are resampled the
same way: draw the group's samples with replacement and recompute the statistic on
the resample, with :func:`scipy.stats.bootstrap` doing the resampling (BCa by
default). For a pairwise mean the resampled unit is a sample *index*; the statistic
averages the already computed pair distances over the pairs of the resample. Pairs
of a sample with itself (drawn twice) are left out, as the observed mean has no
self-pairs: with c_i the number of times sample i is drawn,

    mean* = sum_{i != j} c_i c_j D_ij / sum_{i != j} c_i c_j

which, for the unresampled group (every c_i = 1), is the observed mean exactly.

Example::

    >>> import numpy as np
    >>> interval = mean_interval(np.arange(100.0), IntervalOptions(resamples=500))
    >>> bool(interval.low < 49.5 < interval.high)
    True
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from scipy import stats

from .errors import MetricError

DEFAULT_LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
# Fewer samples than this get no interval: resamples that draw one sample n times (no pair
# left, probability n**(1-n)) and a jackknife of a handful of values make it meaningless.
MIN_SAMPLES = 10
METHOD = "BCa"
# Resamples per vectorised statistic call: a pair statistic holds [batch, n] counts.
_BATCH = 250
# Seed streams: the bootstrap of each statistic draws from (seed, _STREAM, k).
_STREAM = 36


@dataclass(frozen=True)
class IntervalOptions:
    """Bootstrap settings; validated on construction.

    Attributes:
        level: confidence level in (0, 1), e.g. 0.95.
        resamples: bootstrap resamples per interval; 0 computes no interval.
        seed: seeds the resampling (an int >= 0), so intervals are reproducible.
    """

    level: float = DEFAULT_LEVEL
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        check_interval_options(self.level, self.resamples)


def check_interval_options(level: float, resamples: int) -> None:
    """Raise :class:`MetricError` unless ``level`` is in (0, 1) and ``resamples`` an int >= 0."""
    if isinstance(level, bool) or not isinstance(level, Real) or not 0 < level < 1:
        raise MetricError(f"confidence level {level!r} is outside (0, 1); pass e.g. 0.95")
    if isinstance(resamples, bool) or not isinstance(resamples, Integral) or resamples < 0:
        raise MetricError(f"resamples {resamples!r} is not an integer >= 0; pass e.g. 1000 "
                          "(0 computes no interval)")


@dataclass(frozen=True)
class Interval:
    """A two-sided bootstrap confidence interval [low, high] of a group statistic."""

    low: float
    high: float


def mean_interval(values, options: IntervalOptions, stream: int = 0) -> Interval | None:
    """Interval of the mean of per-sample ``values`` [N] (NaN values are dropped).

    None with fewer than :data:`MIN_SAMPLES` values or ``options.resamples == 0``.
    ``stream`` picks an independent random stream per statistic of one group.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) < MIN_SAMPLES or options.resamples == 0:
        return None
    if np.ptp(x) == 0:  # every resample has the same mean; BCa would return NaN
        return Interval(float(x[0]), float(x[0]))
    return _bootstrap((x,), _mean, options, stream)


def pair_mean_interval(matrix: np.ndarray, options: IntervalOptions, stream: int = 0,
                       divisor: np.ndarray | None = None) -> Interval | None:
    """Interval of the mean over unordered pairs i != j of a symmetric ``matrix`` [n, n],
    each pair divided by ``max(divisor[i], divisor[j])`` when ``divisor`` [n] is given.

    The diagonal is ignored. None with fewer than :data:`MIN_SAMPLES` samples or
    ``options.resamples == 0``. See the module docstring for the resampled statistic and
    :class:`_ResampledPairMean` for how it is computed (exactly, for edit distances).
    """
    n = len(matrix)
    if n < MIN_SAMPLES or options.resamples == 0:
        return None
    form = _ResampledPairMean(np.asarray(matrix, dtype=np.float64),
                     np.ones(n) if divisor is None else np.asarray(divisor, dtype=np.float64))
    if form.constant is not None:  # every resample has the same mean; BCa would return NaN
        return Interval(form.constant, form.constant)
    return _bootstrap((np.arange(n),), form.statistic, options, stream)


class _ResampledPairMean:
    """The resampled pair mean of a matrix D [n, n] with per-sample divisors m [n].

    With c [B, n] the draw counts of B resamples, the statistic of resample b is
    sum_{i != j} c_i c_j D_ij / max(m_i, m_j) over sum_{i != j} c_i c_j. Samples are put
    in order of m (ties by position) and each unordered pair is credited to the later
    of its two samples, whose m is the pair's divisor:

        numerator = 2 sum_v (1 / v) sum_{i: m_i = v} c_i (c @ U)_i,

    U the strict upper triangle of D in that order. For integer D (edit distances) every
    product and sum inside the brackets is an integer computed exactly (float32 while
    n * max D < 2**24, else float64), so the statistic does not depend on the BLAS
    kernel or thread count, and the products run on one BLAS thread (many small products
    lose more to waiting for a busy second core than they gain).
    """

    def __init__(self, matrix: np.ndarray, divisor: np.ndarray) -> None:
        n = len(matrix)
        self.order = np.argsort(divisor, kind="stable")
        sorted_divisor = divisor[self.order]
        upper = np.triu(matrix[np.ix_(self.order, self.order)], 1)
        exact32 = np.array_equal(upper, np.rint(upper)) and n * upper.max() < 2**24
        self.upper = upper.astype(np.float32 if exact32 else np.float64)
        self.starts = np.flatnonzero(np.r_[True, np.diff(sorted_divisor) != 0])
        self.weights = 1.0 / sorted_divisor[self.starts]  # [V], one per distinct divisor
        ratios = (matrix / np.maximum.outer(divisor, divisor))[~np.eye(n, dtype=bool)]
        self.constant = float(ratios[0]) if np.ptp(ratios) == 0 else None

    def statistic(self, index: np.ndarray, axis: int = -1) -> np.ndarray:
        counts = _counts(index, len(self.order))[:, self.order]  # [B, n], small integers
        with _one_blas_thread():
            before = counts.astype(self.upper.dtype) @ self.upper  # [B, n]
        per_level = np.add.reduceat(counts * before.astype(np.float64), self.starts, axis=1)
        numerator = 2.0 * (per_level * self.weights).sum(1)
        pairs = counts.sum(1) ** 2 - np.einsum("bi,bi->b", counts, counts)
        return (numerator / pairs).reshape(index.shape[:-1])


def sampled_pair_mean_interval(first: np.ndarray, second: np.ndarray, values: np.ndarray,
                               n_samples: int, options: IntervalOptions,
                               stream: int = 0) -> Interval | None:
    """Interval of an all-pairs mean estimated from uniformly sampled pairs (i, j), i != j.

    The resampled statistic is the same count-weighted mean as for a full matrix, taken
    over the sampled pairs only (a ratio estimate of it): the interval covers the
    sample-to-sample variation of the group *and* the pair-sampling noise. Percentile
    method (BCa's jackknife would cost n passes over the pairs).
    """
    if n_samples < MIN_SAMPLES or options.resamples == 0:
        return None
    v = np.asarray(values, dtype=np.float64)
    if np.ptp(v) == 0:
        return Interval(float(v[0]), float(v[0]))

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        counts = _counts(index, n_samples)  # [B, n]
        weights = counts[:, first] * counts[:, second]  # [B, P]
        return (weights @ v / weights.sum(1)).reshape(index.shape[:-1])

    batch = max(1, (1 << 22) // max(len(v), 1))  # [batch, P] arrays of 4M values (32 MiB)
    return _bootstrap((np.arange(n_samples),), statistic, options, stream,
                      method="percentile", batch=min(batch, _BATCH))


@functools.cache
def _blas_threads():
    from threadpoolctl import ThreadpoolController  # scans the loaded BLAS libraries once

    return ThreadpoolController()


def _one_blas_thread():
    """A context in which numpy's BLAS runs on one thread (restored on exit)."""
    return _blas_threads().limit(limits=1, user_api="blas")


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x.mean(axis=axis)


def _counts(index: np.ndarray, n: int) -> np.ndarray:
    """float64 [B, n]: how often each of n samples is drawn in each of B resamples of index."""
    rows = np.asarray(index).reshape(-1, np.shape(index)[-1])
    offsets = rows + n * np.arange(len(rows))[:, None]
    return np.bincount(offsets.ravel(), minlength=len(rows) * n).reshape(len(rows), n).astype(
        np.float64)


def _bootstrap(data: tuple, statistic, options: IntervalOptions, stream: int,
               method: str = METHOD, batch: int = _BATCH) -> Interval:
    rng = np.random.default_rng((options.seed, _STREAM, stream))
    result = stats.bootstrap(data, statistic, n_resamples=options.resamples, batch=batch,
                             vectorized=True, confidence_level=options.level, method=method,
                             **{_RNG: rng})
    low, high = result.confidence_interval
    if np.isnan(low) or np.isnan(high):  # BCa undefined (e.g. a near-constant statistic)
        spread = result.bootstrap_distribution
        tail = 50 * (1 - options.level)
        low, high = np.percentile(spread, [tail, 100 - tail])
    return Interval(float(low), float(high))


# scipy >= 1.15 names the generator ``rng``; 1.11-1.14 ``random_state``.
_RNG = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"

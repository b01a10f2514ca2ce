"""Significance of a correlation between two trajectories over checkpoints, when both trend.

Held-out accuracy rises with step, so any metric with a trend correlates with it:
independent random walks reach |r| > 0.8 against such a curve about a third of the
time, and Pearson's and Spearman's p-values, which assume independent checkpoints,
call that significant. This module asks the question those p-values cannot
(docs/method.md, "Statistics"):

- :func:`trend_preserving_test`: is the correlation larger than a metric with the
  same start, end and changes, in random order, gets? (a permutation test,
  ``scipy.stats.permutation_test``, on the metric's first differences);
- :func:`difference_correlation`: do the changes correlate (change vs change)?
- :func:`partial_correlation`: does it remain once a control series is accounted for?
- :func:`pearson_interval`: how wide is Pearson's 95% interval over so few points?
- :func:`too_small` and :func:`verdict`: the answer in words, "cannot tell" included.

Inputs are 1-D float arrays of equal length n, one value per checkpoint in step order.

Example (a metric whose changes follow the score's; 6 checkpoints: 120 orderings)::

    >>> score = [0.1, 0.2, 0.25, 0.5, 0.55, 0.9]
    >>> metric = [3.0, 2.0, 1.6, -0.8, -1.1, -4.6]
    >>> test = trend_preserving_test(metric, score)
    >>> print(f"{test.statistic:.3f}", test.pvalue, test.exact, f"{test.min_pvalue:.4f}")
    -1.000 0.008333333333333333 True 0.0083
    >>> verdict(test.pvalue, test.min_pvalue, n=6)
    'survives the trend-preserving null (p=0.0083)'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .errors import InputError

ALPHA = 0.05  # the level a verdict tests at
N_RESAMPLES = 9999  # random orderings when the (n-1)! orderings of the changes are more
SEED = 0  # fixed: a report is the same on every run
CONFIDENCE = 0.95
MIN_CHECKPOINTS = 5  # fewer: too few to tell, whatever the p-value
MIN_GROUP_SIZE = 20  # samples; a group mean of fewer is too noisy to headline


@dataclass(frozen=True)
class TrendTest:
    """Result of :func:`trend_preserving_test`.

    Attributes:
        statistic: Pearson r of the two series' levels.
        pvalue: permutation p-value of |r| against the trend-preserving null.
        min_pvalue: the smallest p-value this test can return with these many
            checkpoints (exact: 1/(n-1)!; random: 1/(resamples+1)); above the level,
            no data could make it significant.
        exact: every ordering of the changes was enumerated.
        resamples: orderings compared (including the observed one when exact).
    """

    statistic: float
    pvalue: float
    min_pvalue: float
    exact: bool
    resamples: int


def trend_preserving_test(x, y, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> TrendTest:
    """Pearson r of ``x`` and ``y`` against surrogates of ``x`` that keep its trend.

    A surrogate of ``x`` starts at ``x[0]`` and adds ``x``'s first differences in a
    random order, so it has the same start, end and increments: the same net trend and
    roughness, with the timing of its changes drawn at random. The p-value says how
    often a surrogate correlates with ``y`` at least as strongly as ``x`` does
    (|r| >= the observed |r|): a correlation only its trend explains is matched by
    many surrogates. Null hypothesis: the order of ``x``'s changes is unrelated to
    ``y`` (its changes are exchangeable, as a random walk's are). ``y`` is held fixed;
    checkpoints count as equally spaced.

    The (n-1)! orderings are enumerated when they are at most ``n_resamples`` (up to 8
    checkpoints by default), else ``n_resamples`` random ones are drawn with ``seed``.
    ``scipy.stats.permutation_test`` (``permutation_type="pairings"`` on one sample
    permutes its elements) does both.

    Args:
        x: the metric, n >= 3 values, not constant.
        y: the score, n values, not constant.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    centred = y - y.mean()
    unit_y = centred / np.sqrt(centred @ centred)

    def strength_of_reintegrated(changes, axis=-1):  # changes: [..., n-1] -> |r|: [...]
        changes = np.moveaxis(changes, axis, -1)
        levels = np.concatenate([np.zeros(changes.shape[:-1] + (1,)),
                                 np.cumsum(changes, axis=-1)], axis=-1)  # x - x[0]
        levels = levels - levels.mean(axis=-1, keepdims=True)
        return np.abs(levels @ unit_y) / np.sqrt(np.einsum("...i,...i->...", levels, levels))

    result = stats.permutation_test((np.diff(x),), strength_of_reintegrated,
                                    permutation_type="pairings", vectorized=True,
                                    n_resamples=n_resamples, alternative="greater",
                                    rng=np.random.default_rng(seed))
    orderings = math.factorial(len(x) - 1)
    exact = n_resamples >= orderings
    smallest = 1 / orderings if exact else 1 / (n_resamples + 1)
    return TrendTest(float(stats.pearsonr(x, y).statistic), float(result.pvalue), smallest,
                     exact, len(result.null_distribution))


def difference_correlation(x, y) -> tuple[float, float]:
    """Pearson r of the first differences (change vs change) and its two-sided p-value.

    Differencing removes a shared trend: two random walks have independent changes even
    when their levels correlate. The p-value is ``scipy.stats.pearsonr``'s on the n-1
    changes (it assumes they are independent). NaN when n < 4 or a series of changes is
    constant (to rounding: a straight-line series).

    ``difference_correlation([0, 1, 3, 6], [0, 2, 6, 12])`` has r = 1: changes 1, 2, 3 and
    2, 4, 6 are proportional.
    """
    dx, dy = np.diff(np.asarray(x, float)), np.diff(np.asarray(y, float))
    if len(dx) < 3 or _is_constant(dx) or _is_constant(dy):
        return math.nan, math.nan
    result = stats.pearsonr(dx, dy)
    return float(result.statistic), float(result.pvalue)


def partial_correlation(x, y, controls) -> tuple[float, float]:
    """Partial correlation of ``x`` and ``y`` given ``controls``, and its two-sided p-value.

    Both series are fitted by least squares on an intercept and the controls
    (``numpy.linalg.lstsq``); the result is ``scipy.stats.pearsonr`` of the residuals.
    The p-value is Student's t with n - 2 - k degrees of freedom (k controls), not
    pearsonr's n - 2: each control fitted costs one. Like Pearson's it assumes
    independent checkpoints. NaN when n < k + 3 or a residual series is zero (``x`` or
    ``y`` is a linear function of the controls, e.g. the metric is the control).

    Args:
        controls: [n] (one control) or [n, k].
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    controls = np.asarray(controls, float).reshape(len(x), -1 if len(x) else 1)
    design = np.column_stack([np.ones(len(x)), controls])
    degrees = len(x) - 1 - design.shape[1]  # n - 2 - k
    if degrees < 1:
        return math.nan, math.nan
    residuals = [v - design @ np.linalg.lstsq(design, v, rcond=None)[0] for v in (x, y)]
    if any(_is_constant(r, scale=v) for r, v in zip(residuals, (x, y), strict=True)):
        return math.nan, math.nan
    r = float(stats.pearsonr(*residuals).statistic)
    t = r * math.sqrt(degrees / max(1.0 - r * r, 1e-300))
    return r, float(2 * stats.t.sf(abs(t), degrees))


def _is_constant(values: np.ndarray, scale: np.ndarray | None = None) -> bool:
    """True when ``values`` vary by no more than float rounding of ``scale`` (default: the
    values themselves): a correlation with them would be one with rounding noise."""
    scale = values if scale is None else scale
    return bool(np.ptp(values) <= 1e-12 * max(1.0, float(np.abs(scale).max())))


def pearson_interval(x, y, level: float = CONFIDENCE) -> tuple[float, float]:
    """Pearson's ``level`` confidence interval (``scipy.stats.pearsonr(...)
    .confidence_interval``: Fisher's z, which assumes independent bivariate-normal
    checkpoints; trending series break that, so read it as a lower bound on the
    uncertainty). With 3 checkpoints it is (-1, 1)."""
    interval = stats.pearsonr(np.asarray(x, float), np.asarray(y, float)).confidence_interval(
        level)
    return float(interval.low), float(interval.high)


def check_limits(min_checkpoints: int, min_group_size: int) -> None:
    """InputError unless both thresholds of :func:`too_small` are integers >= 1."""
    for name, value in (("min_checkpoints", min_checkpoints),
                        ("min_group_size", min_group_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{name} must be a whole number of at least 1 (got {value!r}); "
                             f"pass {flag} 1 or more")


def too_small(n: int, group_size: float | None, min_checkpoints: int = MIN_CHECKPOINTS,
              min_group_size: int = MIN_GROUP_SIZE) -> str | None:
    """Why a correlation over ``n`` checkpoints of a group of ``group_size`` samples is too
    small to headline, or None. An unknown size (None or NaN) is not held against it.

    >>> too_small(4, 3)
    'too few checkpoints (4 < 5) and group too small (3 < 20 samples)'
    >>> too_small(5, None) is None
    True
    """
    reasons = []
    if n < min_checkpoints:
        reasons.append(f"too few checkpoints ({n} < {min_checkpoints})")
    if group_size is not None and not math.isnan(group_size) and group_size < min_group_size:
        reasons.append(f"group too small ({group_size:g} < {min_group_size} samples)")
    return " and ".join(reasons) or None


def verdict(pvalue: float, min_pvalue: float, n: int, small: str | None = None,
            note: str | None = None, alpha: float = ALPHA, qvalue: float | None = None,
            tests: int | None = None) -> str:
    """The trend-preserving test's answer in words.

    Args:
        pvalue, min_pvalue: from :func:`trend_preserving_test` (NaN when not run).
        n: checkpoints correlated.
        small: :func:`too_small`'s reason, if any: the answer is "cannot tell".
        note: why no correlation could be computed, if so.
        qvalue, tests: the false-discovery-adjusted p-value over ``tests`` correlations,
            when several were tested.

    >>> verdict(0.4, 0.0002, 10)
    'indistinguishable from a shared trend (p=0.4)'
    >>> verdict(0.33, 0.33, 4, small="too few checkpoints (4 < 5)")
    'too few checkpoints (4 < 5): cannot tell (trend-preserving p=0.33)'
    >>> verdict(0.17, 0.17, 4)
    'cannot tell: with 4 checkpoints the trend-preserving p cannot go below 0.17 > 0.05'
    >>> verdict(0.01, 0.0002, 10, qvalue=0.2, tests=20)
    'survives the trend-preserving null (p=0.01) but not the correction for 20 tests (q=0.2)'
    """
    if note is not None:
        return f"cannot tell: {note}"
    if small is not None:
        return f"{small}: cannot tell (trend-preserving p={pvalue:.2g})"
    if min_pvalue > alpha:
        return (f"cannot tell: with {n} checkpoints the trend-preserving p cannot go below "
                f"{min_pvalue:.2g} > {alpha:g}")
    if pvalue > alpha:
        return f"indistinguishable from a shared trend (p={pvalue:.2g})"
    words = f"survives the trend-preserving null (p={pvalue:.2g})"
    if qvalue is not None and not math.isnan(qvalue) and qvalue > alpha:
        words += f" but not the correction for {tests} tests (q={qvalue:.2g})"
    return words


def false_discovery(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``) of
    the finite ``pvalues``; NaN stays NaN."""
    pvalues = np.asarray(pvalues, float)
    adjusted = np.full_like(pvalues, np.nan)
    finite = np.isfinite(pvalues)
    if finite.any():
        adjusted[finite] = stats.false_discovery_control(pvalues[finite], method="bh")
    return adjusted

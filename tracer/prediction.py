"""Beyond correlation over time: do a metric's changes predict the score's next change,
and do metrics move in the order the scores do? Pooled over several runs.

A correlation over one run's checkpoints cannot separate a metric that tracks the score
from one that shares its clock (docs/method.md, "Statistics"). With several runs (seeds)
and several series per run (domains), two further questions can be asked
(docs/method.md, "Prediction across runs"):

- :func:`prediction_test`: does the change of a predictor (a metric, or training loss)
  over the last ``window`` checkpoints predict the change of the score over the next
  ``window`` (lagged first differences), better than the step alone? Pooled linear
  models (``numpy.linalg.lstsq``) scored out of sample, leaving one run out at a time;
  the null keeps each series' own changes of the predictor and draws their timing at
  random (the pooled form of :func:`.significance.trend_preserving_test`).
- :func:`order_test`: within a run, is the order in which series' metrics move (the step
  at which each has covered half of its net change) the order in which their scores
  move? Kendall's tau per run, averaged, against every assignment of the metric's steps
  to the series of each run.

Inputs are :class:`Series`: one per (run, series), values in step order.

Example (two runs of two series whose metric falls one checkpoint before the score
rises; window 1)::

    >>> import numpy as np
    >>> def series(run, name, rise):
    ...     score = np.clip(np.arange(12) - rise, 0, 4) / 4
    ...     metric = -np.clip(np.arange(12) - rise + 1, 0, 4) / 4
    ...     return Series(run, name, np.arange(12) * 100, score, {"metric": metric})
    >>> runs = [series(r, d, rise) for r in "ab" for d, rise in (("x", 2), ("y", 5))]
    >>> result = prediction_test(runs, "metric", resamples=999)
    >>> print(f"{result.r2:.2f} {result.r2_step:.2f} {result.pvalue:.3f}")
    1.00 0.02 0.001
    >>> order_test(runs, "metric").mean_tau
    1.0
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from .errors import InputError

N_RESAMPLES = 9999
SEED = 0  # fixed: a study reads the same on every run
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Series:
    """One score trajectory and its predictors, over the same checkpoints.

    Attributes:
        run: the training run (seed) it comes from; runs are left out one at a time.
        name: which series of the run (e.g. the domain).
        steps: [n] training steps, increasing.
        score: [n] the score (e.g. the domain's held-out accuracy).
        predictors: name -> [n] values (metrics, training loss).
    """

    run: str
    name: str
    steps: np.ndarray
    score: np.ndarray
    predictors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PredictionResult:
    """:func:`prediction_test`'s answer for one predictor.

    Attributes:
        predictor, window: what was tested.
        rows, series, runs: lagged pairs pooled, series contributing, runs left out in turn.
        r2: out-of-sample R^2 of the model step + predictor change (1 - SSE / SST, SST
            around the pooled mean change; negative: worse than that mean).
        r2_step: the same for the step alone.
        gain: r2 - r2_step.
        gain_low, gain_high: a bootstrap interval of ``gain`` over series (percentile).
        pvalue: share of null surrogates (the predictor's changes in random order within
            each series) with a gain at least as large; never 0.
        resamples: surrogates drawn.
        coefficient: the predictor's slope in the model fitted on every row (score change
            per standard deviation of the series' predictor changes).
    """

    predictor: str
    window: int
    rows: int
    series: int
    runs: int
    r2: float
    r2_step: float
    gain: float
    gain_low: float
    gain_high: float
    pvalue: float
    resamples: int
    coefficient: float


def lagged_changes(values: np.ndarray, window: int) -> np.ndarray:
    """[n - 2 * window] the change over the ``window`` checkpoints before each checkpoint k
    that has ``window`` checkpoints on both sides: ``values[k] - values[k - window]``."""
    return values[window:len(values) - window] - values[:len(values) - 2 * window]


def following_changes(values: np.ndarray, window: int) -> np.ndarray:
    """[n - 2 * window] the change over the ``window`` checkpoints after each such k:
    ``values[k + window] - values[k]``."""
    return values[2 * window:] - values[window:len(values) - window]


def prediction_test(series: Sequence[Series], predictor: str, window: int = 1,
                    resamples: int = N_RESAMPLES, seed: int = SEED,
                    level: float = CONFIDENCE) -> PredictionResult:
    """Does ``predictor``'s change over the last ``window`` checkpoints predict the score's
    change over the next ``window``, beyond the step? (see the module docstring).

    Per series and checkpoint k with ``window`` checkpoints on both sides: response
    ``score[k + w] - score[k]``; the step model's regressors are an intercept and the
    step (scaled to [0, 1] by the largest step); the full model adds the predictor's
    change ``x[k] - x[k - w]``, z-scored within the series (so one pooled slope reads
    "per typical change of that series", whatever the metric's scale in each domain).
    Both are fitted by least squares on every run but one and scored on the run left out.

    Null: within each series the predictor's one-checkpoint changes are exchangeable and
    unrelated to the score: a surrogate permutes them, sums them again from the same
    start, and is differenced, z-scored and scored like the predictor.

    Raises:
        InputError: fewer than two runs with lagged rows, a window < 1, or a series
            without the predictor.
    """
    if window < 1:
        raise InputError(f"window {window} must be at least 1 checkpoint")
    usable = [s for s in series if len(s.steps) >= 2 * window + 1]
    missing = [f"{s.run}/{s.name}" for s in usable if predictor not in s.predictors]
    if missing:
        raise InputError(f"series {', '.join(missing[:3])} have no {predictor!r} values")
    runs = sorted({s.run for s in usable})
    if len(runs) < 2:
        raise InputError(f"prediction needs lagged rows from at least two runs (found "
                         f"{len(runs)}); use more runs or checkpoints, or a smaller window")
    scale = max(float(s.steps.max()) for s in usable) or 1.0
    response = np.concatenate([following_changes(s.score.astype(float), window)
                               for s in usable])
    base = np.concatenate([np.column_stack([np.ones(len(s.steps) - 2 * window),
                                            s.steps[window:len(s.steps) - window] / scale])
                           for s in usable])
    fold = np.concatenate([np.full(len(s.steps) - 2 * window, runs.index(s.run))
                           for s in usable])
    owner = np.concatenate([np.full(len(s.steps) - 2 * window, i)
                            for i, s in enumerate(usable)])

    def changes(increments: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([_zscore(lagged_changes(np.concatenate([[0.0], np.cumsum(d)]),
                                                      window)) for d in increments])

    increments = [np.diff(s.predictors[predictor].astype(float)) for s in usable]
    step_errors = _cv_errors(base, response, fold)
    total = float(np.sum((response - response.mean()) ** 2))
    observed = changes(increments)
    errors = _cv_errors(np.column_stack([base, observed]), response, fold)
    r2_step, r2 = 1 - step_errors.sum() / total, 1 - errors.sum() / total
    rng = np.random.default_rng(seed)
    null = np.array([1 - _cv_errors(np.column_stack([base, changes(
        [rng.permutation(d) for d in increments])]), response, fold).sum() / total
        for _ in range(resamples)]) - r2_step
    gain = r2 - r2_step
    low, high = _gain_interval(step_errors - errors, (response - response.mean()) ** 2, owner,
                               level, seed)
    slope = np.linalg.lstsq(np.column_stack([base, observed]), response, rcond=None)[0][-1]
    return PredictionResult(predictor, window, len(response), len(usable), len(runs),
                            float(r2), float(r2_step), float(gain), low, high,
                            float((1 + np.sum(null >= gain - 1e-12)) / (resamples + 1)),
                            resamples, float(slope))


def _zscore(values: np.ndarray) -> np.ndarray:
    """``values`` centred and divided by their standard deviation (centred only when it
    is 0: a series whose predictor does not change carries no information)."""
    centred = values - values.mean()
    spread = centred.std()
    return centred / spread if spread > 0 else centred


def _cv_errors(design: np.ndarray, response: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """[rows] squared errors of least-squares predictions, each row predicted by the model
    fitted on the other folds (runs)."""
    errors = np.empty(len(response))
    for k in np.unique(fold):
        held = fold == k
        coef = np.linalg.lstsq(design[~held], response[~held], rcond=None)[0]
        errors[held] = (response[held] - design[held] @ coef) ** 2
    return errors


def _gain_interval(saved: np.ndarray, spread: np.ndarray, owner: np.ndarray, level: float,
                   seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(saved) / sum(spread), resampling whole series
    (``owner``): the rows of one series are not independent."""
    per_saved = np.bincount(owner, saved)
    per_spread = np.bincount(owner, spread)
    if len(per_saved) < 2:
        return math.nan, math.nan

    def ratio(a, b, axis=-1):
        return a.sum(axis=axis) / b.sum(axis=axis)

    result = stats.bootstrap((per_saved, per_spread), ratio, paired=True, vectorized=True,
                             confidence_level=level, method="percentile",
                             n_resamples=N_RESAMPLES, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def half_change_step(steps: np.ndarray, values: np.ndarray) -> float:
    """The step at which ``values`` first reach the midpoint of their first and last value
    (linear interpolation between checkpoints); NaN when they end where they start.

    >>> half_change_step(np.array([0, 10, 20, 30]), np.array([0.0, 0.2, 0.8, 1.0]))
    15.0
    """
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    change = values[-1] - values[0]
    if len(values) < 2 or change == 0 or not np.isfinite(change):
        return math.nan
    progress = (values - values[0]) / change  # 0 at the start, 1 at the end
    k = int(np.argmax(progress >= 0.5))
    if k == 0:
        return float(steps[0])
    before, after = progress[k - 1], progress[k]
    return float(steps[k - 1] + (0.5 - before) / (after - before) * (steps[k] - steps[k - 1]))


@dataclass(frozen=True)
class OrderResult:
    """:func:`order_test`'s answer for one metric.

    Attributes:
        metric: the metric tested.
        taus: run -> Kendall's tau between the series' metric and score half-change steps.
        mean_tau: their mean (1: the same order in every run).
        pvalue: share of assignments of each run's metric steps to its series (every one
            enumerated when at most ``N_RESAMPLES``, else drawn) with a mean tau at least
            as large; the observed assignment counts.
        steps: run -> series -> (metric half-change step, score half-change step).
    """

    metric: str
    taus: dict[str, float]
    mean_tau: float
    pvalue: float
    steps: dict[str, dict[str, tuple[float, float]]]


def order_test(series: Sequence[Series], metric: str, seed: int = SEED) -> OrderResult:
    """Do the series of each run reach half of their metric's net change in the order they
    reach half of their score's? (see the module docstring).

    A metric can rise or fall: only its own first and last values define its midpoint.
    Series whose metric or score does not change are left out; a run with fewer than two
    series left has no tau.
    """
    steps: dict[str, dict[str, tuple[float, float]]] = {}
    for s in series:
        pair = (half_change_step(s.steps, s.predictors[metric]), half_change_step(s.steps,
                                                                                  s.score))
        if all(map(np.isfinite, pair)):
            steps.setdefault(s.run, {})[s.name] = pair
    runs = {run: pairs for run, pairs in steps.items() if len(pairs) >= 2}
    if not runs:
        return OrderResult(metric, {}, math.nan, math.nan, steps)
    columns = [np.array(list(pairs.values())) for pairs in runs.values()]  # [series, 2]
    taus = {run: _tau(c[:, 0], c[:, 1]) for run, c in zip(runs, columns, strict=True)}
    observed = float(np.mean(list(taus.values())))
    orderings = [list(itertools.permutations(range(len(c)))) for c in columns]
    exact = math.prod(len(o) for o in orderings) <= N_RESAMPLES
    if exact:
        draws = itertools.product(*orderings)
    else:
        rng = np.random.default_rng(seed)
        draws = ([rng.permutation(len(c)) for c in columns] for _ in range(N_RESAMPLES))
    null = np.array([np.mean([_tau(c[list(order), 0], c[:, 1])
                              for c, order in zip(columns, draw, strict=True)])
                     for draw in draws])
    hits = int(np.sum(null >= observed - 1e-12))
    pvalue = hits / len(null) if exact else (1 + hits) / (len(null) + 1)
    return OrderResult(metric, taus, observed, float(pvalue), steps)


def _tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (0 when either side is all ties)."""
    tau = stats.kendalltau(a, b).statistic
    return 0.0 if np.isnan(tau) else float(tau)

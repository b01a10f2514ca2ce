"""Prediction and order across runs: hand-checked pieces, the null's calibration, its power."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from moepath.tracer import prediction as prediction_module
from moepath.tracer.errors import InputError
from moepath.tracer.prediction import (
    Series,
    following_changes,
    half_change_step,
    lagged_changes,
    order_test,
    prediction_test,
)

STEPS = np.arange(12) * 100


def logistic(rise: float) -> np.ndarray:
    """A held-out accuracy curve rising around checkpoint ``rise``."""
    return 1 / (1 + np.exp(-(np.arange(12) - rise)))


def test_doctests():
    assert doctest.testmod(prediction_module).failed == 0


def test_lagged_and_following_changes_pair_the_past_and_the_next_window():
    values = np.array([0.0, 1.0, 3.0, 6.0, 10.0])
    # k = 1, 2, 3 have a checkpoint on both sides: past changes 1, 2, 3; next 2, 3, 4
    assert lagged_changes(values, 1).tolist() == [1.0, 2.0, 3.0]
    assert following_changes(values, 1).tolist() == [2.0, 3.0, 4.0]
    # k = 2 only: past 3 - 0, next 10 - 3
    assert lagged_changes(values, 2).tolist() == [3.0]
    assert following_changes(values, 2).tolist() == [7.0]


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.2, 0.8, 1.0], 15.0),     # the midpoint 0.5 is crossed between steps 10 and 20
    ([5.0, 4.0, 2.0, 1.0], 15.0),     # a falling metric: its own start and end define it
    ([0.0, 0.5, 0.6, 1.0], 10.0),     # reached exactly at a checkpoint
    ([0.0, 1.0, 0.2, 1.0], 5.0),      # the first crossing counts
    ([1.0, 2.0, 0.0, 1.0], np.nan),   # ends where it starts: no net change
])
def test_half_change_step_is_hand_checked(values, expected):
    assert half_change_step(np.array([0, 10, 20, 30]), np.array(values)) == pytest.approx(
        expected, nan_ok=True)


def runs_of(runs=3, rises=(2.0, 5.0, 8.0), seed=0):
    """Series of ``runs`` runs x len(rises) domains (no metric yet), and the random generator
    that drew their rises, for :func:`with_metric`."""
    rng = np.random.default_rng(seed)
    return [Series(str(r), f"d{i}", STEPS, logistic(rise + rng.normal(0, 0.5)),
                   {"m": None}) for r in range(runs) for i, rise in enumerate(rises)], rng


def with_metric(series, rng, metric_of):
    """``series`` with metric ``m`` = ``metric_of(score, rng)``."""
    return [Series(s.run, s.name, s.steps, s.score, {"m": metric_of(s.score, rng)})
            for s in series]


def test_a_random_walk_metric_is_rejected_at_about_the_level():
    """The null holds exactly for a random walk: its rejection rate is near 5%."""
    pvalues = []
    for repetition in range(40):
        series, rng = runs_of(seed=repetition)
        walks = with_metric(series, rng, lambda score, rng: np.cumsum(rng.normal(size=12)))
        pvalues.append(prediction_test(walks, "m", resamples=199).pvalue)
    assert 0.0 <= np.mean(np.array(pvalues) <= 0.05) <= 0.15
    assert 0.35 <= np.median(pvalues) <= 0.65  # roughly uniform


def test_a_metric_that_moves_one_checkpoint_before_the_score_is_found():
    series, rng = runs_of(seed=1)
    leading = with_metric(series, rng, lambda score, rng: -np.concatenate(
        [score[1:], [score[-1]]]) + rng.normal(0, 0.02, 12))
    result = prediction_test(leading, "m", resamples=199)
    assert result.pvalue == pytest.approx(1 / 200)
    assert result.gain > 0.3 and result.gain_low > 0
    assert result.coefficient < 0  # the metric falls as the score is about to rise
    assert (result.rows, result.series, result.runs) == (3 * 3 * 10, 9, 3)


def test_a_wider_window_pairs_fewer_rows():
    series, rng = runs_of(seed=2)
    walks = with_metric(series, rng, lambda score, rng: np.cumsum(rng.normal(size=12)))
    assert prediction_test(walks, "m", window=2, resamples=9).rows == 9 * 8


def test_order_test_enumerates_every_assignment_of_three_domains_in_three_runs():
    series, rng = runs_of(seed=3)
    same = with_metric(series, rng, lambda score, rng: 2 - score)  # moves with its score
    result = order_test(same, "m")
    assert result.mean_tau == 1.0
    assert result.pvalue == pytest.approx(1 / 6 ** 3)  # only the observed assignment
    reverse = [Series(s.run, s.name, s.steps, s.score, {"m": s.score[::-1].copy()})
               for s in series]
    assert order_test(reverse, "m").mean_tau == -1.0
    assert order_test(reverse, "m").pvalue == 1.0


def test_order_test_leaves_out_series_whose_metric_does_not_change():
    series, rng = runs_of(runs=1, seed=4)
    flat = with_metric(series, rng, lambda score, rng: np.ones(12))
    result = order_test(flat, "m")
    assert result.taus == {} and np.isnan(result.mean_tau) and np.isnan(result.pvalue)


def test_prediction_needs_two_runs_and_says_so():
    series, rng = runs_of(runs=1, seed=5)
    walks = with_metric(series, rng, lambda score, rng: np.cumsum(rng.normal(size=12)))
    with pytest.raises(InputError, match=r"^prediction needs lagged rows from at least two "
                                         r"runs \(found 1\); use more runs or checkpoints, or "
                                         r"a smaller window$"):
        prediction_test(walks, "m")
    with pytest.raises(InputError, match="window 0 must be at least 1 checkpoint"):
        prediction_test(walks, "m", window=0)
    with pytest.raises(InputError, match=r"series 0/d0, 0/d1, 0/d2 have no 'loss' values"):
        prediction_test(walks, "loss")

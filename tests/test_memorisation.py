"""Memorisation: the loss matrix, t* against hand-computed cases and a naive reference, groups."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepath.tracer import memorisation as memorisation_module
from moepath.tracer.errors import InputError, MetricError
from moepath.tracer.memorisation import (
    TOLERANCE,
    epsilon_from_quantile,
    loss_matrix,
    memorisation_groups,
    memorise,
    memorised_from,
)

STEPS = [0, 1000, 2000, 3000, 4000]
# epsilon 1.0, delta 0.05; t* by hand:
LOSSES = pd.DataFrame(
    [
        [5.0, 0.9, 0.8, 0.8, 0.8],  # 0.9 is low but 0.1 from the final 0.8: settled from 2000
        [3.0, 0.5, 2.0, 0.7, 0.7],  # dips below epsilon at 1000, rises at 2000: from 3000
        [4.0, 3.0, 2.0, 1.5, 1.2],  # never below epsilon: never
        [0.5, 0.52, 0.48, 0.5, 0.5],  # low and within delta throughout: from 0
    ],
    index=pd.Index(["a", "b", "c", "d"], name="sample_id"),
    columns=STEPS,
)
T_STAR = [2000, 3000, None, 0]


def naive_memorised_from(losses: pd.DataFrame, epsilon: float, delta: float) -> list:
    """Per sample: walk back from the final checkpoint while both conditions hold."""
    result = []
    for row in losses.itertuples(index=False):
        final, t_star = row[-1], None
        for step, loss in reversed(list(zip(losses.columns, row, strict=True))):
            low = loss <= epsilon + TOLERANCE
            settled = abs(loss - final) <= delta + TOLERANCE
            if not (low and settled):  # NaN fails both
                break
            t_star = step
        result.append(t_star)
    return result


def as_list(t_star: pd.Series) -> list:
    return [None if pd.isna(v) else int(v) for v in t_star]


def test_hand_computed_matrix():
    t_star = memorised_from(LOSSES, epsilon=1.0, delta=0.05)
    assert as_list(t_star) == T_STAR
    assert t_star.dtype == "Int64" and t_star.name == "t_star"
    assert t_star.index.equals(LOSSES.index)


def test_a_loss_equal_to_epsilon_is_low():
    # b settles at exactly 0.7; a at 0.8 is now too high
    assert as_list(memorised_from(LOSSES, epsilon=0.7)) == [None, 3000, None, 0]


@pytest.mark.parametrize(
    ("loss", "final", "delta", "settled"),
    [
        (1.05, 1.00, 0.05, True),  # 1.05 - 1.00 = 0.050000000000000044 in binary: on the boundary
        (0.95, 1.00, 0.05, True),  # below the final loss by delta
        (1.06, 1.00, 0.05, False),
        (0.94, 1.00, 0.05, False),
        (0.75, 0.5, 0.25, True),  # exact in binary
        (0.75, 0.5, 0.0, False),
        (0.5, 0.5, 0.0, True),  # delta 0 accepts only the final loss itself
    ],
)
def test_delta_boundary(loss, final, delta, settled):
    losses = pd.DataFrame([[loss, final]], columns=[10, 20])
    assert as_list(memorised_from(losses, epsilon=2.0, delta=delta)) == [10 if settled else 20]


def test_nan_breaks_the_stretch_and_a_nan_final_loss_is_never_memorised():
    losses = pd.DataFrame([[0.5, np.nan, 0.5], [0.5, 0.5, np.nan]], columns=[1, 2, 3])
    assert as_list(memorised_from(losses, epsilon=1.0)) == [3, None]


loss_values = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0, math.nan])


@settings(max_examples=150, deadline=None)
@given(
    data=st.integers(1, 6).flatmap(
        lambda t: st.lists(st.lists(loss_values, min_size=t, max_size=t), min_size=1, max_size=8)),
    epsilon=st.sampled_from([0.0, 0.5, 1.0, 1.5]),
    delta=st.sampled_from([0.0, 0.25, 0.5, 5.0]),
)
def test_matches_naive_reference(data, epsilon, delta):
    # values on a binary grid make the boundaries exact, so ties are tested too
    steps = [10 * (i + 1) for i in range(len(data[0]))]
    losses = pd.DataFrame(data, columns=steps)
    assert as_list(memorised_from(losses, epsilon, delta)) == naive_memorised_from(
        losses, epsilon, delta)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), epsilon=st.floats(0.0, 3.0), delta=st.floats(0.0, 1.0))
def test_matches_naive_reference_on_random_floats(seed, epsilon, delta):
    rng = np.random.default_rng(seed)
    losses = pd.DataFrame(rng.uniform(0, 3, (20, 7)).round(2), columns=range(0, 700, 100))
    assert as_list(memorised_from(losses, epsilon, delta)) == naive_memorised_from(
        losses, epsilon, delta)


def long_frame() -> pd.DataFrame:
    """LOSSES in the long format of compare.losses, checkpoints in scrambled order."""
    frame = LOSSES.rename(columns=lambda step: f"step{step}").reset_index().melt(
        id_vars="sample_id", var_name="checkpoint", value_name="loss")
    frame["step"] = frame["checkpoint"].str.removeprefix("step").astype(int)
    return frame.sample(frac=1, random_state=0)[["checkpoint", "step", "sample_id", "loss"]]


def test_loss_matrix_orders_checkpoints_by_step():
    matrix = loss_matrix(long_frame())
    pd.testing.assert_frame_equal(matrix, LOSSES, check_names=False)
    assert matrix.columns.dtype == np.int64 and matrix.index.name == "sample_id"


def test_loss_matrix_fills_missing_samples_with_nan():
    frame = long_frame()
    frame = frame[~((frame["sample_id"] == "a") & (frame["step"] == 1000))]
    assert np.isnan(loss_matrix(frame).loc["a", 1000])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns="loss"), r"lacks columns \['loss'\]"),
        (lambda f: f.iloc[:0], "loss frame is empty"),
        (lambda f: f.assign(loss=f["loss"].astype(object).where(f["sample_id"] != "a", "x")),
         r"losses must be numbers, got \['x'"),
        (lambda f: pd.concat([f, f.iloc[:1]]), "samples appear twice in one checkpoint"),
        (lambda f: f.assign(step=f["step"].where(f["checkpoint"] != "step0", 1000)),
         "got two checkpoints for one step"),
        (lambda f: f.assign(step=f["step"].where(f["sample_id"] != "a", 7)),
         "got two steps for one checkpoint"),
        (lambda f: f.assign(step=f["step"] + 0.5), "steps must be integers"),
    ],
)
def test_loss_matrix_refuses_bad_frames(change, message):
    with pytest.raises(MetricError, match=message):
        loss_matrix(change(long_frame()))


def test_epsilon_from_quantile():
    assert epsilon_from_quantile(pd.Series([1.0, 2.0, 3.0, 4.0, 5.0, np.nan]), 0.25) == 2.0
    with pytest.raises(InputError, match=r"quantile 1.5 is outside \(0, 1\)"):
        epsilon_from_quantile(pd.Series([1.0]), 1.5)
    with pytest.raises(MetricError, match="no sample has a final loss"):
        epsilon_from_quantile(pd.Series([np.nan]), 0.25)


def test_memorise_default_is_the_quarter_quantile_of_final_losses():
    # final losses 0.8, 0.7, 1.2, 0.5: the 0.25 quantile is 0.65, so only d (0.5) qualifies
    result = memorise(LOSSES)
    assert result.epsilon == pytest.approx(0.65)
    assert (result.epsilon_source, result.delta) == ("quantile 0.25", 0.05)
    assert as_list(result.t_star) == [None, None, None, 0]
    assert result.fraction_memorised == 0.25


def test_memorise_explicit_and_quantile():
    explicit = memorise(LOSSES, epsilon=1.0)
    assert (explicit.epsilon_source, explicit.fraction_memorised) == ("explicit", 0.75)
    assert as_list(explicit.t_star) == T_STAR
    by_quantile = memorise(LOSSES, quantile=0.75, delta=0.1)
    assert by_quantile.epsilon_source == "quantile 0.75"
    assert by_quantile.epsilon == pytest.approx(0.9)
    assert as_list(by_quantile.t_star) == [1000, 3000, None, 0]


def test_memorise_per_domain_takes_the_quantile_of_each_domain():
    # final losses: a 0.8 and c 1.2 (domain x), b 0.7 and d 0.5 (domain y); the median of
    # each domain memorises a and d (one median over all, 0.75, memorises b and d)
    domains = pd.Series({"a": "x", "b": "y", "c": "x", "d": "y"})
    result = memorise(LOSSES, quantile=0.5, domains=domains)
    assert result.epsilon is None
    assert result.epsilon_by_domain == pytest.approx({"x": 1.0, "y": 0.6})
    assert as_list(result.t_star) == [2000, None, None, 0]
    # each sample is judged by its own domain's epsilon, as by the naive reference
    for domain, epsilon in result.epsilon_by_domain.items():
        rows = LOSSES[domains.reindex(LOSSES.index) == domain]
        expected = naive_memorised_from(rows, epsilon, 0.05)
        assert as_list(result.t_star[rows.index]) == expected
    assert as_list(memorise(LOSSES, quantile=0.5).t_star) == [None, 3000, None, 0]


def test_memorise_per_domain_with_an_explicit_epsilon_or_unlabelled_samples():
    domains = pd.Series({"a": "x", "b": "x"})  # c and d have no label
    assert memorise(LOSSES, epsilon=1.0, domains=domains).epsilon_by_domain is None
    losses = LOSSES.copy()
    losses.loc["c", 4000] = np.nan  # the "(missing)" domain keeps d's final loss only
    result = memorise(losses, domains=domains)
    assert result.epsilon_by_domain == pytest.approx({"(missing)": 0.5, "x": 0.725})
    assert as_list(result.t_star) == [None, 3000, None, 2000]  # d's 0.52 at 1000 > 0.5


def test_memorised_from_takes_one_epsilon_per_sample():
    t_star = memorised_from(LOSSES, np.array([0.7, 0.7, 1.0, np.nan]))
    assert as_list(t_star) == [None, 3000, None, None]  # NaN: never memorised
    with pytest.raises(InputError, match="got 2 epsilons for 4 samples"):
        memorised_from(LOSSES, np.array([1.0, 1.0]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epsilon": 1.0, "quantile": 0.2}, "pass one of them"),
        ({"epsilon": math.nan}, "epsilon nan is not a finite number"),
        ({"epsilon": 1.0, "delta": -0.1}, "delta -0.1 is negative"),
        ({"quantile": 0.0}, r"quantile 0.0 is outside \(0, 1\)"),
    ],
)
def test_memorise_refuses_bad_options(options, message):
    with pytest.raises(InputError, match=message):
        memorise(LOSSES, **options)


def test_memorised_from_refuses_a_matrix_without_step_columns():
    with pytest.raises(MetricError, match="columns must be increasing integer steps"):
        memorised_from(LOSSES.rename(columns=str), epsilon=1.0)
    with pytest.raises(MetricError, match="columns must be increasing integer steps"):
        memorised_from(LOSSES[STEPS[::-1]], epsilon=1.0)


def test_groups_by_t_star_and_label():
    t_star = memorised_from(LOSSES, epsilon=1.0)
    assert memorisation_groups(t_star).tolist() == ["t*=2000", "t*=3000", None, "t*=0"]
    domain = pd.Series({"d": "code", "a": "math", "c": "math"})  # b has no label
    groups = memorisation_groups(t_star, domain)
    assert groups.tolist() == ["t*=2000/math", "t*=3000/(missing)", None, "t*=0/code"]
    assert groups.index.equals(t_star.index) and groups.name == "group"


def test_doctests():
    assert doctest.testmod(memorisation_module).failed == 0

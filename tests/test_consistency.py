"""Pathway consistency: hand-computed routings, the degenerate case, and a math-module reference."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from moepath.tracer import consistency as consistency_module
from moepath.tracer.consistency import routing_consistency, summarise
from moepath.tracer.errors import MetricError


def naive_sample(g, router_weights) -> tuple[list[float], float]:
    """docs/method.md Metric 2 for one sample [L, E]: (cosines, complexity), in plain Python."""
    embeddings = []
    for layer, w in enumerate(router_weights):
        experts, hidden = len(w), len(w[0])
        embeddings.append(
            [
                sum(float(g[layer][k]) * float(w[k][h]) for k in range(experts))
                for h in range(hidden)
            ]
        )
    cosines = []
    for a, b in zip(embeddings[:-1], embeddings[1:], strict=True):
        norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        cosines.append(dot / norms if norms > 0 else 0.0)
    if not cosines:
        return cosines, math.nan
    peak = max(cosines)
    return cosines, 1 - sum(c / (peak + 1e-8) for c in cosines) / len(cosines)


@st.composite
def routings(draw):
    """(distributions [N, L, E], router matrices L x [E, hidden]), some layers all zero."""
    n, layers, experts, hidden = (draw(st.integers(1, b)) for b in (4, 5, 6, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = rng.dirichlet(np.ones(experts), (n, layers))
    if draw(st.booleans()):
        g[rng.integers(n), rng.integers(layers)] = 0.0  # a zero embedding
    weights = [rng.normal(size=(experts, hidden)).astype(np.float32) for _ in range(layers)]
    return g.astype(np.float32), weights


def eye_routing(*rows) -> tuple[np.ndarray, list[np.ndarray]]:
    """One sample routed to ``rows`` (one [E] row per layer) through identity routers."""
    g = np.array([rows], dtype=np.float64)
    return g, [np.eye(g.shape[2])] * g.shape[1]


# --- hand-computed routings --------------------------------------------------------------------


def test_same_routing_in_every_layer_is_fully_consistent():
    result = routing_consistency(*eye_routing([0.7, 0.3], [0.7, 0.3], [0.7, 0.3], [0.7, 0.3]))
    np.testing.assert_allclose(result.cosines, [[1.0, 1.0, 1.0]])
    assert result.complexity[0] == pytest.approx(1e-8, rel=1e-6)  # 1 - 1 / (1 + 1e-8)
    assert result.consistency[0] == pytest.approx(1.0)
    assert not result.degenerate


def test_orthogonal_layer_halves_consistency():
    result = routing_consistency(*eye_routing([1, 0], [1, 0], [0, 1]))
    np.testing.assert_allclose(result.cosines, [[1.0, 0.0]])
    assert result.complexity[0] == pytest.approx(0.5)  # 1 - (1 + 0) / 2
    assert result.consistency[0] == pytest.approx(0.5)


def test_ratios_are_to_the_samples_own_best_cosine():
    # cosines 0.6 and 0.8 (3-4-5 triangles): 1 - (0.6 / 0.8 + 0.8 / 0.8) / 2 = 0.125
    result = routing_consistency(*eye_routing([0.6, 0.8], [1, 0], [0.8, 0.6]))
    np.testing.assert_allclose(result.cosines, [[0.6, 0.8]])
    assert result.complexity[0] == pytest.approx(0.125, rel=1e-7)


def test_all_negative_cosines_are_kept_literal():
    g = np.full((1, 3, 2), 0.5)
    weights = [np.eye(2), -np.eye(2), np.eye(2)]  # each layer's embedding flips the last
    result = routing_consistency(g, weights)
    np.testing.assert_allclose(result.cosines, [[-1.0, -1.0]])
    assert result.complexity[0] == pytest.approx(-1e-8, rel=1e-6)  # ratios -1 / (-1 + 1e-8) > 1


def test_zero_embedding_has_cosine_zero():
    result = routing_consistency(*eye_routing([0.5, 0.5], [0.0, 0.0], [0.5, 0.5]))
    np.testing.assert_array_equal(result.cosines, [[0.0, 0.0]])
    assert result.complexity[0] == 1.0  # 1 - mean(0 / 1e-8)


# --- the degenerate case -----------------------------------------------------------------------


def test_two_layers_are_flagged_degenerate_whatever_the_routing():
    rng = np.random.default_rng(0)
    g = rng.dirichlet(np.ones(8), (50, 2))
    result = routing_consistency(g, [rng.normal(size=(8, 16)) for _ in range(2)])
    assert result.degenerate
    assert result.cosines.shape == (50, 1)
    assert np.all(np.abs(result.complexity) < 1e-6)  # C = 1 - c / (c + 1e-8), about 0


def test_one_layer_has_no_cosine():
    result = routing_consistency(np.full((3, 1, 4), 0.25), [np.eye(4)])
    assert result.degenerate
    assert result.cosines.shape == (3, 0)
    assert np.isnan(result.complexity).all() and np.isnan(result.consistency).all()


# --- fast path against the reference -----------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(routings())
def test_routing_consistency_matches_naive_reference(routing):
    g, weights = routing
    result = routing_consistency(g, weights)
    for sample, cosines, complexity in zip(g, result.cosines, result.complexity, strict=True):
        expected_cosines, expected_complexity = naive_sample(sample, weights)
        np.testing.assert_allclose(cosines, expected_cosines, rtol=1e-9, atol=1e-12)
        assert complexity == pytest.approx(expected_complexity, rel=1e-9, abs=1e-12, nan_ok=True)
    np.testing.assert_array_equal(result.consistency, 1.0 - result.complexity)
    assert result.cosines.dtype == result.complexity.dtype == np.float64
    assert result.degenerate == (g.shape[1] < 3)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([np.eye(3)] * 2, "got 2 router matrices for 3 MoE layers"),
        (
            [np.eye(3), np.ones((4, 3)), np.eye(3)],
            r"layer 1 has shape \(4, 3\); expected \(3, hidden\)",
        ),
        ([np.eye(3), np.eye(3), np.ones(3)], r"layer 2 has shape \(3,\)"),
        ([np.eye(3), np.ones((3, 5)), np.eye(3)], "layer 1 has hidden size 5 but layer 0 has 3"),
    ],
)
def test_bad_router_matrices_are_refused(weights, message):
    with pytest.raises(MetricError, match=message):
        routing_consistency(np.full((2, 3, 3), 1 / 3), weights)


def test_docstring_examples_hold():
    assert doctest.testmod(consistency_module).failed == 0


def test_summary_equals_numpy_and_scipy_on_the_per_sample_values():
    rng = np.random.default_rng(7)
    g = rng.dirichlet(np.full(6, 0.3), (50, 4))
    weights = [rng.normal(size=(6, 5)) for _ in range(4)]  # random routers: some max cos <= 0
    result = routing_consistency(g, weights)
    summary = summarise(result)
    values = result.consistency
    assert summary.mean == pytest.approx(np.mean(values))
    assert summary.median == pytest.approx(np.median(values))
    ordered = np.sort(values)[5:-5]  # 10% of 50 cut from each end
    assert summary.trimmed_mean == pytest.approx(ordered.mean())
    assert summary.trimmed_mean == pytest.approx(stats.trim_mean(values, 0.1))
    share = np.mean([max(naive_sample(g[i], weights)[0]) <= 0 for i in range(len(g))])
    assert 0 < summary.nonpositive_share == pytest.approx(share)
    assert summary.layer_cosines == pytest.approx(
        [np.mean([naive_sample(g[i], weights)[0][layer] for i in range(len(g))])
         for layer in range(3)])


def test_summary_of_one_layer_is_empty():
    summary = summarise(routing_consistency(np.full((3, 1, 2), 0.5), [np.eye(2)]))
    assert np.isnan(summary.mean) and summary.layer_cosines == []

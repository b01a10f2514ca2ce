"""Pathways: hand-computed cuts, the paper's serialisation, and agreement with a naive reference."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepath.tracer import pathways as pathways_module
from moepath.tracer.errors import MetricError
from moepath.tracer.pathways import (
    SEPARATOR,
    Pathway,
    pathways,
    select_experts,
    topk_to_distribution,
)


def naive_select(distribution, tau: float) -> Pathway:
    """docs/method.md step 3 in plain loops: rank, add experts until the share exceeds tau."""
    layers = []
    for row in distribution:
        weights = [max(float(w), 0.0) for w in row]  # negative scores count as zero
        ranked = sorted(range(len(weights)), key=lambda k: (-weights[k], k))
        total = 0.0
        for k in ranked:
            total += weights[k]
        kept, cumulative = [], 0.0
        for k in ranked:
            if weights[k] == 0:  # zero-weight experts are never kept
                break
            kept.append(k)
            cumulative += weights[k]
            if cumulative > tau * total:  # the crossing expert is kept
                break
        layers.append(tuple(kept))
    return Pathway(tuple(layers))


def naive_topk(expert_ids, gate_weights, num_experts: int) -> list[list[float]]:
    tokens, layers, top_k = np.shape(expert_ids)
    out = [[0.0] * num_experts for _ in range(layers)]
    for t in range(tokens):
        for layer in range(layers):
            for slot in range(top_k):
                out[layer][int(expert_ids[t][layer][slot])] += float(gate_weights[t][layer][slot])
    return [[value / tokens for value in row] for row in out]


@st.composite
def distributions(draw, max_experts: int = 12):
    """Random [N, L, E] float32 distributions; quantised ones are full of ties and zeros."""
    shape = (
        draw(st.integers(1, 5)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, max_experts)),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.dirichlet(np.full(shape[-1], draw(st.sampled_from([0.1, 1.0, 10.0]))), shape[:2])
    if draw(st.booleans()):
        values = np.round(values * 8) / 8  # multiples of 1/8: ties, zeros, exact sums
        values[..., 0] += values.sum(-1) == 0  # keep every layer's total above zero
    return values.astype(np.float32)


taus = st.one_of(st.sampled_from([0.5, 0.6, 0.7, 0.75, 0.8, 1.0]), st.floats(0.01, 1.0))


# --- hand-computed cuts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "tau", "kept"),
    [
        ([0.5, 0.3, 0.2], 0.7, (0, 1)),  # 0.5, then 0.8 > 0.7
        ([0.2, 0.3, 0.5], 0.7, (2, 1)),  # rank order, not index order
        ([0.8, 0.1, 0.1], 0.7, (0,)),  # the first expert alone crosses
        ([0.5, 0.25, 0.25], 0.75, (0, 1, 2)),  # 0.75 reaches tau but does not exceed it
        ([0.25, 0.25, 0.25, 0.25], 0.6, (0, 1, 2)),  # four-way tie: lower indices first
        ([0.1, 0.4, 0.1, 0.4], 0.5, (1, 3)),  # tie at the top: 1 before 3
        ([0.6, 0.0, 0.4, 0.0], 1.0, (0, 2)),  # tau 1: every nonzero expert, never a zero one
        ([0.3, 0.3, 0.4], 1.0, (2, 0, 1)),
        ([2.0, 1.0, 1.0], 0.5, (0, 1)),  # unnormalised rows are cut at a share of their total
        # sigmoid + selection bias can dip below zero: a negative score weighs nothing (total
        # 1.0, so 0.6 + 0.3 crosses 0.7; counted, the total 0.8 would stop at 0.6 > 0.56)
        ([0.6, -0.2, 0.3, 0.1], 0.7, (0, 2)),
        ([0.5, -0.1, -0.3], 1.0, (0,)),
    ],
)
def test_select_experts_hand_computed(weights, tau, kept):
    assert select_experts([weights], tau).layers == (kept,)


def test_tau_one_survives_float_rounding():
    # Ten 0.1s sum to 0.9999999999999999 in float64, so "cumulative weight exceeds 1" never
    # fires: tau 1 keeps exactly the nonzero experts instead.
    path = select_experts([[0.1] * 10 + [0.0]], tau=1.0)
    assert path.layers == (tuple(range(10)),)


def test_every_layer_picking_the_same_experts():
    g = np.tile(np.array([0.1, 0.6, 0.3], dtype=np.float32), (1, 4, 1))  # [1, 4, 3]
    (path,) = pathways(g, tau=0.7)
    assert path.to_string() == "1,2-1,2-1,2-1,2"
    assert path.lengths() == (2, 2, 2, 2)


def test_more_than_256_experts():
    weights = np.zeros(300, dtype=np.float32)
    weights[[299, 257, 3]] = [0.5, 0.3, 0.2]
    path = select_experts([weights], tau=0.7)
    assert path.to_string() == "299,257"


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.01, float("nan"), True, "0.7"])
def test_tau_outside_unit_interval_is_refused(tau):
    with pytest.raises(MetricError, match=r"is outside \(0, 1\]"):
        pathways(np.full((1, 1, 2), 0.5), tau)


@pytest.mark.parametrize(
    ("distributions", "message"),
    [
        (np.full((2, 3), 0.5), r"shape \(2, 3\); expected \[samples, layers, experts\]"),
        (np.full((1, 0, 3), 0.5), r"at least one layer and expert"),
        ([[[0.5, float("inf")]]], "NaN or infinite"),
        ([[[0.5, float("nan")]]], "NaN or infinite"),
        ([[[0.5, 0.5]], [[0.0, 0.0]]], "sample 1 has zero routing weight in layer 0"),
        ([[[0.5, 0.5]], [[-0.1, 0.0]]], "sample 1 has zero routing weight in layer 0"),
    ],
)
def test_bad_distributions_are_refused(distributions, message):
    with pytest.raises(MetricError, match=message):
        pathways(distributions, 0.7)


def test_no_samples_give_no_pathways():
    assert pathways(np.zeros((0, 16, 64), dtype=np.float32)) == []


# --- serialisation -----------------------------------------------------------------------------


def test_pathway_serialises_like_the_paper():
    path = Pathway(((3, 1, 5), (9, 1), (12,)))
    assert path.to_string() == "3,1,5-9,1-12"
    assert path.tokens() == (3, 1, 5, SEPARATOR, 9, 1, SEPARATOR, 12)
    assert path.lengths() == (3, 2, 1)
    assert path.n_experts == 6
    assert Pathway.parse("3,1,5-9,1-12") == path


@pytest.mark.parametrize("text", ["", "3,,1", "3-x", "3,1-"])
def test_parse_refuses_malformed_text(text):
    with pytest.raises(MetricError, match="is not expert ids joined by ','"):
        Pathway.parse(text)


# --- topk source -------------------------------------------------------------------------------


def test_topk_scatters_and_averages_over_tokens():
    ids = np.array([[[0, 2], [1, 0]], [[2, 1], [1, 3]]], dtype=np.uint8)  # T=2, L=2, k=2
    weights = np.array([[[0.6, 0.4], [0.7, 0.3]], [[0.5, 0.5], [0.9, 0.1]]], dtype=np.float16)
    result = topk_to_distribution(ids, weights, num_experts=4)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, [[0.3, 0.25, 0.45, 0.0], [0.15, 0.8, 0.0, 0.05]], rtol=1e-3)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 3), st.integers(1, 300))
def test_topk_matches_naive_reference(seed, tokens, layers, experts):
    rng = np.random.default_rng(seed)
    top_k = min(experts, 4)
    ids = np.stack(
        [[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(tokens)]
    )
    weights = rng.random((tokens, layers, top_k)).astype(np.float16)
    np.testing.assert_allclose(
        topk_to_distribution(ids, weights, experts), naive_topk(ids, weights, experts), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("ids", "num_experts", "message"),
    [
        (np.zeros((2, 1)), 4, "must share one shape"),
        (np.zeros((0, 1, 2)), 4, "at least one token"),
        (np.full((1, 1, 2), 4), 4, r"outside \[0, 4\); pass the model's number"),
    ],
)
def test_topk_refuses_bad_input(ids, num_experts, message):
    with pytest.raises(MetricError, match=message):
        topk_to_distribution(ids, np.ones(np.shape(ids)), num_experts)


# --- fast path against the reference -----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(distributions(), taus)
def test_pathways_match_naive_reference(g, tau):
    assert pathways(g, tau) == [naive_select(sample, tau) for sample in g]


@settings(max_examples=20, deadline=None)
@given(distributions(max_experts=400), taus)
def test_pathways_match_naive_reference_with_many_experts(g, tau):
    assert pathways(g, tau) == [naive_select(sample, tau) for sample in g]


def test_pathways_are_the_same_in_chunks(monkeypatch):
    g = np.random.default_rng(0).dirichlet(np.ones(8), (50, 3)).astype(np.float32)
    whole = pathways(g)
    monkeypatch.setattr(pathways_module, "_CHUNK_WEIGHTS", 7 * 3 * 8)  # chunks of 7 samples
    assert pathways(g) == whole


def test_docstring_examples_hold():
    assert doctest.testmod(pathways_module).failed == 0

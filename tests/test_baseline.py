"""Random-routing baseline: exact enumeration and a brute-force simulation agree with it."""

from __future__ import annotations

import doctest
import itertools
import random

import numpy as np
import pytest
from test_distance import naive_distance

from moepath.tracer import baseline as baseline_module
from moepath.tracer.baseline import excess_sharing, random_pathways, random_routing_baseline
from moepath.tracer.errors import MetricError
from moepath.tracer.pathways import Pathway


def ordered_subsets(experts: int, k: int):
    return list(itertools.permutations(range(experts), k))


def exact_expectation(first: tuple[int, ...], second: tuple[int, ...], experts: int,
                      unit: str) -> float:
    """E[D] of two random pathways with per-layer lengths ``first`` and ``second``, by
    enumerating every equally likely pair of ordered expert subsets."""
    def every(lengths):
        return [Pathway(layers) for layers in itertools.product(
            *(ordered_subsets(experts, k) for k in lengths))]
    a, b = every(first), every(second)
    return float(np.mean([naive_distance(p, q, unit, "none") for p in a for q in b]))


@pytest.mark.parametrize("unit", ["char", "expert"])
def test_two_samples_equal_the_enumerated_expectation(unit):
    group = [Pathway(((0,), (1, 2))), Pathway(((2, 1), (0,)))]  # lengths (1, 2) and (2, 1)
    exact = exact_expectation((1, 2), (2, 1), 3, unit)
    b = random_routing_baseline(group, num_experts=3, unit=unit, pairs=20_000, seed=1)
    assert abs(b.distance - exact) < 4 * b.stderr
    assert b.stderr < 0.02 * exact


def test_a_group_equals_a_brute_force_simulation():
    """Many independent draws of the whole group (random.sample, textbook Levenshtein),
    averaged over all pairs, against the baseline's pair-sampled estimate."""
    lengths = [(1, 3, 2), (2, 2, 1), (4, 1, 1), (1, 1, 5)]
    experts = 6
    group = [Pathway(tuple(tuple(range(k)) for k in ls)) for ls in lengths]
    rng = random.Random(0)
    means = []
    for _ in range(1500):
        drawn = [Pathway(tuple(tuple(rng.sample(range(experts), k)) for k in ls))
                 for ls in lengths]
        means.append(np.mean([naive_distance(p, q, "char", "none")
                              for p, q in itertools.combinations(drawn, 2)]))
    brute, brute_stderr = np.mean(means), np.std(means, ddof=1) / np.sqrt(len(means))
    b = random_routing_baseline(group, num_experts=experts, pairs=20_000, seed=2)
    assert abs(b.distance - brute) < 4 * np.hypot(b.stderr, brute_stderr)


def test_random_pathways_keep_lengths_and_draw_distinct_experts_uniformly():
    lengths = np.array([[1, 3], [2, 2]] * 2000)
    paths = random_pathways(lengths, 4, np.random.default_rng(0))
    assert [p.lengths() for p in paths] == [tuple(row) for row in lengths.tolist()]
    assert all(len(set(layer)) == len(layer) for p in paths for layer in p.layers)
    firsts = np.bincount([p.layers[1][0] for p in paths], minlength=4) / len(paths)
    assert np.allclose(firsts, 0.25, atol=0.03)  # the first-ranked expert is uniform


def test_seeded_and_excess_sharing():
    group = [Pathway(((0, 1), (2,))), Pathway(((3,), (1, 2)))] * 3
    one = random_routing_baseline(group, 8, seed=5)
    assert one == random_routing_baseline(group, 8, seed=5)
    assert one != random_routing_baseline(group, 8, seed=6)
    assert excess_sharing(3.0, 4.0) == 0.25
    assert excess_sharing(None, 4.0) is None and excess_sharing(3.0, 0.0) is None


def test_refuses_a_lone_pathway():
    with pytest.raises(MetricError, match="at least 2"):
        random_routing_baseline([Pathway(((0,),))], 4)


def test_docstrings():
    assert doctest.testmod(baseline_module).failed == 0


def test_the_baseline_scores_the_pathways_random_pathways_draws():
    """The fast path (arrays encoded directly) against Pathway objects and the textbook
    distance, drawn from the same generator state."""
    group = [Pathway(((0, 1), (2,), (4, 3, 1))), Pathway(((3,), (1, 2), (0,)))] * 2
    b = random_routing_baseline(group, 5, pairs=50, seed=4)
    rng = np.random.default_rng((4, baseline_module._STREAM))
    lengths = np.array([p.lengths() for p in group])
    first = rng.integers(0, 4, size=50)
    second = rng.integers(0, 3, size=50)
    second += second >= first
    a = random_pathways(lengths[first], 5, rng)
    c = random_pathways(lengths[second], 5, rng)
    naive = [naive_distance(p, q, "char", "none") for p, q in zip(a, c, strict=True)]
    assert b.distance == pytest.approx(np.mean(naive))

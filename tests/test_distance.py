"""Pathway distance: hand-computed pairs, a textbook Levenshtein reference, and pair sampling."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepath.tracer import distance as distance_module
from moepath.tracer.distance import (
    EXACT_MAX_SAMPLES,
    SAMPLED_PAIRS,
    distance_summary,
    group_distance,
    per_layer_distance,
    plan_pairs,
)
from moepath.tracer.errors import MetricError
from moepath.tracer.pathways import Pathway


def levenshtein(a, b) -> int:
    """Textbook dynamic programme: insertions, deletions and substitutions cost 1."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def naive_distance(p: Pathway, q: Pathway, unit: str, normalize: str) -> float:
    a, b = (p.to_string(), q.to_string()) if unit == "char" else (p.tokens(), q.tokens())
    d = levenshtein(a, b)
    return d / max(len(a), len(b)) if normalize == "max" else float(d)


def naive_group_mean(group: list[Pathway], unit: str, normalize: str) -> float:
    values = [naive_distance(p, q, unit, normalize) for p, q in itertools.combinations(group, 2)]
    return sum(values) / len(values)


def parse_all(*texts: str) -> list[Pathway]:
    return [Pathway.parse(text) for text in texts]


@st.composite
def groups(draw, max_size: int = 6):
    """2..max_size pathways of one model: same layer count, 1-5 experts a layer."""
    experts = draw(st.sampled_from([4, 20, 300]))
    layers = draw(st.integers(1, 4))
    layer = st.lists(st.integers(0, experts - 1), min_size=1, max_size=5, unique=True)
    pathway = st.lists(layer, min_size=layers, max_size=layers).map(
        lambda ls: Pathway(tuple(map(tuple, ls)))
    )
    return draw(st.lists(pathway, min_size=2, max_size=max_size))


def random_group(n: int, seed: int) -> list[Pathway]:
    rng = np.random.default_rng(seed)
    return [
        Pathway(
            tuple(
                tuple(rng.choice(16, rng.integers(1, 6), replace=False).tolist()) for _ in range(3)
            )
        )
        for _ in range(n)
    ]


# --- hand-computed pairs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "q", "chars", "experts"),
    [
        ("3,1-9", "3,1-9", 0, 0),  # identical pathways
        ("3,1-9", "3,12-9", 1, 1),  # char: insert "2"; expert: substitute 1 -> 12
        ("1,2-3", "1-3", 2, 1),  # char: delete ",2"; expert: delete 2
        ("7-7", "12-12", 4, 2),  # char: 7 -> 1 and insert 2, twice; expert: two substitutions
        ("10,2", "2,10", 4, 2),  # swapped experts
        ("5", "5-5", 2, 2),  # an extra layer costs its separator too
    ],
)
def test_pair_distance_hand_computed(p, q, chars, experts):
    group = parse_all(p, q)
    assert group_distance(group, unit="char").mean == chars
    assert group_distance(group, unit="expert").mean == experts


def test_normalize_max_divides_by_the_longer_pathway():
    group = parse_all("3,1-9", "3,12-9")  # 5 and 6 characters; 4 and 4 tokens
    assert group_distance(group, unit="char", normalize="max").mean == pytest.approx(1 / 6)
    assert group_distance(group, unit="expert", normalize="max").mean == pytest.approx(1 / 4)


def test_identical_pathways_are_at_distance_zero():
    result = group_distance(parse_all("3,1,5-9,1", "3,1,5-9,1", "3,1,5-9,1"))
    assert result == distance_module.DistanceResult(0.0, 0.0, 3, True, 3)


def test_group_mean_is_over_unordered_pairs():
    # pairs: (a, b) 1, (a, c) 2, (b, c) 1 characters
    result = group_distance(parse_all("1-2", "1-3", "1-34"))
    assert (result.mean, result.n_pairs, result.exact) == (pytest.approx(4 / 3), 3, True)


def test_more_than_256_experts_in_both_units():
    group = parse_all("255,256-300", "256,255-300", "299-1")
    for unit in ("char", "expert"):
        assert group_distance(group, unit=unit).mean == pytest.approx(
            naive_group_mean(group, unit, "none")
        )


def test_summary_reports_both_normalisations_from_one_pass():
    group = parse_all("3,1-9", "3,12-9")
    summary = distance_summary(group, unit="char")
    assert summary["none"].mean == 1.0
    assert summary["max"].mean == pytest.approx(1 / 6)


# --- fast path against the reference -----------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(groups(), st.sampled_from(["char", "expert"]), st.sampled_from(["none", "max"]))
def test_group_distance_matches_naive_reference(group, unit, normalize):
    result = group_distance(group, unit=unit, normalize=normalize)
    assert result.mean == pytest.approx(naive_group_mean(group, unit, normalize), rel=1e-12)
    assert (result.stderr, result.exact, result.n_samples) == (0.0, True, len(group))
    assert result.n_pairs == len(group) * (len(group) - 1) // 2


@settings(max_examples=60, deadline=None)
@given(groups(), st.sampled_from(["char", "expert"]), st.sampled_from(["none", "max"]))
def test_per_layer_distance_matches_naive_reference(group, unit, normalize):
    expected = [
        naive_group_mean([Pathway((p.layers[layer],)) for p in group], unit, normalize)
        for layer in range(len(group[0].layers))
    ]
    result = per_layer_distance(group, unit=unit, normalize=normalize)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, expected, rtol=1e-12)


def test_per_layer_distance_hand_computed():
    group = parse_all("3,1-9-4", "3,12-9-5,6", "3,1-8-4")
    # pairs (a, b), (a, c), (b, c) per layer:
    # "3,1" "3,12" "3,1" -> 1, 0, 1;  "9" "9" "8" -> 0, 1, 1;  "4" "5,6" "4" -> 3, 0, 3
    np.testing.assert_allclose(per_layer_distance(group), [2 / 3, 2 / 3, 2.0])


def test_exact_blocks_add_up_to_one_matrix(monkeypatch):
    group = random_group(23, seed=1)
    whole = distance_summary(group)
    monkeypatch.setattr(distance_module, "_BLOCK", 5)  # 5 diagonal and 10 off-diagonal blocks
    blocked = distance_summary(group)
    for key in ("none", "max"):
        assert blocked[key].mean == pytest.approx(whole[key].mean, rel=1e-12)


# --- sampled pairs -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("unit", ["char", "expert"])
def test_sampled_pairs_estimate_the_exact_mean(seed, unit):
    group = random_group(80, seed)  # 3160 unordered pairs
    exact = distance_summary(group, unit=unit)
    sampled = distance_summary(group, unit=unit, pairs=1500, seed=seed)
    for key in ("none", "max"):
        estimate = sampled[key]
        assert (estimate.exact, estimate.n_pairs, estimate.n_samples) == (False, 1500, 80)
        assert 0 < estimate.stderr < 0.1 * exact[key].mean
        assert abs(estimate.mean - exact[key].mean) < 4 * estimate.stderr


def test_more_pairs_shrink_the_standard_error():
    group = random_group(200, seed=0)
    errors = [group_distance(group, pairs=pairs).stderr for pairs in (500, 8000)]
    assert errors[1] == pytest.approx(errors[0] / 4, rel=0.25)  # 1 / sqrt(16)


def test_sampling_never_pairs_a_sample_with_itself():
    group = parse_all(*map(str, range(10)))  # every pair of distinct samples is 1 apart
    result = group_distance(group, pairs=40)
    assert (result.mean, result.stderr, result.exact) == (1.0, 0.0, False)


def test_sampling_is_seeded():
    group = random_group(60, seed=0)
    first, again, other = (group_distance(group, pairs=300, seed=s) for s in (7, 7, 8))
    assert first == again
    assert first.mean != other.mean


@pytest.mark.parametrize(
    ("n_samples", "pairs", "plan"),
    [
        (2, None, None),
        (EXACT_MAX_SAMPLES, None, None),
        (EXACT_MAX_SAMPLES + 1, None, SAMPLED_PAIRS),
        (100, 500, 500),
        (100, 4950, None),  # as many as there are pairs: the exact mean costs no more
        (5000, 5000 * 4999 // 2, None),  # how a caller forces exact on a large group
    ],
)
def test_plan_pairs_policy(n_samples, pairs, plan):
    assert plan_pairs(n_samples, pairs) == plan


# --- errors ------------------------------------------------------------------------------------


def test_group_of_one_is_refused_by_name():
    with pytest.raises(MetricError) as error:
        group_distance(parse_all("3,1-9"), name="math")
    assert str(error.value) == "group 'math' has 1 sample: pathway distance needs at least 2"


def test_empty_group_is_refused():
    with pytest.raises(MetricError, match="group 'code' has 0 samples"):
        per_layer_distance([], name="code")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unit": "chars"}, "unit 'chars' is not supported; choose one of: char, expert"),
        ({"normalize": "min"}, "normalize 'min' is not supported; choose one of: none, max"),
        ({"pairs": 1}, "pairs 1 is too few for a standard error"),
        ({"pairs": 2.5}, "pairs 2.5 is not an integer"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(MetricError, match=message):
        group_distance(parse_all("1", "2", "3"), **kwargs)


def test_per_layer_distance_refuses_mixed_layer_counts():
    with pytest.raises(MetricError, match=r"group 'g' mixes pathways of \[1, 2\] layers"):
        per_layer_distance(parse_all("1-2", "1"), name="g")


def test_docstring_examples_hold():
    assert doctest.testmod(distance_module).failed == 0


@pytest.mark.parametrize("unit", ["char", "expert"])
@pytest.mark.parametrize("count, layers, experts, keep", [
    (20, 3, 12, 5),  # two-digit expert names
    (5, 1, 1, 1),  # one layer of one expert
    (30, 16, 128, 25),  # OLMoE's depth, three-digit names
])
def test_encode_arrays_equals_encoding_pathways(unit, count, layers, experts, keep):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, keep + 1, size=(count, layers))
    experts = np.argsort(rng.random((count, layers, experts)), axis=-1)[..., :keep]
    paths = [Pathway(tuple(tuple(row[:k]) for row, k in zip(rows, ks, strict=True)))
             for rows, ks in zip(experts.tolist(), lengths.tolist(), strict=True)]
    assert distance_module.encode_arrays(experts, lengths, unit) == [
        distance_module._encode(p, unit) for p in paths]

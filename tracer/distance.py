"""Pathway distance: Levenshtein distance between samples' pathways, averaged over a group.

Implements docs/method.md, "Metric 1: pathway distance". D(i, j) is the edit
distance between two pathways, in one of two units (Decision A4):

- ``unit="char"`` (default, the paper's): edits of the serialised string
  ``Pathway.to_string()``, e.g. ``'3,1-9'``. OLMoE at tau 0.7 gives about 480-580.
- ``unit="expert"``: edits of ``Pathway.tokens()``, expert ids plus a layer
  separator, so replacing expert 7 by expert 12 costs 1, not 2.

``normalize="max"`` divides each pair's distance by the longer pathway's length
in the same unit (characters, or tokens including separators), giving values in
[0, 1]. A group's value is the mean over its unordered pairs: exact (all pairs,
through ``rapidfuzz.process.cdist``, whose bit-parallel Levenshtein costs
O(|s|^2 / 64) a pair) or estimated from uniformly sampled pairs with a standard
error; see :func:`plan_pairs` for the default policy.

Example::

    >>> from moepath.tracer.pathways import Pathway
    >>> group = [Pathway.parse(s) for s in ("3,1-9", "3,1-9", "3,12-9")]
    >>> group_distance(group).mean  # pairs: 0, 1 ("1" -> "12"), 1
    0.6666666666666666
    >>> group_distance(group, unit="expert", normalize="max").mean  # 0, 1/4, 1/4
    0.16666666666666666
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from .errors import MetricError
from .pathways import SEPARATOR, Pathway

UNITS = ("char", "expert")
NORMALIZATIONS = ("none", "max")
# Default policy (plan_pairs): all pairs up to this many samples (499,500 pairs; about 10 s
# for OLMoE-length char pathways on 2 cores), else SAMPLED_PAIRS uniformly sampled pairs.
EXACT_MAX_SAMPLES = 1000
SAMPLED_PAIRS = 200_000
# Exact mode compares blocks of this many pathways per cdist call: memory stays at
# _BLOCK**2 distances (16 MiB) whatever the group size, and a group that fits in one
# block is a single symmetric cdist call.
_BLOCK = 2000


@dataclass(frozen=True)
class DistanceResult:
    """A group's mean pathway distance.

    Attributes:
        mean: mean distance over unordered pairs, in the unit asked for (or in [0, 1]
            with ``normalize="max"``).
        stderr: standard error of ``mean`` as an estimate of the all-pairs mean; 0.0 when exact.
        n_pairs: pairs compared: n(n-1)/2 when exact, else the number sampled.
        exact: True when every unordered pair was compared.
        n_samples: pathways in the group.
    """

    mean: float
    stderr: float
    n_pairs: int
    exact: bool
    n_samples: int


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise :class:`MetricError` unless ``value`` is one of ``choices`` (an option's values)."""
    if value not in choices:
        raise MetricError(f"{what} {value!r} is not supported; choose one of: {', '.join(choices)}")


def check_pairs(pairs: int | None) -> None:
    """Raise :class:`MetricError` unless ``pairs`` is None or an int >= 2."""
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, Integral)):
        raise MetricError(f"pairs {pairs!r} is not an integer; pass a pair count or None")
    if pairs is not None and pairs < 2:
        raise MetricError(
            f"pairs {pairs} is too few for a standard error; sample at least 2 pairs "
            "or pass None for the default policy"
        )


def check_seed(seed: int) -> None:
    """Raise :class:`MetricError` unless ``seed`` is an int >= 0 (numpy refuses negative seeds)."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise MetricError(f"seed {seed!r} is not an integer >= 0; pass a seed such as 0")


ALL_PAIRS = 2**62  # as ``pairs``: more than any group has, so the exact mean is used


def plan_pairs(n_samples: int, pairs: int | None = None) -> int | None:
    """How a group of ``n_samples`` is measured: None for all pairs, else pairs to sample.

    ``pairs=None`` is the default policy: exact up to :data:`EXACT_MAX_SAMPLES`
    samples, else :data:`SAMPLED_PAIRS` sampled pairs (standard error about
    0.2% of the spread of pair distances). An explicit ``pairs`` samples that
    many, unless it reaches the number of unordered pairs: then the exact mean
    costs no more, and is returned instead (so ``pairs=n*(n-1)//2`` forces exact).

    Example::

        >>> plan_pairs(1000), plan_pairs(1001), plan_pairs(10, pairs=20), plan_pairs(10, pairs=45)
        (None, 200000, 20, None)
    """
    check_pairs(pairs)
    if pairs is None:
        return None if n_samples <= EXACT_MAX_SAMPLES else SAMPLED_PAIRS
    return None if pairs >= n_samples * (n_samples - 1) // 2 else int(pairs)


def group_distance(
    pathways: list[Pathway],
    unit: str = "char",
    normalize: str = "none",
    pairs: int | None = None,
    seed: int = 0,
    workers: int = -1,
    name: str = "group",
) -> DistanceResult:
    """Mean pathway distance of a group (docs/method.md Metric 1).

    Args:
        pathways: the group's pathways, at least 2.
        unit: "char" (edit the serialised string) or "expert" (edit expert tokens).
        normalize: "none" (raw edit distance) or "max" (divided by the longer pathway's length).
        pairs: None for the default policy, or a number of pairs to sample; see :func:`plan_pairs`.
        seed: seeds pair sampling: sampled pairs are drawn uniformly from ordered pairs
            (i, j), i != j, with replacement, which is uniform over unordered pairs.
        workers: CPU threads for rapidfuzz; -1 uses all cores.
        name: the group's name, used in error messages.

    Raises:
        MetricError: fewer than 2 pathways, or a bad option value.
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    return distance_summary(pathways, unit, pairs, seed, workers, name)[normalize]


def distance_summary(
    pathways: list[Pathway],
    unit: str = "char",
    pairs: int | None = None,
    seed: int = 0,
    workers: int = -1,
    name: str = "group",
) -> dict[str, DistanceResult]:
    """:func:`group_distance` for both normalisations, keyed "none" and "max", from one pass.

    Both come from the same pair distances, so reporting them side by side costs one.
    """
    return pair_distances(pathways, unit, pairs, seed, workers, name).summary


@dataclass(frozen=True)
class PairDistances:
    """A group's mean distances and the pair distances behind them (for bootstrap intervals).

    Attributes:
        summary: :func:`distance_summary`'s result, keyed "none" and "max".
        n_samples: n, the pathways of the group.
        matrix: float64 [n, n] raw distances (symmetric, zero diagonal) when every pair was
            compared and n <= ``_BLOCK`` (2000), else None.
        lengths: float64 [n], each pathway's length in the unit, with ``matrix``: a pair's
            normalised distance is its raw one over the longer length (at least 1).
        first, second, raw, normalized: int64 [P], int64 [P], float64 [P], float64 [P]:
            uniformly sampled pairs (i, j), i != j, and their distances, when ``matrix``
            is None: the pairs of a sampled estimate, or, for an exact group too large to
            keep its matrix, :data:`SAMPLED_PAIRS` pairs drawn (with ``seed``) for the
            interval only.
    """

    summary: dict[str, DistanceResult]
    n_samples: int
    matrix: np.ndarray | None = None
    lengths: np.ndarray | None = None
    first: np.ndarray | None = None
    second: np.ndarray | None = None
    raw: np.ndarray | None = None
    normalized: np.ndarray | None = None


def pair_distances(
    pathways: list[Pathway],
    unit: str = "char",
    pairs: int | None = None,
    seed: int = 0,
    workers: int = -1,
    name: str = "group",
) -> PairDistances:
    """:func:`distance_summary` and the pair distances it averaged (see :class:`PairDistances`).

    Arguments as in :func:`group_distance`.
    """
    check_choice("unit", unit, UNITS)
    _check_group(len(pathways), name)
    texts = [_encode(p, unit) for p in pathways]
    lengths = np.fromiter(map(len, texts), dtype=np.float64, count=len(texts))
    plan = plan_pairs(len(pathways), pairs)
    if plan is None and len(texts) <= _BLOCK:
        return _matrix(texts, lengths, workers)
    if plan is None:
        drawn = _sampled(texts, lengths, SAMPLED_PAIRS, seed, workers)
        return PairDistances(**{**drawn.__dict__, "summary": _exact(texts, lengths, workers)})
    return _sampled(texts, lengths, plan, seed, workers)


def paired_distances(
    first: list[Pathway], second: list[Pathway], unit: str = "char", workers: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """float64 [P] raw and [P] max-normalised distances of ``first[p]`` to ``second[p]``.

    Example::

        >>> raw, normalized = paired_distances([Pathway.parse("3,1-9")], [Pathway.parse("3,12-9")])
        >>> raw.tolist(), normalized.tolist()
        ([1.0], [0.16666666666666666])
    """
    check_choice("unit", unit, UNITS)
    return paired_encoded_distances([_encode(p, unit) for p in first],
                                    [_encode(p, unit) for p in second], workers)


def paired_encoded_distances(
    first: list[str], second: list[str], workers: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`paired_distances` of pathways already encoded (:func:`encode_arrays`)."""
    d = process.cpdist(first, second, scorer=Levenshtein.distance, dtype=np.int32,
                       workers=workers).astype(np.float64)
    longer = np.maximum(np.fromiter(map(len, first), np.float64, len(first)),
                        np.fromiter(map(len, second), np.float64, len(second)))
    return d, d / np.maximum(longer, 1)


def encode_arrays(experts: np.ndarray, lengths: np.ndarray, unit: str = "char") -> list[str]:
    """The strings whose edit distance is D in ``unit``, of pathways given as arrays.

    ``experts``: int [P, L, K], each layer's experts in rank order (only the first
    ``lengths[p, l]`` of row l count); ``lengths``: int [P, L], each >= 1. Equal to
    encoding ``Pathway`` objects of the same experts, without building them (the
    random-routing baseline draws thousands per group), as one fixed-width unicode array
    [P] built with numpy, so the cost does not grow with Python objects per expert.

    Example::

        >>> encode_arrays(np.array([[[3, 1], [9, 0]]]), np.array([[2, 1]]))
        ['3,1-9']
    """
    check_choice("unit", unit, UNITS)
    experts, lengths = np.asarray(experts), np.asarray(lengths)
    count, layers, width = experts.shape
    if count == 0:
        return []
    names, within, between = _expert_names(int(experts.max()) + 1, unit)
    # Each expert slot fills w + 1 code points: its name, then its separator, padded with a
    # filler code point that no name or separator uses; the filler is dropped at the end.
    filler = 1 + max(ord(c) for c in "".join(names) + within + between)
    within_code, between_code = (ord(c) if c else filler for c in (within, between))
    w = max(map(len, names))
    table = np.full((len(names), w + 1), filler, dtype=np.uint32)
    for e, name in enumerate(names):
        table[e, :len(name)] = [ord(c) for c in name]
    rank = np.arange(width)
    kept = rank < lengths[..., None]  # [P, L, K]
    last_in_layer = rank == lengths[..., None] - 1
    last_layer = (np.arange(layers) == layers - 1)[:, None]
    codes = table[experts]  # [P, L, K, w + 1]
    codes[..., w] = np.where(last_in_layer, np.where(last_layer, filler, between_code),
                             within_code)
    codes[~kept] = filler
    text = codes.reshape(count, -1).view(f"U{layers * width * (w + 1)}")[:, 0].tolist()
    pad = chr(filler)
    return [t.replace(pad, "") for t in text]


def _expert_names(num_experts: int, unit: str) -> tuple[list[str], str, str]:
    """(each expert's name, the within-layer and the between-layer separator) of
    ``unit``'s encoding, as :func:`_encode` writes it."""
    if unit == "char":
        return [str(e) for e in range(num_experts)], ",", "-"
    return [chr(e - SEPARATOR) for e in range(num_experts)], "", chr(0)  # SEPARATOR's code


def per_layer_distance(
    pathways: list[Pathway],
    unit: str = "char",
    normalize: str = "none",
    pairs: int | None = None,
    seed: int = 0,
    workers: int = -1,
    name: str = "group",
) -> np.ndarray:
    """float64 [L]: :func:`group_distance` of each layer's segment alone (docs/method.md Metric 1).

    Layer l's segment is the one-layer pathway of its experts (``'3,1'`` in char
    units, the expert ids without separators in expert units). Sampled
    estimates draw the same pairs for every layer. Arguments as in :func:`group_distance`.

    Example::

        >>> group = [Pathway.parse(s) for s in ("3,1-9", "3,12-9")]
        >>> per_layer_distance(group).tolist()
        [1.0, 0.0]

    Raises:
        MetricError: fewer than 2 pathways, pathways of different layer counts, or a bad option.
    """
    check_choice("unit", unit, UNITS)
    check_choice("normalize", normalize, NORMALIZATIONS)
    _check_group(len(pathways), name)
    layers = {len(p.layers) for p in pathways}
    if len(layers) > 1:
        raise MetricError(
            f"group {name!r} mixes pathways of {sorted(layers)} layers; per-layer distance "
            "compares samples of one model, so pass pathways with the same layer count"
        )
    plan = plan_pairs(len(pathways), pairs)
    means = [
        _summarise(_segments(pathways, layer, unit), plan, seed, workers)[normalize].mean
        for layer in range(layers.pop())
    ]
    return np.array(means)


def _check_group(n_samples: int, name: str) -> None:
    if n_samples < 2:
        noun = "sample" if n_samples == 1 else "samples"
        raise MetricError(
            f"group {name!r} has {n_samples} {noun}: pathway distance needs at least 2"
        )


def _encode(pathway: Pathway, unit: str) -> str:
    """The string whose Levenshtein distance is D in ``unit``.

    Expert units map each token to one code point (token - SEPARATOR: the
    separator to U+0000, expert e to U+(e+1)), a bijection, so string edits are
    token edits; rapidfuzz runs fastest on str.
    """
    if unit == "char":
        return pathway.to_string()
    return "".join([chr(token - SEPARATOR) for token in pathway.tokens()])


def _segments(pathways: list[Pathway], layer: int, unit: str) -> list[str]:
    """Each pathway's layer ``layer`` alone, encoded as a one-layer pathway."""
    return [_encode(Pathway((p.layers[layer],)), unit) for p in pathways]


def _summarise(
    texts: list[str], plan: int | None, seed: int, workers: int
) -> dict[str, DistanceResult]:
    lengths = np.fromiter(map(len, texts), dtype=np.float64, count=len(texts))
    if plan is None:
        return _exact(texts, lengths, workers)
    return _sampled(texts, lengths, plan, seed, workers).summary


def _matrix(texts: list[str], lengths: np.ndarray, workers: int) -> PairDistances:
    """All pairs of a group that fits one block, keeping the [n, n] distance matrix."""
    n = len(texts)
    # Passing the same list twice lets rapidfuzz compute one triangle and mirror it.
    d = process.cdist(texts, texts, scorer=Levenshtein.distance, dtype=np.int32,
                      workers=workers).astype(np.float64)
    normalized = d / np.maximum(np.maximum.outer(lengths, lengths), 1)
    total = n * (n - 1) // 2
    # Symmetric with a zero diagonal: the sum counts each pair twice (as in _exact).
    summary = {key: DistanceResult(0.5 * float(m.sum()) / total, 0.0, total, True, n)
               for key, m in (("none", d), ("max", normalized))}
    return PairDistances(summary, n, matrix=d, lengths=lengths)


def _exact(texts: list[str], lengths: np.ndarray, workers: int) -> dict[str, DistanceResult]:
    """All unordered pairs, as upper-triangle blocks of cdist matrices."""
    n = len(texts)
    sums = {"none": 0.0, "max": 0.0}
    for a in range(0, n, _BLOCK):
        for b in range(a, n, _BLOCK):
            rows = texts[a : a + _BLOCK]
            # Passing the same list twice lets rapidfuzz compute one triangle and mirror it.
            cols = rows if a == b else texts[b : b + _BLOCK]
            d = process.cdist(
                rows, cols, scorer=Levenshtein.distance, dtype=np.int32, workers=workers
            )
            # max(.., 1): two empty strings are at distance 0, normalised or not.
            longer = np.maximum.outer(lengths[a : a + _BLOCK], lengths[b : b + _BLOCK])
            longer = np.maximum(longer, 1)
            # A diagonal block is symmetric with a zero diagonal: it counts each pair twice.
            share = 0.5 if a == b else 1.0
            sums["none"] += share * float(d.sum(dtype=np.int64))
            sums["max"] += share * float((d / longer).sum())
    total = n * (n - 1) // 2
    return {key: DistanceResult(value / total, 0.0, total, True, n) for key, value in sums.items()}


def _sampled(
    texts: list[str], lengths: np.ndarray, pairs: int, seed: int, workers: int
) -> PairDistances:
    """``pairs`` pairs drawn uniformly from ordered pairs i != j, with replacement."""
    n = len(texts)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, size=pairs)
    second = rng.integers(0, n - 1, size=pairs)
    second += second >= first  # skip i itself: uniform over the n - 1 others
    d = process.cpdist(
        [texts[i] for i in first],
        [texts[j] for j in second],
        scorer=Levenshtein.distance,
        dtype=np.int32,
        workers=workers,
    )
    d = d.astype(np.float64)
    longer = np.maximum(np.maximum(lengths[first], lengths[second]), 1)
    normalized = d / longer
    return PairDistances({"none": _estimate(d, n), "max": _estimate(normalized, n)}, n,
                         first=first, second=second, raw=d, normalized=normalized)


def _estimate(values: np.ndarray, n_samples: int) -> DistanceResult:
    stderr = float(values.std(ddof=1) / np.sqrt(len(values)))
    return DistanceResult(float(values.mean()), stderr, len(values), False, n_samples)

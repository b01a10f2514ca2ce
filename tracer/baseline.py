"""Random-routing baseline: the pathway distance of samples whose routing shares nothing.

Implements docs/method.md "Random-routing baseline". Pathway distance grows with
pathway length (longer strings are further apart), and lengths change across
checkpoints as routing sharpens or flattens; a raw distance says nothing about
sharing until it is set against what pathways *of the same lengths* give by
chance. The baseline keeps each sample's number of experts per layer and
replaces the experts by a uniformly random ordered subset of that size of the
layer's E experts, drawn independently for every sample:

    baseline = mean over the group's unordered pairs (i, j) of E[D(R_i, R_j)]

where R_i is such a random pathway with sample i's per-layer lengths. The
expectation of an edit distance has no closed form, so it is estimated by seeded
simulation: :data:`BASELINE_PAIRS` pairs (i, j), i != j, drawn uniformly, each with
a fresh R_i and R_j; the mean is unbiased and its standard error is reported.
The same seed at every checkpoint (common random numbers) makes the change of the
baseline between checkpoints follow the change of lengths, not simulation noise.

``excess_sharing = 1 - distance / baseline``: 0 when pathways share no more than
random routing of the same lengths, 1 when every pathway is the same, negative when
samples are further apart than chance.

Example::

    >>> from moepath.tracer.pathways import Pathway
    >>> group = [Pathway.parse("0-1"), Pathway.parse("1-0")]
    >>> b = random_routing_baseline(group, num_experts=1)  # one expert: every draw is "0-0"
    >>> b.distance, b.stderr
    (0.0, 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .distance import UNITS, check_choice, encode_arrays, paired_encoded_distances
from .errors import MetricError
from .pathways import Pathway

BASELINE_PAIRS = 2000
# Random keys per chunk of pathway draws: [pairs, L, E] holds at most this many (32 MiB).
_CHUNK_KEYS = 1 << 22
_STREAM = 37  # the baseline's random stream: default_rng((seed, _STREAM))


@dataclass(frozen=True)
class Baseline:
    """Expected pathway distance under random routing of the same per-layer lengths.

    Attributes:
        distance, stderr: the mean raw distance of random pathway pairs, and its
            standard error as an estimate of the expectation (simulation noise only).
        normalized_distance: the same, each pair divided by its longer pathway's length.
        n_pairs: simulated pairs.
    """

    distance: float
    stderr: float
    normalized_distance: float
    n_pairs: int


def excess_sharing(distance: float | None, baseline: float | None) -> float | None:
    """``1 - distance / baseline``; None when either is missing or the baseline is 0."""
    if distance is None or baseline is None or baseline == 0:
        return None
    return 1.0 - distance / baseline


def random_pathways(lengths: np.ndarray, num_experts: int,
                    rng: np.random.Generator) -> list[Pathway]:
    """One random pathway per row of ``lengths`` (int [P, L], experts kept per layer).

    Layer l of pathway p holds ``lengths[p, l]`` distinct experts of ``num_experts``, a
    uniformly random ordered subset (the first entries of a random permutation).
    """
    experts = _random_experts(lengths, num_experts, rng)
    return [Pathway(tuple(tuple(row[:k]) for row, k in zip(rows, ks, strict=True)))
            for rows, ks in zip(experts.tolist(), lengths.tolist(), strict=True)]


def random_routing_baseline(
    pathways: list[Pathway],
    num_experts: int,
    unit: str = "char",
    pairs: int = BASELINE_PAIRS,
    seed: int = 0,
    workers: int = -1,
) -> Baseline:
    """The random-routing baseline of a group of at least 2 pathways (see the module doc).

    Draws the same pathways as :func:`random_pathways` (same generator, same order),
    encoded straight from arrays (``distance.encode_arrays``).

    Raises:
        MetricError: fewer than 2 pathways, different layer counts, or a bad unit.
    """
    check_choice("unit", unit, UNITS)
    if len(pathways) < 2 or len({len(p.layers) for p in pathways}) > 1:
        raise MetricError("the random-routing baseline needs at least 2 pathways of one "
                          "layer count")
    lengths = np.array([p.lengths() for p in pathways], dtype=np.int64)  # [n, L]
    rng = np.random.default_rng((seed, _STREAM))
    n = len(pathways)
    first = rng.integers(0, n, size=pairs)
    second = rng.integers(0, n - 1, size=pairs)
    second += second >= first  # uniform over the n - 1 others
    a, b = (encode_arrays(_random_experts(lengths[rows], num_experts, rng), lengths[rows], unit)
            for rows in (first, second))
    raw, normalized = paired_encoded_distances(a, b, workers)
    stderr = float(raw.std(ddof=1) / np.sqrt(pairs)) if pairs > 1 else float("nan")
    return Baseline(float(raw.mean()), stderr, float(normalized.mean()), pairs)


def _random_experts(lengths: np.ndarray, num_experts: int,
                    rng: np.random.Generator) -> np.ndarray:
    """int [P, L, K]: per row of ``lengths`` [P, L], each layer's first K = max length
    experts of a uniformly random permutation of ``num_experts``."""
    count, layers = lengths.shape
    if count and (lengths.max() > num_experts or lengths.min() < 0):
        raise MetricError(f"per-layer lengths span {lengths.min()}..{lengths.max()}, outside "
                          f"[0, {num_experts}]; pass the experts kept per layer")
    keep = max(1, int(lengths.max())) if count else 1
    chunk = max(1, _CHUNK_KEYS // max(1, layers * num_experts))
    parts = [np.argsort(rng.random((min(chunk, count - start), layers, num_experts)),
                        axis=-1)[..., :keep] for start in range(0, count, chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, layers, keep), dtype=np.int64)

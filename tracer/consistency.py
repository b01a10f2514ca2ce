"""Pathway consistency: how smoothly a sample's routing moves from layer to layer.

Implements docs/method.md, "Metric 2: pathway consistency". Layer l's routing
embedding is e_l = g_l @ W_l: the sample's expert distribution g_l [E] mixing
the rows of the layer's router matrix W_l [E, hidden] (expert embeddings, as the
served model computes its logits with them). With c_l = cos(e_l, e_{l+1}) for l = 1..L-1:

    complexity  = 1 - mean_l( c_l / (max_l' c_l' + 1e-8) )   (the paper's printed C)
    consistency = 1 - complexity                              (Decision A1: higher = smoother)

Embeddings are computed as written, one float64 matmul per layer over a chunk
of samples (memory stays bounded). Going through the E x E matrices W_l W_m^T
instead would be ~7x faster but squares the conditioning of the cosines, which
then lose digits when a sample's embedding nearly cancels; consistency is not
the expensive metric, so exactness wins.

Example: two layers routing the same way, then one routing orthogonally::

    >>> import numpy as np
    >>> w = [np.eye(2), np.eye(2), np.eye(2)]  # E=2 experts, hidden=2
    >>> g = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # N=1, L=3
    >>> r = routing_consistency(g, w)
    >>> r.cosines.tolist(), r.complexity.tolist(), r.consistency.tolist()
    ([[1.0, 0.0]], [0.500000005], [0.49999999500000003])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from .errors import MetricError
from .pathways import as_distributions

# The paper's guard against dividing by a zero max cosine.
EPSILON = 1e-8
# summarise(): the trimmed mean cuts this share of the samples from each end (10% + 10%).
TRIM = 0.1
# Samples per chunk: one layer's embeddings [n, hidden] hold at most this many values (32 MiB).
_CHUNK_VALUES = 1 << 22


def is_degenerate(num_layers: int) -> bool:
    """True when ``num_layers`` MoE layers are too few for Metric 2 to measure routing
    (fewer than 3: docs/method.md "Degenerate case")."""
    return num_layers < 3


@dataclass(frozen=True)
class ConsistencyResult:
    """Per-sample pathway consistency of N samples through L MoE layers.

    Attributes:
        cosines: float64 [N, L-1], c_l = cos(e_l, e_{l+1}); 0.0 where either embedding
            has zero norm (no direction to compare).
        complexity: float64 [N], the paper's C; NaN when L = 1 (no cosine exists).
        consistency: float64 [N], 1 - complexity.
        degenerate: True when L < 3. With one cosine, C = 1 - c / (c + 1e-8), about 0
            whatever the routing (docs/method.md "Degenerate case"), and with L = 1 there is
            none: reports must warn instead of presenting these values as measurements.
    """

    cosines: np.ndarray
    complexity: np.ndarray
    consistency: np.ndarray
    degenerate: bool


def routing_consistency(distributions, router_weights) -> ConsistencyResult:
    """Pathway consistency and complexity of every sample (docs/method.md Metric 2).

    Args:
        distributions: [N, L, E] per-layer expert distributions g (any float dtype).
        router_weights: L router matrices [E, hidden] in layer order (any float dtype),
            the same hidden size in every layer.

    Raises:
        MetricError: bad distributions, or router matrices missing or of the wrong shape.
    """
    g = as_distributions(distributions)
    weights = _router_matrices(router_weights, g.shape[1:])
    cosines = _layer_cosines(g, weights)
    complexity = _complexity(cosines)
    return ConsistencyResult(cosines, complexity, 1.0 - complexity,
                             degenerate=is_degenerate(g.shape[1]))


def _router_matrices(router_weights, layers_experts: tuple[int, int]) -> list[np.ndarray]:
    """Validated float64 [E, hidden] matrices, one per layer."""
    layers, experts = layers_experts
    weights = [np.asarray(w, dtype=np.float64) for w in router_weights]
    if len(weights) != layers:
        raise MetricError(
            f"got {len(weights)} router matrices for {layers} MoE layers; pass one "
            "[experts, hidden] matrix per MoE layer, in layer order"
        )
    for layer, w in enumerate(weights):
        if w.ndim != 2 or w.shape[0] != experts:
            raise MetricError(
                f"router matrix of layer {layer} has shape {w.shape}; expected ({experts}, hidden) "
                f"to match the {experts} experts of the distributions (pass each layer's router "
                "(gate) weight)"
            )
        if w.shape[1] != weights[0].shape[1]:
            raise MetricError(
                f"router matrix of layer {layer} has hidden size {w.shape[1]} but layer 0 has "
                f"{weights[0].shape[1]}; routing embeddings of consecutive layers must share a "
                "space, so pass router matrices of one model"
            )
    return weights


def _layer_cosines(g: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """float64 [N, L-1] cosines between consecutive layers' routing embeddings."""
    samples, layers, _ = g.shape
    chunk = max(1, _CHUNK_VALUES // weights[0].shape[1])
    cosines = np.zeros((samples, layers - 1))
    for start in range(0, samples, chunk):
        rows = slice(start, start + chunk)
        previous = g[rows, 0].astype(np.float64) @ weights[0]  # [n, hidden]
        for layer in range(1, layers):
            current = g[rows, layer].astype(np.float64) @ weights[layer]
            cosines[rows, layer - 1] = _cosine(previous, current)
            previous = current
    return cosines


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n] row-wise cosines of a, b [n, hidden]; 0.0 where a row has zero norm."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("nh,nh->n", a, b)
    out = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return np.clip(out, -1.0, 1.0)  # rounding can step past +-1


def _complexity(cosines: np.ndarray) -> np.ndarray:
    """float64 [N]: 1 - mean_l(c_l / (max_l c_l + 1e-8)), the paper's literal formula.

    Kept literal even where it misbehaves: a sample whose cosines are all
    negative gets ratios above 1. With no cosine (L = 1) the result is NaN.
    """
    if cosines.shape[1] == 0:
        return np.full(len(cosines), np.nan)
    peak = cosines.max(axis=1, keepdims=True)
    return 1.0 - (cosines / (peak + EPSILON)).mean(axis=1)


@dataclass(frozen=True)
class ConsistencySummary:
    """A group's Metric 2, robust to the samples whose max cosine is near 0 or negative.

    The paper's ratio c_l / max_l' c_l' explodes when a sample's largest cosine is near
    zero and flips sign when it is negative, so one such sample can drag the group mean
    anywhere (random routers: mean about -11, median about -1.5). Hence, beside the mean:

    Attributes:
        mean, median: of the per-sample consistency.
        trimmed_mean: ``scipy.stats.trim_mean(consistency, TRIM)``: the mean of the middle
            80% (10% cut from each end).
        nonpositive_share: the share of samples whose largest cosine max_l c_l is <= 0,
            whose consistency is therefore not a measurement of smoothness.
        layer_cosines: [L-1] the group mean of c_l, l = 0..L-2 (layer l to l+1): the
            per-layer profile.
        All NaN (and ``layer_cosines`` empty) when L = 1.
    """

    mean: float
    median: float
    trimmed_mean: float
    nonpositive_share: float
    layer_cosines: list[float]


def summarise(result: ConsistencyResult) -> ConsistencySummary:
    """The group summary of per-sample Metric 2 values (see :class:`ConsistencySummary`).

    Example::

        >>> r = ConsistencyResult(np.array([[1.0], [-0.5]]), np.zeros(2), np.array([1.0, 3.0]),
        ...                       degenerate=True)
        >>> s = summarise(r)
        >>> s.mean, s.median, s.nonpositive_share, s.layer_cosines
        (2.0, 2.0, 0.5, [0.25])
    """
    values = result.consistency
    if result.cosines.shape[1] == 0 or len(values) == 0:
        return ConsistencySummary(*[float("nan")] * 4, layer_cosines=[])
    return ConsistencySummary(
        mean=float(values.mean()),
        median=float(np.median(values)),
        trimmed_mean=float(stats.trim_mean(values, TRIM)),
        nonpositive_share=float((result.cosines.max(axis=1) <= 0).mean()),
        layer_cosines=result.cosines.mean(axis=0).tolist(),
    )

"""Pathways of samples: the experts that carry each layer's routing weight.

Implements docs/method.md, "Pathway of one sample". A sample's routing is summarised
per layer by a distribution g_l over E experts (the mean over the sample's
tokens, step 2); its pathway keeps, layer by layer, the strongest experts until
their cumulative weight exceeds ``tau`` (step 3), and serialises them as
``3,1,5-9,1-...`` (step 4).

Example::

    >>> import numpy as np
    >>> g = np.array([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]], dtype=np.float32)  # [N=1, L=2, E=3]
    >>> [p.to_string() for p in pathways(g, tau=0.7)]
    ['0,1-2']
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import numpy as np

from .errors import MetricError

DEFAULT_TAU = 0.7
# Where the per-layer distributions come from (docs/method.md Decision A3): the model's full
# router distribution (default) or the per-token top-k gate weights (topk_to_distribution).
SOURCES = ("full", "topk")
# Layer separator in Pathway.tokens(): no expert id is negative, so it never collides.
SEPARATOR = -1
# Samples per vectorised chunk in pathways() hold at most this many weights (32 MiB as float64).
_CHUNK_WEIGHTS = 1 << 22


@dataclass(frozen=True)
class Pathway:
    """The experts kept per MoE layer, in layer order, each layer in rank order (strongest first).

    ``layers[l]`` is a tuple of expert ids (ints in [0, E)). Pathways built by
    :func:`pathways` keep at least one expert in every layer.

    Example::

        >>> p = Pathway(((3, 1, 5), (9, 1)))
        >>> p.to_string(), p.tokens(), p.lengths(), p.n_experts
        ('3,1,5-9,1', (3, 1, 5, -1, 9, 1), (3, 2), 5)
        >>> Pathway.parse('3,1,5-9,1') == p
        True
    """

    layers: tuple[tuple[int, ...], ...]

    @classmethod
    def parse(cls, text: str) -> Pathway:
        """The pathway serialised as ``text`` by :meth:`to_string` (docs/method.md step 4)."""
        try:
            return cls(tuple(tuple(int(e) for e in layer.split(",")) for layer in text.split("-")))
        except ValueError:
            raise MetricError(
                f"pathway {text!r} is not expert ids joined by ',' within a layer and by '-' "
                "between layers (e.g. '3,1,5-9,1'); pass a string made by Pathway.to_string()"
            ) from None

    def to_string(self) -> str:
        """Experts of a layer joined by ",", layers joined by "-": ``'3,1,5-9,1'``.

        The paper's serialisation; ``unit="char"`` distances edit this string.
        """
        return "-".join(",".join(map(str, layer)) for layer in self.layers)

    def tokens(self) -> tuple[int, ...]:
        """Expert ids in layer order with :data:`SEPARATOR` (-1) between layers.

        The sequence ``unit="expert"`` distances edit: one token per expert
        plus one per layer boundary, so its length is ``n_experts + L - 1``.
        """
        out = list(self.layers[0]) if self.layers else []
        for layer in self.layers[1:]:
            out.append(SEPARATOR)
            out.extend(layer)
        return tuple(out)

    def lengths(self) -> tuple[int, ...]:
        """Number of experts kept in each layer."""
        return tuple(len(layer) for layer in self.layers)

    @property
    def n_experts(self) -> int:
        """Total experts kept over all layers (the pathway length in experts)."""
        return sum(map(len, self.layers))


def check_tau(tau: float) -> None:
    """Raise :class:`MetricError` unless ``tau`` is a cumulative weight share in (0, 1]."""
    if isinstance(tau, bool) or not isinstance(tau, Real) or not 0 < tau <= 1:
        raise MetricError(
            f"tau {tau!r} is outside (0, 1]; pass the share of a layer's routing weight "
            "the kept experts must exceed, e.g. 0.7 (the paper's default) or 1.0 for all experts"
        )


def as_distributions(distributions) -> np.ndarray:
    """``distributions`` as a float array [N samples, L layers, E experts], validated.

    Float input is not copied (other dtypes become float64).

    Raises :class:`MetricError` unless it is 3-D with L, E >= 1 and finite. Weights may
    be negative: a DeepSeek-V3-style router's selection scores (sigmoid plus its
    load-balancing bias) dip below zero for experts it disfavours.
    """
    array = np.asarray(distributions)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    if array.ndim != 3 or 0 in array.shape[1:]:
        raise MetricError(
            f"distributions have shape {array.shape}; expected [samples, layers, experts] "
            "with at least one layer and expert (stack one [layers, experts] array per sample)"
        )
    if array.size and not np.isfinite(array).all():
        raise MetricError(
            "distributions hold NaN or infinite weights; pass per-layer means of router "
            "probabilities (softmax or sigmoid scores) or of top-k gate weights"
        )
    return array


def topk_to_distribution(expert_ids, gate_weights, num_experts: int) -> np.ndarray:
    """Source ``topk`` (docs/method.md step 2, Decision A3): top-k gate weights averaged per layer.

    Args:
        expert_ids: (tokens T, layers L, top_k) ints in [0, num_experts), e.g. uint8.
        gate_weights: (T, L, top_k) floats, e.g. float16: the gate weight of each chosen expert.
        num_experts: E, the number of routed experts per layer.

    Returns:
        float32 [L, E]: each token's gate weights scattered into E slots, averaged over T.
        Rows sum to the mean top-k mass (1 only when the model renormalises its top-k).

    Example::

        >>> ids = np.array([[[0, 2]], [[2, 1]]])  # T=2 tokens, L=1 layer, k=2
        >>> w = np.array([[[0.6, 0.4]], [[0.5, 0.5]]])
        >>> topk_to_distribution(ids, w, num_experts=3).tolist()
        [[0.30000001192092896, 0.25, 0.44999998807907104]]
    """
    ids = np.asarray(expert_ids)
    weights = np.asarray(gate_weights, dtype=np.float64)
    if ids.ndim != 3 or ids.shape != weights.shape or ids.shape[0] == 0:
        raise MetricError(
            f"expert_ids {ids.shape} and gate_weights {weights.shape} must share one shape "
            "[tokens, layers, top_k] with at least one token"
        )
    if ids.min() < 0 or ids.max() >= num_experts:
        raise MetricError(
            f"expert ids span {ids.min()}..{ids.max()}, outside [0, {num_experts}); "
            "pass the model's number of routed experts as num_experts"
        )
    tokens, layers, _ = ids.shape
    slots = ids.astype(np.int64) + num_experts * np.arange(layers)[:, None]  # [T, L, k] -> l*E+id
    sums = np.bincount(slots.ravel(), weights=weights.ravel(), minlength=layers * num_experts)
    return (sums.reshape(layers, num_experts) / tokens).astype(np.float32)


def topk_counts(expert_ids, num_experts: int) -> np.ndarray:
    """The top-k histogram: int32 [L, E], how many of the T tokens had each expert among
    their top k in each layer (``expert_ids``: (T, L, top_k) ints in [0, num_experts);
    T may be 0). Rows sum to T * top_k.

    Example::

        >>> topk_counts(np.array([[[0, 2]], [[2, 1]]]), num_experts=3).tolist()
        [[1, 1, 2]]
    """
    ids = np.asarray(expert_ids, dtype=np.int64)
    if ids.ndim != 3:
        raise MetricError(f"expert_ids {ids.shape} must be [tokens, layers, top_k]")
    layers = ids.shape[1]
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise MetricError(
            f"expert ids span {ids.min()}..{ids.max()}, outside [0, {num_experts}); "
            "pass the model's number of routed experts as num_experts"
        )
    slots = ids + num_experts * np.arange(layers)[:, None]  # [T, L, k] -> l*E+id
    counts = np.bincount(slots.ravel(), minlength=layers * num_experts)
    return counts.reshape(layers, num_experts).astype(np.int32)


def select_experts(distribution, tau: float = DEFAULT_TAU) -> Pathway:
    """The pathway of one sample from its per-layer distributions [L, E] (docs/method.md step 3).

    See :func:`pathways` for the rule. Example::

        >>> select_experts([[0.5, 0.3, 0.2]], tau=0.7).to_string()  # 0.5, then 0.8 > 0.7
        '0,1'
    """
    return pathways(np.asarray(distribution)[None], tau)[0]


def pathways(distributions, tau: float = DEFAULT_TAU) -> list[Pathway]:
    """Pathways of N samples from their distributions [N, L, E] (docs/method.md step 3).

    Per sample and layer: rank experts by weight, descending, ties to the lower
    expert index; keep the shortest prefix whose cumulative weight exceeds
    ``tau * total`` (the crossing expert is kept; reaching tau is not enough).
    ``total`` is the layer's summed weight, so for the softmax source (sums to
    1) this is the paper's literal cut, and a ``topk`` or sigmoid source, whose
    rows do not sum to 1, is cut at the same share of its mass. Experts of zero
    weight are never kept, which makes ``tau=1.0`` keep exactly the experts of
    nonzero weight, whatever the float rounding of the sums. A negative weight
    (sigmoid plus a router's selection bias) counts as zero: it ranks last and
    takes nothing from the layer's total.

    Equivalently, the expert at rank r is kept iff its weight is nonzero and the
    weight ranked before it sums to at most ``tau * total``. Sums are float64
    cumulative sums in rank order.

    Raises:
        MetricError: tau outside (0, 1], bad shape or values, or a layer of zero total weight.

    Example: expert 1 alone reaches tau = 0.5 but does not exceed it, so the
    next expert is kept too, and of the tied 0.25s the lower index, 0::

        >>> [p.to_string() for p in pathways([[[0.25, 0.5, 0.25, 0.0]]], tau=0.5)]
        ['1,0']
    """
    check_tau(tau)
    array = as_distributions(distributions)
    samples, layers, experts = array.shape
    chunk = max(1, _CHUNK_WEIGHTS // (layers * experts))
    return [
        path
        for start in range(0, samples, chunk)
        for path in _cut(array[start : start + chunk], tau, start)
    ]


def _cut(chunk: np.ndarray, tau: float, first_sample: int) -> list[Pathway]:
    """Pathways of a chunk of float weights [n, L, E]; ``first_sample`` numbers errors."""
    # Rank in the input dtype (casting to float64 preserves order), sum in float64.
    order = np.argsort(-chunk, axis=-1, kind="stable")  # [n, L, E] rank -> expert
    ranked = np.take_along_axis(chunk, order, axis=-1).astype(np.float64)
    np.maximum(ranked, 0.0, out=ranked)  # negative selection scores weigh nothing
    cumulative = np.cumsum(ranked, axis=-1)
    total = cumulative[..., -1:]  # [n, L, 1]
    _check_nonzero(total[..., 0], first_sample)
    before = np.concatenate([np.zeros_like(total), cumulative[..., :-1]], axis=-1)
    counts = np.count_nonzero((before <= tau * total) & (ranked > 0), axis=-1)  # [n, L]
    kept = order[..., : counts.max()].tolist()  # only ranks some layer keeps reach Python
    return [
        Pathway(tuple(tuple(row[:k]) for row, k in zip(rows, ks, strict=True)))
        for rows, ks in zip(kept, counts.tolist(), strict=True)
    ]


def _check_nonzero(total: np.ndarray, first_sample: int) -> None:
    """Raise naming the first (sample, layer) whose weights sum to zero."""
    zero = np.argwhere(total <= 0)
    if len(zero):
        sample, layer = zero[0]
        raise MetricError(
            f"sample {first_sample + sample} has zero routing weight in layer {layer}; a pathway "
            "needs weight in every layer (check that the trace recorded that sample's tokens)"
        )

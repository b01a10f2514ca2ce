"""Controls: quantities a metric's trajectory may follow instead of generalisation.

Implements docs/method.md "Controls". Pathway distance and consistency move with how
flat the routing is (a flatter router keeps more experts per layer, and longer
pathways are further apart) and possibly with the scale of the router weights. A
correlation of a metric with accuracy is only evidence of the paper's claim if it
survives these; they are reported as metrics of their own, so a partial correlation
given a control can use them by name.

- routing entropy (nats): per sample, the mean over layers of the Shannon entropy of
  the layer's routing distribution g_l, normalised to sum 1 with negative weights
  counted as 0 (as pathways do); a group's value is the mean over samples.
- router norm: per checkpoint, the mean over layers and experts of the L2 norm of an
  expert's router row v_l,k (its embedding in Metric 2).

Example::

    >>> import numpy as np
    >>> routing_entropy(np.array([[[0.5, 0.5], [1.0, 0.0]]])).tolist()  # ln 2 and 0
    [0.34657359027997264]
    >>> router_norm([np.array([[3.0, 4.0], [0.0, 1.0]])])  # rows of norm 5 and 1
    3.0
"""

from __future__ import annotations

import numpy as np

from .pathways import as_distributions

# Samples per chunk of routing_entropy's float64 temporaries (4 of [chunk, L, E]): memory
# stays that of the distributions themselves at any number of samples.
CHUNK_SAMPLES = 1024


def routing_entropy(distributions) -> np.ndarray:
    """float64 [N]: each sample's mean over layers of the entropy (nats) of its g_l."""
    array = as_distributions(distributions)  # [N, L, E]
    return np.concatenate([_entropy(array[start:start + CHUNK_SAMPLES])
                           for start in range(0, len(array), CHUNK_SAMPLES)] or [np.zeros(0)])


def _entropy(distributions: np.ndarray) -> np.ndarray:
    g = np.maximum(distributions.astype(np.float64), 0.0)
    total = g.sum(axis=-1, keepdims=True)
    p = np.divide(g, total, out=np.zeros_like(g), where=total > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)  # 0 log 0 = 0
    return -(p * logs).sum(axis=-1).mean(axis=-1)


def router_norm(router_weights) -> float:
    """Mean L2 norm of the router rows (expert embeddings) over all layers and experts."""
    return float(np.mean([np.linalg.norm(np.asarray(w, np.float64), axis=1).mean()
                          for w in router_weights]))

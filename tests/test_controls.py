"""Controls: routing entropy and router norm against naive loops."""

from __future__ import annotations

import doctest
import math

import numpy as np

from moepath.tracer import controls as controls_module
from moepath.tracer.controls import router_norm, routing_entropy


def naive_entropy(g) -> list[float]:
    out = []
    for sample in g:
        per_layer = []
        for layer in sample:
            weights = [max(float(w), 0.0) for w in layer]
            total = sum(weights)
            per_layer.append(-sum(w / total * math.log(w / total) for w in weights if w > 0))
        out.append(sum(per_layer) / len(per_layer))
    return out


def naive_norm(router_weights) -> float:
    norms = [math.sqrt(sum(float(x) ** 2 for x in row)) for w in router_weights for row in w]
    return sum(norms) / len(norms)


def test_entropy_equals_a_naive_loop():
    rng = np.random.default_rng(0)
    g = rng.dirichlet(np.full(8, 0.5), (5, 3)).astype(np.float32)
    g[0, 0] = [0.5, 0.5, 0, 0, 0, 0, 0, 0]  # zero weights: 0 log 0 = 0
    g[1, 1, :2] = [-0.1, -0.2]  # negative selection scores weigh nothing
    assert np.allclose(routing_entropy(g), naive_entropy(g), rtol=1e-6)
    assert np.allclose(routing_entropy(np.full((1, 2, 4), 0.25)), math.log(4))


def test_entropy_in_chunks_of_samples_equals_the_naive_loop(monkeypatch):
    from moepath.tracer import controls

    monkeypatch.setattr(controls, "CHUNK_SAMPLES", 2)  # 5 samples: chunks of 2, 2 and 1
    g = np.random.default_rng(1).dirichlet(np.full(8, 0.5), (5, 3)).astype(np.float32)
    assert np.allclose(routing_entropy(g), naive_entropy(g), rtol=1e-6)
    assert routing_entropy(np.zeros((0, 3, 8))).shape == (0,)


def test_router_norm_equals_a_naive_loop():
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=(6, 5)) for _ in range(3)]
    assert np.isclose(router_norm(weights), naive_norm(weights))


def test_docstrings():
    assert doctest.testmod(controls_module).failed == 0

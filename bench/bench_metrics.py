"""Speed of the metric library on OLMoE-sized inputs.

Run from the repository root (about 2 minutes on 2 cores):

    .venv/bin/python bench/bench_metrics.py

Measures, on 2,000 synthetic pathways of OLMoE length (16 layers, 15-25 of 64
experts a layer, about 900 characters):

- all-pairs char distance through ``group_distance`` (exact, forced with
  ``pairs=n(n-1)/2``), against raw ``rapidfuzz.process.cdist`` on the same
  strings and a pure-Python dynamic programme on a few pairs (pairs/s);
- the same all-pairs mean in expert units, and ``per_layer_distance``;
- ``pathways`` and ``routing_consistency`` on 10,000 samples of OLMoE shape
  (16 layers, 64 experts, hidden 2048).

Prints the results as JSON and writes them to bench/results/metrics.json.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import rapidfuzz
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from moepath.tracer.consistency import routing_consistency
from moepath.tracer.distance import group_distance, per_layer_distance
from moepath.tracer.pathways import Pathway, pathways

N_PATHWAYS, LAYERS, EXPERTS, HIDDEN = 2000, 16, 64, 2048
N_CONSISTENCY = 10_000
DP_PAIRS = 8
OUT = Path(__file__).parent / "results" / "metrics.json"


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def synthetic_pathways(rng) -> list[Pathway]:
    return [
        Pathway(
            tuple(
                tuple(rng.choice(EXPERTS, rng.integers(15, 26), replace=False).tolist())
                for _ in range(LAYERS)
            )
        )
        for _ in range(N_PATHWAYS)
    ]


def python_levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def bench_distance(rng) -> dict:
    paths = synthetic_pathways(rng)
    texts = [p.to_string() for p in paths]
    all_pairs = N_PATHWAYS * (N_PATHWAYS - 1) // 2

    result, library_s = timed(group_distance, paths, pairs=all_pairs)
    matrix, cdist_s = timed(
        process.cdist, texts, texts, scorer=Levenshtein.distance, dtype=np.int32, workers=-1
    )
    raw_mean = matrix[np.triu_indices(N_PATHWAYS, 1)].mean()
    assert result.exact and abs(result.mean - raw_mean) < 1e-9, (result.mean, raw_mean)

    pairs = [tuple(rng.choice(N_PATHWAYS, 2, replace=False)) for _ in range(DP_PAIRS)]
    dp, dp_s = timed(lambda: [python_levenshtein(texts[i], texts[j]) for i, j in pairs])
    assert dp == [matrix[i, j] for i, j in pairs]

    expert, expert_s = timed(group_distance, paths, unit="expert", pairs=all_pairs)
    _, per_layer_s = timed(per_layer_distance, paths, pairs=all_pairs)
    return {
        "n_pathways": N_PATHWAYS,
        "n_pairs": all_pairs,
        "mean_chars": float(np.mean([len(t) for t in texts])),
        "mean_distance_chars": result.mean,
        "group_distance_s": library_s,
        "group_distance_pairs_per_s": all_pairs / library_s,
        "cdist_s": cdist_s,
        "cdist_pairs_per_s": all_pairs / cdist_s,
        "group_distance_vs_cdist": cdist_s / library_s,
        "python_dp_pairs": DP_PAIRS,
        "python_dp_pairs_per_s": DP_PAIRS / dp_s,
        "expert_unit_mean_distance": expert.mean,
        "expert_unit_s": expert_s,
        "expert_unit_pairs_per_s": all_pairs / expert_s,
        "per_layer_distance_s": per_layer_s,
    }


def bench_consistency(rng) -> dict:
    g = rng.dirichlet(np.full(EXPERTS, 0.3), (N_CONSISTENCY, LAYERS)).astype(np.float32)
    scale = 2.0 / np.sqrt(HIDDEN)  # the toy models' router scale (fixtures/toy.py)
    weights = [
        (rng.normal(size=(EXPERTS, HIDDEN)) * scale).astype(np.float32) for _ in range(LAYERS)
    ]
    paths, pathways_s = timed(pathways, g, tau=0.7)
    result, consistency_s = timed(routing_consistency, g, weights)
    return {
        "n_samples": N_CONSISTENCY,
        "shape": [LAYERS, EXPERTS, HIDDEN],
        "pathways_s": pathways_s,
        "mean_experts_per_layer": float(np.mean([p.n_experts for p in paths])) / LAYERS,
        "routing_consistency_s": consistency_s,
        "samples_per_s": N_CONSISTENCY / consistency_s,
        "consistency_mean": float(result.consistency.mean()),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "rapidfuzz": rapidfuzz.__version__,
        },
        "distance": bench_distance(rng),
        "consistency": bench_consistency(rng),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

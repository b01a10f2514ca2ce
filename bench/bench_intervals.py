"""What issue #36's additions cost compare: intervals, baseline, controls, robust consistency.

Run (from the repository root, inside .venv):

    python bench/bench_intervals.py --samples 700 --checkpoints 5

Synthetic checkpoints shaped like the demo (E=8 experts, L=4 MoE layers, tau 0.7,
Dirichlet(0.4) routing, random routers) with 15 groups: all samples, 3 domains of a
third each, and 11 memorised-like groups of 10 to 110 samples. Times
``compare.checkpoint_tables`` with 1000 bootstrap resamples and with none (baseline,
controls and robust consistency are always on), then the baseline alone, per
checkpoint; with 3 checkpoints or more, also ``correlation.correlate`` of the
1000-resample rows against a rising score (once per run, as compare does); saves
bench/results/intervals.json. Compare two commits by running this file of one
checkout with each on PYTHONPATH, alternately (the machines are shared).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
from bench_overhead import RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=700)
    parser.add_argument("--checkpoints", type=int, default=2)
    args = parser.parse_args()

    from moepath.tracer import compare as cmp
    from moepath.tracer.baseline import random_routing_baseline
    from moepath.tracer.correlation import correlate
    from moepath.tracer.metrics import MetricOptions
    from moepath.tracer.pathways import pathways

    n, rng = args.samples, np.random.default_rng(0)
    third = n // 3
    groups = {"all": list(range(n)), **{f"d{d}": list(range(d * third, (d + 1) * third))
                                        for d in range(3)},
              **{f"t{k}": list(range(k, k + 10 + 10 * k)) for k in range(11)}}
    ids = [f"s{i}" for i in range(n)]
    seconds = {"resamples_1000": 0.0, "resamples_0": 0.0, "baseline_only": 0.0}
    metric_rows = []
    for checkpoint in range(args.checkpoints):
        g = rng.dirichlet(np.full(8, 0.4), (n, 4)).astype(np.float32)
        weights = [rng.normal(size=(8, 64)).astype(np.float32) for _ in range(4)]
        data = cmp.CheckpointData(ids, g, weights, pd.Series(np.ones(n), index=ids))
        for key, resamples in (("resamples_1000", 1000), ("resamples_0", 0)):
            start = time.perf_counter()
            tables = cmp.checkpoint_tables(f"c{checkpoint}", checkpoint, data, groups,
                                           MetricOptions(resamples=resamples))
            seconds[key] += time.perf_counter() - start
            metric_rows += tables[0] if resamples else []
        start = time.perf_counter()
        for rows in groups.values():
            random_routing_baseline(pathways(g[rows]), 8)
        seconds["baseline_only"] += time.perf_counter() - start
    per_checkpoint = {key: value / args.checkpoints for key, value in seconds.items()}
    result = {"samples": n, "groups": len(groups), "checkpoints": args.checkpoints,
              "seconds_per_checkpoint": per_checkpoint,
              "intervals_seconds_per_checkpoint":
                  per_checkpoint["resamples_1000"] - per_checkpoint["resamples_0"]}
    if args.checkpoints >= 3:
        scores = pd.DataFrame({"checkpoint": [f"c{c}" for c in range(args.checkpoints)],
                               "score": np.linspace(0.1, 0.9, args.checkpoints)})
        start = time.perf_counter()
        correlate(pd.DataFrame(metric_rows), scores, control="pathway_length")  # compare's default
        result["correlate_seconds"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "intervals.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

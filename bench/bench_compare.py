"""compare over N checkpoints: engine reuse (in-place reload) vs restart per checkpoint.

Run (from the repository root, inside .venv):

    python bench/bench_compare.py --checkpoints 5 --samples 64

Traces the same samples through N toy checkpoints of one architecture (tiny
OLMoE, seeds 0..N-1) twice: once reusing the engine (``reuse_engine=True``,
weights reloaded in place) and once restarting it per checkpoint. Compiled
mode and engine core placement auto, as ``moepath compare`` runs by default. Prints and saves
bench/results/compare.json with wall times and the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_overhead import RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()

    from moepath.fixtures.toy import build_toy_model, corpus
    from moepath.patches.options import EngineOptions
    from moepath.patches.sweep import trace_checkpoints
    from moepath.tracer.samples import Sample, SampleSet

    # the benchmark's files, removed when this function returns
    scratch = tempfile.TemporaryDirectory(prefix="moepath-bench-compare-")
    root = Path(scratch.name)
    models = [(f"step{i}", build_toy_model(root / f"step{i}", "olmoe", "tiny", seed=i))
              for i in range(args.checkpoints)]
    samples = SampleSet([Sample(f"s{i}", text, None) for i, text in
                         enumerate(corpus(args.samples, seed=3))], [], "", "memory")
    options = EngineOptions(max_model_len=256, enforce_eager=args.enforce_eager,
                            engine_core="auto")
    seconds = {}
    for mode, reuse in (("reuse", True), ("restart", False)):
        start = time.perf_counter()
        trace_checkpoints(models, samples, root / mode, options, reuse_engine=reuse)
        seconds[mode] = time.perf_counter() - start
    result = {"checkpoints": args.checkpoints, "samples": args.samples,
              "mode": "eager" if args.enforce_eager else "compiled", "seconds": seconds,
              "restart_over_reuse": seconds["restart"] / seconds["reuse"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compare.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Scaling of `moepath trace`: throughput vs number of samples and vs sequence length.

Run (from the repository root, inside .venv):

    python bench/bench_scaling.py --counts 1000 5000 20000 --lengths 64 256 1024

One traced engine (compiled, bf16, tiny OLMoE toy by default so that the
20,000-sample point fits in minutes on 2 cores; engine core placed as
``--engine-core`` says, default auto like ``moepath trace``) runs the driver's whole
path (generate, flush, check, samples table, manifest commit; NLL on) for each
point into a fresh trace directory (``TracedEngine.retarget``), so engine start
is paid once and excluded. The count sweep uses ``--count-length``-token
prompts; the length sweep traces the same number of tokens
(``--tokens-per-point``) at each length.
Linear cost shows as flat tokens/s across a sweep. Saves bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_overhead import RESULTS, prompts, toy


def trace_point(engine, model: Path, batch: list[list[int]], out: Path, options,
                batch_size: int = 1024, nll: bool = True) -> float:
    """Tokens/s of tracing ``batch`` (token-id prompts) into ``out`` on ``engine``: the
    driver's whole path, ``batch_size`` samples per committed batch, per-sample NLL
    (prompt log-probs) when ``nll``."""
    from moepath.patches.engine import Tokenized, TraceJob
    from moepath.patches.options import TraceOptions
    from moepath.tracer import store
    from moepath.tracer.samples import Sample, SampleSet

    samples = SampleSet([Sample(f"s{i}", None, tuple(ids)) for i, ids in enumerate(batch)],
                        [], "", "memory")
    tokenized = [Tokenized(f"s{i}", ids, False) for i, ids in enumerate(batch)]
    store.prepare_directory(out, resume=False, force=True)
    engine.retarget(out)
    job = TraceJob(samples, tokenized, options, TraceOptions(nll=nll, batch_size=batch_size))
    started = time.perf_counter()
    summary = job.run(engine, out, None)
    return summary.tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--count-length", type=int, default=16)
    parser.add_argument("--tokens-per-point", type=int, default=65_536)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--engine-core", choices=["auto", "process", "inline"], default="auto")
    args = parser.parse_args()

    from moepath.patches.engine import TracedEngine
    from moepath.patches.options import EngineOptions

    model = toy(args.preset)
    # the benchmark's files, removed when this function returns
    scratch = tempfile.TemporaryDirectory(prefix="moepath-bench-scaling-")
    root = Path(scratch.name)
    options = EngineOptions(enforce_eager=args.enforce_eager, max_model_len=max(args.lengths) + 8,
                            engine_core=args.engine_core)
    result = {"preset": args.preset, "mode": "eager" if args.enforce_eager else "compiled",
              "engine_core": args.engine_core, "count_length": args.count_length,
              "tokens_per_point": args.tokens_per_point,
              "by_count": {}, "by_length": {}}
    with TracedEngine(model, root / "warmup", options, commit=False) as engine:
        trace_point(engine, model, prompts(256, 64, seed=99), root / "warmup", options)
        for count in args.counts:
            rate = trace_point(engine, model, prompts(count, args.count_length, seed=count),
                               root / f"n{count}", options)
            result["by_count"][count] = rate
            print(f"{count} samples x {args.count_length} tokens: {rate:,.0f} tokens/s",
                  flush=True)
        for length in args.lengths:
            count = max(1, args.tokens_per_point // length)
            rate = trace_point(engine, model, prompts(count, length, seed=length),
                               root / f"len{length}", options)
            result["by_length"][length] = rate
            print(f"{count} samples x {length} tokens: {rate:,.0f} tokens/s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

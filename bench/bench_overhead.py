"""Tracing overhead: traced vs untraced vLLM throughput, alternated in one run.

Run (from the repository root, inside .venv):

    python bench/bench_overhead.py --mode compiled --samples 400 --tokens 256 --rounds 2
    python bench/bench_overhead.py --mode eager --decode   # short prompts, 128 generated tokens

Engines of the same configuration, untraced (A: a plain ``vllm.LLM``) and
traced (B: ``TracedEngine``, every request tagged), run in alternating phases
A B A B ... in this process, one engine alive at a time (two live CPU engines
oversubscribe the cores with spinning OpenMP threads). Each phase starts its
engine, warms it up, then times ``--reps`` generate calls over the same batch;
engine start is excluded. The traced time includes the flush that writes the
shards. Prints and saves bench/results/overhead-<mode>-<workload>.json: tokens/s
of every timed call, medians, and the traced/untraced ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def toy(preset: str) -> Path:
    from moepath.tracer.toy import build_toy_model

    path = RESULTS / f"toy-olmoe-{preset}"
    if not (path / "config.json").is_file():
        build_toy_model(path, "olmoe", preset, seed=0)
    return path


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=length).tolist() for _ in range(n)]


def measure(kind: str, model: Path, batch, options, max_tokens: int, reps: int) -> list[float]:
    """tokens/s of ``reps`` generate calls over ``batch`` on a fresh engine of ``kind``."""
    from vllm import LLM, SamplingParams

    from moepath.patches.engine import TracedEngine, tag

    traced = kind == "traced"
    engine = TracedEngine(model, tempfile.mkdtemp(prefix="moepath-bench-"), options,
                          commit=False) if traced else None
    llm = engine.llm if traced else LLM(**options.llm_kwargs(str(model), None))
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                             ignore_eos=True) for _ in batch]
    if traced:
        params = [tag(p, f"s{i}") for i, p in enumerate(params)]
    tokens = sum(len(p["prompt_token_ids"]) for p in batch) + len(batch) * (max_tokens - 1)
    rates = []
    for rep in range(reps + 1):  # the first call warms up
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        if traced:
            engine.flush()
        if rep:
            rates.append(tokens / (time.perf_counter() - start))
    if traced:
        engine.close()
    else:
        llm.llm_engine.engine_core.shutdown()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["compiled", "eager"], default="compiled")
    parser.add_argument("--preset", default="olmoe-shaped")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="A B phase pairs")
    parser.add_argument("--reps", type=int, default=2, help="timed calls per phase")
    parser.add_argument("--decode", action="store_true",
                        help="decode-heavy: 16-token prompts, 128 generated tokens")
    args = parser.parse_args()

    from vllm.inputs import TokensPrompt

    from moepath.patches.engine import EngineOptions

    model = toy(args.preset)
    length, max_tokens = (16, 128) if args.decode else (args.tokens, 1)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts(args.samples, length)]
    options = EngineOptions(enforce_eager=args.mode == "eager",
                            max_model_len=length + max_tokens + 8)
    rates = {"untraced": [], "traced": []}
    for _ in range(args.rounds):
        for kind in ("untraced", "traced"):
            rates[kind] += measure(kind, model, batch, options, max_tokens, args.reps)
            gc.collect()
    result = {
        "mode": args.mode, "workload": "decode" if args.decode else "prefill",
        "preset": args.preset, "samples": args.samples, "prompt_tokens": length,
        "max_tokens": max_tokens, "rounds": args.rounds, "reps": args.reps,
        "tokens_per_s": rates,
        "median_untraced": statistics.median(rates["untraced"]),
        "median_traced": statistics.median(rates["traced"]),
    }
    result["ratio"] = result["median_traced"] / result["median_untraced"]
    RESULTS.mkdir(exist_ok=True)
    name = f"overhead-{args.mode}-{result['workload']}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

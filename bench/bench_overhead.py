"""Tracing overhead: traced vs untraced vLLM throughput, alternated in one run.

Run (from the repository root, inside .venv):

    python bench/bench_overhead.py --mode compiled --samples 400 --tokens 256 --rounds 2
    python bench/bench_overhead.py --mode eager --decode   # short prompts, 128 generated tokens
    python bench/bench_overhead.py --mode eager --shared-prefix 0.75  # prefix-cache cost

Engines of the same configuration, untraced (A: a plain ``vllm.LLM``) and
traced (B: ``TracedEngine``, every request tagged), run in alternating phases
A B A B ... in this process, one engine alive at a time (two live CPU engines
oversubscribe the cores with spinning OpenMP threads). Each phase starts its
engine, warms it up, then times ``--reps`` generate calls; engine start is
excluded. Each call has fresh prompts (untraced vLLM must not read a repeated
batch from its prefix cache). The traced time includes the flush that writes
the shards. Prints and saves bench/results/overhead-<mode>-<workload>.json:
tokens/s of every timed call, medians, and the traced/untraced ratio.
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


def prompts(n: int, length: int, seed: int = 0, shared: int = 0) -> list[list[int]]:
    """``n`` random token-id prompts of ``length``; the first ``shared`` tokens are common."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 500, size=shared).tolist()
    return [prefix + rng.integers(3, 500, size=length - shared).tolist() for _ in range(n)]


def measure(kind: str, model: Path, batches, options, max_tokens: int) -> list[float]:
    """tokens/s of generate calls over ``batches[1:]`` on a fresh engine of ``kind``.

    ``batches[0]`` warms the engine up. Every call gets its own prompts, so only
    a shared prefix inside a batch can hit vLLM's prefix cache.
    """
    from vllm import LLM, SamplingParams

    from moepath.patches.engine import TracedEngine, tag

    traced = kind == "traced"
    engine = TracedEngine(model, tempfile.mkdtemp(prefix="moepath-bench-"), options,
                          commit=False) if traced else None
    llm = engine.llm if traced else LLM(**options.llm_kwargs(str(model), None))
    rates = []
    for rep, batch in enumerate(batches):
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                                 ignore_eos=True) for _ in batch]
        if traced:
            params = [tag(p, f"r{rep}-s{i}") for i, p in enumerate(params)]
        tokens = sum(len(p["prompt_token_ids"]) for p in batch) + len(batch) * (max_tokens - 1)
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
    parser.add_argument("--shared-prefix", type=float, default=0.0,
                        help="fraction of each prompt shared by the batch (few-shot style): "
                             "untraced vLLM reads it from the prefix cache, traced recomputes")
    args = parser.parse_args()

    from vllm.inputs import TokensPrompt

    from moepath.patches.engine import EngineOptions

    model = toy(args.preset)
    length, max_tokens = (16, 128) if args.decode else (args.tokens, 1)
    shared = int(length * args.shared_prefix)
    batches = [[TokensPrompt(prompt_token_ids=p) for p in prompts(args.samples, length, rep,
                                                                  shared)]
               for rep in range(args.reps + 1)]
    options = EngineOptions(enforce_eager=args.mode == "eager",
                            max_model_len=length + max_tokens + 8)
    workload = "decode" if args.decode else "prefill"
    if shared:
        workload += f"-shared{shared}"
    rates = {"untraced": [], "traced": []}
    for _ in range(args.rounds):
        for kind in ("untraced", "traced"):
            rates[kind] += measure(kind, model, batches, options, max_tokens)
            gc.collect()
    result = {
        "mode": args.mode, "workload": workload,
        "preset": args.preset, "samples": args.samples, "prompt_tokens": length,
        "max_tokens": max_tokens, "shared_prefix_tokens": shared,
        "rounds": args.rounds, "reps": args.reps,
        "tokens_per_s": rates,
        "median_untraced": statistics.median(rates["untraced"]),
        "median_traced": statistics.median(rates["traced"]),
    }
    result["ratio"] = result["median_traced"] / result["median_untraced"]
    RESULTS.mkdir(exist_ok=True)
    name = f"overhead-{args.mode}-{workload}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Tracing overhead: traced vs untraced vLLM throughput, alternated in one run.

Run (from the repository root, inside .venv):

    python bench/bench_overhead.py --mode compiled --samples 400 --tokens 256 --repeats 3
    python bench/bench_overhead.py --mode eager --decode   # short prompts, 128 generated tokens

Two engines of the same configuration live side by side in this process: an
untraced ``vllm.LLM`` (A) and a moepath ``TracedEngine`` (B). Batches alternate
A B A B ... so machine noise hits both alike; the traced time includes the
flush that writes the shards. Prints and saves (bench/results/overhead-<mode>.json)
tokens/s per repeat, medians and the traced/untraced ratio.
"""

from __future__ import annotations

import argparse
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


def timed_generate(llm, batch, params) -> float:
    start = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["compiled", "eager"], default="compiled")
    parser.add_argument("--preset", default="olmoe-shaped")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", action="store_true",
                        help="decode-heavy: 16-token prompts, 128 generated tokens")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from moepath.patches.engine import EngineOptions, TracedEngine

    model = toy(args.preset)
    length, max_tokens = (16, 128) if args.decode else (args.tokens, 1)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts(args.samples, length)]
    options = EngineOptions(enforce_eager=args.mode == "eager", max_model_len=length + max_tokens
                            + 8, gpu_memory_utilization=0.15)
    trace_dir = Path(tempfile.mkdtemp(prefix="moepath-bench-"))
    untraced = LLM(**options.llm_kwargs(str(model), None))
    traced = TracedEngine(model, trace_dir, options, commit=False)
    plain = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                           ignore_eos=True)
    tagged = [traced.sampling_params(f"s{i}", max_tokens=max_tokens)
              for i in range(len(batch))]
    for params in tagged:
        params.ignore_eos = True
    timed_generate(untraced, batch[:8], plain)  # warm-up both
    timed_generate(traced.llm, batch[:8], tagged[:8])
    traced.flush()
    tokens = len(batch) * (length + (max_tokens if args.decode else 0))
    rates = {"untraced": [], "traced": []}
    for _ in range(args.repeats):
        rates["untraced"].append(tokens / timed_generate(untraced, batch, plain))
        start = time.perf_counter()
        traced.llm.generate(batch, tagged, use_tqdm=False)
        traced.flush()
        rates["traced"].append(tokens / (time.perf_counter() - start))
    result = {
        "mode": args.mode, "workload": "decode" if args.decode else "prefill",
        "preset": args.preset, "samples": args.samples, "prompt_tokens": length,
        "max_tokens": max_tokens, "repeats": args.repeats, "tokens_per_s": rates,
        "median_untraced": statistics.median(rates["untraced"]),
        "median_traced": statistics.median(rates["traced"]),
    }
    result["ratio"] = result["median_traced"] / result["median_untraced"]
    RESULTS.mkdir(exist_ok=True)
    name = f"overhead-{args.mode}-{result['workload']}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    traced.close()


if __name__ == "__main__":
    main()

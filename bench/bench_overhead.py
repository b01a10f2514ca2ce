"""Tracing overhead: traced vs untraced vLLM throughput, alternated in one run.

Run (from the repository root, inside .venv):

    python bench/bench_overhead.py --mode eager --interleave --samples 64 --rounds 3
    python bench/bench_overhead.py --mode compiled --samples 64 --rounds 3   # phases
    python bench/bench_overhead.py --mode eager --decode   # short prompts, 128 generated tokens
    python bench/bench_overhead.py --mode compiled --interleave --shared-prefix 0.75  # prefix cache
    python bench/bench_overhead.py --mode compiled --interleave --shared-prefix 0.75 \
        --traced-without-prefix-caching  # what traced engines did before the routing cache
    python bench/bench_overhead.py --mode compiled --interleave --decode --control  # A/A
    python bench/bench_overhead.py --mode compiled --interleave --store-probs  # full distributions
    python bench/bench_overhead.py --mode compiled --interleave --traced-fraction 0.5
    python bench/bench_overhead.py --mode compiled --interleave --decode --traced-fraction 0

Two engines of the same configuration: untraced (A: a plain ``vllm.LLM``) and
traced (B: ``TracedEngine``, every request tagged, or the first
``--traced-fraction`` of each batch; 0 tags none, so B runs the routing hook on
every token but records nothing: the cost of a traced engine's forward alone).
Two layouts:

- phases (default): A B A B ... phases, one engine alive at a time (two live
  multiprocess CPU engines oversubscribe the cores with spinning OpenMP
  threads). Each phase starts its engine, warms it up, then times ``--reps``
  generate calls.
- ``--interleave``: both engines alive in this process (vLLM's in-process
  engine core, one OpenMP pool); each fresh batch goes to both engines back to
  back, in alternating order (A B, B A, ...), so the machine's slow drifts
  cancel. ``median_pair_ratio`` (median over batches of traced / untraced) is
  the lower-noise estimate.

Engine start is excluded. Every call has fresh prompts, so neither engine
can read a repeated batch from its prefix cache (``--shared-prefix`` makes
prompts of one batch share a prefix on purpose: both engines read it from vLLM's
prefix cache, the traced one replaying its routing from the routing cache;
``--traced-without-prefix-caching`` starts the traced engine with prefix caching
off, so it computes every token). The traced time includes the flush that
writes the shards. Prints and saves
bench/results/overhead-<mode>-<workload>[-interleaved].json: tokens/s of every
timed call (prompt and generated tokens, whether computed or read from the
prefix cache), the tokens each engine computed per call, medians, and the
traced/untraced ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def toy(preset: str) -> Path:
    from moepath.fixtures.toy import build_toy_model

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


def timed_call(llm, engine, batch, label: str, max_tokens: int,
               traced_fraction: float = 1.0) -> tuple[float, int]:
    """(tokens/s, tokens computed) of one generate call over ``batch``; traced when
    ``engine`` is given (the first ``traced_fraction`` of the requests tagged, and the
    flush that writes the shards is timed too). Tokens computed: prompt tokens not read
    from the prefix cache, plus the generated tokens fed back."""
    from vllm import SamplingParams

    from moepath.patches.engine import tag

    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                             ignore_eos=True) for _ in batch]
    if engine is not None:
        traced = round(len(params) * traced_fraction)
        params = [tag(p, f"{label}-s{i}") if i < traced else p for i, p in enumerate(params)]
    tokens = sum(len(p["prompt_token_ids"]) for p in batch) + len(batch) * (max_tokens - 1)
    start = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    if engine is not None:
        engine.flush()
    rate = tokens / (time.perf_counter() - start)
    return rate, tokens - sum(output.num_cached_tokens for output in outputs)


def start_engines(kinds, model: Path, options, traced_options=None) -> dict:
    """{kind: (llm, TracedEngine or None)} for kinds "untraced" / "traced"; the traced
    engine with ``traced_options`` when given."""
    from vllm import LLM

    from moepath.patches.engine import TracedEngine

    engines = {}
    for kind in kinds:
        if kind == "traced":
            engine = TracedEngine(model, tempfile.mkdtemp(prefix="moepath-bench-"),
                                  traced_options or options, commit=False)
            engines[kind] = (engine.llm, engine)
        else:
            engines[kind] = (LLM(**options.llm_kwargs(str(model), None)), None)
    return engines


def stop(llm, engine) -> None:
    if engine is not None:
        engine.close()
        shutil.rmtree(engine.settings.dir, ignore_errors=True)  # the benchmark's traces
    else:
        llm.llm_engine.engine_core.shutdown()


def measure_phases(model: Path, make_batch, options, max_tokens: int, rounds: int,
                   reps: int, traced_fraction: float = 1.0, traced_options=None
                   ) -> tuple[dict, dict]:
    """Phases A B A B ..., one engine alive at a time: a warm-up call, then ``reps``
    timed calls. Call j of every phase gets batch ``make_batch(j)``. Returns the rates
    and tokens computed of each engine's timed calls."""
    rates = {"untraced": [], "traced": []}
    computed = {"untraced": [], "traced": []}
    for _ in range(rounds):
        for kind in rates:
            (llm, engine), = start_engines([kind], model, options, traced_options).values()
            for rep in range(reps + 1):
                rate, tokens = timed_call(llm, engine, make_batch(rep), f"r{rep}", max_tokens,
                                          traced_fraction)
                if rep:
                    rates[kind].append(rate)
                    computed[kind].append(tokens)
            stop(llm, engine)
            gc.collect()
    return rates, computed


def measure_interleaved(model: Path, make_batch, options, max_tokens: int, rounds: int,
                        reps: int, control: bool = False, traced_fraction: float = 1.0,
                        traced_options=None) -> tuple[dict, dict]:
    """Both engines alive in this process (one OpenMP pool, no oversubscription); each
    fresh batch goes to both engines back to back, in alternating order (A B, B A, ...),
    so slow drifts of the machine and any first-mover effect cancel. The first pair
    warms up. ``control``: the second engine is untraced too (an A/A run: what the
    layout itself reads when nothing differs)."""
    # vLLM sizes a CPU engine's KV cache as its share of node memory minus what the
    # process already uses, so the second engine in the process asks for both shares.
    share = options.gpu_memory_utilization / 2
    engines = start_engines(["untraced"], model, replace(options, gpu_memory_utilization=share))
    second = start_engines(["untraced" if control else "traced"], model,
                           replace(options, gpu_memory_utilization=2 * share),
                           replace(traced_options or options, gpu_memory_utilization=2 * share))
    engines["traced"], = second.values()
    rates = {"untraced": [], "traced": []}
    computed = {"untraced": [], "traced": []}
    for call in range(rounds * reps + 1):
        batch = make_batch(call)
        order = list(engines) if call % 2 == 0 else list(reversed(engines))
        for kind in order:
            llm, engine = engines[kind]
            rate, tokens = timed_call(llm, engine, batch, f"c{call}", max_tokens,
                                      traced_fraction)
            if call:
                rates[kind].append(rate)
                computed[kind].append(tokens)
    for llm, engine in engines.values():
        stop(llm, engine)
    return rates, computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["compiled", "eager"], default="compiled")
    parser.add_argument("--preset", default="olmoe-shaped")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="A B phase pairs")
    parser.add_argument("--reps", type=int, default=2, help="timed calls per phase "
                        "(interleaved: rounds x reps timed call pairs)")
    parser.add_argument("--decode", action="store_true",
                        help="decode-heavy: 16-token prompts, 128 generated tokens")
    parser.add_argument("--shared-prefix", type=float, default=0.0,
                        help="fraction of each prompt shared by the batch (few-shot style), "
                             "which both engines read from vLLM's prefix cache")
    parser.add_argument("--traced-without-prefix-caching", action="store_true",
                        help="the traced engine runs with prefix caching off (computes every "
                             "token), the untraced one with it")
    parser.add_argument("--memory", type=float, default=0.3,
                        help="gpu_memory_utilization: the engines' share of host memory "
                             "(both engines together with --interleave)")
    parser.add_argument("--interleave", action="store_true",
                        help="both engines in this process, calls alternating (lower noise)")
    parser.add_argument("--control", action="store_true",
                        help="with --interleave: the second engine is untraced too (A/A: the "
                             "layout's own bias and noise; results keep the key 'traced')")
    parser.add_argument("--store-probs", action="store_true",
                        help="the traced engine also stores every token's router distribution")
    parser.add_argument("--traced-fraction", type=float, default=1.0,
                        help="share of each batch's requests that are tagged (traced); 0: "
                             "none, the traced engine's hook and per-step checks alone")
    args = parser.parse_args()
    if not 0 <= args.traced_fraction <= 1:
        parser.error("--traced-fraction must be in [0, 1]")
    if args.interleave:  # engine cores in this process, sharing one OpenMP thread pool
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    from vllm.inputs import TokensPrompt

    from moepath.patches.options import EngineOptions

    model = toy(args.preset)
    length, max_tokens = (16, 128) if args.decode else (args.tokens, 1)
    shared = int(length * args.shared_prefix)

    def make_batch(seed: int) -> list:
        return [TokensPrompt(prompt_token_ids=p)
                for p in prompts(args.samples, length, seed, shared)]

    options = EngineOptions(enforce_eager=args.mode == "eager", gpu_memory_utilization=args.memory,
                            max_model_len=length + max_tokens + 8, store_probs=args.store_probs)
    workload = "decode" if args.decode else "prefill"
    if shared:
        workload += f"-shared{shared}"
    if args.store_probs:
        workload += "-probs"
    if args.traced_fraction < 1:
        workload += f"-traced{round(100 * args.traced_fraction)}"
    traced_options = None
    if args.traced_without_prefix_caching:
        workload += "-traced-nocache"
        traced_options = replace(options, prefix_caching=False)
    if args.control and not args.interleave:
        parser.error("--control needs --interleave")
    if args.interleave:
        rates, computed = measure_interleaved(
            model, make_batch, options, max_tokens, args.rounds, args.reps,
            control=args.control, traced_fraction=args.traced_fraction,
            traced_options=traced_options)
    else:
        rates, computed = measure_phases(model, make_batch, options, max_tokens, args.rounds,
                                         args.reps, args.traced_fraction, traced_options)
    result = {
        "mode": args.mode, "workload": workload,
        "layout": "interleaved" if args.interleave else "phases", "control": args.control,
        "preset": args.preset, "samples": args.samples, "prompt_tokens": length,
        "max_tokens": max_tokens, "shared_prefix_tokens": shared,
        "store_probs": args.store_probs, "traced_fraction": args.traced_fraction,
        "rounds": args.rounds, "reps": args.reps,
        "traced_prefix_caching": not args.traced_without_prefix_caching,
        "tokens_per_s": rates, "tokens_computed": computed,
        "median_untraced": statistics.median(rates["untraced"]),
        "median_traced": statistics.median(rates["traced"]),
    }
    result["ratio"] = result["median_traced"] / result["median_untraced"]
    if args.interleave:  # traced / untraced of each batch: the drift-free estimate
        pairs = [t / u for t, u in zip(rates["traced"], rates["untraced"], strict=True)]
        result["pair_ratios"] = pairs
        result["median_pair_ratio"] = statistics.median(pairs)
    RESULTS.mkdir(exist_ok=True)
    layout = ("-interleaved" if args.interleave else "") + ("-control" if args.control else "")
    name = f"overhead-{args.mode}-{workload}{layout}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

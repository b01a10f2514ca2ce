"""moepath trace vs tracing by hand with transformers (output_router_logits=True).

Run (from the repository root, inside .venv):

    python bench/bench_vs_hf.py --samples 200 --tokens 128
    python bench/bench_vs_hf.py --samples 200 --tokens 128 --engine-core process
    python bench/bench_vs_hf.py --samples 200 --tokens 128 --no-nll   # without the loss column

Same checkpoint (OLMoE-shaped toy), same token ids. The transformers baseline
is what researchers write by hand: batched forward (batch 16) with
``output_router_logits=True``, softmax and top-k per layer, in float32 and
bfloat16, timed after one warm-up batch. moepath runs the ``moepath trace``
driver (compiled, NLL on unless ``--no-nll``, 256 samples per committed batch;
bfloat16 and float32) on a started engine after a warm-up trace of 32 samples, timed from
the first batch to the committed trace (engine start reported apart), with
vLLM's engine core placed as ``--engine-core`` says (default auto, what
``moepath trace`` does; the choice holds for the whole process, so compare
placements in separate runs). The same batch through a plain untraced
``vllm.LLM`` of the same options (``max_tokens=1``, timed after a warm-up call)
gives vLLM's own speed in the same run, so the capture's share of a miss can be
read off (``moepath_<dtype>_vs_untraced_vllm``).
Prints and saves bench/results/vs-hf-<engine core>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_overhead import RESULTS, prompts, toy


def hf_tokens_per_s(model_path: Path, batch: list[list[int]], dtype: str, top_k: int) -> float:
    """Batches of 16 through transformers with router logits, after one warm-up batch."""
    import torch

    from moepath.fixtures.hf_reference import load_model

    model = load_model(model_path, dtype)

    def forward(ids):
        out = model(torch.tensor(ids), output_router_logits=True)
        for logits in out.router_logits:
            logits.float().softmax(-1).topk(top_k, dim=-1)

    with torch.no_grad():
        forward(batch[:16])
        start = time.perf_counter()
        for i in range(0, len(batch), 16):
            forward(batch[i:i + 16])
    return sum(map(len, batch)) / (time.perf_counter() - start)


def moepath_tokens_per_s(model_path: Path, batch: list[list[int]], dtype: str,
                         engine_core: str, nll: bool) -> tuple[float, float]:
    """(tokens/s of the trace driver's whole path after a warm-up trace, engine start in s)."""
    from bench_scaling import trace_point

    from moepath.patches.engine import TracedEngine
    from moepath.patches.options import EngineOptions, TraceOptions

    options = EngineOptions(max_model_len=512, dtype=dtype, engine_core=engine_core)
    # the benchmark's files, removed when this function returns
    scratch = tempfile.TemporaryDirectory(prefix="moepath-bench-vs-hf-")
    root = Path(scratch.name)
    started = time.perf_counter()
    with TracedEngine(model_path, root / "warmup", options, commit=False) as engine:
        start_s = time.perf_counter() - started
        trace_point(engine, model_path, batch[:32], root / "warmup", options, nll=nll)
        rate = trace_point(engine, model_path, batch, root / "trace", options,
                           TraceOptions().batch_size, nll)
    return rate, start_s


def untraced_vllm_tokens_per_s(model_path: Path, batch: list[list[int]], dtype: str,
                               engine_core: str) -> float:
    """tokens/s of one ``generate`` over ``batch`` (``max_tokens=1``) on a plain
    ``vllm.LLM`` started with the options the traced engine gets, after a warm-up call."""
    from bench_overhead import start_engines, stop, timed_call

    from moepath.patches.options import EngineOptions

    options = EngineOptions(max_model_len=512, dtype=dtype, engine_core=engine_core)
    options.place_engine_core()  # as the traced engine was placed
    llm, _ = start_engines(["untraced"], model_path, options)["untraced"]
    try:
        timed_call(llm, None, [{"prompt_token_ids": ids} for ids in batch[:32]], "warmup", 1)
        return timed_call(llm, None, [{"prompt_token_ids": ids} for ids in batch], "timed", 1)
    finally:
        stop(llm, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        help="moepath (vLLM) dtypes to measure")
    parser.add_argument("--engine-core", choices=["auto", "process", "inline"], default="auto")
    parser.add_argument("--nll", action=argparse.BooleanOptionalAction, default=True,
                        help="moepath computes each sample's NLL (prompt log-probs), as "
                             "`moepath trace` does by default")
    args = parser.parse_args()
    model = toy("olmoe-shaped")
    batch = prompts(args.samples, args.tokens, seed=1)
    result = {"samples": args.samples, "prompt_tokens": args.tokens,
              "engine_core": args.engine_core, "nll": args.nll,
              "hf_float32_tokens_per_s": hf_tokens_per_s(model, batch, "float32", 8),
              "hf_bfloat16_tokens_per_s": hf_tokens_per_s(model, batch, "bfloat16", 8)}
    best_hf = max(result["hf_float32_tokens_per_s"], result["hf_bfloat16_tokens_per_s"])
    for dtype in args.dtypes:
        rate, start_s = moepath_tokens_per_s(model, batch, dtype, args.engine_core, args.nll)
        result[f"moepath_{dtype}_tokens_per_s"] = rate
        result[f"moepath_{dtype}_engine_start_s"] = start_s
        result[f"moepath_{dtype}_vs_best_hf"] = rate / best_hf
        untraced = untraced_vllm_tokens_per_s(model, batch, dtype, args.engine_core)
        result[f"untraced_vllm_{dtype}_tokens_per_s"] = untraced
        result[f"moepath_{dtype}_vs_untraced_vllm"] = rate / untraced
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.nll else "-no-nll"
    (RESULTS / f"vs-hf-{args.engine_core}{suffix}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

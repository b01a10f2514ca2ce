"""Host-side cost of capture per traced call, without an engine, in CPU milliseconds.

Run (from the repository root, inside .venv):

    python bench/bench_capture.py                       # decode-heavy: 64 x (16 + 128)
    python bench/bench_capture.py --prompt 256 --generate 1   # prefill-heavy
    python bench/bench_capture.py --prefix-caching            # + the routing cache
    python bench/bench_capture.py --prefix-caching --untraced  # the routing cache alone

The overhead benchmark measures the ratio that matters, but on a shared
2-core machine single batches vary by +-20%, so a 1% cost hides in the noise.
This benchmark replays the capture path of one ``generate`` call on scripted
runner state (the V1 runner fields ``StepRecorder`` reads: batch order,
``query_start_loc``, positions, token ids) and times each piece in the
calling thread's CPU time (``time.thread_time``), so other load on the
machine barely moves it. Per call of ``--requests`` requests, each a
``--prompt``-token prefill step then ``--generate - 1`` decode steps:

- hook: one MoE layer's record of a step (eager: two buffer copies and, when
  the step is scored, a softmax, timed for a decode step, which skips scoring
  as one that continues its decode run does; compiled: what the hook adds to a
  compiled router, whose kernels inductor fuses its writes and scoring into),
  timed for a decode step and for the prefill step; per call: layers x
  (prefill + decode steps) of the compiled hook;
- rows: ``StepRecorder.after_forward`` over every step (row mapping, host
  copies, prompt sums; with ``--prefix-caching`` also every token's routing
  written to the routing cache at its KV slot, 128-token blocks; with
  ``--untraced`` no request is tagged, so that write is all it does);
- finish: every request's record assembled from its chunks;
- write: the call's records as one routing shard (table, Parquet, fsync,
  sha256), which runs on the sink's thread.

Prints the minimum (the least disturbed repeat: on a shared VM, noise only
adds) and the median over ``--repeats`` and saves
bench/results/capture-<prompt>x<generate>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from moepath.patches import hook
from moepath.patches.recorder import StepRecorder
from moepath.patches.settings import REQUEST_ID_KEY, CaptureSettings
from moepath.tracer import store

RESULTS = Path(__file__).parent / "results"
BLOCK = 128  # KV block, tokens (vLLM's default on CPU)


class KeepRecords:
    """A sink that keeps finished records, so finishing and writing are timed apart."""

    def __init__(self):
        self.records = []

    def add(self, record):
        self.records.append(record)


class ScriptedCall:
    """Runner state of one generate call: all requests prefill in one step, then decode.
    Request i's KV blocks (of ``BLOCK`` tokens) are ``blocks * i`` on."""

    def __init__(self, requests: int, prompt: int, device="cpu", blocks: int = 1,
                 tagged: bool = True):
        from vllm import SamplingParams

        self.req_ids = [f"{i}-abcdefgh" for i in range(requests)]
        self.requests = {
            req_id: SimpleNamespace(sampling_params=SamplingParams(max_tokens=None, extra_args={
                REQUEST_ID_KEY: f"sample-{req_id}"} if tagged else None),
                num_prompt_tokens=prompt)
            for req_id in self.req_ids}
        self.blocks = blocks
        self.kv_cache_config = kv_cache_config(requests * blocks)
        self.input_batch = SimpleNamespace(num_reqs=requests, req_ids=self.req_ids)
        self.prompt = prompt
        self.positions = torch.zeros(requests * prompt, dtype=torch.int64, device=device)
        self.input_ids = SimpleNamespace(
            gpu=torch.arange(requests * prompt, dtype=torch.int32, device=device))

    def schedule(self, step: int) -> None:
        """Step 0 prefills every prompt; step s > 0 decodes position prompt + s - 1."""
        requests = len(self.req_ids)
        width = self.prompt if step == 0 else 1
        self.query_start_loc = SimpleNamespace(
            np=np.arange(requests + 1, dtype=np.int32) * width)
        rows = self.total_tokens = requests * width
        if step == 0:
            self.positions[:rows] = torch.arange(self.prompt).repeat(requests).to(self.positions)
        else:
            self.positions[:rows] = self.prompt + step - 1
        first_block = torch.arange(requests).repeat_interleave(width) * self.blocks
        slots = first_block * BLOCK + self.positions[:rows].cpu()
        self.input_batch.block_table = [SimpleNamespace(slot_mapping=SimpleNamespace(gpu=slots))]


def kv_cache_config(num_blocks: int):
    """A vLLM KV cache config of one full-attention group of ``BLOCK``-token blocks."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=64,
                             dtype=torch.bfloat16)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])


def thread_seconds(function) -> float:
    start = time.thread_time()
    function()
    return time.thread_time() - start


def one_call(args, steps: int, device="cpu") -> dict[str, float]:
    """CPU seconds of rows, finish and write for one scripted call; ``device``: where
    the runner's positions are (and ``hook.BUFFERS`` must be)."""
    routing = SimpleNamespace(layers=[None] * args.layers, top_k=args.top_k,
                              num_experts=args.experts, config={"scoring_func": "softmax"})
    sink = KeepRecords()
    recorder = StepRecorder(CaptureSettings(dir="unused"), routing, sink,
                            prefix_caching=args.prefix_caching)
    call = ScriptedCall(args.requests, args.prompt, device,
                        blocks=-(-(args.prompt + steps) // BLOCK), tagged=not args.untraced)
    rows = 0.0
    for step in range(steps):
        call.schedule(step)
        rows += thread_seconds(lambda: recorder.after_forward(call, call.total_tokens))
    finish = thread_seconds(lambda: recorder.on_finished(call.req_ids))
    assert len(sink.records) == (0 if args.untraced else args.requests)
    assert args.untraced or len(sink.records[0].positions) == args.prompt + steps - 1
    with tempfile.TemporaryDirectory() as tmp:
        write = thread_seconds(lambda: store.write_routing_shard(
            Path(tmp), "shard", sink.records, args.layers, args.top_k, args.experts))
    return {"rows": rows, "finish": finish, "write": write}


def route(logits, layers: int, top_k: int, hooked: bool):
    """Every layer's router as vLLM's CPU MoE layer runs it (top-k of the float32
    softmax of the logits), with or without ``hook.record`` after each. Each
    layer's logits depend on the layer before, so that inductor cannot merge
    the layers."""
    for slot in range(layers):
        weights, ids = torch.topk(torch.softmax(logits, -1, dtype=torch.float32), top_k)
        ids = ids.to(torch.int32)
        if hooked:
            hook.record(slot, logits.shape[-1], logits, weights, ids)
        logits = logits + weights[:, :1].to(logits.dtype)
    return logits


@functools.cache
def compiled_routers(layers: int, top_k: int, hooked: bool):
    """:func:`route` in one graph, compiled and called as vLLM does
    (``fullgraph=True``, dynamic token count, no guard checks)."""

    # two code objects: dynamo caches compiled code per code object, and without
    # guards the second compilation of one would run the first's graph
    def hooked_route(logits):
        return route(logits, layers, top_k, hooked=True)

    def bare_route(logits):
        return route(logits, layers, top_k, hooked=False)

    return torch.compile(hooked_route if hooked else bare_route, fullgraph=True, dynamic=True,
                         options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})


def router_logits(args, rows: int) -> torch.Tensor:
    """A step's router logits [rows, E] as vLLM's CPU router hands them over (bf16)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((rows, args.experts), generator=generator).bfloat16()


def seconds_per_call(function, rows: int) -> float:
    """CPU seconds of one call of ``function`` for a step of ``rows`` tokens, after a
    warm-up (and, compiled, the compilation)."""
    calls = max(20, 128_000 // rows)

    def many():
        for _ in range(calls):
            function()

    many()
    return thread_seconds(many) / calls


def eager_hook_seconds(args, rows: int, scores: bool) -> float:
    """CPU seconds of one layer's eager ``hook.record`` for a step of ``rows`` tokens;
    ``scores``: whether the step scores the router logits (decode steps of a run
    do not)."""
    logits = router_logits(args, rows)
    weights, ids = logits.float().softmax(-1).topk(args.top_k)  # float32, int32 as vLLM's
    ids = ids.to(torch.int32)
    hook.SCORES_WANTED = scores
    try:
        return seconds_per_call(lambda: hook.record(1, args.experts, logits, weights, ids), rows)
    finally:
        hook.SCORES_WANTED = True


def compiled_hook_seconds(args, rows: int) -> float:
    """CPU seconds one layer's hook adds to compiled routers (:func:`compiled_routers`:
    every layer with the hook minus without, per layer) for a step of ``rows``
    tokens; inductor fuses the hook's writes into the routers' kernels, and a
    graph always scores."""
    logits = router_logits(args, rows)
    torch._dynamo.mark_dynamic(logits, 0)  # the token count varies, as in vLLM's graph
    torch._dynamo.mark_static(logits, 1)
    hooked, bare = (compiled_routers(args.layers, args.top_k, with_hook)
                    for with_hook in (True, False))
    return (seconds_per_call(lambda: hooked(logits), rows)
            - seconds_per_call(lambda: bare(logits), rows)) / args.layers


def summary(values: list[float], scale: float) -> dict:
    return {"min": round(min(values) * scale, 2),
            "median": round(statistics.median(values) * scale, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--generate", type=int, default=128)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--prefix-caching", action="store_true",
                        help="the engine reads vLLM's prefix cache: every token's routing is "
                             "also kept in the routing cache")
    parser.add_argument("--untraced", action="store_true",
                        help="no request is tagged (with --prefix-caching: the routing "
                             "cache's cost to untraced requests)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the worker's copies are small; one thread is what they use
    hook.BUFFERS = hook.CaptureBuffers.allocate(
        args.requests * args.prompt, args.layers, args.top_k, args.experts, "cpu")
    hook.BUFFERS.router_scores.uniform_()
    steps = args.generate  # one prefill step (samples the first token) + generate - 1

    calls, decode, prefill = [], {"eager": [], "compiled": []}, []
    for _ in range(args.repeats):  # pieces interleaved, so a slow minute hits all of them
        calls.append(one_call(args, steps))
        decode["eager"].append(eager_hook_seconds(args, args.requests, scores=False))
        decode["compiled"].append(compiled_hook_seconds(args, args.requests))
        prefill.append(compiled_hook_seconds(args, args.requests * args.prompt))
    hook_per_call = [args.layers * (p + d * (steps - 1))
                     for p, d in zip(prefill, decode["compiled"], strict=True)]
    results = {
        "shape": vars(args),
        "hook_us_per_layer_decode_step": {mode: summary(v, 1e6) for mode, v in decode.items()},
        "hook_us_per_layer_prefill_step_compiled": summary(prefill, 1e6),
        "ms_per_call": {
            "hook_compiled": summary(hook_per_call, 1e3),
            **{piece: summary([c[piece] for c in calls], 1e3) for piece in calls[0]},
        },
    }
    results["ms_per_call"]["total_with_compiled_hook"] = summary(
        [c["rows"] + c["finish"] + c["write"] + hook
         for c, hook in zip(calls, hook_per_call, strict=True)], 1e3)
    RESULTS.mkdir(exist_ok=True)
    variant = ("-prefix-caching" if args.prefix_caching else "") + (
        "-untraced" if args.untraced else "")
    out = RESULTS / f"capture-{args.prompt}x{args.generate}{variant}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""The routing hook on CUDA without vLLM: correctness and cost in CUDA graphs and eagerly.

Run on a CUDA machine (from the repository root, moepath importable):

    python bench/bench_cuda_hook.py                 # OLMoE-1B-7B's MoE layers (~12 GiB)
    python bench/bench_cuda_hook.py --device cpu --hidden 256 --intermediate 128  # dry run

On CUDA, vLLM runs the fused-MoE router as eager Python inside its opaque
``moe_forward`` op, and piecewise CUDA graphs capture that op (vLLM 0.32's
``moe_runner.py`` ``_select_forward``; ``moe_forward`` is not a splitting op):
the hook's two copies and softmax are captured once and replayed every step
into the preallocated buffers. This script rebuilds that situation without
vLLM (whose CUDA wheel cannot reach the lent GPU machine, bench/README.md "Not
measured yet"): ``--layers`` MoE layers of OLMoE-1B-7B's shape (hidden 2048,
64 experts of intermediate 1024, top-8, softmax router as vLLM's
``fused_topk``, experts as two ``torch._grouped_mm`` over the tokens sorted by
expert), bf16, with or without ``hook.record`` after each router. Attention
is left out, so the hook's share of a step is larger here than in a model: the
ratios are lower bounds on a model's.

1. Correctness: a CUDA graph captured with the hook is replayed on new
   hidden states; every layer's buffer rows must equal the routing an eager
   pass of the same layers returns (ids and weights exactly, scores as the
   float32 softmax of the logits), and the graph's output must equal the
   hookless graph's bit for bit (the hook does not touch the model).
   The same check runs eagerly at a prefill size.
2. Cost: hooked and hookless graphs are replayed alternately (decode batch
   sizes); eager passes are alternated likewise (``--eager-decode``, as
   ``enforce_eager`` runs decode, and prefill sizes, as vLLM runs steps larger
   than its largest captured graph). Each timing is the mean of
   ``--iters`` calls between CUDA events; medians (min-max) over ``--repeats``.
3. Host side: ``StepRecorder.after_forward`` on CUDA buffers and positions
   (bench_capture.py's scripted decode-heavy call), in CPU milliseconds.

Prints and saves bench/results/cuda-hook.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import bench_capture
import torch
import torch.nn.functional as F

from moepath.patches import hook

RESULTS = Path(__file__).parent / "results"


class MoEStack:
    """``layers`` MoE layers with random weights (bf16); :meth:`forward` is one step.

    Per layer: RMS norm, router logits [n, E] (bf16), top-k of their float32
    softmax (weights float32 [n, k], ids int32 [n, k]), optionally
    ``hook.record``, then the experts' SwiGLU MLPs as grouped matmuls, added to
    the residual. No host sync, so a step can be captured in a CUDA graph.
    """

    def __init__(self, args, device):
        generator = torch.Generator(device).manual_seed(0)

        def weights(*shape):
            scale = shape[-1] ** -0.5
            return (torch.randn(shape, generator=generator, device=device) * scale).bfloat16()

        hidden, inter, experts = args.hidden, args.intermediate, args.experts
        self.top_k = args.top_k
        self.layers = [(weights(experts, hidden),                 # router [E, H]
                        weights(experts, 2 * inter, hidden),      # gate+up [E, 2I, H]
                        weights(experts, hidden, inter))          # down [E, H, I]
                       for _ in range(args.layers)]

    def route(self, x, router):
        """(logits bf16 [n, E], weights float32 [n, k], ids int32 [n, k]) of hidden ``x``."""
        logits = F.rms_norm(x, x.shape[-1:]) @ router.T
        weights, ids = torch.topk(torch.softmax(logits, -1, dtype=torch.float32), self.top_k)
        return logits, weights, ids.to(torch.int32)

    def experts(self, x, weights, ids, gate_up, down):
        """Sum over each token's k experts of weight x SwiGLU MLP: bf16 [n, H]."""
        flat = ids.flatten().long()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        h = torch._grouped_mm(x[order // self.top_k], gate_up.transpose(-2, -1), offs=offsets)
        gate, up = h.chunk(2, -1)
        y = torch._grouped_mm((F.silu(gate) * up).contiguous(), down.transpose(-2, -1),
                              offs=offsets)
        unsorted = torch.empty_like(y)
        unsorted[order] = y * weights.flatten()[order, None].to(y.dtype)
        return unsorted.view(x.shape[0], self.top_k, -1).sum(1)  # no atomics: deterministic

    def forward(self, x, hooked: bool, routes: list | None = None):
        """One step over hidden states ``x`` (bf16 [n, H]); ``routes`` collects each
        layer's (logits, weights, ids) when given."""
        for slot, (router, gate_up, down) in enumerate(self.layers):
            logits, weights, ids = self.route(x, router)
            if hooked:
                hook.record(slot, router.shape[0], logits, weights, ids)
            if routes is not None:
                routes.append((logits, weights, ids))
            x = x + self.experts(x, weights, ids, gate_up, down)
        return x


class Step:
    """A step of ``stack`` over a static input of ``n`` tokens, hooked or not: a
    CUDA graph (``graph=True``, as vLLM replays decode steps) or eager calls."""

    def __init__(self, stack: MoEStack, x: torch.Tensor, hooked: bool, graph: bool):
        self.stack, self.x, self.hooked = stack, x, hooked
        self.graph = None
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up outside the graph, as vLLM does
                    stack.forward(x, hooked)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = stack.forward(x, hooked)

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            self.out = self.stack.forward(self.x, self.hooked)
        else:
            self.graph.replay()
        return self.out


def check_routing(step: Step, bare: Step, x_new: torch.Tensor) -> dict:
    """Run ``step`` (hooked) and ``bare`` on ``x_new``; compare the buffers with an
    eager pass's routing and the two outputs with each other."""
    n = x_new.shape[0]
    step.x.copy_(x_new)
    bare.x.copy_(x_new)
    hook.BUFFERS.expert_ids.fill_(-1)
    hook.BUFFERS.router_scores.fill_(-1)
    hooked_out = step().clone()
    same_output = bool(torch.equal(hooked_out, bare()))
    routes = []
    step.stack.forward(x_new, hooked=False, routes=routes)
    ids_equal = weights_equal = True
    score_error = 0.0
    for slot, (logits, weights, ids) in enumerate(routes):
        got_ids, got_weights, got_scores = hook.BUFFERS.rows(slot, n)
        ids_equal &= bool(torch.equal(got_ids, ids))
        weights_equal &= bool(torch.equal(got_weights, weights))
        expected = torch.softmax(logits.float(), -1)
        score_error = max(score_error, float((got_scores - expected).abs().max()))
    passed = ids_equal and weights_equal and same_output and score_error < 1e-6
    return {"tokens": n, "passed": passed, "ids_equal": ids_equal,
            "weights_equal": weights_equal, "max_score_error": score_error,
            "output_equal_to_hookless": same_output}


def timed_ms(function, iters: int) -> float:
    """Mean milliseconds of one call of ``function`` over ``iters`` calls: between CUDA
    events, or in CPU time on a dry run."""

    def calls():
        for _ in range(iters):
            function()

    if not torch.cuda.is_available():
        return bench_capture.thread_seconds(calls) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    calls()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def compare(hooked: Step, bare: Step, args) -> dict:
    """Alternate the two steps; medians (min-max) over repeats and their ratio."""
    times = {"hooked": [], "hookless": []}
    for step in (hooked, bare):
        timed_ms(step, 3)
    for _ in range(args.repeats):
        times["hooked"].append(timed_ms(hooked, args.iters))
        times["hookless"].append(timed_ms(bare, args.iters))
    median = {name: statistics.median(values) for name, values in times.items()}
    hook_ms = median["hooked"] - median["hookless"]
    return {
        "ms_per_step": {name: {"median": round(median[name], 4), "min": round(min(v), 4),
                               "max": round(max(v), 4)} for name, v in times.items()},
        "throughput_ratio": round(median["hookless"] / median["hooked"], 4),
        "hook_us_per_layer": round(hook_ms * 1e3 / args.layers, 2),
    }


def hidden_states(args, n: int, device, seed: int) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn((n, args.hidden), generator=generator, device=device).bfloat16()


def host_side(args, device) -> dict:
    """bench_capture's decode-heavy scripted call with CUDA buffers and positions:
    CPU milliseconds of ``after_forward`` (rows), finishing and writing."""
    capture_args = argparse.Namespace(requests=64, prompt=16, layers=args.layers,
                                      top_k=args.top_k, experts=args.experts,
                                      prefix_caching=False, untraced=False)
    hook.BUFFERS = hook.CaptureBuffers.allocate(
        64 * 16, args.layers, args.top_k, args.experts, device)
    hook.BUFFERS.router_scores.uniform_()
    runs = [bench_capture.one_call(capture_args, steps=128, device=device) for _ in range(5)]
    return {piece: round(statistics.median(run[piece] for run in runs) * 1e3, 2)
            for piece in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--decode", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--eager-decode", type=int, nargs="+", default=[64])
    parser.add_argument("--prefill", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS / "cuda-hook.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    graphs = device.type == "cuda"
    stack = MoEStack(args, device)
    hook.BUFFERS = hook.CaptureBuffers.allocate(
        max(args.decode + args.eager_decode + args.prefill), args.layers, args.top_k,
        args.experts, device)
    modes = (("decode", args.decode, graphs), ("eager_decode", args.eager_decode, False),
             ("prefill", args.prefill, False))
    results = {"device": torch.cuda.get_device_name(device) if graphs else platform.processor(),
               "torch": torch.__version__,
               "shape": {name: value for name, value in vars(args).items() if name != "out"},
               **{mode: {} for mode, *_ in modes}}
    for mode, sizes, graph in modes:
        for n in sizes:
            x = hidden_states(args, n, device, seed=1)
            hooked, bare = (Step(stack, x.clone(), with_hook, graph)
                            for with_hook in (True, False))
            check = check_routing(hooked, bare, hidden_states(args, n, device, seed=2))
            results[mode][n] = {"cuda_graph": graph, "check": check,
                                **compare(hooked, bare, args)}
            print(mode, n, json.dumps(results[mode][n]), flush=True)
            del hooked, bare
    results["host_ms_per_call_64x(16+128)"] = host_side(args, device)
    results["passed"] = all(entry["check"]["passed"]
                            for mode, *_ in modes for entry in results[mode].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

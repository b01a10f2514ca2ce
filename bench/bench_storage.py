"""Bytes per sample on disk: a per-token trace against a per-sample one (``--store``).

Run (from the repository root, inside .venv):

    python bench/bench_storage.py --samples 64 --tokens 2048

Writes ``--samples`` OLMoE-1B-7B-shaped samples (16 MoE layers, 64 experts, top-8,
``--tokens`` prompt tokens each, random routing) twice through the store's own
writers, as a traced engine's worker writes them: every token's routing
(``--store per-token``) and each sample's per-layer summaries (``--store
per-sample``), each with its samples table and router matrices (hidden 2048). No
engine: the bytes depend on the shapes, not on where the routing came from (the
per-token blobs are stored uncompressed). Reports the shard bytes per sample of
each (routing and samples tables), their ratio, the bytes each trace has once
(manifest, router matrices), and the size of one checkpoint's trace of 100,000
samples; saves bench/results/storage.json.

:func:`write_per_sample_trace` is also the synthetic trace that ``bench_memory.py
--metrics-samples`` runs ``moepath metrics`` over.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from bench_overhead import RESULTS

LAYERS, EXPERTS, TOP_K, HIDDEN = 16, 64, 8, 2048  # OLMoE-1B-7B
SHARD = 1024  # samples per committed shard


def routing_record(sample_id: str, tokens: int, rng: np.random.Generator):
    """One prompt's random routing: per token and layer, the top-k of a random router."""
    from moepath.tracer import store

    probs = rng.dirichlet(np.full(EXPERTS, 0.3), size=(tokens, LAYERS)).astype(np.float32)
    ids = np.argsort(-probs, -1)[..., :TOP_K]
    weights = np.take_along_axis(probs, ids, -1)
    return store.RoutingRecord(
        sample_id=sample_id, request_id=sample_id, completion=0, num_prompt_tokens=tokens,
        positions=np.arange(tokens, dtype=np.int32),
        token_ids=rng.integers(0, 50_000, tokens).astype(np.int32),
        expert_ids=ids.astype(np.uint8), gate_weights=weights / weights.sum(-1, keepdims=True),
        router_mean=probs.mean(0))


def summary(sample_id: str, tokens: int, rng: np.random.Generator):
    """The per-sample summaries of a random prompt, drawn directly (no per-token arrays)."""
    from moepath.tracer import store

    router_mean = rng.dirichlet(np.full(EXPERTS, 0.3), size=LAYERS)  # float64: sums to 1
    counts = rng.multinomial(tokens * TOP_K, router_mean).astype(np.int32)
    return store.RoutingSummary(
        sample_id=sample_id, request_id=sample_id, completion=0, num_prompt_tokens=tokens,
        num_tokens=tokens, router_mean=router_mean.astype(np.float32),
        topk_mean=(counts / (tokens * TOP_K)).astype(np.float32), topk_counts=counts)


def write_trace(out: Path, samples: int, tokens: int, per_sample: bool,
                draw_summaries: bool = False) -> dict[str, int]:
    """Write a complete trace of ``samples`` random samples into ``out``; returns its bytes:
    ``shards`` (routing and samples, growing with the samples) and ``fixed`` (manifest and
    router matrices, once per trace).

    ``per_sample``: keep summaries (``RoutingSummary.of`` each record, as the worker does,
    or drawn directly with ``draw_summaries``, fast enough for 200,000 samples)."""
    from moepath.tracer import store
    from moepath.tracer.manifest import Manifest, ModelInfo
    from moepath.tracer.writer import TraceWriter

    rng = np.random.default_rng(0)
    writer = TraceWriter.open(out)
    writer.begin(Manifest(model=ModelInfo(num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K,
                                          architecture="OlmoeForCausalLM"),
                          store=store.PER_SAMPLE if per_sample else store.PER_TOKEN),
                 router_weights=[rng.normal(size=(EXPERTS, HIDDEN)).astype(np.float32)
                                 for _ in range(LAYERS)])
    for start in range(0, samples, SHARD):
        ids = [f"s{i}" for i in range(start, min(start + SHARD, samples))]
        name = f"run-r0-{start // SHARD:06d}"
        if per_sample and draw_summaries:
            shard = store.write_summary_shard(out, name, [summary(s, tokens, rng) for s in ids],
                                              LAYERS, TOP_K, EXPERTS)
        elif per_sample:
            summaries = [store.RoutingSummary.of(routing_record(s, tokens, rng), EXPERTS)
                         for s in ids]
            shard = store.write_summary_shard(out, name, summaries, LAYERS, TOP_K, EXPERTS)
        else:
            shard = store.write_routing_shard(out, name,
                                              [routing_record(s, tokens, rng) for s in ids],
                                              LAYERS, TOP_K, EXPERTS)
        frame = pd.DataFrame({"sample_id": ids, "num_tokens": tokens, "truncated": False,
                              "nll": rng.uniform(1, 4, len(ids))})
        writer.commit(routing=[shard], samples=pa.Table.from_pandas(frame, preserve_index=False))
    writer.finish(truncated=0, skipped_lines=0)
    sizes = {"shards": 0, "fixed": 0}
    for path in out.rglob("*"):
        if path.is_file():
            sizes["shards" if path.parent != out else "fixed"] += path.stat().st_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moepath-bench-storage-") as scratch:
        sizes = {kind: write_trace(Path(scratch) / kind, args.samples, args.tokens,
                                   kind == "per-sample")
                 for kind in ("per-token", "per-sample")}
    per = {kind: size["shards"] / args.samples for kind, size in sizes.items()}
    result = {"samples": args.samples, "tokens": args.tokens,
              "shape": {"layers": LAYERS, "experts": EXPERTS, "top_k": TOP_K},
              "bytes_per_sample": per, "ratio": per["per-token"] / per["per-sample"],
              "fixed_bytes_per_trace": {kind: size["fixed"] for kind, size in sizes.items()},
              "checkpoint_of_100000_samples_gb": {
                  kind: (per[kind] * 100_000 + sizes[kind]["fixed"]) / 1e9 for kind in sizes}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storage.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

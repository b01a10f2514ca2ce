"""Scale: thousands of samples stream through the store complete, each exactly once.

The 50,000-sample run with flat memory is a benchmark (bench/bench_memory.py);
this test keeps to 5,000 samples to stay within CI time.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import TEST_MEMORY, write_jsonl

from moepath.fixtures.toy import corpus
from moepath.tracer import Trace

pytestmark = pytest.mark.vllm

N = 5000


def test_5000_samples_are_traced_completely_each_exactly_once(toy_olmoe, tmp_path):
    from moepath.patches.engine import trace_samples
    from moepath.patches.options import EngineOptions, TraceOptions
    from moepath.tracer.samples import SampleReadOptions, read_samples

    lines = corpus(N, seed=5)
    samples = write_jsonl(tmp_path / "many.jsonl",
                          [{"id": f"n{i}", "text": line} for i, line in enumerate(lines)])
    summary = trace_samples(
        toy_olmoe, read_samples(samples, SampleReadOptions()), tmp_path / "trace",
        EngineOptions(enforce_eager=True, max_model_len=128, gpu_memory_utilization=TEST_MEMORY),
        TraceOptions(batch_size=1000))

    trace = Trace.open(tmp_path / "trace")
    assert summary.samples == N and trace.manifest.status == "complete"
    assert trace.manifest.counts.samples == N
    assert len(trace.manifest.sample_shards) == 5  # one commit per batch of 1,000
    table = trace.samples.set_index("sample_id")
    assert sorted(table.index) == sorted(f"n{i}" for i in range(N))
    assert table["nll"].notna().all()

    routing = [pq.read_table(tmp_path / "trace" / entry.file,
                             columns=["sample_id", "positions", "expert_ids"])
               for entry in trace.manifest.routing_shards]
    ids = [sid for shard in routing for sid in shard["sample_id"].to_pylist()]
    assert len(ids) == len(set(ids)) == N
    lengths = {sid: n for shard in routing for sid, n in zip(
        shard["sample_id"].to_pylist(), pc.list_value_length(shard["positions"]).to_pylist(),
        strict=True)}
    assert all(lengths[sid] == table.loc[sid, "num_tokens"] for sid in ids)
    assert sum(lengths.values()) == trace.manifest.counts.tokens
    # spot-check a few samples end to end: positions 0..n-1 and in-range expert ids
    for sid in ("n0", "n2500", f"n{N - 1}"):
        expert_ids, weights = trace.topk(sid)
        assert expert_ids.shape == (table.loc[sid, "num_tokens"], 4, 4)
        assert expert_ids.min() >= 0 and expert_ids.max() < 16
        assert np.all(weights > 0)

"""Serving checkpoints in turn: in-place reload is exact, complete traces are skipped."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import TEST_MEMORY

from moepath.patches.engine import EngineOptions, TraceOptions, trace_samples
from moepath.patches.sweep import trace_checkpoints
from moepath.tracer import Trace
from moepath.tracer.samples import SampleReadOptions, read_samples

pytestmark = pytest.mark.vllm

EAGER = EngineOptions(enforce_eager=True, max_model_len=512, gpu_memory_utilization=TEST_MEMORY)


def assert_same_trace(a: Trace, b: Trace) -> None:
    """Bit-identical routing and losses (same engine configuration, same weights)."""
    assert sorted(a.sample_ids()) == sorted(b.sample_ids())
    for sid in a.sample_ids():
        ids_a, w_a = a.topk(sid)
        ids_b, w_b = b.topk(sid)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(w_a, w_b)
        np.testing.assert_array_equal(a.router_mean(sid), b.router_mean(sid))
    nll_a, nll_b = (t.samples.set_index("sample_id")["nll"].sort_index() for t in (a, b))
    np.testing.assert_array_equal(nll_a, nll_b)


def test_reloaded_engine_equals_a_freshly_started_one(toy_factory, samples_file, tmp_path):
    samples = read_samples(samples_file, SampleReadOptions(limit=16))
    first, second = toy_factory("olmoe", seed=0), toy_factory("olmoe", seed=3)
    events = []
    trace_checkpoints([("a", first), ("b", second)], samples, tmp_path / "traces", EAGER,
                      TraceOptions(), on_checkpoint=events.append)
    assert [(e.name, e.action) for e in events] == [("a", "start"), ("b", "reload")]
    trace_samples(second, samples, tmp_path / "fresh", EAGER, TraceOptions())
    assert_same_trace(Trace.open(tmp_path / "traces" / "b"), Trace.open(tmp_path / "fresh"))
    # the checkpoints really differ (the reload changed the weights)
    ids_a, _ = Trace.open(tmp_path / "traces" / "a").topk("s0")
    ids_b, _ = Trace.open(tmp_path / "traces" / "b").topk("s0")
    assert not np.array_equal(ids_a, ids_b)

    # re-running skips complete traces; deleting one recomputes only that one
    events.clear()
    shutil.rmtree(tmp_path / "traces" / "b")
    trace_checkpoints([("a", first), ("b", second)], samples, tmp_path / "traces", EAGER,
                      TraceOptions(), on_checkpoint=events.append)
    assert [(e.name, e.action) for e in events] == [("a", "skip"), ("b", "start")]
    assert_same_trace(Trace.open(tmp_path / "traces" / "b"), Trace.open(tmp_path / "fresh"))

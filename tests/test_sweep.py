"""Serving checkpoints in turn: in-place reload is exact, complete traces are skipped,
traces that do not fit the sweep are refused before any engine starts."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import TEST_MEMORY, files_of, write_jsonl

from moepath.patches.engine import trace_samples
from moepath.patches.options import EngineOptions, TraceOptions
from moepath.patches.sweep import trace_checkpoints
from moepath.tracer import Trace
from moepath.tracer.errors import InputError
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
    # router matrices are read back from the served model after the reload: b's, not a's
    routers = {name: Trace.open(tmp_path / name).router_weights()
               for name in ("traces/a", "traces/b", "fresh")}
    np.testing.assert_array_equal(np.stack(routers["traces/b"]), np.stack(routers["fresh"]))
    assert not np.array_equal(routers["traces/a"][0], routers["traces/b"][0])
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


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_reload_drops_vllms_rotary_cache_warning_and_no_other():
    """vLLM warns on every in-place reload that rotary embeddings loaded no weights (their
    cos/sin cache is computed, and put back as it was): moepath drops that line only."""
    from moepath.patches import reload

    logger, lines = logging.getLogger(reload._RELOAD_LOGGER), Lines()
    logger.addHandler(lines)
    try:
        with reload._rotary_cache_warning_dropped():
            for layer in ("RotaryEmbedding", "Llama3RotaryEmbedding", "QKVParallelLinear"):
                logger.warning("%s: Failed to load weights", layer)
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
    finally:
        logger.removeHandler(lines)
    assert lines.lines == ["QKVParallelLinear: Failed to load weights",
                           "RotaryEmbedding: Failed to load weights"]


def test_a_trace_of_other_samples_is_refused_before_any_checkpoint_is_traced(
        olmoe_trace, toy_factory, tmp_path, no_engine):
    traces = tmp_path / "traces"
    shutil.copytree(olmoe_trace, traces / "b")  # the standard samples, toy OLMoE seed 0
    before = files_of(traces / "b")
    other = read_samples(write_jsonl(tmp_path / "other.jsonl", [{"id": "x", "text": "a b c"}]))
    models = [("a", toy_factory("olmoe", seed=3)), ("b", toy_factory("olmoe"))]
    with pytest.raises(InputError, match=(
            re.escape(f"cannot resume '{traces / 'b'}': it was traced from a different samples "
                      f"file") + r".*; pass the same samples to resume, or another --out "
                                 r"\(or delete '.*'\) to start over")):
        trace_checkpoints(models, other, traces, EAGER, TraceOptions())
    assert not (traces / "a").exists()  # refused before checkpoint a was traced
    assert files_of(traces / "b") == before


def test_a_complete_trace_is_skipped_only_with_the_same_settings_and_checkpoint(
        olmoe_trace, toy_factory, samples_file, tmp_path, no_engine):
    traces = tmp_path / "traces"
    shutil.copytree(olmoe_trace, traces / "a")
    before = files_of(traces / "a")
    samples, events = read_samples(samples_file), []
    assert trace_checkpoints([("a", toy_factory("olmoe"))], samples, traces, EAGER,
                             TraceOptions(), on_checkpoint=events.append) == [None]
    assert [(e.name, e.action) for e in events] == [("a", "skip")]
    with pytest.raises(InputError, match=r"other settings \(--dtype bfloat16, now float32\)"):
        trace_checkpoints([("a", toy_factory("olmoe"))], samples, traces,
                          replace(EAGER, dtype="float32"), TraceOptions())
    with pytest.raises(InputError, match=r"another model \(its router weights differ"):
        trace_checkpoints([("a", toy_factory("olmoe", seed=3))], samples, traces, EAGER,
                          TraceOptions())
    assert files_of(traces / "a") == before

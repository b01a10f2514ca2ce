"""The offline driver: who owns the shards flush() returns, and what --resume accepts.

Flush and switch tests run against a fake ``vllm.LLM`` that answers
``collective_rpc`` as moepath's workers do. Resume tests refuse before any engine
starts, on a copy of the session's trace (``olmoe_trace``).
"""

from __future__ import annotations

import shutil

import pytest
from conftest import TEST_MEMORY

from moepath.patches.engine import EngineOptions, TracedEngine, TraceOptions, trace_samples
from moepath.tracer import Trace, store
from moepath.tracer.errors import CaptureError, InputError
from moepath.tracer.samples import read_samples
from moepath.tracer.store import ShardInfo

SHARD = {"file": "routing/run-r0-000000.parquet", "sha256": "ab" * 32, "rows": 2, "tokens": 9}


class FakeLLM:
    """Stands in for ``vllm.LLM``: records the worker calls; ``pending`` holds the shard
    dicts the worker writes at its next flush."""

    def __init__(self, **kwargs):
        self.calls: list[str] = []
        self.pending: list[dict] = []

    def collective_rpc(self, method: str, kwargs: dict | None = None) -> list:
        self.calls.append(method)
        if method == "moepath_describe":
            return [{"reload_blocker": None}]
        if method == "moepath_flush":
            shards, self.pending = self.pending, []
            return [{"shards": shards, "error": None, "requests_recomputed": 0}]
        return [None]

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")


@pytest.fixture
def fake_vllm(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")


def test_flush_is_refused_when_the_worker_commits_its_own_trace(fake_vllm, tmp_path):
    engine = TracedEngine("ckpt-a", tmp_path / "a")  # commit=True: the worker commits
    engine.llm.pending = [SHARD]
    with pytest.raises(CaptureError, match=r"commits its own trace directory \(commit=True\); "
                                           r"start it with commit=False to flush and commit"):
        engine.flush()
    assert engine.llm.pending == [SHARD]  # still the committer's to commit
    with pytest.raises(CaptureError, match="start it with commit=False to switch directories"):
        engine.retarget(tmp_path / "b")


def test_switching_checkpoints_returns_the_shards_flushed_into_the_previous_directory(
        fake_vllm, tmp_path):
    engine = TracedEngine("ckpt-a", tmp_path / "a", commit=False)
    engine.llm.pending = [SHARD]  # a generate call the caller did not flush
    shards = engine.switch_checkpoint("ckpt-b", tmp_path / "b")
    assert shards == [ShardInfo(**SHARD)]  # to commit in tmp_path / "a"
    assert engine.llm.calls == ["moepath_describe", "moepath_flush", "moepath_switch",
                                "reset_prefix_cache"]
    assert engine.settings.dir == str(tmp_path / "b") and str(engine.model) == "ckpt-b"
    # a caller that flushed after its last generate gets nothing back
    assert engine.retarget(tmp_path / "c") == []
    assert engine.settings.dir == str(tmp_path / "c")


# what the session's olmoe_trace was traced with (conftest.py)
TRACED_WITH = {"max_model_len": 512, "gpu_memory_utilization": TEST_MEMORY}


@pytest.fixture
def trace_copy(olmoe_trace, tmp_path):
    """A complete trace of the standard samples (toy OLMoE seed 0, bf16, context 512)."""
    return shutil.copytree(olmoe_trace, tmp_path / "trace")


def resume(model, samples_file, out, engine: dict | None = None, trace: dict | None = None):
    """``trace_samples(..., resume=True)`` with olmoe_trace's options, changed by
    ``engine`` (EngineOptions fields) and ``trace`` (TraceOptions fields)."""
    return trace_samples(model, read_samples(samples_file), out,
                         EngineOptions(**{**TRACED_WITH, **(engine or {})}),
                         TraceOptions(**(trace or {})), resume=True)


def assert_untouched(trace_dir) -> None:
    trace = Trace.open(trace_dir)  # verifies every checksum, router.safetensors included
    assert trace.manifest["status"] == "complete" and len(trace.samples) == 43


@pytest.mark.vllm
@pytest.mark.parametrize("engine, trace, named", [
    ({"dtype": "float32"}, {}, "--dtype bfloat16, now float32"),
    ({}, {"max_tokens": 4}, "--max-tokens 0, now 4"),
    ({}, {"nll": False}, "--nll True, now False"),
    ({"store_probs": True}, {}, "--store-probs False, now True"),
    ({}, {"truncate": True}, "--truncate False, now True"),
], ids=["dtype", "max-tokens", "nll", "store-probs", "truncate"])
def test_resuming_with_settings_that_change_the_records_is_refused(
        trace_copy, toy_olmoe, samples_file, engine, trace, named):
    with pytest.raises(InputError, match=rf"cannot resume '.*': it was traced with other "
                                         rf"settings \({named}\); pass the same settings to "
                                         rf"resume, or --force or another --out to start over"):
        resume(toy_olmoe, samples_file, trace_copy, engine, trace)
    assert_untouched(trace_copy)


@pytest.mark.vllm
def test_the_context_must_match_only_when_samples_are_truncated(
        trace_copy, toy_olmoe, samples_file):
    summary = resume(toy_olmoe, samples_file, trace_copy, {"max_model_len": 1024},
                     {"batch_size": 4})  # nothing is cut: a longer context changes nothing
    assert (summary.samples, summary.resumed_samples) == (0, 43)
    manifest = store.read_manifest(trace_copy)
    manifest["options"]["truncate"] = True
    store.write_manifest(trace_copy, manifest)
    with pytest.raises(InputError, match=r"other settings \(--max-model-len 512, now 1024\)"):
        resume(toy_olmoe, samples_file, trace_copy, {"max_model_len": 1024}, {"truncate": True})


@pytest.mark.vllm
@pytest.mark.parametrize("arch, seed, why", [
    ("olmoe", 3, "its router weights differ"),  # another checkpoint of the same config
    ("mixtral", 0, "its config.json differs"),
], ids=["other-checkpoint", "other-config"])
def test_resuming_with_another_model_is_refused(
        trace_copy, toy_factory, samples_file, arch, seed, why):
    other = toy_factory(arch, seed=seed)
    with pytest.raises(InputError, match=rf"it was traced with another model \({why}: '.*', "
                                         rf"now '{other.resolve()}'\); pass the same model"):
        resume(other, samples_file, trace_copy)
    assert_untouched(trace_copy)


@pytest.mark.vllm
def test_a_trace_that_predates_the_recorded_fields_still_resumes(
        trace_copy, toy_olmoe, samples_file):
    manifest = store.read_manifest(trace_copy)
    del manifest["model"]["config_sha256"], manifest["options"]["dtype"]
    store.write_manifest(trace_copy, manifest)
    summary = resume(toy_olmoe, samples_file, trace_copy)
    assert (summary.samples, summary.resumed_samples) == (0, 43)


@pytest.mark.vllm
def test_resuming_with_samples_read_under_other_ids_is_refused(trace_copy, toy_olmoe,
                                                              samples_file):
    manifest = store.read_manifest(trace_copy)
    assert manifest["input"]["read"]["id_field"] == "id"
    manifest["input"]["read"]["id_field"] = "uid"  # as if traced with --id-field uid
    store.write_manifest(trace_copy, manifest)
    with pytest.raises(InputError, match=r"its samples were read otherwise \(--id-field uid, "
                                         r"now id\); pass the same samples to resume"):
        resume(toy_olmoe, samples_file, trace_copy)

"""The offline driver: who owns the shards flush() returns, and what --resume accepts.

Flush and switch tests run against a fake ``vllm.LLM`` that answers
``collective_rpc`` as moepath's workers do. Resume tests refuse before any engine
starts, on a copy of the session's trace (``olmoe_trace``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TEST_MEMORY, write_jsonl

from moepath.patches.engine import TracedEngine, trace_samples
from moepath.patches.options import EngineOptions, TraceOptions
from moepath.tracer import Trace, checkpoints, store
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
            return [{"num_layers": 4, "layer_ids": [0, 1, 2, 3], "num_experts": 16, "top_k": 4,
                     "routing": {}, "writer": True, "reload_blocker": None}]
        if method == "moepath_flush":
            shards, self.pending = self.pending, []
            return [{"shards": shards, "error": None, "rejected": [], "requests_recomputed": 0,
                     "tokens_replayed": 0}]
        return [None]

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")


@pytest.fixture
def fake_vllm(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")


def checkpoint(root, name: str, architecture: str = "OlmoeForCausalLM") -> Path:
    """A model folder holding only the config.json of a small MoE of ``architecture``."""
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": [architecture], "num_hidden_layers": 4, "num_experts": 16,
        "num_experts_per_tok": 4}))
    return folder


def test_an_architecture_this_vllm_cannot_load_is_refused_before_an_engine_starts(
        no_engine, tmp_path):
    from moepath.tracer.errors import ModelError

    with pytest.raises(ModelError, match=(
            r"^vLLM 0.32.0 cannot serve DbrxForCausalLM: its DBRX weight loader names the "
            r"expert weights 'experts.w13_weight', .* traced or not; trace it with a vLLM "
            r"release that loads it$")):
        TracedEngine(checkpoint(tmp_path, "dbrx", "DbrxForCausalLM"), tmp_path / "t")


def test_an_architecture_whose_vllm_code_needs_a_missing_package_is_refused_naming_it(
        no_engine, tmp_path):
    import importlib.util

    from moepath.tracer.errors import ModelError

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    with pytest.raises(ModelError, match=(
            r"^vLLM cannot serve Qwen3_5MoeForCausalLM without torchvision \(vLLM's Qwen3.5 "
            r"code imports its vision encoder, whose image processor needs torchvision\), "
            r"which is not installed; install the torchvision build matching this torch$")):
        TracedEngine(checkpoint(tmp_path, "qwen35", "Qwen3_5MoeForCausalLM"), tmp_path / "t")


class RefusingLLM:
    """Stands in for a ``vllm.LLM`` whose worker refused the model at load: the plugin left
    its reason where the settings say, then vLLM raised its own error, without it."""

    def __init__(self, **kwargs):
        from moepath.patches.settings import CaptureSettings, write_refusal

        settings = CaptureSettings.parse(kwargs["additional_config"]["moepath"])
        RefusingLLM.refusal_file = Path(settings.refusal_file)
        write_refusal(settings, "moepath: MoE layer 'model.layers.0.mlp.experts' is routed by "
                                "the model's own transformers code")
        raise RuntimeError("Engine core initialization failed. See root cause above. Failed "
                           "core proc(s): {}")


def test_a_model_a_worker_refuses_at_load_fails_the_start_with_the_workers_reason(
        monkeypatch, tmp_path):
    import vllm

    from moepath.tracer.errors import ModelError

    monkeypatch.setattr(vllm, "LLM", RefusingLLM)
    with pytest.raises(ModelError, match=r"^MoE layer 'model.layers.0.mlp.experts' is routed by "
                                         r"the model's own transformers code$"):
        TracedEngine(checkpoint(tmp_path, "ckpt-a"), tmp_path / "a", commit=False)
    assert not RefusingLLM.refusal_file.parent.exists()  # the driver's, removed


def test_flush_is_refused_when_the_worker_commits_its_own_trace(fake_vllm, tmp_path):
    engine = TracedEngine(checkpoint(tmp_path, "ckpt-a"), tmp_path / "a")  # the worker commits
    engine.llm.pending = [SHARD]
    with pytest.raises(CaptureError, match=r"commits its own trace directory \(commit=True\); "
                                           r"start it with commit=False to flush and commit"):
        engine.flush()
    assert engine.llm.pending == [SHARD]  # still the committer's to commit
    with pytest.raises(CaptureError, match="start it with commit=False to switch directories"):
        engine.retarget(tmp_path / "b")


def test_switching_checkpoints_returns_the_shards_flushed_into_the_previous_directory(
        fake_vllm, tmp_path):
    engine = TracedEngine(checkpoint(tmp_path, "ckpt-a"), tmp_path / "a", commit=False)
    engine.llm.pending = [SHARD]  # a generate call the caller did not flush
    shards = engine.switch_checkpoint(checkpoint(tmp_path, "ckpt-b"), tmp_path / "b")
    assert shards == [ShardInfo(**SHARD)]  # to commit in tmp_path / "a"
    assert engine.llm.calls == ["moepath_describe", "moepath_flush", "moepath_switch",
                                "reset_prefix_cache"]
    assert engine.settings.dir == str(tmp_path / "b") and engine.model.name == "ckpt-b"
    # a caller that flushed after its last generate gets nothing back
    assert engine.retarget(tmp_path / "c") == []
    assert engine.settings.dir == str(tmp_path / "c")


class RecordingLLM(FakeLLM):
    """A FakeLLM that records the routing of every tagged prompt as moepath's worker does
    (one routing shard per flush, into the engine's trace directory), until its
    ``failing_flush``-th flush (1-based), which goes wrong as ``failure`` says: ``error``,
    the worker's write failed; ``empty``, nothing was recorded."""

    def __init__(self, failing_flush: int, failure: str, **kwargs):
        super().__init__()
        shape = checkpoints.moe_shape(kwargs["model"])
        self.shape = (shape.num_hidden_layers, shape.top_k, shape.num_experts)
        self.trace_dir = Path(kwargs["additional_config"]["moepath"]["dir"])
        self.failing_flush, self.failure = failing_flush, failure
        self.routers = checkpoints.router_weights(kwargs["model"], shape.num_experts)
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(max_model_len=kwargs["max_model_len"]),
            engine_core=SimpleNamespace(shutdown=lambda: None))

    def collective_rpc(self, method: str, kwargs: dict | None = None) -> list:
        if method == "moepath_describe":
            layers, top_k, experts = self.shape
            return [{"num_layers": layers, "layer_ids": list(range(layers)),
                     "num_experts": experts, "top_k": top_k, "reload_blocker": None}]
        if method == "moepath_router_weights":  # the writer's reply, then a non-writer's
            weight = self.routers[kwargs["slot"]]
            return [{"weight": weight.tobytes(), "shape": list(weight.shape), "bias": None,
                     "linear": f"model.layers.{kwargs['slot']}.mlp.gate"}, None]
        replies = super().collective_rpc(method, kwargs)
        if method == "moepath_flush" and self.calls.count(method) == self.failing_flush:
            replies[0]["shards"] = []
            if self.failure == "error":
                replies[0]["error"] = "routing shard write failed: No space left on device"
        return replies

    def generate(self, prompts, params, use_tqdm=False) -> list:
        layers, top_k, experts = self.shape
        records = [store.RoutingRecord(
            sample_id=p.extra_args["moepath_id"], request_id=str(i), completion=0,
            num_prompt_tokens=len(prompt["prompt_token_ids"]),
            positions=np.arange(len(prompt["prompt_token_ids"]), dtype=np.int32),
            token_ids=np.int32(prompt["prompt_token_ids"]),
            expert_ids=np.zeros((len(prompt["prompt_token_ids"]), layers, top_k), np.uint8),
            gate_weights=np.full((len(prompt["prompt_token_ids"]), layers, top_k), 1 / top_k,
                                 np.float32),
            router_mean=np.full((layers, experts), 1 / experts, np.float32))
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))]
        run = f"run-fake-{self.calls.count('moepath_flush'):06d}"
        self.pending.append(asdict(store.write_routing_shard(self.trace_dir, run, records,
                                                             *self.shape)))
        return [SimpleNamespace(prompt_logprobs=None) for _ in prompts]


@pytest.mark.parametrize("failure, message", [
    ("error", "routing capture failed in the engine: routing shard write failed: No space "
              "left on device"),
    ("empty", "1 traced sample(s) recorded no routing (first: 'b'); the trace is marked failed"),
], ids=["write-failed", "nothing-recorded"])
def test_a_failed_write_or_an_empty_capture_fails_the_trace_and_keeps_committed_batches(
        monkeypatch, toy_olmoe, tmp_path, failure, message):
    import vllm

    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: RecordingLLM(2, failure, **kwargs))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "text": "one two three"},
                                                 {"id": "b", "text": "four five"}])
    with pytest.raises(CaptureError) as error:
        trace_samples(toy_olmoe, read_samples(samples), tmp_path / "t",
                      EngineOptions(max_model_len=64), TraceOptions(batch_size=1))
    assert str(error.value) == message
    trace = Trace.open(tmp_path / "t")  # every committed checksum verified
    assert (trace.status, trace.capture_error) == ("failed", message)
    assert trace.sample_ids() == ["a"] and list(trace.samples["sample_id"]) == ["a"]
    assert len(trace.token_ids("a")) == trace.samples["num_tokens"][0]


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
    assert trace.manifest.status == "complete" and len(trace.samples) == 43


@pytest.mark.vllm
@pytest.mark.parametrize("engine, trace, named", [
    ({"dtype": "float32"}, {}, "--dtype bfloat16, now float32"),
    ({}, {"max_tokens": 4}, "--max-tokens 0, now 4"),
    ({}, {"nll": False}, "--nll True, now False"),
    ({"store_probs": True}, {}, "--store-probs False, now True"),
    ({"store": "per-sample"}, {}, "--store per-token, now per-sample"),
    ({}, {"truncate": True}, "--truncate False, now True"),
], ids=["dtype", "max-tokens", "nll", "store-probs", "store", "truncate"])
def test_resuming_with_settings_that_change_the_records_is_refused(
        trace_copy, toy_olmoe, samples_file, no_engine, engine, trace, named):
    with pytest.raises(InputError, match=rf"cannot resume '.*': it was traced with other "
                                         rf"settings \({named}\); pass the same settings to "
                                         rf"resume, or --force or another --out to start over"):
        resume(toy_olmoe, samples_file, trace_copy, engine, trace)
    assert_untouched(trace_copy)


@pytest.mark.vllm
def test_the_context_must_match_only_when_samples_are_truncated(
        trace_copy, toy_olmoe, samples_file, no_engine):
    summary = resume(toy_olmoe, samples_file, trace_copy, {"max_model_len": 1024},
                     {"batch_size": 4})  # nothing is cut: a longer context changes nothing
    assert (summary.samples, summary.resumed_samples) == (0, 43)
    manifest = store.read_manifest(trace_copy)
    manifest["options"]["truncate"] = True
    store.write_manifest(trace_copy, manifest)
    with pytest.raises(InputError, match=r"other settings \(--max-model-len 512, now 1024\)"):
        resume(toy_olmoe, samples_file, trace_copy, {"max_model_len": 1024}, {"truncate": True})
    assert_untouched(trace_copy)


@pytest.mark.vllm
@pytest.mark.parametrize("arch, seed, why", [
    ("olmoe", 3, "its router weights differ"),  # another checkpoint of the same config
    ("mixtral", 0, "its config.json differs"),
], ids=["other-checkpoint", "other-config"])
def test_resuming_with_another_model_is_refused(
        trace_copy, toy_factory, samples_file, no_engine, arch, seed, why):
    other = toy_factory(arch, seed=seed)
    with pytest.raises(InputError, match=rf"it was traced with another model \({why}: '.*', "
                                         rf"now '{other.resolve()}'\); pass the same model"):
        resume(other, samples_file, trace_copy)
    assert_untouched(trace_copy)


@pytest.mark.vllm
def test_a_trace_that_predates_the_recorded_fields_still_resumes(
        trace_copy, toy_olmoe, samples_file, no_engine):
    manifest = store.read_manifest(trace_copy)
    del manifest["model"]["config_sha256"], manifest["options"]["dtype"]
    store.write_manifest(trace_copy, manifest)
    summary = resume(toy_olmoe, samples_file, trace_copy)
    assert (summary.samples, summary.resumed_samples) == (0, 43)


@pytest.mark.vllm
@pytest.mark.parametrize("field, traced_with, named", [
    ("id_field", "uid", "--id-field uid, now id"),
    ("text_field", "body", "--text-field body, now text"),
], ids=["id-field", "text-field"])
def test_resuming_with_samples_read_under_other_fields_is_refused(
        trace_copy, toy_olmoe, samples_file, no_engine, field, traced_with, named):
    manifest = store.read_manifest(trace_copy)
    assert manifest["input"]["read"][field] == named.split()[-1]
    manifest["input"]["read"][field] = traced_with  # as if traced with --id-field uid, ...
    store.write_manifest(trace_copy, manifest)
    with pytest.raises(InputError, match=rf"its samples were read otherwise \({named}\); "
                                         rf"pass the same samples to resume"):
        resume(toy_olmoe, samples_file, trace_copy)
    assert_untouched(trace_copy)


# --- --store per-sample: the same run, kept per sample -------------------------------------


@pytest.fixture(scope="module")
def per_sample_trace(olmoe_trace, toy_olmoe, samples_file, tmp_path_factory) -> Path:
    """The standard samples traced as olmoe_trace was (one engine start), kept per sample."""
    out = tmp_path_factory.mktemp("traces") / "olmoe-per-sample"
    trace_samples(toy_olmoe, read_samples(samples_file), out,
                  EngineOptions(**TRACED_WITH, store="per-sample"), TraceOptions(batch_size=16))
    return out


@pytest.mark.vllm
@pytest.mark.parametrize("source", ["full", "topk"])
def test_metrics_of_one_run_kept_per_token_or_per_sample_are_identical(
        olmoe_trace, per_sample_trace, source):
    from test_cli_trace import moepath

    by_token, by_sample = Trace.open(olmoe_trace), Trace.open(per_sample_trace)
    assert (by_token.store, by_sample.store) == ("per-token", "per-sample")
    assert by_sample.manifest.counts == by_token.manifest.counts  # samples, tokens, ...
    assert by_sample.samples.equals(by_token.samples)  # NLL, token counts, carried columns
    for sample_id in ("s0", "long2"):  # the histogram: prompt tokens x top k per layer
        prompt = by_token.num_prompt_tokens(sample_id)
        counts = by_sample.topk_counts(sample_id)
        np.testing.assert_array_equal(counts.sum(1), prompt * by_token.top_k)
        ids, _ = by_token.topk(sample_id)
        np.testing.assert_array_equal(counts[1], np.bincount(
            ids[:prompt, 1].ravel(), minlength=by_token.num_experts))
    outputs = [moepath("metrics", trace, "--source", source, "--group-by", "domain", "--json")
               for trace in (olmoe_trace, per_sample_trace)]
    assert all(output.returncode == 0 for output in outputs), outputs[1].stderr
    assert outputs[0].stdout == outputs[1].stdout and '"distance_mean"' in outputs[0].stdout


def routing_bytes(trace_dir: Path) -> int:
    return sum((trace_dir / shard.file).stat().st_size
               for shard in Trace.open(trace_dir).manifest.routing_shards)


@pytest.mark.vllm
def test_a_per_sample_trace_is_smaller_by_the_ratio_of_its_tokens_to_its_summaries(
        olmoe_trace, per_sample_trace):
    """Per token a trace keeps 8 + 3 L k bytes (position, token id, uint8 ids, float16
    weights); per sample 12 L E bytes (three float32/int32 [L, E]), whatever its length."""
    trace = Trace.open(olmoe_trace)
    samples, tokens = len(trace), trace.manifest.counts.tokens
    L, k, E = trace.num_layers, trace.top_k, trace.num_experts
    per_token = routing_bytes(olmoe_trace) / samples
    per_sample = routing_bytes(per_sample_trace) / samples
    expected_token, expected_sample = tokens / samples * (8 + 3 * L * k), 12 * L * E
    assert expected_token <= per_token < 2 * expected_token
    assert expected_sample <= per_sample < 2 * expected_sample
    assert per_token / per_sample > 0.5 * expected_token / expected_sample

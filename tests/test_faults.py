"""Faults users hit: a run killed mid-way resumes to the same trace; write failures are loud."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TEST_MEMORY, write_jsonl
from test_capture import agree_outside_near_ties

from moepath.fixtures.toy import corpus
from moepath.tracer import Trace, store

pytestmark = pytest.mark.vllm

ARGS = ("--enforce-eager", "--max-model-len", "256", "--batch-size", "8",
        "--gpu-memory-utilization", str(TEST_MEMORY))


def trace_command(model, samples, out, *extra) -> list[str]:
    return [sys.executable, "-m", "moepath.cli.main", "trace", str(model), "--samples",
            str(samples), "--out", str(out), *ARGS, *extra]


def committed_samples(out) -> int:
    try:
        manifest = store.read_manifest(out)
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    return sum(entry["rows"] for entry in manifest["shards"]["samples"])


def test_sigkill_then_resume_gives_every_sample_once_equal_to_an_uninterrupted_run(
        toy_olmoe, tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"id": f"k{i}", "text": line} for i, line in enumerate(corpus(120, seed=21))])
    killed = subprocess.Popen(trace_command(toy_olmoe, samples, tmp_path / "killed"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while committed_samples(tmp_path / "killed") < 16 and time.time() < deadline:
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done_before = committed_samples(tmp_path / "killed")
    assert 16 <= done_before < 120, "the kill must land mid-run"

    resumed = subprocess.run(trace_command(toy_olmoe, samples, tmp_path / "killed", "--resume"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming: {done_before} sample(s) already traced" in resumed.stderr
    whole = subprocess.run(trace_command(toy_olmoe, samples, tmp_path / "whole"),
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    a, b = Trace.open(tmp_path / "killed"), Trace.open(tmp_path / "whole")
    assert a.manifest.status == "complete"
    ids = a.sample_ids()
    assert len(ids) == len(set(ids)) == 120 and len(a.samples) == 120
    assert sorted(ids) == sorted(b.sample_ids())
    for sid in ids:
        np.testing.assert_array_equal(a.topk(sid)[0], b.topk(sid)[0])
        np.testing.assert_allclose(a.topk(sid)[1], b.topk(sid)[1], atol=1e-2)
        np.testing.assert_allclose(a.router_mean(sid), b.router_mean(sid), atol=1e-2)


def test_tensor_parallel_2_writes_one_trace_equal_to_tp1(olmoe_trace, toy_olmoe, hf_olmoe,
                                                         tmp_path):
    """CPU TP=2 (one core per rank): only rank 0 writes; routing equals TP=1 (compiled), bf16
    near-ties aside."""
    from moepath.patches.engine import trace_samples
    from moepath.patches.options import EngineOptions, TraceOptions
    from moepath.tracer.samples import SampleReadOptions, read_samples

    source = Trace.open(olmoe_trace)
    samples = read_samples(source.manifest.input.path, SampleReadOptions(limit=10))
    trace_samples(toy_olmoe, samples, tmp_path / "tp2",
                  EngineOptions(tensor_parallel_size=2, max_model_len=512, enforce_eager=True,
                                gpu_memory_utilization=TEST_MEMORY),
                  TraceOptions())
    tp2 = Trace.open(tmp_path / "tp2")
    assert sorted(tp2.sample_ids()) == sorted(s.sample_id for s in samples.samples)
    assert len(tp2.manifest.routing_shards) == 1  # written once, by rank 0
    overall, decided = zip(*(agree_outside_near_ties(hf_olmoe, tp2.token_ids(sid).tolist(),
                                                     tp2.topk(sid)[0], source.topk(sid)[0])
                             for sid in tp2.sample_ids()), strict=True)
    print(f"TP=2 vs TP=1 (bf16): top-k agreement {np.mean(overall):.4%} "
          f"({np.mean(decided):.4%} outside near-ties)")
    assert np.mean(decided) == 1.0


def test_preempted_and_recomputed_requests_equal_the_same_requests_alone(toy_olmoe, hf_olmoe,
                                                                        tmp_path):
    """A KV cache of 6 blocks for 12 growing requests: vLLM preempts and recomputes."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from moepath.patches.engine import TracedEngine, tag
    from moepath.patches.options import EngineOptions

    rng = np.random.default_rng(9)
    prompts = {f"p{i}": rng.integers(3, 500, size=100).tolist() for i in range(12)}

    def run(engine, items):
        engine.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in items.values()],
            [tag(SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True), sid)
             for sid in items], use_tqdm=False)
        return {r.sample_id: r for shard in engine.flush()
                for r in store.read_routing_shard(tmp_path / "t" / shard.file, 4, 4, 16)}

    options = EngineOptions(enforce_eager=True, max_model_len=256, num_kv_blocks=6,
                            gpu_memory_utilization=TEST_MEMORY)
    with TracedEngine(toy_olmoe, tmp_path / "t", options, commit=False) as engine:
        crowded = run(engine, prompts)
        preemptions = engine.requests_recomputed
        alone = {}
        for sid, ids in prompts.items():
            alone.update(run(engine, {sid: ids}))
    assert preemptions > 0, "the test must force preemption"
    overall, decided = [], []
    for sid in prompts:
        np.testing.assert_array_equal(crowded[sid].positions, np.arange(159))
        np.testing.assert_array_equal(crowded[sid].token_ids, alone[sid].token_ids)
        rates = agree_outside_near_ties(hf_olmoe, crowded[sid].token_ids.tolist(),
                                        crowded[sid].expert_ids, alone[sid].expert_ids)
        overall.append(rates[0])
        decided.append(rates[1])
    # recomputed positions run through prefill kernels instead of decode kernels:
    # bf16 near-ties may flip, nothing else
    print(f"preempted vs alone: {preemptions} recomputed requests, agreement "
          f"{np.mean(overall):.4%} ({np.mean(decided):.4%} outside near-ties)")
    assert np.mean(decided) == 1.0

"""Traced requests read vLLM's prefix cache: cached tokens get the routing they were computed with.

The rows of cached tokens are the rows recorded when their KV blocks were
computed, bit for bit, and every trace here equals, record for record, the same
requests computed in full: float32 top-k ids, positions and tokens exactly;
gate weights to one float16 step and router means to float32 rounding, the
agreement of two runs of the same requests (vLLM's CPU kernels round a few
float32 values differently from run to run, which moves a float16-stored weight
by one step now and then). One engine for the module: float32, eager, 32-token
KV blocks (the CPU attention's smallest) and a KV cache of 40 blocks (1,280
tokens), small enough that the crowded tests preempt and evict. The cache-off
run is the same requests with ``skip_reading_prefix_cache=True`` in the same
engine: vLLM's per-request switch, under which every token is computed as in an
engine without prefix caching.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_MEMORY
from test_capture import agree_outside_near_ties

from moepath.fixtures.hf_reference import hf_routing
from moepath.tracer import store

pytestmark = pytest.mark.vllm

BLOCK = 32


class CachedEngine:
    """A traced engine with prefix caching on; runs requests and reads their records."""

    def __init__(self, engine):
        self.engine = engine
        routing = engine.routing
        self.shape = (routing.num_layers, routing.top_k, routing.num_experts)
        self.runs = 0

    def trace(self, requests: list[tuple[str | None, list[int]]], full: bool = False,
              **sampling) -> tuple[dict[str, store.RoutingRecord], dict[str, int]]:
        """Run ``requests`` (sample id, or None for an untraced request; token ids) in one
        ``generate`` call, in this order. Returns each traced request's record and each
        request's tokens vLLM served from its prefix cache (untraced: under "untraced<i>").
        ``full``: every request computes every token (no prefix-cache reads)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from moepath.patches.engine import tag

        self.runs += 1
        label = f"run{self.runs}/"  # sample ids stay unique in the engine's trace directory
        sampling = {"max_tokens": 1, "temperature": 0.0, "ignore_eos": True} | sampling
        skip = True if full else None  # None: vLLM's default for the request
        params = [SamplingParams(skip_reading_prefix_cache=skip, **sampling) for _ in requests]
        params = [tag(p, label + sid) if sid else p
                  for p, (sid, _) in zip(params, requests, strict=True)]
        outputs = self.engine.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for _, ids in requests], params, use_tqdm=False)
        cached = {sid or f"untraced{i}": output.num_cached_tokens
                  for i, ((sid, _), output) in enumerate(zip(requests, outputs, strict=True))}
        records = {}
        for shard in self.engine.flush():
            for record in store.read_routing_shard(Path(self.engine.settings.dir) / shard.file,
                                                   *self.shape):
                records[record.sample_id.removeprefix(label)] = record
        return records, cached

    def check_against_full(self, requests: list[tuple[str | None, list[int]]],
                           **sampling) -> tuple[dict[str, store.RoutingRecord], dict[str, int]]:
        """Trace ``requests`` reading the prefix cache, then computing every token; assert
        the records equal; return the first run's records, and the tokens each request
        read from the cache."""
        cached_records, cached = self.trace(requests, **sampling)
        full_records, full = self.trace(requests, full=True, **sampling)
        traced = [sid for sid, _ in requests if sid]
        assert sorted(cached_records) == sorted(full_records) == sorted(set(traced))
        assert not any(full.values())
        for sid in traced:
            assert_same_record(cached_records[sid], full_records[sid])
        return cached_records, cached


def assert_same_record(cached: store.RoutingRecord, full: store.RoutingRecord) -> None:
    for column in ("positions", "token_ids", "expert_ids"):
        np.testing.assert_array_equal(getattr(cached, column), getattr(full, column),
                                      err_msg=f"{cached.sample_id}: {column}")
    assert cached.num_prompt_tokens == full.num_prompt_tokens
    np.testing.assert_allclose(cached.gate_weights, full.gate_weights, rtol=2**-10, atol=0,
                               err_msg=f"{cached.sample_id}: more than one float16 step")
    np.testing.assert_allclose(cached.router_mean, full.router_mean, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def cached_engine(toy_olmoe, tmp_path_factory):
    from moepath.patches.engine import TracedEngine
    from moepath.patches.options import EngineOptions

    options = EngineOptions(dtype="float32", enforce_eager=True, max_model_len=512,
                            block_size=BLOCK, num_kv_blocks=40,
                            gpu_memory_utilization=TEST_MEMORY)
    with TracedEngine(toy_olmoe, tmp_path_factory.mktemp("cached"), options,
                      commit=False) as engine:
        yield CachedEngine(engine)


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, size=n).tolist()


def shared_prefix_set() -> list[tuple[str, list[int]]]:
    """Five samples behind one 100-token prefix (three whole blocks), a repeat of one, a
    sample that is the prefix of another, and one that extends another."""
    prefix = tokens(1, 100)
    samples = [(f"s{i}", prefix + tokens(10 + i, 5 + 9 * i)) for i in range(5)]
    samples += [("repeat", samples[0][1]), ("head", samples[4][1][:70]),
                ("extended", samples[2][1] + tokens(20, 40))]
    return samples


def test_shared_prefixes_repeats_and_prefixes_of_samples_equal_their_full_computation(
        cached_engine, hf_olmoe):
    samples = shared_prefix_set()
    # one call: later samples hit blocks s0 computes in the same step
    records, cached = cached_engine.check_against_full(samples, max_tokens=3)
    # the prefix's three whole blocks; a block is shared once full (s2 ends in its fourth)
    assert all(cached[sid] == 3 * BLOCK for sid in ("s1", "s2", "s3", "s4", "extended"))
    assert cached["head"] == 2 * BLOCK
    for sid, hit in cached.items():  # replayed: s0's rows, bit for bit
        for column in ("expert_ids", "gate_weights"):
            np.testing.assert_array_equal(getattr(records[sid], column)[:hit],
                                          getattr(records["s0"], column)[:hit])
    # again: every sample's whole blocks are cached now, from the calls before
    _, again = cached_engine.check_against_full(samples)
    assert again["s4"] == len(samples[4][1]) // BLOCK * BLOCK
    assert cached_engine.engine.tokens_replayed >= sum(cached.values()) + sum(again.values())
    records, _ = cached_engine.trace(samples[3:5])
    for sid, ids in samples[3:5]:  # and the transformers float32 forward agrees
        overall, decided = agree_outside_near_ties(hf_olmoe, ids, records[sid].expert_ids,
                                                   hf_routing(hf_olmoe, ids).expert_ids)
        assert overall >= 0.999 and decided == 1.0


def test_traced_requests_reuse_the_prefix_untraced_requests_computed(cached_engine):
    prefix = tokens(2, 96)
    untraced_first, _ = cached_engine.trace([(None, prefix + tokens(21, 10))])
    assert untraced_first == {}  # untraced requests leave no record
    _, cached = cached_engine.check_against_full([("t", prefix + tokens(22, 12))])
    assert cached["t"] == 96
    # in one call, the untraced request first: the traced one hits its blocks in that step
    other = tokens(3, 80)
    _, cached = cached_engine.check_against_full([(None, other + tokens(31, 9)),
                                                  ("t2", other + tokens(32, 20))])
    assert cached["t2"] == 2 * BLOCK


def test_preempted_requests_and_evicted_prefixes_equal_their_full_computation(cached_engine):
    """Twelve requests of 60 + 60 tokens behind one prefix outgrow the 40 blocks: vLLM
    preempts some, whose recomputation reads what is still cached. Then a crowd
    evicts a prefix that a later request would have reused."""
    prefix = tokens(4, 64)
    crowd = [(f"p{i}", prefix + tokens(40 + i, 60)) for i in range(12)]
    recomputed = cached_engine.engine.requests_recomputed
    _, cached = cached_engine.check_against_full(crowd, max_tokens=60)
    assert cached_engine.engine.requests_recomputed > recomputed, "the test must preempt"
    assert sum(cached.values()) >= 11 * 64

    evicted = tokens(5, 96)
    assert cached_engine.check_against_full([("a", evicted + tokens(51, 8))])[1]["a"] == 0
    cached_engine.trace([(None, tokens(60 + i, 120)) for i in range(12)])  # 1,440 tokens
    assert cached_engine.check_against_full([("b", evicted + tokens(52, 8))])[1]["b"] < 96


def test_lm_eval_multiple_choice_requests_compute_their_context_and_equal_a_full_run(
        cached_engine):
    """lm-eval scores each answer choice of a question as context + choice with prompt
    log-probs, for which vLLM computes every prompt token (it skips prefix-cache reads
    for such requests, traced or not): the shared context is computed once per choice."""
    from moepath.patches.lm_eval_backend import _scoring_params

    context = tokens(6, 90)
    choices = [(f"choice{i}", context + tokens(70 + i, 2 + i)) for i in range(4)]
    scoring = _scoring_params()
    _, cached = cached_engine.check_against_full(
        choices, max_tokens=scoring.max_tokens, prompt_logprobs=scoring.prompt_logprobs,
        detokenize=False)
    assert set(cached.values()) == {0}

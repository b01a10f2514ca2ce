"""Routing captured inside vLLM against independent computations (HF forward, other batchings)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_MEMORY

from moepath.fixtures.hf_reference import hf_routing, load_model
from moepath.tracer import Trace
from moepath.tracer.metrics import trace_metrics

pytestmark = pytest.mark.vllm

# bf16 carries ~3 significant digits, and its rounding of hidden states and
# logits moves router log-probabilities by up to ~0.11 on the toys: experts whose
# log-probabilities differ by less than this may swap places (a near-tie).
NEAR_TIE_LOG_GAP = 0.12


def topk_agreement(ids_a: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
    """bool [T, L]: the two captures chose the same top-k set at (token, layer)."""
    return (np.sort(ids_a, -1) == np.sort(ids_b, -1)).all(-1)


def kth_gap(probs: np.ndarray, k: int) -> np.ndarray:
    """float [T, L]: log p of the k-th minus the (k+1)-th expert: the decision margin
    (in score, not log, for selection scores that dip below zero: sigmoid plus bias)."""
    ordered = np.sort(np.log(probs) if (probs > 0).all() else probs, -1)[..., ::-1]
    return ordered[..., k - 1] - ordered[..., k]


def agree_outside_near_ties(hf_model, token_ids, ids_a, ids_b) -> tuple[float, float]:
    """(overall top-k set agreement, agreement where the fp32 margin is clear)."""
    agree = topk_agreement(ids_a, ids_b)
    ref = hf_routing(hf_model, list(token_ids))
    decided = kth_gap(ref.probs, ids_a.shape[-1]) >= NEAR_TIE_LOG_GAP
    return agree.mean(), agree[decided].mean()


def by_expert(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``weights`` [..., k] reordered by ascending expert id (orders differ between kernels)."""
    return np.take_along_axis(weights, np.argsort(ids, -1), -1)


def compare_with_hf(trace: Trace, model_path, probs: bool = False) -> dict:
    """Agreement of the trace with an HF float32 forward; ``probs``: also the largest
    error of the stored per-token distributions (a --store-probs trace)."""
    model = load_model(model_path)
    same, gaps, mean_err, nll_err, weight_err, probs_err = [], [], 0.0, 0.0, 0.0, None
    nll = trace.samples.set_index("sample_id")["nll"]
    for sid in trace.sample_ids():
        ids, weights = trace.topk(sid)
        ref = hf_routing(model, trace.token_ids(sid).tolist())
        agree = topk_agreement(ids, ref.expert_ids)
        same.append(agree.ravel())
        weight_err = max(weight_err, np.abs(by_expert(ids, weights)[agree] - by_expert(
            ref.expert_ids, ref.gate_weights)[agree]).max())
        gaps.append(kth_gap(ref.probs, trace.top_k).ravel())
        mean_err = max(mean_err, np.abs(trace.router_mean(sid) - ref.probs.mean(0)).max())
        nll_err = max(nll_err, abs(nll[sid] - ref.nll))
        if probs:
            probs_err = max(probs_err or 0.0, np.abs(trace.router_probs(sid) - ref.probs).max())
    same, gaps = np.concatenate(same), np.concatenate(gaps)
    decided = gaps >= NEAR_TIE_LOG_GAP
    return {"agreement": same.mean(), "decided_agreement": same[decided].mean(),
            "near_ties": 1 - decided.mean(), "router_mean_err": mean_err, "nll_err": nll_err,
            "gate_weight_err": weight_err, "probs_err": probs_err}


def test_bf16_compiled_trace_matches_hf_float32_forward(olmoe_trace, toy_olmoe):
    """bf16 serving differs from an fp32 forward only where experts nearly tie.

    The random toy has dense near-ties at the top-k boundary (log-prob gap below
    0.12 for about a quarter of (token, layer) pairs), so overall agreement is
    ~98.4% in bf16; every pair with a clear margin agrees. (float32 engines agree
    on >= 99.9% overall, below.)
    """
    result = compare_with_hf(Trace.open(olmoe_trace), toy_olmoe)
    print(f"bf16 compiled vs HF fp32: top-k agreement {result['agreement']:.4%} overall, "
          f"{result['decided_agreement']:.4%} outside near-ties ({result['near_ties']:.2%}); "
          f"largest gate weight error {result['gate_weight_err']:.3f}")
    assert result["decided_agreement"] == 1.0
    assert result["agreement"] >= 0.98
    # bf16 moves log-probabilities by up to ~0.11 (above): a weight p by up to ~0.12 p
    assert result["gate_weight_err"] < 0.1
    assert result["router_mean_err"] < 0.02
    assert result["nll_err"] < 0.05


@pytest.mark.parametrize(("arch", "eager"), [
    ("olmoe", True), ("mixtral", True), ("qwen2moe", True),
    # sigmoid scores plus the router's selection bias, hook compiled into the router's graph
    ("glm4moe", False),
    # a model-supplied routing function (sparsemixer), compiled
    ("phimoe", False),
    # the long matrix (`make test-models`): one engine per architecture
    pytest.param("granitemoe", True, marks=pytest.mark.models),
    pytest.param("qwen3moe", True, marks=pytest.mark.models),
    pytest.param("deepseekv3", False, marks=pytest.mark.models),
    pytest.param("ernie45moe", True, marks=pytest.mark.models),
    pytest.param("llama4", True, marks=pytest.mark.models),
    pytest.param("gptoss", True, marks=pytest.mark.models),
])
def test_float32_trace_matches_hf_exactly(arch, eager, toy_factory, samples_file, tmp_path):
    """Top-k ids and gate weights, prompt-mean distributions, NLL and (--store-probs)
    every token's full distribution, stored as float16, against an HF float32 forward."""
    from moepath.patches.engine import trace_samples
    from moepath.patches.options import EngineOptions, TraceOptions
    from moepath.tracer.samples import SampleReadOptions, read_samples

    model = toy_factory(arch)
    samples = read_samples(samples_file, SampleReadOptions(limit=12))
    trace_samples(model, samples, tmp_path / "t", EngineOptions(
        dtype="float32", enforce_eager=eager, max_model_len=512,
        gpu_memory_utilization=TEST_MEMORY, store_probs=True), TraceOptions())
    trace = Trace.open(tmp_path / "t")
    result = compare_with_hf(trace, model, probs=True)
    print(f"{arch}: routing {trace.manifest.model.routing}")
    print(f"{arch} fp32 vs HF fp32: top-k agreement {result['agreement']:.4%}, "
          f"largest gate weight error {result['gate_weight_err']:.1e}, "
          f"largest per-token probability error {result['probs_err']:.1e}")
    assert result["agreement"] >= 0.999  # 100% measured; float32 ties may round apart
    assert result["decided_agreement"] == 1.0
    assert result["gate_weight_err"] < 2e-3  # float16 storage of weights up to 2.5
    assert result["router_mean_err"] < 1e-4
    assert result["nll_err"] < 1e-3
    assert result["probs_err"] < 1e-3  # float16 storage of values within [-1, 2]
    served_router_reproduces_the_stored_distributions(trace, model)
    _, means = trace.router_means()
    print(f"{arch}: router means within [{means.min():.3f}, {means.max():.3f}]")
    [group] = trace_metrics(trace)  # glm4moe: selection scores below zero count as zero
    assert group.n_samples == 12 and group.distance_mean > 0


def served_router_reproduces_the_stored_distributions(trace: Trace, model_path) -> None:
    """The trace's router matrices, read back from the served model, applied to the hidden
    states each MoE block routed in an HF forward, give the distributions the hook stored
    (float16) and, scored, the HF router logits' own."""
    from moepath.fixtures.toy import correction_biases
    from moepath.tracer import store

    hf_model = load_model(model_path)
    tensors = store.read_router_tensors(trace.path)
    weights = np.stack(tensors.weights)  # [L, E, hidden]
    biases = np.stack(tensors.biases) if tensors.biases is not None else 0.0
    selection = [b.numpy() for b in correction_biases(hf_model)]
    largest = 0.0
    for sid in trace.sample_ids()[:4]:
        ref = hf_routing(hf_model, trace.token_ids(sid).tolist())
        logits = np.einsum("tlh,leh->tle", ref.router_inputs, weights) + biases
        if selection:  # sigmoid scores plus the selection bias
            scores = 1 / (1 + np.exp(-logits)) + np.stack(selection)
        else:
            scores = np.exp(logits - logits.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
        largest = max(largest, np.abs(scores - trace.router_probs(sid)).max())
        np.testing.assert_allclose(scores, ref.probs, atol=1e-5)
    print(f"W h (+ b) from the served router vs stored distributions: largest error "
          f"{largest:.1e}")
    assert largest < 1e-3  # float16 storage of values within [-1, 2]


def test_compiled_equals_eager_with_chunked_prefill_except_near_ties(olmoe_trace,
                                                                    chunked_engine, hf_olmoe):
    trace = Trace.open(olmoe_trace)
    prompts = {sid: trace.token_ids(sid).tolist() for sid in trace.sample_ids()}
    eager = chunked_engine.trace(prompts)
    overall, decided = [], []
    for sid in prompts:
        record = eager[sid]
        compiled_ids, _ = trace.topk(sid)
        np.testing.assert_array_equal(record.positions, np.arange(len(prompts[sid])))
        rates = agree_outside_near_ties(hf_olmoe, prompts[sid], record.expert_ids, compiled_ids)
        overall.append(rates[0])
        decided.append(rates[1])
    print(f"compiled (whole prompts) vs eager (64-token chunks), bf16: agreement "
          f"{np.mean(overall):.4%} overall, {np.mean(decided):.4%} outside near-ties")
    assert np.mean(decided) == 1.0
    assert np.mean(overall) >= 0.97


def test_long_prompt_split_over_steps_is_stitched_by_position(chunked_engine, hf_olmoe):
    prompt = np.random.default_rng(0).integers(3, 500, size=200).tolist()
    record = chunked_engine.trace({"long": prompt})["long"]
    np.testing.assert_array_equal(record.positions, np.arange(200))
    np.testing.assert_array_equal(record.token_ids, prompt)
    assert record.expert_ids.shape == (200, 4, 4)
    assert record.router_mean.sum(-1) == pytest.approx(np.ones(4), abs=1e-4)
    # each of the four 64-token chunks routed where one whole-prompt forward does
    reference = hf_routing(hf_olmoe, prompt).expert_ids
    overall, decided = agree_outside_near_ties(hf_olmoe, prompt, record.expert_ids, reference)
    print(f"200-token prompt in 64-token chunks vs HF fp32: agreement {overall:.4%} "
          f"({decided:.4%} outside near-ties)")
    assert decided == 1.0


def test_samples_alone_equal_the_same_samples_in_a_crowd_of_500(chunked_engine, hf_olmoe):
    rng = np.random.default_rng(1)
    crowd = {f"c{i}": rng.integers(3, 500, size=int(rng.integers(5, 40))).tolist()
             for i in range(500)}
    together = chunked_engine.trace(crowd)
    assert len(together) == 500
    for sid in ("c0", "c7", "c250", "c499"):
        alone = chunked_engine.trace({sid: crowd[sid]})[sid]
        overall, decided = agree_outside_near_ties(hf_olmoe, crowd[sid], alone.expert_ids,
                                                   together[sid].expert_ids)
        print(f"{sid} alone vs in a crowd of 500: agreement {overall:.4%} "
              f"({decided:.4%} outside near-ties)")
        assert decided == 1.0


def test_a_shared_prefix_read_from_the_prefix_cache_replays_the_routing_it_was_computed_with(
        chunked_engine):
    """The engine reads vLLM's prefix cache (on by default): its first 128-token block,
    computed by p0 in two 64-token prefill chunks, is served to p1 and an untagged
    request, and p1's record holds p0's routing of those tokens, bit for bit."""
    prefix = np.random.default_rng(2).integers(3, 500, size=160).tolist()
    first = chunked_engine.trace({"p0": prefix + [7, 8, 9]})["p0"]
    replayed = chunked_engine.engine.tokens_replayed
    again = chunked_engine.trace({"p1": prefix + [10, 11]}, untagged=[prefix + [12]])["p1"]
    assert chunked_engine.engine.tokens_replayed - replayed == 128  # one whole block
    np.testing.assert_array_equal(again.positions, np.arange(162))
    np.testing.assert_array_equal(again.token_ids, prefix + [10, 11])
    np.testing.assert_array_equal(again.expert_ids[:128], first.expert_ids[:128])
    np.testing.assert_array_equal(again.gate_weights[:128], first.gate_weights[:128])


def test_untagged_requests_in_the_same_engine_leave_no_records(chunked_engine):
    rng = np.random.default_rng(3)
    untagged = [rng.integers(3, 500, size=20).tolist() for _ in range(10)]
    records = chunked_engine.trace({"t0": [5, 6, 7, 8]}, untagged=untagged)
    assert set(records) == {"t0"}


def test_rows_past_a_final_stop_token_are_cut_as_the_engine_cut_the_request(chunked_engine):
    """vLLM's async scheduling (its default on CUDA; forced off on CPU) feeds a request's
    stop token once more before the engine core learns that the request ended. The
    recorder cuts such rows when it finishes a request (``OutputLimit``): a real record
    of 8 generated tokens, finished as if one of them had been a stop token, ends where
    vLLM ends the same request given that stop token."""
    from moepath.patches.recorder import OutputLimit, RequestAccumulator, _Chunk, step_layout

    prompt = [5, 6, 7, 8, 9, 10]
    full = chunked_engine.trace({"full": prompt}, max_tokens=8, ignore_eos=True)["full"]
    generated = chunked_engine.generated["full"]
    k = next(i for i in range(2, 8) if generated[i] not in generated[:i])  # a first occurrence
    stopped = chunked_engine.trace({"stopped": prompt}, max_tokens=8, ignore_eos=True,
                                   stop_token_ids=[generated[k]])["stopped"]
    assert chunked_engine.generated["stopped"] == generated[:k + 1]
    layout = step_layout(*full.expert_ids.shape[1:], full.router_mean.shape[1], False)
    rows = layout.empty(full.num_tokens)
    for column in ("positions", "token_ids", "expert_ids", "gate_weights"):
        layout.view(rows, column)[:] = getattr(full, column)
    unfinished = RequestAccumulator(
        "full", "0-abcdefgh", 0, len(prompt), {},
        output_limit=OutputLimit(frozenset({generated[k]}), max_tokens=8))
    unfinished.add(_Chunk(rows, 0, full.num_tokens, 0, len(prompt),
                          full.router_mean.astype(np.float64) * len(prompt)))
    cut = unfinished.finish(layout)
    np.testing.assert_array_equal(cut.positions, stopped.positions)  # prompt + k fed tokens
    np.testing.assert_array_equal(cut.token_ids, stopped.token_ids)
    np.testing.assert_array_equal(cut.expert_ids, full.expert_ids[:len(prompt) + k])
    np.testing.assert_allclose(cut.router_mean, full.router_mean, rtol=1e-6)


def test_generated_tokens_are_traced_after_the_prompt(chunked_engine):
    record = chunked_engine.trace({"g": [5, 6, 7, 8, 9]}, max_tokens=6)["g"]
    # 5 prompt tokens + 5 fed-back generated tokens (the last sampled one is never fed)
    np.testing.assert_array_equal(record.positions, np.arange(10))
    assert record.num_prompt_tokens == 5
    np.testing.assert_array_equal(record.token_ids[:5], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(record.token_ids[5:], chunked_engine.generated["g"][:5])

"""Routing captured inside vLLM against independent computations (HF forward, other batchings)."""

from __future__ import annotations

import importlib.util

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
    assert_bf16_agrees_outside_near_ties("olmoe compiled", compare_with_hf(
        Trace.open(olmoe_trace), toy_olmoe))


def assert_bf16_agrees_outside_near_ties(name: str, result: dict) -> None:
    print(f"{name} bf16 vs HF fp32: top-k agreement {result['agreement']:.4%} overall, "
          f"{result['decided_agreement']:.4%} outside near-ties ({result['near_ties']:.2%}); "
          f"largest gate weight error {result['gate_weight_err']:.3f}")
    assert result["decided_agreement"] == 1.0
    assert result["agreement"] >= 0.98
    # bf16 moves log-probabilities by up to ~0.11 (above): a weight p by up to ~0.12 p
    assert result["gate_weight_err"] < 0.1
    assert result["router_mean_err"] < 0.02
    assert result["nll_err"] < 0.05


@pytest.mark.models
def test_qwen3_next_traced_in_bfloat16_matches_hf_float32_outside_near_ties(
        toy_factory, samples_file, tmp_path):
    """vLLM's CPU backend runs Gated DeltaNet in bfloat16 only (float32 is refused below),
    so Qwen3-Next is checked as OLMoE in bf16 is: every clear (token, layer) decision and
    the MoE layer numbers (layer 0 an MLP) equal a transformers float32 forward."""
    from moepath.fixtures.hf_reference import moe_layer_ids

    model = toy_factory("qwen3next")
    trace = trace_toy(model, samples_file, tmp_path / "t", dtype="bfloat16")
    assert trace.manifest.model.layer_ids == moe_layer_ids(load_model(model)) == [1, 2, 3]
    router_matrices_are_the_checkpoints(trace, model, rtol=2**-8)  # bf16 rounding
    assert_bf16_agrees_outside_near_ties("qwen3next eager", compare_with_hf(trace, model))


def trace_toy(model, samples_file, out, dtype: str = "float32", eager: bool = True) -> Trace:
    """The first 12 samples of ``samples_file`` traced through ``model`` into ``out`` with
    --store-probs."""
    from moepath.patches.engine import trace_samples
    from moepath.patches.options import EngineOptions, TraceOptions
    from moepath.tracer.samples import SampleReadOptions, read_samples

    samples = read_samples(samples_file, SampleReadOptions(limit=12))
    trace_samples(model, samples, out, EngineOptions(
        dtype=dtype, enforce_eager=eager, max_model_len=512,
        gpu_memory_utilization=TEST_MEMORY, store_probs=True), TraceOptions())
    return Trace.open(out)


@pytest.mark.parametrize(("arch", "eager"), [
    ("olmoe", True),
    ("mixtral", True),
    # a dense layer between MoE layers (mlp_only_layers=[1]): MoE layers 0, 2, 3
    ("qwen2moe", True),
    # sigmoid scores plus the router's selection bias, hook compiled into the router's graph
    ("glm4moe", False),
    # a model-supplied routing function (sparsemixer), compiled
    ("phimoe", False),
    # the long matrix (`make test-models`): one engine per architecture
    *(pytest.param(arch, eager, marks=pytest.mark.models) for arch, eager in (
        ("granitemoe", True), ("qwen3moe", True), ("deepseekv3", False), ("llama4", True),
        ("gptoss", True), ("granitemoeshared", True), ("granitemoehybrid", True),
        ("cohere2moe", True), ("exaonemoe", True), ("afmoe", True), ("flexolmo", True))),
])
def test_float32_trace_matches_hf_exactly(arch, eager, toy_factory, samples_file, tmp_path):
    """Top-k ids and gate weights, prompt-mean distributions, NLL and (--store-probs)
    every token's full distribution, stored as float16, against an HF float32 forward;
    the MoE layers' decoder-layer numbers against the HF model's."""
    from moepath.fixtures.hf_reference import moe_layer_ids

    model = toy_factory(arch)
    trace = trace_toy(model, samples_file, tmp_path / "t", eager=eager)
    assert trace.manifest.model.layer_ids == moe_layer_ids(load_model(model))
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


@pytest.mark.models
def test_ernie_routes_by_softmax_alone_on_cpu_where_transformers_adds_its_selection_bias(
        toy_factory, samples_file, tmp_path):
    """ERNIE-4.5 ranks experts by softmax plus a selection bias (``e_score_correction_bias``,
    random in the toy). vLLM's CPU router ignores that bias (its plain top-k has no bias
    term, router/cpu_router.py), and the trace records that routing, saying the bias was
    not used. In the first MoE layer, whose input transformers and vLLM compute alike,
    it is transformers' routing without the bias, and differs from transformers' own
    choice wherever the bias changes it (docs/models.md); after it, the hidden states
    part with the experts chosen. In every layer the recorded experts are the top-k of
    the recorded softmax."""
    import torch

    from moepath.fixtures.hf_reference import selection_scores

    model = toy_factory("ernie45moe")
    trace = trace_toy(model, samples_file, tmp_path / "t")
    routing = trace.manifest.model.routing
    assert routing["correction_bias"] is False
    hf_model = load_model(model)
    first = np.stack(trace.router_weights())[:1]  # the first MoE layer's router [1, E, hidden]
    k = trace.top_k
    unbiased, biased, clear, own, own_clear, weight_err, probs_err = [], [], [], [], [], 0, 0
    for sid in trace.sample_ids():
        ids, weights = trace.topk(sid)
        ref = hf_routing(hf_model, trace.token_ids(sid).tolist())
        logits = np.einsum("tlh,leh->tle", ref.router_inputs[:, :1], first)
        softmax = selection_scores(hf_model, torch.from_numpy(logits), with_bias=False).numpy()
        chosen = np.argsort(-softmax, -1)[..., :k]  # [T, 1, k]: vLLM's rule on HF's input
        agree = topk_agreement(ids[:, :1], chosen)
        unbiased.append(agree.ravel())
        clear.append((kth_gap(softmax, k) >= NEAR_TIE_LOG_GAP).ravel())
        biased.append(topk_agreement(ids[:, :1], ref.expert_ids[:, :1]).ravel())
        expected = np.take_along_axis(softmax, chosen, -1)
        expected /= expected.sum(-1, keepdims=True)  # renormalised, as both routers do
        weight_err = max(weight_err, np.abs(by_expert(ids[:, :1], weights[:, :1])[agree]
                                            - by_expert(chosen, expected)[agree]).max())
        probs_err = max(probs_err, np.abs(trace.router_probs(sid)[:, :1] - softmax).max())
        picked, decided = routed_by(trace.router_probs(sid), k, routing)
        own.append(topk_agreement(ids, picked).ravel())
        own_clear.append(decided.ravel())
    unbiased, biased, clear = map(np.concatenate, (unbiased, biased, clear))
    own, own_clear = np.concatenate(own), np.concatenate(own_clear)
    print(f"ernie45moe fp32, first MoE layer: top-k agreement with transformers' routing "
          f"without the bias {unbiased.mean():.4%} ({unbiased[clear].mean():.4%} outside "
          f"near-ties), with transformers' own (biased) routing {biased.mean():.4%}; largest "
          f"gate weight error {weight_err:.1e}; every layer: recorded experts = top-k of the "
          f"recorded softmax for {own[own_clear].mean():.4%} of clear pairs")
    assert unbiased[clear].mean() == 1.0 and unbiased.mean() >= 0.99
    assert weight_err < 2e-3 and probs_err < 1e-3  # float16 storage
    assert biased.mean() < 0.9  # the bias (std 0.1 on probabilities) changes many choices
    assert own[own_clear].mean() == 1.0


# score gap below which float16-stored scores may not tell the k-th and (k+1)-th apart
STORED_TIE_GAP = 4e-3


def routed_by(scores: np.ndarray, k: int, routing: dict) -> tuple[np.ndarray, np.ndarray]:
    """A naive reference of vLLM's router on its own scores [T, L, E] (softmax or sigmoid,
    plus the selection bias where it ranks by it; ``routing``: the manifest's): the top-k
    ids [T, L, k] it picks, with grouped top-k keeping ``topk_group`` of ``n_group`` groups
    (group score: the best expert's, or with a bias the two best's sum); and bool [T, L],
    whether the stored scores decide that choice beyond float16 ties."""
    masked = scores.copy()
    decided = np.ones(scores.shape[:2], bool)
    groups = routing["num_expert_group"] or 1
    if groups > 1:
        by_group = np.sort(scores.reshape(*scores.shape[:2], groups, -1), -1)[..., ::-1]
        group_score = by_group[..., :2].sum(-1) if routing["correction_bias"] else by_group[..., 0]
        keep = routing["topk_group"]
        order = np.sort(group_score, -1)[..., ::-1]
        decided &= order[..., keep - 1] - order[..., keep] >= STORED_TIE_GAP
        dropped = np.argsort(-group_score, -1)[..., keep:]  # [T, L, groups - keep]
        group_of = np.arange(scores.shape[-1]) // (scores.shape[-1] // groups)  # [E]
        masked[(dropped[..., :, None] == group_of).any(-2)] = -np.inf
    ordered = np.sort(masked, -1)[..., ::-1]
    decided &= ordered[..., k - 1] - ordered[..., k] >= STORED_TIE_GAP
    return np.argsort(-masked, -1)[..., :k], decided


def router_matrices_are_the_checkpoints(trace: Trace, model_path, rtol: float = 0.0) -> None:
    """The router matrices the trace stored, read back from the served model, are the
    checkpoint's (within ``rtol``: the serving dtype's rounding), layer for layer."""
    from moepath.fixtures.toy import router_parameters

    hf_model = load_model(model_path)
    expected = [p.detach().numpy() for p in router_parameters(hf_model, trace.num_experts)]
    stored = trace.router_weights()
    assert len(stored) == len(expected) == trace.num_layers
    for weights, checkpoint in zip(stored, expected, strict=True):
        np.testing.assert_allclose(weights, checkpoint, rtol=rtol, atol=0)


def untraced_nll(model, trace: Trace) -> dict[str, float]:
    """Each traced sample's mean prompt NLL from an untraced float32 vLLM engine of the
    same options: what the model computes without the capture."""
    import gc

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from moepath.patches.engine import mean_nll
    from moepath.patches.options import EngineOptions

    options = EngineOptions(dtype="float32", enforce_eager=True, max_model_len=512,
                            gpu_memory_utilization=TEST_MEMORY)
    options.prepare_environment()
    llm = LLM(**options.llm_kwargs(str(model), None))
    try:
        ids = trace.sample_ids()
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=trace.token_ids(sid).tolist()) for sid in ids],
            SamplingParams(max_tokens=1, prompt_logprobs=0, flat_logprobs=True,
                           detokenize=False), use_tqdm=False)
        return {sid: mean_nll(output) for sid, output in zip(ids, outputs, strict=True)}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.mark.models
@pytest.mark.parametrize(("arch", "reproduced"), [
    ("glm4moelite", True),
    # an untraced engine started after the traced one in this process computed other
    # prompt NLLs (1.3e-3, 2.9e-2), where two untraced engines agree exactly: not
    # understood (docs/models.md), so the gap is printed, not asserted
    ("deepseekv2", False), ("lfm2moe", False),
])
def test_where_vllm_computes_otherwise_than_transformers_the_trace_is_vllms_own_routing(
        arch, reproduced, toy_factory, samples_file, tmp_path):
    """Where vLLM's forward differs from transformers' (docs/models.md gives the measured
    difference), the capture is checked against vLLM's own computation: traced and
    untraced engines give the same outputs, the recorded experts are the ones the
    router's rule picks from the recorded scores, and the router matrices are the
    checkpoint's."""
    model = toy_factory(arch)
    trace = trace_toy(model, samples_file, tmp_path / "t")
    routing = trace.manifest.model.routing
    untraced = untraced_nll(model, trace)
    nll = trace.samples.set_index("sample_id")["nll"]
    nll_gap = max(abs(nll[sid] - untraced[sid]) for sid in untraced)
    own, decided = [], []
    for sid in trace.sample_ids():
        ids, _ = trace.topk(sid)
        expected, clear = routed_by(trace.router_probs(sid), trace.top_k, routing)
        own.append(topk_agreement(ids, expected).ravel())
        decided.append(clear.ravel())
    own, decided = np.concatenate(own), np.concatenate(decided)
    router_matrices_are_the_checkpoints(trace, model)
    hf = compare_with_hf(trace, model, probs=True)
    print(f"{arch} fp32: traced vs untraced vLLM NLL {nll_gap:.1e}; recorded experts = the "
          f"router's rule on the recorded scores for {own[decided].mean():.4%} of clear "
          f"(token, layer) pairs ({decided.mean():.2%} clear); vs transformers fp32: top-k "
          f"agreement {hf['agreement']:.4%}, NLL {hf['nll_err']:.1e}, scores "
          f"{hf['probs_err']:.1e}, routing {routing}")
    assert nll_gap < 1e-5 or not reproduced
    assert own[decided].mean() == 1.0 and decided.mean() > 0.5
    assert hf["agreement"] < 1.0  # the documented difference; equal would belong in the matrix


@pytest.mark.models
@pytest.mark.parametrize(("arch", "dtype", "why"), [
    ("minimaxm2", "float32", r"^MoE layer 'model.layers.0.block_sparse_moe.experts' scores "
                             r"experts by a sigmoid without expert groups, which vLLM 0.32.0's "
                             r"CPU router cannot run .*serve this model on a CUDA GPU"),
    ("hunyuanmoe", "float32", r"^MoE layer 'model.layers.0.mlp.experts' is routed by the "
                              r"model's own transformers code .*output_router_logits=True\)$"),
    ("jamba", "float32", r"^layer 'model.layers.0.mamba' \(MambaMixer, a Mamba-1 layer\) "
                         r"needs vLLM's selective_scan_fwd kernel, which this vLLM build lacks"),
    ("qwen3next", "float32", r"\(QwenGatedDeltaNetAttention, Gated DeltaNet linear attention\)"
                             r" runs on vLLM 0.32.0's CPU backend in bfloat16 only, not float32 "
                             r".*--dtype bfloat16$"),
    ("dbrx", "float32", r"^vLLM 0.32.0 cannot serve DbrxForCausalLM: its DBRX weight loader "),
    pytest.param("qwen35moe", "bfloat16", r"^vLLM cannot serve Qwen3_5MoeForCausalLM without "
                                          r"torchvision", marks=pytest.mark.skipif(
        importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")),
], ids=["minimaxm2", "hunyuanmoe", "jamba", "qwen3next", "dbrx", "qwen35moe"])
def test_a_model_the_engine_cannot_run_or_trace_is_refused_at_start_saying_why(
        arch, dtype, why, toy_factory, samples_file, tmp_path):
    """One line, before any sample is traced; no trace is begun."""
    from moepath.tracer.errors import ModelError

    with pytest.raises(ModelError, match=why):
        trace_toy(toy_factory(arch), samples_file, tmp_path / "t", dtype=dtype)
    assert not (tmp_path / "t" / "manifest.json").exists()


def served_router_reproduces_the_stored_distributions(trace: Trace, model_path) -> None:
    """The trace's router matrices, read back from the served model, applied to the hidden
    states each MoE block routed in an HF forward, give the HF router logits (scored, its
    scores) and the distributions the hook stored (float16; plus the selection bias where
    the served router ranks by it)."""
    import torch

    from moepath.fixtures.hf_reference import selection_scores
    from moepath.tracer import store

    hf_model = load_model(model_path)
    tensors = store.read_router_tensors(trace.path)
    weights = np.stack(tensors.weights)  # [L, E, hidden]
    biases = np.stack(tensors.biases) if tensors.biases is not None else 0.0
    ranked_with_bias = trace.manifest.model.routing["correction_bias"]
    largest = 0.0
    for sid in trace.sample_ids()[:4]:
        ref = hf_routing(hf_model, trace.token_ids(sid).tolist())
        logits = torch.from_numpy(np.einsum("tlh,leh->tle", ref.router_inputs, weights) + biases)
        np.testing.assert_allclose(selection_scores(hf_model, logits), ref.probs, atol=1e-5)
        stored = selection_scores(hf_model, logits, with_bias=ranked_with_bias).numpy()
        largest = max(largest, np.abs(stored - trace.router_probs(sid)).max())
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


def test_nan_router_logits_fail_the_request_naming_its_sample_and_layer(chunked_engine, toy_olmoe,
                                                                        tmp_path):
    """A checkpoint whose third router holds a NaN row routes every token with NaN weights
    from MoE layer 2 on: that request is not recorded, and the flush names it and the layer
    where its routing stopped being finite. The engine traces on."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moepath.tracer.errors import CaptureError

    broken = shutil.copytree(toy_olmoe, tmp_path / "nan-router")
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.2.mlp.gate.weight"][5] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    engine = chunked_engine.engine
    try:
        engine.switch_checkpoint(broken, chunked_engine.engine_dir)
        with pytest.raises(CaptureError, match=(
                r"^sample 'nan': MoE layer 2 \(model layer 2\) routed with NaN or infinite gate "
                r"weights or router scores at position 0, from router logits that are not "
                r"finite; its routing is not recorded\.")):
            chunked_engine.trace({"nan": [5, 6, 7, 8]})
    finally:
        engine.switch_checkpoint(toy_olmoe, chunked_engine.engine_dir)
    assert set(chunked_engine.trace({"after": [5, 6, 7, 8]})) == {"after"}


def test_a_sharded_checkpoint_traces_as_its_single_file_copy(chunked_engine, toy_olmoe, hf_olmoe,
                                                             tmp_path):
    """A checkpoint saved in shards named by ``model.safetensors.index.json`` (as large
    checkpoints are) serves the same weights: the routing traced after switching to it
    equals the routing of the single file, and the checkpoint reader finds every router."""
    from moepath.tracer.checkpoints import router_weights

    sharded = tmp_path / "sharded"
    hf_olmoe.save_pretrained(sharded, max_shard_size="200KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 4
    assert (sharded / "model.safetensors.index.json").is_file()
    prompt = list(range(5, 45))
    single = chunked_engine.trace({"single": prompt})["single"]
    engine = chunked_engine.engine
    try:
        engine.switch_checkpoint(sharded, chunked_engine.engine_dir)
        shards = chunked_engine.trace({"sharded": prompt})["sharded"]
    finally:
        engine.switch_checkpoint(toy_olmoe, chunked_engine.engine_dir)
    np.testing.assert_array_equal(shards.expert_ids, single.expert_ids)
    np.testing.assert_array_equal(shards.gate_weights, single.gate_weights)
    found, expected = router_weights(sharded, 16), router_weights(toy_olmoe, 16)
    assert sorted(found) == sorted(expected) == [0, 1, 2, 3]
    for layer, weight in expected.items():
        np.testing.assert_array_equal(found[layer], weight)

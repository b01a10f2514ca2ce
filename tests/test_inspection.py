"""Model inspection: MoE layers and engine set-ups the capture cannot trace are refused at load."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def inspect_one_layer(quant_method, moe_config=None, use_ubatching=False,
                      pipeline_parallel_size=1, async_scheduling=False, ec_transfer_config=None,
                      kv_transfer_config=None, compiled=True, router=None, runner_cls=None,
                      beside=None, dtype="torch.bfloat16"):
    """``inspect_model`` of a model with one MoE layer: the real runner class (or
    ``runner_cls``) with ``quant_method``, ``moe_config`` and ``router`` set and no kernel
    built, ``beside`` it another layer (module), in an engine of ``dtype`` configured by
    the other arguments (vLLM's names; ``compiled``: torch.compile on)."""
    from types import SimpleNamespace as NS

    import torch

    from moepath.patches import compat
    from moepath.patches.inspection import inspect_model

    runner_cls = runner_cls or compat.moe_runner_class()
    runner = runner_cls.__new__(runner_cls)
    torch.nn.Module.__init__(runner)
    runner.routed_experts = NS(quant_method=quant_method)
    runner.moe_config = moe_config
    runner.router = router
    runner.layer_name = "model.layers.0.mlp.experts"
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].experts = runner
    if beside is not None:
        model.layers[0].mixer = beside
    from vllm.config import CompilationMode

    return inspect_model(model, NS(
        model_config=NS(dtype=dtype), speculative_config=None,
        ec_transfer_config=ec_transfer_config, kv_transfer_config=kv_transfer_config,
        compilation_config=NS(mode=CompilationMode.VLLM_COMPILE if compiled
                              else CompilationMode.NONE),
        parallel_config=NS(use_ubatching=use_ubatching,
                           pipeline_parallel_size=pipeline_parallel_size),
        scheduler_config=NS(async_scheduling=async_scheduling)))


def test_a_moe_kernel_that_routes_internally_is_refused_naming_the_layer_and_the_fix():
    """Monolithic kernels (e.g. TRT-LLM on CUDA, zentorch on CPU) never call the router
    hook; tracing them would give an empty trace, so the engine refuses at load."""
    from types import SimpleNamespace as NS

    from moepath.patches.inspection import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=(
            r"MoE layer 'layers.0.experts' uses a monolithic kernel that routes internally.*"
            r"choose a modular kernel with --moe-backend")):
        inspect_one_layer(NS(is_monolithic=True))


@pytest.mark.parametrize("parallel", ["data", "sequence", "context"])
def test_a_router_that_sees_other_ranks_tokens_is_refused(parallel):
    """vLLM's naive dispatch gathers every data- or sequence-parallel rank's tokens, and
    context parallelism all-gathers them, before the router: its rows would not be
    this rank's requests, so the engine refuses at load."""
    from types import SimpleNamespace as NS

    from moepath.patches.inspection import UnsupportedModelError

    config = NS(dp_size=2 if parallel == "data" else 1, is_sequence_parallel=parallel == "sequence",
                pcp_size=2 if parallel == "context" else 1,
                moe_parallel_config=NS(use_all2all_kernels=False))
    with pytest.raises(UnsupportedModelError, match=(
            r"MoE layer 'layers.0.experts' gathers the tokens of all data-, sequence- or "
            r"context-parallel ranks before routing.*--all2all-backend")):
        inspect_one_layer(NS(is_monolithic=False, supports_internal_mk=False), config)


def test_a_sequence_parallel_moe_layer_is_refused():
    """With expert parallelism and tensor- and data-parallel sizes above 1, vLLM splits
    each step's tokens over the tensor-parallel ranks before the router (all-to-all
    kernels, no naive gather): the writing rank would see only its share."""
    from types import SimpleNamespace as NS

    from moepath.patches.inspection import UnsupportedModelError

    config = NS(dp_size=2, is_sequence_parallel=True, pcp_size=1,
                moe_parallel_config=NS(use_all2all_kernels=True))
    with pytest.raises(UnsupportedModelError, match=(
            r"MoE layer 'layers.0.experts' is sequence parallel.*each tensor-parallel rank "
            r"routes only its share.*--tensor-parallel-size 1")):
        inspect_one_layer(NS(is_monolithic=False, supports_internal_mk=True), config)


@pytest.mark.parametrize(("engine", "message"), [
    ({"use_ubatching": True}, "without --enable-dbo"),
    ({"pipeline_parallel_size": 2, "compiled": False},
     "CPU backend runs pipeline parallelism only compiled.*without --enforce-eager"),
    ({"async_scheduling": True}, "one more decode step of a request that sampled its stop "
                                 "token; tracing under it is not yet proven .*GPUs.*"
                                 "--no-async-scheduling"),
    ({"kv_transfer_config": SimpleNamespace(kv_connector="LMCacheConnectorV1")},
     "KV connector loads KV computed elsewhere.*without --kv-transfer-config"),
    ({"ec_transfer_config": SimpleNamespace(is_encode_only=True)},
     "runs no language-model forward"),
])
def test_engine_setups_whose_steps_cannot_be_mapped_are_refused(engine, message):
    from types import SimpleNamespace as NS

    from moepath.patches.inspection import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=message):
        inspect_one_layer(NS(is_monolithic=False), **engine)


def plain_moe_layer(router=None, **kwargs):
    """A single-rank modular MoE layer with ``router``: what a CPU engine builds."""
    from types import SimpleNamespace as NS

    config = NS(dp_size=1, is_sequence_parallel=False, pcp_size=1,
                moe_parallel_config=NS(use_all2all_kernels=False))
    return inspect_one_layer(NS(is_monolithic=False, supports_internal_mk=False), config,
                             router=router, **kwargs)


def cpu_router(**kwargs):
    """vLLM's CPU router as ``FusedMoEFactory`` builds it for 16 experts, top-4."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    return CPURouter(top_k=4, global_num_experts=16, **kwargs)


def test_a_sigmoid_router_without_expert_groups_is_refused_on_cpu():
    """MiniMax-M2 scores by sigmoid without groups: vLLM's CPU router asserts softmax at the
    first forward (cpu_router.py), so the engine refuses at load, saying where it runs."""
    from moepath.patches.inspection import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=(
            r"^moepath: MoE layer 'layers.0.experts' scores experts by a sigmoid without expert "
            r"groups, which vLLM 0.32.0's CPU router cannot run .*serve this model on a CUDA "
            r"GPU, where vLLM routes it$")):
        plain_moe_layer(cpu_router(scoring_func="sigmoid"))
    # with groups (DeepSeek-V3, GLM-4.5) or its own routing function (Cohere2) it runs
    grouped = plain_moe_layer(cpu_router(scoring_func="sigmoid", use_grouped_topk=True,
                                         num_expert_group=1, topk_group=1))
    assert grouped.config["scoring_func"] == "sigmoid"
    custom = plain_moe_layer(cpu_router(scoring_func="sigmoid",
                                        custom_routing_function=lambda **kw: None))
    assert custom.num_experts == 16


def test_a_selection_bias_counts_only_where_the_router_ranks_by_it():
    """vLLM's CPU router adds ``e_score_correction_bias`` in grouped top-k only; its plain
    softmax top-k ignores it (ERNIE-4.5 on CPU), and so do the trace's scores."""
    import torch

    bias = torch.randn(16)
    ernie = plain_moe_layer(cpu_router(e_score_correction_bias=bias))
    assert ernie.layers[0].selection_bias is None
    assert ernie.config["correction_bias"] is False
    deepseek = plain_moe_layer(cpu_router(scoring_func="sigmoid", use_grouped_topk=True,
                                          num_expert_group=4, topk_group=2,
                                          e_score_correction_bias=bias))
    assert deepseek.layers[0].selection_bias is bias
    assert deepseek.config["correction_bias"] is True
    assert (deepseek.config["num_expert_group"], deepseek.config["topk_group"]) == (4, 2)
    assert (ernie.config["grouped_topk"], ernie.config["num_expert_group"]) == (False, None)


def test_routing_done_in_transformers_code_is_refused():
    """vLLM's Transformers backend routes HunYuan-MoE-V1 in the model's own code and hands
    its router only the top-k weights: no logits to record, so the engine refuses."""
    from vllm.model_executor.models.transformers.moe import TransformersMoERunner

    from moepath.patches.inspection import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=(
            r"^moepath: MoE layer 'layers.0.experts' is routed by the model's own transformers "
            r"code .*its routing cannot be recorded. Record it from a transformers forward "
            r"instead \(output_router_logits=True\)$")):
        plain_moe_layer(cpu_router(), runner_cls=TransformersMoERunner)


def test_a_layer_whose_kernel_this_vllm_build_lacks_is_refused():
    """Jamba's Mamba-1 layers call torch.ops._C.selective_scan_fwd, which vLLM's CPU build
    does not have: the engine would start, then fail at its first forward."""
    import torch
    from vllm.model_executor.layers.mamba.mamba_mixer import MambaMixer

    from moepath.patches.inspection import UnsupportedModelError

    if hasattr(torch.ops._C, "selective_scan_fwd"):
        pytest.skip("this vLLM build has the Mamba-1 kernel (CUDA)")
    with pytest.raises(UnsupportedModelError, match=(
            r"^moepath: layer 'layers.0.mixer' \(MambaMixer, a Mamba-1 layer\) needs vLLM's "
            r"selective_scan_fwd kernel, which this vLLM build lacks .*Serve this model on a "
            r"CUDA GPU, where vLLM runs it$")):
        plain_moe_layer(cpu_router(), beside=bare(MambaMixer))


def test_a_layer_the_cpu_backend_runs_in_bfloat16_only_is_refused_in_float32():
    """Qwen3-Next's Gated DeltaNet kernel on CPU asserts bfloat16 at the first forward."""
    from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import (
        QwenGatedDeltaNetAttention,
    )

    from moepath.patches.inspection import UnsupportedModelError

    gdn = bare(QwenGatedDeltaNetAttention)
    with pytest.raises(UnsupportedModelError, match=(
            r"^moepath: layer 'layers.0.mixer' \(QwenGatedDeltaNetAttention, Gated DeltaNet "
            r"linear attention\) runs on vLLM 0.32.0's CPU backend in bfloat16 only, not "
            r"float32 .*serve this model with --dtype bfloat16$")):
        plain_moe_layer(cpu_router(), beside=gdn, dtype="torch.float32")
    assert plain_moe_layer(cpu_router(), beside=gdn).num_experts == 16  # bfloat16: runs


def bare(layer_cls):
    """An instance of vLLM's ``layer_cls`` with no weights or kernels built (its class is
    what inspection looks at)."""
    import torch

    layer = layer_cls.__new__(layer_cls)
    torch.nn.Module.__init__(layer)
    return layer

"""Model inspection: MoE layers and engine set-ups the capture cannot trace are refused at load."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def inspect_one_layer(quant_method, moe_config=None, use_ubatching=False,
                      pipeline_parallel_size=1, async_scheduling=False, ec_transfer_config=None,
                      kv_transfer_config=None, compiled=True):
    """``inspect_model`` of a model with one MoE layer: the real runner class with
    ``quant_method`` and ``moe_config`` set and no kernel built, in an engine
    configured by the other arguments (vLLM's names; ``compiled``: torch.compile on)."""
    from types import SimpleNamespace as NS

    import torch

    from moepath.patches import compat
    from moepath.patches.inspection import inspect_model

    runner_cls = compat.moe_runner_class()
    runner = runner_cls.__new__(runner_cls)
    torch.nn.Module.__init__(runner)
    runner.routed_experts = NS(quant_method=quant_method)
    runner.moe_config = moe_config
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].experts = runner
    from vllm.config import CompilationMode

    return inspect_model(model, NS(
        speculative_config=None, ec_transfer_config=ec_transfer_config,
        kv_transfer_config=kv_transfer_config,
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

"""Model inspection in a vLLM worker: which layers route, and how.

``inspect_model(model, vllm_config)`` runs after the worker loaded the model and
before vLLM compiles it. It finds every fused-MoE layer and refuses what it cannot
trace faithfully (:class:`UnsupportedModelError`, naming the layer or engine
option and the fix). Its :class:`ModelRouting` lists the layers in MoE-layer order
and is what the manifest records about the model's routing (``describe()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import compat


class UnsupportedModelError(RuntimeError):
    """The model's MoE layers cannot be traced faithfully (raised in the worker at load)."""


@dataclass
class MoELayer:
    """One fused-MoE layer. ``output_scale``: the ``routed_scaling_factor`` its runner
    multiplies the routed experts' output by (1.0 where the router scales the weights);
    ``selection_bias``: the router's ``e_score_correction_bias`` [E] where it ranks
    experts by score plus that bias, else None (also where it holds one it ignores)."""

    layer_id: int
    name: str
    router: object
    output_scale: float = 1.0
    selection_bias: torch.Tensor | None = None


@dataclass
class ModelRouting:
    """What the manifest records about the model's routing."""

    layers: list[MoELayer]
    num_experts: int
    top_k: int
    config: dict

    def describe(self) -> dict:
        return {
            "num_layers": len(self.layers),
            "layer_ids": [layer.layer_id for layer in self.layers],
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "routing": self.config,
        }


def inspect_model(model: torch.nn.Module, vllm_config) -> ModelRouting:
    """Find the fused-MoE layers of ``model``; refuse those the hook cannot see, and
    models whose layers this vLLM build cannot run."""
    _check_runnable(model, vllm_config)
    runner_cls = compat.moe_runner_class()
    runners = [(name, m) for name, m in model.named_modules() if isinstance(m, runner_cls)]
    if not runners:
        raise UnsupportedModelError(
            "moepath: the model has no fused-MoE layers (dense model?); nothing to trace")
    if vllm_config.speculative_config is not None:
        raise UnsupportedModelError(
            "moepath: speculative decoding is not supported while tracing (rejected draft "
            "tokens would be recorded); start the engine without --speculative-config")
    _check_engine(vllm_config)
    layers = [_moe_layer(name, runner) for name, runner in runners]
    layers.sort(key=lambda layer: layer.layer_id)
    _warn_of_ignored_biases(layers)
    first = layers[0]
    return ModelRouting(layers, first.router.global_num_experts, first.router.top_k,
                        _routing_config(first))


def _check_runnable(model: torch.nn.Module, vllm_config) -> None:
    """Refuse a model with a layer this engine cannot run (:data:`compat.LAYER_NEEDS`): a
    compiled op this vLLM build lacks, or a dtype vLLM's CPU backend does not run it in.
    vLLM would start the engine and fail at its first forward."""
    from vllm.platforms import current_platform

    dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
    for name, module in model.named_modules():
        needs = compat.LAYER_NEEDS.get(type(module).__name__)
        if needs is None:
            continue
        layer = f"moepath: layer '{name}' ({type(module).__name__}, {needs.what})"
        if needs.op is not None and not hasattr(torch.ops._C, needs.op):
            raise UnsupportedModelError(
                f"{layer} needs vLLM's {needs.op} kernel, which this vLLM build lacks (vLLM "
                f"{compat.vllm_version()}'s CPU backend has none): its first forward would "
                f"fail. Serve this model on a CUDA GPU, where vLLM runs it")
        if needs.cpu_dtype not in (None, dtype) and current_platform.is_cpu():
            raise UnsupportedModelError(
                f"{layer} runs on vLLM {compat.vllm_version()}'s CPU backend in "
                f"{needs.cpu_dtype} only, not {dtype} (its kernel asserts it at the first "
                f"forward); serve this model with --dtype {needs.cpu_dtype}")


def _check_engine(vllm_config) -> None:
    """Refuse engine set-ups whose steps the recorder cannot map to requests exactly."""
    parallel = vllm_config.parallel_config
    if parallel.use_ubatching:
        raise UnsupportedModelError(
            "moepath: micro-batching (dual-batch overlap) runs each step as separate forwards "
            "whose routing the hook cannot place; start the engine without --enable-dbo")
    if parallel.pipeline_parallel_size > 1 and _runs_uncompiled_on_cpu(vllm_config):
        raise UnsupportedModelError(
            "moepath: vLLM 0.32's CPU backend runs pipeline parallelism only compiled: "
            "without compilation its warm-up is skipped, so the later stages never allocate "
            "the buffer the previous stage's activations arrive in and the first step fails "
            "(also untraced); start the engine without --enforce-eager")
    if vllm_config.scheduler_config.async_scheduling:
        # the recorder cuts the routing of positions past a request's final output
        # (recorder.OutputLimit), but vLLM 0.32 forces async scheduling off on CPUs
        # (platforms/cpu.py), so no traced engine has run under it yet
        raise UnsupportedModelError(
            "moepath: async scheduling runs one more decode step of a request that sampled "
            "its stop token; tracing under it is not yet proven (vLLM runs it only on "
            "GPUs); start the engine with --no-async-scheduling (moepath's own engines do)")
    if vllm_config.kv_transfer_config is not None:
        raise UnsupportedModelError(
            "moepath: a KV connector loads KV computed elsewhere, whose routing this "
            "engine never saw; trace without --kv-transfer-config")
    transfer = vllm_config.ec_transfer_config
    if transfer is not None and transfer.is_encode_only:
        raise UnsupportedModelError(
            "moepath: this instance only encodes multimodal inputs for another one and runs "
            "no language-model forward; trace on the instance that consumes its encodings")


def _runs_uncompiled_on_cpu(vllm_config) -> bool:
    """Whether the engine runs on vLLM's CPU backend without torch.compile (whose
    warm-up, ``CPUModelRunner.warming_up_model``, is then skipped)."""
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    return (current_platform.is_cpu()
            and vllm_config.compilation_config.mode == CompilationMode.NONE)


def _moe_layer(name: str, runner) -> MoELayer:
    if runner.is_monolithic:
        raise UnsupportedModelError(
            f"moepath: MoE layer '{name}' uses a monolithic kernel that routes internally, so "
            f"its routing cannot be recorded; choose a modular kernel with --moe-backend")
    if _routes_other_ranks_tokens(runner):
        raise UnsupportedModelError(
            f"moepath: MoE layer '{name}' gathers the tokens of all data-, sequence- or "
            f"context-parallel ranks before routing (naive dispatch), so its routing rows "
            f"are not this rank's requests; trace with one data-parallel rank and no context "
            f"parallelism, or choose an all-to-all backend with --all2all-backend")
    if runner.moe_config.is_sequence_parallel:
        raise UnsupportedModelError(
            f"moepath: MoE layer '{name}' is sequence parallel (expert parallelism with "
            f"tensor- and data-parallel sizes above 1): each tensor-parallel rank routes "
            f"only its share of a step's tokens; trace with --tensor-parallel-size 1 or "
            f"without --enable-expert-parallel")
    if isinstance(runner, compat.external_routing_runner_class()):
        raise UnsupportedModelError(
            f"moepath: MoE layer '{name}' is routed by the model's own transformers code "
            f"(vLLM's Transformers backend could not fuse its router: HunYuan's 'gate.wg', "
            f"for one), so vLLM's router sees the chosen experts' weights, never the router "
            f"logits; its routing cannot be recorded. Record it from a transformers forward "
            f"instead (output_router_logits=True)")
    router = runner.router
    kind = type(router).__name__
    if (why := _unroutable_on_cpu(router)) is not None:
        raise UnsupportedModelError(
            f"moepath: MoE layer '{name}' {why}, which vLLM {compat.vllm_version()}'s CPU "
            f"router cannot run (it asserts softmax there: fused_moe/router/cpu_router.py); "
            f"serve this model on a CUDA GPU, where vLLM routes it")
    if kind == "RoutingSimulatorRouter":
        raise UnsupportedModelError(
            "moepath: VLLM_MOE_ROUTING_SIMULATION_STRATEGY is set, so routing is synthetic; "
            "unset it to trace the model's real routing")
    if getattr(router, "eplb_state", None) is not None:
        raise UnsupportedModelError(
            f"moepath: expert-parallel load balancing (EPLB) is on for '{name}'; tracing "
            f"records logical expert ids only without EPLB: start without --enable-eplb")
    if kind == "FusedTopKBiasRouter" and getattr(router, "num_fused_shared_experts", 0):
        raise UnsupportedModelError(
            f"moepath: '{name}' fuses shared experts into routing (top-k grows); disable "
            f"shared-expert fusion to trace it")
    return MoELayer(runner.layer_id, name, router,
                    float(getattr(runner, "routed_scaling_factor", 1.0)), _selection_bias(router))


def _unroutable_on_cpu(router) -> str | None:
    """What vLLM's CPU router cannot run in ``router``'s configuration, or None: its plain
    top-k (no expert groups, no model routing function) takes softmax scores only
    (MiniMax-M2's sigmoid asserts at the first forward)."""
    if type(router).__name__ != "CPURouter" or router.use_grouped_topk:
        return None
    if router.custom_routing_function is not None or router.scoring_func in ("softmax",
                                                                            "sqrtsoftplus"):
        return None
    return f"scores experts by a {router.scoring_func} without expert groups"


def _selection_bias(router) -> torch.Tensor | None:
    """The router's ``e_score_correction_bias`` where it ranks experts by score plus it.

    vLLM's CPU router adds it only in grouped top-k (``_grouped_topk``); its plain
    softmax top-k ignores it, so ERNIE-4.5 routes on CPU by softmax alone (on CUDA,
    ``FusedTopKBiasRouter`` adds it). The trace records what routing used.
    """
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None or type(router).__name__ != "CPURouter" or router.use_grouped_topk:
        return bias
    return None


def _warn_of_ignored_biases(layers: list[MoELayer]) -> None:
    ignored = [layer.name for layer in layers if layer.selection_bias is None
               and getattr(layer.router, "e_score_correction_bias", None) is not None]
    if ignored:
        compat.logger.warning(
            "%s %d MoE layers (first: '%s') hold a selection bias (e_score_correction_bias) "
            "that vLLM's CPU router ignores outside grouped top-k: they route by their scores "
            "alone, and the trace records that routing; transformers adds the bias "
            "(docs/models.md, ERNIE-4.5)", compat.LOG_PREFIX, len(ignored), ignored[0])


def _routes_other_ranks_tokens(runner) -> bool:
    """Whether ``runner``'s router sees other ranks' tokens as well as this rank's: vLLM's
    naive data-/sequence-parallel dispatch and its context-parallel all-gather run before
    routing (``MoERunner._maybe_dispatch``); all-to-all kernels route local tokens."""
    config = runner.moe_config
    return bool(runner.do_naive_dispatch_combine or (
        config.pcp_size > 1 and not config.moe_parallel_config.use_all2all_kernels))


def _routing_config(layer: MoELayer) -> dict:
    router = layer.router
    scoring = getattr(router, "scoring_func", "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise UnsupportedModelError(
            f"moepath: router scoring function '{scoring}' is not supported (softmax, sigmoid)")
    grouped = bool(getattr(router, "use_grouped_topk", False))
    return {
        "router": type(router).__name__,
        "scoring_func": scoring,
        "renormalize": bool(getattr(router, "renormalize", False)),
        "routed_scaling_factor": float(getattr(router, "routed_scaling_factor", 1.0))
        * layer.output_scale,
        "grouped_topk": grouped,
        "num_expert_group": int(router.num_expert_group) if grouped else None,
        "topk_group": int(router.topk_group) if grouped else None,
        "correction_bias": layer.selection_bias is not None,
    }


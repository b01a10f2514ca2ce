"""The vLLM versions and symbols moepath's patches are written against (one table).

Every patched or wrapped vLLM symbol is listed in the register in
``patches/__init__.py``; this module resolves them and checks the version once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

SUPPORTED_VLLM = ("0.32.0",)
LOG_PREFIX = "moepath:"
logger = logging.getLogger("moepath")


@dataclass(frozen=True)
class LayerNeeds:
    """What a vLLM layer's forward needs that not every engine has: a compiled op
    (``torch.ops._C.<op>``) that some builds lack, or the one dtype vLLM's CPU backend
    runs it in. ``what``: the layer in words, for the refusal."""

    what: str
    op: str | None = None
    cpu_dtype: str | None = None


# vLLM layer class -> what it needs. vLLM 0.32's CPU build has no Mamba-1 selective scan
# (Jamba), and its Gated DeltaNet kernel asserts bfloat16 (Qwen3-Next, Qwen3.5)
LAYER_NEEDS = {
    "MambaMixer": LayerNeeds("a Mamba-1 layer", op="selective_scan_fwd"),
    "QwenGatedDeltaNetAttention": LayerNeeds("Gated DeltaNet linear attention",
                                             cpu_dtype="bfloat16"),
}

# architectures (config.json ``architectures``) this vLLM release cannot load, and why
UNLOADABLE = {
    "DbrxForCausalLM": (
        "its DBRX weight loader names the expert weights 'experts.w13_weight', which its "
        "fused-MoE layer holds as 'experts.routed_experts.w13_weight', so loading any DBRX "
        "checkpoint fails (KeyError), traced or not"),
}


# architectures whose vLLM model code imports a package vLLM does not require, and why
NEEDS_PACKAGE = {
    "Qwen3_5MoeForCausalLM": ("torchvision", "vLLM's Qwen3.5 code imports its vision encoder, "
                                             "whose image processor needs torchvision"),
}


def check_loadable(architecture: str) -> str | None:
    """Why this vLLM release cannot load a checkpoint of ``architecture`` here, or None."""
    import importlib.util

    package, why = NEEDS_PACKAGE.get(architecture, (None, None))
    if package is not None and importlib.util.find_spec(package) is None:
        return (f"vLLM cannot serve {architecture} without {package} ({why}), which is not "
                f"installed; install the {package} build matching this torch")
    why = UNLOADABLE.get(architecture)
    if why is None or not any(vllm_version().startswith(v) for v in SUPPORTED_VLLM):
        return None
    return (f"vLLM {vllm_version()} cannot serve {architecture}: {why}; trace it with a vLLM "
            f"release that loads it")


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_version() -> None:
    """Warn once when running on a vLLM release the patches were not verified on."""
    version = vllm_version()
    if not any(version.startswith(v) for v in SUPPORTED_VLLM):
        logger.warning(
            "%s vLLM %s is not a verified release (verified: %s); routing capture may break",
            LOG_PREFIX, version, ", ".join(SUPPORTED_VLLM),
        )


def worker_class():
    """``vllm.v1.worker.gpu_worker.Worker``: base of the CPU and CUDA workers."""
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def router_base_class():
    """``FusedMoERouter``: every fused-MoE router; ``select_experts`` is wrapped."""
    from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter

    return FusedMoERouter


def moe_runner_class():
    """``MoERunner``: what ``FusedMoEFactory`` builds for every fused-MoE layer."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return MoERunner


def external_routing_runner_class():
    """``TransformersMoERunner``: the fused-MoE layer of a Transformers-backend model whose
    block routes in transformers' code and passes only the top-k to vLLM."""
    from vllm.model_executor.models.transformers.moe import TransformersMoERunner

    return TransformersMoERunner

"""The vLLM versions and symbols moepath's patches are written against (one table).

Every patched or wrapped vLLM symbol is listed in the register in
``patches/__init__.py``; this module resolves them and checks the version once.
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM = ("0.32.0",)
LOG_PREFIX = "moepath:"
logger = logging.getLogger("moepath")


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

"""In-place checkpoint switching for a running traced engine (``moepath compare``).

vLLM 0.32's ``Worker.reload_weights`` streams a new checkpoint into the
existing parameter storage, so compiled graphs stay valid. On CPU it has a bug:
bf16 expert weights are AMX/VNNI-prepacked only on the first load
(``CPUUnquantizedExperts.process_weights_after_loading``; on a reload
``_setup_kernel`` finds its kernel set and skips the prepack), so a reload leaves
them in checkpoint layout and silently changes routing and losses (reloading the
same checkpoint kept 90.3% of top-k sets). :func:`reload_checkpoint` therefore re-prepacks every
CPU-unquantized MoE layer into the same storage after the reload. On vLLM's Zen
platform the experts run zentorch's kernel, which reorders weights in place on
its first call and remembers them by address: after the reload its cache is
forgotten, so the new weights are reordered afresh (``zentorch_cache.py``; refused
while another model of the process is alive). Layers whose intermediate size
needs padding (``cpu_moe.py``'s ``_pad_moe_intermediate``) or other kernels are
refused, so the caller restarts the engine instead.

Callers must reset the prefix cache afterwards (KV computed with the old
weights must not be reused); ``TracedEngine.switch_checkpoint`` does.

vLLM warns "RotaryEmbedding: Failed to load weights" on every reload: a rotary
layer's only tensor is its cos/sin cache, computed from the config, which no
checkpoint carries and which the reload puts back unchanged. The warning is
dropped during :func:`reload_checkpoint` (any other layer's still shows).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from . import zentorch_cache

_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class ReloadUnsupported(RuntimeError):
    """In-place reload cannot be made exact for this model/kernel: restart the engine."""


def _cpu_prepacked_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    """(layer holding w13_weight/w2_weight, its CPU experts kernel) for every MoE layer."""
    layers = []
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and hasattr(module, "w13_weight"):
            layers.append((module, experts))
    return layers


def check_reloadable(model: torch.nn.Module, device: torch.device) -> None:
    """Raise ReloadUnsupported unless every MoE layer can be re-prepacked exactly."""
    if device.type != "cpu":
        return  # CUDA kernels keep weights in checkpoint layout: reload is exact
    layers = _cpu_prepacked_layers(model)
    if not layers:
        raise ReloadUnsupported("no CPU fused-MoE experts found to re-prepack")
    for _, experts in layers:
        if type(experts).__name__ not in ("CPUUnquantizedExperts", "X86CPUUnquantizedExperts"):
            raise ReloadUnsupported(f"{type(experts).__name__} has no verified re-prepack")
        if getattr(experts, "_use_zentorch", False):
            if not zentorch_cache.sole_model():
                raise ReloadUnsupported(
                    "another model in this process holds zentorch-reordered weights, whose "
                    "cache a reload must forget")
            continue  # zentorch pads nothing and reorders afresh once its cache is forgotten
        config = experts.moe_config
        if experts._padded_intermediate_size(config) != config.intermediate_size_per_partition:
            raise ReloadUnsupported("padded MoE intermediate size has no verified re-prepack")


def _reprepack(model: torch.nn.Module) -> None:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import cpu_prepack_moe_weight

    with torch.no_grad():
        for layer, experts in _cpu_prepacked_layers(model):
            if getattr(experts, "_use_zentorch", False):
                continue
            for name in ("w13_weight", "w2_weight"):
                weight = getattr(layer, name)
                weight.data.copy_(cpu_prepack_moe_weight(weight.data.clone(), experts.isa))


def reload_checkpoint(worker, weights_path: str) -> None:
    """Load ``weights_path`` into the worker's model in place (exact on CPU and CUDA)."""
    model = worker.model_runner.get_model()
    check_reloadable(model, worker.model_runner.device)
    with _rotary_cache_warning_dropped():
        worker.reload_weights(weights_path=weights_path)
    if worker.model_runner.device.type == "cpu":
        _reprepack(model)
        zentorch_cache.forget_weight_caches()


def _not_rotary_cache_warning(record: logging.LogRecord) -> bool:
    """A logging filter: False for the rotary-cache warning (see module)."""
    return not record.getMessage().endswith("RotaryEmbedding: Failed to load weights")


@contextmanager
def _rotary_cache_warning_dropped():
    """vLLM's reload logger without the rotary-cache warning, for the block."""
    logger = logging.getLogger(_RELOAD_LOGGER)
    logger.addFilter(_not_rotary_cache_warning)
    try:
        yield
    finally:
        logger.removeFilter(_not_rotary_cache_warning)

"""zentorch's process-wide weight cache, for models loaded one after another in one process.

On an AMD CPU with AVX-512, vLLM 0.32 switches to its Zen platform when the
``zentorch`` package imports (``vllm/platforms/__init__.py``): linear layers and
unquantized fused-MoE experts then run zentorch's ZenDNN kernels. The fused-MoE
kernel reorders every expert weight buffer *in place* on its first call and
remembers the buffer, by address, in a cache that lives as long as the process.
moepath loads several models into one process (``compare``'s checkpoints, the
engines of a Python session), which meets that cache twice:

- a model loaded after another one was freed can get the old model's addresses;
  ZenDNN then takes its checkpoint-layout weights for reordered ones (silently
  wrong routing) or fails the forward ("weight-cache miss on a buffer an earlier
  in-place (WC=2) reorder already rewrote");
- an in-place checkpoint reload writes new weights, in checkpoint layout, into
  buffers the cache holds as reordered (measured: a quarter of top-k ids wrong).

So every model loaded under zentorch is tracked (:func:`track`, from the plugin's
``load_model`` wrapper). When one is garbage-collected while another is alive,
its parameters are kept (their addresses stay taken) until the last model goes;
then the cache is forgotten (:func:`forget_weight_caches`) and they are released.
A reload forgets the cache at once, so ZenDNN reorders the new weights afresh;
that is right only when no other model is alive (:func:`sole_model`), whose
reordered buffers would be reordered twice.
"""

from __future__ import annotations

import weakref

import torch

_live_models = 0
_retired: list[list[torch.Tensor]] = []  # parameters of freed models, while others live


def loaded() -> bool:
    """Whether zentorch's kernels are loaded in this process (vLLM's Zen platform)."""
    namespace = getattr(torch.ops, "zentorch", None)
    return namespace is not None and hasattr(namespace, "zentorch_flush_moe_weight_cache")


def track(model: torch.nn.Module) -> None:
    """Count ``model`` as alive until it is garbage-collected; then keep its parameters
    while another tracked model is alive (see module)."""
    global _live_models
    _live_models += 1
    freed = weakref.finalize(model, _model_freed, list(model.parameters()))
    freed.atexit = False  # the process ends with its cache: no zentorch calls at shutdown


def sole_model() -> bool:
    """Whether at most one tracked model is alive in this process."""
    return _live_models <= 1


def _model_freed(parameters: list[torch.Tensor]) -> None:
    global _live_models
    _live_models -= 1
    if _live_models:
        _retired.append(parameters)
        return
    forget_weight_caches()
    _retired.clear()


def forget_weight_caches() -> None:
    """Drop zentorch's process-wide weight caches (fused-MoE and linear); no-op without it."""
    if loaded():
        torch.ops.zentorch.zentorch_flush_moe_weight_cache()
        torch.ops.zentorch.zentorch_clear_weight_cache()

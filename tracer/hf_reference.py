"""Routing from a Hugging Face transformers forward: the independent reference.

This is how researchers trace routing by hand (``output_router_logits=True``),
and what moepath's vLLM capture is checked against (tests, ``bench/``).
p = softmax(router logits) for OLMoE, Mixtral and Qwen2-MoE; for routers with a
selection bias (GLM-4.5, DeepSeek-V3 style) p = sigmoid(router logits) + bias,
the scores they rank experts by. The chosen experts and their gate weights are
read where transformers dispatches tokens to its experts (the arguments of each
MoE block's ``experts`` module), not recomputed from p.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .toy import correction_biases


@dataclass
class ReferenceRouting:
    """HF routing of one sample: full distributions and their top-k.

    Attributes:
        probs: float32 [T, L, E], the router scores of every MoE layer (see module).
        expert_ids: int64 [T, L, k], the experts transformers sent each token to (in the
            order its router returns them).
        gate_weights: float32 [T, L, k], the weights it multiplied their outputs by
            (after its renormalisation and ``routed_scaling_factor``), same order.
        nll: mean next-token negative log-likelihood in nats over tokens 1..T-1.
    """

    probs: np.ndarray
    expert_ids: np.ndarray
    gate_weights: np.ndarray
    nll: float


def load_model(path: str | Path, dtype: str = "float32"):
    """The transformers model in the checkpoint folder ``path``, in eval mode, its
    weights in ``dtype`` (a torch dtype name: ``"float32"``, ``"bfloat16"``)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype)).eval()


def hf_routing(model, token_ids: list[int]) -> ReferenceRouting:
    """One forward of ``token_ids`` through ``model`` (a loaded transformers MoE)."""
    import torch

    ids = torch.tensor([token_ids])
    dispatched = []  # per MoE layer, in forward order: (top_k_index [T, k], weights [T, k])

    def keep(_experts, args):
        _, top_k_index, top_k_weights = args
        dispatched.append((top_k_index, top_k_weights.float()))

    hooks = [experts.register_forward_pre_hook(keep) for experts in _expert_modules(model)]
    try:
        with torch.no_grad():
            out = model(ids, output_router_logits=True)
    finally:
        for hook in hooks:
            hook.remove()
    logits = torch.stack([layer.reshape(len(token_ids), -1) for layer in out.router_logits], 1)
    biases = correction_biases(model)
    if biases:
        probs = logits.float().sigmoid() + torch.stack(biases).float()  # [T, L, E] + [L, E]
    else:
        probs = logits.float().softmax(-1)
    log_probs = out.logits[0, :-1].float().log_softmax(-1)
    nll = -log_probs.gather(1, ids[0, 1:, None]).mean().item()
    expert_ids = torch.stack([index for index, _ in dispatched], 1).numpy()
    gate_weights = torch.stack([weights for _, weights in dispatched], 1).numpy()
    return ReferenceRouting(probs.numpy(), expert_ids, gate_weights, nll)


def _expert_modules(model) -> list:
    """Each MoE layer's ``experts`` module (called with hidden states, top-k ids, weights)."""
    return [layer.mlp.experts for layer in model.model.layers
            if hasattr(layer.mlp, "experts")]

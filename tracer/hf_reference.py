"""Routing from a Hugging Face transformers forward: the independent reference.

This is how researchers trace routing by hand (``output_router_logits=True``),
and what moepath's vLLM capture is checked against (tests, ``bench/``).
p = softmax(router logits) for OLMoE, Mixtral and Qwen2-MoE; for routers with a
selection bias (GLM-4.5, DeepSeek-V3 style) p = sigmoid(router logits) + bias,
the scores they rank experts by.
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
        expert_ids: int64 [T, L, k], top-k of ``probs`` (descending).
        nll: mean next-token negative log-likelihood over tokens 1..T-1.
    """

    probs: np.ndarray
    expert_ids: np.ndarray
    nll: float


def load_model(path: str | Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype)).eval()


def hf_routing(model, token_ids: list[int], top_k: int) -> ReferenceRouting:
    """One forward of ``token_ids`` through ``model`` (a loaded transformers MoE)."""
    import torch

    ids = torch.tensor([token_ids])
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    logits = torch.stack([layer.reshape(len(token_ids), -1) for layer in out.router_logits], 1)
    biases = correction_biases(model)
    if biases:
        probs = logits.float().sigmoid() + torch.stack(biases).float()  # [T, L, E] + [L, E]
    else:
        probs = logits.float().softmax(-1)
    log_probs = out.logits[0, :-1].float().log_softmax(-1)
    nll = -log_probs.gather(1, ids[0, 1:, None]).mean().item()
    return ReferenceRouting(probs.numpy(), probs.topk(top_k, dim=-1).indices.numpy(), nll)

"""The routing hook: runs inside the model's forward, compiled or eager.

On CPU vLLM compiles the MoE layer with this hook inside the inductor graph
(``fullgraph=True``), and on CUDA it is replayed inside CUDA graphs. So the
hook only copies into buffers preallocated before compilation: no I/O, no
host sync, no allocation visible to the host, no branching on tensor values.
After the step, ``capture.StepRecorder`` reads rows ``[:num_tokens]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class CaptureBuffers:
    """Per-worker step buffers; row r is the r-th token of the current step.

    Attributes:
        expert_ids: int32 [T, L, k], logical ids (EPLB is refused, so ids are logical).
        gate_weights: float32 [T, L, k], weights the model used.
        router_logits: float32 [T, L, E], the router's logits over the E routed
            experts; scored (:func:`router_scores`) after the step, only for
            the rows that need a distribution (prompt rows, ``--store-probs``).
    """

    expert_ids: torch.Tensor
    gate_weights: torch.Tensor
    router_logits: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, layers: int, top_k: int, experts: int, device) -> CaptureBuffers:
        def zeros(width, dtype):
            return torch.zeros((rows, layers, width), dtype=dtype, device=device)

        return cls(zeros(top_k, torch.int32), zeros(top_k, torch.float32),
                   zeros(experts, torch.float32))


BUFFERS: CaptureBuffers | None = None


def record(slot: int, num_experts: int, router_logits, topk_weights, topk_ids):
    """Copy one layer's routing of this step's tokens into row range [:n] of slot ``slot``.

    Three copies and nothing else: the scoring function runs once per step
    over the rows that need it, not per layer over every token.
    """
    n = topk_ids.shape[0]
    BUFFERS.expert_ids[:n, slot].copy_(topk_ids)
    BUFFERS.gate_weights[:n, slot].copy_(topk_weights)
    BUFFERS.router_logits[:n, slot].copy_(router_logits[:n, :num_experts])  # drop fused shared


def router_scores(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """float32 [..., E] router logits -> the full distribution under the model's scoring
    function: softmax over the E experts, or per-expert sigmoid scores."""
    return logits.sigmoid() if sigmoid else logits.softmax(dim=-1)


def wrap_select_experts(original):
    """``FusedMoERouter.select_experts`` that also records routing of traced layers.

    Routers of layers moepath found at load carry ``_moepath_slot`` (MoE layer
    ordinal); others (none in a traced engine) pass through untouched.
    """

    @functools.wraps(original)
    def select_experts(self, hidden_states, router_logits, *args, **kwargs):
        topk_weights, topk_ids = original(self, hidden_states, router_logits, *args, **kwargs)
        slot = getattr(self, "_moepath_slot", None)
        if slot is not None:
            record(slot, self.global_num_experts, router_logits, topk_weights, topk_ids)
        return topk_weights, topk_ids

    select_experts.__moepath_wrapped__ = True
    return select_experts

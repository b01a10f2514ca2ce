"""The routing hook: runs inside the model's forward, compiled or eager.

On CPU vLLM compiles the MoE layer with this hook inside the inductor graph
(``fullgraph=True``), and on CUDA it is replayed inside CUDA graphs. So the
hook only copies into buffers preallocated before compilation: no I/O, no
host sync, no allocation visible to the host, no branching on tensor values.
Under torch.compile the copies run as the opaque op ``moepath::copy_routing``
(see :func:`record`). After the step, ``capture.StepRecorder`` reads rows
``[:num_tokens]`` and scores the router logits of the rows it needs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

MAX_CACHED_VIEWS = 4096  # (slot, n) pairs, ~1 KiB of tensor views each


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
    _views: dict = field(default_factory=dict, init=False, repr=False)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.expert_ids, self.gate_weights, self.router_logits

    def rows(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of rows [:n] of layer slot ``slot``: [n, k], [n, k], [n, E].

        Cached per (slot, n): slicing a tensor costs ~2 us, as much as copying a
        decode step's routing into it, and a decode batch keeps its n for many
        steps. The cache is dropped whole when it reaches ``MAX_CACHED_VIEWS``.
        """
        views = self._views.get((slot, n))
        if views is None:
            if len(self._views) >= MAX_CACHED_VIEWS:
                self._views.clear()
            views = self._views[(slot, n)] = tuple(b[:n, slot] for b in self.buffers())
        return views

    @classmethod
    def allocate(cls, rows: int, layers: int, top_k: int, experts: int, device) -> CaptureBuffers:
        def zeros(width, dtype):
            return torch.zeros((rows, layers, width), dtype=dtype, device=device)

        return cls(zeros(top_k, torch.int32), zeros(top_k, torch.float32),
                   zeros(experts, torch.float32))


BUFFERS: CaptureBuffers | None = None
# Cleared by the recorder for the forward of a step none of whose rows it will score
# (a decode step that continues its run); set again after that forward, so forwards
# outside ``execute_model`` (warm-up, CUDA graph capture) always copy the logits.
LOGITS_WANTED = True


def _copy_routing(expert_ids: torch.Tensor, gate_weights: torch.Tensor,
                  router_logits: torch.Tensor, slot: int, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, logits: torch.Tensor) -> None:
    """Copy one layer's routing of this step's n tokens into rows [:n] of slot ``slot``."""
    n = topk_ids.shape[0]
    ours = BUFFERS
    if (ours is not None and expert_ids is ours.expert_ids and gate_weights is ours.gate_weights
            and router_logits is ours.router_logits):
        ids_rows, weight_rows, logit_rows = ours.rows(slot, n)
    else:  # a compiler may hand the buffers over as other tensor objects
        ids_rows, weight_rows, logit_rows = (b[:n, slot] for b in (expert_ids, gate_weights,
                                                                   router_logits))
    ids_rows.copy_(topk_ids)
    weight_rows.copy_(topk_weights)
    if LOGITS_WANTED:
        logit_rows.copy_(logits)


# The copy as an opaque op that mutates the buffers in place. Traced by inductor
# (vLLM compiles the router on CPU), three slice writes into a global buffer are
# functionalised into a rewrite of the whole buffer, every row of every layer,
# whatever the step's token count: that halved compiled throughput. The op runs
# the three copies eagerly on rows [:n] only.
_LIBRARY = torch.library.Library("moepath", "FRAGMENT")
_LIBRARY.define("copy_routing(Tensor(a!) expert_ids, Tensor(b!) gate_weights, "
                "Tensor(c!) router_logits, int slot, Tensor topk_ids, Tensor topk_weights, "
                "Tensor logits) -> ()")
_LIBRARY.impl("copy_routing", _copy_routing, "CompositeExplicitAutograd")
_LIBRARY._register_fake("copy_routing", lambda *args: None)


def record(slot: int, num_experts: int, router_logits, topk_weights, topk_ids):
    """Copy one layer's routing of this step's tokens into row range [:n] of slot ``slot``.

    Three copies and nothing else: the scoring function runs once per step
    over the rows that need it, not per layer over every token. Under
    torch.compile through the opaque op; eagerly, where its dispatch is pure
    overhead, directly.
    """
    copy = (torch.ops.moepath.copy_routing if torch.compiler.is_compiling()
            else _copy_routing)
    if router_logits.shape[-1] != num_experts:
        router_logits = router_logits[:, :num_experts]  # drop fused shared-expert columns
    copy(*BUFFERS.buffers(), slot, topk_ids, topk_weights, router_logits)


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

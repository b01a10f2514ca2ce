"""The routing hook: runs inside the model's forward, compiled or eager.

On CPU vLLM compiles the MoE layer with this hook inside the inductor graph
(``fullgraph=True``), and on CUDA it is replayed inside CUDA graphs. So the
hook only writes into buffers preallocated before compilation: no I/O, no
host sync, no branching on tensor values. Under torch.compile its writes are
graph code that inductor fuses into the router's kernels (see :func:`record`).

The hook also scores each layer's router distribution (softmax or sigmoid)
while the logits are still in cache: scoring them after the step from a
buffer cost more (bench/HISTORY.md, "Prefill: scoring in the hook"). After the
step, ``recorder.StepRecorder`` reads rows ``[:num_tokens]``.
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
        gate_weights: float32 [T, L, k], weights the model multiplied the experts'
            outputs by (after renormalisation and ``routed_scaling_factor``).
        router_scores: float32 [L, T, E], layer-major: the router's full
            distribution over the E routed experts (:func:`score_into`), plus
            the router's selection bias if it has one (:func:`record`); eagerly
            written only for steps whose distributions are read
            (:data:`SCORES_WANTED`), by a compiled graph for every step.
            Layer-major so that a layer's rows [:n] are contiguous and the
            softmax writes them directly.
        sigmoid: the model scores experts with a sigmoid (else softmax).
    """

    expert_ids: torch.Tensor
    gate_weights: torch.Tensor
    router_scores: torch.Tensor
    sigmoid: bool = False
    _layers: list = field(init=False, repr=False)
    _views: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self._layers = [(self.expert_ids[:, slot], self.gate_weights[:, slot],
                         self.router_scores[slot]) for slot in range(self.expert_ids.shape[1])]

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.expert_ids, self.gate_weights, self.router_scores

    def layer(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer slot ``slot``'s own views of the buffers: [T, k], [T, k], [T, E]."""
        return self._layers[slot]

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
            views = self._views[(slot, n)] = tuple(view[:n] for view in self.layer(slot))
        return views

    @classmethod
    def allocate(cls, rows: int, layers: int, top_k: int, experts: int, device,
                 sigmoid: bool = False) -> CaptureBuffers:
        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(rows, layers, top_k, dtype=torch.int32), zeros(rows, layers, top_k),
                   zeros(layers, rows, experts), sigmoid)


BUFFERS: CaptureBuffers | None = None
# Cleared by the recorder for the forward of a step none of whose rows it will score
# (a decode step that continues its run, a step of untraced requests); set again
# after that forward, so forwards outside ``execute_model`` (warm-up, CUDA graph
# capture) always score. Read by the eager hook only (see :func:`record`).
SCORES_WANTED = True


def score_into(logits: torch.Tensor, out: torch.Tensor, sigmoid: bool) -> None:
    """Write the model's scoring function of router logits [n, E] (any float dtype)
    into ``out`` (float32 [n, E]): softmax over the E experts, or per-expert sigmoid,
    computed in float32 as transformers' routers do."""
    if sigmoid:
        out.copy_(logits).sigmoid_()  # in place: no float32 temporary
    else:
        torch.softmax(logits, -1, dtype=torch.float32, out=out)


def record(slot: int, num_experts: int, router_logits, topk_weights, topk_ids,
           bias: torch.Tensor | None = None, weight_scale: float = 1.0):
    """Write one layer's routing of this step's n tokens into rows [:n] of slot ``slot``:
    two copies (ids, weights) and one scoring of the logits.

    ``weight_scale``: the ``routed_scaling_factor`` vLLM applies to the layer's output
    rather than to ``topk_weights`` (GLM-4.5, DeepSeek-V3); the recorded weights include
    it, so they are the weights the model used whichever side vLLM scales.

    ``bias``: the router's ``e_score_correction_bias`` [E] (DeepSeek-V3-style routers
    choose experts by sigmoid score plus this load-balancing bias), added to the
    scores so that they are what the router ranks experts by (docs/method.md:
    "sigmoid(+bias)"); None for routers without one.

    Eagerly the scoring runs only when :data:`SCORES_WANTED`. Traced by
    torch.compile, the writes are graph code into the slot's own views of the
    buffers (:meth:`CaptureBuffers.layer`): inductor fuses them into the router's
    kernels and writes rows [:n] in place (slice writes of every layer into the
    whole buffer were functionalised into rewrites of every row of every
    layer). A graph cannot branch on the flag, so compiled steps always score.
    """
    if router_logits.shape[-1] != num_experts:
        router_logits = router_logits[:, :num_experts]  # drop fused shared-expert columns
    n = topk_ids.shape[0]
    if torch.compiler.is_compiling():
        ids_rows, weight_rows, score_rows = (view[:n] for view in BUFFERS.layer(slot))
        scored = True
    else:
        ids_rows, weight_rows, score_rows = BUFFERS.rows(slot, n)
        scored = SCORES_WANTED
    ids_rows.copy_(topk_ids)
    weight_rows.copy_(topk_weights)
    if weight_scale != 1.0:
        weight_rows.mul_(weight_scale)
    if scored:
        score_into(router_logits, score_rows, BUFFERS.sigmoid)
        if bias is not None:
            score_rows.add_(bias)


def wrap_select_experts(original):
    """``FusedMoERouter.select_experts`` that also records routing of traced layers.

    Routers of layers moepath found at load carry ``_moepath_slot`` (MoE layer
    ordinal), ``_moepath_weight_scale`` and ``_moepath_bias`` (the selection bias the
    router ranks by, or None: ``inspection.MoELayer``); others (none in a traced
    engine) pass through untouched.
    """

    @functools.wraps(original)
    def select_experts(self, hidden_states, router_logits, *args, **kwargs):
        topk_weights, topk_ids = original(self, hidden_states, router_logits, *args, **kwargs)
        slot = getattr(self, "_moepath_slot", None)
        if slot is not None:
            record(slot, self.global_num_experts, router_logits, topk_weights, topk_ids,
                   self._moepath_bias, self._moepath_weight_scale)
        return topk_weights, topk_ids

    select_experts.__moepath_wrapped__ = True
    return select_experts

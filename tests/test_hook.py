"""The routing hook: rows of this step only, eager and compiled, scored as the model scores."""

from __future__ import annotations

import pytest

L, K, E = 2, 2, 4  # MoE layers, top-k, experts


@pytest.mark.parametrize("compiled", [False, True])
def test_the_hook_writes_rows_of_this_step_only_eager_and_under_torch_compile(compiled):
    """vLLM compiles the router on CPU with fullgraph=True; the hook's writes then are
    graph code on the layer's own views of the buffers, rows [:n] only."""
    import torch

    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(8, L, K, E, "cpu")
    hook.BUFFERS.gate_weights.fill_(-1.0)  # rows of earlier steps
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((5, E + 2), generator=generator)  # 2 fused shared-expert columns
    weights, ids = torch.topk(logits[:, :E].softmax(-1), K)

    def layer_forward(logits, weights, ids):
        hook.record(1, E, logits, weights, ids.to(torch.int32))
        return weights * 2

    if compiled:
        layer_forward = torch.compile(layer_forward, backend="aot_eager", fullgraph=True)
    layer_forward(logits, weights, ids)

    buffers = hook.BUFFERS
    assert torch.equal(buffers.expert_ids[:5, 1], ids.to(torch.int32))
    assert torch.equal(buffers.gate_weights[:5, 1], weights)
    torch.testing.assert_close(buffers.router_scores[1, :5], logits[:, :E].softmax(-1))
    assert (buffers.gate_weights[5:] == -1).all() and (buffers.gate_weights[:, 0] == -1).all()
    assert not buffers.router_scores[:, 5:].any() and not buffers.router_scores[0].any()


@pytest.mark.parametrize("sigmoid", [False, True])
def test_the_hook_scores_bfloat16_logits_in_float32_with_the_models_scoring(sigmoid):
    """vLLM's CPU router hands bf16 logits over; transformers scores them in float32.
    A sigmoid router's selection bias (DeepSeek-V3 style) is part of its scores."""
    import torch

    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(8, L, K, E, "cpu", sigmoid=sigmoid)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn((3, E), generator=generator).bfloat16()
    weights, ids = torch.topk(logits.float().softmax(-1), K)
    hook.record(0, E, logits, weights, ids.to(torch.int32))
    wanted = logits.float().sigmoid() if sigmoid else logits.float().softmax(-1)
    assert torch.equal(hook.BUFFERS.router_scores[0, :3], wanted)
    if sigmoid:
        bias = torch.randn(E, generator=generator) * 0.1
        hook.record(1, E, logits, weights, ids.to(torch.int32), bias)
        assert torch.equal(hook.BUFFERS.router_scores[1, :3], wanted + bias)


def test_a_step_that_wants_no_scores_still_records_ids_and_weights(monkeypatch):
    import torch

    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(8, L, K, E, "cpu")
    monkeypatch.setattr(hook, "SCORES_WANTED", False)
    logits = torch.randn((4, E))
    weights, ids = torch.topk(logits.softmax(-1), K)
    hook.record(1, E, logits, weights, ids.to(torch.int32))
    assert torch.equal(hook.BUFFERS.expert_ids[:4, 1], ids.to(torch.int32))
    assert torch.equal(hook.BUFFERS.gate_weights[:4, 1], weights)
    assert not hook.BUFFERS.router_scores.any()


def test_steps_of_changing_size_write_their_own_rows_through_the_cached_views(monkeypatch):
    import torch

    from moepath.patches import hook

    monkeypatch.setattr(hook, "MAX_CACHED_VIEWS", 2)  # the cache also overflows
    hook.BUFFERS = hook.CaptureBuffers.allocate(8, L, K, E, "cpu")
    for step, n in enumerate((5, 3, 5, 2)):
        ids = torch.full((n, K), step, dtype=torch.int32)
        for slot in range(L):
            hook.record(slot, E, torch.zeros((n, E)), torch.zeros((n, K)), ids + slot)
    # slot s, step i wrote i + s into rows [:n_i]; later, shorter steps leave rows past n
    assert hook.BUFFERS.expert_ids[:5, 1, 0].tolist() == [4, 4, 3, 3, 3]
    assert hook.BUFFERS.expert_ids[:5, 0, 0].tolist() == [3, 3, 2, 2, 2]
    assert (hook.BUFFERS.expert_ids[5:] == 0).all()


def test_a_compiled_hook_writes_the_rows_the_eager_hook_writes(monkeypatch):
    """vLLM compiles the CPU router with the hook inside (``fullgraph=True``, dynamic
    token count): the hook is then graph code writing each layer's own rows [:n],
    and a graph scores every step, whatever the flag."""
    import torch

    from moepath.patches import hook

    bias = torch.randn(E, generator=torch.Generator().manual_seed(5))  # the last layer's

    def route(logits):  # each layer's router, then the hook, as vLLM's MoE layers run
        for slot in range(L):
            weights, ids = torch.topk((logits + slot).softmax(-1), K)
            hook.record(slot, E, logits + slot, weights, ids.to(torch.int32),
                        bias if slot == L - 1 else None)
        return logits

    compiled = torch.compile(route, fullgraph=True, dynamic=True)
    expected, written = (hook.CaptureBuffers.allocate(8, L, K, E, "cpu") for _ in range(2))
    generator = torch.Generator().manual_seed(4)
    for n in (5, 3):  # the second step is shorter: rows [3:5] keep the first step's
        logits = torch.randn((n, E), generator=generator)
        hook.BUFFERS = expected
        route(logits)
        hook.BUFFERS = written
        monkeypatch.setattr(hook, "SCORES_WANTED", False)
        compiled(logits)
        monkeypatch.setattr(hook, "SCORES_WANTED", True)
        for got, want in zip(written.buffers(), expected.buffers(), strict=True):
            torch.testing.assert_close(got, want)
    assert written.router_scores[:, 3:5].any() and not written.router_scores[:, 5:].any()

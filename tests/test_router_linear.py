"""Router linears found in a model and read back by probing, on plain torch modules.

The engine tests (tests/test_capture.py) check the same on vLLM's loaded toys against
an HF forward; these show the rules on blocks built to break them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moepath.patches.router_linear import (
    RouterMatrixUnavailable,
    from_replies,
    layer_reply,
    locate,
    probe,
)

E, HIDDEN = 6, 10


class Runner(nn.Module):
    """Stands in for vLLM's MoERunner: its experts hold E-row weights too."""

    def __init__(self, gate=None):
        super().__init__()
        self.gate = gate
        self.w13 = nn.Linear(HIDDEN, E)  # an E-output linear inside the experts: never the router


class Block(nn.Module):
    def __init__(self, router_name="gate", bias=False, extra=None):
        super().__init__()
        self.add_module(router_name, nn.Linear(HIDDEN, E, bias=bias))
        self.shared_expert_gate = nn.Linear(HIDDEN, E)  # shared experts are skipped by name
        self.experts = Runner()
        if extra:
            self.add_module(extra, nn.Linear(HIDDEN, E))


class Model(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.layers = nn.ModuleList([block])


@pytest.mark.parametrize("router_name", ["gate", "router"])
def test_the_one_linear_with_e_outputs_beside_the_experts_is_the_router(router_name):
    model = Model(Block(router_name))
    linear = locate(model, "layers.0.experts", model.layers[0].experts, E)
    assert linear.name == f"layers.0.{router_name}"
    assert linear.module is getattr(model.layers[0], router_name)


def test_a_gate_the_runner_applies_itself_wins():
    gate = nn.Linear(HIDDEN, E)
    block = Block(extra="other")  # two candidates in the block, but the runner names its own
    block.experts = Runner(gate)
    model = Model(block)
    assert locate(model, "layers.0.experts", block.experts, E).module is gate


def test_several_candidates_are_reported_not_guessed():
    model = Model(Block(extra="second"))
    with pytest.raises(RouterMatrixUnavailable,
                       match=r"MoE block 'layers.0' has no single linear with 6 outputs .*"
                             r"\(found: 'layers.0.gate', 'layers.0.second'\)"):
        locate(model, "layers.0.experts", model.layers[0].experts, E)


def test_probe_reads_weight_and_bias_back_exactly_in_float32():
    torch.manual_seed(0)
    linear = locate(model := Model(Block(bias=True)), "layers.0.experts",
                    model.layers[0].experts, E)
    weight, bias = probe(linear, "cpu")
    torch.testing.assert_close(weight, linear.module.weight.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(bias, linear.module.bias.detach(), rtol=0, atol=0)


def test_probe_recovers_a_matrix_the_module_no_longer_holds():
    """vLLM's CPU linears repack their weight and leave ``weight`` empty: the probe reads
    the map the module computes, not the parameter."""
    torch.manual_seed(1)
    hidden_matrix = torch.randn(E, HIDDEN)

    class Repacked(nn.Module):
        quant_method = object()  # marks a vLLM linear
        input_size, output_size, params_dtype = HIDDEN, E, torch.float32

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
            self.bias = None

        def forward(self, x):
            return x @ hidden_matrix.T, None  # vLLM linears return (output, bias)

    block = Block()
    block.gate = Repacked()
    model = Model(block)
    weight, bias = probe(locate(model, "layers.0.experts", block.experts, E), "cpu")
    torch.testing.assert_close(weight, hidden_matrix, rtol=0, atol=1e-6)
    assert bias is None


def test_a_module_that_is_not_linear_in_its_input_is_refused():
    class Clipped(nn.Linear):
        def forward(self, x):
            return super().forward(x).clamp(-0.05, 0.05)

    block = Block()
    block.gate = Clipped(HIDDEN, E)
    model = Model(block)
    reply = layer_reply(model, type("Layer", (), {"name": "layers.0.experts"}), E, "cpu")
    assert reply["unavailable"].startswith(
        "router linear 'layers.0.gate' (Clipped) is not a linear map of its input")
    assert from_replies([reply]).unavailable == reply["unavailable"]


def test_replies_become_the_traces_router_weights_with_biases_where_present():
    torch.manual_seed(2)
    with_bias, without = Model(Block(bias=True)), Model(Block())
    layer = type("Layer", (), {"name": "layers.0.experts"})
    replies = [layer_reply(model, layer, E, "cpu") for model in (with_bias, without)]
    result = from_replies(replies)
    assert result.unavailable is None
    np.testing.assert_allclose(result.weights[1], without.layers[0].gate.weight.detach().numpy(),
                               atol=1e-6)
    np.testing.assert_array_equal(result.biases[0], with_bias.layers[0].gate.bias.detach().numpy())
    np.testing.assert_array_equal(result.biases[1], np.zeros(E, np.float32))
    assert from_replies([replies[1]]).biases is None


def test_a_router_linear_sharded_over_ranks_is_reported():
    """A column-parallel linear computes only this rank's share of the experts' logits."""

    class Sharded(nn.Module):
        quant_method = object()
        input_size, output_size, params_dtype = HIDDEN, E, torch.float32

        def forward(self, x):
            return x[:, : E // 2], None

    block = Block()
    block.gate = Sharded()
    model = Model(block)
    with pytest.raises(RouterMatrixUnavailable, match="'layers.0.gate' gives 3 of its 6 outputs "
                                                      "on this rank"):
        probe(locate(model, "layers.0.experts", block.experts, E), "cpu")

"""Toy MoE checkpoints: real architectures, deterministic, peaked (non-uniform) routing."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from moepath.fixtures.hf_reference import hf_routing, load_model, moe_layer_ids
from moepath.tracer.checkpoints import moe_shape, router_weights
from moepath.tracer.errors import InputError

ALL_LAYERS = [0, 1, 2, 3]


@pytest.mark.parametrize(("arch", "moe_layers", "top_k"), [
    ("olmoe", ALL_LAYERS, 4), ("mixtral", ALL_LAYERS, 4),
    ("qwen2moe", [0, 2, 3], 4),  # mlp_only_layers=[1]: a dense layer between MoE layers
    ("glm4moe", [1, 2, 3], 4),  # layer 0 is dense, as in GLM-4.5
    ("phimoe", ALL_LAYERS, 2),  # sparsemixer routes to exactly two experts
    ("granitemoe", ALL_LAYERS, 4), ("qwen3moe", ALL_LAYERS, 4), ("deepseekv3", [1, 2, 3], 4),
    ("ernie45moe", [1, 2, 3], 4), ("llama4", ALL_LAYERS, 1), ("gptoss", ALL_LAYERS, 4),
    # `make test-models`: the rest of the matrix
    *(pytest.param(arch, layers, 4, marks=pytest.mark.models) for arch, layers in (
        ("dbrx", ALL_LAYERS), ("jamba", [1, 3]), ("granitemoeshared", ALL_LAYERS),
        ("granitemoehybrid", ALL_LAYERS), ("qwen3next", [1, 2, 3]), ("qwen35moe", ALL_LAYERS),
        ("minimaxm2", ALL_LAYERS), ("hunyuanmoe", ALL_LAYERS), ("cohere2moe", [1, 2, 3]),
        ("lfm2moe", [1, 2, 3]), ("exaonemoe", [1, 2, 3]), ("afmoe", [1, 2, 3]),
        ("flexolmo", ALL_LAYERS), ("glm4moelite", [1, 2, 3]), ("deepseekv2", [1, 2, 3]))),
])
def test_each_toy_architecture_loads_in_transformers_and_routes(arch, moe_layers, top_k,
                                                                toy_factory):
    from transformers import AutoTokenizer

    path = toy_factory(arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The router sends each token to experts.").input_ids
    model = load_model(path)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    routing = hf_routing(model, ids)
    assert moe_layer_ids(model) == moe_layers
    assert routing.probs.shape == (len(ids), len(moe_layers), 16)
    assert routing.expert_ids.shape == routing.gate_weights.shape == (len(ids), len(moe_layers),
                                                                      top_k)
    assert routing.router_inputs.shape == (len(ids), len(moe_layers), 128)
    # router weights are rescaled so the top expert gets far more than 1/16
    assert routing.probs.max(-1).mean() > 0.25
    shape = moe_shape(path)
    assert (shape.num_hidden_layers, shape.num_experts, shape.top_k) == (4, 16, top_k)
    assert sorted(router_weights(path, 16)) == moe_layers


def test_a_bias_router_toy_has_a_random_selection_bias_that_changes_the_choice(toy_factory):
    """glm4moe routers rank experts by sigmoid score plus a load-balancing bias, which
    transformers initialises to zero; the toy draws it, so the bias matters."""
    from moepath.fixtures.toy import CORRECTION_BIAS_STD, correction_biases

    model = load_model(toy_factory("glm4moe"))
    biases = torch.stack(correction_biases(model))
    assert biases.shape == (3, 16)
    assert 0.5 * CORRECTION_BIAS_STD < biases.std() < 2 * CORRECTION_BIAS_STD
    ids = list(range(5, 45))
    routing = hf_routing(model, ids)
    out = model(torch.tensor([ids]), output_router_logits=True)
    unbiased = torch.stack(out.router_logits, 1).sigmoid().topk(4, -1).indices.sort(-1).values
    biased = torch.from_numpy(routing.expert_ids).sort(-1).values
    assert (unbiased != biased).any(-1).float().mean() > 0.1  # the bias changes some choices


def test_same_seed_same_weights_other_seed_other_weights(toy_factory, tmp_path):
    from moepath.fixtures.toy import build_toy_model

    again = build_toy_model(tmp_path / "again", "olmoe", "tiny", seed=0)
    other = build_toy_model(tmp_path / "other", "olmoe", "tiny", seed=1)
    key = "model.layers.0.mlp.gate.weight"

    def gate(path):
        with safe_open(path / "model.safetensors", "pt") as handle:
            return handle.get_tensor(key)

    assert torch.equal(gate(toy_factory("olmoe")), gate(again))
    assert not torch.equal(gate(again), gate(other))


def test_unknown_architecture_and_preset_are_named(tmp_path):
    from moepath.fixtures.toy import build_toy_model

    with pytest.raises(InputError, match="unknown preset 'huge'; choose one of tiny, olmoe"):
        build_toy_model(tmp_path, preset="huge")
    with pytest.raises(InputError, match="unknown toy architecture 'gpt'; choose one of olmoe, "
                                         "mixtral, qwen2moe, glm4moe, granitemoe, phimoe"):
        build_toy_model(tmp_path, arch="gpt")


def test_a_router_with_a_bias_gets_a_random_one(toy_factory):
    """gpt-oss routers add a bias to the logits, which transformers initialises to zero;
    the toy draws it as large as the logits' spread, so a trace must keep it."""
    from moepath.fixtures.toy import ROUTER_LOGIT_STD, router_biases

    biases = torch.stack(router_biases(load_model(toy_factory("gptoss")), 16))
    assert biases.shape == (4, 16)
    assert 0.5 * ROUTER_LOGIT_STD < biases.std() < 2 * ROUTER_LOGIT_STD

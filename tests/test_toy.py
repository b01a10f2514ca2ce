"""Toy MoE checkpoints: real architectures, deterministic, peaked (non-uniform) routing."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from moepath.tracer.checkpoints import moe_shape, router_weights
from moepath.tracer.errors import InputError
from moepath.tracer.hf_reference import hf_routing, load_model


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "qwen2moe"])
def test_each_toy_architecture_loads_in_transformers_and_routes(arch, toy_factory):
    from transformers import AutoTokenizer

    path = toy_factory(arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The router sends each token to experts.").input_ids
    model = load_model(path)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    routing = hf_routing(model, ids, top_k=4)
    assert routing.probs.shape == (len(ids), 4, 16)
    # router weights are rescaled so the top expert gets far more than 1/16
    assert routing.probs.max(-1).mean() > 0.25
    shape = moe_shape(path)
    assert (shape.num_hidden_layers, shape.num_experts, shape.top_k) == (4, 16, 4)
    assert sorted(router_weights(path, 16)) == [0, 1, 2, 3]


def test_same_seed_same_weights_other_seed_other_weights(toy_factory, tmp_path):
    from moepath.tracer.toy import build_toy_model

    again = build_toy_model(tmp_path / "again", "olmoe", "tiny", seed=0)
    other = build_toy_model(tmp_path / "other", "olmoe", "tiny", seed=1)
    key = "model.layers.0.mlp.gate.weight"

    def gate(path):
        with safe_open(path / "model.safetensors", "pt") as handle:
            return handle.get_tensor(key)

    assert torch.equal(gate(toy_factory("olmoe")), gate(again))
    assert not torch.equal(gate(again), gate(other))


def test_unknown_architecture_and_preset_are_named(tmp_path):
    from moepath.tracer.toy import build_toy_model

    with pytest.raises(InputError, match="unknown preset 'huge'; choose one of tiny, olmoe"):
        build_toy_model(tmp_path, preset="huge")
    with pytest.raises(InputError, match="unknown toy architecture 'gpt'"):
        build_toy_model(tmp_path, arch="gpt")

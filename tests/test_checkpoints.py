"""Model folders read as plain files: MoE shape from config.json, router tensors by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moepath.tracer.checkpoints import moe_shape, router_weights
from moepath.tracer.errors import ModelError


def folder(tmp_path, config: dict, tensors: dict | None = None):
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize(("config", "shape"), [
    ({"num_experts": 64, "num_experts_per_tok": 8}, (64, 8)),                 # OLMoE, Qwen
    ({"num_local_experts": 8, "num_experts_per_tok": 2}, (8, 2)),             # Mixtral
    ({"n_routed_experts": 256, "num_experts_per_tok": 8}, (256, 8)),          # DeepSeek-V3
    ({"moe_num_experts": 64, "moe_k": 6}, (64, 6)),                           # ERNIE-4.5-MoE
    ({"text_config": {"num_local_experts": 16, "num_experts_per_tok": 1}}, (16, 1)),  # Llama 4
    ({"num_experts": 64, "moe_topk": 8}, (64, 8)),                            # HunYuan
])
def test_expert_count_and_top_k_from_each_familys_keys(tmp_path, config, shape):
    config = {"architectures": ["X"], "num_hidden_layers": 4, **config}
    result = moe_shape(folder(tmp_path, config))
    assert (result.num_experts, result.top_k) == shape


def test_dbrx_keeps_its_moe_in_ffn_config_and_its_depth_in_n_layers(tmp_path):
    config = {"architectures": ["DbrxForCausalLM"], "n_layers": 40,
              "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4}}
    shape = moe_shape(folder(tmp_path, config))
    assert (shape.num_hidden_layers, shape.num_experts, shape.top_k) == (40, 16, 4)


def test_experts_without_a_top_k_key_say_so_rather_than_dense(tmp_path):
    path = folder(tmp_path, {"architectures": ["NewMoe"], "moe_num_experts": 8, "k": 2})
    with pytest.raises(ModelError, match=r"\(NewMoe\) declares 8 routed experts but no "
                                         r"experts per token \(num_experts_per_tok/"):
        moe_shape(path)


@pytest.mark.parametrize("name", [
    "model.layers.3.mlp.gate.weight",                       # OLMoE, Qwen, DeepSeek, ERNIE
    "model.layers.3.block_sparse_moe.router.layer.weight",  # GraniteMoE
    "transformer.blocks.3.ffn.router.layer.weight",         # DBRX
    "model.layers.3.mlp.router.weight",                     # gpt-oss, PhiMoE
    "language_model.model.layers.3.feed_forward.router.weight",  # Llama 4
    "model.layers.3.mlp.router.gate.weight",                # AFMoE
    "model.layers.3.mlp.gate.wg.weight",                    # HunYuan
])
def test_router_tensors_are_found_under_each_familys_name(tmp_path, name):
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    shared = {"model.layers.3.mlp.shared_expert_gate.weight": np.ones((1, 3), np.float32)}
    path = folder(tmp_path, {}, {name: weight, **shared})
    found = router_weights(path, 4)
    assert list(found) == [3]
    np.testing.assert_array_equal(found[3], weight)


def test_router_tensors_of_a_sharded_checkpoint_are_read_from_every_shard(tmp_path):
    """save_pretrained(max_shard_size=...) splits the layers over files named by an index."""
    from safetensors.numpy import save_file

    weights = {layer: np.full((4, 3), layer, np.float32) for layer in (0, 2, 3)}  # 1: dense
    index = {}
    for shard, layers in enumerate(((0,), (2, 3))):
        name = f"model-0000{shard + 1}-of-00002.safetensors"
        tensors = {f"model.layers.{layer}.mlp.gate.weight": weights[layer] for layer in layers}
        save_file(tensors, str(tmp_path / name))
        index |= dict.fromkeys(tensors, name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    found = router_weights(tmp_path, 4)
    assert sorted(found) == [0, 2, 3]
    for layer, weight in weights.items():
        np.testing.assert_array_equal(found[layer], weight)

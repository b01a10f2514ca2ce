"""Model folders: validation and MoE shape from ``config.json``; router tensors by name.

Validation and the MoE shape read the Hugging Face ``config.json`` as plain JSON
before any weight loads (no code from the folder runs), so a dense model or a
missing folder is reported in milliseconds. :func:`router_weights` reads the router
tensors of the ``*.safetensors`` files whose names it knows: a cross-check only
(``provenance.py``: is this the checkpoint a trace was made with?). A trace's
router matrices come from the model vLLM served (``patches/router_linear.py``),
which works whatever the checkpoint calls them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError

# config keys naming the routed-expert count and top-k, across MoE families
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token", "moe_k")
_STEP = re.compile(r"(?:step|checkpoint|ckpt|iter)[-_]?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class MoEShape:
    """Routing shape a config declares: layers, routed experts, top-k."""

    architecture: str
    num_hidden_layers: int
    num_experts: int
    top_k: int


def read_config(path: str | Path) -> dict:
    """The folder's config.json; ModelError when the folder or file is missing or bad."""
    folder = Path(path)
    if not folder.exists():
        raise ModelError(f"model path '{folder}' does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"'{folder}' is not a model folder (no config.json); pass a Hugging Face "
            f"checkpoint folder")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"'{config_file}' is not valid JSON ({exc})") from exc


def moe_shape(path: str | Path) -> MoEShape:
    """Routing shape of the model in ``path``; ModelError for dense (non-MoE) models."""
    config = read_config(path)
    text = config.get("text_config", config)
    experts = next((text[k] for k in _EXPERT_KEYS if text.get(k)), None)
    top_k = next((text[k] for k in _TOPK_KEYS if text.get(k)), None)
    architecture = (config.get("architectures") or ["unknown"])[0]
    if not experts:
        raise ModelError(
            f"model '{path}' ({architecture}) has no MoE layers: its config declares no "
            f"routed experts ({'/'.join(_EXPERT_KEYS)}); moepath traces Mixture-of-Experts "
            f"models only")
    if not top_k:
        raise ModelError(
            f"model '{path}' ({architecture}) declares {experts} routed experts but no "
            f"experts per token ({'/'.join(_TOPK_KEYS)}); add the key its model code reads "
            f"to config.json, or report the architecture to moepath")
    return MoEShape(architecture, int(text.get("num_hidden_layers", 0)), int(experts), int(top_k))


def config_sha256(path: str | Path) -> str:
    """sha256 of config.json's bytes: identifies the architecture/config of a checkpoint."""
    return hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()


def step_number(name: str) -> int | None:
    """The training step in a checkpoint folder name, e.g. ``step5000-tokens21B`` -> 5000."""
    match = _STEP.search(name)
    return int(match.group(1)) if match else None


_ROUTER_BLOCKS = ("mlp", "block_sparse_moe", "moe", "feed_forward", "ffn")
# gate (OLMoE, Mixtral, Qwen, DeepSeek, ERNIE, PhiMoE), router (gpt-oss, Llama 4, Jamba),
# router.layer (GraniteMoE, DBRX); decoder layers are "layers" or "blocks" (DBRX)
_ROUTER_NAMES = ("gate", "router", r"router\.layer")
_ROUTER_KEY = re.compile(rf"(?:layers|blocks)\.(\d+)\.(?:{'|'.join(_ROUTER_BLOCKS)})\."
                         rf"(?:{'|'.join(_ROUTER_NAMES)})\.weight$")


def router_weights(path: str | Path, num_experts: int) -> dict[int, np.ndarray]:
    """Router matrices of a checkpoint by tensor name: {decoder layer index: float32
    [E, hidden]}.

    Read from the folder's ``*.safetensors`` files (never pickle). A router is a
    ``(layers|blocks).<i>.<block>.(gate|router|router.layer).weight`` tensor with
    ``num_experts`` rows (Qwen2-MoE's one-row ``shared_expert_gate`` does not match).
    ModelError when there is none.
    """
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelError(f"model '{path}' has no .safetensors weights; moepath reads only "
                         f"safetensors checkpoints (no pickle)")
    found = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                match = _ROUTER_KEY.search(key)
                if match:
                    tensor = handle.get_tensor(key)
                    if tensor.ndim == 2 and tensor.shape[0] == num_experts:
                        found[int(match.group(1))] = tensor.float().numpy()
    if not found:
        raise ModelError(f"no router tensors found by name in '{path}': none matches "
                         f"'{_ROUTER_KEY.pattern}' with {num_experts} rows")
    return found

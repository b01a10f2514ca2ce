"""Model folders: validation and MoE shape from ``config.json``; checkpoint folders of a
training run (which, in which order, at which step); router tensors by name.

Validation and the MoE shape read the Hugging Face ``config.json`` as plain JSON
before any weight loads (no code from the folder runs), so a dense model or a
missing folder is reported in milliseconds. :func:`discover` orders and validates
the checkpoints ``moepath compare`` serves in turn. :func:`router_weights` reads the
router tensors of the ``*.safetensors`` files whose names it knows: a cross-check
only (``provenance.py``: is this the checkpoint a trace was made with?). A trace's
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

from .errors import InputError, ModelError

# config keys naming the routed-expert count and top-k, across MoE families
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token", "moe_k",
              "moe_top_k")
_LAYER_KEYS = ("num_hidden_layers", "n_layers")
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
    moe = {**text, **(text.get("ffn_config") or {})}  # DBRX keeps its MoE in ffn_config
    experts = next((moe[k] for k in _EXPERT_KEYS if moe.get(k)), None)
    top_k = next((moe[k] for k in _TOPK_KEYS if moe.get(k)), None)
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
    layers = next((text[k] for k in _LAYER_KEYS if text.get(k)), 0)
    return MoEShape(architecture, int(layers), int(experts), int(top_k))


def config_sha256(path: str | Path) -> str:
    """sha256 of config.json's bytes: identifies the architecture/config of a checkpoint."""
    return hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()


def step_number(name: str) -> int | None:
    """The training step in a checkpoint folder name, e.g. ``step5000-tokens21B`` -> 5000."""
    match = _STEP.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder, its display name and training step (None if its name has none)."""

    name: str
    path: Path
    step: int | None


def discover(paths: list[Path]) -> list[Checkpoint]:
    """Checkpoints from explicit folders (given order) or one parent folder (step order).

    A single path without config.json is a parent: its subfolders holding a
    config.json are the checkpoints, ordered by the step number in their names
    (``step1000``, ``checkpoint-2000``, ``step5000-tokens21B``).

    Raises:
        ModelError: a folder is missing or is not a model.
        InputError: two folders share a name or a step, explicit folders named by step
            are not in increasing step order, or a parent's subfolder has no step number.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_dir():
            raise ModelError(f"checkpoint folder '{path}' does not exist")
    if len(paths) == 1 and not (paths[0] / "config.json").is_file():
        return _from_parent(paths[0])
    found = [Checkpoint(p.name, p, step_number(p.name)) for p in paths]
    for checkpoint in found:
        read_config(checkpoint.path)  # a folder that is not a model fails here
    _check_unique_names(found)
    if any(c.step is None for c in found):  # ordered by position (see steps)
        return found
    _check_unique_steps(found)
    _check_training_order(found)
    return found


def _from_parent(parent: Path) -> list[Checkpoint]:
    children = sorted(p for p in parent.iterdir() if (p / "config.json").is_file())
    if not children:
        raise ModelError(f"'{parent}' is neither a model folder nor a folder of checkpoints "
                         f"(no subfolder has a config.json)")
    found = [Checkpoint(p.name, p, step_number(p.name)) for p in children]
    unnumbered = [c.name for c in found if c.step is None]
    if unnumbered:
        raise InputError(
            f"checkpoint folders without a step number in their name: {unnumbered}; name them "
            f"like 'step1000' or pass the folders explicitly in order")
    _check_unique_steps(found)
    return sorted(found, key=lambda c: c.step)


def _check_unique_steps(found: list[Checkpoint]) -> None:
    """InputError when two checkpoints' names give the same step (memorisation orders by step)."""
    first_at: dict[int, str] = {}
    for checkpoint in found:
        if checkpoint.step in first_at:
            raise InputError(f"checkpoints '{first_at[checkpoint.step]}' and '{checkpoint.name}' "
                             f"share step {checkpoint.step}; pass one")
        first_at[checkpoint.step] = checkpoint.name


def _check_training_order(found: list[Checkpoint]) -> None:
    """InputError when explicit folders are not given in increasing step order."""
    for before, after in zip(found, found[1:], strict=False):
        if before.step > after.step:
            raise InputError(f"'{before.name}' is given before '{after.name}'; pass checkpoints "
                             f"in training order")


def _check_unique_names(found: list[Checkpoint]) -> None:
    names = [c.name for c in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"checkpoint folder names must be unique (traces are stored by name): "
                         f"{duplicates}")


def check_compatible(found: list[Checkpoint]) -> MoEShape:
    """The shared routing shape; ModelError naming checkpoints whose L, E or k differ."""
    shapes = {c.name: moe_shape(c.path) for c in found}
    reference_name, reference = next(iter(shapes.items()))
    for name, shape in shapes.items():
        diffs = [f"{field} {getattr(reference, field)} vs {getattr(shape, field)}"
                 for field in ("num_hidden_layers", "num_experts", "top_k")
                 if getattr(shape, field) != getattr(reference, field)]
        if diffs:
            raise ModelError(f"checkpoints '{reference_name}' and '{name}' differ in "
                             f"{', '.join(diffs)}; compare needs one architecture")
    return reference


def steps(found: list[Checkpoint]) -> dict[str, int]:
    """Step of each checkpoint: from the names when every name has one, else the positions
    (0, 1, ...) of all of them, so that ``step1000, final`` keeps its given order."""
    if any(c.step is None for c in found):
        return {c.name: i for i, c in enumerate(found)}
    return {c.name: c.step for c in found}


_ROUTER_BLOCKS = ("mlp", "block_sparse_moe", "moe", "feed_forward", "ffn")
# gate (OLMoE, Mixtral, Qwen, DeepSeek, ERNIE, PhiMoE), router (gpt-oss, Llama 4, Jamba),
# router.layer (GraniteMoE, DBRX), router.gate (AFMoE), gate.wg (HunYuan); decoder layers
# are "layers" or "blocks" (DBRX)
_ROUTER_NAMES = ("gate", "router", r"router\.layer", r"router\.gate", r"gate\.wg")
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

"""Router linears in a vLLM worker: the map from hidden state to router logits, read back.

The consistency metric uses each MoE layer's router matrix W_l [E, hidden] as expert
embeddings (docs/method.md, Metric 2). Checkpoint tensor names for it differ by
architecture (``mlp.gate``, ``router.layer``, ``ffn.router.layer``, ``mlp.router``
with a bias...), so moepath takes it from the model vLLM loaded instead:

1. **Find** (:func:`locate`): the module whose output is the layer's router logits.
   When vLLM's runner applies the gate itself (``MoERunner.gate``, passed as
   ``gate=``), that module by construction. Otherwise the one linear of the block
   that owns the fused-MoE layer (its parent module) with E outputs, outside the
   experts and any shared expert: none or several, and the layer has no matrix,
   with the reason.
2. **Read by probing** (:func:`probe`): the module applied to the identity matrix
   gives W^T + b whatever its kernel, so weights that vLLM's CPU linears repack
   and then drop (``layer.weight`` becomes empty), or stores quantised, come back
   as the map the model computes. Probes run eagerly between steps, never inside a
   forward. A GateLinear is a ReplicatedLinear: every tensor-parallel rank holds
   the whole matrix.
3. **Verify**: the probed (W, b) must reproduce the module's output on random
   inputs to within the rounding of its output dtype; a module that is not a
   linear map of its input (activation quantisation, say) is reported, not
   guessed at.

Precision: W comes back exactly in the module's parameter dtype (identity rows
select single weights) unless the linear has a bias and a 16-bit output, where
W = (W + b) - b carries the output rounding (gpt-oss in bf16: half an ulp of W + b).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..tracer.store import RouterWeights

PROBE_ROWS = 1024  # identity rows per probe call: bounds the probe's memory
CHECK_ROWS = 8


class RouterMatrixUnavailable(RuntimeError):
    """A layer's router matrix cannot be read back faithfully; the message says why."""


@dataclass
class RouterLinear:
    """The module that computes one MoE layer's router logits, and its module path."""

    name: str
    module: torch.nn.Module


def locate(model: torch.nn.Module, runner_name: str, runner,
           num_experts: int) -> RouterLinear:
    """The router linear of the fused-MoE layer ``runner`` (module path ``runner_name``).

    Raises:
        RouterMatrixUnavailable: no linear, or several, could be the router.
    """
    gate = getattr(runner, "gate", None)
    if gate is not None:  # vLLM's runner computes the logits with it (runner-held gate)
        return RouterLinear(f"{runner_name}.gate", gate)
    block_name = runner_name.rpartition(".")[0]
    block = model.get_submodule(block_name)
    candidates = [
        (name, module) for name, module in block.named_modules()
        if module is not runner and not _inside(name, runner_name, block_name)
        and "shared" not in name and _output_size(module) == num_experts]
    if len(candidates) != 1:
        found = ", ".join(f"'{block_name}.{name}'" for name, _ in candidates) or "none"
        raise RouterMatrixUnavailable(
            f"MoE block '{block_name}' has no single linear with {num_experts} outputs "
            f"outside its experts that could compute the router logits (found: {found})")
    name, module = candidates[0]
    return RouterLinear(f"{block_name}.{name}", module)


def _inside(name: str, runner_name: str, block_name: str) -> bool:
    """Whether the block's submodule ``name`` lies inside the fused-MoE runner."""
    relative = runner_name[len(block_name) + 1:]
    return name == relative or name.startswith(relative + ".")


def _output_size(module: torch.nn.Module) -> int | None:
    """Outputs of a vLLM linear (``output_size``) or a torch ``nn.Linear``; None otherwise."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    return getattr(module, "output_size", None) if hasattr(module, "quant_method") else None


def probe(linear: RouterLinear, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W float32 [E, hidden], b float32 [E] or None) such that the module computes
    ``x @ W.T + b``; checked on random inputs.

    Raises:
        RouterMatrixUnavailable: the module's output is not that affine map of its input.
    """
    module = linear.module
    hidden = _input_size(module)
    dtype = _input_dtype(module)
    with torch.inference_mode():
        at_zero = _apply(module, torch.zeros(1, hidden, dtype=dtype, device=device))
        out_dtype, bias = at_zero.dtype, at_zero[0].float()
        has_bias = getattr(module, "bias", None) is not None
        eye = torch.eye(hidden, dtype=dtype, device=device)
        columns = torch.cat([_apply(module, eye[i:i + PROBE_ROWS]).float()
                             for i in range(0, hidden, PROBE_ROWS)])  # [hidden, E] = W^T + b
        if columns.shape[1] != _output_size(module):
            raise RouterMatrixUnavailable(
                f"router linear '{linear.name}' gives {columns.shape[1]} of its "
                f"{_output_size(module)} outputs on this rank (sharded over tensor-parallel "
                f"ranks?); moepath reads replicated router linears only")
        weight = (columns - bias if has_bias else columns).T.contiguous()
        _check_affine(linear, weight, bias if has_bias else None, dtype, out_dtype, device)
    return weight.cpu(), bias.cpu() if has_bias else None


def _apply(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's full output on ``x``: vLLM linears may return (out, bias), the bias
    not yet added when ``skip_bias_add``."""
    out = module(x)
    if isinstance(out, tuple):
        out, extra = out
        if extra is not None:
            out = out + extra
    return out


def _input_size(module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    return int(module.input_size)


def _input_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the module takes: its parameters' (fp32 gates are fed fp32 by their
    models), else the first floating parameter's."""
    dtype = getattr(module, "params_dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    floating = [p.dtype for p in module.parameters() if p.dtype.is_floating_point]
    return floating[0] if floating else torch.get_default_dtype()


def _check_affine(linear: RouterLinear, weight: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype, out_dtype: torch.dtype, device) -> None:
    """The probed map must reproduce the module on random inputs within its rounding."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(CHECK_ROWS, weight.shape[1], generator=generator, device=device).to(dtype)
    got = _apply(linear.module, x).double()
    expected = x.double() @ weight.double().T
    scale = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        expected += bias.double()
        scale += bias.double().abs()
    # output rounding (bf16: 2^-8 relative) plus float32 accumulation over the hidden size
    eps = (max(torch.finfo(dtype).eps, torch.finfo(out_dtype).eps)
           + weight.shape[1] * torch.finfo(torch.float32).eps)
    error = ((got - expected).abs() / (scale + 1e-30)).max().item()
    if not error <= 2 * eps:
        raise RouterMatrixUnavailable(
            f"router linear '{linear.name}' ({type(linear.module).__name__}) is not a linear "
            f"map of its input that moepath can read back (relative error {error:.1e} on "
            f"random inputs; quantised activations?)")


def layer_reply(model: torch.nn.Module, layer, num_experts: int, device) -> dict:
    """The ``moepath_router_weights`` reply for one MoE layer (``inspection.MoELayer``):
    ``weight`` float32 bytes [E, hidden] C order, ``shape``, ``bias`` float32 bytes [E]
    or None, ``linear`` (module path); or ``unavailable`` with the reason. Bytes, not
    arrays: vLLM's RPC serialiser breaks numpy arrays (docs: VLLM_NOTES section 8)."""
    try:
        linear = locate(model, layer.name, model.get_submodule(layer.name), num_experts)
        weight, bias = probe(linear, device)
    except RouterMatrixUnavailable as exc:
        return {"unavailable": str(exc)}
    return {"weight": weight.numpy().tobytes(), "shape": list(weight.shape),
            "bias": bias.numpy().tobytes() if bias is not None else None,
            "linear": linear.name}


def from_replies(replies: list[dict]) -> RouterWeights:
    """The trace's :class:`RouterWeights` from one writer reply per MoE layer (slot order):
    every layer's matrix, or the first layer's reason why there is none."""
    missing = next((reply["unavailable"] for reply in replies if "unavailable" in reply), None)
    if missing is not None:
        return RouterWeights(None, unavailable=missing)
    weights = [np.frombuffer(reply["weight"], np.float32).reshape(reply["shape"]).copy()
               for reply in replies]
    if all(reply["bias"] is None for reply in replies):
        return RouterWeights(weights)
    biases = [np.frombuffer(reply["bias"], np.float32).copy() if reply["bias"] is not None
              else np.zeros(len(weight), np.float32)
              for reply, weight in zip(replies, weights, strict=True)]
    return RouterWeights(weights, biases)

"""What a trace was made from, and how another run differs: resume and merge refuse to mix.

A trace's manifest records its input (samples file, part, how the file was read),
its model (config.json and router weights) and the options of the run. A run
that differs in what changes the records must not continue the trace
(``--resume``, a server restarted on its directory) nor be merged with it
(``moepath merge``). Each ``*_difference`` function returns why two runs differ,
in words for an error message, or None when they may share a trace. Fields an
older trace does not record are not compared, so older traces still resume.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import checkpoints, store
from .errors import InputError, ModelError
from .manifest import InputInfo, Manifest, ModelInfo
from .samples import SampleSet

# Options that change what a trace records. The context (max_model_len) matters only
# with truncate: it is where samples are cut (without truncate, a sample that does not
# fit is refused, so the context cannot change a record).
RESULT_OPTIONS = ("dtype", "max_tokens", "nll", "store", "store_probs", "truncate")
# How the samples file was read, as far as it decides which samples a run traces and
# under which ids; ``limit`` only shortens the list, so a resume may extend it.
IDENTITY_READ_OPTIONS = ("id_field", "text_field")


def input_section(sample_set: SampleSet) -> InputInfo:
    """The manifest's ``input``: which file (and which part of it) the trace covers, read how."""
    return InputInfo(path=sample_set.path, sha256=sample_set.source_sha256,
                     format=sample_set.format, read=asdict(sample_set.read_options),
                     part=tuple(sample_set.part) if sample_set.part is not None else None)


def input_difference(before: InputInfo, now: InputInfo, read_options=IDENTITY_READ_OPTIONS,
                     compare_part: bool = True) -> str | None:
    """How the ``input`` sections ``before`` and ``now`` differ: samples file, part (with
    ``compare_part``) or the ``read_options`` fields of how the file was read."""
    if before.sha256 != now.sha256:
        return (f"it was traced from a different samples file ('{before.path}', "
                f"now '{now.path}')")
    if compare_part and before.part != now.part:
        return (f"it was traced from a different part ('{before.path}'{_part_text(before)}, "
                f"now '{now.path}'{_part_text(now)})")
    read_before, read_now = before.read or {}, now.read or {}
    changed = [f"--{key.replace('_', '-')} {read_before[key]}, now {read_now[key]}"
               for key in read_options if key in read_before and read_before[key] != read_now[key]]
    return f"its samples were read otherwise ({'; '.join(changed)})" if changed else None


def options_difference(before: dict, now: dict) -> str | None:
    """How the run options ``before`` and ``now`` (manifest ``options``) differ in what
    changes the records (:data:`RESULT_OPTIONS`)."""
    keys = RESULT_OPTIONS + (("max_model_len",) if now.get("truncate") else ())
    changed = [f"--{key.replace('_', '-')} {before[key]}, now {now[key]}"
               for key in keys if key in before and before[key] != now[key]]
    return f"it was traced with other settings ({'; '.join(changed)})" if changed else None


def model_difference(trace_dir: str | Path, manifest: Manifest,
                     model: str | Path) -> str | None:
    """Why ``model`` is not the checkpoint the trace in ``trace_dir`` (``manifest``) was made
    with; None when it is.

    Compares the sha256 of config.json, then the router weights with the trace's
    router.safetensors: routers change at every training step, so checkpoints of
    one run differ there. Expert weights are not read (gigabytes).
    """
    recorded = manifest.model
    if recorded.config_sha256 not in (None, checkpoints.config_sha256(model)):
        why = "its config.json differs"
    elif manifest.router_weights and not _same_router_weights(trace_dir, recorded, model):
        why = "its router weights differ"
    else:
        return None
    return (f"it was traced with another model ({why}: '{recorded.path}', "
            f"now '{Path(model).resolve()}')")


def check_resumable(out: Path, previous: Manifest, model: str | Path, sample_set: SampleSet,
                    options: dict, start_over: str = "--force or another --out") -> None:
    """Refuse to continue the trace in ``out`` (manifest ``previous``) with other samples,
    another model or other result-affecting ``options`` (the manifest's ``options`` of
    the new run): the trace would mix both runs' records. Starts no engine.

    Fields an older trace does not record are not compared. ``start_over`` names
    how the caller's user starts a new trace instead. Cheap checks first: the
    model's router weights are read only when samples and settings match.
    """
    differences = (
        ("samples", lambda: input_difference(previous.input, input_section(sample_set))),
        ("settings", lambda: options_difference(previous.options or {}, options)),
        ("model", lambda: model_difference(out, previous, model)))
    for same, difference in differences:
        if text := difference():
            raise InputError(f"cannot resume '{out}': {text}; pass the same {same} to "
                             f"resume, or {start_over} to start over")


def _same_router_weights(trace_dir: str | Path, recorded: ModelInfo, model: str | Path) -> bool:
    """Whether the checkpoint's router tensors are the trace's router matrices.

    The trace holds the matrices as the served model computed with them: the
    checkpoint's values rounded to the serving dtype (bf16 for a float32 checkpoint
    served in bf16), so each layer is compared exactly after rounding to float32,
    bfloat16 or float16. A checkpoint whose router tensors carry no name the reader
    knows (:func:`checkpoints.router_weights`) is not compared here: config.json
    then decides alone.
    """
    try:
        by_layer = checkpoints.router_weights(model, recorded.num_experts)
    except ModelError:
        return True
    now = [by_layer.get(layer) for layer in recorded.layer_ids]
    return all(weights is not None and _equal_after_rounding(weights, before)
               for weights, before in zip(now, store.read_router_weights(trace_dir), strict=True))


def _equal_after_rounding(checkpoint: np.ndarray, served: np.ndarray) -> bool:
    import torch

    tensor = torch.from_numpy(checkpoint)
    return any(np.array_equal(tensor.to(dtype).float().numpy(), served)
               for dtype in (torch.float32, torch.bfloat16, torch.float16))


def _part_text(section: InputInfo) -> str:
    return f" part {section.part[0]}/{section.part[1]}" if section.part else ""

"""Serve checkpoints in turn on the same samples (the engine side of ``moepath compare``).

Every checkpoint sees exactly the same token ids (tokenised once, with the first
checkpoint's tokenizer, same truncation). Each checkpoint's trace is a normal
trace directory ``traces/<name>/``; a complete one is skipped, a partial one
resumed, and one made from other samples, another checkpoint or other settings
is refused before any engine starts (``compare`` deletes no trace). Consecutive
checkpoints reuse the running engine through an in-place weight reload
(``TracedEngine.switch_checkpoint``; exact, see ``reload.py``) when their
config.json is identical and the engine allows it; otherwise the engine is shut
down and the next one started.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..tracer import checkpoints, provenance, store
from ..tracer.errors import CaptureError, TraceFormatError
from ..tracer.manifest import COMPLETE, Manifest
from ..tracer.samples import SampleSet
from ..tracer.writer import TraceWriter
from .engine import (
    TracedEngine,
    TraceJob,
    TraceSummary,
    max_prompt_len,
    recorded_options,
    tokenize_samples,
    with_max_len,
)
from .options import EngineOptions, TraceOptions


@dataclass(frozen=True)
class SweepEvent:
    """Progress of a sweep: checkpoint ``index`` (0-based) of ``total``; ``action`` is
    one of ``skip`` (already complete), ``start`` (new engine), ``reload`` (in place)."""

    index: int
    total: int
    name: str
    action: str


def is_complete(trace_dir: Path) -> bool:
    """A finished trace (whether it fits this sweep is :func:`_check_existing`'s concern)."""
    try:
        return Manifest.read(trace_dir).status == COMPLETE
    except TraceFormatError:
        return False


def _check_existing(models: list[tuple[str, Path]], sample_set: SampleSet, traces_dir: Path,
                   options: dict) -> None:
    """Refuse, before any engine starts, to skip or resume a checkpoint's trace made from
    other samples, another checkpoint or other settings (``options`` as
    :func:`~.engine.recorded_options` gives them): the comparison would mix them.
    """
    for name, path in models:
        out = traces_dir / name
        if store.has_manifest(out):
            provenance.check_resumable(out, Manifest.read(out), path, sample_set,
                                       options, start_over=f"another --out (or delete '{out}')")


def trace_checkpoints(
    models: list[tuple[str, Path]], sample_set: SampleSet, traces_dir: Path,
    engine_options: EngineOptions | None = None, options: TraceOptions | None = None,
    reuse_engine: bool = True, on_checkpoint: Callable[[SweepEvent], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[TraceSummary | None]:
    """Trace ``sample_set`` through each (name, folder) of ``models`` into ``traces_dir/<name>``.

    Returns one summary per checkpoint (None for skipped complete traces).
    """
    engine_options, options = engine_options or EngineOptions(), options or TraceOptions()
    first = models[0][1]
    max_len = max_prompt_len(first, engine_options, options)
    job = TraceJob(sample_set, tokenize_samples(first, sample_set, max_len, options.truncate,
                                                engine_options.trust_remote_code),
                   engine_options, options)
    started = with_max_len(engine_options, max_len, options)
    _check_existing(models, sample_set, traces_dir,
                   recorded_options(engine_options, options, started.max_model_len))
    engine: TracedEngine | None = None
    summaries: list[TraceSummary | None] = []
    try:
        for index, (name, path) in enumerate(models):
            out = traces_dir / name
            if is_complete(out):
                _notify(on_checkpoint, SweepEvent(index, len(models), name, "skip"))
                summaries.append(None)
                continue
            # a directory without manifest died before its first commit: start it over
            resumable = store.has_manifest(out)
            writer = TraceWriter.open(out, resume=resumable, force=not resumable)
            engine, action = _engine_for(engine, path, out, started, reuse_engine)
            _notify(on_checkpoint, SweepEvent(index, len(models), name, action))
            summaries.append(job.run(engine, writer, on_start, on_progress))
    finally:
        if engine is not None:
            engine.close()
    return summaries


def _engine_for(engine: TracedEngine | None, model: Path, out: Path, options: EngineOptions,
                reuse: bool) -> tuple[TracedEngine, str]:
    """The running engine switched to ``model`` if allowed, else a freshly started one."""
    if engine is not None and reuse and engine.reload_blocker is None and (
            checkpoints.config_sha256(engine.model) == checkpoints.config_sha256(model)):
        finished = engine.settings.dir
        if engine.switch_checkpoint(model, out):  # TraceJob.run flushed after its last batch
            raise CaptureError(f"routing reached the finished trace '{finished}' while "
                               f"switching checkpoints; rerun with --no-reuse-engine")
        return engine, "reload"
    if engine is not None:
        engine.close()
    return TracedEngine(model, out, options, commit=False), "start"


def _notify(callback, event: SweepEvent) -> None:
    if callback:
        callback(event)

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
    summaries: list[TraceSummary | None] = []
    with CheckpointSweep(sample_set, traces_dir, engine_options, options, reuse_engine,
                         on_start, on_progress) as sweep:
        sweep.prepare(models[0][1])
        _check_existing(models, sample_set, traces_dir, sweep.recorded_options)
        for index, (name, path) in enumerate(models):
            summaries.append(sweep.trace(name, path, lambda action, i=index, n=name: _notify(
                on_checkpoint, SweepEvent(i, len(models), n, action))))
    return summaries


class CheckpointSweep:
    """One engine kept warm across checkpoints traced one at a time, as they come
    (``moepath compare`` gives them all at once, ``moepath watch`` as training writes them).

    The samples are tokenised once, with the tokenizer and context of the first
    checkpoint traced (:meth:`prepare`, else the first :meth:`trace`). A checkpoint
    whose complete trace exists is skipped; a partial one is resumed after
    ``provenance.check_resumable``. Use as a context manager (closes the engine).
    """

    def __init__(self, sample_set: SampleSet, traces_dir: Path,
                 engine_options: EngineOptions | None = None,
                 options: TraceOptions | None = None, reuse_engine: bool = True,
                 on_start: Callable[[int, int], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None):
        self.sample_set, self.traces_dir = sample_set, Path(traces_dir)
        self.engine_options = engine_options or EngineOptions()
        self.options = options or TraceOptions()
        self.reuse_engine, self.on_start, self.on_progress = reuse_engine, on_start, on_progress
        self.engine: TracedEngine | None = None
        self._job: TraceJob | None = None
        self._started: EngineOptions | None = None
        self._config: str | None = None  # config.json sha256 of the engine's checkpoint

    def prepare(self, model: Path) -> None:
        """Tokenise the samples with ``model``'s tokenizer and context (once)."""
        if self._job is not None:
            return
        max_len = max_prompt_len(model, self.engine_options, self.options)
        tokenized = tokenize_samples(model, self.sample_set, max_len, self.options.truncate,
                                     self.engine_options.trust_remote_code)
        self._job = TraceJob(self.sample_set, tokenized, self.engine_options, self.options)
        self._started = with_max_len(self.engine_options, max_len, self.options)

    @property
    def recorded_options(self) -> dict:
        """The manifest ``options`` this sweep's traces record (after :meth:`prepare`)."""
        return recorded_options(self.engine_options, self.options,
                                self._started.max_model_len)

    def trace(self, name: str, path: Path,
              on_ready: Callable[[str], None] | None = None) -> TraceSummary | None:
        """Trace checkpoint ``path`` into ``traces_dir/name``; return its summary (None:
        skipped, its trace is complete). ``on_ready(action)`` is called before the samples
        go through: ``skip``, ``start`` (a new engine) or ``reload`` (weights in place)."""
        self.prepare(path)
        out = self.traces_dir / name
        if is_complete(out):
            _notify(on_ready, "skip")
            return None
        # a directory without manifest died before its first commit: start it over
        resumable = store.has_manifest(out)
        if resumable:
            provenance.check_resumable(out, Manifest.read(out), path, self.sample_set,
                                       self.recorded_options,
                                       start_over=f"another --out (or delete '{out}')")
        writer = TraceWriter.open(out, resume=resumable, force=not resumable)
        _notify(on_ready, self._engine_for(path, out))
        return self._job.run(self.engine, writer, self.on_start, self.on_progress)

    def _engine_for(self, model: Path, out: Path) -> str:
        """Switch the running engine to ``model`` if allowed (same config.json, reloads
        allowed), else start a fresh one; return ``reload`` or ``start``. The running
        config is remembered, not re-read: training may have deleted its folder since."""
        config = checkpoints.config_sha256(model)
        engine = self.engine
        if engine is not None and self.reuse_engine and engine.reload_blocker is None and (
                self._config == config):
            finished = engine.settings.dir
            if engine.switch_checkpoint(model, out):  # TraceJob.run flushed after its last batch
                raise CaptureError(f"routing reached the finished trace '{finished}' while "
                                   f"switching checkpoints; rerun with --no-reuse-engine")
            return "reload"
        self.close()
        self.engine, self._config = TracedEngine(model, out, self._started, commit=False), config
        return "start"

    def close(self) -> None:
        """Shut the engine down (the next :meth:`trace` starts one)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def __enter__(self) -> CheckpointSweep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _notify(callback, event) -> None:
    if callback:
        callback(event)

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
from typing import TYPE_CHECKING

from ..tracer import checkpoints, provenance, store
from ..tracer.errors import CaptureError, TraceFormatError
from ..tracer.manifest import COMPLETE, Manifest
from ..tracer.samples import SampleSet
from ..tracer.writer import TraceWriter
from .engine import TracedEngine, TraceJob, TraceSummary, prepare_job, recorded_options
from .options import EngineOptions, TraceOptions

if TYPE_CHECKING:
    from .cluster import Cluster


@dataclass(frozen=True)
class SweepEvent:
    """Progress of a sweep: checkpoint ``index`` (0-based) of ``total``; ``action`` is
    one of ``skip`` (already complete), ``start`` (new engine), ``reload`` (in place), or,
    on a cluster (``patches/cluster.py``), ``spread`` (its ``parts`` go to the engine
    actors)."""

    index: int
    total: int
    name: str
    action: str
    parts: int = 1


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
    cluster: Cluster | None = None,
) -> list[TraceSummary | None]:
    """Trace ``sample_set`` through each (name, folder) of ``models`` into ``traces_dir/<name>``.

    Returns one summary per checkpoint (None for skipped complete traces). With
    ``cluster`` (:class:`~.cluster.Cluster`) the checkpoints and parts of their samples
    are spread over its engine actors, and ``on_start`` / ``on_progress`` count them all
    in one run.
    """
    if cluster is not None:
        job, started = prepare_job(models[0][1], sample_set, engine_options or EngineOptions(),
                                   options or TraceOptions())
        return cluster.trace_checkpoints(models, job, started, Path(traces_dir), reuse_engine,
                                         on_checkpoint, on_start, on_progress)
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
        self.on_start, self.on_progress = on_start, on_progress
        self.warm = WarmEngine(reuse_engine)
        self._job: TraceJob | None = None
        self._started: EngineOptions | None = None

    @property
    def engine(self) -> TracedEngine | None:
        """The running engine (None before the first trace and after :meth:`close`)."""
        return self.warm.engine

    def prepare(self, model: Path) -> None:
        """Tokenise the samples with ``model``'s tokenizer and context (once)."""
        if self._job is None:
            self._job, self._started = prepare_job(model, self.sample_set, self.engine_options,
                                                   self.options)

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
        writer = open_checkpoint_trace(out, path, self.sample_set, self.recorded_options)
        if writer is None:
            _notify(on_ready, "skip")
            return None
        _notify(on_ready, self.warm.serve(path, out, self._started))
        return self._job.run(self.engine, writer, self.on_start, self.on_progress)

    def close(self) -> None:
        """Shut the engine down (the next :meth:`trace` starts one)."""
        self.warm.close()

    def __enter__(self) -> CheckpointSweep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint_trace(out: Path, model: Path, sample_set: SampleSet,
                          options: dict) -> TraceWriter | None:
    """The writer of ``model``'s trace of ``sample_set`` in ``out``; None when that trace is
    complete (whether it fits is the caller's check, before any engine starts).

    A partial trace is resumed once ``provenance.check_resumable`` agrees (``options``: the
    manifest options of the run, :func:`~.engine.recorded_options`); a directory without
    a manifest died before its first commit and is started over.
    """
    if is_complete(out):
        return None
    resumable = store.has_manifest(out)
    if resumable:
        provenance.check_resumable(out, Manifest.read(out), model, sample_set, options,
                                   start_over=f"another --out (or delete '{out}')")
    return TraceWriter.open(out, resume=resumable, force=not resumable)


class WarmEngine:
    """One traced engine (``commit=False``) kept from trace to trace.

    :meth:`serve` points it at the next trace directory: the same checkpoint keeps its
    weights, another one of the same config.json has its weights reloaded in place
    (when ``reuse`` and the engine allow it; exact, see ``reload.py``), anything else
    (another config, other engine options) shuts it down and starts a new one. The
    running config is remembered, not re-read: training may have deleted its folder since.
    """

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self.engine: TracedEngine | None = None
        self._serving: tuple[Path, str, EngineOptions] | None = None  # model, config, options

    def serve(self, model: Path, out: Path, started: EngineOptions) -> str:
        """Make the engine trace ``model`` into ``out``, started with ``started``; return
        ``retarget`` (same checkpoint), ``reload`` (weights in place) or ``start``."""
        config = checkpoints.config_sha256(model)
        engine = self.engine
        if engine is not None and self._serving[1:] == (config, started) and self.reuse:
            finished = engine.settings.dir
            if self._serving[0] == Path(model):
                action, shards = "retarget", engine.retarget(out)
            elif engine.reload_blocker is None:
                action, shards = "reload", engine.switch_checkpoint(model, out)
            else:
                action = None
            if action is not None:
                if shards:  # TraceJob.run flushed after its last batch: nothing may be pending
                    raise CaptureError(f"routing reached the finished trace '{finished}' "
                                       f"while switching traces; rerun with --no-reuse-engine")
                self._serving = (Path(model), config, started)
                return action
        self.close()
        self.engine = TracedEngine(model, out, started, commit=False)
        self._serving = (Path(model), config, started)
        return "start"

    def close(self) -> None:
        """Shut the engine down (the next :meth:`serve` starts one)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()


def _notify(callback, event) -> None:
    if callback:
        callback(event)

"""The ``moepath compare`` pipeline: checkpoints served in turn on the same samples, analysed.

One function, :func:`compare_checkpoints`, runs the steps in this order, so that
every refusal comes before the first engine starts:

1. find and order the checkpoint folders (``tracer/checkpoints.discover``) and
   check they share one routing shape;
2. read the samples and check the comparison options against them and the
   checkpoints (``tracer/compare.check_before_tracing``);
3. trace every checkpoint into ``out/traces/<name>`` (``sweep.trace_checkpoints``:
   complete traces skipped, partial ones resumed);
4. analyse the traces (``tracer/compare.analyse``) and write the files
   (``tracer/report.write_outputs``).

It reports what it does through a :class:`CompareProgress` and returns a
:class:`CompareResult` (plain data); drawing both is the caller's (``cli/render.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..tracer import checkpoints, compare, report, trackers
from ..tracer.checkpoints import Checkpoint, MoEShape
from ..tracer.samples import SampleReadOptions, SampleSet, read_samples
from .sweep import SweepEvent, trace_checkpoints

if TYPE_CHECKING:
    from .cluster import Cluster
    from .engine import TraceSummary
    from .options import EngineOptions, TraceOptions


@dataclass(frozen=True)
class ComparePlan:
    """What will be compared, once every check before tracing has passed.

    ``steps``: checkpoint name -> step (from the names, else the positions 0, 1, ...:
    ``tracer/checkpoints.steps``); ``num_samples``: samples each checkpoint traces.
    """

    checkpoints: list[Checkpoint]
    steps: dict[str, int]
    shape: MoEShape
    num_samples: int


@dataclass
class CompareResult:
    """A finished comparison: the plan, one trace summary per checkpoint (None: a complete
    trace was skipped), the analysis, and the files written into ``out`` (report.md last)."""

    out: Path
    plan: ComparePlan
    traces: list[TraceSummary | None]
    analysis: compare.CompareAnalysis
    files: list[Path]


class CompareProgress:
    """What :func:`compare_checkpoints` reports while it runs, in this order; every method
    does nothing here: override those you show (``cli/render.py`` draws them with Rich)."""

    def samples_read(self, sample_set: SampleSet) -> None:
        """The samples are read (with ``skip_bad_lines``: ``sample_set.skipped_lines``)."""

    def plan(self, plan: ComparePlan) -> None:
        """Every check passed; tracing starts next."""

    def tracing(self) -> contextlib.AbstractContextManager:
        """A context held while the checkpoints are traced (the calls below come inside)."""
        return contextlib.nullcontext()

    def checkpoint(self, event: SweepEvent) -> None:
        """A checkpoint is skipped (complete), or its engine started or reloaded in place;
        on a cluster, each checkpoint is skipped or spread over the engines before tracing,
        and ``start`` and ``advance`` then count every checkpoint together."""

    def start(self, total: int, done: int) -> None:
        """Tracing of the current checkpoint starts: ``total`` samples, ``done`` resumed."""

    def advance(self, samples: int, tokens: int) -> None:
        """``samples`` and prompt ``tokens`` traced so far in this run of the checkpoint."""


def compare_checkpoints(
    checkpoint_paths: list[Path], samples: Path | SampleSet, out: Path,
    options: compare.CompareOptions | None = None, engine_options: EngineOptions | None = None,
    trace_options: TraceOptions | None = None, read_options: SampleReadOptions | None = None,
    reuse_engine: bool = True, progress: CompareProgress | None = None, command: str = "",
    log_to: tuple[str, ...] = (), cluster: Cluster | None = None,
) -> CompareResult:
    """Trace ``samples`` through every checkpoint into ``out/traces/<name>``, analyse them and
    write ``out``'s files (metrics, samples, plots, report.md showing ``command``).

    ``checkpoint_paths``: folders in training order, or one folder of checkpoints named by
    step (``tracer/checkpoints.discover``). ``samples``: a file (read with ``read_options``)
    or samples already read. ``reuse_engine``: reload weights in place between checkpoints
    of one config (``sweep.trace_checkpoints``). ``log_to``: trackers the metrics are also
    sent to (``tracer/trackers``: tensorboard, wandb, mlflow). ``cluster``: trace on its
    engine actors (:class:`~.cluster.Cluster`), the analysis still runs once, here.

    Raises:
        ModelError: a folder is missing, not an MoE model, or the routing shapes differ.
        InputError, MetricError: bad samples, options or scores, before any engine starts.
        CaptureError: tracing failed.
        TrackerError: a tracker's client is not installed (before tracing), or one raised
            while logging (after the outputs and the other trackers are written).
    """
    trackers.check_available(log_to)
    options = options or compare.CompareOptions()
    progress = progress or CompareProgress()
    plan, sample_set = _prepare(checkpoint_paths, samples, options, read_options, progress)
    progress.plan(plan)
    with progress.tracing():
        traces = trace_checkpoints(
            [(c.name, c.path) for c in plan.checkpoints], sample_set, out / "traces",
            engine_options, trace_options, reuse_engine=reuse_engine,
            on_checkpoint=progress.checkpoint, on_start=progress.start,
            on_progress=progress.advance, cluster=cluster)
    analysis = compare.analyse(plan.checkpoints, out / "traces", options)
    files = report.write_outputs(out, analysis, command)
    trackers.log_metrics(out, analysis.metrics, log_to, run_name=Path(out).resolve().name)
    return CompareResult(out, plan, traces, analysis, files)


def _prepare(paths: list[Path], samples: Path | SampleSet, options: compare.CompareOptions,
             read_options: SampleReadOptions | None,
             progress: CompareProgress) -> tuple[ComparePlan, SampleSet]:
    """Every check before tracing, checkpoints first (they fail fastest)."""
    found = checkpoints.discover(paths)
    shape = checkpoints.check_compatible(found)
    sample_set = samples if isinstance(samples, SampleSet) else read_samples(
        samples, read_options or SampleReadOptions())
    progress.samples_read(sample_set)
    compare.check_before_tracing(found, sample_set, options)
    plan = ComparePlan(found, checkpoints.steps(found), shape, len(sample_set.samples))
    return plan, sample_set

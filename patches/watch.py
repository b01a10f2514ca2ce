"""The ``moepath watch`` pipeline: follow a training run's checkpoint folder, trace each
checkpoint once as soon as it is safe to read, and keep the comparison up to date.

Every ``interval_s`` seconds (:func:`watch_run`):

1. list the run's checkpoint folders (``tracer/rundir.scan``: known layouts or
   ``--pattern``), in step order;
2. for each one not traced nor failed: wait until it is ready
   (``tracer/rundir.ReadinessClock``: files complete, and sizes settled or the marker
   there), then check its safetensors headers (``rundir.verify``);
3. trace it into ``out/traces/<name>`` (``sweep.CheckpointSweep``: one engine kept
   warm, weights reloaded in place between checkpoints of one config);
4. after each checkpoint, and when the scores file changes: analyse every traced
   checkpoint so far (``tracer/compare.analyse``), rewrite the files
   (``tracer/report.write_outputs``) and send new rows to the trackers
   (``tracer/trackers.TrackerLog``; a tracker whose client raises is noted in
   ``status.json`` and sent what it lacks on a later update, the others go on);
5. write ``out/status.json`` (``tracer/watchstatus``) on every change.

What the watch knows lives on disk: the complete traces and ``status.json``. A
restarted watch skips complete traces, resumes a partial one, keeps failed
checkpoints failed (``retry``: tries them again) and keeps the metrics of
checkpoints whose folder training's rotation deleted. A checkpoint that fails (bad
header, the engine cannot load it) is marked failed with the reason, its partial
trace removed, and the watch goes on with a fresh engine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..tracer import compare, evallog, provenance, report, rundir, store, trackers
from ..tracer.checkpoints import Checkpoint
from ..tracer.correlation import MIN_POINTS
from ..tracer.errors import InputError, MoepathError
from ..tracer.manifest import Manifest
from ..tracer.samples import SampleReadOptions, SampleSet, read_samples
from ..tracer.watchstatus import (
    DONE,
    FAILED,
    FINISHED,
    STOPPED,
    TRACING,
    WAITING,
    WATCHING,
    CheckpointStatus,
    WatchStatus,
    now,
)
from .sweep import CheckpointSweep, is_complete

if TYPE_CHECKING:
    from .options import EngineOptions, TraceOptions

SCORES_SEEN = "scores.csv"  # the --scores rows of the traced checkpoints, as analysed


@dataclass(frozen=True)
class WatchOptions:
    """How ``moepath watch`` follows the run (validated on construction: InputError).

    ``pattern``: a regular expression for checkpoint folder names besides the known
    layouts (group 1: the step). ``interval_s``: seconds between looks at the run.
    ``settle_s``: seconds a checkpoint's files must stay unchanged before it is read.
    ``marker``: a file name; when given, a checkpoint is ready once that file is in
    its folder (instead of settled sizes). ``once``: trace what is ready, then return.
    ``retry``: trace failed checkpoints again. ``scores``: the evaluation log (CSV or
    JSON lines), read again on every update. ``log_to``: trackers (``trackers.TRACKERS``).
    """

    pattern: str | None = None
    interval_s: float = 30.0
    settle_s: float = 10.0
    marker: str | None = None
    once: bool = False
    retry: bool = False
    scores: Path | None = None
    log_to: tuple[str, ...] = ()
    reuse_engine: bool = True

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise InputError(f"--interval {self.interval_s:g} is not a positive number of "
                             f"seconds; pass e.g. 30")
        if not self.settle_s >= 0:
            raise InputError(f"--settle {self.settle_s:g} is negative; pass a number of "
                             f"seconds such as 10")
        rundir.layout_patterns(self.pattern)


class WatchProgress:
    """What :func:`watch_run` reports; every method does nothing here (``cli/render.py``
    draws them)."""

    def samples_read(self, sample_set: SampleSet) -> None:
        """The samples are read."""

    def status(self, status: WatchStatus) -> None:
        """``status.json`` was just written with ``status`` (after every change)."""

    def tracing(self, name: str, step: int) -> contextlib.AbstractContextManager:
        """A context held while checkpoint ``name`` is traced (the calls below inside)."""
        return contextlib.nullcontext()

    def checkpoint(self, name: str, action: str) -> None:
        """The engine for ``name`` is ready: ``start``, ``reload`` or ``skip``."""

    def start(self, total: int, done: int) -> None:
        """``total`` samples to trace through the checkpoint, ``done`` resumed."""

    def advance(self, samples: int, tokens: int) -> None:
        """``samples`` and prompt ``tokens`` traced so far in this checkpoint."""

    def updated(self, analysis: compare.CompareAnalysis, files: list[Path]) -> None:
        """The metrics, report and plots were rewritten over the traced checkpoints."""

    def warning(self, message: str) -> None:
        """Something failed without stopping the watch (also in ``status.json``)."""

    def tracker(self, name: str, failure: trackers.TrackerFailure | None) -> None:
        """Tracker ``name`` failed (``failure``; also in ``status.json``), or, after failing,
        stored every value it lacked (None)."""


@dataclass
class WatchResult:
    """How a watch ended: its status (as in ``out/status.json``) and the checkpoints this
    call traced."""

    out: Path
    status: WatchStatus
    traced: list[str]


def watch_run(
    run_dir: Path, samples: Path | SampleSet, out: Path, options: WatchOptions | None = None,
    compare_options: compare.CompareOptions | None = None,
    engine_options: EngineOptions | None = None, trace_options: TraceOptions | None = None,
    read_options: SampleReadOptions | None = None, progress: WatchProgress | None = None,
    command: str = "", stop: threading.Event | None = None,
) -> WatchResult:
    """Follow ``run_dir`` (see the module) until ``stop`` is set or Ctrl-C
    (KeyboardInterrupt, re-raised after ``status.json`` says ``stopped``); with
    ``options.once``, trace what is ready and return.

    Raises (before any engine starts):
        InputError: bad options, samples, scores file or run directory; ``out`` holds
            traces of other samples.
        TrackerError: a tracker's client is not installed.
    """
    options = options or WatchOptions()
    progress = progress or WatchProgress()
    trackers.check_available(options.log_to)
    rundir.scan(run_dir, rundir.layout_patterns(options.pattern))
    if options.scores is not None:
        _check_scores(Path(options.scores))
    sample_set = samples if isinstance(samples, SampleSet) else read_samples(
        samples, read_options or SampleReadOptions())
    progress.samples_read(sample_set)
    compare_options = compare_options or compare.CompareOptions()
    compare.check_before_tracing([], sample_set, replace(compare_options, scores=None))
    watcher = _Watcher(Path(run_dir), sample_set, Path(out), options, compare_options,
                       engine_options, trace_options, progress, command,
                       stop or threading.Event())
    return watcher.run()


class _Watcher:
    """One watch of one run: the loop of :func:`watch_run` and its state."""

    def __init__(self, run_dir: Path, sample_set: SampleSet, out: Path, options: WatchOptions,
                 compare_options: compare.CompareOptions, engine_options, trace_options,
                 progress: WatchProgress, command: str, stop: threading.Event):
        self.run_dir, self.out, self.options = run_dir, out, options
        self.compare_options, self.progress, self.command, self.stop = (
            compare_options, progress, command, stop)
        self.patterns = rundir.layout_patterns(options.pattern)
        self.clock = rundir.ReadinessClock(options.settle_s, options.marker)
        self.sample_set = sample_set
        self.status = self._restore()
        self.sweep = CheckpointSweep(sample_set, out / "traces", engine_options, trace_options,
                                     options.reuse_engine, progress.start, progress.advance)
        self.trackers = (trackers.TrackerLog(out, options.log_to, run_dir.resolve().name)
                         if options.log_to else None)
        self.traced: list[str] = []
        self._stale = bool(self.status.in_state(DONE))  # the report predates this run
        self._scores_stamp: tuple | None = None  # of the scores file last analysed
        self._analysed_scores = False  # whether an analysis has looked at the scores file

    # -- the loop -------------------------------------------------------------------

    def run(self) -> WatchResult:
        try:
            self.poll()
            if self.options.once:
                if self.clock.next_due() is not None and not self.stop.is_set():
                    self.stop.wait(self.options.settle_s)  # a second look, settle_s later
                    self.poll()
                self.status.state = FINISHED
            while not self.options.once and not self.stop.is_set():
                due = self.clock.next_due()
                self.stop.wait(self.options.interval_s if due is None
                               else min(self.options.interval_s, due + 0.05))
                self.poll()
        finally:
            if self.status.state == WATCHING:
                self.status.state = STOPPED
            for entry in self.status.checkpoints.values():
                if entry.state == TRACING:  # interrupted: the partial trace resumes
                    entry.set(WAITING, "interrupted while tracing; resumes where it stopped")
            self._write()
            self.sweep.close()
            if self.trackers is not None:
                self.trackers.close()  # W&B stores its values now, or fails to
                self._note_trackers()
                self._write()
        return WatchResult(self.out, self.status, self.traced)

    def poll(self) -> None:
        """One look at the run: note arrivals and deletions, trace what is ready, update."""
        found = rundir.scan(self.run_dir, self.patterns)
        todo = self._see(found)
        for candidate in todo:  # first look at each (the readiness clock remembers it)
            self.status.checkpoints[candidate.name].set(
                WAITING, self.clock.waiting_reason(candidate.path))
        for candidate in todo:
            if self.stop.is_set():
                break
            entry = self.status.checkpoints[candidate.name]
            blocker = self._blocker(candidate)
            if blocker is not None:
                entry.set(*blocker)
                continue
            self._trace(candidate, entry)
        if self._stale or self._scores_changed():
            self._update()
        self._write()

    # -- checkpoints ----------------------------------------------------------------

    def _see(self, found: list[rundir.Candidate]) -> list[rundir.Candidate]:
        """Record new folders and deleted ones; return those still to trace."""
        names = {c.name for c in found}
        for name, entry in list(self.status.checkpoints.items()):
            if name not in names and entry.state == DONE:
                entry.deleted = True  # rotation: its trace and metrics stay
            elif name not in names:
                del self.status.checkpoints[name]
        todo = []
        for candidate in found:
            entry = self.status.checkpoints.setdefault(
                candidate.name, CheckpointStatus(candidate.step, str(candidate.path)))
            entry.deleted, entry.step = False, candidate.step
            if entry.state not in (DONE, FAILED):
                todo.append(candidate)
        return todo

    def _blocker(self, candidate: rundir.Candidate) -> tuple[str, str] | None:
        """(state, reason) that keeps ``candidate`` from being traced now; None: trace it."""
        reason = self.clock.waiting_reason(candidate.path)
        if reason is not None:
            return WAITING, reason
        if candidate.step is None:
            return WAITING, (f"no step: its name has no number and its "
                             f"{rundir.TRAINER_STATE} no global_step (pass --pattern)")
        twin = next((n for n, e in self.status.checkpoints.items()
                     if e.step == candidate.step and n != candidate.name and e.state == DONE),
                    None)
        if twin is not None:
            return FAILED, f"shares step {candidate.step} with '{twin}', already traced"
        try:
            rundir.verify(candidate.path)
        except rundir.StillWriting as exc:
            return WAITING, str(exc)
        except MoepathError as exc:
            return FAILED, str(exc)
        return None

    def _trace(self, candidate: rundir.Candidate, entry: CheckpointStatus) -> None:
        entry.set(TRACING)
        self._write()
        try:
            with self.progress.tracing(candidate.name, candidate.step):
                self.sweep.trace(candidate.name, candidate.path,
                                 lambda action: self.progress.checkpoint(candidate.name, action))
        except Exception as exc:  # noqa: BLE001 - any load failure fails this checkpoint only
            if os.environ.get("MOEPATH_DEBUG"):
                raise
            self._fail(candidate, entry, exc)
            return
        entry.set(DONE)
        self.traced.append(candidate.name)
        self._stale = True
        self._update()

    def _fail(self, candidate: rundir.Candidate, entry: CheckpointStatus,
              exc: Exception) -> None:
        """Mark ``candidate`` failed, drop its partial trace, and stop the engine (its state
        after a failed load is unknown): the next checkpoint starts a fresh one."""
        self.sweep.close()
        trace_dir = self.out / "traces" / candidate.name
        if store.has_manifest(trace_dir) and not is_complete(trace_dir):
            shutil.rmtree(trace_dir)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not isinstance(exc, MoepathError):
            reason = f"{type(exc).__name__}: {reason}"
        entry.set(FAILED, f"{reason}; fix it and run again with --retry")
        self.progress.warning(f"checkpoint '{candidate.name}' failed: {entry.reason}")

    # -- the comparison -------------------------------------------------------------

    def _update(self) -> None:
        """Analyse every traced checkpoint, rewrite the files, log to the trackers."""
        self._stale = False
        entries = self.status.checkpoints
        done = [Checkpoint(n, Path(entries[n].path), entries[n].step)
                for n in self.status.in_state(DONE)]
        if not done:
            return
        try:
            options, notes = self._with_scores(done)
            analysis = compare.analyse(done, self.out / "traces", options)
            analysis.notes += notes
            files = report.write_outputs(self.out, analysis, self.command)
            logged = self.trackers.log(analysis.metrics) if self.trackers else {}
        except MoepathError as exc:
            self.status.report = {"updated": now(), "checkpoints": len(done), "error": str(exc)}
            self.progress.warning(f"the report was not updated: {exc}")
            return
        self.status.report = {"updated": now(), "checkpoints": len(done), "error": None,
                              "logged": logged}
        self._note_trackers()
        self.progress.updated(analysis, files)

    def _note_trackers(self) -> None:
        """Put each tracker's state into ``status.json``; tell progress when it changes."""
        for name in self.options.log_to:
            failure = self.trackers.failures.get(name)
            before = self.status.trackers.get(name, {})
            if failure is not None:
                entry = {key: value for key, value in asdict(failure).items()
                         if key != "tracker"}
            else:
                since = before["since"] if before and not before["error"] else now()
                entry = {"error": None, "step": None, "checkpoint": None, "unsent": 0,
                         "store": str(trackers.store_of(self.out, name)), "since": since}
            if entry["error"] != before.get("error"):
                self.progress.tracker(name, failure)
            self.status.trackers[name] = entry

    def _with_scores(self, done: list[Checkpoint]) -> tuple[compare.CompareOptions, list[str]]:
        """The comparison options with the scores of the traced checkpoints (read again
        now), and notes on what is missing."""
        options = self.compare_options
        if self.options.scores is None:
            return options, []
        self._scores_stamp, self._analysed_scores = _stamp(self.options.scores), True
        dest = self.out / SCORES_SEEN
        if self._scores_stamp is None:
            dest.unlink(missing_ok=True)
            return replace(options, scores=None), [
                f"'{self.options.scores}' is not written yet; correlations appear once "
                f"the training job writes it"]
        rows = evallog.known_scores(self.options.scores, {c.name: c.step for c in done}, dest)
        if not rows:
            dest.unlink(missing_ok=True)
            return replace(options, scores=None), [
                f"no score in '{self.options.scores}' for the {len(done)} checkpoint(s) "
                f"traced so far; correlations appear as evaluations arrive"]
        notes = []
        if len(done) < MIN_POINTS:
            notes.append(f"{len(done)} checkpoint(s) traced so far: correlations appear from "
                         f"{MIN_POINTS} on")
        return replace(options, scores=dest), notes

    def _scores_changed(self) -> bool:
        """Whether the scores file changed (or appeared) since the last analysis."""
        return (self.options.scores is not None and self._analysed_scores
                and _stamp(self.options.scores) != self._scores_stamp)

    # -- state on disk --------------------------------------------------------------

    def _restore(self) -> WatchStatus:
        """The status of an earlier watch into ``out``, checked against the traces there
        (they win: a complete trace is done, a done checkpoint without one is traced again)."""
        status = WatchStatus.read(self.out) or WatchStatus(str(self.run_dir.resolve()))
        status.state, status.pid = WATCHING, os.getpid()
        status.trackers = {name: entry for name, entry in status.trackers.items()
                           if name in self.options.log_to}
        for entry in status.checkpoints.values():
            if entry.state == TRACING:
                entry.set(WAITING, "interrupted while tracing; resumes where it stopped")
            elif entry.state == FAILED and self.options.retry:
                entry.set(WAITING, "failed before; tried again (--retry)")
        traces = self.out / "traces"
        for trace_dir in sorted(traces.iterdir()) if traces.is_dir() else []:
            if is_complete(trace_dir):
                self._check_samples(trace_dir)
                entry = status.checkpoints.setdefault(trace_dir.name, CheckpointStatus(
                    rundir.step_of(self.run_dir / trace_dir.name, self.patterns),
                    str(self.run_dir / trace_dir.name)))
                entry.set(DONE)
        for name, entry in status.checkpoints.items():
            if entry.state == DONE and not is_complete(traces / name):
                entry.set(WAITING, "its trace is gone; traced again")
        return status

    def _check_samples(self, trace_dir: Path) -> None:
        difference = provenance.input_difference(Manifest.read(trace_dir).input,
                                                 provenance.input_section(self.sample_set))
        if difference:
            raise InputError(f"cannot add to '{self.out}': its trace '{trace_dir.name}' "
                             f"{difference.removeprefix('it ')}; pass the same samples, or "
                             f"another --out")

    def _write(self) -> None:
        self.status.write(self.out)
        self.progress.status(self.status)


def _check_scores(path: Path) -> None:
    """Refuse a scores file that cannot become readable: one that exists must parse now; a
    missing one is waited for (the training job writes its first evaluation later) when
    its folder exists, else it is a wrong path.

    Raises:
        InputError: see :func:`~moepath.tracer.evallog.read_log`, or no such folder.
    """
    if path.exists() or not path.parent.is_dir():
        evallog.read_log(path)


def _stamp(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns

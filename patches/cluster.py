"""Tracing on a Ray cluster: engines as Ray actors, samples in parts, checkpoints spread over them.

``moepath trace --ray`` and ``moepath compare --ray`` (in Python: ``trace_samples``,
``trace_checkpoints`` or ``compare_checkpoints`` with ``cluster=``) hand their tracing
to a :class:`Cluster`. It starts ``engines`` Ray actors, each asking Ray for what one
engine needs: ``tensor_parallel_size`` GPUs on a cluster with GPUs, else
``cpus_per_engine`` cores, which the driver gives each actor of a node distinct ones
of (vLLM's OpenMP threads are bound to them). Each actor keeps one traced engine warm
from task to task (``sweep.WarmEngine``: a later checkpoint of the same config has its
weights reloaded in place).

Each checkpoint's samples are split into ``parts``, the data-parallel parts of
``moepath trace --part I/N`` (part I: samples I, I+N, ...); every (checkpoint, part)
is a task, and idle actors take the next one, checkpoint by checkpoint. A part is a
normal trace written through its own ``TraceWriter`` to ``<trace>.parts/<I>-of-<N>``;
once every part of a checkpoint is complete they are merged into ``<trace>`` with
``moepath merge``'s checks (:func:`~..tracer.merge.merge_traces`) and deleted. A
checkpoint traced as one part is written to ``<trace>`` directly.

Where an actor is lost (its process or node dies, or ``ray.kill``), its task goes
back to the front of the queue and the next idle actor resumes it from what was
committed (TraceWriter resume drops uncommitted shards): no sample is lost or
written twice. A task that loses ``max_attempts`` actors, or a run that loses every
actor, stops with what was committed kept; the same command resumes it. An error
raised inside a task (bad input, a capture failure) stops the run with its own
message.

The driver tokenises the samples once and ships each part's token ids to the
actors (Ray's object store); every trace path is opened by the actors and merged by
the driver, so the output must be on a file system that every node mounts at the
same path.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..tracer import provenance, store
from ..tracer.errors import ClusterError, InputError, MoepathError, TraceFormatError
from ..tracer.manifest import Manifest
from ..tracer.merge import merge_traces
from ..tracer.writer import RESUME_OR_FORCE, TraceWriter
from .engine import TraceJob, TraceSummary, recorded_options
from .options import ClusterOptions, EngineOptions, pin_to_cores
from .sweep import SweepEvent, WarmEngine, is_complete, open_checkpoint_trace

LOCAL = "local"
LOOPBACK = "127.0.0.1"
# Ray's switch for a cluster of this machine alone, every process on the loopback address
# (its default on macOS and Windows); Ray reads it once, when it is imported
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PARTS_SUFFIX = ".parts"


def parts_dir(trace_dir: Path) -> Path:
    """Where the parts of ``trace_dir`` are written before they are merged into it:
    ``out/trace`` -> ``out/trace.parts`` (beside it: ``merge`` refuses an output that
    holds its parts)."""
    trace_dir = Path(trace_dir)
    return trace_dir.with_name(trace_dir.name + PARTS_SUFFIX)


def parts_per_checkpoint(checkpoints: int, engines: int, samples: int) -> int:
    """Parts each checkpoint's samples are split into so that ``engines`` actors get equal
    shares of ``checkpoints`` x parts tasks: ``engines / gcd(engines, checkpoints)``, at
    most one part per sample::

        >>> parts_per_checkpoint(1, 2, 43), parts_per_checkpoint(3, 2, 43)
        (2, 2)
        >>> parts_per_checkpoint(4, 2, 43), parts_per_checkpoint(50, 8, 100_000)
        (1, 4)
    """
    return max(1, min(engines // math.gcd(engines, checkpoints), samples))


def import_ray(address: str):
    """Ray, imported; for a ``local`` cluster with :data:`LOCAL_ONLY` set first, so that
    every process of the cluster listens on 127.0.0.1 only. ClusterError naming the extra
    when Ray is not installed."""
    if address == LOCAL:
        os.environ[LOCAL_ONLY] = "0"
    try:
        import ray
    except ImportError as exc:
        raise ClusterError("--ray needs Ray, which is not installed; "
                           "pip install 'moepath[ray]'") from exc
    return ray


@contextlib.contextmanager
def open_cluster(options: ClusterOptions | None) -> Iterator[Cluster | None]:
    """A :class:`Cluster` for ``options``, closed on leaving; None (trace on this machine)
    for None."""
    if options is None:
        yield None
        return
    with Cluster(options) as cluster:
        yield cluster


@dataclass(frozen=True)
class Target:
    """One checkpoint's trace to make: ``model`` traced into ``out`` in ``parts`` parts."""

    name: str
    model: Path
    out: Path
    parts: int = 1

    def part_out(self, index: int) -> Path:
        """Where part ``index`` is written: ``out`` itself for a single part."""
        return self.out if self.parts == 1 else parts_dir(self.out) / f"{index}-of-{self.parts}"


@dataclass(eq=False)  # tasks are told apart by identity
class _Task:
    """One part of one target, and what the driver knows of it."""

    target: Target
    index: int
    job: object  # ray.ObjectRef of the part's TraceJob
    size: int  # samples
    committed: int  # samples committed before this run
    reported: int = 0  # samples committed, as last reported
    tokens: int = 0  # prompt tokens this run committed (every attempt)
    attempt_tokens: int = 0  # of which the current attempt's
    attempts: int = 0  # actors lost while tracing it
    began: float | None = None  # time.perf_counter() of its first report (engine up)

    @property
    def out(self) -> Path:
        return self.target.part_out(self.index)

    def report(self, summary: TraceSummary) -> None:
        self.reported = summary.resumed_samples + summary.samples
        self.tokens += summary.tokens - self.attempt_tokens
        self.attempt_tokens = summary.tokens
        if self.began is None:
            self.began = time.perf_counter()

    def lost(self) -> None:
        self.attempts += 1
        self.attempt_tokens = 0


@dataclass
class _Engine:
    actor: object  # the Ray actor handle
    node: str  # Ray node id
    slot: int  # its place among this cluster's engines on the node (which cores)


class Cluster:
    """Traced engines as Ray actors (see the module). Use as a context manager::

        with Cluster(ClusterOptions(address="local", engines=2)) as cluster:
            trace_samples(model, samples, "out/trace", cluster=cluster)
            compare_checkpoints([step1, step2], samples, "out/compare", cluster=cluster)

    Ray is imported here; the cluster is started (``local``) or joined at the first
    trace, and the actors are started then and kept: a later call reuses their engines
    and replaces lost actors. :meth:`close` stops the actors, and a local cluster.
    """

    def __init__(self, options: ClusterOptions | None = None):
        self.options = options or ClusterOptions()
        self._ray = import_ray(self.options.address)
        self._owns_ray = False
        self._engines: list[_Engine] = []
        self._resources: dict | None = None  # what each actor asked Ray for

    @property
    def actors(self) -> list:
        """The Ray actor handles of the engines, in start order."""
        return [engine.actor for engine in self._engines]

    # -- the two entry points --------------------------------------------------------

    def trace(self, model: Path, job: TraceJob, started: EngineOptions, out: Path,
              resume: bool = False, force: bool = False,
              on_start: Callable[[int, int], None] | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> TraceSummary:
        """Trace ``job`` through ``model`` into the trace directory ``out`` over the engines
        (``started``: their options, ``engine.prepare_job``'s); ``resume`` and ``force``
        as for ``trace_samples``, covering ``out`` and its parts."""
        out = Path(out)
        options = recorded_options(job.engine_options, job.options, started.max_model_len)
        _claim_output(out, resume, force)
        self._check_resumable(out, Path(model), job, options, "--force or another --out")
        target = Target(out.name, Path(model), out)
        if is_complete(out):
            summary = TraceSummary(out, resumed_samples=len(job.tokenized), bytes=_bytes(out))
        else:
            summary, = self._run([target], job, started, True, None, on_start, on_progress)
        summary.truncated = sum(t.truncated for t in job.tokenized)
        summary.skipped_lines = len(job.sample_set.skipped_lines)
        return summary

    def trace_checkpoints(self, models: list[tuple[str, Path]], job: TraceJob,
                          started: EngineOptions, traces_dir: Path, reuse_engine: bool = True,
                          on_checkpoint: Callable[[SweepEvent], None] | None = None,
                          on_start: Callable[[int, int], None] | None = None,
                          on_progress: Callable[[int, int], None] | None = None,
                          ) -> list[TraceSummary | None]:
        """Trace ``job`` through each (name, folder) of ``models`` into ``traces_dir/<name>``
        over the engines; one summary per checkpoint (None: its trace was complete).
        Partial traces and parts are resumed, as ``sweep.trace_checkpoints`` does."""
        options = recorded_options(job.engine_options, job.options, started.max_model_len)
        targets = [Target(name, Path(path), Path(traces_dir) / name) for name, path in models]
        for target in targets:
            self._check_resumable(target.out, target.model, job, options,
                                  f"another --out (or delete '{target.out}')")
        return self._run(targets, job, started, reuse_engine, on_checkpoint, on_start,
                         on_progress)

    # -- planning ------------------------------------------------------------------------

    def _run(self, targets: list[Target], job: TraceJob, started: EngineOptions, reuse: bool,
             on_checkpoint, on_start, on_progress) -> list[TraceSummary | None]:
        """Trace every target that is not complete; merge and summarise each."""
        todo = [t for t in targets if not is_complete(t.out)]
        for target in targets:
            if target not in todo:
                _remove_parts(target.out)  # a run stopped between merging and deleting
        if not todo:
            for index, target in enumerate(targets):
                _notify(on_checkpoint, SweepEvent(index, len(targets), target.name, "skip"))
            return [None] * len(targets)
        self._ensure_engines(started)
        default = parts_per_checkpoint(len(todo), len(self._engines), len(job.tokenized))
        planned = {t.name: replace(t, parts=_parts_of(t.out, default)) for t in todo}
        for index, target in enumerate(targets):
            event = (SweepEvent(index, len(targets), target.name, "spread",
                                planned[target.name].parts)
                     if target.name in planned else
                     SweepEvent(index, len(targets), target.name, "skip"))
            _notify(on_checkpoint, event)
        tasks = self._tasks(list(planned.values()), job)
        if on_start:
            on_start(sum(t.size for t in tasks), sum(t.committed for t in tasks))
        summaries = {target.name: _merged(target, parts, job)
                     for target, parts in self._schedule(tasks, started, reuse, on_progress)}
        return [summaries.get(t.name) for t in targets]

    def _tasks(self, targets: list[Target], job: TraceJob) -> list[_Task]:
        """One task per part of each target (complete parts included: they are merged);
        each part's job is put into Ray's object store once."""
        ray, jobs, tasks = self._ray, {}, []
        for target in targets:
            for index in range(target.parts):
                if (index, target.parts) not in jobs:
                    part = job if target.parts == 1 else job.part(index, target.parts)
                    jobs[index, target.parts] = (ray.put(part), len(part.tokenized))
                ref, size = jobs[index, target.parts]
                out = target.part_out(index)
                committed = size if is_complete(out) else _committed_samples(out)
                tasks.append(_Task(target, index, ref, size, committed, reported=committed))
        return tasks

    def _check_resumable(self, out: Path, model: Path, job: TraceJob, options: dict,
                         start_over: str) -> None:
        """Refuse, before any engine starts, to resume or merge a trace or part in ``out``
        or its parts that another model, samples file or setting made."""
        checks = [(out, job.sample_set)] if store.has_manifest(out) else []
        for part in sorted(parts_dir(out).glob("*-of-*")) if parts_dir(out).is_dir() else []:
            index, count = _part_numbers(part)
            if store.has_manifest(part):
                checks.append((part, job.sample_set.take_part(index, count)))
        for trace_dir, sample_set in checks:
            provenance.check_resumable(trace_dir, Manifest.read(trace_dir), model, sample_set,
                                       options, start_over=start_over)

    # -- the engines ---------------------------------------------------------------------

    def _ensure_engines(self, started: EngineOptions) -> None:
        """Join the cluster and start engine actors up to ``options.engines`` (default: as
        many as its free resources hold), each placed and, on CPU, given its cores."""
        self._connect()
        ray = self._ray
        ranks = started.workers  # tensor-parallel ranks times pipeline stages
        total, free = ray.cluster_resources(), ray.available_resources()
        kind = "GPU" if total.get("GPU", 0) >= 1 else "CPU"
        need = ranks if kind == "GPU" else self.options.cpus_per_engine or ranks
        resources = {"num_gpus": need, "num_cpus": 1} if kind == "GPU" else {"num_cpus": need}
        if resources != self._resources:
            self.stop_engines()
            self._resources = resources
        wanted = self.options.engines or len(self._engines) + int(free.get(kind, 0) // need)
        _check_room(wanted, need, kind, total.get(kind, 0), free.get(kind, 0))
        actor_class = ray.remote(**resources)(EngineActor)
        new = [actor_class.remote() for _ in range(wanted - len(self._engines))]
        placed = self._placements(new, need, kind)
        for actor, (node, cores) in zip(new, placed, strict=True):
            taken = {engine.slot for engine in self._engines if engine.node == node}
            slot = next(i for i in range(len(taken) + 1) if i not in taken)
            if kind == "CPU":
                first = slot * need % len(cores)
                mine = (cores[first:] + cores[:first])[:need]
                ray.get(actor.bind_cores.remote(mine, ranks))
            self._engines.append(_Engine(actor, node, slot))

    def _placements(self, actors: list, need: int, kind: str) -> list[tuple[str, list[int]]]:
        """(node id, CPU ids it may run on) of each new actor, once Ray placed it."""
        ray = self._ray
        refs = [actor.placement.remote() for actor in actors]
        timeout = self.options.placement_timeout_s
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            for actor in actors:
                ray.kill(actor)
            raise ClusterError(
                f"{len(pending)} of {len(actors)} engine actors found no node with {need} free "
                f"{kind}(s) within {timeout:g} s (an engine's {kind}s are on one node); free "
                f"some, add nodes, or pass fewer --engines")
        return ray.get(refs)

    def _connect(self) -> None:
        """Start the local cluster or join the one at ``options.address`` (a program that
        set up Ray itself keeps its own)."""
        ray, address = self._ray, self.options.address
        if ray.is_initialized():
            return
        if address == LOCAL:
            if (ip := ray.util.get_node_ip_address()) != LOOPBACK:
                raise ClusterError(
                    f"a local Ray cluster would listen on {ip}, not on {LOOPBACK} only: Ray was "
                    f"imported before moepath could set {LOCAL_ONLY}=0; set it in the "
                    f"environment, or start a cluster yourself and pass its address")
            ray.init(address=LOCAL, _node_ip_address=LOOPBACK, include_dashboard=False,
                     logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
        self._owns_ray = True

    # -- running the tasks ---------------------------------------------------------------

    def _schedule(self, tasks: list[_Task], started: EngineOptions, reuse: bool,
                  on_progress) -> Iterator[tuple[Target, list[_Task]]]:
        """Run the tasks whose part is not complete, the next one to the next idle actor;
        yield each target with its tasks as soon as they are all complete."""
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        groups: dict[str, list[_Task]] = {}
        for task in tasks:
            groups.setdefault(task.target.name, []).append(task)
        queue = deque(task for task in tasks if not is_complete(task.out))
        left = {name: sum(task in queue for task in group) for name, group in groups.items()}
        yield from ((group[0].target, group) for name, group in groups.items() if not left[name])
        idle, running = list(self._engines), {}
        try:
            while queue or running:
                while queue and idle:
                    engine, task = idle.pop(0), queue.popleft()
                    stream = engine.actor.trace.options(num_returns="streaming").remote(
                        task.target.model, task.out, task.job, started, reuse)
                    running[stream] = (engine, task)
                (stream,), _ = ray.wait(list(running), num_returns=1)
                engine, task = running[stream]
                try:
                    task.report(ray.get(next(stream)))
                except StopIteration:
                    del running[stream]
                    idle.append(engine)
                    left[task.target.name] -= 1
                    if not left[task.target.name]:
                        yield task.target, groups[task.target.name]
                    continue
                except RayActorError as exc:
                    del running[stream]
                    self._lost(engine, task, exc)
                    queue.appendleft(task)
                    continue
                except RayTaskError as exc:
                    if isinstance(exc.cause, MoepathError | OSError):
                        raise exc.cause from None
                    raise
                if on_progress:
                    on_progress(sum(t.reported - t.committed for t in tasks),
                                sum(t.tokens for t in tasks))
        finally:
            for engine, _ in running.values():  # an error stops the run: parts stay resumable
                self._drop(engine)

    def _lost(self, engine: _Engine, task: _Task, error: Exception) -> None:
        """``engine``'s actor died while tracing ``task``: drop it; refuse to go on when the
        task lost too many actors or none is left."""
        self._drop(engine)
        task.lost()
        what = f"part {task.index}/{task.target.parts} of '{task.target.name}'"
        if task.attempts >= self.options.max_attempts:
            raise ClusterError(f"{what} lost its engine actor {task.attempts} times (last: "
                               f"{error}); committed samples are kept: rerun to resume")
        if not self._engines:
            raise ClusterError(f"every engine actor was lost (last, on {what}: {error}); "
                               f"committed samples are kept: rerun to resume")

    def _drop(self, engine: _Engine) -> None:
        if engine in self._engines:
            self._engines.remove(engine)
        self._ray.kill(engine.actor)  # a lost actor must never come back to write

    def stop_engines(self) -> None:
        """Stop the engine actors (freeing their memory); the next trace starts new ones."""
        for engine in list(self._engines):
            self._drop(engine)

    def close(self) -> None:
        """Stop the engine actors, and the cluster if this object started or joined it."""
        if self._ray.is_initialized():
            self.stop_engines()
            if self._owns_ray:
                self._ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EngineActor:
    """The body of each Ray actor: one warm traced engine, tracing the parts it is handed."""

    def __init__(self):
        self.warm = WarmEngine()

    def placement(self) -> tuple[str, list[int]]:
        """(Ray node id, CPU ids this process may run on)."""
        import ray

        return ray.get_runtime_context().get_node_id(), sorted(os.sched_getaffinity(0))

    def bind_cores(self, cores: list[int], ranks: int) -> list[int]:
        """Keep this actor's engines on ``cores`` (``options.pin_to_cores``); returns the
        CPU ids the process now runs on."""
        pin_to_cores(cores, ranks)
        return sorted(os.sched_getaffinity(0))

    def trace(self, model: Path, out: Path, job: TraceJob, started: EngineOptions,
              reuse: bool) -> Iterator[TraceSummary]:
        """Trace ``job`` through ``model`` into ``out``, resuming what is committed there;
        yields the run's summary once begun, after each committed batch, and finished."""
        options = recorded_options(job.engine_options, job.options, started.max_model_len)
        writer = open_checkpoint_trace(out, model, job.sample_set, options)
        if writer is None:
            return
        summary = TraceSummary(out, resumed_samples=len(job.tokenized))
        if job.todo(writer):
            self.warm.reuse = reuse
            self.warm.serve(model, out, started)
            for summary in job.traced_batches(self.warm.engine, writer):
                yield summary
        yield job.finish(writer, summary)


def _claim_output(out: Path, resume: bool, force: bool) -> None:
    """``moepath trace``'s rule for an existing ``--out``, extended to its parts: continue
    it (``resume``), empty it and its parts (``force``), or refuse."""
    parts = parts_dir(out)
    held = [path for path in (out, parts) if path.is_dir() and any(path.iterdir())]
    if force:
        _remove_parts(out)
        TraceWriter.open(out, force=True)
    elif held and not resume:
        raise TraceFormatError(f"output directory '{held[0]}' already exists; {RESUME_OR_FORCE}")


def _remove_parts(out: Path) -> None:
    """Delete the parts of ``out`` (each a moepath trace; anything else is refused)."""
    parts = parts_dir(out)
    if not parts.is_dir():
        return
    for part in parts.iterdir():
        if not (part.is_dir() and store.is_trace_directory(part)):
            raise InputError(f"'{parts}' holds '{part.name}', which is not a part trace; "
                             f"move it away (moepath deletes only its own parts)")
    shutil.rmtree(parts)


def _parts_of(out: Path, default: int) -> int:
    """Parts the trace in ``out`` is made of: those its existing parts were split into, one
    when a single trace was begun there, else ``default``."""
    parts = parts_dir(out)
    counts = {_part_numbers(p)[1] for p in parts.glob("*-of-*")} if parts.is_dir() else set()
    if len(counts) > 1:
        raise InputError(f"'{parts}' holds parts of {len(counts)} different splits; delete "
                         f"it to start its checkpoint over")
    if counts:
        return counts.pop()
    return 1 if store.has_manifest(out) else default


def _part_numbers(part: Path) -> tuple[int, int]:
    """``3-of-8`` -> (3, 8)."""
    index, _, count = part.name.partition("-of-")
    if not (index.isdecimal() and count.isdecimal()):
        raise InputError(f"'{part}' is not a part trace (named I-of-N); move it away")
    return int(index), int(count)


def _committed_samples(trace_dir: Path) -> int:
    """Samples committed in ``trace_dir`` (0 without a manifest)."""
    if not store.has_manifest(trace_dir):
        return 0
    return sum(shard.rows for shard in Manifest.read(trace_dir).sample_shards)


def _check_room(wanted: int, need: int, kind: str, total: float, free: float) -> None:
    if wanted < 1:
        raise ClusterError(f"the Ray cluster has no room for an engine: one needs {need} "
                           f"{kind}(s), and {free:g} of its {total:g} are free")
    if wanted * need > total:
        raise ClusterError(f"{wanted} engines of {need} {kind}(s) need {wanted * need:g}, more "
                           f"than the cluster's {total:g}; pass --engines "
                           f"{max(1, int(total // need))} or fewer")


def _merged(target: Target, tasks: list[_Task], job: TraceJob) -> TraceSummary:
    """Merge the complete parts of ``target`` into its trace (a single part is it already),
    delete them, and summarise what this run traced into it (``seconds``: from its first
    engine's first batch until now)."""
    if target.parts > 1:
        merge_traces([task.out for task in tasks], target.out, force=True)
        _remove_parts(target.out)
    samples = sum(task.reported - task.committed for task in tasks)
    began = [task.began for task in tasks if task.began is not None]
    return TraceSummary(
        target.out, samples=samples, tokens=sum(task.tokens for task in tasks),
        resumed_samples=len(job.tokenized) - samples,
        seconds=time.perf_counter() - min(began) if began else 0.0,
        lost_engines=sum(task.attempts for task in tasks), bytes=_bytes(target.out))


def _bytes(trace_dir: Path) -> int:
    return sum(path.stat().st_size for path in trace_dir.rglob("*") if path.is_file())


def _notify(callback, event) -> None:
    if callback:
        callback(event)

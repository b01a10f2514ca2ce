"""`TraceWriter`: the one owner of a trace directory while it is written.

Every program that writes a trace (the ``moepath trace`` and ``compare``
drivers, a serving engine's worker, ``moepath eval``, ``moepath merge``) goes
through one writer, in one lifecycle::

    writer = TraceWriter.open(out, resume=..., force=...)  # new, resumed or emptied
    writer.begin(manifest, router_weights)      # a new trace's manifest (kept on resume)
    writer.commit(routing=shards, samples=table)            # as often as there is news
    writer.finish(truncated=..., skipped_lines=...)         # or writer.fail(reason)

Files are written atomically by :mod:`.store` and belong to the trace only once
a manifest that lists them has replaced the old one (the commit point). A run
killed at any moment leaves the last committed manifest; ``resume`` removes
what it had written since and continues from there, so no record is lost or
duplicated.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import store
from .errors import InputError, TraceFormatError
from .manifest import COMPLETE, FAILED, RUNNING, Counts, Manifest

# the advice for an existing directory, as ``moepath trace`` offers both
RESUME_OR_FORCE = "pass --resume to continue the trace in it or --force to overwrite it"


class TraceWriter:
    """Writes one trace directory (see the module). Not thread-safe: one thread commits.

    ``resumed``: the manifest of the trace being continued, None for a new one;
    ``manifest``: the manifest being written, set by :meth:`begin` (or on resume).
    """

    def __init__(self, trace_dir: Path, resumed: Manifest | None):
        self.trace_dir = trace_dir
        self.resumed = resumed
        self.manifest = resumed

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(cls, trace_dir: str | Path, resume: bool = False, force: bool = False,
             fix: str = RESUME_OR_FORCE) -> TraceWriter:
        """Make ``trace_dir`` ready for writing.

        A new or empty directory starts a new trace. An existing one needs
        ``resume`` (continue the trace in it: its checksums are verified and files
        it does not list removed) or ``force`` (empty it and start over); ``force``
        empties only a moepath trace, so ``--out . --force`` cannot wipe a working
        directory. ``fix`` ends the error for an existing directory with neither:
        what the caller's user can do about it.
        """
        trace_dir = Path(trace_dir)
        if trace_dir.exists() and not trace_dir.is_dir():
            raise InputError(f"output directory '{trace_dir}' is a file; pass a directory path")
        if trace_dir.exists() and any(trace_dir.iterdir()):
            if resume and not force:
                return cls(trace_dir, _prepare_resume(trace_dir))
            if not force:
                raise TraceFormatError(f"output directory '{trace_dir}' already exists; {fix}")
            _clear_trace_directory(trace_dir)
        trace_dir.mkdir(parents=True, exist_ok=True)
        return cls(trace_dir, None)

    @classmethod
    def append(cls, trace_dir: str | Path, fix: str) -> TraceWriter:
        """Continue the trace in ``trace_dir`` if it has one, else start one there (a
        server restarted on its directory); ``fix``: the advice for a directory that
        holds something else."""
        return cls.open(trace_dir, resume=store.has_manifest(Path(trace_dir)), fix=fix)

    @classmethod
    def reopen(cls, trace_dir: str | Path) -> TraceWriter:
        """The writer of a trace another writer left (closed): to add what only a later
        step knows, such as an evaluation's scores, or to mark it failed. Its files are
        kept as they are."""
        manifest = Manifest.read(trace_dir)
        return cls(Path(trace_dir), manifest)

    # -- writing ------------------------------------------------------------------

    def begin(self, new: Manifest | Callable[[], Manifest],
              router_weights: store.RouterWeights | list[np.ndarray] | None = None) -> Manifest:
        """Start writing: a resumed trace keeps its manifest, a new one takes ``new`` (a
        manifest, or a function that builds it, called only for a new trace). The
        trace is ``running`` from here (a restart clears an earlier failure);
        ``router_weights`` (float32 [E, hidden] per MoE layer, trace layer order, with
        biases where the routers have them; or why the model gave none) are saved with
        it. Writes the manifest."""
        if self.manifest is None:
            self.manifest = new() if callable(new) else new
        if isinstance(router_weights, list):
            router_weights = store.RouterWeights(router_weights)
        if router_weights is not None:
            self.manifest.router_weights_unavailable = router_weights.unavailable
            self.manifest.router_weights = store.write_router_weights(
                self.trace_dir, router_weights.weights, router_weights.biases
            ) if router_weights.weights is not None else None
        self._set_status(RUNNING)
        return self.manifest

    def commit(self, routing: Sequence[store.ShardInfo] = (), samples: pa.Table | None = None,
               count: bool = False) -> None:
        """Make ``routing`` (shards already written into the directory) and the samples
        rows ``samples`` part of the trace, in one manifest write. ``count``: refresh
        the shard counts now (a trace read while it is written), not only at finish."""
        manifest = self._require_begun()
        if samples is not None:
            name = f"{store.SAMPLES_DIR}/{len(manifest.sample_shards):06d}.parquet"
            manifest.sample_shards.append(store.write_parquet_shard(
                self.trace_dir, name, samples))
        manifest.routing_shards.extend(routing)
        if count:
            self._count()
        self._write()

    def copy_in(self, source: Path, routing: Sequence[store.ShardInfo],
                samples: Sequence[store.ShardInfo], prefix: str) -> None:
        """Copy committed shards of the trace in ``source`` into this one, named
        ``<kind>/<prefix><name>``, their checksums verified; committed by the next write."""
        manifest = self._require_begun()
        for kind, shards, listed in ((store.ROUTING_DIR, routing, manifest.routing_shards),
                                     (store.SAMPLES_DIR, samples, manifest.sample_shards)):
            for shard in shards:
                name = f"{kind}/{prefix}{Path(shard.file).name}"
                listed.append(self._copy(source, shard, name))

    def copy_router_weights(self, source: Path, weights: store.ShardInfo) -> None:
        """Take the router weights of the trace in ``source`` (verified) as this trace's."""
        self._require_begun().router_weights = self._copy(source, weights, weights.file)

    def finish(self, **counts: int) -> Manifest:
        """Mark the trace complete with its shard counts and ``counts`` (``truncated``,
        ``skipped_lines``: what only the caller knows). Writes the manifest."""
        self._count(**counts)
        self._set_status(COMPLETE)
        return self.manifest

    def fail(self, reason: str) -> None:
        """Mark the trace failed with ``reason`` (kept in the manifest's capture_error);
        what it committed stays readable and resumable."""
        self._set_status(FAILED, reason)

    # -- reading what is committed --------------------------------------------------

    def committed_sample_ids(self) -> set[str]:
        """Ids of the samples-table rows committed so far (empty for a new trace)."""
        if self.manifest is None:
            return set()
        return store.column_values(self.trace_dir, self.manifest.sample_shards, "sample_id")

    def recorded_sample_ids(self, routing: Sequence[store.ShardInfo]) -> set[str]:
        """Ids of the records in routing shards ``routing`` (written, maybe uncommitted)."""
        return store.column_values(self.trace_dir, routing, "sample_id")

    # -- internals ------------------------------------------------------------------

    def _require_begun(self) -> Manifest:
        if self.manifest is None:
            raise RuntimeError("TraceWriter.begin() must come before committing")
        return self.manifest

    def _count(self, **counts: int) -> None:
        manifest = self._require_begun()
        shard_counts = manifest.shard_counts()
        manifest.counts = Counts(**{**manifest.counts.to_dict(), **shard_counts.to_dict(),
                                    **counts})

    def _set_status(self, status: str, capture_error: str | None = None) -> None:
        """Status and capture error change together: a failed trace resumed to completion
        does not keep the old failure."""
        manifest = self._require_begun()
        manifest.status, manifest.capture_error = status, capture_error
        self._write()

    def _write(self) -> None:
        store.write_manifest(self.trace_dir, self.manifest.to_dict())

    def _copy(self, source: Path, shard: store.ShardInfo, name: str) -> store.ShardInfo:
        copied = replace(shard, file=name)
        (self.trace_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / shard.file, self.trace_dir / name)
        store.verify_checksums(self.trace_dir, [copied])
        return copied


def _prepare_resume(trace_dir: Path) -> Manifest:
    """The manifest of the trace to continue in ``trace_dir``, its committed files
    verified and everything else it holds (uncommitted shards, temporary files) removed."""
    manifest = Manifest.read(trace_dir)
    store.verify_checksums(trace_dir, manifest.committed_files)
    store.remove_uncommitted(trace_dir, manifest.committed_files)
    manifest.format_version = store.FORMAT_VERSION  # new shards are; readers take both
    return manifest


def _clear_trace_directory(trace_dir: Path) -> None:
    """Delete what a trace directory holds (the directory itself stays)."""
    if not store.is_trace_directory(trace_dir):
        raise InputError(
            f"--force would delete '{trace_dir}', which is not a moepath trace (it holds "
            f"other files); pass a new or empty directory, or delete it yourself")
    for path in trace_dir.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

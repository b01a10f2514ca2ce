"""Writes finished requests' routing from the worker into the trace store.

Records are buffered until ``shard_tokens`` tokens are pending, then written
as one routing shard by a background thread (Parquet encoding overlaps the
next forward). At most ``MAX_WRITES_IN_FLIGHT`` shards are written or queued at
once: an engine that produces routing faster than the disk takes it waits for
the oldest write rather than holding ever more records in memory. ``flush()``
writes what is pending, waits, and returns the new shards: the owner of the
manifest (the driver, or the worker itself in server mode) commits them.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from ..tracer import store

MAX_WRITES_IN_FLIGHT = 2  # shards being written or queued (each ~shard_tokens tokens)


class RoutingSink:
    """A worker's writer of routing shards into one trace directory (see the module).

    Shards are named ``<run>-r<rank>-<seq>`` (``rank``: the data-parallel rank);
    ``shape`` is (L, k, E) of the records it is given; ``kind`` (``CaptureSettings.store``)
    what they are: RoutingRecord (per-token) or RoutingSummary (per-sample).
    """

    def __init__(self, trace_dir: str, run: str, rank: int, shape: tuple[int, int, int],
                 shard_tokens: int, kind: str = store.PER_TOKEN):
        self.rank = rank
        self.per_sample = kind == store.PER_SAMPLE  # records are RoutingSummary
        self.retarget(trace_dir, run)
        self.shape = shape  # (L, k, E)
        self.shard_tokens = shard_tokens
        self._pending: list[store.RoutingRecord | store.RoutingSummary] = []
        self._pending_tokens = 0
        self._writes: list[Future] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepath-sink")

    def retarget(self, trace_dir: str, run: str) -> None:
        """Name further shards ``<run>-r<rank>-<seq>`` in ``trace_dir`` (pending must be empty)."""
        self.trace_dir = Path(trace_dir)
        self.prefix = f"{run}-r{self.rank}"
        self._seq = 0

    def add(self, record: store.RoutingRecord | store.RoutingSummary) -> None:
        self._pending.append(record)
        self._pending_tokens += record.num_tokens
        if self._pending_tokens >= self.shard_tokens:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        records, self._pending, self._pending_tokens = self._pending, [], 0
        name = f"{self.prefix}-{self._seq:06d}"
        self._seq += 1
        self._writes.append(self._executor.submit(
            store.write_summary_shard if self.per_sample else store.write_routing_shard,
            self.trace_dir, name, records, *self.shape))
        if len(self._writes) > MAX_WRITES_IN_FLIGHT:
            # wait for the oldest write still counted; its error, if any, is raised by flush()
            self._writes[-MAX_WRITES_IN_FLIGHT - 1].exception()

    def flush(self) -> list[dict]:
        """Write pending records; wait for all writes; return the new shards (as dicts).

        Each dict is a ``store.ShardInfo``. A failed write raises here.
        """
        self._write_pending()
        writes, self._writes = self._writes, []
        return [asdict(future.result()) for future in writes]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

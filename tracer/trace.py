"""`Trace`: the reader API of a trace directory (format: docs/trace-format.md).

Example::

    from moepath.tracer import Trace
    trace = Trace.open("out/trace")
    ids, weights = trace.topk("a17")        # [T, L, k] int, [T, L, k] float32
    g = trace.router_mean("a17")            # [L, E] float32
    W = trace.router_weights()              # L x [E, hidden] float32

A trace written with ``--store per-sample`` keeps no per-token routing: ``topk``,
``positions``, ``token_ids`` and ``router_probs`` refuse it (naming ``--store
per-token``), and ``topk_mean``/``topk_counts``/``iter_topk_means`` read its summaries.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from . import store
from .errors import TraceFormatError
from .manifest import COMPLETE, Manifest

_RECORD_COLUMNS = ("sample_id", "num_tokens")  # samples columns a routing record sets itself
_HELD_SHARDS = 2  # routing shards whose read columns a Trace keeps for the next sample


@dataclass(frozen=True)
class _Location:
    shard: int
    row: int


class Trace:
    """Read-only view of a committed trace directory.

    ``Trace.open`` validates the manifest (format version) and the sha256 of
    every committed file, so a damaged shard is reported by name, never read.
    """

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest
        self.num_layers: int = manifest.model.num_layers
        self.num_experts: int = manifest.model.num_experts
        self.top_k: int = manifest.model.top_k
        self._held: OrderedDict[int, dict[str, pa.Table]] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Trace:
        """Open the trace at ``path`` whatever its :attr:`status`: a running server's
        trace is read live, up to its last commit."""
        manifest = Manifest.read(path)
        if verify:
            store.verify_checksums(Path(path), manifest.committed_files)
        return cls(Path(path), manifest)

    # -- status ---------------------------------------------------------------

    @property
    def status(self) -> str:
        """``complete``; ``running`` (being written, or its run was interrupted);
        ``failed`` (capture stopped the run: :attr:`capture_error` says why)."""
        return self.manifest.status

    @property
    def capture_error(self) -> str | None:
        """The capture failure that stopped the run when :attr:`status` is ``failed``."""
        return self.manifest.capture_error

    def incomplete_warning(self) -> str | None:
        """One line for a trace that is not complete, naming its status, its committed
        samples (all any result covers) and how to finish it; None when complete."""
        if self.status == COMPLETE:
            return None
        error = f" (capture error: {self.capture_error})" if self.capture_error else ""
        return (f"trace '{self.path}' is {self.status}, not complete{error}; results cover "
                f"its {len(self.sample_ids())} committed sample(s) only: {self._how_to_finish()}")

    def _how_to_finish(self) -> str:
        """A driver's trace (moepath trace, compare) is resumed; one its engine's worker
        committed (input format ``server``) is finished only by that engine's shutdown."""
        if self.manifest.server_committed:
            return ("the engine writing it (`vllm serve`, `moepath eval`, a `TracedEngine`) "
                    "is still running or stopped before its final commit; `moepath trace "
                    "--resume` does not continue it")
        return ("finish it with `moepath trace ... --resume`, or re-run the `moepath compare` "
                "that wrote it")

    # -- tables -------------------------------------------------------------

    @property
    def _routing_files(self) -> list[str]:
        return [shard.file for shard in self.manifest.routing_shards]

    def _column(self, shard: int, name: str) -> pa.Table:
        """Column ``name`` of routing shard ``shard``, as a one-column table (its field
        metadata kept), read on first use.

        Each Trace keeps the columns it read from its ``_HELD_SHARDS`` most recently
        used shards, and only those: ``topk`` never loads ``router_probs`` (GBs of a
        shard with --store-probs).
        """
        held = self._held.pop(shard, {})
        self._held[shard] = held  # most recently used last
        if len(self._held) > _HELD_SHARDS:
            self._held.popitem(last=False)
        if name not in held:
            held[name] = store.read_shard(self.path, self._routing_files[shard], [name])
        return held[name]

    @cached_property
    def _index(self) -> dict[tuple[str, int], _Location]:
        """(sample id, completion) -> where its record is.

        Raises TraceFormatError when a key has several records: readers would
        disagree on which one (or how many) the sample has.
        """
        index, repeated = {}, []
        for shard, file in enumerate(self._routing_files):
            keys = store.read_shard(self.path, file, ["sample_id", "completion"])
            for row, key in enumerate(
                zip(keys["sample_id"].to_pylist(), keys["completion"].to_pylist(), strict=True)
            ):
                if key in index:
                    repeated.append(key)
                index[key] = _Location(shard, row)
        if repeated:
            raise self._repeated_records_error(repeated)
        return index

    def _repeated_records_error(self, repeated: list[tuple[str, int]]) -> TraceFormatError:
        ids = list(dict.fromkeys(sid for sid, _ in repeated))
        named = ", ".join(f"'{sid}'" for sid in ids[:5]) + (", ..." if len(ids) > 5 else "")
        return TraceFormatError(
            f"trace '{self.path}' holds more than one record of {len(ids)} sample id(s) "
            f"({named}): the same id was traced twice, e.g. by a client of `vllm serve` that "
            f"reused it; give every traced request its own sample id and trace again")

    def _require_unique_records(self) -> None:
        """Refuse a trace with repeated records (checked once, by building the index)."""
        _ = self._index

    @cached_property
    def samples(self) -> pd.DataFrame:
        """One row per sample: ``sample_id``, carried input columns, ``num_tokens``,
        ``truncated``, ``nll`` (when recorded). Traces written without a samples
        table (server mode) take these columns from the requests' metadata."""
        files = [shard.file for shard in self.manifest.sample_shards]
        if files:
            frames = [store.read_shard(self.path, f).to_pandas() for f in files]
            return pd.concat(frames, ignore_index=True)
        return self._samples_from_routing()

    def _samples_from_routing(self) -> pd.DataFrame:
        self._require_unique_records()
        rows = []
        for file in self._routing_files:
            table = store.read_shard(self.path, file, ["sample_id", "completion", "meta",
                                                       "num_prompt_tokens"])
            for sid, completion, meta, prompt in zip(*(table[c].to_pylist() for c in (
                    "sample_id", "completion", "meta", "num_prompt_tokens")), strict=True):
                if completion == 0:
                    rows.append(_sample_row(sid, json.loads(meta), prompt))
        return pd.DataFrame(rows, columns=None if rows else ["sample_id", "num_tokens"])

    # -- one sample -----------------------------------------------------------

    def _locate(self, sample_id: str, completion: int) -> _Location:
        location = self._index.get((str(sample_id), completion))
        if location is None:
            raise TraceFormatError(
                f"sample '{sample_id}' (completion {completion}) is not in trace '{self.path}'"
            )
        return location

    def _scalar(self, sample_id: str, completion: int, name: str) -> pa.Scalar:
        """The record's value in column ``name`` (one per record)."""
        location = self._locate(sample_id, completion)
        return self._column(location.shard, name)[name][location.row]

    def _token_values(self, sample_id: str, completion: int, name: str,
                      inner: tuple[int, ...]) -> np.ndarray:
        """The record's per-token column ``name`` as an array [T, *inner]."""
        location = self._locate(sample_id, completion)
        return store.token_values(self._column(location.shard, name), name, location.row, inner)

    @property
    def store(self) -> str:
        """What the routing shards keep: ``per-token`` (every token's routing) or
        ``per-sample`` (per-layer summaries of each sample, ``--store per-sample``)."""
        return self.manifest.store_kind

    @property
    def per_sample(self) -> bool:
        return self.store == store.PER_SAMPLE

    def require_per_token(self, what: str) -> None:
        """Raise TraceFormatError naming ``what`` (e.g. "per-token routing") when the trace
        keeps per-sample summaries only."""
        if self.per_sample:
            raise TraceFormatError(
                f"trace '{self.path}' was written with --store per-sample and keeps no "
                f"per-token routing, which {what} needs; trace the samples again with "
                f"--store per-token")

    def positions(self, sample_id: str, completion: int = 0) -> np.ndarray:
        """int32 [T]: token positions, prompt tokens first (per-token traces only)."""
        self.require_per_token("Trace.positions")
        return self._token_values(sample_id, completion, "positions", ())

    def token_ids(self, sample_id: str, completion: int = 0) -> np.ndarray:
        """int32 [T]: the token ids, prompt tokens first (per-token traces only)."""
        self.require_per_token("Trace.token_ids")
        return self._token_values(sample_id, completion, "token_ids", ())

    def num_tokens(self, sample_id: str, completion: int = 0) -> int:
        """Tokens recorded for the record, prompt and generated."""
        if self.per_sample:
            return self._scalar(sample_id, completion, "num_tokens").as_py()
        return len(self.positions(sample_id, completion))

    def num_prompt_tokens(self, sample_id: str, completion: int = 0) -> int:
        """Prompt tokens of the record: positions below it are prompt, the rest generated."""
        return self._scalar(sample_id, completion, "num_prompt_tokens").as_py()

    def topk(self, sample_id: str, completion: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids int64 [T, L, k], gate weights float32 [T, L, k]), prompt tokens first
        (per-token traces only)."""
        self.require_per_token("Trace.topk")
        shape = (self.num_layers, self.top_k)
        ids = self._token_values(sample_id, completion, "expert_ids", shape).astype(np.int64)
        weights = self._token_values(sample_id, completion, "gate_weights", shape)
        return ids, weights.astype(np.float32)

    def _layer_matrix(self, sample_id: str, name: str) -> np.ndarray | None:
        """Completion 0's [L, E] value of column ``name``; None where it is null."""
        location = self._locate(sample_id, 0)
        return store.layer_matrix(self._column(location.shard, name), name, location.row,
                                  (self.num_layers, self.num_experts))

    def router_mean(self, sample_id: str) -> np.ndarray:
        """float32 [L, E]: mean over prompt tokens of the full router distribution."""
        mean = self._layer_matrix(sample_id, "router_mean")
        if mean is None:
            raise TraceFormatError(f"sample '{sample_id}' has no router mean (no prompt tokens)")
        return mean

    def _require_per_sample(self, what: str) -> None:
        if not self.per_sample:
            raise TraceFormatError(
                f"trace '{self.path}' keeps per-token routing; {what} is stored only by "
                f"--store per-sample (compute it from Trace.topk)")

    def topk_mean(self, sample_id: str) -> np.ndarray | None:
        """float32 [L, E]: the top-k gate weights averaged over the prompt tokens, as the
        worker computed them (per-sample traces only); None without prompt tokens."""
        self._require_per_sample("the top-k mean")
        return self._layer_matrix(sample_id, "topk_mean")

    def topk_counts(self, sample_id: str) -> np.ndarray:
        """int32 [L, E]: prompt tokens that had each expert in their top k (per-sample
        traces only)."""
        self._require_per_sample("the top-k histogram")
        return self._layer_matrix(sample_id, "topk_counts")

    def router_probs(self, sample_id: str, completion: int = 0) -> np.ndarray:
        """float32 [T, L, E]: per-token full distributions (only with --store-probs)."""
        self.require_per_token("Trace.router_probs")
        shard = self._routing_files[self._locate(sample_id, completion).shard]
        if "router_probs" not in store.shard_columns(self.path, shard):
            raise TraceFormatError(
                "this trace has no per-token router distributions; trace with --store-probs"
            )
        shape = (self.num_layers, self.num_experts)
        return self._token_values(sample_id, completion, "router_probs", shape).astype(np.float32)

    def router_weights(self) -> list[np.ndarray]:
        """The router matrices W_l of the traced checkpoint: L float32 arrays [E, hidden]."""
        if not self.manifest.router_weights:
            why = self.manifest.router_weights_unavailable
            raise TraceFormatError(f"trace '{self.path}' has no router weights" + (
                f": the traced model had none moepath could read ({why})" if why else ""))
        return store.read_router_weights(self.path)

    # -- many samples --------------------------------------------------------

    def iter_router_means(self, batch_size: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield (sample ids, float32 [B, L, E]) over all samples, shard by shard."""
        return self._iter_layer_means("router_mean", batch_size, "router means")

    def iter_topk_means(self, batch_size: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield (sample ids, float32 [B, L, E] top-k gate-weight means over prompt tokens)
        over all samples, shard by shard (per-sample traces only: a per-token trace's
        are computed from :meth:`topk`)."""
        self._require_per_sample("the top-k mean")
        return self._iter_layer_means("topk_mean", batch_size, "prompt tokens")

    def _iter_layer_means(self, name: str, batch_size: int,
                          missing: str) -> Iterator[tuple[list[str], np.ndarray]]:
        """(sample ids, [B, L, E]) of column ``name``, completion 0, one shard at a time:
        memory holds one shard's column, whatever the trace's size."""
        self._require_unique_records()
        shape = (self.num_layers, self.num_experts)
        for file in self._routing_files:
            table = store.read_shard(self.path, file, ["sample_id", "completion", name])
            table = table.filter(pa.compute.equal(table["completion"], 0))
            for batch in table.to_batches(max_chunksize=batch_size):
                if batch.column(name).null_count:
                    raise TraceFormatError(f"'{file}' has samples without {missing}")
                yield (batch.column("sample_id").to_pylist(),
                       store.layer_matrices(batch, name, shape))

    def router_means(self) -> tuple[list[str], np.ndarray]:
        """(sample ids, float32 [N, L, E]) for every sample, in trace order."""
        return self._gather(self.iter_router_means())

    def topk_means(self) -> tuple[list[str], np.ndarray]:
        """(sample ids, float32 [N, L, E]) top-k means of every sample (per-sample traces)."""
        return self._gather(self.iter_topk_means())

    def _gather(self, batches) -> tuple[list[str], np.ndarray]:
        ids, means = [], []
        for batch_ids, batch in batches:
            ids.extend(batch_ids)
            means.append(batch)
        empty = np.zeros((0, self.num_layers, self.num_experts), np.float32)
        return ids, np.concatenate(means) if means else empty

    def sample_ids(self) -> list[str]:
        """Every traced sample's id once (completion 0), in trace order (the shards as the
        manifest lists them); TraceFormatError when an id has two records."""
        return [sid for (sid, completion) in self._index if completion == 0]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"Trace('{self.path}', {len(self)} samples, {self.manifest.model.architecture}, "
                f"L={self.num_layers}, E={self.num_experts}, k={self.top_k})")


def _sample_row(sample_id: str, meta: dict, num_prompt_tokens: int) -> dict:
    """A samples-table row from a routing record: the record's ``sample_id`` and
    ``num_tokens``, and its metadata but for keys of those names (the record wins)."""
    carried = {key: value for key, value in meta.items() if key not in _RECORD_COLUMNS}
    return {"sample_id": sample_id, **carried, "num_tokens": num_prompt_tokens}

"""The trace store: how trace files are encoded, written atomically and read back.

Only this module, :mod:`.manifest` and :mod:`.writer` touch a trace's files
(a test holds the boundary); programs write a trace through
:class:`~.writer.TraceWriter` and read it through :class:`~.trace.Trace`.

A trace is a directory (format documented in docs/trace-format.md, version
:data:`FORMAT_VERSION`)::

    manifest.json                      what the trace is, and the commit point
    router.safetensors                 router matrix W_l [E, hidden] (and bias) of every MoE layer
    routing/<run>-r<dp>-<seq>.parquet  one row per traced request (routing of every token,
                                       or with ``--store per-sample`` its per-layer summaries)
    samples/<seq>.parquet              one row per sample (input columns, NLL, truncation)

``<run>``: random hex per engine start, ``<dp>``: data-parallel rank, ``<seq>``: 6
digits; ``moepath merge`` prefixes the files it copies with ``p<i>-`` (part i).

Every file is written to a temporary name and renamed into place, and only
files listed in the manifest (with their sha256) belong to the trace: a shard
written by a run that was killed before committing it is ignored and removed
on resume. The manifest itself is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import TraceFormatError
from .pathways import topk_counts, topk_to_distribution

FORMAT_NAME = "moepath-trace"
FORMAT_VERSION = 2  # 2: per-token routing as blobs (1: nested lists, still read)
MANIFEST = "manifest.json"
ROUTER_WEIGHTS = "router.safetensors"
ROUTING_DIR = "routing"
SAMPLES_DIR = "samples"
SERVER_INPUT_FORMAT = "server"  # manifest input.format of a trace its engine's worker commits
# What a routing shard keeps (manifest ``store``, ``--store``): every token's routing
# (RoutingRecord), or per request only its per-layer summaries (RoutingSummary).
PER_TOKEN, PER_SAMPLE = "per-token", "per-sample"
STORES = (PER_TOKEN, PER_SAMPLE)


@dataclass
class RoutingRecord:
    """Routing of one traced request (one completion), tokens in position order.

    Attributes:
        sample_id: the caller's id of the sample.
        request_id: vLLM's internal request id (debugging only).
        completion: completion index for ``n > 1`` sampling (0 otherwise).
        num_prompt_tokens: tokens of the prompt; positions below it are prompt tokens.
        positions: int32 [T], strictly increasing token positions.
        token_ids: int32 [T], the token fed at each position.
        expert_ids: integer [T, L, k], logical expert ids the model used, per MoE
            layer; stored uint8 (uint16 when E > 256), read back int64.
        gate_weights: float [T, L, k], the gate weights the model used (after its
            own renormalisation / scaling), same order as ``expert_ids``; stored
            float16, read back float32.
        router_mean: float32 [L, E], mean over prompt tokens of the full router
            distribution (the model's scoring function over all experts); None
            when no prompt token was computed.
        router_probs: optional float [T, L, E] per-token full distributions; stored
            float16, read back float32.
        meta: JSON-serialisable metadata the caller attached to the request.
    """

    sample_id: str
    request_id: str
    completion: int
    num_prompt_tokens: int
    positions: np.ndarray
    token_ids: np.ndarray
    expert_ids: np.ndarray
    gate_weights: np.ndarray
    router_mean: np.ndarray | None
    router_probs: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Tokens recorded, prompt and generated."""
        return len(self.positions)


@dataclass
class RoutingSummary:
    """What ``--store per-sample`` keeps of one traced request: per-layer summaries over its
    prompt tokens, no per-token routing (docs/trace-format.md, "Per-sample shards").

    Attributes:
        sample_id, request_id, completion, num_prompt_tokens, meta: as in RoutingRecord.
        num_tokens: tokens recorded, prompt and generated.
        router_mean: float32 [L, E], as in RoutingRecord (None: no prompt token).
        topk_mean: float32 [L, E], the top-k gate weights averaged over the prompt tokens
            (``pathways.topk_to_distribution`` of the float16 weights a per-token trace
            stores, so both kinds give the same ``--source topk`` distributions); None
            when no prompt token was computed.
        topk_counts: int32 [L, E], how many prompt tokens had each expert in their top k.
    """

    sample_id: str
    request_id: str
    completion: int
    num_prompt_tokens: int
    num_tokens: int
    router_mean: np.ndarray | None
    topk_mean: np.ndarray | None
    topk_counts: np.ndarray
    meta: dict = field(default_factory=dict)

    @classmethod
    def of(cls, record: RoutingRecord, num_experts: int) -> RoutingSummary:
        """The summary of ``record`` (its per-token arrays are not kept)."""
        prompt = min(record.num_prompt_tokens, record.num_tokens)
        ids = np.asarray(record.expert_ids)[:prompt]
        weights = np.asarray(record.gate_weights)[:prompt].astype(np.float16)  # as stored
        return cls(
            sample_id=record.sample_id, request_id=record.request_id,
            completion=record.completion, num_prompt_tokens=record.num_prompt_tokens,
            num_tokens=record.num_tokens, router_mean=record.router_mean,
            topk_mean=topk_to_distribution(ids, weights, num_experts) if prompt else None,
            topk_counts=topk_counts(ids, num_experts), meta=record.meta)


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard: file relative to the trace directory, checksum, row count."""

    file: str
    sha256: str
    rows: int
    tokens: int = 0


def expert_id_type(num_experts: int) -> pa.DataType:
    """uint8 when E <= 256, else uint16 (the compact on-disk id type)."""
    return pa.uint8() if num_experts <= 256 else pa.uint16()


def _nested(values: np.ndarray, inner: tuple[int, ...], value_type: pa.DataType) -> pa.Array:
    """Flat values -> fixed-size lists nested by ``inner`` (innermost last)."""
    array = pa.array(values.ravel(), type=value_type)
    for size in reversed(inner):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def _offsets(arrays: list[np.ndarray]) -> pa.Array:
    """int32 list offsets of one list per array, of its first-axis length."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    return pa.array(offsets)


def _token_scalars(arrays: list[np.ndarray]) -> pa.Array:
    """list<int32>[T_i]: one list per record of one int32 per token."""
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(_offsets(arrays), pa.array(flat, pa.int32()))


def _token_blobs(name: str, arrays: list[np.ndarray], inner: tuple[int, ...],
                 dtype: np.dtype) -> tuple[pa.Field, pa.Array]:
    """list<fixed_size_binary>[T_i]: one list per record of one blob per token.

    Token t's blob is ``array[t]`` ([*inner] in C order) as little-endian
    ``dtype`` bytes; the field's metadata names ``dtype`` and ``inner`` so the
    file describes itself. Parquet stores one value per token, not one
    repetition/definition level per number: 7x faster to write than nested lists.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    values = int(np.prod(inner))
    width = values * dtype.itemsize
    # [T_i, values] per record: a view also of strided rows, so the only copy is the join
    flat = np.concatenate([np.asarray(a, dtype).reshape(len(a), values) for a in arrays]
                          ).reshape(-1) if arrays else np.zeros(0, dtype)
    blobs = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(flat) * dtype.itemsize // width, [None, pa.py_buffer(flat)])
    field = pa.field(name, pa.list_(pa.binary(width)), metadata={
        "dtype": dtype.name, "shape": json.dumps(list(inner))})
    return field, pa.ListArray.from_arrays(_offsets(arrays), blobs)


def _layer_matrices(name: str, matrices: list[np.ndarray | None], shape: tuple[int, int],
                    value_type: pa.DataType) -> tuple[pa.Field, pa.Array]:
    """fixed_size_list<fixed_size_list<value_type, E>, L>: one [L, E] matrix per record,
    null where the record has none."""
    num_layers, num_experts = shape
    dtype = value_type.to_pandas_dtype()
    values = [np.zeros(shape, dtype) if m is None else np.asarray(m, dtype) for m in matrices]
    valid = pa.array([m is not None for m in matrices], pa.bool_())
    return (pa.field(name, pa.list_(pa.list_(value_type, num_experts), num_layers)),
            pa.FixedSizeListArray.from_arrays(
                _nested(np.stack(values) if values else np.zeros(0, dtype), (num_experts,),
                        value_type), num_layers, mask=pc.invert(valid)))


def _request_columns(records: list) -> list[tuple[pa.Field, pa.Array]]:
    """The columns that name each record's request, first in both kinds of shard."""
    return [
        (pa.field("sample_id", pa.string()), pa.array([r.sample_id for r in records],
                                                      pa.string())),
        (pa.field("request_id", pa.string()), pa.array([r.request_id for r in records],
                                                       pa.string())),
        (pa.field("completion", pa.int16()),
         pa.array([r.completion for r in records], pa.int16())),
        (pa.field("num_prompt_tokens", pa.int32()),
         pa.array([r.num_prompt_tokens for r in records], pa.int32())),
    ]


def _meta_column(records: list) -> tuple[pa.Field, pa.Array]:
    return (pa.field("meta", pa.string()),
            pa.array([json.dumps(r.meta, sort_keys=True) for r in records], pa.string()))


def _table(columns: list[tuple[pa.Field, pa.Array]]) -> pa.Table:
    return pa.Table.from_arrays([array for _, array in columns],
                                schema=pa.schema([field for field, _ in columns]))


def routing_table(records: list[RoutingRecord], num_layers: int, top_k: int, num_experts: int):
    """Arrow table of routing records (schema: docs/trace-format.md, "routing shards")."""
    lk, le = (num_layers, top_k), (num_layers, num_experts)
    probs = ([_token_blobs("router_probs", [r.router_probs for r in records], le, np.float16)]
             if records and records[0].router_probs is not None else [])
    columns = [
        *_request_columns(records),
        (pa.field("positions", pa.list_(pa.int32())),
         _token_scalars([r.positions for r in records])),
        (pa.field("token_ids", pa.list_(pa.int32())),
         _token_scalars([r.token_ids for r in records])),
        _token_blobs("expert_ids", [r.expert_ids for r in records], lk,
                     expert_id_type(num_experts).to_pandas_dtype()),
        _token_blobs("gate_weights", [r.gate_weights for r in records], lk, np.float16),
        _layer_matrices("router_mean", [r.router_mean for r in records], le, pa.float32()),
        *probs,
        _meta_column(records),
    ]
    return _table(columns)


def summary_table(summaries: list[RoutingSummary], num_layers: int, num_experts: int):
    """Arrow table of per-sample summaries (docs/trace-format.md, "Per-sample shards"): the
    request columns, ``num_tokens``, ``router_mean``, ``topk_mean``, ``topk_counts``,
    ``meta``; no per-token column."""
    le = (num_layers, num_experts)
    return _table([
        *_request_columns(summaries),
        (pa.field("num_tokens", pa.int32()),
         pa.array([s.num_tokens for s in summaries], pa.int32())),
        _layer_matrices("router_mean", [s.router_mean for s in summaries], le, pa.float32()),
        _layer_matrices("topk_mean", [s.topk_mean for s in summaries], le, pa.float32()),
        _layer_matrices("topk_counts", [s.topk_counts for s in summaries], le, pa.int32()),
        _meta_column(summaries),
    ])


def layer_matrix(table: pa.Table, name: str, row: int, shape: tuple[int, int]):
    """Row ``row`` of the [L, E] column ``name`` (router_mean, topk_mean, topk_counts) as
    a numpy array of the column's type, None where it is null."""
    value = table[name][row]
    if not value.is_valid:
        return None
    return value.values.flatten().to_numpy(zero_copy_only=False).reshape(shape)


def layer_matrices(batch: pa.RecordBatch | pa.Table, name: str,
                   shape: tuple[int, int]) -> np.ndarray:
    """Every row of the [L, E] column ``name`` as one array [rows, L, E] (no nulls)."""
    column = batch.column(name)
    return column.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, *shape)


def is_summary_shard(columns: list[str]) -> bool:
    """Whether a routing shard of these columns holds per-sample summaries."""
    return "topk_mean" in columns and "expert_ids" not in columns


def token_values(table: pa.Table, name: str, row: int, inner: tuple[int, ...]) -> np.ndarray:
    """Row ``row`` of per-token column ``name`` as an array [T, *inner].

    Reads both layouts: format 2 blobs (list<fixed_size_binary>, dtype from the
    field metadata; zero-copy, read-only) and format 1 nested fixed-size lists.
    """
    values = table[name][row].values
    if pa.types.is_fixed_size_binary(values.type):
        metadata = table.schema.field(name).metadata or {}
        if b"dtype" not in metadata:
            raise TraceFormatError(f"column '{name}' has no dtype metadata; the shard is damaged")
        dtype = np.dtype(metadata[b"dtype"].decode()).newbyteorder("<")
        width = values.type.byte_width
        data = np.frombuffer(values.buffers()[1], np.uint8,
                             count=len(values) * width, offset=values.offset * width)
        return data.view(dtype).reshape(-1, *inner)
    for _ in inner:
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(-1, *inner)


def read_routing_shard(path: Path, num_layers: int, top_k: int, num_experts: int):
    """All records of one routing shard file, as RoutingRecord (weights as float32)."""
    table = pq.read_table(path)
    lk, le = (num_layers, top_k), (num_layers, num_experts)
    records = []
    for row in range(table.num_rows):
        probs = (token_values(table, "router_probs", row, le).astype(np.float32)
                 if "router_probs" in table.column_names else None)
        records.append(RoutingRecord(
            sample_id=table["sample_id"][row].as_py(),
            request_id=table["request_id"][row].as_py(),
            completion=table["completion"][row].as_py(),
            num_prompt_tokens=table["num_prompt_tokens"][row].as_py(),
            positions=token_values(table, "positions", row, ()),
            token_ids=token_values(table, "token_ids", row, ()),
            expert_ids=token_values(table, "expert_ids", row, lk).astype(np.int64),
            gate_weights=token_values(table, "gate_weights", row, lk).astype(np.float32),
            router_mean=layer_matrix(table, "router_mean", row, le),
            router_probs=probs,
            meta=json.loads(table["meta"][row].as_py()),
        ))
    return records


def read_summary_shard(path: Path, num_layers: int, num_experts: int) -> list[RoutingSummary]:
    """All summaries of one per-sample routing shard file."""
    table = pq.read_table(path)
    le = (num_layers, num_experts)
    return [RoutingSummary(
        sample_id=table["sample_id"][row].as_py(), request_id=table["request_id"][row].as_py(),
        completion=table["completion"][row].as_py(),
        num_prompt_tokens=table["num_prompt_tokens"][row].as_py(),
        num_tokens=table["num_tokens"][row].as_py(),
        router_mean=layer_matrix(table, "router_mean", row, le),
        topk_mean=layer_matrix(table, "topk_mean", row, le),
        topk_counts=layer_matrix(table, "topk_counts", row, le),
        meta=json.loads(table["meta"][row].as_py()),
    ) for row in range(table.num_rows)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _HashingWriter:
    """A binary file that hashes (sha256) what is written through it, so a checksum
    costs no second read of the file."""

    closed = False  # pyarrow checks it before writing; write() is all it calls

    def __init__(self, handle):
        self._handle = handle
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self._handle.write(data)


def write_atomic(path: Path, write) -> str:
    """Call ``write(handle)`` with a binary file open on a temporary name, fsync, drop
    the file from the page cache, rename to ``path``; return the sha256 of the bytes
    written.

    A crash leaves either the old file or the complete new one, never a partial
    file under the final name (temporary names start with ``.tmp-``). The directory
    is fsynced after the rename, so a file that a later manifest lists survives a
    power loss with it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        with open(tmp, "wb") as handle:
            hashing = _HashingWriter(handle)
            write(hashing)
            handle.flush()
            os.fsync(handle.fileno())
            _drop_from_page_cache(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return hashing.digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_from_page_cache(fd: int) -> None:
    """Release the (fsynced, so clean) pages of file ``fd`` from the kernel's page cache.

    A trace is written once and read later, by another command: its pages only
    crowd the cache. Released, they are what the next shard's write reuses; on
    the virtual machines measured, writing into pages never used before made a
    shard write in a vLLM engine process ~1.7x slower (bench/HISTORY.md, "Shard
    write: the page cache"). No-op where the OS has no ``posix_fadvise`` (macOS).
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_parquet_shard(
    trace_dir: Path, relative: str, table: pa.Table, tokens: int = 0
) -> ShardInfo:
    """Write ``table`` as ``trace_dir/relative`` atomically and describe it.

    Scalar columns get zstd, dictionary encoding and statistics; nested columns
    (the per-token lists and blobs of routing shards) get none of them. On those
    statistics and dictionaries cost more than half the write time of format 1
    for files ~12% smaller, and zstd makes writing format 2's blobs 2-3x slower
    for files 15-25% smaller (bench/HISTORY.md); nobody filters on them.
    """
    scalar = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
    checksum = write_atomic(Path(trace_dir) / relative, lambda handle: pq.write_table(
        table, handle, compression=dict.fromkeys(scalar, "zstd"), use_dictionary=scalar,
        write_statistics=scalar))
    return ShardInfo(file=relative, sha256=checksum, rows=table.num_rows, tokens=tokens)


def write_routing_shard(
    trace_dir: Path, name: str, records: list[RoutingRecord], num_layers: int, top_k: int,
    num_experts: int,
) -> ShardInfo:
    """Write records as ``routing/<name>.parquet`` atomically; used by the capture sink."""
    table = routing_table(records, num_layers, top_k, num_experts)
    tokens = sum(r.num_tokens for r in records)
    return write_parquet_shard(trace_dir, f"{ROUTING_DIR}/{name}.parquet", table, tokens)


def write_summary_shard(
    trace_dir: Path, name: str, summaries: list[RoutingSummary], num_layers: int, top_k: int,
    num_experts: int,
) -> ShardInfo:
    """Write per-sample summaries as ``routing/<name>.parquet`` atomically (``--store
    per-sample``; ``top_k`` unused, the signature is write_routing_shard's)."""
    table = summary_table(summaries, num_layers, num_experts)
    tokens = sum(s.num_tokens for s in summaries)
    return write_parquet_shard(trace_dir, f"{ROUTING_DIR}/{name}.parquet", table, tokens)



@dataclass
class RouterWeights:
    """The router matrices of a trace's MoE layers, as the served model computes its logits
    (``logits = h @ W_l.T + b_l``), or why there are none.

    Attributes:
        weights: L float32 arrays [E, hidden], trace layer order; None when unavailable.
        biases: L float32 arrays [E] for routers with a bias (gpt-oss), else None.
        unavailable: why the served model gave no matrices (None when it did).
    """

    weights: list[np.ndarray] | None
    biases: list[np.ndarray] | None = None
    unavailable: str | None = None


def write_router_weights(trace_dir: Path, weights: list[np.ndarray],
                         biases: list[np.ndarray] | None = None) -> ShardInfo:
    """Save router matrices W_l (float32 [E, hidden], layer order) as safetensors, keys
    ``layer.<i>``, and their biases b_l (float32 [E]), keys ``bias.<i>``, when given."""
    from safetensors.numpy import save

    tensors = {f"layer.{i}": np.ascontiguousarray(w, np.float32) for i, w in enumerate(weights)}
    if biases is not None:
        if len(biases) != len(weights):
            raise ValueError(f"{len(biases)} router biases for {len(weights)} router matrices")
        tensors |= {f"bias.{i}": np.ascontiguousarray(b, np.float32)
                    for i, b in enumerate(biases)}
    checksum = write_atomic(Path(trace_dir) / ROUTER_WEIGHTS,
                            lambda handle: handle.write(save(tensors)))
    return ShardInfo(file=ROUTER_WEIGHTS, sha256=checksum, rows=len(weights))


def read_router_weights(trace_dir: Path) -> list[np.ndarray]:
    """The trace's router matrices: L float32 arrays [E, hidden], in trace layer order
    (``model.layer_ids`` gives each one's decoder layer)."""
    return read_router_tensors(trace_dir).weights


def read_router_tensors(trace_dir: Path) -> RouterWeights:
    """The trace's router matrices and, where the routers have them, their biases
    (traces before biases were stored have none)."""
    from safetensors.numpy import load_file

    tensors = load_file(Path(trace_dir) / ROUTER_WEIGHTS)
    layers = sum(key.startswith("layer.") for key in tensors)
    biases = ([tensors[f"bias.{i}"] for i in range(layers)] if "bias.0" in tensors else None)
    return RouterWeights([tensors[f"layer.{i}"] for i in range(layers)], biases)


def read_manifest(trace_dir: Path) -> dict:
    """Read and validate manifest.json (format name and version)."""
    trace_dir = Path(trace_dir)
    path = trace_dir / MANIFEST
    if not path.is_file():
        what = "does not exist" if not trace_dir.exists() else "has no manifest.json"
        raise TraceFormatError(f"trace directory '{trace_dir}' {what}; run `moepath trace` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"'{path}' is not valid JSON ({exc}); the trace is damaged") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"'{trace_dir}' is not a moepath trace (no format '{FORMAT_NAME}')")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TraceFormatError(
            f"trace '{trace_dir}' has format version {version}, newer than this moepath "
            f"supports ({FORMAT_VERSION}); upgrade moepath to read it"
        )
    return manifest


def write_manifest(trace_dir: Path, manifest: dict) -> None:
    """Replace manifest.json atomically."""
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_atomic(Path(trace_dir) / MANIFEST, lambda handle: handle.write(text.encode()))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def verify_checksums(trace_dir: Path, files: list[ShardInfo]) -> None:
    """Raise TraceFormatError naming the first of ``files`` (a manifest's committed files)
    that is missing or corrupted.

    Such a trace can be neither read nor resumed (resume keeps every committed
    file, it does not recompute one): the message says to restore the file or to
    trace again with --force.
    """
    for entry in files:
        path = Path(trace_dir) / entry.file
        if not path.is_file():
            damage = f"is missing from '{trace_dir}'"
        elif file_sha256(path) != entry.sha256:
            damage = f"in '{trace_dir}' is corrupted (sha256 differs from the manifest)"
        else:
            continue
        raise TraceFormatError(
            f"trace file '{entry.file}' {damage}; restore it from a copy, or trace "
            f"again with --force (--resume keeps committed files, it cannot recompute one)")


def remove_uncommitted(trace_dir: Path, files: list[ShardInfo]) -> list[str]:
    """Delete shard and temporary files that are not among ``files`` (a manifest's committed
    files; temporary files of the manifest and router weights too); return their names
    relative to ``trace_dir``."""
    trace_dir = Path(trace_dir)
    keep = {entry.file for entry in files}
    shards = [path for sub in (ROUTING_DIR, SAMPLES_DIR) for path in (trace_dir / sub).glob("*")]
    candidates = [*trace_dir.glob(".tmp-*"), *shards]
    removed = []
    for path in sorted(candidates):
        relative = path.relative_to(trace_dir).as_posix()
        if relative not in keep:
            path.unlink()
            removed.append(relative)
    return removed


def has_manifest(trace_dir: Path) -> bool:
    """Whether ``trace_dir`` holds a manifest (a trace, committed at least once)."""
    return (Path(trace_dir) / MANIFEST).is_file()


def is_trace_directory(trace_dir: Path) -> bool:
    """True when ``trace_dir`` is a moepath trace: its manifest.json names the format, or
    it holds only files moepath writes (a run stopped before its first manifest)."""
    try:
        return json.loads((trace_dir / MANIFEST).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return all(is_trace_file(path, trace_dir) for path in trace_dir.rglob("*"))


def is_trace_file(path: Path, trace_dir: Path) -> bool:
    """A name moepath writes: manifest, router weights, the shard folders, shards in
    them, temporary files (``.tmp-*``)."""
    parts = path.relative_to(trace_dir).parts
    if len(parts) == 1:
        return parts[0] in (MANIFEST, ROUTER_WEIGHTS, ROUTING_DIR, SAMPLES_DIR) or (
            parts[0].startswith(".tmp-"))
    return (len(parts) == 2 and parts[0] in (ROUTING_DIR, SAMPLES_DIR) and path.is_file()
            and (parts[1].endswith(".parquet") or parts[1].startswith(".tmp-")))


def read_shard(trace_dir: Path, file: str, columns: list[str] | None = None) -> pa.Table:
    """Columns ``columns`` (all by default) of the shard ``file`` of a trace, field
    metadata kept."""
    return pq.read_table(Path(trace_dir) / file, columns=columns)


def shard_columns(trace_dir: Path, file: str) -> list[str]:
    """The column names of the shard ``file``, read from its footer only."""
    return pq.read_schema(Path(trace_dir) / file).names


def column_values(trace_dir: Path, shards: list[ShardInfo], column: str) -> set:
    """Every value of the scalar column ``column`` over ``shards``."""
    values = set()
    for shard in shards:
        values.update(read_shard(trace_dir, shard.file, [column])[column].to_pylist())
    return values

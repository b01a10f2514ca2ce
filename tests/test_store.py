"""The trace store: round trip, the on-disk schema (golden), atomicity and damage reports."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moepath.tracer import Trace, store
from moepath.tracer.errors import InputError, TraceFormatError
from moepath.tracer.manifest import Manifest, ModelInfo
from moepath.tracer.writer import TraceWriter

L, K, E = 3, 2, 8
DATA = Path(__file__).parent / "data"


def make_record(sample_id: str, tokens: int, seed: int, prompt: int | None = None):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(E), size=(tokens, L)).astype(np.float32)
    ids = np.argsort(-probs, -1)[..., :K]
    return store.RoutingRecord(
        sample_id=sample_id, request_id=f"{seed}-abcdefgh", completion=0,
        num_prompt_tokens=tokens if prompt is None else prompt,
        positions=np.arange(tokens, dtype=np.int32),
        token_ids=rng.integers(0, 500, tokens).astype(np.int32),
        expert_ids=ids, gate_weights=np.take_along_axis(probs, ids, -1),
        router_mean=probs.mean(0), meta={"domain": "math", "n": seed})


def write_trace(trace_dir, records) -> TraceWriter:
    """A committed trace of ``records``: one routing shard, router weights, manifest."""
    writer = TraceWriter.open(trace_dir)
    writer.begin(Manifest(model=ModelInfo(num_layers=L, num_experts=E, top_k=K,
                                          architecture="Toy")),
                 router_weights=[np.full((E, 4), i, np.float32) for i in range(L)])
    writer.commit(routing=[store.write_routing_shard(trace_dir, "run-r0-000000", records,
                                                     L, K, E)])
    return writer


def test_routing_round_trip(tmp_path):
    records = [make_record("a", 5, 1), make_record("b", 9, 2, prompt=6)]
    write_trace(tmp_path / "t", records)
    trace = Trace.open(tmp_path / "t")
    ids, weights = trace.topk("b")
    np.testing.assert_array_equal(ids, records[1].expert_ids)
    np.testing.assert_allclose(weights, records[1].gate_weights, atol=1e-3)  # stored float16
    np.testing.assert_array_equal(trace.token_ids("a"), records[0].token_ids)
    np.testing.assert_array_equal(trace.router_mean("a"), records[0].router_mean)
    assert trace.num_prompt_tokens("b") == 6
    assert [w[0, 0] for w in trace.router_weights()] == [0.0, 1.0, 2.0]
    assert trace.sample_ids() == ["a", "b"]
    # no samples table (server-mode trace): samples come from the requests' metadata
    assert trace.samples.to_dict("records") == [
        {"sample_id": "a", "domain": "math", "n": 1, "num_tokens": 5},
        {"sample_id": "b", "domain": "math", "n": 2, "num_tokens": 6}]
    sample_ids, means = trace.router_means()
    assert sample_ids == ["a", "b"] and means.shape == (2, L, E)


def test_a_sample_id_in_request_metadata_does_not_replace_the_records_id(tmp_path):
    record = make_record("a", 5, 1)
    record.meta = {"sample_id": "client-7", "num_tokens": 99, "domain": "code"}
    write_trace(tmp_path / "t", [record])
    assert Trace.open(tmp_path / "t").samples.to_dict("records") == [
        {"sample_id": "a", "domain": "code", "num_tokens": 5}]


def test_a_trace_with_two_records_of_one_sample_is_refused_by_every_reader(tmp_path):
    write_trace(tmp_path / "t", [make_record("a", 5, 1), make_record("b", 4, 2),
                                 make_record("a", 6, 3)])
    message = (r"holds more than one record of 1 sample id\(s\) \('a'\): the same id was "
               r"traced twice, .*; give every traced request its own sample id")
    for read in (Trace.sample_ids, Trace.router_means, lambda t: t.samples, lambda t: t.topk("b")):
        with pytest.raises(TraceFormatError, match=message):
            read(Trace.open(tmp_path / "t"))


def test_an_incomplete_trace_is_read_and_says_so(tmp_path):
    write_trace(tmp_path / "t", [make_record("a", 5, 1), make_record("b", 4, 2)])
    manifest = store.read_manifest(tmp_path / "t")
    trace = Trace.open(tmp_path / "t")  # as a running server's trace is read, live
    assert (trace.status, trace.capture_error) == ("running", None)
    assert trace.incomplete_warning() == (
        f"trace '{tmp_path / 't'}' is running, not complete; results cover its 2 committed "
        f"sample(s) only: finish it with `moepath trace ... --resume`, or re-run the "
        f"`moepath compare` that wrote it")
    manifest["status"] = "complete"
    store.write_manifest(tmp_path / "t", manifest)
    assert Trace.open(tmp_path / "t").incomplete_warning() is None


def test_an_incomplete_trace_committed_by_a_server_is_not_sent_to_resume(tmp_path):
    write_trace(tmp_path / "t", [make_record("a", 5, 1)])
    manifest = store.read_manifest(tmp_path / "t")
    manifest["input"] = {"path": "", "sha256": "", "format": "server"}
    store.write_manifest(tmp_path / "t", manifest)
    assert Trace.open(tmp_path / "t").incomplete_warning() == (
        f"trace '{tmp_path / 't'}' is running, not complete; results cover its 1 committed "
        f"sample(s) only: the engine writing it (`vllm serve`, `moepath eval`, a "
        f"`TracedEngine`) is still running or stopped before its final commit; "
        f"`moepath trace --resume` does not continue it")


def test_routing_shard_schema_is_the_documented_one(tmp_path):
    """Golden test of docs/trace-format.md: column names, Arrow types, blob metadata."""
    write_trace(tmp_path / "t", [make_record("a", 4, 1)])
    schema = pq.read_schema(tmp_path / "t" / "routing" / "run-r0-000000.parquet")
    assert {name: str(schema.field(name).type) for name in schema.names} == {
        "sample_id": "string",
        "request_id": "string",
        "completion": "int16",
        "num_prompt_tokens": "int32",
        "positions": "list<element: int32>",
        "token_ids": "list<element: int32>",
        "expert_ids": "list<element: fixed_size_binary[6]>",  # L*k uint8
        "gate_weights": "list<element: fixed_size_binary[12]>",  # L*k float16
        "router_mean": "fixed_size_list<element: fixed_size_list<element: float>[8]>[3]",
        "meta": "string",
    }
    assert schema.field("expert_ids").metadata == {b"dtype": b"uint8", b"shape": b"[3, 2]"}
    assert schema.field("gate_weights").metadata == {b"dtype": b"float16", b"shape": b"[3, 2]"}


def test_a_token_blob_is_its_little_endian_layer_by_k_array(tmp_path):
    record = make_record("a", 4, 1)
    write_trace(tmp_path / "t", [record])
    table = pq.read_table(tmp_path / "t" / "routing" / "run-r0-000000.parquet")
    blob = table["gate_weights"][0][2].as_py()  # token 2
    np.testing.assert_array_equal(np.frombuffer(blob, "<f2").reshape(L, K),
                                  record.gate_weights[2].astype(np.float16))


def assert_holds_the_format_1_samples(trace: Trace) -> None:
    """``trace`` reads the samples of tests/data/trace-v1 as its expected.json lists them."""
    expected = json.loads((DATA / "trace-v1.expected.json").read_text())
    for sample_id, values in expected.items():
        ids, weights = trace.topk(sample_id)
        assert ids.tolist() == values["expert_ids"]
        assert weights.tolist() == values["gate_weights"]
        assert trace.token_ids(sample_id).tolist() == values["token_ids"]
        np.testing.assert_array_equal(trace.router_mean(sample_id),
                                      np.float32(values["router_mean"]))


def test_format_1_traces_are_still_read():
    """tests/data/trace-v1 was written by moepath's format-1 writer (nested lists)."""
    trace = Trace.open(DATA / "trace-v1")
    assert trace.manifest.format_version == 1
    assert_holds_the_format_1_samples(trace)


def test_resuming_a_format_1_trace_writes_format_2(tmp_path):
    shutil.copytree(DATA / "trace-v1", tmp_path / "t")
    writer = TraceWriter.open(tmp_path / "t", resume=True)
    assert writer.resumed.format_version == store.FORMAT_VERSION == 2
    shard = store.write_routing_shard(tmp_path / "t", "run-r0-000001",
                                      [make_record("c", 4, 3)], L, K, E)
    writer.commit(routing=[shard])
    trace = Trace.open(tmp_path / "t")  # one shard of each layout
    assert_holds_the_format_1_samples(trace)
    np.testing.assert_array_equal(trace.topk("c")[0], make_record("c", 4, 3).expert_ids)


def test_expert_ids_widen_to_uint16_beyond_256_experts():
    assert store.expert_id_type(256) == pa.uint8()
    assert store.expert_id_type(257) == pa.uint16()


def test_manifest_golden_header(tmp_path):
    writer = write_trace(tmp_path / "t", [make_record("a", 4, 1)])
    on_disk = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert on_disk == writer.manifest.to_dict()
    assert Manifest.from_dict(on_disk) == writer.manifest
    assert on_disk["format"] == "moepath-trace" and on_disk["format_version"] == 2
    assert on_disk["shards"]["routing"][0]["file"] == "routing/run-r0-000000.parquet"
    assert on_disk["shards"]["routing"][0]["rows"] == 1
    assert on_disk["shards"]["routing"][0]["tokens"] == 4
    assert len(on_disk["shards"]["routing"][0]["sha256"]) == 64


def test_duckdb_reads_a_trace_without_moepath(tmp_path):
    """The DuckDB query of docs/trace-format.md: top-1 expert of layer 1, token by token."""
    records = [make_record("a", 4, 1), make_record("b", 7, 2)]
    write_trace(tmp_path / "t", records)
    k = K
    rows = duckdb.sql(f"""
        SELECT sample_id, pos, ('0x' || substr(hex(ids), 2 * (1 * {k} + 0) + 1, 2))::INT AS top1
        FROM (SELECT sample_id, unnest(positions) AS pos, unnest(expert_ids) AS ids
              FROM '{tmp_path}/t/routing/*.parquet')
        ORDER BY sample_id, pos""").fetchall()
    assert rows == [(r.sample_id, t, int(r.expert_ids[t, 1, 0]))
                    for r in records for t in range(len(r.positions))]


@pytest.mark.parametrize(("damage", "report"), [
    (lambda shard: shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789"),
     r"in '.*t' is corrupted \(sha256 differs from the manifest\)"),
    (lambda shard: shard.unlink(), "is missing from '.*t'"),
])
def test_a_damaged_shard_is_named_and_the_advice_works(tmp_path, damage, report):
    write_trace(tmp_path / "t", [make_record("a", 4, 1)])
    damage(tmp_path / "t" / "routing" / "run-r0-000000.parquet")
    message = (f"trace file 'routing/run-r0-000000.parquet' {report}; restore it from a copy, "
               r"or trace again with --force \(--resume keeps committed files")
    with pytest.raises(TraceFormatError, match=message):
        Trace.open(tmp_path / "t")
    with pytest.raises(TraceFormatError, match=message):
        TraceWriter.open(tmp_path / "t", resume=True)
    assert TraceWriter.open(tmp_path / "t", force=True).resumed is None


def test_trace_from_a_newer_format_version_is_refused(tmp_path):
    write_trace(tmp_path / "t", [make_record("a", 4, 1)])
    manifest = store.read_manifest(tmp_path / "t")
    manifest["format_version"] = 99
    store.write_manifest(tmp_path / "t", manifest)
    with pytest.raises(TraceFormatError, match="format version 99, newer than this moepath"):
        Trace.open(tmp_path / "t")


def test_existing_output_directory_needs_resume_or_force(tmp_path):
    write_trace(tmp_path / "t", [make_record("a", 4, 1)])
    with pytest.raises(TraceFormatError, match="pass --resume .* or --force"):
        TraceWriter.open(tmp_path / "t")
    assert TraceWriter.open(tmp_path / "t", force=True).resumed is None
    assert not any((tmp_path / "t").iterdir())


@pytest.mark.parametrize("layout", [
    {"notes.txt": b"mine"},
    {"samples/data.jsonl": b"{}"},  # a folder named like a trace's, holding other files
    {"manifest.json": b'{"name": "a web app"}', "routing/x.parquet": b""},
])
def test_force_refuses_to_delete_a_directory_that_is_not_a_trace(tmp_path, layout):
    for name, data in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=f"--force would delete '{tmp_path}', which is not a "
                                         f"moepath trace .*; pass a new or empty directory"):
        TraceWriter.open(tmp_path, force=True)
    assert all((tmp_path / name).read_bytes() == data for name, data in layout.items())


def begin_with(trace_dir, router_weights: store.RouterWeights) -> Manifest:
    return TraceWriter.open(trace_dir).begin(
        Manifest(model=ModelInfo(num_layers=L, num_experts=E, top_k=K)), router_weights)


def test_router_biases_are_stored_beside_the_matrices_and_old_files_have_none(tmp_path):
    weights = [np.full((E, 4), i, np.float32) for i in range(L)]
    biases = [np.arange(E, dtype=np.float32) + i for i in range(L)]
    begin_with(tmp_path / "b", store.RouterWeights(weights, biases))
    stored = store.read_router_tensors(tmp_path / "b")
    np.testing.assert_array_equal(np.stack(stored.biases), np.stack(biases))
    np.testing.assert_array_equal(np.stack(stored.weights), np.stack(weights))
    from safetensors.numpy import load_file

    assert sorted(load_file(tmp_path / "b" / store.ROUTER_WEIGHTS)) == [
        "bias.0", "bias.1", "bias.2", "layer.0", "layer.1", "layer.2"]
    begin_with(tmp_path / "w", store.RouterWeights(weights))  # as every trace before biases
    assert store.read_router_tensors(tmp_path / "w").biases is None
    assert len(Trace.open(tmp_path / "w").router_weights()) == L


def test_a_model_without_readable_routers_is_recorded_with_the_reason(tmp_path):
    why = "MoE block 'model.layers.0.mlp' has no single linear with 16 outputs"
    manifest = begin_with(tmp_path / "t", store.RouterWeights(None, unavailable=why))
    assert manifest.router_weights is None
    assert not (tmp_path / "t" / store.ROUTER_WEIGHTS).exists()
    on_disk = store.read_manifest(tmp_path / "t")
    assert (on_disk["router_weights"], on_disk["router_weights_unavailable"]) == (None, why)
    with pytest.raises(TraceFormatError, match="has no router weights: the traced model had "
                                               "none moepath could read \\(MoE block"):
        Trace.open(tmp_path / "t").router_weights()


def test_force_empties_a_trace_stopped_before_its_first_manifest(tmp_path):
    store.write_router_weights(tmp_path / "t", [np.zeros((E, 4), np.float32)])
    store.write_routing_shard(tmp_path / "t", "run-r0-000000", [make_record("a", 4, 1)], L, K, E)
    (tmp_path / "t" / ".tmp-1234-manifest.json").write_bytes(b"{")
    assert TraceWriter.open(tmp_path / "t", force=True).resumed is None
    assert not any((tmp_path / "t").iterdir())


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(InputError, match=f"output directory '{tmp_path / 'out'}' is a file"):
        TraceWriter.open(tmp_path / "out", force=True)


def test_resume_removes_uncommitted_shards_and_keeps_committed_ones(tmp_path):
    write_trace(tmp_path / "t", [make_record("a", 4, 1)])
    store.write_routing_shard(tmp_path / "t", "run-r0-000001", [make_record("b", 4, 2)], L, K, E)
    (tmp_path / "t" / "routing" / ".tmp-1234-half.parquet").write_bytes(b"partial")
    (tmp_path / "t" / ".tmp-5678-manifest.json").write_bytes(b"{partial")  # a cut commit
    manifest = TraceWriter.open(tmp_path / "t", resume=True).resumed
    assert [s.file for s in manifest.routing_shards] == ["routing/run-r0-000000.parquet"]
    assert sorted(p.name for p in (tmp_path / "t" / "routing").iterdir()) == [
        "run-r0-000000.parquet"]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "manifest.json", "router.safetensors", "routing"]


def test_a_shards_checksum_is_that_of_the_file_on_disk(tmp_path):
    info = store.write_routing_shard(tmp_path, "run-r0-000000", [make_record("a", 5, 1)], L, K, E)
    assert info.sha256 == store.file_sha256(tmp_path / info.file)
    assert info.rows == 1 and info.tokens == 5


def resident_pages(path: Path) -> int:
    """Pages of file ``path`` held in the kernel's page cache (mincore(2) of a mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
        start = ctypes.c_char.from_buffer(mapping)
        flags = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size),
                              flags)
        del start
        mapping.close()
    assert not failed, os.strerror(ctypes.get_errno())
    return sum(flag & 1 for flag in flags)


def filesystem_type(path: Path) -> str:
    """The type (ext4, tmpfs, ...) of the file system holding ``path``, from /proc/mounts."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    inside = [(point, kind) for point, kind in mounts
              if path.resolve().is_relative_to(point)]
    return max(inside, key=lambda mount: len(mount[0]))[1]


def test_a_written_shard_leaves_the_page_cache(tmp_path):
    """A trace is written once and read later: its pages are released once on disk."""
    if filesystem_type(tmp_path) == "tmpfs":
        pytest.skip("tmpfs keeps every file in the page cache")
    info = store.write_routing_shard(tmp_path, "run-r0-000000", [make_record("a", 2048, 1)],
                                     L, K, E)
    shard = tmp_path / info.file
    assert resident_pages(shard) == 0
    store.file_sha256(shard)  # reading the shard caches it: what the probe sees when not dropped
    assert resident_pages(shard) == -(-shard.stat().st_size // mmap.PAGESIZE)


def test_failed_write_leaves_no_file_under_the_final_name(tmp_path):
    def broken_writer(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.write_atomic(tmp_path / "routing" / "x.parquet", broken_writer)
    assert list((tmp_path / "routing").iterdir()) == []


def test_missing_trace_directory_message(tmp_path):
    with pytest.raises(TraceFormatError, match="does not exist; run `moepath trace` first"):
        Trace.open(tmp_path / "nope")


def test_per_token_router_distributions_round_trip_after_router_mean(tmp_path):
    """--store-probs: one float16 [L, E] blob per token, after router_mean in the schema."""
    record = make_record("a", 4, 1)
    probs = np.random.default_rng(3).dirichlet(np.ones(E), size=(4, L)).astype(np.float32)
    record.router_probs = probs
    write_trace(tmp_path / "t", [record])
    schema = pq.read_schema(tmp_path / "t" / "routing" / "run-r0-000000.parquet")
    assert schema.names[-3:] == ["router_mean", "router_probs", "meta"]
    assert str(schema.field("router_probs").type) == "list<element: fixed_size_binary[48]>"
    np.testing.assert_array_equal(Trace.open(tmp_path / "t").router_probs("a"),
                                  probs.astype(np.float16).astype(np.float32))


def test_a_trace_reads_only_the_columns_a_reader_asks_for_and_holds_two_shards(
        tmp_path, monkeypatch):
    """topk never loads router_probs (GBs per shard with --store-probs); a Trace keeps
    what it read of its two most recently used shards."""
    records = [make_record(sid, 4, seed) for seed, sid in enumerate("abc")]
    for record in records:
        record.router_probs = np.full((4, L, E), 1 / E, np.float32)
    writer = write_trace(tmp_path / "t", records[:1])
    for seq, record in enumerate(records[1:], 1):
        writer.commit(routing=[store.write_routing_shard(
            tmp_path / "t", f"run-r0-{seq:06d}", [record], L, K, E)])
    trace = Trace.open(tmp_path / "t")
    assert trace.sample_ids() == ["a", "b", "c"]  # the index: sample_id and completion
    reads, read_table = [], pq.read_table

    def spy(path, columns=None, **kwargs):
        reads.append((Path(path).stem[-6:], *(columns or ["every column"])))
        return read_table(path, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    for sid in "aabca":
        np.testing.assert_array_equal(trace.topk(sid)[0], records["abc".index(sid)].expert_ids)
    trace.token_ids("a")
    assert reads == [("000000", "expert_ids"), ("000000", "gate_weights"),
                     ("000001", "expert_ids"), ("000001", "gate_weights"),
                     ("000002", "expert_ids"), ("000002", "gate_weights"),  # shard 0 let go
                     ("000000", "expert_ids"), ("000000", "gate_weights"),
                     ("000000", "token_ids")]


# --- --store per-sample: per-layer summaries, no per-token routing --------------------------


def write_summary_trace(trace_dir, records) -> TraceWriter:
    """``records`` committed as a per-sample trace: their summaries, as a worker with
    ``store: per-sample`` writes them."""
    writer = TraceWriter.open(trace_dir)
    writer.begin(Manifest(model=ModelInfo(num_layers=L, num_experts=E, top_k=K,
                                          architecture="Toy"), store=store.PER_SAMPLE),
                 router_weights=[np.full((E, 4), i, np.float32) for i in range(L)])
    summaries = [store.RoutingSummary.of(r, E) for r in records]
    writer.commit(routing=[store.write_summary_shard(trace_dir, "run-r0-000000", summaries,
                                                     L, K, E)])
    return writer


def test_a_summary_is_the_prompts_topk_mean_and_histogram_of_its_record():
    record = make_record("a", 9, 2, prompt=6)  # 3 generated tokens are left out
    summary = store.RoutingSummary.of(record, E)
    assert (summary.num_tokens, summary.num_prompt_tokens) == (9, 6)
    # naive reference: token by token, layer by layer, of the float16 weights a trace stores
    weights = record.gate_weights.astype(np.float16).astype(np.float64)
    mean, counts = np.zeros((L, E)), np.zeros((L, E), np.int32)
    for t in range(6):
        for layer in range(L):
            for j in range(K):
                mean[layer, record.expert_ids[t, layer, j]] += weights[t, layer, j] / 6
                counts[layer, record.expert_ids[t, layer, j]] += 1
    np.testing.assert_allclose(summary.topk_mean, mean, rtol=1e-6)
    assert summary.topk_mean.dtype == np.float32
    np.testing.assert_array_equal(summary.topk_counts, counts)
    assert summary.topk_counts.sum() == 6 * L * K and summary.topk_counts.dtype == np.int32
    np.testing.assert_array_equal(summary.router_mean, record.router_mean)


def test_summaries_round_trip(tmp_path):
    records = [make_record("a", 5, 1), make_record("b", 9, 2, prompt=6)]
    write_summary_trace(tmp_path / "t", records)
    read = store.read_summary_shard(tmp_path / "t" / "routing" / "run-r0-000000.parquet", L, E)
    for summary, record in zip(read, records, strict=True):
        expected = store.RoutingSummary.of(record, E)
        assert (summary.sample_id, summary.request_id, summary.completion, summary.meta,
                summary.num_prompt_tokens, summary.num_tokens) == (
            expected.sample_id, expected.request_id, 0, expected.meta,
            expected.num_prompt_tokens, expected.num_tokens)
        for name in ("router_mean", "topk_mean", "topk_counts"):
            np.testing.assert_array_equal(getattr(summary, name), getattr(expected, name))
    trace = Trace.open(tmp_path / "t")
    assert (trace.store, trace.per_sample) == ("per-sample", True)
    assert trace.sample_ids() == ["a", "b"] and trace.num_prompt_tokens("b") == 6
    assert trace.num_tokens("b") == 9
    np.testing.assert_array_equal(trace.topk_counts("b"), read[1].topk_counts)
    np.testing.assert_array_equal(trace.router_mean("a"), records[0].router_mean)
    ids, means = trace.topk_means()
    assert ids == ["a", "b"]
    np.testing.assert_array_equal(means, np.stack([s.topk_mean for s in read]))
    assert trace.samples.to_dict("records") == [
        {"sample_id": "a", "domain": "math", "n": 1, "num_tokens": 5},
        {"sample_id": "b", "domain": "math", "n": 2, "num_tokens": 6}]
    assert trace.manifest.counts.tokens is None and trace.manifest.routing_shards[0].tokens == 14


def test_per_sample_shard_schema_is_the_documented_one(tmp_path):
    """Golden test of docs/trace-format.md, "Per-sample shards": no per-token column."""
    write_summary_trace(tmp_path / "t", [make_record("a", 4, 1)])
    schema = pq.read_schema(tmp_path / "t" / "routing" / "run-r0-000000.parquet")
    matrix = "fixed_size_list<element: fixed_size_list<element: {}>[8]>[3]"
    assert {name: str(schema.field(name).type) for name in schema.names} == {
        "sample_id": "string",
        "request_id": "string",
        "completion": "int16",
        "num_prompt_tokens": "int32",
        "num_tokens": "int32",
        "router_mean": matrix.format("float"),
        "topk_mean": matrix.format("float"),
        "topk_counts": matrix.format("int32"),
        "meta": "string",
    }
    on_disk = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert on_disk["store"] == "per-sample" and on_disk["format_version"] == 2
    assert Manifest.from_dict(on_disk).store_kind == "per-sample"
    del on_disk["store"]  # a trace written before --store: per-token
    assert Manifest.from_dict(on_disk).store_kind == "per-token"
    assert "store" not in Manifest.from_dict(on_disk).to_dict()


def test_a_store_kind_from_a_newer_moepath_is_refused(tmp_path):
    write_summary_trace(tmp_path / "t", [make_record("a", 4, 1)])
    manifest = store.read_manifest(tmp_path / "t")
    manifest["store"] = "per-layer"
    store.write_manifest(tmp_path / "t", manifest)
    with pytest.raises(TraceFormatError, match=r"keeps its routing as 'per-layer', a store this "
                                               r"moepath does not know .*; upgrade moepath"):
        Trace.open(tmp_path / "t")


def test_per_token_readers_refuse_a_per_sample_trace_naming_store_per_token(tmp_path):
    write_summary_trace(tmp_path / "t", [make_record("a", 4, 1)])
    trace = Trace.open(tmp_path / "t")
    for name, read in (("Trace.topk", trace.topk), ("Trace.positions", trace.positions),
                       ("Trace.token_ids", trace.token_ids),
                       ("Trace.router_probs", trace.router_probs)):
        with pytest.raises(TraceFormatError) as refused:
            read("a")
        assert str(refused.value) == (
            f"trace '{tmp_path / 't'}' was written with --store per-sample and keeps no "
            f"per-token routing, which {name} needs; trace the samples again with "
            f"--store per-token")


def test_summary_readers_refuse_a_per_token_trace(tmp_path):
    write_trace(tmp_path / "t", [make_record("a", 4, 1)])
    trace = Trace.open(tmp_path / "t")
    assert trace.store == "per-token" and trace.num_tokens("a") == 4
    for read in (lambda: trace.topk_mean("a"), lambda: trace.topk_counts("a"),
                 trace.iter_topk_means):
        with pytest.raises(TraceFormatError, match=r"keeps per-token routing; .* is stored "
                                                   r"only by --store per-sample"):
            read()

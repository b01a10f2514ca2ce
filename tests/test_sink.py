"""The worker's routing sink: shards of ``shard_tokens``, written in the background,
in order, with a bounded number of writes in flight."""

from __future__ import annotations

import threading

import pytest
from test_store import E, K, L, make_record

from moepath.patches import sink as sink_module
from moepath.patches.sink import RoutingSink
from moepath.tracer import store


def new_sink(trace_dir, shard_tokens: int) -> RoutingSink:
    return RoutingSink(str(trace_dir), "run", rank=0, shape=(L, K, E), shard_tokens=shard_tokens)


def test_records_become_shards_of_shard_tokens_each_read_back_in_order(tmp_path):
    sink = new_sink(tmp_path, shard_tokens=10)
    records = [make_record(f"s{i}", tokens=4, seed=i) for i in range(7)]
    for record in records:
        sink.add(record)
    shards = sink.flush()  # 28 tokens: shards at 12 and 12 tokens, then the 4 left
    sink.close()

    assert [s["file"] for s in shards] == [
        f"routing/run-r0-00000{i}.parquet" for i in range(3)]
    assert [s["tokens"] for s in shards] == [12, 12, 4]
    read = [r for s in shards
            for r in store.read_routing_shard(tmp_path / s["file"], L, K, E)]
    assert [r.sample_id for r in read] == [r.sample_id for r in records]
    assert all(s["sha256"] == store.file_sha256(tmp_path / s["file"]) for s in shards)


def test_a_writer_slower_than_the_engine_makes_add_wait_instead_of_queueing_records(
        tmp_path, monkeypatch):
    """With ``MAX_WRITES_IN_FLIGHT`` (2) shards written or queued, the add that fills
    a third waits until the oldest write is done: memory stays bounded."""
    disk_free = threading.Event()
    written = []
    real_write = store.write_routing_shard

    def slow_write(trace_dir, name, records, *shape):
        disk_free.wait()
        written.append(name)
        return real_write(trace_dir, name, records, *shape)

    monkeypatch.setattr(store, "write_routing_shard", slow_write)
    sink = new_sink(tmp_path, shard_tokens=4)
    for i in range(sink_module.MAX_WRITES_IN_FLIGHT):
        sink.add(make_record(f"s{i}", tokens=4, seed=i))  # each fills a shard
    third = threading.Thread(target=sink.add, args=(make_record("s2", tokens=4, seed=2),))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive() and written == []  # waiting for the disk

    disk_free.set()
    third.join(timeout=30)
    assert not third.is_alive()
    assert len(sink.flush()) == 3
    assert written == ["run-r0-000000", "run-r0-000001", "run-r0-000002"]
    sink.close()


def test_a_failed_write_is_raised_by_flush_not_by_the_add_that_waited_for_it(
        tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_routing_shard", full_disk)
    sink = new_sink(tmp_path, shard_tokens=4)
    for i in range(sink_module.MAX_WRITES_IN_FLIGHT + 2):
        sink.add(make_record(f"s{i}", tokens=4, seed=i))  # waits, does not raise
    with pytest.raises(OSError, match="No space left on device"):
        sink.flush()
    sink.close()

"""Server mode's manifest committer: commits what a flush found, and nothing when idle."""

from __future__ import annotations

import pytest

from moepath.patches.committer import ManifestCommitter
from moepath.patches.settings import CaptureSettings
from moepath.tracer import checkpoints, store
from moepath.tracer.manifest import ModelInfo


class ScriptedRecorder:
    """Stands in for the worker's StepRecorder: each flush returns the next report,
    the last one again once they run out (a recorder's error stays set)."""

    def __init__(self, *reports: dict):
        self.reports = list(reports)

    def flush(self, requests_done: bool = False) -> dict:
        report = self.reports.pop(0) if len(self.reports) > 1 else self.reports[0]
        return {"error": None, "requests_recorded": 0, "requests_recomputed": 0, **report}


def start_committer(model, trace_dir, recorder) -> ManifestCommitter:
    """A committer of ``model``'s trace whose periodic loop never fires in a test:
    the tests call ``commit()`` by hand."""
    shape = checkpoints.moe_shape(model)
    routing = ModelInfo(num_layers=shape.num_hidden_layers,
                        layer_ids=list(range(shape.num_hidden_layers)),
                        num_experts=shape.num_experts, top_k=shape.top_k, routing={})
    settings = CaptureSettings(dir=str(trace_dir), commit=True, flush_interval_s=3600)
    by_layer = checkpoints.router_weights(model, shape.num_experts)  # as served in float32
    weights = store.RouterWeights([by_layer[i] for i in routing.layer_ids])
    return ManifestCommitter(settings, recorder, routing, weights, str(model), "float32")


def manifest_stamp(trace_dir):
    stat = (trace_dir / store.MANIFEST).stat()
    return stat.st_ino, stat.st_mtime_ns


def test_idle_commits_leave_the_manifest_alone_and_new_shards_are_committed(toy_olmoe,
                                                                             tmp_path):
    shard = {"file": "routing/run-000001.parquet", "sha256": "ab" * 32, "rows": 3,
             "tokens": 40}
    recorder = ScriptedRecorder({"shards": []}, {"shards": [shard]}, {"shards": []})
    trace_dir = tmp_path / "trace"
    committer = start_committer(toy_olmoe, trace_dir, recorder)
    started = manifest_stamp(trace_dir)

    committer.commit()  # nothing finished: no rewrite
    assert manifest_stamp(trace_dir) == started

    committer.commit()  # one shard: committed
    manifest = store.read_manifest(trace_dir)
    assert manifest["shards"][store.ROUTING_DIR] == [shard]
    assert manifest["counts"] == {"routing_records": 3, "tokens": 40}
    assert manifest["status"] == "running"
    after_shard = manifest_stamp(trace_dir)

    committer.commit()  # idle again
    assert manifest_stamp(trace_dir) == after_shard

    committer.close()  # shutdown always commits, and completes the trace
    assert store.read_manifest(trace_dir)["status"] == "complete"


def test_a_capture_error_is_committed_once(toy_olmoe, tmp_path):
    failed = {"shards": [], "error": "routing shard write failed: disk full"}
    recorder = ScriptedRecorder(failed, failed)
    trace_dir = tmp_path / "trace"
    committer = start_committer(toy_olmoe, trace_dir, recorder)

    committer.commit()
    manifest = store.read_manifest(trace_dir)
    assert manifest["status"] == "failed"
    assert manifest["capture_error"] == "routing shard write failed: disk full"
    stamp = manifest_stamp(trace_dir)
    committer.commit()  # the same error again: already on disk
    assert manifest_stamp(trace_dir) == stamp
    committer.close()  # shutdown keeps the failure
    assert store.read_manifest(trace_dir)["status"] == "failed"


def test_a_restarted_server_clears_the_earlier_failure_and_completes(toy_olmoe, tmp_path):
    trace_dir = tmp_path / "trace"
    failed = {"shards": [], "error": "routing shard write failed: disk full"}
    start_committer(toy_olmoe, trace_dir, ScriptedRecorder(failed)).close()
    assert store.read_manifest(trace_dir)["status"] == "failed"

    committer = start_committer(toy_olmoe, trace_dir, ScriptedRecorder({"shards": []}))
    manifest = store.read_manifest(trace_dir)
    assert (manifest["status"], manifest["capture_error"]) == ("running", None)
    committer.close()
    manifest = store.read_manifest(trace_dir)
    assert (manifest["status"], manifest["capture_error"]) == ("complete", None)


@pytest.mark.parametrize(("parallel", "message"), [
    ({"data_parallel_size": 2}, "a data-parallel server is not traced: each rank's engine has "
                                "its own writing worker.*lacks the all_gatherv.*"
                                "--data-parallel-size 1.*moepath trace --part I/N"),
    ({"distributed_executor_backend": "ray"}, "Ray executor ends its workers with ray.kill.*"
                                              "--distributed-executor-backend mp"),
])
def test_servers_whose_trace_no_worker_could_finish_are_refused_before_any_commit(
        tmp_path, parallel, message):
    """Each data-parallel rank has its own writing worker, and Ray's executor never shuts its
    workers down: a served trace would be split or never complete, so the worker refuses at
    load."""
    from types import SimpleNamespace as NS

    from moepath.patches import _commit_from_worker
    from moepath.patches.inspection import UnsupportedModelError

    parallel = {"data_parallel_size": 1, "distributed_executor_backend": "mp", **parallel}
    worker = NS(vllm_config=NS(parallel_config=NS(**parallel)))
    settings = CaptureSettings(dir=str(tmp_path / "t"), commit=True)
    with pytest.raises(UnsupportedModelError, match=message):
        _commit_from_worker(worker, settings, capture=None, describe=None,
                            router_weights=None)
    assert not (tmp_path / "t").exists()


def test_a_server_restarted_with_another_checkpoint_does_not_append_to_the_trace(
        toy_olmoe, toy_factory, tmp_path):
    """Restarting a server on its trace directory appends to the trace, but only with the
    same checkpoint: another one's routing would mix with the first's."""
    from moepath.tracer.errors import InputError

    trace_dir = tmp_path / "trace"
    start_committer(toy_olmoe, trace_dir, ScriptedRecorder({"shards": []})).close()
    weights = (trace_dir / store.ROUTER_WEIGHTS).read_bytes()
    with pytest.raises(InputError, match="cannot append to the trace.*router weights differ"):
        start_committer(toy_factory("olmoe", seed=1), trace_dir, ScriptedRecorder({"shards": []}))
    assert (trace_dir / store.ROUTER_WEIGHTS).read_bytes() == weights
    start_committer(toy_olmoe, trace_dir, ScriptedRecorder({"shards": []})).close()
    assert store.read_manifest(trace_dir)["status"] == "complete"


def test_a_server_pointed_at_a_directory_that_is_not_a_trace_says_to_use_another(
        toy_olmoe, tmp_path):
    """A server has neither --resume nor --force: the refusal names the one fix it has."""
    from moepath.tracer.errors import TraceFormatError

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(TraceFormatError) as refused:
        start_committer(toy_olmoe, notes, ScriptedRecorder({"shards": []}))
    assert str(refused.value) == (
        f"output directory '{notes}' already exists; it holds no trace to append to "
        "(no manifest.json); trace into a new or empty directory")
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]

"""Tracing on a Ray cluster: a local cluster on 127.0.0.1 with two one-core engine actors
(``ray_cluster``) traces and compares exactly as one engine does, and loses no sample and
writes none twice when an actor is killed mid-run."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import TEST_MEMORY, write_jsonl
from test_cli_trace import assert_one_line_error, moepath
from test_compare import _trace_state

from moepath.patches.cluster import Cluster, parts_dir, parts_per_checkpoint
from moepath.patches.comparison import CompareProgress, compare_checkpoints
from moepath.patches.engine import trace_samples
from moepath.patches.options import ClusterOptions, EngineOptions, TraceOptions
from moepath.tracer import Trace, store
from moepath.tracer.compare import CompareOptions
from moepath.tracer.errors import ClusterError, InputError
from moepath.tracer.samples import read_samples

# the engine options of the `compared` fixture's `moepath compare` (its --enforce-eager,
# --gpu-memory-utilization and --max-model-len; --engine-core auto), shared by every test
# here so that the actors keep their engines from test to test
EAGER = EngineOptions(enforce_eager=True, gpu_memory_utilization=TEST_MEMORY, max_model_len=512,
                      engine_core="auto")


@pytest.fixture(scope="module", autouse=True)
def free_the_engines(ray_cluster):
    """The actors' engines hold memory the rest of the suite needs: stop them afterwards."""
    yield
    ray_cluster.stop_engines()


def assert_same_routing(a: Trace, b: Trace) -> None:
    """Every sample once in each, with identical routes, router means, token counts, NLL."""
    ids = a.sample_ids()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(b.sample_ids())
    for sid in ids:
        for x, y in zip(a.topk(sid), b.topk(sid), strict=True):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(a.router_mean(sid), b.router_mean(sid))
    rows_a, rows_b = (t.samples.set_index("sample_id").sort_index() for t in (a, b))
    pd.testing.assert_frame_equal(rows_a, rows_b)


@pytest.mark.parametrize(("checkpoints", "engines", "samples", "parts"), [
    (1, 2, 43, 2),  # one trace: a part per engine
    (3, 2, 43, 2),  # 6 tasks, 3 per engine
    (4, 2, 43, 1),  # whole checkpoints already share out evenly
    (50, 8, 100_000, 4),  # 200 tasks, 25 per engine
    (1, 8, 3, 3),  # never an empty part
])
def test_parts_per_checkpoint_give_every_engine_an_equal_share(checkpoints, engines, samples,
                                                                parts):
    assert parts_per_checkpoint(checkpoints, engines, samples) == parts
    assert checkpoints * parts % engines == 0 or parts == samples


@pytest.mark.parametrize(("options", "message"), [
    ({"engines": 0}, "--engines must be at least 1, not 0"),
    ({"cpus_per_engine": 0}, "--cpus-per-engine must be at least 1, not 0"),
    ({"address": ""}, "--ray takes local, auto or the HOST:PORT of a cluster's head"),
])
def test_cluster_options_are_validated_on_construction(options, message):
    with pytest.raises(InputError, match=re.escape(message)):
        ClusterOptions(**options)


def test_without_ray_installed_the_error_names_the_extra(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "text": "one"}])
    # `import ray` then fails as where it is not installed
    code = ("import sys; sys.modules['ray'] = None; from moepath.cli.main import main; "
            "sys.argv = sys.argv[1:]; main()")
    result = subprocess.run([sys.executable, "-c", code, "moepath", "trace", tmp_path,
                             "--samples", samples, "--out", tmp_path / "out", "--ray", "local"],
                            capture_output=True, text=True)
    assert_one_line_error(result, "--ray needs Ray, which is not installed; "
                                  "pip install 'moepath[ray]'")
    assert not (tmp_path / "out").exists()


@pytest.mark.vllm
def test_a_trace_over_two_actors_equals_the_trace_of_one_engine(
        ray_cluster, compared, toy_olmoe, samples_file, tmp_path):
    import ray

    calls = []
    summary = trace_samples(toy_olmoe, read_samples(samples_file), tmp_path / "trace", EAGER,
                            TraceOptions(batch_size=16),
                            on_start=lambda *a: calls.append(("start", a)),
                            on_progress=lambda *a: calls.append(("progress", a)),
                            cluster=ray_cluster)
    merged, one_engine = Trace.open(tmp_path / "trace"), Trace.open(
        compared[0] / "out" / "traces" / "step100")
    assert_same_routing(merged, one_engine)
    assert merged.manifest.counts == one_engine.manifest.counts
    assert [part.rsplit("/", 1)[-1] for part in merged.manifest.merged_from] == [
        "0-of-2", "1-of-2"]
    assert merged.manifest.input.part is None
    assert not parts_dir(tmp_path / "trace").exists()  # merged, then deleted
    # one progress count for the whole cluster
    assert calls[0] == ("start", (43, 0))
    assert calls[-1] == ("progress", (43, one_engine.manifest.counts.tokens))
    assert (summary.samples, summary.resumed_samples, summary.lost_engines) == (43, 0, 0)
    # each one-core actor runs on a core of its own
    cores = ray.get([actor.placement.remote() for actor in ray_cluster.actors])
    assert sorted(core for _, (core,) in cores) == [0, 1]


@pytest.mark.vllm
def test_compare_over_three_checkpoints_on_two_actors_equals_compare_on_one_engine(
        ray_cluster, compared, samples_file, tmp_path):
    root, _, _ = compared

    class Events(CompareProgress):
        def __init__(self):
            self.seen = []

        def checkpoint(self, event):
            self.seen.append((event.name, event.action, event.parts))

    progress = Events()
    result = compare_checkpoints(
        [root / "run"], samples_file, tmp_path / "out",
        CompareOptions(group_by="domain", scores=root / "scores.csv"), EAGER,
        progress=progress, cluster=ray_cluster)
    assert progress.seen == [(f"step{s}", "spread", 2) for s in (100, 200, 300)]
    assert [summary.samples for summary in result.traces] == [43, 43, 43]
    for name in ("step100", "step200", "step300"):
        assert_same_routing(Trace.open(tmp_path / "out" / "traces" / name),
                            Trace.open(root / "out" / "traces" / name))
    for table in ("metrics.parquet", "samples.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / table),
                                      pd.read_parquet(root / "out" / table))
    assert not list((tmp_path / "out" / "traces").glob("*.parts"))


@pytest.mark.vllm
def test_more_engines_than_the_cluster_holds_or_a_full_cluster_are_refused(
        ray_cluster, toy_olmoe, samples_file, tmp_path):
    import ray

    head = ray.get_runtime_context().gcs_address  # this session's cluster, on 127.0.0.1
    assert head.startswith("127.0.0.1:")
    result = moepath("trace", toy_olmoe, "--samples", samples_file, "--out", tmp_path / "out",
                     "--ray", head, "--engines", "3", "--cpus-per-engine", "1")
    assert_one_line_error(result, "3 engines of 1 CPU(s) need 3, more than the cluster's 2; "
                                  "pass --engines 2 or fewer")
    # the session's two actors hold both cores: another Cluster finds no room
    with Cluster(ClusterOptions(address=head, cpus_per_engine=1)) as full, pytest.raises(
            ClusterError, match=re.escape("the Ray cluster has no room for an engine: one "
                                          "needs 1 CPU(s), and 0 of its 2 are free")):
        trace_samples(toy_olmoe, read_samples(samples_file), tmp_path / "out", EAGER,
                      cluster=full)
    assert not (tmp_path / "out").exists()


@pytest.mark.vllm
def test_an_actor_killed_mid_run_leaves_every_sample_traced_exactly_once(
        ray_cluster, compared, toy_olmoe, samples_file, tmp_path):
    """Runs last here: it leaves one actor."""
    import ray

    out = tmp_path / "trace"
    first_part, killed = parts_dir(out) / "0-of-2", []

    def kill_the_first_engine_within_the_first_part(samples, tokens):
        # the first idle engine took the first task: part 0
        status, committed = _trace_state(first_part)
        if not killed and status == "running" and committed >= 2:
            killed.append(committed)
            ray.kill(ray_cluster.actors[0])

    summary = trace_samples(toy_olmoe, read_samples(samples_file), out, EAGER,
                            TraceOptions(batch_size=2),
                            on_progress=kill_the_first_engine_within_the_first_part,
                            cluster=ray_cluster)
    assert killed and killed[0] < 22, "the kill must land while part 0 (22 samples) runs"
    assert summary.lost_engines == 1 and len(ray_cluster.actors) == 1
    merged = Trace.open(out)
    assert_same_routing(merged, Trace.open(compared[0] / "out" / "traces" / "step100"))
    # part 0 was resumed, not started over: its shards come from two engine runs
    runs = {}
    for shard in merged.manifest.routing_shards:
        part, run = re.match(r"routing/(p\d)-([0-9a-f]+)-", shard.file).groups()
        runs.setdefault(part, set()).add(run)
    assert {part: len(ids) for part, ids in runs.items()} == {"p0": 2, "p1": 1}
    assert store.read_manifest(out)["status"] == "complete"

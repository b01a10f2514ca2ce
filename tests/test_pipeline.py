"""Pipeline parallelism: each stage records its own MoE layers, the last joins them per request."""

from __future__ import annotations

import signal
import socket
import time

import numpy as np
import pytest
import torch.multiprocessing as mp
from conftest import TEST_MEMORY

from moepath.patches.stages import PipelineStages, StageMismatch, join_stage_records
from moepath.tracer import Trace, store


def stage_record(layers: list[int], tokens: int = 5, request: str = "r1",
                 token_ids: np.ndarray | None = None) -> store.RoutingRecord:
    """The record one stage holds of a request: its ``layers``, expert id = layer id * 10 +
    token index, every gate weight = layer id + 0.5, prompt mean row = layer id."""
    position = np.arange(tokens, dtype=np.int32)
    ids = np.array([[[layer * 10 + t] * 2 for layer in layers] for t in range(tokens)])
    weights = np.array([[[layer + 0.5] * 2 for layer in layers] for _ in range(tokens)])
    return store.RoutingRecord(
        sample_id="a", request_id=request, completion=0, num_prompt_tokens=3,
        positions=position, token_ids=position + 7 if token_ids is None else token_ids,
        expert_ids=ids, gate_weights=weights.astype(np.float32),
        router_mean=np.array([[float(layer)] * 4 for layer in layers], dtype=np.float32))


def test_a_request_joined_across_stages_has_every_layer_in_layer_order():
    joined = join_stage_records([stage_record([0, 1]), stage_record([2]), stage_record([3])])
    assert joined.expert_ids.shape == (5, 4, 2)
    np.testing.assert_array_equal(joined.expert_ids[:, :, 0],
                                  [[layer * 10 + t for layer in range(4)] for t in range(5)])
    np.testing.assert_array_equal(joined.gate_weights[0, :, 0], [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_array_equal(joined.router_mean[:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(joined.positions, np.arange(5))
    assert joined.router_probs is None and joined.num_prompt_tokens == 3


def test_stages_that_recorded_other_tokens_are_not_joined():
    with pytest.raises(StageMismatch, match="request 'r1': pipeline stage 1 recorded other "
                                            "tokens than stage 0"):
        join_stage_records([stage_record([0]), stage_record([1], token_ids=np.zeros(5))])


# --- the exchange over a real two-process gloo group ------------------------------------------

class Group:
    """What PipelineStages uses of vLLM's pipeline GroupCoordinator, on a plain gloo group."""

    def __init__(self, rank: int):
        import torch.distributed as dist

        self.rank_in_group, self.world_size, self.ranks = rank, 2, [0, 1]
        self.cpu_group = dist.group.WORLD


# what stage 0 sends in each exchange: (its records' request ids, its capture error)
STAGE_0_SENDS = [(["r1", "r2"], None), ([], None), (["r3"], "RuntimeError: disk full"),
                 (["r4"], None)]


def exchange(rank: int, port: int, results) -> None:
    """Stage ``rank`` of two, recording layer ``rank``: exchanges as steps would, stage 1
    always with the records of the requests stage 0 names in ``STAGE_0_SENDS`` (or r2 where
    that names none); the collector keeps what each exchange gave it, or the error."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    stages = PipelineStages(Group(rank), [[0], [1]])
    outcomes = []
    for requests, error in STAGE_0_SENDS:
        if rank == 1:
            requests, error = requests or ["r2"], None
        try:
            joined = stages.join({r: stage_record([rank], request=r) for r in requests}, error)
            outcomes.append({r: record.expert_ids.shape for r, record in joined.items()})
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            outcomes.append(f"{type(exc).__name__}: {exc}")
    stages.wait_sent()
    if rank == 1:
        results.put(outcomes)
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_last_stage_joins_finished_requests_and_refuses_missing_parts_and_failed_stages():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=exchange, args=(rank, port, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    outcomes = results.get(timeout=120)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert outcomes == [
        {"r1": (5, 2, 2), "r2": (5, 2, 2)},  # both stages' layers
        "StageMismatch: request 'r2' finished on the last pipeline stage but stage 0 "
        "recorded no routing for it",
        "RuntimeError: pipeline stage 0 failed: RuntimeError: disk full",
        {"r4": (5, 2, 2)},  # the stages still exchange in step
    ]


# --- behind the `parallel` marker (`make test-parallel`; docs/parallel.md has the results): a
# compiled two-stage engine starts in about 80 s on 2 cores, more than the default suite affords

@pytest.mark.parallel
@pytest.mark.vllm
def test_two_pipeline_stages_write_one_trace_equal_to_one_stage(olmoe_trace, toy_olmoe,
                                                                hf_olmoe, tmp_path):
    """CPU, two stages on one core each (compiled: see the eager refusal in
    test_inspection.py): one routing shard per committed batch with all four MoE layers,
    equal to the one-stage trace of the same samples, bf16 near-ties aside."""
    from test_capture import agree_outside_near_ties

    from moepath.patches.engine import trace_samples
    from moepath.patches.options import EngineOptions, TraceOptions
    from moepath.tracer.samples import SampleReadOptions, read_samples

    source = Trace.open(olmoe_trace)
    samples = read_samples(source.manifest.input.path, SampleReadOptions(limit=10))
    trace_samples(toy_olmoe, samples, tmp_path / "pp2",
                  EngineOptions(pipeline_parallel_size=2, max_model_len=512,
                                gpu_memory_utilization=TEST_MEMORY), TraceOptions(batch_size=5))
    pp2 = Trace.open(tmp_path / "pp2")
    assert pp2.manifest.status == "complete"
    assert pp2.manifest.model.layer_ids == source.manifest.model.layer_ids == [0, 1, 2, 3]
    assert len(pp2.manifest.routing_shards) == 2  # one per batch, written by the last stage
    assert sorted(pp2.sample_ids()) == sorted(s.sample_id for s in samples.samples)
    overall, decided = [], []
    for sid in pp2.sample_ids():
        np.testing.assert_array_equal(pp2.token_ids(sid), source.token_ids(sid))
        rates = agree_outside_near_ties(hf_olmoe, pp2.token_ids(sid).tolist(),
                                        pp2.topk(sid)[0], source.topk(sid)[0])
        overall.append(rates[0])
        decided.append(rates[1])
    print(f"PP=2 vs PP=1 (bf16): top-k agreement {np.mean(overall):.4%} "
          f"({np.mean(decided):.4%} outside near-ties)")
    assert np.mean(decided) == 1.0


@pytest.mark.parallel
@pytest.mark.vllm
def test_two_float32_pipeline_stages_record_exactly_what_one_stage_records(toy_olmoe,
                                                                           samples_file,
                                                                           tmp_path):
    """float32, compiled, the same samples through one engine and through two stages:
    the same experts, gate weights and tokens bit for bit; prompt means to float32
    rounding (their per-step sums run on one core per stage instead of two)."""
    from moepath.patches.engine import trace_samples
    from moepath.patches.options import EngineOptions, TraceOptions
    from moepath.tracer.samples import SampleReadOptions, read_samples

    samples = read_samples(samples_file, SampleReadOptions(limit=12))
    traces = {}
    for stages in (1, 2):
        trace_samples(toy_olmoe, samples, tmp_path / f"pp{stages}",
                      EngineOptions(dtype="float32", pipeline_parallel_size=stages,
                                    max_model_len=512, gpu_memory_utilization=TEST_MEMORY,
                                    engine_core="auto"),
                      TraceOptions(batch_size=6, max_tokens=4))
        traces[stages] = Trace.open(tmp_path / f"pp{stages}")
    one, two = traces[1], traces[2]
    assert sorted(two.sample_ids()) == sorted(one.sample_ids())
    for sid in one.sample_ids():
        np.testing.assert_array_equal(two.token_ids(sid), one.token_ids(sid))
        for stored_two, stored_one in zip(two.topk(sid), one.topk(sid), strict=True):
            np.testing.assert_array_equal(stored_two, stored_one)
        np.testing.assert_allclose(two.router_mean(sid), one.router_mean(sid), rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parallel
@pytest.mark.vllm
def test_a_pipeline_parallel_server_commits_one_complete_trace_of_every_layer(toy_olmoe,
                                                                              hf_olmoe,
                                                                              tmp_path):
    """`vllm serve --pipeline-parallel-size 2` traced: records committed while serving, the
    trace complete after the stages' last exchange at shutdown, every layer, equal to HF
    float32."""
    from test_server import complete, serve

    from moepath.fixtures.hf_reference import hf_routing

    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, 500, size=int(rng.integers(8, 60))).tolist() for _ in range(6)]
    trace_dir = tmp_path / "trace"
    with serve(toy_olmoe, trace_dir, "--pipeline-parallel-size", "2",
               env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as (url, process):
        for i, prompt in enumerate(prompts):
            complete(url, str(toy_olmoe), prompt, {"moepath_id": f"q{i}"} if i % 3 else None,
                     max_tokens=3)
        time.sleep(3)  # > flush interval
        live = Trace.open(trace_dir)
        assert live.manifest.status == "running" and len(live.sample_ids()) >= 1
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    final = Trace.open(trace_dir)
    assert final.manifest.status == "complete"
    assert final.manifest.model.layer_ids == [0, 1, 2, 3]
    assert sorted(final.sample_ids()) == ["q1", "q2", "q4", "q5"]
    for i in (1, 2, 4, 5):
        tokens = final.token_ids(f"q{i}")
        assert len(tokens) == len(prompts[i]) + 2  # two generated tokens fed back
        reference = hf_routing(hf_olmoe, tokens.tolist())
        ids = final.topk(f"q{i}")[0]
        assert (np.sort(ids, -1) == np.sort(reference.expert_ids, -1)).all(-1).mean() >= 0.999

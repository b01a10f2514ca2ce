"""The step recorder without an engine: row mapping, stitching, preemption, gaps, failures."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from moepath.patches.recorder import (
    OutputLimit,
    RequestAccumulator,
    StepRecorder,
    _Chunk,
    step_layout,
)
from moepath.patches.routing_cache import RoutingCacheMiss
from moepath.patches.settings import CaptureSettings

L, K, E = 2, 2, 4
BLOCK = 4  # KV block size of the runners with prefix caching
# what StepRecorder reads of inspection.ModelRouting
ROUTING = SimpleNamespace(layers=[None] * L, top_k=K, num_experts=E,
                          config={"scoring_func": "softmax"})
LAYOUT = step_layout(L, K, E, store_probs=False)


def sampling_params(extra_args: dict, **kwargs):
    """vLLM SamplingParams of a request that stops only when the test ends it."""
    from vllm import SamplingParams

    return SamplingParams(**{"max_tokens": None, **kwargs}, extra_args=extra_args or None)


def chunk(start: int, stop: int, prompt_len: int, fill: int = 0) -> _Chunk:
    """Positions [start, stop) of one request, as the only rows of a step."""
    n = stop - start
    positions = np.arange(start, stop, dtype=np.int32)
    prompt_rows = int(np.count_nonzero(positions < prompt_len))
    rows = LAYOUT.empty(n)
    LAYOUT.view(rows, "positions")[:] = positions
    LAYOUT.view(rows, "token_ids")[:] = positions + 100
    LAYOUT.view(rows, "expert_ids")[:] = fill
    LAYOUT.view(rows, "gate_weights")[:] = 0.5
    return _Chunk(rows, 0, n, start, prompt_rows, np.full((L, E), 0.25 * prompt_rows))


def chunk_rows(chunk: _Chunk, name: str) -> np.ndarray:
    """One column of a chunk's rows."""
    return LAYOUT.view(chunk.rows[chunk.start:chunk.end], name)


def accumulator(prompt_len: int) -> RequestAccumulator:
    return RequestAccumulator(sample_id="a", request_id="0-abcdefgh", completion=0,
                              num_prompt_tokens=prompt_len, meta={"k": 1})


def test_packed_rows_keep_every_column_aligned_in_its_own_dtype():
    layout = step_layout(num_layers=3, top_k=2, num_experts=300, store_probs=True)
    rows = layout.empty(5)
    values = {"positions": np.arange(5, dtype=np.int32), "token_ids": np.arange(5) + 7,
              "expert_ids": np.arange(30).reshape(5, 3, 2) * 9,  # ids up to 261: uint16
              "gate_weights": np.linspace(0, 1, 30).reshape(5, 3, 2),
              "probs": np.full((5, 3, 300), 1 / 300)}
    for name, value in values.items():
        layout.view(rows, name)[:] = value
    joined = np.concatenate([rows[:2], rows[2:]])  # what finishing a request does
    for name, value in values.items():
        column = layout.view(joined, name)
        assert column.flags.aligned and column.shape == value.shape
        np.testing.assert_allclose(column, value, rtol=1e-3)
    assert layout.view(rows, "expert_ids").dtype == np.uint16
    assert layout.view(rows, "probs").dtype == np.float16
    assert layout.width == 4 + 4 + 3 * 2 * 2 + 3 * 300 * 2 + 3 * 2 * 2  # no padding needed


def test_chunks_of_a_long_prompt_and_decode_steps_are_stitched_by_position():
    acc = accumulator(prompt_len=6)
    for start, stop in ((0, 4), (4, 6), (6, 7), (7, 8)):  # 2 prefill chunks, 2 decode steps
        acc.add(chunk(start, stop, 6))
    record = acc.finish(LAYOUT)
    np.testing.assert_array_equal(record.positions, np.arange(8))
    np.testing.assert_array_equal(record.token_ids, np.arange(8) + 100)
    assert record.expert_ids.shape == (8, L, K)
    # the router mean averages prompt rows only: 6 rows of 0.25
    np.testing.assert_allclose(record.router_mean, np.full((L, E), 0.25))


def test_preemption_recompute_keeps_exactly_one_record_per_position_the_last():
    acc = accumulator(prompt_len=4)
    acc.add(chunk(0, 4, 4, fill=1))
    acc.add(chunk(4, 5, 4, fill=1))
    acc.add(chunk(0, 5, 4, fill=2))  # preempted, recomputed from scratch (prompt + output)
    acc.add(chunk(5, 6, 4, fill=2))
    record = acc.finish(LAYOUT)
    assert acc.recomputed
    np.testing.assert_array_equal(record.positions, np.arange(6))
    assert (record.expert_ids == 2).all()
    np.testing.assert_allclose(record.router_mean, np.full((L, E), 0.25))  # not double-counted


def test_a_request_whose_prompt_start_was_never_computed_is_an_error_not_a_silent_gap():
    acc = accumulator(prompt_len=8)
    acc.add(chunk(4, 8, 8))  # positions 0-3 came from a prefix cache
    with pytest.raises(RuntimeError, match="gaps in its routing .*prefix cache"):
        acc.finish(LAYOUT)


class BrokenSink:
    def flush(self):
        raise OSError(28, "No space left on device")


def test_a_failed_write_is_reported_by_flush_and_turns_capture_off():
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=BrokenSink())
    recorder.active["r1"] = accumulator(3)
    report = recorder.flush()
    assert report["error"] == "OSError: [Errno 28] No space left on device"
    assert recorder.active == {}
    assert recorder.flush()["error"] == report["error"]  # stays off, reported every time


class ListSink:
    """Keeps what the recorder hands over; writes nothing."""

    def __init__(self):
        self.records = []

    def add(self, record):
        self.records.append(record)

    def flush(self):
        return []


def test_the_drivers_flush_finishes_requests_vllm_has_not_yet_reported_finished():
    # vLLM names finished requests only in the next step's scheduler output, which an
    # in-process engine never runs after generate() returns.
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=sink)
    recorder.active["r1"] = accumulator(prompt_len=3)
    recorder.active["r1"].add(chunk(0, 3, 3))
    recorder.active["untraced"] = None

    recorder.flush()  # server mode's periodic flush: the request may still be running
    assert sink.records == [] and "r1" in recorder.active

    report = recorder.flush(requests_done=True)  # offline driver, between generate calls
    assert [r.sample_id for r in sink.records] == ["a"]
    np.testing.assert_array_equal(sink.records[0].positions, np.arange(3))
    assert report["requests_recorded"] == 1 and recorder.active == {}
    recorder.on_finished(["r1"])  # vLLM's late report changes nothing
    assert len(sink.records) == 1


@pytest.mark.parametrize(("bad", "where"), [
    ("weight", "at position 2"),  # NaN logits: every router's weights are NaN
    ("mean", "(its prompt mean)"),  # the scored distributions are checked, not only weights
])
def test_a_request_that_routed_with_nan_is_not_recorded_and_flush_names_sample_and_layer(
        caplog, bad, where):
    sink = ListSink()
    routing = SimpleNamespace(**{**vars(ROUTING), "layers": [SimpleNamespace(layer_id=1),
                                                             SimpleNamespace(layer_id=3)]})
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=routing, sink=sink)
    broken, fine = accumulator(prompt_len=4), accumulator(prompt_len=4)
    fine.sample_id = "b"
    broken.add(chunk(0, 4, 4))
    fine.add(chunk(0, 4, 4))
    if bad == "weight":
        LAYOUT.view(broken.chunks[0].rows, "gate_weights")[2:, 1] = np.nan
    else:
        broken.chunks[0].prompt_prob_sum[1, 0] = np.inf
    recorder.active.update({"r1": broken, "r2": fine})

    report = recorder.flush(requests_done=True)

    assert [r.sample_id for r in sink.records] == ["b"]  # the other request is kept
    [why] = report["rejected"]
    assert why.startswith(f"sample 'a': MoE layer 1 (model layer 3) routed with NaN or infinite "
                          f"gate weights or router scores {where}, from router logits that "
                          f"are not finite; its routing is not recorded.")
    assert why in caplog.text
    assert recorder.flush()["rejected"] == []  # reported once


class FakeRunner:
    """The V1 runner state ``after_forward`` reads: one step of 3 requests, b untraced.

    a: prompt of 5 tokens, rows 0-2 are its positions 2..4 (second prefill chunk);
    b: untraced, 2 rows; c: a decode step at position 7 (prompt of 7 tokens).
    """

    def __init__(self):
        from types import SimpleNamespace as NS

        import torch

        from moepath.patches.settings import REQUEST_ID_KEY

        self.input_batch = NS(num_reqs=3, req_ids=["a-00000000", "b-00000000", "c-00000000"])
        self.query_start_loc = NS(np=np.array([0, 3, 5, 6], np.int32))
        self.positions = torch.tensor([2, 3, 4, 0, 1, 7])
        self.input_ids = NS(gpu=torch.tensor([10, 11, 12, 20, 21, 30], dtype=torch.int32))

        def state(sample_id, prompt):
            extra = {REQUEST_ID_KEY: sample_id} if sample_id else {}
            return NS(sampling_params=sampling_params(extra), num_prompt_tokens=prompt)

        self.requests = {"a-00000000": state("A", 5), "b-00000000": state(None, 9),
                         "c-00000000": state("C", 7)}


def test_a_step_maps_rows_of_traced_requests_only_with_prompt_sums_per_request():
    import torch

    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(8, L, K, E, "cpu")
    generator = torch.Generator().manual_seed(0)
    hook.BUFFERS.expert_ids[:6] = torch.randint(0, E, (6, L, K), generator=generator)
    hook.BUFFERS.gate_weights[:6] = torch.rand((6, L, K), generator=generator)
    # the distributions the hook scored, layer-major [L, T, E]
    hook.BUFFERS.router_scores[:, :6] = torch.randn((L, 6, E), generator=generator).softmax(-1)
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=None)
    recorder.after_forward(FakeRunner(), total_tokens=6)

    assert recorder.active["b-00000000"] is None  # untraced: seen, never recorded
    a, c = recorder.active["a-00000000"].chunks[0], recorder.active["c-00000000"].chunks[0]
    buffers = hook.BUFFERS
    np.testing.assert_array_equal(chunk_rows(a, "positions"), [2, 3, 4])
    np.testing.assert_array_equal(chunk_rows(a, "token_ids"), [10, 11, 12])
    np.testing.assert_array_equal(chunk_rows(a, "expert_ids"), buffers.expert_ids[:3].numpy())
    assert chunk_rows(a, "expert_ids").dtype == np.uint8
    np.testing.assert_array_equal(chunk_rows(a, "gate_weights"),
                                  buffers.gate_weights[:3].numpy().astype(np.float16))
    assert a.prompt_rows == 3
    probs = buffers.router_scores[:, :3].double()  # a's three prompt rows
    np.testing.assert_allclose(a.prompt_prob_sum, probs.sum(1).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(chunk_rows(c, "positions"), [7])
    np.testing.assert_array_equal(chunk_rows(c, "token_ids"), [30])
    np.testing.assert_array_equal(chunk_rows(c, "expert_ids"), buffers.expert_ids[5:6].numpy())
    assert c.prompt_rows == 0 and c.prompt_prob_sum is None  # a generated token


class ScriptedRunner:
    """Runner state for steps given as {request id: positions computed this step}.

    Buffer row r of a step holds expert id ``10 * code + position + tag`` (code: the
    request's index in ``prompts``) and token id ``100 + position``. As under vLLM's
    async scheduling on CUDA, the token ids are in the device copy of ``input_ids``
    only; the host copy holds stale values (-1).

    With ``blocks`` ({request id: KV block ids}), the runner also has a KV cache of
    ``BLOCK``-token blocks (vLLM's slot mapping, block tables and token ids of each
    request), as a runner with prefix caching on has.
    """

    def __init__(self, prompts: dict[str, tuple[str | None, int]],
                 blocks: dict[str, list[int]] | None = None):
        from moepath.patches.settings import REQUEST_ID_KEY

        self.codes = {req_id: code for code, req_id in enumerate(prompts)}
        self.requests = {
            req_id: SimpleNamespace(
                sampling_params=sampling_params({REQUEST_ID_KEY: sample} if sample else {}),
                num_prompt_tokens=prompt, block_ids=((blocks or {}).get(req_id, []),),
                prompt_token_ids=list(range(100, 100 + prompt)), output_token_ids=[])
            for req_id, (sample, prompt) in prompts.items()}
        if blocks is not None:
            self.kv_cache_config = kv_cache_config(num_blocks=16)

    def step(self, recorder: StepRecorder, batch: dict[str, list[int]], tag: int = 0,
             scores_written: bool = True) -> None:
        import torch

        from moepath.patches import hook

        req_ids = list(batch)
        positions = [p for req_id in req_ids for p in batch[req_id]]
        codes = [self.codes[req_id] for req_id in req_ids for _ in batch[req_id]]
        slots = [self.requests[req_id].block_ids[0][p // BLOCK] * BLOCK + p % BLOCK
                 if self.requests[req_id].block_ids[0] else -1
                 for req_id in req_ids for p in batch[req_id]]
        table = SimpleNamespace(slot_mapping=SimpleNamespace(gpu=torch.tensor(slots)))
        self.input_batch = SimpleNamespace(num_reqs=len(req_ids), req_ids=req_ids + ["stale"],
                                           block_table=[table])
        for req_id in req_ids:  # tokens fed past the prompt are generated: 100 + position
            state = self.requests[req_id]
            last = max(batch[req_id]) + 1
            state.output_token_ids = list(range(100 + state.num_prompt_tokens, 100 + last))
        self.query_start_loc = SimpleNamespace(
            np=np.cumsum([0] + [len(batch[r]) for r in req_ids]).astype(np.int32))
        self.positions = torch.tensor(positions)
        token_ids = torch.tensor(positions, dtype=torch.int32) + 100
        self.input_ids = SimpleNamespace(gpu=token_ids, cpu=torch.full_like(token_ids, -1))
        ids = torch.tensor(positions) + 10 * torch.tensor(codes) + tag
        hook.BUFFERS.expert_ids[:len(positions)] = ids[:, None, None]
        recorder.after_forward(self, len(positions), scores_written)


def test_rows_follow_their_requests_while_the_batch_changes_between_decode_steps():
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=sink)
    runner = ScriptedRunner({"a": ("A", 3), "b": (None, 2), "c": ("C", 2), "d": ("D", 1)})
    runner.step(recorder, {"a": [0, 1, 2], "b": [0, 1], "c": [0, 1]})
    runner.step(recorder, {"a": [3], "b": [2], "c": [2]})
    runner.step(recorder, {"a": [4], "b": [3], "c": [3]})  # the same batch again
    recorder.on_finished(["c"])
    runner.step(recorder, {"a": [5], "b": [4]})
    recorder.on_finished(["b"])
    runner.step(recorder, {"a": [6], "d": [0]})  # a new request takes b's place
    recorder.flush(requests_done=True)

    records = {r.sample_id: r for r in sink.records}
    assert list(records) == ["C", "A", "D"]
    for sample, code, length in (("A", 0, 7), ("C", 2, 4)):  # code: a=0, c=2 in the runner
        record = records[sample]
        np.testing.assert_array_equal(record.positions, np.arange(length))
        np.testing.assert_array_equal(record.token_ids, np.arange(length) + 100)
        np.testing.assert_array_equal(record.expert_ids[:, 0, 0], np.arange(length) + 10 * code)
    np.testing.assert_array_equal(records["D"].expert_ids[:, 0, 0], [30])


def test_a_request_that_ends_before_its_prompt_is_computed_is_not_recorded(caplog):
    """A client that disconnects mid-prefill aborts its request; vLLM then reports it
    finished. Its rows cover part of the prompt, so it leaves no record."""
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=sink)
    runner = ScriptedRunner({"a": ("A", 6), "b": ("B", 2)})
    runner.step(recorder, {"a": [0, 1, 2], "b": [0, 1]})  # a's first prefill chunk
    recorder.on_finished(["a", "b"])  # a aborted before its second chunk
    report = recorder.flush()

    assert [record.sample_id for record in sink.records] == ["B"]
    assert report["requests_recorded"] == 1 and report["requests_incomplete"] == 1
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "moepath"] == [
        ("WARNING", "moepath: request 'a' (sample 'A') ended after 3 of its 6 prompt tokens "
                    "(aborted?); it is not recorded")]


def test_completions_of_an_n_2_request_tagged_through_vllm_xargs_get_their_index():
    """vLLM runs the n completions of a request as children ``<index>_<parent id>`` with
    n = 1 in their params; a server client's tag carries no ``moepath_n``, so the id's
    form gives the completion. ``tag`` records n, so an id that only looks like a
    child's (``3_x``) stays completion 0 when n is 1."""
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=sink)
    runner = ScriptedRunner({"0_cmpl-7-1a2b3c4d": ("q", 2), "1_cmpl-7-1a2b3c4d": ("q", 2),
                             "3_x-9z8y7x6w": ("own", 2)})
    runner.requests["3_x-9z8y7x6w"].sampling_params.extra_args["moepath_n"] = 1
    runner.step(recorder, {"0_cmpl-7-1a2b3c4d": [0, 1], "1_cmpl-7-1a2b3c4d": [0, 1],
                           "3_x-9z8y7x6w": [0, 1]})
    recorder.flush(requests_done=True)

    assert sorted((r.sample_id, r.completion) for r in sink.records) == [
        ("own", 0), ("q", 0), ("q", 1)]


def test_a_request_preempted_mid_decode_keeps_the_rows_of_its_recomputation():
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=sink)
    runner = ScriptedRunner({"a": ("A", 2), "b": ("B", 2)})
    runner.step(recorder, {"a": [0, 1], "b": [0, 1]})
    runner.step(recorder, {"a": [2], "b": [2]})
    runner.step(recorder, {"a": [3], "b": [3]})
    runner.step(recorder, {"b": [4]})  # a is preempted: its KV cache is freed
    runner.step(recorder, {"a": [0, 1, 2, 3], "b": [5]}, tag=100)  # a recomputes it all
    runner.step(recorder, {"a": [4], "b": [6]}, tag=100)
    recorder.flush(requests_done=True)

    a, b = sorted(sink.records, key=lambda record: record.sample_id)
    np.testing.assert_array_equal(a.positions, np.arange(5))
    np.testing.assert_array_equal(a.expert_ids[:, 0, 0], np.arange(5) + 100)  # the last rows
    np.testing.assert_array_equal(b.positions, np.arange(7))
    np.testing.assert_array_equal(b.expert_ids[:, 0, 0],
                                  np.arange(7) + 10 + [0, 0, 0, 0, 0, 100, 100])
    assert recorder.requests_recomputed == 1


def test_a_long_decode_run_hands_its_rows_over_in_bounded_pieces(monkeypatch):
    from moepath.patches import hook
    from moepath.patches import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "MAX_RUN_STEPS", 2)
    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=sink)
    runner = ScriptedRunner({"a": ("A", 1), "b": ("B", 1)})
    for position in range(6):  # a one-token prompt, then 5 generated tokens
        runner.step(recorder, {"a": [position], "b": [position]})
    assert len(recorder.active["a"].chunks) == 3  # the prompt, two runs of 2 (one pending)
    recorder.flush(requests_done=True)

    for record, code in zip(sorted(sink.records, key=lambda r: r.sample_id), (0, 1),
                            strict=True):
        np.testing.assert_array_equal(record.positions, np.arange(6))
        np.testing.assert_array_equal(record.token_ids, np.arange(6) + 100)
        np.testing.assert_array_equal(record.expert_ids[:, 0, 0], np.arange(6) + 10 * code)


def test_decode_runs_that_follow_each_other_keep_their_rows_though_they_share_storage():
    """Every decode run writes into the recorder's one reused array; a run's rows are
    copied out when it ends, so the next run cannot overwrite them."""
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=sink)
    runner = ScriptedRunner({"a": ("A", 1), "b": ("B", 1)})
    runner.step(recorder, {"a": [0], "b": [0]})  # one-token prompts
    runner.step(recorder, {"a": [1], "b": [1]})  # a run of two requests starts
    runner.step(recorder, {"a": [2]})  # b is paused: a run of one reuses the storage
    runner.step(recorder, {"a": [3]})
    runner.step(recorder, {"a": [4], "b": [2]})
    runner.step(recorder, {"b": [3], "a": [5]})  # the batch reordered: another run
    recorder.flush(requests_done=True)

    a, b = sorted(sink.records, key=lambda record: record.sample_id)
    np.testing.assert_array_equal(a.positions, np.arange(6))
    np.testing.assert_array_equal(a.expert_ids[:, 0, 0], np.arange(6))
    np.testing.assert_array_equal(b.positions, np.arange(4))
    np.testing.assert_array_equal(b.expert_ids[:, 0, 0], np.arange(4) + 10)
    np.testing.assert_array_equal(b.token_ids, np.arange(4) + 100)


def test_a_decode_step_whose_positions_do_not_continue_the_run_is_recorded_apart():
    """The run checks each step's positions after copying it; a step of the same
    requests that is not the run's next one ends the run and is mapped row by row."""
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=sink)
    runner = ScriptedRunner({"a": ("A", 1), "b": ("B", 1)})
    runner.step(recorder, {"a": [0], "b": [0]})
    runner.step(recorder, {"a": [1], "b": [1]})  # a run starts
    runner.step(recorder, {"a": [2], "b": [2]})
    runner.step(recorder, {"a": [0], "b": [3]}, tag=100)  # a recomputes from its start
    runner.step(recorder, {"a": [1], "b": [4]}, tag=100)
    recorder.flush(requests_done=True)

    a, b = sorted(sink.records, key=lambda record: record.sample_id)
    np.testing.assert_array_equal(a.positions, np.arange(2))
    np.testing.assert_array_equal(a.expert_ids[:, 0, 0], [100, 101])  # the last rows
    np.testing.assert_array_equal(b.positions, np.arange(5))
    np.testing.assert_array_equal(b.expert_ids[:, 0, 0], [10, 11, 12, 113, 114])
    assert recorder.requests_recomputed == 1


def scheduled(tokens: dict[str, int], new: dict[str, str | None] | None = None
              ) -> SimpleNamespace:
    """The part of vLLM's SchedulerOutput the recorder reads before a forward;
    ``new``: requests scheduled for the first time, with their sample tag or None."""
    from moepath.patches.settings import REQUEST_ID_KEY

    new_requests = [SimpleNamespace(req_id=req_id, sampling_params=SimpleNamespace(
        extra_args={REQUEST_ID_KEY: tag} if tag else {})) for req_id, tag in (new or {}).items()]
    return SimpleNamespace(num_scheduled_tokens=tokens, scheduled_new_reqs=new_requests,
                           total_num_scheduled_tokens=sum(tokens.values()))


@pytest.mark.parametrize("store_probs", [False, True])
def test_scoring_is_skipped_for_steps_that_continue_a_decode_run(store_probs):
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    recorder = StepRecorder(CaptureSettings(dir="x", store_probs=store_probs),
                            routing=ROUTING, sink=ListSink())
    runner = ScriptedRunner({"a": ("A", 2), "b": (None, 2), "c": ("C", 1)})
    assert recorder.wants_scores(scheduled({"a": 2, "b": 2}))  # prefill
    runner.step(recorder, {"a": [0, 1], "b": [0, 1]})
    assert recorder.wants_scores(scheduled({"a": 1, "b": 1}))  # no run yet
    runner.step(recorder, {"a": [2], "b": [2]})  # a run begins
    continues = recorder.wants_scores(scheduled({"a": 1, "b": 1}))
    assert continues == store_probs  # --store-probs scores every row
    assert recorder.wants_scores(scheduled({"a": 1, "b": 1, "c": 1}))  # c's prompt
    assert recorder.wants_scores(scheduled({"a": 1}))  # b left: the batch changes
    assert recorder.wants_scores(scheduled({"a": 1, "b": 3}))  # b recomputes


@pytest.mark.parametrize("store_probs", [False, True])
def test_steps_without_a_traced_request_skip_scoring_and_record_nothing(store_probs):
    """An engine serving untraced requests beside traced ones pays no scoring for them."""
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x", store_probs=store_probs),
                            routing=ROUTING, sink=sink)
    runner = ScriptedRunner({"a": ("A", 2), "b": (None, 2), "c": (None, 1), "d": ("D", 1)})
    assert not recorder.wants_scores(scheduled({"b": 2}, new={"b": None}))
    runner.step(recorder, {"b": [0, 1]}, scores_written=False)
    assert not recorder.wants_scores(scheduled({"b": 1, "c": 1}, new={"c": None}))
    runner.step(recorder, {"b": [2], "c": [0]}, scores_written=False)
    assert recorder.wants_scores(scheduled({"b": 1, "a": 2}, new={"a": "A"}))  # a is tagged
    assert recorder.wants_scores(scheduled({"b": 1, "d": 1}))  # d unseen: counted as traced
    recorder.flush(requests_done=True)
    assert sink.records == []
    everything = StepRecorder(CaptureSettings(dir="x", trace_all=True), routing=ROUTING,
                              sink=ListSink())
    assert everything.wants_scores(scheduled({"b": 2}, new={"b": None}))


def test_a_traced_step_whose_scoring_was_skipped_under_store_probs_is_an_error():
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    recorder = StepRecorder(CaptureSettings(dir="x", store_probs=True), routing=ROUTING,
                            sink=ListSink())
    with pytest.raises(RuntimeError, match="predicted to have no traced request had traced"):
        ScriptedRunner({"a": ("A", 2)}).step(recorder, {"a": [0, 1]}, scores_written=False)


def test_a_step_with_prompt_rows_whose_scoring_was_skipped_is_an_error_not_a_wrong_mean():
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=ListSink())
    runner = ScriptedRunner({"a": ("A", 2)})
    runner.step(recorder, {"a": [0, 1]})
    runner.step(recorder, {"a": [2]})
    runner.step(recorder, {"a": [3]}, scores_written=False)  # decode: nothing to score
    with pytest.raises(RuntimeError, match="predicted to be decode-only had prompt tokens"):
        runner.step(recorder, {"a": [0, 1, 2, 3, 4]}, scores_written=False)


def test_store_probs_keeps_every_traced_tokens_distribution_copied_in_blocks(monkeypatch):
    """--store-probs: each traced token's full router distribution (float16), prompt
    and generated, whatever rows of untraced requests sit between and however the
    copy's blocks cut the step."""
    import torch

    from moepath.patches import hook
    from moepath.patches import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "PROBS_BLOCK_ROWS", 2)
    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    generator = torch.Generator().manual_seed(2)
    sink = ListSink()
    recorder = StepRecorder(CaptureSettings(dir="x", store_probs=True), routing=ROUTING,
                            sink=sink)
    runner = ScriptedRunner({"a": ("A", 3), "b": (None, 2), "c": ("C", 2)})
    expected = {"a": [], "c": []}
    for batch in ({"a": [0, 1, 2], "b": [0, 1], "c": [0, 1]},  # prefill; b is untraced
                  {"a": [3], "b": [2], "c": [2]}, {"a": [4], "b": [3], "c": [3]}):
        scores = torch.randn((16, L, E), generator=generator).softmax(-1)
        hook.BUFFERS.router_scores.copy_(scores.transpose(0, 1))  # as the hook scored them
        row = 0
        for req_id, positions in batch.items():
            if req_id in expected:
                expected[req_id].append(scores[row:row + len(positions)])
            row += len(positions)
        runner.step(recorder, batch)
    recorder.flush(requests_done=True)

    for record, req_id in zip(sorted(sink.records, key=lambda r: r.sample_id), ("a", "c"),
                              strict=True):
        want = torch.cat(expected[req_id]).numpy()
        assert record.router_probs.dtype == np.float16
        np.testing.assert_allclose(record.router_probs, want, rtol=1e-3, atol=1e-4)
        prompt = want[:record.num_prompt_tokens].mean(0)
        np.testing.assert_allclose(record.router_mean, prompt, rtol=1e-5)


def test_prompt_sums_equal_a_per_request_reference():
    """Requests with and without prompt rows, untraced rows between them: each sum is
    the distribution summed over its own prompt rows, nothing of its generated rows
    (recomputed after preemption) or of its neighbours'."""
    import torch

    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(32, L, K, E, "cpu")
    hook.BUFFERS.router_scores.copy_(
        torch.randn((L, 32, E), generator=torch.Generator().manual_seed(1)).softmax(-1))
    # traced requests' buffer rows; rows 0 and 14-19 are an untraced request's
    starts = np.array([1, 4, 12, 13, 20])
    prompt_rows = np.array([0, 5, 1, 0, 7])  # of 3, 8, 1, 1 and 12 rows
    sums = StepRecorder._prompt_sums(starts, prompt_rows)

    assert sorted(sums) == [1, 2, 4]  # requests 0 and 3 have no prompt rows this step
    scores = hook.BUFFERS.router_scores.double()
    for j, start in [(1, 4), (2, 12), (4, 20)]:
        want = sum(scores[:, row] for row in range(start, start + prompt_rows[j]))
        assert sums[j].dtype == np.float64
        np.testing.assert_allclose(sums[j], want.numpy(), rtol=1e-6)


def kv_cache_config(num_blocks: int):
    """A vLLM KV cache config of one full-attention group of ``BLOCK``-token blocks."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=64,
                             dtype=torch.float32)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])


def cached_recorder(sink) -> StepRecorder:
    """A recorder of an engine with prefix caching on, every token scored 1/E."""
    from moepath.patches import hook

    hook.BUFFERS = hook.CaptureBuffers.allocate(16, L, K, E, "cpu")
    hook.BUFFERS.router_scores.fill_(1 / E)
    return StepRecorder(CaptureSettings(dir="x"), routing=ROUTING, sink=sink,
                        prefix_caching=True)


def test_a_prefix_cache_hit_replays_the_rows_another_request_computed_the_blocks_with():
    sink = ListSink()
    recorder = cached_recorder(sink)
    # u (untraced) computes 10 prompt tokens in blocks 3, 5, 7; t shares its first 8
    # tokens: vLLM serves them from blocks 3 and 5 and computes t's positions 8-9
    runner = ScriptedRunner({"u": (None, 10), "t": ("T", 10)},
                            blocks={"u": [3, 5, 7], "t": [3, 5, 9]})
    runner.step(recorder, {"u": list(range(10))})
    runner.step(recorder, {"t": [8, 9]})
    recorder.flush(requests_done=True)

    [record] = sink.records
    np.testing.assert_array_equal(record.positions, np.arange(10))
    np.testing.assert_array_equal(record.token_ids, np.arange(10) + 100)
    # u is code 0, t code 1: rows 0-7 are u's, as computed; 8-9 t's own
    np.testing.assert_array_equal(record.expert_ids[:, 0, 0], list(range(8)) + [18, 19])
    np.testing.assert_allclose(record.router_mean, np.full((L, E), 1 / E), rtol=1e-6)
    assert recorder.tokens_replayed == 8 and recorder.requests_recomputed == 0


def test_a_request_resumed_past_its_prompt_keeps_its_rows_and_takes_the_rest_from_the_cache():
    """Preempted while decoding, a request resumes where vLLM finds its tokens cached:
    here at 8, in blocks a twin request computed further than it had."""
    sink = ListSink()
    recorder = cached_recorder(sink)
    runner = ScriptedRunner({"a": ("A", 4), "twin": (None, 4)},
                            blocks={"a": [0, 1], "twin": [4, 5, 6]})
    runner.step(recorder, {"a": [0, 1, 2, 3], "twin": [0, 1, 2, 3]})
    for position in (4, 5, 6):
        runner.step(recorder, {"a": [position], "twin": [position]})
    runner.step(recorder, {"twin": [7]})  # a is preempted, its blocks freed
    runner.step(recorder, {"twin": [8]})
    runner.requests["a"].block_ids = ([4, 5, 10],)  # resumed: 8 tokens from twin's blocks
    runner.step(recorder, {"a": [8]}, tag=100)
    recorder.flush(requests_done=True)

    [record] = sink.records
    np.testing.assert_array_equal(record.positions, np.arange(9))
    # its own rows 0-6, twin's (code 1) at 7, its recomputed step at 8
    np.testing.assert_array_equal(record.expert_ids[:, 0, 0], list(range(7)) + [17, 108])
    np.testing.assert_allclose(record.router_mean, np.full((L, E), 1 / E), rtol=1e-6)
    assert recorder.tokens_replayed == 1 and recorder.requests_recomputed == 1


def test_a_hit_on_blocks_whose_routing_was_not_recorded_fails_naming_the_request():
    recorder = cached_recorder(ListSink())
    runner = ScriptedRunner({"t": ("T", 10)}, blocks={"t": [3, 5, 9]})  # 3, 5 never computed
    with pytest.raises(RoutingCacheMiss, match=r"request 'T' \(t\): the prefix cache served "
                                               "position 0 from KV block 3"):
        runner.step(recorder, {"t": [8, 9]})


@pytest.mark.parametrize(("params", "end"), [
    ({}, 9),  # nothing stops it: every row
    ({"max_tokens": 3}, 6),  # 3 outputs: 2 fed back, at positions 4 and 5
    ({"stop_token_ids": [106]}, 6),  # 106 fed at 6 was its last output
    ({"stop_token_ids": [103]}, 9),  # a prompt token stops nothing
    ({"eos": 107}, 7),
    ({"eos": 107, "ignore_eos": True}, 9),
])
def test_a_request_ends_where_its_final_output_token_would_be_fed(params, end):
    """Rows 0-8 feed tokens 100-108; the prompt is 4 tokens: outputs are fed from 4 on."""
    eos = params.pop("eos", None)
    request = sampling_params({}, **params)
    request.update_from_generation_config({}, eos_token_id=eos)  # as vLLM's front end does
    assert OutputLimit.of(request).end(4, np.arange(100, 109)) == end

"""Per-request capture state without an engine: stitching, preemption, gaps, failures."""

from __future__ import annotations

import numpy as np
import pytest

from moepath.patches.capture import RequestAccumulator, StepRecorder, _Chunk
from moepath.patches.settings import CaptureSettings

L, K, E = 2, 2, 4


def chunk(start: int, stop: int, prompt_len: int, fill: int = 0) -> _Chunk:
    n = stop - start
    positions = np.arange(start, stop)
    prompt_rows = int(np.count_nonzero(positions < prompt_len))
    return _Chunk(positions=positions, token_ids=positions.astype(np.int32) + 100,
                  expert_ids=np.full((n, L, K), fill, np.int32),
                  gate_weights=np.full((n, L, K), 0.5, np.float32),
                  prompt_prob_sum=np.full((L, E), 0.25 * prompt_rows), prompt_rows=prompt_rows,
                  probs=None)


def accumulator(prompt_len: int) -> RequestAccumulator:
    return RequestAccumulator(sample_id="a", request_id="0-abcdefgh", completion=0,
                              num_prompt_tokens=prompt_len, meta={"k": 1})


def test_chunks_of_a_long_prompt_and_decode_steps_are_stitched_by_position():
    acc = accumulator(prompt_len=6)
    for start, stop in ((0, 4), (4, 6), (6, 7), (7, 8)):  # 2 prefill chunks, 2 decode steps
        acc.add(chunk(start, stop, 6))
    record = acc.finish()
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
    record = acc.finish()
    assert acc.recomputed
    np.testing.assert_array_equal(record.positions, np.arange(6))
    assert (record.expert_ids == 2).all()
    np.testing.assert_allclose(record.router_mean, np.full((L, E), 0.25))  # not double-counted


def test_a_request_whose_prompt_start_was_never_computed_is_an_error_not_a_silent_gap():
    acc = accumulator(prompt_len=8)
    acc.add(chunk(4, 8, 8))  # positions 0-3 came from a prefix cache
    with pytest.raises(RuntimeError, match="gaps in its routing .*prefix cache"):
        acc.finish()


class BrokenSink:
    def flush(self):
        raise OSError(28, "No space left on device")


def test_a_failed_write_is_reported_by_flush_and_turns_capture_off():
    recorder = StepRecorder(CaptureSettings(dir="x"), routing=None, sink=BrokenSink())
    recorder.active["r1"] = accumulator(3)
    report = recorder.flush()
    assert report["error"] == "OSError: [Errno 28] No space left on device"
    assert recorder.active == {}
    assert recorder.flush()["error"] == report["error"]  # stays off, reported every time


def test_capture_settings_are_validated_where_the_engine_reads_them():
    with pytest.raises(ValueError, match="needs 'dir'"):
        CaptureSettings.parse({"trace_all": True})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dirr'\]"):
        CaptureSettings.parse({"dirr": "x"})
    settings = CaptureSettings.parse({"dir": "x"})
    assert len(settings.run) == 8 and settings.shard_tokens == 262_144

"""TracedEngine without an engine: who owns the shards that flush() and switches return.

A fake ``vllm.LLM`` answers ``collective_rpc`` as moepath's workers do, so these
tests run in seconds.
"""

from __future__ import annotations

import pytest

from moepath.patches.engine import TracedEngine
from moepath.tracer.errors import CaptureError
from moepath.tracer.store import ShardInfo

SHARD = {"file": "routing/run-r0-000000.parquet", "sha256": "ab" * 32, "rows": 2, "tokens": 9}


class FakeLLM:
    """Stands in for ``vllm.LLM``: records the worker calls; ``pending`` holds the shard
    dicts the worker writes at its next flush."""

    def __init__(self, **kwargs):
        self.calls: list[str] = []
        self.pending: list[dict] = []

    def collective_rpc(self, method: str, kwargs: dict | None = None) -> list:
        self.calls.append(method)
        if method == "moepath_describe":
            return [{"reload_blocker": None}]
        if method == "moepath_flush":
            shards, self.pending = self.pending, []
            return [{"shards": shards, "error": None, "requests_recomputed": 0}]
        return [None]

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")


def test_flush_is_refused_when_the_worker_commits_its_own_trace(tmp_path):
    engine = TracedEngine("ckpt-a", tmp_path / "a")  # commit=True: the worker commits
    engine.llm.pending = [SHARD]
    with pytest.raises(CaptureError, match=r"commits its own trace directory \(commit=True\); "
                                           r"start it with commit=False to flush and commit"):
        engine.flush()
    assert engine.llm.pending == [SHARD]  # still the committer's to commit
    with pytest.raises(CaptureError, match="start it with commit=False to switch directories"):
        engine.retarget(tmp_path / "b")


def test_switching_checkpoints_returns_the_shards_flushed_into_the_previous_directory(tmp_path):
    engine = TracedEngine("ckpt-a", tmp_path / "a", commit=False)
    engine.llm.pending = [SHARD]  # a generate call the caller did not flush
    shards = engine.switch_checkpoint("ckpt-b", tmp_path / "b")
    assert shards == [ShardInfo(**SHARD)]  # to commit in tmp_path / "a"
    assert engine.llm.calls == ["moepath_describe", "moepath_flush", "moepath_switch",
                                "reset_prefix_cache"]
    assert engine.settings.dir == str(tmp_path / "b") and str(engine.model) == "ckpt-b"
    # a caller that flushed after its last generate gets nothing back
    assert engine.retarget(tmp_path / "c") == []
    assert engine.settings.dir == str(tmp_path / "c")

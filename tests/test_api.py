"""The Python API: trace from your own vLLM program with `TracedEngine` and `tag`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_MEMORY

from moepath.patches.engine import TracedEngine, tag
from moepath.patches.options import EngineOptions
from moepath.tracer import Trace

pytestmark = pytest.mark.vllm


class StopHere(Exception):
    pass


def test_generate_logprobs_n_sampling_and_untagged_requests(toy_olmoe, tmp_path):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=[5, 17, 42, 99, 7, 3])
    options = EngineOptions(enforce_eager=True, max_model_len=256,
                            gpu_memory_utilization=TEST_MEMORY)
    # an exception in the block still leaves a complete trace
    with pytest.raises(StopHere), TracedEngine(toy_olmoe, tmp_path / "t", options) as engine:
        engine.llm.generate([prompt] * 4, [
            tag(SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), "gen",
                {"task": "chat", "split": "dev"}),
            tag(SamplingParams(max_tokens=1, prompt_logprobs=0), "score", {"task": "mc"}),
            tag(SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=1,
                               ignore_eos=True), "pair", {"task": "sample"}),
            SamplingParams(max_tokens=3),  # untagged: runs as usual, not recorded
        ], use_tqdm=False)
        raise StopHere
    trace = Trace.open(tmp_path / "t")
    assert trace.manifest.status == "complete"
    # the worker describes the model as it does to a driver (moepath trace)
    assert trace.manifest.model.dtype == "bfloat16"
    assert trace.manifest.model.writer is True
    assert "reload_blocker" in trace.manifest.to_dict()["model"]
    assert sorted(trace.sample_ids()) == ["gen", "pair", "score"]
    # generate: 6 prompt tokens, then the 4 generated tokens that were fed back
    np.testing.assert_array_equal(trace.positions("gen"), np.arange(10))
    assert trace.num_prompt_tokens("gen") == 6
    # prompt_logprobs scoring: every prompt token, the last one included
    np.testing.assert_array_equal(trace.positions("score"), np.arange(6))
    # n=2: each completion's generated tokens under its own completion index
    first, second = trace.token_ids("pair", 0), trace.token_ids("pair", 1)
    np.testing.assert_array_equal(first[:6], second[:6])
    assert len(first) == len(second) == 9
    samples = trace.samples.set_index("sample_id")
    assert samples.loc["gen", "task"] == "chat" and samples.loc["gen", "split"] == "dev"
    assert samples.loc["score", "task"] == "mc"

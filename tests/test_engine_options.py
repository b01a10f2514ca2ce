"""Engine options without an engine: where vLLM's engine core runs, and bad values."""

from __future__ import annotations

import pytest
from test_cli_trace import assert_one_line_error, moepath

from moepath.patches.engine import max_prompt_len
from moepath.patches.options import EngineOptions, TraceOptions
from moepath.tracer.errors import InputError


@pytest.fixture
def vllm_env_unset(monkeypatch):
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(name, raising=False)


def test_auto_runs_the_engine_core_inline_on_a_cpu_host_with_one_worker(vllm_env_unset):
    assert EngineOptions(engine_core="auto").engine_core_inline()
    # tensor parallelism needs vLLM's worker processes and their thread binding
    assert not EngineOptions(engine_core="auto", tensor_parallel_size=2).engine_core_inline()
    assert not EngineOptions(engine_core="auto", pipeline_parallel_size=2).engine_core_inline()
    # explicit choices are taken as given; the Python API keeps vLLM's default
    assert EngineOptions(engine_core="inline").engine_core_inline()
    assert not EngineOptions(engine_core="process").engine_core_inline()
    assert not EngineOptions().engine_core_inline()


@pytest.mark.parametrize("variable, value", [("VLLM_ENABLE_V1_MULTIPROCESSING", "1"),
                                             ("VLLM_CPU_OMP_THREADS_BIND", "0")])
def test_auto_leaves_the_layout_to_vllm_when_the_user_configured_it(vllm_env_unset, monkeypatch,
                                                                    variable, value):
    monkeypatch.setenv(variable, value)  # e.g. one engine per core for `trace --part`
    assert not EngineOptions(engine_core="auto").engine_core_inline()


def test_an_unknown_engine_core_is_refused_with_the_choices():
    with pytest.raises(InputError, match="must be one of process, inline, auto, not 'thread'"):
        EngineOptions(engine_core="thread")


def test_each_worker_of_two_stages_with_two_ranks_gets_its_own_core(monkeypatch):
    """vLLM's automatic binding asserts on a one-NUMA-node host; moepath lists a core per
    worker (tensor-parallel rank of each pipeline stage), in vLLM's [PP, TP] rank order."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")  # so that teardown unsets what it sets
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    EngineOptions(tensor_parallel_size=2, pipeline_parallel_size=2).prepare_environment()
    import os

    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1|2|3"


def test_the_ray_executor_is_refused_on_a_cpu_host_with_vllm_s_reason():
    """vLLM 0.32's CPU platform has no Ray device key, so its Ray executor raises at engine
    start ("current platform cpu does not support ray"): refused before any engine starts."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("vLLM runs its Ray executor on GPU hosts")
    with pytest.raises(InputError, match=r"ray: vLLM 0.32 runs its Ray executor only on GPUs "
                                         r".*use the default \(mp\) executor"):
        EngineOptions(distributed_executor_backend="ray")
    with pytest.raises(InputError, match="must be one of mp, ray, not 'slurm'"):
        EngineOptions(distributed_executor_backend="slurm")


def test_cli_names_the_bad_engine_core_value(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"id": "a", "text": "one"}\n')
    result = moepath("trace", tmp_path, "--samples", samples, "--out", tmp_path / "o",
                     "--engine-core", "thread")
    assert_one_line_error(result, "--engine-core) must be one of process, inline, auto, "
                                  "not 'thread'")
    assert not (tmp_path / "o").exists()



def test_traced_engines_turn_async_scheduling_off_and_their_untraced_twins_keep_vllm_s_default():
    """vLLM's async scheduling (its default on CUDA) decodes a request once more after it
    sampled its stop token; the capture refuses it, so moepath's engines switch it off."""
    from moepath.patches.settings import CaptureSettings

    options = EngineOptions(dtype="float32")
    traced = options.llm_kwargs("toy", CaptureSettings(dir="t"))
    assert traced["async_scheduling"] is False
    assert traced["additional_config"]["moepath"]["dir"] == "t"
    untraced = options.llm_kwargs("toy", None)
    assert "async_scheduling" not in untraced and "additional_config" not in untraced


def test_engines_keep_vllm_s_prefix_caching_unless_asked_or_storing_every_distribution():
    """Traced engines read vLLM's prefix cache as untraced ones do (the routing of cached
    tokens is replayed); per-token distributions (store_probs) are not kept for cached
    tokens, so such engines compute every token."""
    from moepath.patches.settings import CaptureSettings

    traced = CaptureSettings(dir="t")
    assert "enable_prefix_caching" not in EngineOptions().llm_kwargs("toy", traced)
    assert "enable_prefix_caching" not in EngineOptions().llm_kwargs("toy", None)
    off = EngineOptions(prefix_caching=False)
    assert off.llm_kwargs("toy", traced)["enable_prefix_caching"] is False
    assert off.llm_kwargs("toy", None)["enable_prefix_caching"] is False
    probs = EngineOptions(store_probs=True)
    settings = CaptureSettings(dir="t", store_probs=True)
    assert probs.llm_kwargs("toy", settings)["enable_prefix_caching"] is False


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_below_one_is_refused(batch_size):
    with pytest.raises(InputError, match=f"--batch-size must be at least 1, not {batch_size}"):
        TraceOptions(batch_size=batch_size)


def test_cli_refuses_a_batch_size_below_one_before_writing_anything(tmp_path, toy_olmoe):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"id": "a", "text": "one"}\n')
    result = moepath("trace", toy_olmoe, "--samples", samples, "--out", tmp_path / "o",
                     "--batch-size", "-1")
    assert_one_line_error(result, "--batch-size must be at least 1, not -1")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("max_model_len, max_tokens", [(4, 4), (4, 8), (1, 0)])
def test_a_context_with_no_room_for_a_prompt_is_refused(toy_olmoe, max_model_len, max_tokens):
    with pytest.raises(InputError, match=f"--max-model-len must exceed --max-tokens .*, got "
                                         f"{max_model_len} and {max_tokens}; raise"):
        max_prompt_len(toy_olmoe, EngineOptions(max_model_len=max_model_len),
                       TraceOptions(max_tokens=max_tokens))


def test_the_prompt_limit_is_the_context_minus_the_generated_tokens(toy_olmoe):
    assert max_prompt_len(toy_olmoe, EngineOptions(max_model_len=64), TraceOptions()) == 63
    assert max_prompt_len(toy_olmoe, EngineOptions(max_model_len=64),
                          TraceOptions(max_tokens=8)) == 56


def test_cli_refuses_max_model_len_at_max_tokens_before_writing_anything(tmp_path, toy_olmoe):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"id": "a", "text": "one"}\n')
    result = moepath("trace", toy_olmoe, "--samples", samples, "--out", tmp_path / "o",
                     "--max-model-len", "16", "--max-tokens", "16")
    assert_one_line_error(result, "--max-model-len must exceed --max-tokens (at least 1 "
                                  "generated token), got 16 and 16")
    assert not (tmp_path / "o").exists()


def test_the_store_kind_is_checked_and_goes_to_the_worker_settings():
    from moepath.patches.settings import CONFIG_KEY, CaptureSettings

    with pytest.raises(InputError, match="--store must be one of per-token, per-sample, not "
                                         "'tokens'"):
        EngineOptions(store="tokens")
    with pytest.raises(InputError, match="--store-probs keeps every token's router "
                                         "distribution, which --store per-sample drops"):
        EngineOptions(store="per-sample", store_probs=True)
    settings = CaptureSettings(dir="t", store=EngineOptions(store="per-sample").store)
    kwargs = EngineOptions(store="per-sample").llm_kwargs("m", settings)
    assert kwargs["additional_config"][CONFIG_KEY]["store"] == "per-sample"


def test_cli_names_a_bad_store_value(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"id": "a", "text": "one"}\n')
    result = moepath("trace", tmp_path, "--samples", samples, "--out", tmp_path / "o",
                     "--store", "tokens")
    assert_one_line_error(result, "--store must be one of per-token, per-sample, not 'tokens'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("cores", "ranks", "binding"), [
    ([4, 5, 6, 7], 2, "4-5|6-7"),  # a range per rank
    ([3], 1, "3"),
    ([0, 2, 5], 1, "0,2,5"),  # cores that are not a range are listed
    ([0], 2, "0|0"),  # fewer cores than ranks: they share the last one
])
def test_cores_binding_gives_each_tensor_parallel_rank_its_share(cores, ranks, binding):
    from moepath.patches.options import cores_binding

    assert cores_binding(cores, ranks) == binding

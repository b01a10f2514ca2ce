"""Shared fixtures: toy checkpoints, sample files, and the few vLLM engines the suite starts.

Engine starts cost 20-45 s on the 2-core CPU, so engines are session-scoped
and shared: one compiled bf16 trace of the standard samples (``olmoe_trace``),
one eager engine with tiny prefill chunks (``chunked_engine``) that the
batching tests send requests to, three eager checkpoints compared end to end
(``compared``), and a local Ray cluster with two one-core engine actors
(``ray_cluster``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from moepath.fixtures.toy import build_toy_model, corpus
from moepath.tracer import store

# Several tiny engines may be alive at once (a session engine plus a CLI run):
# each takes this fraction of the node's memory instead of the default 0.3.
TEST_MEMORY = 0.12
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's switch for a cluster on 127.0.0.1 only, read once when ray is imported: vLLM imports
# ray before ``ray_cluster`` starts its cluster (moepath sets it itself when it comes first)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, relative path -> bytes: equal before and after a
    refused command shows that the command left the directory untouched."""
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(Path(directory).rglob("*")) if path.is_file()}


def sigkill_when(command: list[str], predicate, timeout: float = 300.0) -> None:
    """Start ``command`` and SIGKILL it and its engine process once ``predicate()`` holds (or
    after ``timeout`` s, or when it exits first): a crash or an OOM kill, with no cleanup."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def standard_records(n: int = 40) -> list[dict]:
    """Short pseudo-English samples plus three long ones (> 3 prefill chunks of 64)."""
    lines = corpus(n, seed=11)
    records = [{"id": f"s{i}", "text": line, "domain": ["math", "code"][i % 2]}
               for i, line in enumerate(lines)]
    long_text = " ".join(corpus(10, seed=12))
    records += [{"id": f"long{j}", "text": long_text[j * 7:], "domain": "long"}
                for j in range(3)]
    return records


@pytest.fixture
def zen_platform():
    """Skip unless vLLM runs on its Zen platform here (AMD CPU with AVX-512, zentorch)."""
    from vllm.platforms import current_platform

    if not current_platform.is_zen_cpu():
        pytest.skip("zentorch's kernels run only on vLLM's Zen platform (AMD CPU with "
                    "AVX-512 and `pip install moepath[zen]`)")


@pytest.fixture
def no_engine(monkeypatch):
    """Starting a vLLM engine fails the test: for refusals that must come before one."""
    import vllm

    def refuse(**kwargs):
        raise AssertionError(f"a vLLM engine was started for {kwargs.get('model')}")

    monkeypatch.setattr(vllm, "LLM", refuse)


@pytest.fixture(scope="session")
def toy_factory(tmp_path_factory):
    """build(arch, preset="tiny", seed=0) -> folder, cached per session."""
    root = tmp_path_factory.mktemp("toys")
    cache: dict[tuple, Path] = {}

    def build(arch: str = "olmoe", preset: str = "tiny", seed: int = 0) -> Path:
        key = (arch, preset, seed)
        if key not in cache:
            cache[key] = build_toy_model(root / f"{arch}-{preset}-{seed}", arch, preset, seed)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def toy_olmoe(toy_factory) -> Path:
    return toy_factory("olmoe")


@pytest.fixture(scope="session")
def hf_olmoe(toy_olmoe):
    """The toy OLMoE in transformers, float32: the reference that tells near-ties apart."""
    from moepath.fixtures.hf_reference import load_model

    return load_model(toy_olmoe)


@pytest.fixture(scope="session")
def samples_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("samples") / "samples.jsonl",
                       standard_records())


@pytest.fixture(scope="session")
def olmoe_trace(toy_olmoe, samples_file, tmp_path_factory) -> Path:
    """The standard samples traced through the tiny OLMoE toy: compiled, bf16, defaults."""
    from moepath.patches.engine import trace_samples
    from moepath.patches.options import EngineOptions, TraceOptions
    from moepath.tracer.samples import SampleReadOptions, read_samples

    out = tmp_path_factory.mktemp("traces") / "olmoe"
    trace_samples(toy_olmoe, read_samples(samples_file, SampleReadOptions()), out,
                  EngineOptions(max_model_len=512, gpu_memory_utilization=TEST_MEMORY),
                  TraceOptions(batch_size=16))
    return out


class EngineClient:
    """Sends tagged/untagged requests to a shared TracedEngine and reads their routing."""

    def __init__(self, engine, shape):
        self.engine = engine
        self.shape = shape  # (L, k, E)
        self.generated: dict[str, list[int]] = {}

    def trace(self, prompts: dict[str, list[int]], untagged: list[list[int]] = (),
              max_tokens: int = 0, **sampling) -> dict[str, store.RoutingRecord]:
        """Run tagged ``prompts`` (sample id -> token ids) plus ``untagged`` ones together
        (``sampling``: more SamplingParams of the tagged ones); the tokens each tagged
        prompt generated are left in ``self.generated``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [(TokensPrompt(prompt_token_ids=ids),
                     self.engine.sampling_params(sid, max_tokens=max_tokens, **sampling))
                    for sid, ids in prompts.items()]
        requests += [(TokensPrompt(prompt_token_ids=ids),
                      SamplingParams(max_tokens=max(1, max_tokens), temperature=0.0))
                     for ids in untagged]
        order = np.random.default_rng(len(requests)).permutation(len(requests))
        outputs = self.engine.llm.generate([requests[i][0] for i in order],
                                           [requests[i][1] for i in order], use_tqdm=False)
        sample_ids = list(prompts)
        self.generated = {sample_ids[i]: list(output.outputs[0].token_ids)
                          for i, output in zip(order, outputs, strict=True)
                          if i < len(sample_ids)}
        records = {}
        for shard in self.engine.flush():
            for record in store.read_routing_shard(self.engine_dir / shard.file, *self.shape):
                records[record.sample_id] = record
        return records

    @property
    def engine_dir(self) -> Path:
        return Path(self.engine.settings.dir)


@pytest.fixture(scope="session")
def chunked_engine(toy_olmoe, tmp_path_factory):
    """Eager bf16 engine with 64-token prefill chunks, shared by the batching tests."""
    from moepath.patches.engine import TracedEngine
    from moepath.patches.options import EngineOptions

    out = tmp_path_factory.mktemp("engine")
    options = EngineOptions(enforce_eager=True, max_model_len=512, max_num_batched_tokens=64,
                            gpu_memory_utilization=TEST_MEMORY)
    with TracedEngine(toy_olmoe, out, options, commit=False) as engine:
        routing = engine.routing
        yield EngineClient(engine, (routing.num_layers, routing.top_k, routing.num_experts))


def routing_samples(trace_dir: Path) -> list[str]:
    files = [entry["file"] for entry in store.read_manifest(trace_dir)["shards"]["routing"]]
    return [sid for f in files for sid in pq.read_table(trace_dir / f)["sample_id"].to_pylist()]


@pytest.fixture(scope="session")
def compared(toy_factory, samples_file, tmp_path_factory):
    """Three toy checkpoints (seeds 0, 1, 2 as steps 100-300) compared end to end by
    `moepath compare` on one eager engine: (root, its arguments, the finished process).
    ``root/run/step100`` holds the weights of ``toy_olmoe``."""
    from test_cli_trace import moepath

    root = tmp_path_factory.mktemp("compare")
    for step, seed in ((100, 0), (200, 1), (300, 2)):
        shutil.copytree(toy_factory("olmoe", seed=seed), root / "run" / f"step{step}")
    scores = root / "scores.csv"
    scores.write_text("checkpoint,score\nstep100,0.1\nstep200,0.4\nstep300,0.8\n")
    args = ("compare", root / "run", "--samples", samples_file, "--out", root / "out",
            "--scores", scores, "--group-by", "domain", "--enforce-eager",
            "--gpu-memory-utilization", str(TEST_MEMORY),
            "--max-model-len", "512")
    result = moepath(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, args, result


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster on 127.0.0.1 with two engine actors of one core each (started
    at their first trace, then kept warm: the tests share their engines)."""
    from moepath.patches.cluster import Cluster
    from moepath.patches.options import ClusterOptions

    with Cluster(ClusterOptions(address="local", engines=2, cpus_per_engine=1)) as cluster:
        yield cluster

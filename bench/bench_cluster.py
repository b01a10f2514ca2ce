"""Tracing throughput on one machine: one engine, `--part` by hand, and Ray actors (`--ray`).

Run (from the repository root, inside .venv):

    python bench/bench_cluster.py --samples 2048 --tokens 128

The same samples (``--samples`` random prompts of ``--tokens`` token ids, prefill
only, NLL on) are traced through the OLMoE-shaped toy (hidden 256, 16 MoE
layers, 64 experts, top-8; eager, bf16) five ways, one after the other:

- ``one engine``: ``trace_samples`` in this process (inline engine core, every core);
- ``--part by hand``: two processes tracing parts 0/2 and 1/2 at once, each pinned to
  one core (``VLLM_CPU_OMP_THREADS_BIND``, as docs/parallel.md shows), then ``merge``;
- ``ray, 1 actor x 2 cores`` and ``ray, 1 actor x 1 core``: a local Ray cluster
  (127.0.0.1) with one engine actor;
- ``ray, 2 actors x 1 core``: the same cluster with two actors, the samples in two
  parts, merged.

Figure: prompt tokens per second while tracing (engine start excluded: from the first
committed batch to the merged trace on a cluster; the by-hand parts each time their
own batches and their rates add up, the merge is timed apart), and each way's rate
over the one-engine rate measured in the same run. End-to-end wall times (engine
starts, cluster start, merges included) are saved too, in bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_overhead import RESULTS, toy

# the local Ray clusters below start after vLLM (the one-engine run) imported Ray, which
# reads its switch for a cluster on 127.0.0.1 only when it is imported
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ENGINE = {"enforce_eager": True, "max_model_len": 512, "gpu_memory_utilization": 0.15,
          "engine_core": "auto"}
# one part of the samples traced in a process of its own, its summary printed as JSON
PART = """
import json, sys
from dataclasses import asdict
from moepath.patches.engine import trace_samples
from moepath.patches.options import EngineOptions, TraceOptions
from moepath.tracer.samples import read_samples

if __name__ == "__main__":
    model, samples, out, index = sys.argv[1:5]
    part = read_samples(samples).take_part(int(index), 2)
    summary = trace_samples(model, part, out, EngineOptions(**json.loads(sys.argv[5])),
                            TraceOptions(batch_size=256))
    print(json.dumps({"tokens": summary.tokens, "seconds": summary.seconds}))
"""


def write_samples(path: Path, count: int, tokens: int, vocab: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    with path.open("w") as file:
        for i in range(count):
            ids = rng.integers(0, vocab, tokens).tolist()
            file.write(json.dumps({"id": f"s{i}", "input_ids": ids}) + "\n")
    return path


def one_engine(model: Path, samples, work: Path) -> dict:
    from moepath.patches.engine import trace_samples
    from moepath.patches.options import EngineOptions, TraceOptions

    started = time.perf_counter()
    summary = trace_samples(model, samples, work / "one", EngineOptions(**ENGINE),
                            TraceOptions(batch_size=256))
    return {"tokens": summary.tokens, "seconds": summary.seconds,
            "wall_seconds": time.perf_counter() - started}


def parts_by_hand(model: Path, samples_file: Path, work: Path) -> dict:
    """Two processes on a core each, then `moepath merge` (timed apart)."""
    from moepath.tracer.merge import merge_traces

    started = time.perf_counter()
    runs = [subprocess.Popen(
        [sys.executable, "-c", PART, str(model), str(samples_file), str(work / f"part{i}"),
         str(i), json.dumps({**ENGINE, "engine_core": "process"})],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(i)}) for i in range(2)]
    parts = []
    for run in runs:
        stdout, _ = run.communicate()
        if run.returncode != 0:
            sys.exit("a part failed")
        parts.append(json.loads(stdout.strip().splitlines()[-1]))
    merging = time.perf_counter()
    merge_traces([work / "part0", work / "part1"], work / "merged")
    merged = time.perf_counter()
    return {"tokens": sum(p["tokens"] for p in parts),
            "rate": sum(p["tokens"] / p["seconds"] for p in parts),
            "merge_seconds": merged - merging, "wall_seconds": merged - started}


def on_ray(model: Path, samples, out: Path, engines: int, cores: int) -> dict:
    from moepath.patches.cluster import Cluster
    from moepath.patches.engine import trace_samples
    from moepath.patches.options import ClusterOptions, EngineOptions, TraceOptions

    started = time.perf_counter()
    with Cluster(ClusterOptions(address="local", engines=engines,
                                cpus_per_engine=cores)) as cluster:
        summary = trace_samples(model, samples, out, EngineOptions(**ENGINE),
                                TraceOptions(batch_size=256), cluster=cluster)
    return {"tokens": summary.tokens, "seconds": summary.seconds,
            "wall_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--preset", default="olmoe-shaped")
    args = parser.parse_args()
    from moepath.tracer.samples import read_samples

    model = toy(args.preset)
    results = {}
    with tempfile.TemporaryDirectory(prefix="moepath-bench-cluster-") as scratch:
        work = Path(scratch)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        samples_file = write_samples(work / "samples.jsonl", args.samples, args.tokens, vocab)
        samples = read_samples(samples_file)
        ways = {"one engine": lambda: one_engine(model, samples, work),
                "--part by hand": lambda: parts_by_hand(model, samples_file, work),
                "ray, 1 actor x 2 cores": lambda: on_ray(model, samples, work / "r12", 1, 2),
                "ray, 1 actor x 1 core": lambda: on_ray(model, samples, work / "r11", 1, 1),
                "ray, 2 actors x 1 core": lambda: on_ray(model, samples, work / "r21", 2, 1)}
        for name, way in ways.items():
            result = way()
            if "rate" not in result:  # the by-hand parts add up their own rates
                result["rate"] = result["tokens"] / result["seconds"]
            results[name] = result
            print(name, json.dumps(result), flush=True)
    base = results["one engine"]["rate"]
    for result in results.values():
        result["over_one_engine"] = result["rate"] / base
    RESULTS.mkdir(exist_ok=True)
    record = {"samples": args.samples, "tokens": args.tokens, "preset": args.preset,
              "load_average": os.getloadavg(), "results": results}
    (RESULTS / "cluster.json").write_text(json.dumps(record, indent=2))
    for name, result in results.items():
        print(f"{name:26s} {result['rate']:10,.0f} prompt tok/s  "
              f"x{result['over_one_engine']:.2f}  wall {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()

"""Memory while tracing many samples, and while computing metrics over many: resident set
size of the whole process tree over time.

Run (from the repository root, inside .venv):

    python bench/bench_memory.py --samples 50000
    python bench/bench_memory.py --metrics-samples 50000,200000   # `moepath metrics`, no engine

Writes ``--samples`` short pseudo-English samples (4-24 words), runs
``moepath trace`` on the tiny OLMoE toy (4 layers, 16 experts, top-4; ``--preset
olmoe-shaped`` for 16 x 64 x top-8, ~6x slower here) in a subprocess, and samples the RSS
of that process and all its children (engine core, workers) every second.
Memory must be flat after warm-up: the store streams shards to disk, nothing
per-sample stays in memory. Reports the RSS after warm-up (the first 10% of
samples committed), the peak, and the growth between them; saves the timeline
to bench/results/memory.json.

``--metrics-samples N,...`` instead writes, for each N, a ``--store per-sample``
trace of N OLMoE-1B-7B-shaped samples (``bench_storage.write_trace``) and runs
``moepath metrics TRACE --json`` on it, sampling its RSS every 0.2 s. The metrics
need each sample's [L, E] distribution in memory (pathways, pairs, consistency),
so the peak should be that array (N x 16 x 64 float32) plus a fixed base, never
grow with the trace's shards or tokens; saves bench/results/memory-metrics.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_overhead import RESULTS, toy


def tree_rss(process) -> int:
    """Bytes resident in ``process`` and its descendants (0 once gone)."""
    import psutil

    total = 0
    try:
        for p in [process, *process.children(recursive=True)]:
            total += p.memory_info().rss
    except psutil.NoSuchProcess:
        pass
    return total


def committed(trace_dir: Path) -> int:
    from moepath.tracer import store

    try:
        manifest = store.read_manifest(trace_dir)
    except Exception:  # noqa: BLE001 - not written yet, or mid-replace
        return 0
    return sum(entry["rows"] for entry in manifest["shards"]["samples"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--metrics-samples", default=None,
                        help="comma-separated sample counts: measure `moepath metrics` instead")
    args = parser.parse_args()
    if args.metrics_samples:
        metrics_memory([int(n) for n in args.metrics_samples.split(",")])
    else:
        trace_memory(args)


def metrics_memory(counts: list[int]) -> None:
    """Peak RSS of `moepath metrics` over per-sample traces of ``counts`` samples."""
    import psutil
    from bench_storage import EXPERTS, LAYERS, write_trace

    rows = []
    with tempfile.TemporaryDirectory(prefix="moepath-bench-memory-") as scratch:
        for count in counts:
            out = Path(scratch) / f"trace-{count}"
            sizes = write_trace(out, count, 2048, per_sample=True, draw_summaries=True)
            command = [sys.executable, "-m", "moepath.cli.main", "metrics", str(out), "--json"]
            started = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
            handle, peak = psutil.Process(process.pid), 0
            while process.poll() is None:
                peak = max(peak, tree_rss(handle))
                time.sleep(0.2)
            if process.returncode != 0:
                sys.exit(f"moepath metrics failed:\n{process.stderr.read()[-3000:]}")
            rows.append({"samples": count, "trace_bytes": sum(sizes.values()),
                         "seconds": time.perf_counter() - started, "peak_rss_gib": peak / 2**30,
                         "distributions_gib": count * LAYERS * EXPERTS * 4 / 2**30})
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory-metrics.json").write_text(json.dumps(rows, indent=2))


def trace_memory(args) -> None:
    """RSS of `moepath trace` over ``args.samples`` samples (see the module)."""
    import psutil

    from moepath.fixtures.toy import corpus

    # the benchmark's files, removed when this function returns
    scratch = tempfile.TemporaryDirectory(prefix="moepath-bench-memory-")
    work = Path(scratch.name)
    samples = work / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": f"m{i}", "text": line}) + "\n"
                               for i, line in enumerate(corpus(args.samples, seed=3))))
    out = work / "trace"
    command = [sys.executable, "-m", "moepath.cli.main", "trace", str(toy(args.preset)),
               "--samples", str(samples), "--out", str(out), "--max-model-len", "128",
               "--batch-size", str(args.batch_size)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    handle = psutil.Process(process.pid)
    timeline = []  # (seconds, committed samples, RSS bytes)
    while process.poll() is None:
        timeline.append((time.perf_counter() - started, committed(out), tree_rss(handle)))
        time.sleep(1.0)
    stderr = process.stderr.read()
    if process.returncode != 0:
        sys.exit(f"moepath trace failed:\n{stderr[-3000:]}")

    warm = [rss for _, done, rss in timeline if done >= args.samples // 10]
    gib = 2 ** 30
    result = {
        "command": " ".join(command[1:]), "samples": args.samples, "preset": args.preset,
        "seconds": timeline[-1][0] if timeline else 0.0,
        "rss_after_warmup_gib": warm[0] / gib, "rss_peak_after_warmup_gib": max(warm) / gib,
        "rss_growth_gib": (max(warm) - warm[0]) / gib,
        "trace_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "timeline": timeline,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=2))


if __name__ == "__main__":
    main()

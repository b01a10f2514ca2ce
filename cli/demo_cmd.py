"""``moepath demo``: the embedded default, end to end (grokking testbed + compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from . import render
from .compare_cmd import run_compare

# The testbed trains in float32. Traced in bfloat16, its pathway consistency
# followed the rounding of each CPU's bf16 kernels (r with held-out accuracy
# -0.54 on an AVX512-BF16 CPU, +0.19 in float32): bench/grokking/README.md.
TESTBED_DTYPE = "float32"


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path(
        "demo-out"),
    smoke: Annotated[bool, typer.Option(help="A few training steps only (a quick check "
                     "of the pipeline, no grokking).")] = False,
    gpu_memory_utilization: o.GpuMemory = 0.3,
) -> None:
    """Train the grokking testbed (cached), then compare its checkpoints (traced in
    float32) with their scores."""
    from moepath.patches.engine import EngineOptions, TraceOptions
    from moepath.tracer import testbed
    from moepath.tracer.compare import CompareOptions
    from moepath.tracer.samples import SampleReadOptions

    config = testbed.SMOKE if smoke else testbed.DEFAULT
    testbed_dir = out / "testbed"
    if testbed.is_built(config, testbed_dir):
        render.stderr.print(f"testbed checkpoints in {testbed_dir} are up to date")
    else:
        render.stderr.print(f"training the grokking testbed into {testbed_dir} "
                            f"({'smoke run' if smoke else 'about 10 minutes on 2 CPU cores'})")
        testbed.train(config, testbed_dir, log=render.stderr.print)
    run_compare([testbed_dir / "checkpoints"], testbed_dir / "samples.jsonl", out / "compare",
                CompareOptions(scores=testbed_dir / "scores.csv"),
                EngineOptions(dtype=TESTBED_DTYPE, gpu_memory_utilization=gpu_memory_utilization,
                              engine_core="auto"),
                TraceOptions(), SampleReadOptions())


def register(app: typer.Typer) -> None:
    app.command()(demo)

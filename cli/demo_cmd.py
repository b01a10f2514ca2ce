"""``moepath demo``: the embedded default, end to end (grokking testbed + compare)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from . import render

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
    """Train the grokking testbed (cached), then compare its checkpoints on memorised samples.

    Checkpoints are traced in float32; metrics cover the memorised samples and are
    correlated with held-out accuracy from the memorisation step on."""
    from ..fixtures import testbed
    from ..patches.comparison import compare_checkpoints
    from ..patches.options import EngineOptions, TraceOptions
    from ..tracer.samples import SampleReadOptions

    config = testbed.SMOKE if smoke else testbed.DEFAULT
    suffix = "-smoke" if smoke else ""  # a smoke run never replaces the 10-minute testbed
    testbed_dir, compare_dir = out / f"testbed{suffix}", out / f"compare{suffix}"
    duration = "smoke run" if smoke else "about 10 minutes on 2 CPU cores"
    result = _testbed(config, testbed_dir, compare_dir / "traces", duration)
    compared = compare_checkpoints(
        [testbed_dir / "checkpoints"], testbed_dir / "samples.jsonl", compare_dir,
        testbed.compare_options(result),
        EngineOptions(dtype=TESTBED_DTYPE, gpu_memory_utilization=gpu_memory_utilization,
                      engine_core="auto"),
        TraceOptions(), SampleReadOptions(),
        progress=render.CompareProgress(), command=render.command_line())
    render.compare_summary(compared)


def _testbed(config, testbed_dir: Path, traces: Path, duration: str):
    """The testbed run in ``testbed_dir``: cached, or trained (dropping the ``traces`` of
    earlier checkpoints, which no longer match)."""
    from ..fixtures import testbed

    if testbed.is_built(config, testbed_dir):
        render.stderr.print(f"testbed checkpoints in {testbed_dir} are up to date")
        return testbed.read_result(config, testbed_dir)
    render.stderr.print(f"training the grokking testbed into {testbed_dir} ({duration})")
    result = testbed.train(config, testbed_dir, log=render.stderr.print)
    if traces.exists():
        render.stderr.print(f"removing {traces}: traces of the checkpoints just replaced")
        shutil.rmtree(traces)
    return result


def register(app: typer.Typer) -> None:
    # the commands list shows this; the docstring stays the command's own --help
    app.command(short_help="Train the grokking testbed (cached), compare its checkpoints.")(demo)

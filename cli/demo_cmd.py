"""``moepath demo``: the embedded default, end to end (grokking testbed + compare)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from . import render


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path(
        "demo-out"),
    smoke: Annotated[bool, typer.Option(help="A few training steps only (a quick check "
                     "of the pipeline, no grokking).")] = False,
    gpu_memory_utilization: o.GpuMemory = 0.3,
) -> None:
    """Train the grokking testbed (cached), then compare its checkpoints per domain.

    Three arithmetic domains in one training stream; checkpoints are traced in float32;
    metrics cover each domain's memorised samples, grouped by memorisation step, and are
    correlated with that domain's held-out accuracy from the memorisation step on."""
    from ..fixtures import testbed
    from ..patches.comparison import compare_checkpoints
    from ..patches.options import EngineOptions, TraceOptions
    from ..tracer.samples import SampleReadOptions

    config = testbed.SMOKE if smoke else testbed.DEFAULT
    suffix = "-smoke" if smoke else ""  # a smoke run never replaces the full testbed
    testbed_dir, compare_dir = out / f"testbed{suffix}", out / f"compare{suffix}"
    result, trained = testbed.build(config, testbed_dir, log=render.stderr.print)
    traces = compare_dir / "traces"
    if trained and traces.exists():
        render.stderr.print(f"removing {traces}: traces of the checkpoints just replaced")
        shutil.rmtree(traces)
    compared = compare_checkpoints(
        [testbed_dir / "checkpoints"], testbed_dir / "samples.jsonl", compare_dir,
        testbed.compare_options(result),
        EngineOptions(dtype=testbed.TRACE_DTYPE, gpu_memory_utilization=gpu_memory_utilization,
                      engine_core="auto"),
        TraceOptions(), SampleReadOptions(),
        progress=render.CompareProgress(), command=render.command_line())
    render.compare_summary(compared)


def register(app: typer.Typer) -> None:
    # the commands list shows this; the docstring stays the command's own --help
    app.command(short_help="Train the grokking testbed (cached), compare its checkpoints.")(demo)

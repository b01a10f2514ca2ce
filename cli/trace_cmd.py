"""``moepath trace MODEL --samples FILE --out DIR``: record routing of samples in vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..tracer.errors import InputError
from . import options as o
from . import render


@o.engine_flags(engine_core="auto", store_probs=False, store="per-token")
@o.cluster_flags()
@o.read_flags()
def trace(
    model: o.Model,
    samples: o.Samples,
    out: Annotated[Path, typer.Option("--out", "-o", help="Trace directory to write.")],
    *,
    read: o.SampleReadOptions,
    truncate: o.Truncate = False,
    nll: o.Nll = True,
    max_tokens: o.MaxTokens = 0,
    batch_size: o.BatchSize = 256,
    part: o.Part = None,
    data_parallel_size: o.DataParallel = 1,
    resume: o.Resume = False,
    force: o.Force = False,
    engine: o.EngineOptions,
    cluster: o.ClusterOptions | None,
) -> None:
    """Trace the expert routing of every sample through MODEL.

    Routes go into the trace directory --out, read by merge, metrics and show."""
    from ..patches.cluster import open_cluster
    from ..patches.engine import trace_samples
    from ..patches.options import TraceOptions
    from ..tracer.samples import read_samples

    refuse_data_parallel(data_parallel_size)
    if part is not None and cluster is not None:
        raise typer.BadParameter("--part and --ray exclude each other: --ray splits the "
                                 "samples over its engines itself")
    sample_set = read_samples(samples, read)
    if (selected := o.parse_part(part)) is not None:
        sample_set = sample_set.take_part(*selected)
    render.skipped_lines(sample_set)
    trace_options = TraceOptions(truncate=truncate, nll=nll, max_tokens=max_tokens,
                                 batch_size=batch_size)
    where = f" on the Ray cluster {cluster.address}" if cluster else ""
    render.stderr.print(f"tracing with [bold]{model}[/]{where} (a vLLM engine starts in "
                        f"20-60 s)")
    with open_cluster(cluster) as engines, render.SampleProgress() as progress:
        summary = trace_samples(model, sample_set, out, engine, trace_options, resume=resume,
                                force=force, on_start=progress.start,
                                on_progress=progress.advance, cluster=engines)
    rate = summary.tokens / summary.seconds if summary.seconds else 0.0
    lost = [["engines lost (their parts resumed)", summary.lost_engines]]
    render.stderr.print(render.table("trace", ["", "value"], [
        ["samples traced", summary.samples],
        ["already traced (resumed)", summary.resumed_samples],
        ["prompt tokens", summary.tokens],
        ["truncated samples", summary.truncated],
        ["skipped lines", summary.skipped_lines],
        ["time (s)", round(summary.seconds, 1)],
        ["prompt tokens/s", round(rate)],
        *(lost if summary.lost_engines else []),
        ["output", f"{out} ({render.human_bytes(summary.bytes)})"],
    ]))


def refuse_data_parallel(size: int) -> None:
    """``--data-parallel-size`` above 1: vLLM 0.32's ``LLM`` raises for it (one process
    cannot hold several data-parallel engines), so ``moepath trace`` has no such engine."""
    if size > 1:
        raise InputError(
            f"--data-parallel-size {size}: vLLM 0.32 runs data parallelism only as one engine "
            f"process per rank, which one offline trace cannot drive (vLLM's LLM refuses it); "
            f"trace {size} parts instead, one engine each on any machines: "
            f"moepath trace ... --part I/{size} for I in 0..{size - 1}, then "
            f"moepath merge PART... --out DIR")


def register(app: typer.Typer) -> None:
    app.command()(trace)

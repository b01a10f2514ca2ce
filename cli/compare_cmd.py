"""``moepath compare CKPT... --samples FILE --out DIR``: metric trajectories over checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from . import render


@o.engine_flags(engine_core="auto", store="per-token")
@o.cluster_flags()
@o.analysis_flags()
@o.read_flags()
def compare(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Checkpoint folders in order, or one folder whose subfolders are checkpoints "
             "named by step (step1000, checkpoint-2000, ...).")],
    samples: o.Samples,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    scores: Annotated[Path | None, typer.Option(
        help="CSV: checkpoint, score[, group][, val_loss]: accuracy measured elsewhere, for "
             "correlations; a validation loss gets a correlation row of its own.")] = None,
    *,
    analysis: o.CompareOptions,
    read: o.SampleReadOptions,
    reuse_engine: o.ReuseEngine = True,
    log_to: o.LogTo = None,
    truncate: o.Truncate = False,
    batch_size: o.BatchSize = 256,
    engine: o.EngineOptions,
    cluster: o.ClusterOptions | None,
) -> None:
    """Serve checkpoints in turn on the same samples; report metrics, memorisation, correlations."""
    from ..patches.cluster import open_cluster
    from ..patches.comparison import compare_checkpoints
    from ..patches.options import TraceOptions

    with open_cluster(cluster) as engines:
        result = compare_checkpoints(
            checkpoints, samples, out, replace(analysis, scores=scores), engine,
            TraceOptions(truncate=truncate, batch_size=batch_size),
            read,
            reuse_engine, progress=render.CompareProgress(), command=render.command_line(),
            log_to=o.parse_log_to(log_to), cluster=engines)
    render.compare_summary(result)


def register(app: typer.Typer) -> None:
    # the commands list shows this; the docstring stays the command's own --help
    app.command(short_help="Metrics, memorisation and correlations over checkpoints.")(compare)

"""``moepath watch RUN_DIR --samples FILE --out DIR``: follow a training run's checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from . import render


@o.engine_flags(engine_core="auto", store="per-token")
@o.analysis_flags()
@o.read_flags()
def watch(
    run_dir: Annotated[Path, typer.Argument(
        help="The folder the training job writes its checkpoints into (checkpoint-N, "
             "step_N, iter_000N, global_stepN, or --pattern).")],
    samples: o.Samples,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (traces, "
                   "metrics, report, status.json).")],
    scores: Annotated[Path | None, typer.Option(
        help="Evaluation log, read again on every update: CSV checkpoint,score[,group]"
             "[,val_loss] or JSON lines with step, score[, group, val_loss].")] = None,
    pattern: Annotated[str | None, typer.Option(
        help="Regular expression for other checkpoint folder names (whole name; group 1: "
             "the step, else trainer_state.json's global_step).")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between looks at RUN_DIR.")] = 30.0,
    settle: Annotated[float, typer.Option(
        help="Seconds a checkpoint's files must stay unchanged before it is read.")] = 10.0,
    marker: Annotated[str | None, typer.Option(
        help="A file the trainer writes last into each checkpoint folder: wait for it "
             "instead of --settle.")] = None,
    once: Annotated[bool, typer.Option(help="Trace what is ready, update, and exit (cron, "
                    "SLURM).", rich_help_panel=o.SWITCHES_PANEL)] = False,
    retry: Annotated[bool, typer.Option(help="Trace failed checkpoints again.",
                                        rich_help_panel=o.SWITCHES_PANEL)] = False,
    log_to: o.LogTo = None,
    *,
    analysis: o.CompareOptions,
    read: o.SampleReadOptions,
    reuse_engine: o.ReuseEngine = True,
    truncate: o.Truncate = False,
    batch_size: o.BatchSize = 256,
    engine: o.EngineOptions,
) -> None:
    """Follow a training run: trace each new checkpoint once it is fully written, and update
    metrics, report, plots, status.json and the trackers after each."""
    from ..patches.options import TraceOptions
    from ..patches.watch import WatchOptions, watch_run

    options = WatchOptions(pattern=pattern, interval_s=interval, settle_s=settle, marker=marker,
                           once=once, retry=retry, scores=scores,
                           log_to=o.parse_log_to(log_to), reuse_engine=reuse_engine)
    with render.WatchView() as view:
        result = watch_run(run_dir, samples, out, options, analysis, engine,
                           TraceOptions(truncate=truncate, batch_size=batch_size),
                           read,
                           progress=view, command=render.command_line())
    render.watch_summary(result)


def register(app: typer.Typer) -> None:
    app.command(short_help="Follow a training run: trace checkpoints as they are written.")(
        watch)

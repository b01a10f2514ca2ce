"""``moepath compare CKPT... --samples FILE --out DIR``: metric trajectories over checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from . import render


@o.engine_flags(engine_core="auto")
def compare(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Checkpoint folders in order, or one folder whose subfolders are checkpoints "
             "named by step (step1000, checkpoint-2000, ...).")],
    samples: o.Samples,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    scores: Annotated[Path | None, typer.Option(help="CSV: checkpoint, score[, group]: "
                      "accuracy measured elsewhere, for correlations.")] = None,
    group_by: o.GroupBy = None,
    memorised_only: Annotated[bool, typer.Option(help="Metrics on memorised samples only "
                              "(the paper's protocol).",
                              rich_help_panel=o.SWITCHES_PANEL)] = False,
    epsilon: Annotated[float | None, typer.Option(help="Memorisation loss threshold.")] = None,
    epsilon_quantile: Annotated[float | None, typer.Option(
        help="Epsilon as this quantile of final losses (default 0.25).")] = None,
    epsilon_per_group: Annotated[bool, typer.Option(
        "--epsilon-per-group/--epsilon-global",
        help="With --group-by, take the epsilon quantile over each group's final losses "
             "(the paper: per domain) or over all samples.",
        rich_help_panel=o.SWITCHES_PANEL)] = True,
    delta: Annotated[float, typer.Option(help="Allowed distance to the final loss.")] = 0.05,
    from_step: Annotated[int | None, typer.Option(help="Correlate from this step on.")] = None,
    from_t_star: Annotated[bool, typer.Option(
        "--from-t-star/--all-checkpoints",
        help="Correlate each t*=N group from step N on (after its samples are memorised), "
             "or over every checkpoint.", rich_help_panel=o.SWITCHES_PANEL)] = True,
    min_checkpoints: Annotated[int, typer.Option(
        help="Flag correlations over fewer checkpoints as too small: listed, never "
             "headlined.")] = 5,
    min_group_size: Annotated[int, typer.Option(
        help="Flag correlations of groups of fewer samples as too small.")] = 20,
    control: Annotated[str | None, typer.Option(
        help="Metric to partial out of each correlation (same group); 'none' for no "
             "partial correlation.")] = "pathway_length",
    tau: o.Tau = 0.7,
    source: o.Source = "full",
    unit: o.Unit = "char",
    pairs: o.Pairs = "auto",
    seed: o.Seed = 0,
    reuse_engine: Annotated[bool, typer.Option(help="Reload weights into the running engine "
                            "between checkpoints of one architecture.",
                            rich_help_panel=o.SWITCHES_PANEL)] = True,
    id_field: o.IdField = "id",
    text_field: o.TextField = "text",
    skip_bad_lines: o.SkipBadLines = False,
    limit: o.Limit = None,
    truncate: o.Truncate = False,
    batch_size: o.BatchSize = 256,
    *, engine: o.EngineOptions,
) -> None:
    """Serve checkpoints in turn on the same samples; report metrics, memorisation, correlations."""
    from ..patches.comparison import compare_checkpoints
    from ..patches.options import TraceOptions
    from ..tracer.compare import CompareOptions
    from ..tracer.metrics import MetricOptions
    from ..tracer.samples import SampleReadOptions

    result = compare_checkpoints(
        checkpoints, samples, out,
        CompareOptions(
            metrics=MetricOptions(tau=tau, unit=unit, source=source,
                                  pairs=o.parse_pairs(pairs), seed=seed),
            group_by=group_by, memorised_only=memorised_only, epsilon=epsilon,
            epsilon_quantile=epsilon_quantile, epsilon_per_group=epsilon_per_group,
            delta=delta, scores=scores, from_step=from_step, from_t_star=from_t_star,
            min_checkpoints=min_checkpoints, min_group_size=min_group_size,
            control=None if control in (None, "none") else control),
        engine,
        TraceOptions(truncate=truncate, batch_size=batch_size),
        SampleReadOptions(id_field=id_field, text_field=text_field,
                          skip_bad_lines=skip_bad_lines, limit=limit),
        reuse_engine, progress=render.CompareProgress(), command=render.command_line())
    render.compare_summary(result)


def register(app: typer.Typer) -> None:
    # the commands list shows this; the docstring stays the command's own --help
    app.command(short_help="Metrics, memorisation and correlations over checkpoints.")(compare)

"""``moepath compare CKPT... --samples FILE --out DIR``: metric trajectories over checkpoints."""

from __future__ import annotations

import shlex
import sys
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
    from ..patches.options import TraceOptions
    from ..tracer.compare import CompareOptions
    from ..tracer.metrics import MetricOptions
    from ..tracer.samples import SampleReadOptions

    run_compare(
        checkpoints, samples, out,
        CompareOptions(
            metrics=MetricOptions(tau=tau, unit=unit, source=source,
                                  pairs=o.parse_pairs(pairs), seed=seed),
            group_by=group_by, memorised_only=memorised_only, epsilon=epsilon,
            epsilon_quantile=epsilon_quantile, epsilon_per_group=epsilon_per_group,
            delta=delta, scores=scores, from_step=from_step, from_t_star=from_t_star),
        engine,
        TraceOptions(truncate=truncate, batch_size=batch_size),
        SampleReadOptions(id_field=id_field, text_field=text_field,
                          skip_bad_lines=skip_bad_lines, limit=limit),
        reuse_engine)


def run_compare(checkpoints: list[Path], samples: Path, out: Path, options, engine_options,
                trace_options, read_options, reuse_engine: bool = True) -> None:
    """Validate, show the plan, trace every checkpoint, analyse, render (``compare``, ``demo``)."""
    from ..patches.sweep import trace_checkpoints
    from ..tracer import compare as cmp
    from ..tracer.samples import read_samples

    found = cmp.discover(checkpoints)
    shape = cmp.check_compatible(found)
    sample_set = read_samples(samples, read_options)
    render.skipped_lines(sample_set)
    cmp.check_before_tracing(found, sample_set, options)
    steps = cmp.steps(found)
    render.stderr.print(render.table(
        f"{len(found)} checkpoints ({shape.architecture}, {shape.num_experts} experts, "
        f"top-{shape.top_k}), {len(sample_set.samples)} samples",
        ["#", "checkpoint", "step"], [[i + 1, c.name, steps[c.name]] for i, c in enumerate(found)]))
    _trace_all(trace_checkpoints, [(c.name, c.path) for c in found], sample_set, out,
               engine_options, trace_options, reuse_engine)
    result = cmp.analyse(found, out / "traces", out, options, command=_command_line())
    _render(result, out)


def _trace_all(trace_checkpoints, models, sample_set, out, engine, trace_options, reuse):
    with render.SampleProgress() as progress:
        def on_checkpoint(event) -> None:
            what = {"skip": "complete, skipped", "start": "starting engine",
                    "reload": "reloading weights in place"}[event.action]
            render.stderr.print(f"[bold]checkpoint {event.index + 1}/{event.total}[/] "
                                f"{event.name}: {what}")
            progress.begin(event.name)

        trace_checkpoints(models, sample_set, out / "traces", engine, trace_options,
                          reuse_engine=reuse, on_checkpoint=on_checkpoint,
                          on_start=progress.start, on_progress=progress.advance)


def _render(result, out: Path) -> None:
    """Terminal summary: the trajectory of the first group (``all`` unless --memorised-only)
    and the correlations, one row per group; every group's table is in report.md."""
    from ..tracer.compare import ALL
    from ..tracer.correlation import TABLE1_ROWS

    metrics = result.metrics
    group = ALL if (metrics["group"] == ALL).any() else metrics["group"].iloc[0]
    wide = metrics[metrics["group"] == group].pivot(index="step", columns="metric",
                                                    values="value").reset_index()
    columns = [c for c in ("n_samples", *TABLE1_ROWS) if c in wide.columns]
    render.stdout.print(render.table(f"metrics of group '{group}' by checkpoint",
                                     ["step", *columns], wide[["step", *columns]].values.tolist()))
    if result.table1 is not None:
        by_group = result.table1.T  # rows: groups; columns: metrics
        render.stdout.print(render.table(
            "correlation with scores (pearson / spearman)", ["group", *map(str, by_group.columns)],
            [[group, *values] for group, values in zip(by_group.index, by_group.values.tolist(),
                                                        strict=True)]))
    for note in result.notes:
        render.stderr.print(f"note: {note}")
    render.stderr.print(f"wrote into {out}: {', '.join(path.name for path in result.files)} "
                        f"(report.md has every group)")


def _command_line() -> str:
    return "moepath " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def register(app: typer.Typer) -> None:
    # the commands list shows this; the docstring stays the command's own --help
    app.command(short_help="Metrics, memorisation and correlations over checkpoints.")(compare)

"""``moepath eval MODEL --tasks T --out DIR``: lm-evaluation-harness with every request traced."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from . import render

Tasks = Annotated[str, typer.Option("--tasks", "-t", help="Comma-separated lm-eval task "
                  "names (or task YAML paths).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory: lm_eval/ (results, "
                "per-document samples) and trace/.")]
DocLimit = Annotated[int | None, typer.Option(help="Evaluate only the first N documents of "
                     "each task.")]
IncludePath = Annotated[Path | None, typer.Option(help="Folder of your own task YAMLs.")]
NumFewshot = Annotated[int | None, typer.Option(help="Few-shot examples (default: the task's).")]
ConfirmUnsafe = Annotated[bool, typer.Option(help="Run tasks that execute model-generated "
                         "code (lm-eval marks them unsafe, e.g. humaneval).",
                         rich_help_panel=o.SWITCHES_PANEL)]
BatchSize = Annotated[str, typer.Option(help="Requests per vLLM call: auto (all) or a number.")]


@o.engine_flags()
def eval_(
    model: o.Model,
    tasks: Tasks,
    out: Out,
    limit: DocLimit = None,
    include_path: IncludePath = None,
    num_fewshot: NumFewshot = None,
    batch_size: BatchSize = "auto",
    confirm_run_unsafe_code: ConfirmUnsafe = False,
    force: o.Force = False,
    *, engine: o.EngineOptions,
) -> None:
    """Run lm-eval tasks on MODEL in a traced vLLM engine.

    Per-document scores join the trace. Tasks that run model-generated code
    (lm-eval marks them unsafe, e.g. humaneval) need --confirm-run-unsafe-code."""
    from ..patches.lm_eval_backend import EvalOptions, run_eval

    names = tuple(name.strip() for name in tasks.split(",") if name.strip())
    if not names:
        raise typer.BadParameter("--tasks needs at least one task name")
    if batch_size != "auto" and not (batch_size.isdecimal() and int(batch_size) > 0):
        raise typer.BadParameter(f"--batch-size takes auto or a positive number, "
                                 f"not {batch_size!r}")
    options = EvalOptions(tasks=names, limit=limit, num_fewshot=num_fewshot,
                          batch_size=batch_size if batch_size == "auto" else int(batch_size),
                          include_path=include_path,
                          confirm_run_unsafe_code=confirm_run_unsafe_code)
    render.stderr.print(f"evaluating [bold]{model}[/] (a vLLM engine starts in 20-60 s)")
    summary = run_eval(model, out, options, engine, force=force)
    rows = [[task, metric, value] for task, metrics in summary.metrics.items()
            for metric, value in metrics.items()]
    render.stderr.print(render.table("lm-eval", ["task", "metric", "value"], rows))
    render.stderr.print(render.table("trace", ["", "value"], [
        ["samples traced", summary.samples],
        *([f"  {kind}", n] for kind, n in sorted(summary.requests.items())),
        ["time (s)", round(summary.seconds, 1)],
        ["lm-eval output", summary.lm_eval_dir],
        ["trace", summary.trace_dir],
    ]))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)

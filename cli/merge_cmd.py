"""``moepath merge PART... --out DIR``: join the traces of ``--part I/N`` runs into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from . import render


def merge(
    parts: Annotated[list[Path], typer.Argument(
        help="Complete trace directories written with --part 0/N .. N-1/N.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Trace directory to write.")],
    force: o.Force = False,
) -> None:
    """Merge the part traces of one samples file into one trace.

    The parts are data-parallel runs of `moepath trace --part I/N`."""
    from ..tracer.merge import merge_traces

    manifest = merge_traces(parts, out, force=force)
    counts = manifest.counts
    render.stderr.print(f"merged {len(parts)} parts into {out}: {counts.samples} samples, "
                        f"{counts.tokens} tokens")


def register(app: typer.Typer) -> None:
    app.command()(merge)

"""``moepath toy-model OUT``: build a random toy MoE checkpoint (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..fixtures.toy import ARCHITECTURES
from . import render


def toy_model(
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    arch: Annotated[str, typer.Option(help=f"{', '.join(ARCHITECTURES)} "
                                     "(docs/models.md).")] = "olmoe",
    preset: Annotated[str, typer.Option(help="tiny (tests) or olmoe-shaped (16 layers, "
                      "64 experts, top-8).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the weights (one tokenizer for all "
                    "seeds).")] = 0,
) -> None:
    """Build a random-weight MoE checkpoint of a real architecture.

    It comes with a local tokenizer: nothing is downloaded."""
    from ..fixtures.toy import PRESETS, build_toy_model
    from ..tracer.checkpoints import moe_shape

    path = build_toy_model(out, arch=arch, preset=preset, seed=seed)
    shape, routing = PRESETS[preset], moe_shape(path)
    render.stderr.print(
        f"wrote {arch} toy ({preset}: {shape.layers} layers, {routing.num_experts} experts, "
        f"top-{routing.top_k}, hidden {shape.hidden}) to {path}")


def register(app: typer.Typer) -> None:
    app.command("toy-model")(toy_model)

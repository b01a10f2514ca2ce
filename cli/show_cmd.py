"""``moepath show TRACE_DIR SAMPLE_ID``: one sample's pathway, consistency and token routing."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from . import options as o
from . import render

SampleId = Annotated[str, typer.Argument(help="Id of a traced sample.")]
Tokens = Annotated[int, typer.Option(min=0, help="Tokens to list in the per-token view.")]


def show(trace_dir: o.TraceDir, sample_id: SampleId, tau: o.Tau = 0.7, tokens: Tokens = 12) -> None:
    """Show one sample's pathway, consistency profile and token routing.

    The pathway is listed layer by layer, the routing token by token."""
    from ..tracer import Trace
    from ..tracer.metrics import MetricOptions, degenerate_warning, trace_sample_detail

    trace = Trace.open(trace_dir)
    if warning := trace.incomplete_warning():
        render.warn(warning)
    detail = trace_sample_detail(trace, sample_id, MetricOptions(tau=tau))
    render.stdout.print(_header(detail, tau), markup=False, highlight=False, soft_wrap=True)
    render.stdout.print(_pathway_table(detail))
    render.stdout.print(_consistency_table(detail))
    render.stdout.print(_token_table(detail, tokens))
    if detail.degenerate:
        render.stderr.print(f"warning: {degenerate_warning(len(detail.pathway.layers))}",
                            markup=False, highlight=False)


def _header(detail, tau: float) -> str:
    total, prompt = len(detail.token_ids), detail.num_prompt_tokens
    carried = "  ".join(f"{key}={render.fmt(value)}" for key, value in detail.carried.items())
    lines = [f"sample '{detail.sample_id}': {total} tokens ({prompt} prompt, "
             f"{total - prompt} generated)"]
    if carried:
        lines.append(carried)
    lines.append(f"pathway (tau {tau}, {detail.pathway.n_experts} experts): "
                 f"{detail.pathway.to_string()}")
    return "\n".join(lines)


def _pathway_table(detail):
    rows = [[layer, f"{len(kept)}/{detail.num_experts}", share,
             ", ".join(f"{e}:{w:.3f}" for e, w in zip(kept, weights, strict=True))]
            for layer, (kept, weights, share)
            in enumerate(zip(detail.pathway.layers, detail.weights, detail.layer_share,
                             strict=True))]
    table = render.table("pathway by layer", ["layer", "kept", "share", "expert:mean weight"],
                         rows)
    table.columns[-1].justify = "left"
    table.caption = "share: the layer's routing weight the kept experts carry"
    return table


def _consistency_table(detail):
    rows = [[f"cos({layer}, {layer + 1})", cosine] for layer, cosine in enumerate(detail.cosines)]
    rows += [["consistency", _metric(detail, detail.consistency)],
             ["complexity", _metric(detail, detail.complexity)]]
    return render.table("consistency profile", ["", "value"], rows)


def _metric(detail, value: float):
    return "n/a (degenerate)" if detail.degenerate or math.isnan(value) else value


def _token_table(detail, tokens: int):
    shown = min(tokens, len(detail.token_ids))
    rows = [[int(detail.positions[t]), int(detail.token_ids[t]),
             "prompt" if t < detail.num_prompt_tokens else "gen",
             " ".join(",".join(map(str, layer)) for layer in detail.expert_ids[t].tolist())]
            for t in range(shown)]
    table = render.table(f"first {shown} of {len(detail.token_ids)} tokens",
                         ["pos", "token", "part", "top-k experts, layer 0 first"], rows)
    table.columns[-1].justify = "left"
    return table


def register(app: typer.Typer) -> None:
    app.command()(show)

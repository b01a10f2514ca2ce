"""``moepath metrics TRACE_DIR``: pathway distance and consistency per group of samples."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..tracer.errors import InputError
from ..tracer.intervals import MIN_SAMPLES
from . import options as o
from . import render

PerSample = Annotated[Path | None, typer.Option(help="Also write per-sample pathways and "
                      "consistency to this .csv or .parquet file.")]
Layers = Annotated[bool, typer.Option("--layers", help="Add the per-layer distance profile.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
PER_SAMPLE_FORMATS = (".csv", ".parquet")


def metrics(
    trace_dir: o.TraceDir,
    tau: o.Tau = 0.7,
    unit: o.Unit = "char",
    normalize: o.Normalize = "none",
    source: o.Source = "full",
    group_by: o.GroupBy = None,
    pairs: o.Pairs = "auto",
    seed: o.Seed = 0,
    per_sample: PerSample = None,
    layers: Layers = False,
    as_json: Json = False,
    level: o.Level = 0.95,
    resamples: o.Resamples = 1000,
) -> None:
    """Pathway distance (Metric 1) and consistency (Metric 2) by group.

    One row for each group of samples (--group-by), or for all samples."""
    from ..tracer import Trace
    from ..tracer.metrics import MetricOptions, trace_metrics, trace_sample_frame

    options = MetricOptions(tau=tau, unit=unit, normalize=normalize, source=source,
                            pairs=o.parse_pairs(pairs), seed=seed, level=level,
                            resamples=resamples)
    _check_per_sample_path(per_sample)
    trace = Trace.open(trace_dir)
    if warning := trace.incomplete_warning():
        render.warn(warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = trace_metrics(trace, options, group_by)
        frame = trace_sample_frame(trace, options) if per_sample else None
    if as_json:
        render.print_json(_payload(options, groups))
    else:
        tables = [_group_table(trace_dir, options, groups), _sharing_table(options, groups),
                  _consistency_table(options, groups), _controls_table(options, groups)]
        if layers:
            tables += [_layer_table(options, groups), _cosine_table(groups)]
        for i, table in enumerate(tables):
            render.stdout.print(*[""] if i else [], table, sep="\n")
    _notices(groups, [str(w.message) for w in caught], seed)
    if frame is not None:
        _write_frame(frame, per_sample)


def _check_per_sample_path(path: Path | None) -> None:
    """Refuse a --per-sample file we cannot write before computing anything."""
    if path is None:
        return
    if path.suffix.lower() not in PER_SAMPLE_FORMATS:
        raise InputError(f"--per-sample file '{path}' has extension '{path.suffix}'; "
                         f"use one of {', '.join(PER_SAMPLE_FORMATS)}")
    if not path.parent.is_dir():
        raise InputError(f"--per-sample file '{path}': folder '{path.parent}' does not exist; "
                         "create it first")


def _write_frame(frame, path: Path) -> None:
    if path.suffix.lower() == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    render.stderr.print(f"wrote {len(frame)} sample(s) to {path}")


def _payload(options, groups) -> dict:
    """The --json object: options, the degenerate flag, one entry per group (NaN -> null)."""
    entries = []
    for group in groups:
        entry = {key: value for key, value in asdict(group).items() if key != "degenerate"}
        entries.append({key: None if isinstance(value, float) and math.isnan(value) else value
                        for key, value in entry.items()})
    return {"tau": options.tau, "unit": options.unit, "normalize": options.normalize,
            "source": options.source, "level": options.level, "resamples": options.resamples,
            "seed": options.seed, "degenerate": any(g.degenerate for g in groups),
            "groups": entries}


def _group_table(trace_dir: Path, options, groups):
    rows = [[escape(g.name), g.n_samples, g.n_pairs,
             _estimate(g.distance_mean, g.distance_stderr, g.distance_exact),
             _estimate(g.normalized_distance_mean, g.normalized_distance_stderr, g.distance_exact),
             "n/a" if g.degenerate or g.consistency_mean is None else g.consistency_mean,
             "n/a" if g.degenerate or g.complexity_mean is None else g.complexity_mean,
             g.mean_pathway_length] for g in groups]
    title = f"pathway metrics of {trace_dir}"
    # headers hyphenated to leave the group names room at 80 columns
    result = render.table(title, ["group", "sam-\nples", "pairs", "dis-\ntance",
                                  "dis-\ntance\n/ max", "consis-\ntency", "com-\nplex-\nity",
                                  "experts\n/ path"], rows)
    result.caption = (f"tau {options.tau}, source {options.source}, distance in "
                      f"{options.unit} edits; / max: divided by the longer pathway's length; "
                      "experts / path: mean experts kept per sample")
    return _compact(result)


def _sharing_table(options, groups):
    """Distance with its interval, against random routing of the same pathway lengths."""
    rows = [[escape(g.name), _interval(g.distance_ci_low, g.distance_ci_high),
             _with_error(g.baseline_distance, g.baseline_distance_stderr),
             _value(g.excess_sharing, 3),
             _interval(g.normalized_distance_ci_low, g.normalized_distance_ci_high),
             _value(g.baseline_normalized_distance)] for g in groups]
    ci = f"{options.level:.0%} CI"
    result = render.table("distance against random routing",
                          ["group", f"distance\n{ci}", "random\nrouting", "excess\nsharing",
                           f"/ max\n{ci}", "random\n/ max"], rows)
    result.caption = (f"CI: bootstrap over samples ({_intervals_note(options)}); random "
                      "routing: the expected distance of pathways with the group's lengths "
                      "per layer and random experts (± simulation error); excess sharing: "
                      "1 - distance / random routing, 0 = no more shared than chance")
    return _compact(result)


def _consistency_table(options, groups):
    """Metric 2 robustly: its interval, median, trimmed mean, and where it breaks down."""
    rows = [[escape(g.name), *(["n/a"] * 5 if _no_consistency(g) else [
        g.consistency_mean, _interval(g.consistency_ci_low, g.consistency_ci_high),
        g.consistency_median, g.consistency_trimmed_mean, g.nonpositive_cosine_share])]
        for g in groups]
    result = render.table("consistency, robustly",
                          ["group", "mean", f"{options.level:.0%} CI", "median",
                           "trimmed\nmean", "max cos\n<= 0"], rows)
    result.caption = ("trimmed mean: 10% cut from each end; max cos <= 0: share of samples "
                      "whose largest consecutive-layer cosine is <= 0, where the mean "
                      "explodes")
    return _compact(result)


def _controls_table(options, groups):
    """What the metrics move with: pathway length, routing entropy, router norm."""
    rows = [[escape(g.name), g.mean_pathway_length,
             _interval(g.pathway_length_ci_low, g.pathway_length_ci_high),
             _value(g.routing_entropy),
             _interval(g.routing_entropy_ci_low, g.routing_entropy_ci_high),
             _value(g.router_norm)] for g in groups]
    ci = f"{options.level:.0%} CI"
    result = render.table("controls", ["group", "experts\n/ path", ci, "routing\nentropy",
                                       ci, "router\nnorm"], rows)
    result.caption = ("routing entropy: mean over samples and layers of the entropy of the "
                      "routing distribution (nats); router norm: mean L2 norm of the router "
                      "rows, a property of the checkpoint")
    return _compact(result)


def _layer_table(options, groups):
    depth = max((len(g.per_layer_distance or []) for g in groups), default=0)
    rows = [[layer, *("n/a" if g.per_layer_distance is None else g.per_layer_distance[layer]
                      for g in groups)] for layer in range(depth)]
    title = f"per-layer distance ({options.unit}, normalize {options.normalize})"
    result = render.table(title, ["layer", *(escape(g.name) for g in groups)], rows)
    result.min_width = len(title)  # a table of few groups would wrap its title
    for column in result.columns[1:]:  # the group names are the headers here: never cut
        column.overflow = "fold"
    return _compact(result)


def _cosine_table(groups):
    depth = max((len(g.per_layer_cosine or []) for g in groups), default=0)
    rows = [[f"{layer}-{layer + 1}", *("n/a" if not g.per_layer_cosine
                                       else g.per_layer_cosine[layer] for g in groups)]
            for layer in range(depth)]
    title = "per-layer cosine of layers l and l+1 (group mean)"
    result = render.table(title, ["layers", *(escape(g.name) for g in groups)], rows)
    result.min_width = len(title)
    for column in result.columns[1:]:
        column.overflow = "fold"
    return _compact(result)


def _compact(table):
    """No outer border or edge padding: eight columns fit an 80-column terminal; the caption
    reads from the left, as the title does."""
    table.show_edge, table.pad_edge, table.caption_justify = False, False, "left"
    return table


def _no_consistency(group) -> bool:
    return group.degenerate or group.consistency_mean is None


def _value(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else render.fmt(value, digits)


def _interval(low: float | None, high: float | None) -> str:
    """``[low, high]`` to 3 significant digits, "n/a" without an interval."""
    if low is None or high is None:
        return "n/a"
    return f"[{render.fmt(low, 3)}, {render.fmt(high, 3)}]"


def _with_error(value: float | None, error: float | None) -> str:
    return "n/a" if value is None else f"{render.fmt(value)} ± {error:.1g}"


def _intervals_note(options) -> str:
    if options.resamples == 0:
        return "none: --resamples 0"
    return (f"BCa, {options.resamples} resamples, seed {options.seed}; none for groups of "
            f"fewer than {MIN_SAMPLES} samples")


def _estimate(mean: float | None, stderr: float | None, exact: bool) -> str:
    if mean is None:
        return "n/a"
    return render.fmt(mean) if exact else f"{render.fmt(mean)}\n± {stderr:.2g}"


def _notices(groups, warned: list[str], seed: int) -> None:
    """Library warnings (e.g. degenerate), group notes and sampled estimates, on stderr."""
    for message in dict.fromkeys(warned):
        render.warn(message)
    for group in groups:
        if group.note:
            render.stderr.print(f"note: {group.note}", markup=False, highlight=False)
        if not group.distance_exact:
            render.stderr.print(
                f"note: the distance of group '{group.name}' ({group.n_samples:,} samples) is "
                f"estimated from {group.n_pairs:,} sampled pairs (mean ± standard error, "
                f"seed {seed}); --pairs N sets how many", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(metrics)

"""The files of ``moepath compare``: the metrics, layers and samples tables, ``report.md``
and small PNG plots.

Writes what :mod:`.compare`, :mod:`.memorisation` and :mod:`.correlation`
computed (:func:`write_outputs` takes a :class:`.compare.CompareAnalysis`); no
metric math here. Input is the long metrics frame
(checkpoint, step, group, metric, value, optional ci_low and ci_high) whose metric
names are :data:`METRIC_NAMES`, and the per-layer frame (checkpoint, step, group, layer,
metric, value). matplotlib is imported only inside :func:`plot_metrics` and
:func:`plot_layers`, which draw on Agg canvases of their own (no pyplot, no global
backend switch).
"""

from __future__ import annotations

import os
from itertools import cycle
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .correlation import (
    GROUP_SIZE,
    VALIDATION_LOSS,
    check_metrics_frame,
    checkpoint_steps,
    resolve_scores,
    table1,
)
from .errors import MetricError
from .memorisation import MemorisationResult, memorised_group_name

if TYPE_CHECKING:
    from .compare import CompareAnalysis

# The metric names of the long frame (compare.checkpoint_metrics writes exactly these).
DISTANCE = "distance"
DISTANCE_STDERR = "distance_stderr"
NORMALIZED_DISTANCE = "normalized_distance"
PATHWAY_LENGTH = "pathway_length"
CONSISTENCY = "consistency"
COMPLEXITY = "complexity"
LOSS = "loss"
N_SAMPLES = "n_samples"
BASELINE_DISTANCE = "baseline_distance"
BASELINE_NORMALIZED_DISTANCE = "baseline_normalized_distance"
EXCESS_SHARING = "excess_sharing"
ROUTING_ENTROPY = "routing_entropy"
ROUTER_NORM = "router_norm"
CONSISTENCY_MEDIAN = "consistency_median"
CONSISTENCY_TRIMMED_MEAN = "consistency_trimmed_mean"
NONPOSITIVE_COSINE_SHARE = "nonpositive_cosine_share"
METRIC_NAMES = (DISTANCE, DISTANCE_STDERR, NORMALIZED_DISTANCE, BASELINE_DISTANCE,
                BASELINE_NORMALIZED_DISTANCE, EXCESS_SHARING, PATHWAY_LENGTH, ROUTING_ENTROPY,
                ROUTER_NORM, CONSISTENCY, CONSISTENCY_MEDIAN, CONSISTENCY_TRIMMED_MEAN,
                NONPOSITIVE_COSINE_SHARE, COMPLEXITY, LOSS, N_SAMPLES)
# plot file -> (metric, axis label); each drawn with its interval band where rows have one
PLOTS = {
    "distance.png": (DISTANCE, "mean pathway distance"),
    "normalized_distance.png": (NORMALIZED_DISTANCE, "normalised pathway distance"),
    "excess_sharing.png": (EXCESS_SHARING, "excess sharing (1 - distance / baseline)"),
    "pathway_length.png": (PATHWAY_LENGTH, "mean pathway length (experts)"),
    "routing_entropy.png": (ROUTING_ENTROPY, "routing entropy (nats)"),
    "consistency.png": (CONSISTENCY, "pathway consistency"),
    "loss.png": (LOSS, "mean training loss (NLL)"),
}
# the per-layer figure (plot_layers), beside the PLOTS
LAYERS_PLOT = "layers.png"
# a second line per group, dotted, on a metric's plot: the reference it is read against
_COMPANIONS = {DISTANCE: BASELINE_DISTANCE, NORMALIZED_DISTANCE: BASELINE_NORMALIZED_DISTANCE,
               CONSISTENCY: CONSISTENCY_MEDIAN}
_DETAIL_COLUMNS = ("group", "metric", "n", "group size", "steps", "pearson [95% CI] (p)",
                   "spearman (p)", "changes r (p)", "trend p (q)", "partial r (p)",
                   "too small", "note")
VERDICT_EXPLANATION = [
    "Held-out accuracy usually rises with step, so any metric with a trend correlates with "
    "it: two unrelated random walks reach |r| > 0.8 against such a curve about a third of "
    "the time, and the p-values of Pearson and Spearman, which assume independent "
    "checkpoints, call that significant. Each verdict is instead a test against a null that "
    "keeps the metric's trend: its changes between consecutive checkpoints are put in "
    "random order and summed again from the same start (same start, end and changes), and "
    "p is the share of these surrogates that correlate with the score at least as strongly "
    "(|r|). *Survives* means the timing of the metric's changes follows the score beyond "
    "what its trend gives; *indistinguishable from a shared trend* means it does not; "
    "*cannot tell* means the data cannot answer: too few checkpoints or too small a group, "
    "or too few orderings for p to reach the level (4 checkpoints: 6 orderings, p >= 0.17). "
    "A real relation that is only a shared trend cannot be told from a common clock by "
    "any test on one run. Method: docs/method.md, \"Statistics\"."]
DETAILS_EXPLANATION = [
    "pearson's interval and p, and spearman's p, assume independent checkpoints (too "
    "optimistic for trending series); changes r: Pearson of the first differences (change "
    "vs change); trend p: the verdicts' test, q: its Benjamini-Hochberg adjustment over the "
    "rows not too small; partial r: given the control metric(s) of the same group (Pearson "
    "of least-squares residuals); group size: the smallest `n_samples` over the "
    "checkpoints."]
PLOT_SIZE_INCHES, PLOT_DPI = (6.0, 3.5), 100  # 600 x 350 px, tens of KB
MAX_PLOTTED_GROUPS = 8  # more lines are unreadable: a plot draws the largest groups
_MISSING = "—"
_GROUP_COLUMNS = ("checkpoint", "step", "n", "distance [CI]", "normalised distance [CI]",
                  "baseline distance", "excess sharing", "pathway length [CI]",
                  "routing entropy [CI]", "consistency [CI]", "consistency median / trimmed",
                  "max cos ≤ 0", "complexity", "router norm", "mean loss")

# docs/method.md "The paper's headline numbers": Table 1 (OLMoE), Pearson / Spearman vs accuracy.
PAPER_TABLE1 = pd.DataFrame(
    {
        "math": ["-0.947 / -0.949", "0.925 / 0.949", "-0.04 / -0.21"],
        "code": ["-0.929 / -0.928", "0.979 / 0.986", "-0.07 / -0.21"],
        "commonsense": ["-0.982 / -0.975", "0.980 / 0.975", "0.64 / 0.41"],
        "domain": ["-0.925 / -0.949", "0.992 / 0.949", "0.79 / 0.95"],
    },
    index=pd.Index(["pathway distance", "pathway consistency", "training loss"], name="metric"),
)
PAPER_NOTE = ("Raw distances (tau 0.7) about 480-580; consistency-type values 0.24-0.44. On a "
              "55M-parameter MoE (nanoMoE) both metrics reach |r| 0.8-1.0.")


def write_outputs(out_dir: str | Path, analysis: CompareAnalysis, command: str) -> list[Path]:
    """Write every file of a comparison into ``out_dir``; return their paths in this order:
    metrics.parquet, metrics.csv (long format), samples.parquet, layers.parquet and
    layers.csv (per-layer profiles, when computed), the :data:`PLOTS`, layers.png, and
    report.md (last: it links the plots that exist). ``command``: the command line the
    report shows."""
    files = write_tables(out_dir, analysis.metrics, analysis.samples, analysis.layers)
    files += plot_metrics(out_dir, analysis.metrics, analysis.scores)
    if analysis.layers is not None:
        files.append(plot_layers(out_dir, analysis.layers))
    files.append(write_report(out_dir, analysis.metrics, analysis.correlations, analysis.scores,
                              command, analysis.versions, analysis.notes, analysis.memorisation,
                              analysis.no_correlation))
    return files


def write_tables(out_dir: str | Path, metrics: pd.DataFrame, samples: pd.DataFrame,
                 layers: pd.DataFrame | None = None) -> list[Path]:
    """metrics.parquet, metrics.csv (the long metrics frame), samples.parquet (one row per
    checkpoint x sample; ``t_star`` as nullable Float64) and, given ``layers``,
    layers.parquet and layers.csv (the long per-layer frame: one row per checkpoint x group
    x layer x metric; see ``compare.LAYER_COLUMNS``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics.to_parquet(out / "metrics.parquet", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    samples.assign(t_star=samples["t_star"].astype("Float64")).to_parquet(
        out / "samples.parquet", index=False)
    files = [out / "metrics.parquet", out / "metrics.csv", out / "samples.parquet"]
    if layers is not None:
        layers.to_parquet(out / "layers.parquet", index=False)
        layers.to_csv(out / "layers.csv", index=False)
        files += [out / "layers.parquet", out / "layers.csv"]
    return files


def write_report(out_dir: str | Path, metrics: pd.DataFrame, correlations: pd.DataFrame | None,
                 scores: pd.DataFrame | None, command: str, versions: dict, notes: list[str],
                 memorisation: MemorisationResult | None = None,
                 no_correlation: str | None = None) -> Path:
    """Write ``out_dir/report.md`` atomically and return its path.

    Sections: command and versions; per group, a table of its checkpoints; the
    memorisation summary (when ``memorisation`` is given; else pass it in ``notes``);
    the correlations in Table 1 layout with their details and the scores (or why there
    are none: ``no_correlation``, e.g. "1 checkpoint: correlation needs at least 3"); the
    paper's reference numbers; the plots already in ``out_dir`` (call
    :func:`plot_metrics` first); ``notes`` (warnings), and how many correlations
    could not be computed (each row's note says why in the details table).

    Raises:
        MetricError: ``metrics`` lacks a column, repeats a value, or has a metric not
            in :data:`METRIC_NAMES`.
        InputError: bad ``scores`` (see :func:`.correlation.read_scores`).
    """
    check_metrics(metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        ["# moepath compare report"],
        _run_section(command, versions),
        _checkpoint_section(metrics),
        _memorisation_section(memorisation) if memorisation is not None else [],
        _correlation_section(correlations, scores, metrics, no_correlation),
        _paper_section(),
        _plot_section(out),
        _notes_section(notes, correlations),
    ]
    path = out / "report.md"
    partial = out / "report.md.partial"
    partial.write_text("\n\n".join("\n".join(s) for s in sections if s) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def check_metrics(metrics: pd.DataFrame) -> None:
    """MetricError unless ``metrics`` is a long frame (one value per checkpoint, group and
    metric) of known metric names."""
    check_metrics_frame(metrics)
    unknown = sorted(set(metrics["metric"]) - set(METRIC_NAMES))
    if unknown:
        raise MetricError(f"metrics frame has unknown metric(s) {unknown}; use the names in "
                          f"report.METRIC_NAMES: {', '.join(METRIC_NAMES)}")


def _run_section(command: str, versions: dict) -> list[str]:
    rows = [[name, version] for name, version in versions.items()]
    return ["## Command and versions", "", "```", command, "```", "",
            *_table(["package", "version"], rows)]


def _checkpoint_section(metrics: pd.DataFrame) -> list[str]:
    lines = ["## Checkpoints", "",
             "Per group and checkpoint. `mean [low, high]`: a bootstrap confidence interval "
             "over the group's samples (MetricOptions.level, 95% by default; groups of fewer "
             "than 10 samples have none; for a group measured on sampled pairs it includes the "
             "pair-sampling noise). Without an interval, a sampled-pairs distance shows ± its "
             "standard error. Baseline: the expected distance of random routing with the same "
             "per-layer pathway lengths; excess sharing = 1 - distance / baseline "
             "(0: no more sharing than chance). Consistency median / trimmed: the median and "
             "10%-trimmed mean over samples; max cos ≤ 0: the share of samples whose largest "
             "consecutive-layer cosine is at most 0 (their consistency is no measurement of "
             "smoothness). Routing entropy in nats; router norm: mean L2 norm of the router "
             "rows. A group of one sample has no distance."]
    wide, low, high = _wide(metrics), _wide(metrics, "ci_low"), _wide(metrics, "ci_high")
    for group in dict.fromkeys(metrics["group"]):
        rows = [_checkpoint_row(name, step, row, low.loc[(group, name, step)],
                                high.loc[(group, name, step)])
                for (name, step), row in wide.loc[group].iterrows()]
        lines += ["", f"### {group}", "", *_table(list(_GROUP_COLUMNS), rows)]
    return lines


def _wide(metrics: pd.DataFrame, column: str = "value") -> pd.DataFrame:
    """[(group, checkpoint, step) x metric] of ``column`` (value, ci_low or ci_high; NaN where
    the frame lacks it), each group's checkpoints by step."""
    frame = metrics if column in metrics.columns else metrics.assign(**{column: float("nan")})
    values = frame.assign(value=pd.to_numeric(frame[column], errors="coerce"))
    wide = values.pivot(index=["group", "checkpoint", "step"], columns="metric", values="value")
    wide = wide.reindex(columns=list(METRIC_NAMES))
    return wide.sort_index(level="step", sort_remaining=False)


def _checkpoint_row(name: str, step: int, row: pd.Series, low: pd.Series,
                    high: pd.Series) -> list[str]:
    def interval(metric: str, digits: int) -> str:
        text = _number(row[metric], digits)
        if text != _MISSING and pd.notna(low[metric]) and pd.notna(high[metric]):
            text += f" [{low[metric]:.{digits}f}, {high[metric]:.{digits}f}]"
        return text

    distance = interval(DISTANCE, 2)
    if (distance != _MISSING and pd.isna(low[DISTANCE]) and pd.notna(row[DISTANCE_STDERR])
            and row[DISTANCE_STDERR] > 0):
        distance += f" ± {row[DISTANCE_STDERR]:.2f}"
    n = _MISSING if pd.isna(row[N_SAMPLES]) else str(int(row[N_SAMPLES]))
    robust = _MISSING
    if pd.notna(row[CONSISTENCY_MEDIAN]):
        robust = (f"{_number(row[CONSISTENCY_MEDIAN], 4)} / "
                  f"{_number(row[CONSISTENCY_TRIMMED_MEAN], 4)}")
    return [str(name), str(step), n, distance, interval(NORMALIZED_DISTANCE, 4),
            _number(row[BASELINE_DISTANCE], 2), _number(row[EXCESS_SHARING], 3),
            interval(PATHWAY_LENGTH, 2), interval(ROUTING_ENTROPY, 3),
            interval(CONSISTENCY, 4), robust, _percent(row[NONPOSITIVE_COSINE_SHARE]),
            _number(row[COMPLEXITY], 4), _number(row[ROUTER_NORM], 3), _number(row[LOSS], 4)]


def _percent(value) -> str:
    return _MISSING if value is None or pd.isna(value) else f"{value:.0%}"


def _memorisation_section(result: MemorisationResult) -> list[str]:
    counts = result.t_star.dropna().astype(int).value_counts().sort_index()
    total, memorised = len(result.t_star), int(result.t_star.notna().sum())
    rows = [[memorised_group_name(step), str(count)] for step, count in counts.items()]
    return ["## Memorisation", "",
            f"{result.thresholds()}: "
            f"{memorised} of {total} samples memorised ({result.fraction_memorised:.1%}). "
            "A sample is memorised from t* when at every checkpoint from t* on its loss is at "
            "most epsilon and within delta of its final loss.", "",
            *_table(["group", "samples"], rows or [[_MISSING, "0"]])]


def _correlation_section(correlations: pd.DataFrame | None, scores: pd.DataFrame | None,
                         metrics: pd.DataFrame, no_correlation: str | None) -> list[str]:
    lines = ["## Correlation with the scores", ""]
    if correlations is None:
        if no_correlation is not None:
            return lines + [f"No correlation was computed: {no_correlation}."]
        return lines + ["No scores were supplied, so no correlation was computed."]
    layout = table1(correlations)
    rows = [[metric, *cells] for metric, cells in zip(layout.index, layout.to_numpy().tolist(),
                                                      strict=True)]
    lines += ["Pearson / Spearman of each metric against the score over checkpoints "
              "(the paper's Table 1 layout; a validation loss in the scores file gets its "
              "own row, the monitor a pathway metric is read against). `too small`: over "
              "too few checkpoints or a group "
              "of too few samples (`--min-checkpoints`, `--min-group-size`) to be a finding; "
              "its numbers are in the Details.", "",
              *_table(["metric", *map(str, layout.columns)], rows), "",
              "### Verdicts", "", *VERDICT_EXPLANATION, "",
              *_table(["group", "metric", "pearson", "verdict"],
                      [[str(r.group), str(r.metric), _number(r.pearson, 3), r.verdict]
                       for r in correlations.itertuples()]),
              "", "### Details", "", *DETAILS_EXPLANATION, "",
              *_table(list(_DETAIL_COLUMNS),
                      [_correlation_row(row) for row in correlations.itertuples()])]
    if scores is not None:
        lines += ["", "### Scores", "", *_scores_table(
            resolve_scores(scores, checkpoint_steps(metrics)))]
    return lines


def _scores_table(scores: pd.DataFrame) -> list[str]:
    """The resolved scores by step, with the validation loss where the file has one."""
    scores = scores.sort_values(["step", "group"], na_position="first")
    validation = VALIDATION_LOSS in scores.columns
    header = ["checkpoint", "step", "group", "score", *(["validation loss"] if validation else [])]
    rows = [[r.checkpoint, str(r.step), r.group or "(all)", f"{r.score:g}",
             *([_MISSING if pd.isna(loss) else f"{loss:g}"] if validation else [])]
            for r, loss in zip(scores.itertuples(), scores.get(VALIDATION_LOSS, scores["score"]),
                               strict=True)]
    return _table(header, rows)


def _correlation_row(row) -> list[str]:
    steps = _MISSING if row.n == 0 else f"{row.first_step}-{row.last_step}"
    interval = ("" if pd.isna(row.pearson_low)
                else f" [{row.pearson_low:.2f}, {row.pearson_high:.2f}]")
    partial = (_MISSING if row.partial_control is None else
               f"{_number(row.partial, 3)} ({_number(row.partial_p, 3)}) on "
               f"{row.partial_control}")
    return [str(row.group), str(row.metric), str(row.n), _number(row.group_size, 0), steps,
            f"{_number(row.pearson, 3)}{interval} ({_number(row.pearson_p, 3)})",
            f"{_number(row.spearman, 3)} ({_number(row.spearman_p, 3)})",
            f"{_number(row.diff_pearson, 3)} ({_number(row.diff_pearson_p, 3)})",
            f"{_number(row.trend_p, 3)} ({_number(row.trend_q, 3)})", partial,
            row.too_small or "", row.note or ""]


def _paper_section() -> list[str]:
    rows = [[metric, *cells] for metric, cells in zip(PAPER_TABLE1.index,
                                                      PAPER_TABLE1.to_numpy().tolist(),
                                                      strict=True)]
    return ["## The paper's numbers (arXiv 2506.21551, Table 1, OLMoE-1B-7B)", "",
            "Pearson / Spearman of each metric against test accuracy.", "",
            *_table(["metric", *PAPER_TABLE1.columns], rows), "", PAPER_NOTE]


def _plot_section(out: Path) -> list[str]:
    found = [name for name in (*PLOTS, LAYERS_PLOT) if (out / name).is_file()]
    if not found:
        return []
    return ["## Plots", "", *[f"![{name.removesuffix('.png')}]({name})" for name in found]]


def _notes_section(notes: list[str], correlations: pd.DataFrame | None) -> list[str]:
    skipped = 0 if correlations is None else int(correlations["note"].notna().sum())
    items = [*notes] + ([f"{skipped} correlation(s) could not be computed; the Details table "
                         "says why"] if skipped else [])
    return ["## Notes", "", *([f"- {item}" for item in items] or ["(none)"])]


def _number(value, digits: int) -> str:
    return _MISSING if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table (``|`` in cells escaped)."""
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)]


def plot_metrics(out_dir: str | Path, metrics: pd.DataFrame,
                 scores: pd.DataFrame | None = None) -> list[Path]:
    """Write the :data:`PLOTS` (each metric over steps, a line per group with its interval
    band, see :func:`_plot_groups`) into ``out_dir``.

    With ``scores`` (as for :func:`.correlation.correlate`), the score is drawn
    dashed on a second y-axis, one line per score group. With more than
    :data:`MAX_PLOTTED_GROUPS` groups, a plot draws the largest (by their smallest
    ``n_samples`` over the checkpoints) and says so in its title. Each PNG is
    :data:`PLOT_SIZE_INCHES` at :data:`PLOT_DPI`. Returns the paths in :data:`PLOTS` order.

    Raises:
        MetricError: bad ``metrics`` (see :func:`check_metrics`).
        InputError: bad ``scores``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_metrics(metrics)
    resolved = None if scores is None else resolve_scores(scores, checkpoint_steps(metrics))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    drawn = largest_groups(metrics, MAX_PLOTTED_GROUPS)
    shown, total = drawn["group"].nunique(), metrics["group"].nunique()
    which = f": the {shown} largest of {total} groups" if shown < total else ""
    for name, (metric, label) in PLOTS.items():
        figure = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        handles = _plot_groups(axes, drawn, metric, label)
        axes.set_title(f"{label} by checkpoint{which}", fontsize=9)
        if resolved is not None:
            axes = axes.twinx()  # the legend goes on the top axes, above the score lines
            handles += _plot_scores(axes, resolved)
        if handles:
            axes.legend(handles=handles, fontsize=7, ncol=1 + len(handles) // 8, loc="best")
        figure.tight_layout()
        figure.savefig(out / name)
        paths.append(out / name)
    return paths


def largest_groups(metrics: pd.DataFrame, most: int) -> pd.DataFrame:
    """The rows of the ``most`` groups with the largest smallest ``n_samples`` (all rows
    when there are at most ``most`` groups, or no sizes); order kept, ties by order."""
    groups = list(dict.fromkeys(metrics["group"]))
    sizes = metrics[metrics["metric"] == GROUP_SIZE].groupby("group", sort=False)["value"]
    if len(groups) <= most or sizes.ngroups == 0:
        return metrics
    smallest = pd.to_numeric(sizes.min(), errors="coerce").reindex(groups).fillna(-1)
    kept = set(smallest.sort_values(ascending=False, kind="stable").index[:most])
    return metrics[metrics["group"].isin(kept)]


def _plot_groups(axes, metrics: pd.DataFrame, metric: str, label: str) -> list:
    """One line per group with its interval band (ci_low to ci_high; for a distance without
    one, ± its stderr) and, dotted, its :data:`_COMPANIONS` line (the baseline of a distance,
    the median of consistency); returns the legend handles."""
    axes.set_xlabel("step")
    axes.set_ylabel(label)
    wide, low, high = _wide(metrics), _wide(metrics, "ci_low"), _wide(metrics, "ci_high")
    handles, companion = [], _COMPANIONS.get(metric)
    for group in dict.fromkeys(metrics["group"]):
        rows = wide.loc[group].dropna(subset=[metric])
        if rows.empty:
            continue
        steps = rows.index.get_level_values("step").to_numpy()
        (line,) = axes.plot(steps, rows[metric].to_numpy(), marker="o", markersize=3,
                            label=str(group))
        handles.append(line)
        band = _band(rows, low.loc[group].loc[rows.index], high.loc[group].loc[rows.index],
                     metric)
        if band is not None:
            axes.fill_between(steps, *band, color=line.get_color(), alpha=0.2, linewidth=0)
        if companion is not None and rows[companion].notna().any():
            axes.plot(steps, rows[companion].to_numpy(), linestyle=":",
                      color=line.get_color(), linewidth=1)
    if companion is not None and handles:
        (key,) = axes.plot([], [], linestyle=":", color="0.4",
                           label=companion.replace("_", " ") + " (dotted)")
        handles.append(key)
    if not handles:
        axes.text(0.5, 0.5, f"no {metric} values", ha="center", va="center",
                  transform=axes.transAxes)
    return handles


def _band(rows: pd.DataFrame, low: pd.DataFrame, high: pd.DataFrame, metric: str):
    """(lower, upper) arrays of a group's band, or None when it has none."""
    if low[metric].notna().any():
        values = rows[metric]
        return (low[metric].fillna(values).to_numpy(), high[metric].fillna(values).to_numpy())
    if metric == DISTANCE and rows[DISTANCE_STDERR].fillna(0).gt(0).any():
        spread = rows[DISTANCE_STDERR].fillna(0)
        return (rows[metric] - spread).to_numpy(), (rows[metric] + spread).to_numpy()
    return None


def plot_layers(out_dir: str | Path, layers: pd.DataFrame, group: str | None = None) -> Path:
    """Write :data:`LAYERS_PLOT`: one group's per-layer distance (left) and mean cosine of
    layers l and l+1 (right), one line per checkpoint, coloured by step.

    ``layers``: the long per-layer frame (``compare.LAYER_COLUMNS``). ``group``: which
    group (default ``all`` if present, else the first). Returns the path.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(layers["group"]))
    group = group or ("all" if "all" in names else (names[0] if names else None))
    mine = layers[layers["group"] == group]
    figure = Figure(figsize=(PLOT_SIZE_INCHES[0] * 1.5, PLOT_SIZE_INCHES[1]), dpi=PLOT_DPI)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2)
    steps = sorted(set(mine["step"]))
    colours = colormaps["viridis"]
    for axes, metric in zip(panels, _layer_metrics(mine), strict=False):
        rows = mine[mine["metric"] == metric]
        for i, (step, by_step) in enumerate(rows.groupby("step", sort=True)):
            by_step = by_step.sort_values("layer")
            axes.plot(by_step["layer"], by_step["value"], marker="o", markersize=2,
                      color=colours(i / max(1, len(steps) - 1)), label=f"step {step}")
        pair = " (layer l to l+1)" if metric == "cosine" else ""
        axes.set_xlabel("layer l" + pair)
        axes.set_ylabel(f"mean {metric.replace('_', ' ')}")
        axes.set_title(f"group {group}: {metric.replace('_', ' ')} by layer", fontsize=9)
    if len(steps) and len(panels[0].get_lines()):
        panels[0].legend(fontsize=6, ncol=1 + len(steps) // 8, loc="best")
    if mine.empty:
        panels[0].text(0.5, 0.5, "no per-layer values", ha="center", va="center",
                       transform=panels[0].transAxes)
    figure.tight_layout()
    figure.savefig(out / LAYERS_PLOT)
    return out / LAYERS_PLOT


def _layer_metrics(layers: pd.DataFrame) -> list[str]:
    """The distance metric first, then the cosine profile."""
    names = list(dict.fromkeys(layers["metric"]))
    return sorted(names, key=lambda name: name == "cosine")


def _plot_scores(axes, scores: pd.DataFrame) -> list:
    """One dashed line per score group on the second axis; returns the legend handles."""
    axes.set_ylabel("score")
    handles = []
    markers = cycle(["s", "^", "v", "D", "x", "+"])
    for group, rows in scores.groupby("group", dropna=False, sort=False):
        rows = rows.sort_values("step")
        name = "score" if pd.isna(group) else f"score: {group}"
        (line,) = axes.plot(rows["step"], rows["score"], linestyle="--", color="0.25",
                            marker=next(markers), markersize=3, label=name)
        handles.append(line)
    return handles

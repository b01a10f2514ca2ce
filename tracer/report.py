"""The files of ``moepath compare``: the metrics and samples tables, ``report.md`` and
three small PNG plots.

Writes what :mod:`.compare`, :mod:`.memorisation` and :mod:`.correlation`
computed (:func:`write_outputs` takes a :class:`.compare.CompareAnalysis`); no
metric math here. Input is the long metrics frame
(checkpoint, step, group, metric, value) whose metric names are
:data:`METRIC_NAMES`. matplotlib is imported only inside :func:`plot_metrics`,
which draws on an Agg canvas of its own (no pyplot, no global backend switch).
"""

from __future__ import annotations

import os
from itertools import cycle
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .correlation import check_metrics_frame, checkpoint_steps, resolve_scores, table1
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
METRIC_NAMES = (DISTANCE, DISTANCE_STDERR, NORMALIZED_DISTANCE, PATHWAY_LENGTH, CONSISTENCY,
                COMPLEXITY, LOSS, N_SAMPLES)
# plot file -> (metric, axis label)
PLOTS = {
    "distance.png": (DISTANCE, "mean pathway distance"),
    "consistency.png": (CONSISTENCY, "pathway consistency"),
    "loss.png": (LOSS, "mean training loss (NLL)"),
}
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
_MISSING = "—"
_GROUP_COLUMNS = ("checkpoint", "step", "n", "distance (mean ± stderr)", "normalised distance",
                  "pathway length", "consistency", "complexity", "mean loss")

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
    metrics.parquet, metrics.csv (long format), samples.parquet, the :data:`PLOTS`, and
    report.md (last: it links the plots that exist). ``command``: the command line the
    report shows."""
    files = write_tables(out_dir, analysis.metrics, analysis.samples)
    files += plot_metrics(out_dir, analysis.metrics, analysis.scores)
    files.append(write_report(out_dir, analysis.metrics, analysis.correlations, analysis.scores,
                              command, analysis.versions, analysis.notes, analysis.memorisation,
                              analysis.no_correlation))
    return files


def write_tables(out_dir: str | Path, metrics: pd.DataFrame, samples: pd.DataFrame) -> list[Path]:
    """metrics.parquet, metrics.csv (the long metrics frame) and samples.parquet (one row per
    checkpoint x sample; ``t_star`` as nullable Float64)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics.to_parquet(out / "metrics.parquet", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    samples.assign(t_star=samples["t_star"].astype("Float64")).to_parquet(
        out / "samples.parquet", index=False)
    return [out / "metrics.parquet", out / "metrics.csv", out / "samples.parquet"]


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
             "Per group and checkpoint. The distance's ± is the standard error of a sampled-pairs "
             "estimate (0 when every pair was compared); a group of one sample has no distance."]
    wide = _wide(metrics)
    for group in dict.fromkeys(metrics["group"]):
        rows = [_checkpoint_row(name, step, row)
                for (name, step), row in wide.loc[group].iterrows()]
        lines += ["", f"### {group}", "", *_table(list(_GROUP_COLUMNS), rows)]
    return lines


def _wide(metrics: pd.DataFrame) -> pd.DataFrame:
    """[(group, checkpoint, step) x metric] values, each group's checkpoints by step."""
    values = metrics.assign(value=pd.to_numeric(metrics["value"], errors="coerce"))
    wide = values.pivot(index=["group", "checkpoint", "step"], columns="metric", values="value")
    wide = wide.reindex(columns=list(METRIC_NAMES))
    return wide.sort_index(level="step", sort_remaining=False)


def _checkpoint_row(name: str, step: int, row: pd.Series) -> list[str]:
    distance = _number(row[DISTANCE], 2)
    if distance != _MISSING and pd.notna(row[DISTANCE_STDERR]):
        distance += f" ± {row[DISTANCE_STDERR]:.2f}"
    n = _MISSING if pd.isna(row[N_SAMPLES]) else str(int(row[N_SAMPLES]))
    return [str(name), str(step), n, distance, _number(row[NORMALIZED_DISTANCE], 4),
            _number(row[PATHWAY_LENGTH], 2), _number(row[CONSISTENCY], 4),
            _number(row[COMPLEXITY], 4), _number(row[LOSS], 4)]


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
              "(the paper's Table 1 layout). `too small`: over too few checkpoints or a group "
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
        resolved = resolve_scores(scores, checkpoint_steps(metrics)).sort_values(
            ["step", "group"], na_position="first")
        lines += ["", "### Scores", "", *_table(
            ["checkpoint", "step", "group", "score"],
            [[r.checkpoint, str(r.step), r.group or "(all)", f"{r.score:g}"]
             for r in resolved.itertuples()])]
    return lines


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
    found = [name for name in PLOTS if (out / name).is_file()]
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
    """Write the :data:`PLOTS` (each metric over steps, a line per group) into ``out_dir``.

    With ``scores`` (as for :func:`.correlation.correlate`), the score is drawn
    dashed on a second y-axis, one line per score group. Each PNG is
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
    for name, (metric, label) in PLOTS.items():
        figure = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        handles = _plot_groups(axes, metrics, metric, label)
        if resolved is not None:
            axes = axes.twinx()  # the legend goes on the top axes, above the score lines
            handles += _plot_scores(axes, resolved)
        if handles:
            axes.legend(handles=handles, fontsize=7, ncol=1 + len(handles) // 8, loc="best")
        figure.tight_layout()
        figure.savefig(out / name)
        paths.append(out / name)
    return paths


def _plot_groups(axes, metrics: pd.DataFrame, metric: str, label: str) -> list:
    """One line per group (a stderr band around distances); returns the legend handles."""
    axes.set_xlabel("step")
    axes.set_ylabel(label)
    axes.set_title(f"{label} by checkpoint", fontsize=9)
    wide, handles = _wide(metrics), []
    for group in dict.fromkeys(metrics["group"]):
        rows = wide.loc[group].dropna(subset=[metric])
        if rows.empty:
            continue
        steps = rows.index.get_level_values("step").to_numpy()
        (line,) = axes.plot(steps, rows[metric].to_numpy(), marker="o", markersize=3,
                            label=str(group))
        handles.append(line)
        if metric == DISTANCE and rows[DISTANCE_STDERR].fillna(0).gt(0).any():
            spread = rows[DISTANCE_STDERR].fillna(0).to_numpy()
            axes.fill_between(steps, rows[metric] - spread, rows[metric] + spread,
                              color=line.get_color(), alpha=0.2, linewidth=0)
    if not handles:
        axes.text(0.5, 0.5, f"no {metric} values", ha="center", va="center",
                  transform=axes.transAxes)
    return handles


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

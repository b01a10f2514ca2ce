"""The multi-seed study: what the testbed's statistics support across seeds (``make study``).

Run from the repository root (hours on 2 CPU cores; every seed's training and traces
are cached, so an interrupted study resumes where it stopped):

    .venv/bin/python bench/grokking/study.py --out study-out --seeds 0 1 2

For each seed, trains ``testbed.DEFAULT`` with that seed (``out/seedN/testbed``) and
compares its checkpoints exactly as ``moepath demo`` does (``out/seedN/compare``:
report.md, metrics, plots; ``correlations.csv`` beside them). Then, over the seeds:

1. per domain and seed, the correlation of each metric with the domain's held-out
   accuracy (Pearson with its interval, Spearman, the trend-preserving p and verdict) for
   the domain's *tracked group*: its earliest memorisation group ``t*=N/<domain>`` that is
   large and long enough to headline (at least 20 samples over at least 5 checkpoints;
   followed from its t* to the end); and per (domain, metric) whether the seeds agree on a
   direction: their trend-preserving p-values made one-sided and combined by Stouffer's
   method (``scipy.stats.combine_pvalues``; the seeds are independent runs);
2. the prediction test (``tracer/prediction.prediction_test``): pooled over domains and
   seeds, does a metric's change over the last ``window`` checkpoints predict the change
   of held-out accuracy over the next ``window``, beyond the step, and better than
   training loss does? (tracked groups; windows 1 and 2);
3. the order test (``tracer/prediction.order_test``): within each seed, do the domains'
   metrics reach half of their net change in the order their accuracies do?

Writes ``out/study.json`` and ``out/study.md`` (the tables; printed too) with the
commit, machine and load averages. The metric definitions are docs/method.md's; nothing
here is tuned to a result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from moepath.fixtures import testbed
from moepath.tracer.memorisation import parse_memorised_group
from moepath.tracer.prediction import Series, order_test, prediction_test

# metric name in compare's frame -> the words of the README (docs/method.md)
METRICS = {"distance": "raw distance", "normalized_distance": "normalised distance",
           "excess_sharing": "excess sharing", "consistency": "consistency"}
REFERENCE = {"loss": "training loss"}
PREDICTORS = {**METRICS, **REFERENCE}
WINDOWS = (1, 2)
# the columns of compare's correlations the study keeps for each tracked group
CORRELATION_FIELDS = ("metric", "n", "first_step", "last_step", "pearson", "pearson_low",
                      "pearson_high", "spearman", "trend_p", "diff_pearson", "group_size",
                      "verdict")
ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("study-out"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    args = parser.parse_args()
    start, load = time.perf_counter(), os.getloadavg()
    runs = {seed: run_seed(seed, args.out / f"seed{seed}", args.gpu_memory_utilization)
            for seed in args.seeds}
    study = {"commit": _commit(), "date": date.today().isoformat(), "machine": _machine(),
             "load_average_start": load, "load_average_end": os.getloadavg(),
             "seconds": round(time.perf_counter() - start), "config": asdict(testbed.DEFAULT),
             "seeds": args.seeds, **analyse(runs)}
    (args.out / "study.json").write_text(json.dumps(study, indent=2, default=_plain) + "\n")
    text = markdown(study)
    (args.out / "study.md").write_text(text)
    print(text)


def run_seed(seed: int, out: Path, memory: float):
    """(testbed result, compare analysis) of one seed: trained and traced unless cached."""
    from moepath.patches.comparison import compare_checkpoints
    from moepath.patches.options import EngineOptions, TraceOptions
    from moepath.tracer.samples import SampleReadOptions

    def log(line: str) -> None:
        print(f"[seed {seed}] {line}", file=sys.stderr, flush=True)

    config = replace(testbed.DEFAULT, seed=seed)
    result, _ = testbed.build(config, out / "testbed", log)
    log("comparing its checkpoints (complete traces are skipped)")
    compared = compare_checkpoints(
        [out / "testbed" / "checkpoints"], out / "testbed" / "samples.jsonl", out / "compare",
        testbed.compare_options(result),
        EngineOptions(dtype=testbed.TRACE_DTYPE, gpu_memory_utilization=memory,
                      engine_core="auto"),
        TraceOptions(), SampleReadOptions(), command=f"bench/grokking/study.py (seed {seed})")
    compared.analysis.correlations.to_csv(out / "compare" / "correlations.csv", index=False)
    return result, compared.analysis


def tracked_groups(correlations: pd.DataFrame) -> dict[str, str]:
    """domain -> its earliest memorisation group fit to headline (not too small, a
    correlation computed), judged on the raw-distance row."""
    fit = correlations[(correlations["metric"] == "distance") & correlations["too_small"].isna()
                       & correlations["note"].isna()]
    chosen: dict[str, tuple[int, str]] = {}
    for group in fit["group"]:
        t_star, domain = parse_memorised_group(group)
        if domain not in chosen or t_star < chosen[domain][0]:
            chosen[domain] = (t_star, group)
    return {domain: group for domain, (_, group) in sorted(chosen.items())}


def analyse(runs: dict) -> dict:
    """The study's numbers: tracked groups, correlations, combined p, prediction, order."""
    series, rows, groups = [], [], {}
    for seed, (result, analysis) in runs.items():
        groups[seed] = tracked_groups(analysis.correlations)
        for domain, group in groups[seed].items():
            rows += _correlation_rows(seed, domain, analysis.correlations, group)
            series.append(_series(seed, domain, group, analysis.metrics, result))
    correlations = pd.DataFrame(rows, columns=["seed", "domain", "group", *CORRELATION_FIELDS])
    study = {
        "tracked_groups": groups,
        "rise": {seed: {d: asdict(r) for d, r in result.rise.items()}
                 for seed, (result, _) in runs.items()},
        "correlations": correlations.to_dict("records"),
        "combined": _combined(correlations),
        "verdict_counts": _verdict_counts(runs),
        "prediction": [], "order": [], "not_tested": None,
    }
    if len({s.run for s in series}) < 2:
        study["not_tested"] = (f"tracked groups in {len({s.run for s in series})} seed(s); "
                               "prediction and order need two or more")
        return study
    study["prediction"] = [asdict(prediction_test(series, name, window))
                           for window in WINDOWS for name in PREDICTORS]
    study["order"] = [asdict(order_test(series, name)) for name in PREDICTORS]
    return study


def _correlation_rows(seed: int, domain: str, correlations: pd.DataFrame,
                      group: str) -> list[dict]:
    mine = correlations[(correlations["group"] == group)
                        & correlations["metric"].isin(list(PREDICTORS))]
    return [{"seed": seed, "domain": domain, "group": group, **row}
            for row in mine[list(CORRELATION_FIELDS)].to_dict("records")]


def _series(seed: int, domain: str, group: str, metrics: pd.DataFrame, result) -> Series:
    """The tracked group's metrics and its domain's held-out accuracy, from its t* on."""
    t_star, _ = parse_memorised_group(group)
    mine = metrics[(metrics["group"] == group) & (metrics["step"] >= t_star)]
    wide = mine.pivot(index="step", columns="metric", values="value").sort_index()
    accuracy = result.heldout_accuracy(domain)
    return Series(str(seed), domain, wide.index.to_numpy(),
                  np.array([accuracy[int(step)] for step in wide.index]),
                  {name: wide[name].to_numpy(float) for name in PREDICTORS})


def _combined(correlations: pd.DataFrame) -> list[dict]:
    """Per (domain, metric): do the seeds agree on a direction? Each seed's two-sided
    trend-preserving p is made one-sided for a positive r (p / 2 when r > 0, else
    1 - p / 2; the null's |r| is symmetric), the seeds are combined with Stouffer's method
    (``scipy.stats.combine_pvalues``: independent runs, equal weights), and the combined
    one-sided p is made two-sided again. Seeds correlating significantly in opposite
    directions cancel instead of adding up, as they would in Fisher's method on the
    two-sided p."""
    out = []
    for (domain, metric), rows in correlations.groupby(["domain", "metric"], sort=True):
        rows = rows.dropna(subset=["trend_p", "pearson"])
        positive = np.where(rows["pearson"] > 0, rows["trend_p"] / 2, 1 - rows["trend_p"] / 2)
        combined = (stats.combine_pvalues(positive, method="stouffer").pvalue
                    if len(rows) else np.nan)
        out.append({"domain": domain, "metric": metric, "seeds": len(rows),
                    "negative_r": int((rows["pearson"] < 0).sum()),
                    "mean_pearson": float(rows["pearson"].mean()),
                    "combined_p": float(min(1.0, 2 * min(combined, 1 - combined))),
                    "combined_direction": "+" if combined < 0.5 else "-"})
    return out


def _verdict_counts(runs: dict) -> dict:
    """Per metric, over every group fit to headline (no note, not too small) of every seed:
    how many verdicts survive the trend-preserving null, are indistinguishable from a shared
    trend, cannot tell (a test too coarse to reach the level)."""
    counts = {}
    for name in PREDICTORS:
        verdicts = pd.concat([
            a.correlations.loc[(a.correlations["metric"] == name)
                               & a.correlations["too_small"].isna()
                               & a.correlations["note"].isna(), "verdict"]
            for _, a in runs.values()])
        counts[name] = {"survives": int(verdicts.str.startswith("survives").sum()),
                        "shared trend": int(verdicts.str.startswith("indistinguishable").sum()),
                        "cannot tell": int(verdicts.str.contains("cannot tell").sum())}
    return counts


def markdown(study: dict) -> str:
    """The study's tables in Markdown."""
    lines = [f"# Multi-seed study ({study['date']}, commit {study['commit']})", "",
             f"Machine: {study['machine']}; load average {study['load_average_start'][0]:.1f} "
             f"at the start, {study['load_average_end'][0]:.1f} at the end; "
             f"{study['seconds'] / 60:.0f} minutes. Seeds {study['seeds']}.", "",
             "## Generalisation (first evaluated step with held-out accuracy >= 50% / 90%)", "",
             "| seed | " + " | ".join(next(iter(study["rise"].values()))) + " |",
             "|---|" + "---|" * len(next(iter(study["rise"].values())))]
    for seed, rises in study["rise"].items():
        lines.append(f"| {seed} | " + " | ".join(
            f"{r['heldout_50_step']} / {r['heldout_90_step']}" for r in rises.values()) + " |")
    lines += ["", "## Correlation with the domain's held-out accuracy (tracked groups)", "",
              "Pearson [95% interval] / Spearman, trend-preserving p.", "",
              "| seed | domain | group | checkpoints | " + " | ".join(PREDICTORS.values())
              + " |", "|---|---|---|---|" + "---|" * len(PREDICTORS)]
    frame = pd.DataFrame(study["correlations"], columns=["seed", "domain", "group",
                                                          *CORRELATION_FIELDS])
    for (seed, domain), rows in frame.groupby(["seed", "domain"], sort=True):
        by_metric = rows.set_index("metric")
        first = rows.iloc[0]
        cells = [_cell(by_metric.loc[m]) if m in by_metric.index else "—" for m in PREDICTORS]
        lines.append(f"| {seed} | {domain} | {first['group']} ({first['group_size']:.0f}) | "
                     f"{first['first_step']}-{first['last_step']} ({first['n']}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "Seeds combined: Stouffer's method on the trend-preserving p made one-sided "
              "(a direction the seeds share; opposite signs cancel), the direction, mean "
              "Pearson, seeds with r < 0:", "",
              "| domain | " + " | ".join(PREDICTORS.values()) + " |",
              "|---|" + "---|" * len(PREDICTORS)]
    combined = pd.DataFrame(study["combined"], columns=["domain", "metric", "seeds", "negative_r",
                                                         "mean_pearson", "combined_p",
                                                         "combined_direction"])
    for domain, rows in combined.groupby("domain", sort=True):
        by_metric = rows.set_index("metric")
        lines.append(f"| {domain} | " + " | ".join(
            _combined_cell(by_metric.loc[m]) if m in by_metric.index else "—"
            for m in PREDICTORS) + " |")
    lines += ["", "Verdicts over every group fit to headline of every seed (survives / shared "
              "trend / cannot tell):", "", "| metric | survives | shared trend | cannot tell |",
              "|---|---|---|---|"]
    lines += [f"| {PREDICTORS[m]} | {c['survives']} | {c['shared trend']} | {c['cannot tell']} |"
              for m, c in study["verdict_counts"].items()]
    if study["not_tested"]:
        return "\n".join([*lines, "", f"Prediction and order not tested: {study['not_tested']}."]
                         ) + "\n"
    lines += ["", "## Prediction: does the change over the last w checkpoints predict the "
              "accuracy change over the next w?", "",
              "Out-of-sample R^2 (leave one seed out), pooled over domains and seeds; gain over "
              "the step alone with a 95% bootstrap interval over series; p: the predictor's "
              "changes in random order within each series.", "",
              "| w | predictor | rows | R^2 | R^2 step alone | gain [95%] | p | slope |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['window']} | {PREDICTORS[r['predictor']]} | {r['rows']} | {r['r2']:.3f} | "
              f"{r['r2_step']:.3f} | {r['gain']:+.3f} [{r['gain_low']:+.3f}, "
              f"{r['gain_high']:+.3f}] | {r['pvalue']:.3g} | {r['coefficient']:+.4f} |"
              for r in study["prediction"]]
    lines += ["", "## Order: do the domains' metrics move in the order their accuracies do?", "",
              "Kendall's tau per seed between the steps at which each domain's metric and its "
              "accuracy cover half of their net change (tracked groups); p: every assignment "
              "of each seed's metric steps to its domains.", "",
              "| metric | tau per seed | mean tau | p |", "|---|---|---|---|"]
    lines += [f"| {PREDICTORS[r['metric']]} | "
              + ", ".join(f"{s}: {t:+.2f}" for s, t in r["taus"].items())
              + f" | {r['mean_tau']:+.2f} | {r['pvalue']:.3g} |" for r in study["order"]]
    return "\n".join(lines) + "\n"


def _cell(row) -> str:
    return (f"{row['pearson']:+.2f} [{row['pearson_low']:+.2f}, {row['pearson_high']:+.2f}] / "
            f"{row['spearman']:+.2f}, p={row['trend_p']:.2g}")


def _combined_cell(row) -> str:
    return (f"p={row['combined_p']:.2g} ({row['combined_direction']}), mean r "
            f"{row['mean_pearson']:+.2f}, {row['negative_r']}/{row['seeds']} < 0")


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip() or "unknown"


def _machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPUs, {model}"


def _plain(value):
    """JSON for numpy scalars and arrays."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else str(value)


if __name__ == "__main__":
    main()

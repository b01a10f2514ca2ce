"""The compare report: report.md's sections and tables, and three small valid PNGs."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from moepath.tracer.correlation import correlate
from moepath.tracer.errors import MetricError
from moepath.tracer.memorisation import memorise
from moepath.tracer.report import (
    METRIC_NAMES,
    PLOTS,
    largest_groups,
    plot_metrics,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = {"step1000": 1000, "step2000": 2000, "step3000": 3000}


def metrics_frame() -> pd.DataFrame:
    """Groups all (sampled pairs), math (exact) and a one-sample t* group without distances."""
    rows = []
    for i, (name, step) in enumerate(STEPS.items()):
        for group in ("all", "math", "t*=2000"):
            values = {"n_samples": 1 if group == "t*=2000" else 12, "loss": 2.5 - 0.5 * i,
                      "consistency": 0.30 + 0.05 * i, "complexity": 0.70 - 0.05 * i}
            values |= {"consistency_median": 0.32 + 0.05 * i,
                       "consistency_trimmed_mean": 0.31 + 0.05 * i,
                       "nonpositive_cosine_share": 0.25 - 0.05 * i,
                       "routing_entropy": 1.5 - 0.1 * i, "router_norm": 2.0 + 0.1 * i}
            if group != "t*=2000":
                values |= {"distance": 540.0 - 20 * i, "normalized_distance": 0.41 - 0.02 * i,
                           "distance_stderr": 1.25 if group == "all" else 0.0,
                           "pathway_length": 96.0 + i, "baseline_distance": 600.0 + 10 * i,
                           "baseline_normalized_distance": 0.5 + 0.01 * i,
                           "excess_sharing": 1 - (540.0 - 20 * i) / (600.0 + 10 * i)}
            rows += [{"checkpoint": name, "step": step, "group": group, "metric": metric,
                      "value": value, **INTERVALS.get((group, metric), {})}
                     for metric, value in values.items()]
    return pd.DataFrame(rows)


# math's distance and consistency have bootstrap intervals (the same at every checkpoint)
INTERVALS = {("math", "distance"): {"ci_low": -10.0, "ci_high": 10.0},
             ("math", "consistency"): {"ci_low": -0.01, "ci_high": 0.02}}


def interval_frame() -> pd.DataFrame:
    """metrics_frame with each interval around its value (ci columns hold offsets above)."""
    frame = metrics_frame()
    return frame.assign(ci_low=frame["value"] + frame["ci_low"],
                        ci_high=frame["value"] + frame["ci_high"])


SCORES = pd.DataFrame({"checkpoint": list(STEPS), "score": [0.20, 0.35, 0.60]})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    metrics = interval_frame()
    plot_metrics(tmp_path, metrics, SCORES)
    losses = pd.DataFrame([[3.0, 1.0, 0.5], [3.0, 3.0, 2.5]], columns=list(STEPS.values()),
                          index=["a", "b"])
    correlations = correlate(metrics, SCORES, min_checkpoints=3, min_group_size=12,
                             control="pathway_length")
    path = write_report(tmp_path, metrics, correlations, SCORES,
                        "moepath compare ckpts/ --scores acc.csv", {"moepath": "0.1.0"},
                        ["consistency is degenerate: fewer than 3 MoE layers"],
                        memorisation=memorise(losses, epsilon=1.0, delta=0.6))
    return path.read_text()


def test_report_has_command_versions_and_checkpoint_tables(report):
    assert "```\nmoepath compare ckpts/ --scores acc.csv\n```" in report
    assert "| moepath | 0.1.0 |" in report
    for group in ("### all", "### math", "### t*=2000"):
        assert group in report
    header = ("| checkpoint | step | n | distance [CI] | normalised distance [CI] | "
              "baseline distance | excess sharing | pathway length [CI] | routing entropy [CI] "
              "| consistency [CI] | consistency median / trimmed | max cos ≤ 0 | complexity | "
              "router norm | mean loss |")
    assert report.count(header) == 3
    # all: sampled pairs without an interval show ± stderr; math: intervals, exact distance
    assert ("| step1000 | 1000 | 12 | 540.00 ± 1.25 | 0.4100 | 600.00 | 0.100 | 96.00 | 1.500 "
            "| 0.3000 | 0.3200 / 0.3100 | 25% | 0.7000 | 2.000 | 2.5000 |") in report
    assert ("| step3000 | 3000 | 12 | 500.00 [490.00, 510.00] | 0.3700 | 620.00 | 0.194 | 98.00 "
            "| 1.300 | 0.4000 [0.3900, 0.4200] | 0.4200 / 0.4100 | 15% | 0.6000 | 2.200 | 1.5000 |"
            ) in report
    assert ("| step2000 | 2000 | 1 | — | — | — | — | — | 1.400 | 0.3500 | 0.3700 / 0.3600 | 20% "
            "| 0.6500 | 2.100 | 2.0000 |") in report


def test_report_has_memorisation_correlation_paper_plots_and_notes(report):
    assert ("epsilon 1 (explicit), delta 0.6: 1 of 2 samples memorised (50.0%)"
            in report)
    assert "| t*=2000 | 1 |" in report
    assert "| metric | all | math | t*=2000 |" in report
    # every trajectory is linear in i, the score is not: Pearson < 1, Spearman exactly 1
    # the one-sample group is below --min-group-size 12: not headlined
    assert "| pathway consistency | 0.990 / 1.000 | 0.990 / 1.000 | too small |" in report
    assert "| pathway distance | -0.990 / -1.000 | -0.990 / -1.000 | n/a / n/a |" in report
    assert ("| t*=2000 | distance | 0 | — | — | — (—) | — (—) | — (—) | — (—) | "
            "— (—) on pathway_length | too few checkpoints (0 < 3) | "
            "the group has no distance values |") in report
    # 3 checkpoints: 2 orderings of the changes, no interval narrower than (-1, 1)
    assert ("| math | consistency | 3 | 12 | 1000-3000 | 0.990 [-1.00, 1.00] (0.091) | "
            "1.000 (0.000) | — (—) | 1.000 (1.000) | — (—) on pathway_length |  |  |") in report


def test_report_gives_a_verdict_in_words_for_each_correlation(report):
    assert "### Verdicts" in report and "same start, end and changes" in report
    assert ("| math | consistency | 0.990 | cannot tell: with 3 checkpoints the "
            "trend-preserving p cannot go below 0.5 > 0.05 |") in report
    assert ("| t*=2000 | loss | -0.990 | group too small (1 < 12 samples): cannot tell "
            "(trend-preserving p=1) |") in report
    assert "| t*=2000 | distance | — | cannot tell: the group has no distance values |" \
        in report
    assert "| step2000 | 2000 | (all) | 0.35 |" in report
    assert "| pathway distance | -0.947 / -0.949 | -0.929 / -0.928 | -0.982 / -0.975 |" in report
    assert "480-580" in report
    for name in PLOTS:
        assert f"]({name})" in report
    assert "- consistency is degenerate: fewer than 3 MoE layers" in report
    # t*=2000 (one sample) has no distance, normalised distance, baseline distance, baseline
    # normalised distance, excess sharing or pathway length
    assert "- 6 correlation(s) could not be computed" in report
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections == ["## Command and versions", "## Checkpoints", "## Memorisation",
                        "## Correlation with the scores",
                        "## The paper's numbers (arXiv 2506.21551, Table 1, OLMoE-1B-7B)",
                        "## Plots", "## Notes"]


def test_report_without_scores(tmp_path):
    text = write_report(tmp_path, metrics_frame(), None, None, "moepath compare x", {}, []
                        ).read_text()
    assert "No scores were supplied, so no correlation was computed." in text
    assert "## Memorisation" not in text and "## Plots" not in text
    assert "## Notes\n\n(none)" in text
    assert not (tmp_path / "report.md.partial").exists()


@pytest.mark.parametrize("scores", [SCORES, None])
def test_plots_are_small_valid_pngs(tmp_path, scores):
    paths = plot_metrics(tmp_path, interval_frame(), scores)
    assert [p.name for p in paths] == list(PLOTS)
    assert list(PLOTS) == ["distance.png", "normalized_distance.png", "excess_sharing.png",
                           "pathway_length.png", "routing_entropy.png", "consistency.png",
                           "loss.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert int.from_bytes(data[16:20], "big") == 600  # IHDR width: 6 in x 100 dpi
        assert len(data) < 200_000


def test_a_plot_of_many_groups_draws_the_largest_and_keeps_their_order():
    frame = pd.concat([metrics_frame().assign(group=f"t*={n}").assign(
        value=lambda f, n=n: f["value"].where(f["metric"] != "n_samples", n % 7))
        for n in range(10)])
    drawn = largest_groups(frame, 3)
    assert list(dict.fromkeys(drawn["group"])) == ["t*=4", "t*=5", "t*=6"]  # sizes 4, 5, 6
    assert largest_groups(frame, 10) is frame


def test_metrics_frame_with_unknown_metric_is_refused(tmp_path):
    frame = metrics_frame().replace({"metric": {"distance": "pathway_distance"}})
    with pytest.raises(MetricError, match=r"unknown metric\(s\) \['pathway_distance'\]"):
        write_report(tmp_path, frame, None, None, "x", {}, [])
    assert set(metrics_frame()["metric"]) == set(METRIC_NAMES)


def test_importing_the_report_loads_no_matplotlib_vllm_typer_or_rich():
    code = ("import sys, moepath.tracer.report, moepath.tracer.correlation, "
            "moepath.tracer.memorisation; print(sorted(m for m in "
            "('matplotlib', 'vllm', 'typer', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"

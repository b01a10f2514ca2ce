"""The output layer: tables stay readable at 80 columns."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
from rich.console import Console

from moepath.cli import render
from moepath.tracer.correlation import correlate, table1


def rendered(table, width: int = 80) -> str:
    console = Console(width=width, record=True)
    console.print(table)
    return console.export_text()


def test_a_name_too_wide_for_its_column_wraps_instead_of_being_cut():
    names = ["moepath_arithmetic_addition_mod_97", "moepath_arithmetic_subtraction_mod_97"]
    table = render.table("t", ["group", "samples", "distance", "consistency", "complexity",
                               "experts / path"], [[name, 120, 17.5, 0.123456, 0.876544, 18.25]
                                                   for name in names])
    text = rendered(table)
    assert "…" not in text
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines()
                           if line.count("│") > 1)  # the body rows: a name over several lines
    assert all(name in first_column for name in names)
    assert text.count("0.1235") == 2 and text.count("0.8765") == 2


def summary(monkeypatch, correlations) -> str:
    """compare_summary's stdout for a run whose correlations are ``correlations``."""
    console = Console(width=200, record=True)
    monkeypatch.setattr(render, "stdout", console)
    monkeypatch.setattr(render, "stderr", Console(width=200, record=True))
    metrics = pd.DataFrame({"checkpoint": "c", "step": [0], "group": "all",
                            "metric": "n_samples", "value": [30]})
    analysis = SimpleNamespace(metrics=metrics, correlations=correlations,
                               table1=table1(correlations), notes=[])
    render.compare_summary(SimpleNamespace(analysis=analysis, out="out", files=[]))
    return console.export_text()


def correlation_run(sizes: dict[str, int], checkpoints: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"checkpoint": f"s{i}", "step": i, "group": group, "metric": metric, "value": value}
            for group, size in sizes.items() for i in range(checkpoints)
            for metric, value in (("n_samples", size), ("distance", rng.normal()))]
    scores = pd.DataFrame({"checkpoint": [f"s{i}" for i in range(checkpoints)],
                           "score": np.linspace(0.1, 0.9, checkpoints)})
    return correlate(pd.DataFrame(rows), scores)


def test_the_compare_summary_gives_verdicts_only_for_correlations_fit_to_headline(monkeypatch):
    text = summary(monkeypatch, correlation_run({"big": 50, "small": 3}, 8))
    assert "too small" in text  # the small group's cell
    verdicts = text[text.index("verdicts against a null that keeps the metric's trend:"):]
    assert "big / distance (pearson " in verdicts and "small" not in verdicts
    assert ("indistinguishable from a shared trend" in verdicts
            or "survives the trend-preserving null" in verdicts)


def test_the_compare_summary_says_cannot_tell_when_every_correlation_is_too_small(monkeypatch):
    text = summary(monkeypatch, correlation_run({"small": 3}, 4))
    assert "verdict: cannot tell: no correlation has enough checkpoints and samples" in text
    assert "against a null" not in text

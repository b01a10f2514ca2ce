"""The embedded default end to end, shortened for CI: testbed (smoke) -> compare -> report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import TEST_MEMORY
from test_cli_trace import moepath

pytestmark = pytest.mark.vllm


def test_demo_smoke_trains_compares_and_reports(tmp_path):
    args = ("demo", "--smoke", "--out", tmp_path / "demo",
            "--gpu-memory-utilization", str(TEST_MEMORY))
    result = moepath(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    compare = tmp_path / "demo" / "compare-smoke"  # beside, never over, the full run's
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "compare-smoke", "testbed-smoke"]
    metrics = pd.read_csv(compare / "metrics.csv")
    assert sorted(set(metrics["step"])) == [0, 3, 6]
    assert {"distance", "consistency", "loss"} <= set(metrics["metric"])
    # the smoke run memorises nothing, so every sample is compared, per domain and pooled
    assert {"all", "add", "mul", "sub"} <= set(metrics["group"])
    assert "Correlation with the scores" in (compare / "report.md").read_text()
    assert (compare / "distance.png").stat().st_size > 1000
    manifest = json.loads((compare / "traces" / "step00006" / "manifest.json").read_text())
    assert manifest["model"]["dtype"] == "float32"  # the testbed's own precision
    again = moepath(*args)  # cached: nothing retrained, nothing re-traced
    said = " ".join(again.stderr.split())  # Rich wraps lines at 80 columns
    assert "testbed checkpoints in" in said and "are up to date" in said
    assert said.count("complete, skipped") == 3

"""`moepath metrics` and `moepath show` from the command line, on a synthetic trace (no vLLM).

The numbers printed must be the library's: each test recomputes them with
``group_metrics`` / ``select_experts`` in this process and compares.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import files_of
from test_metrics import SAMPLES, write_synthetic_trace

from moepath.tracer import Trace, store
from moepath.tracer.metrics import (
    MetricOptions,
    group_metrics,
    per_sample_frame,
    trace_distributions,
)
from moepath.tracer.pathways import select_experts


def moepath(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "moepath.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=env)


def assert_one_line_error(result, expected: str):
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moepath: error: "), result.stderr
    assert expected in lines[0], lines[0]


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return write_synthetic_trace(tmp_path_factory.mktemp("cli-metrics") / "trace")


@pytest.fixture(scope="module")
def trace(trace_dir):
    return Trace.open(trace_dir)


def domain_rows(trace, domain: str) -> list[int]:
    ids, _ = trace_distributions(trace)
    return [i for i, sid in enumerate(ids) if SAMPLES[sid][0] == domain]


def assert_same_group(entry: dict, expected):
    """A --json group entry carries exactly the library's GroupMetrics values."""
    assert entry["name"] == expected.name
    assert (entry["n_samples"], entry["n_pairs"]) == (expected.n_samples, expected.n_pairs)
    for key in ("distance_mean", "distance_stderr", "normalized_distance_mean",
                "per_layer_distance", "mean_pathway_length"):
        assert entry[key] == getattr(expected, key), key
    for key in ("consistency_mean", "complexity_mean"):  # float64 matmuls: same code, same box
        assert entry[key] == pytest.approx(getattr(expected, key), rel=1e-12, abs=1e-15), key
    # intervals, baseline, controls, robust consistency: every field, seeded, same values
    fields = {f.name for f in dataclasses.fields(expected)} - {"degenerate"}
    assert set(entry) == fields
    for key in sorted(fields - {"name", "note"}):
        assert entry[key] == pytest.approx(getattr(expected, key), rel=1e-9, abs=1e-12), key


def sections(stdout: str) -> dict[str, list[str]]:
    """The tables of `moepath metrics`' human output (separated by blank lines), by title."""
    blocks = [block.splitlines() for block in stdout.split("\n\n") if block.strip()]
    return {block[0].strip(): block[1:] for block in blocks}


def row_of(lines: list[str], name: str) -> list[str]:
    """The cells of the body row named ``name``."""
    [row] = [line for line in lines if line.split("│")[0].strip() == name]
    return [cell.strip() for cell in row.split("│")]


def test_json_equals_group_metrics(trace_dir, trace):
    result = moepath("metrics", trace_dir, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)  # the whole of stdout is one object
    assert {k: v for k, v in payload.items() if k != "groups"} == {
        "tau": 0.7, "unit": "char", "normalize": "none", "source": "full", "level": 0.95,
        "resamples": 1000, "seed": 0, "degenerate": False}
    _, g = trace_distributions(trace)
    [entry] = payload["groups"]
    assert_same_group(entry, group_metrics("all", g, trace.router_weights()))
    assert entry["n_samples"] == 9 and entry["n_pairs"] == 36 and entry["distance_stderr"] == 0
    assert len(entry["per_layer_distance"]) == 4
    assert result.stderr == ""


def test_json_carries_intervals_baseline_controls_and_robust_consistency(tmp_path):
    samples = {f"s{i}": ("math", 1000, 6 + i % 3, 6) for i in range(14)}  # >= MIN_SAMPLES
    trace_dir = write_synthetic_trace(tmp_path / "trace", samples=samples, seed=3)
    result = moepath("metrics", trace_dir, "--json", "--level", "0.9", "--resamples", "300",
                     "--seed", "2")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert (payload["level"], payload["resamples"], payload["seed"]) == (0.9, 300, 2)
    [entry] = payload["groups"]
    trace = Trace.open(trace_dir)
    expected = group_metrics("all", trace_distributions(trace)[1], trace.router_weights(),
                             MetricOptions(level=0.9, resamples=300, seed=2))
    assert_same_group(entry, expected)
    for metric in ("distance", "normalized_distance", "consistency", "pathway_length",
                   "routing_entropy"):
        mean = entry[f"{metric}_mean"] if f"{metric}_mean" in entry else entry.get(metric)
        mean = entry["mean_pathway_length"] if metric == "pathway_length" else mean
        assert entry[f"{metric}_ci_low"] <= mean <= entry[f"{metric}_ci_high"], metric
    assert entry["baseline_distance"] > 0 and entry["excess_sharing"] == pytest.approx(
        1 - entry["distance_mean"] / entry["baseline_distance"])
    assert len(entry["per_layer_cosine"]) == 3 and entry["router_norm"] > 0


def test_table_shows_intervals_random_routing_robust_consistency_and_controls(tmp_path):
    samples = {f"s{i}": ("math", 1000, 6 + i % 3, 6) for i in range(14)}  # >= MIN_SAMPLES
    trace_dir = write_synthetic_trace(tmp_path / "trace", samples=samples, seed=3)
    result = moepath("metrics", trace_dir, "--layers", "--level", "0.9")
    assert result.returncode == 0, result.stderr
    assert max(map(len, result.stdout.splitlines())) <= 80
    trace = Trace.open(trace_dir)
    m = group_metrics("all", trace_distributions(trace)[1], trace.router_weights(),
                      MetricOptions(level=0.9))
    tables = sections(result.stdout)

    def interval(metric: str) -> str:
        low, high = getattr(m, f"{metric}_ci_low"), getattr(m, f"{metric}_ci_high")
        return f"[{low:.3g}, {high:.3g}]"

    assert row_of(tables["distance against random routing"], "all") == [
        "all", interval("distance"), f"{m.baseline_distance:.4g} ± "
        f"{m.baseline_distance_stderr:.1g}", f"{m.excess_sharing:.3g}",
        interval("normalized_distance"), f"{m.baseline_normalized_distance:.4g}"]
    assert row_of(tables["consistency, robustly"], "all") == [
        "all", f"{m.consistency_mean:.4g}", interval("consistency"),
        f"{m.consistency_median:.4g}", f"{m.consistency_trimmed_mean:.4g}",
        f"{m.nonpositive_cosine_share:.4g}"]
    assert row_of(tables["controls"], "all") == [
        "all", f"{m.mean_pathway_length:.4g}", interval("pathway_length"),
        f"{m.routing_entropy:.4g}", interval("routing_entropy"), f"{m.router_norm:.4g}"]
    cosines = tables["per-layer cosine of layers l and l+1 (group mean)"]
    assert [row_of(cosines, f"{layer}-{layer + 1}")[1] for layer in range(3)] == [
        f"{c:.4g}" for c in m.per_layer_cosine]
    assert "90% CI" in " ".join(tables["controls"])

    unresampled = sections(moepath("metrics", trace_dir, "--resamples", "0").stdout)
    sharing = unresampled["distance against random routing"]
    assert row_of(sharing, "all")[1] == "n/a" and row_of(sharing, "all")[2] != "n/a"
    assert "none: --resamples 0" in " ".join(sharing)


def test_group_by_domain_sampled_pairs_and_a_group_of_one(trace_dir, trace):
    result = moepath("metrics", trace_dir, "--group-by", "domain", "--unit", "expert",
                     "--normalize", "max", "--pairs", "3", "--seed", "5", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert (payload["unit"], payload["normalize"]) == ("expert", "max")
    assert [entry["name"] for entry in payload["groups"]] == ["bio", "code", "math"]
    _, g = trace_distributions(trace)
    options = MetricOptions(unit="expert", normalize="max", pairs=3, seed=5)
    for entry in payload["groups"][1:]:
        expected = group_metrics(entry["name"], g[domain_rows(trace, entry["name"])],
                                 trace.router_weights(), options)
        assert_same_group(entry, expected)
        assert entry["n_pairs"] == 3 and entry["distance_stderr"] > 0
    bio = payload["groups"][0]
    assert (bio["n_samples"], bio["n_pairs"]) == (1, 0)
    assert bio["distance_mean"] is bio["distance_stderr"] is bio["per_layer_distance"] is None
    assert bio["note"].startswith("group 'bio' has 1 sample: pathway distance needs at least 2")
    stderr = " ".join(result.stderr.split())  # Rich wraps notices at 80 columns
    assert "note: group 'bio' has 1 sample" in stderr
    assert "the distance of group 'code' (4 samples) is estimated from 3 sampled pairs" in stderr
    assert "group 'math' (4 samples) is estimated from 3 sampled pairs" in stderr


def test_table_with_layers_and_per_sample_csv(trace_dir, trace, tmp_path):
    out = tmp_path / "per-sample.csv"
    result = moepath("metrics", trace_dir, "--group-by", "domain", "--layers", "--tau", "0.5",
                     "--per-sample", out)
    assert result.returncode == 0, result.stderr
    assert max(map(len, result.stdout.splitlines())) <= 80
    metrics_table = next(iter(sections(result.stdout).values()))  # the first: the metrics
    rows = {name: "│".join(row_of(metrics_table, name)) for name in ("bio", "code")}
    assert "n/a" in rows["bio"] and "n/a" not in rows["code"]
    code = group_metrics("code", trace_distributions(trace)[1][domain_rows(trace, "code")],
                         trace.router_weights(), MetricOptions(tau=0.5))
    assert f"{code.distance_mean:.4g}" in rows["code"]
    assert "per-layer distance (char, normalize none)" in result.stdout
    assert f"wrote 9 sample(s) to {out}" in " ".join(result.stderr.split())

    frame = pd.read_csv(out)
    ids, g = trace_distributions(trace)
    expected = per_sample_frame(ids, g, trace.router_weights(), MetricOptions(tau=0.5))
    assert list(frame.columns) == [*expected.columns, "domain", "step", "num_tokens"]
    assert frame["sample_id"].tolist() == ids == sorted(SAMPLES)  # metrics order samples by id
    assert frame["pathway"].tolist() == [select_experts(trace.router_mean(sid), 0.5).to_string()
                                         for sid in ids]
    assert frame["domain"].tolist() == [SAMPLES[sid][0] for sid in ids]
    np.testing.assert_allclose(frame["consistency"], expected["consistency"], rtol=1e-12)


def test_show_prints_the_pathway_and_tokens(trace_dir, trace):
    result = moepath("show", trace_dir, "c3", "--tokens", "8")
    assert result.returncode == 0, result.stderr
    assert select_experts(trace.router_mean("c3"), 0.7).to_string() in result.stdout
    assert "sample 'c3': 9 tokens (6 prompt, 3 generated)" in result.stdout
    assert "domain=code" in result.stdout and "first 8 of 9 tokens" in result.stdout
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    token_rows = [line for line in lines if line.startswith("│") and (
        " prompt " in line or " gen " in line)]
    assert len(token_rows) == 8 and sum(" gen " in line for line in token_rows) == 2
    first_token = int(trace.token_ids("c3")[0])
    assert str(first_token) in token_rows[0]
    assert " ".join(",".join(map(str, layer)) for layer in trace.topk("c3")[0][0]) \
        in token_rows[0]


@pytest.fixture
def failed_trace_dir(trace_dir, tmp_path):
    """The synthetic trace as a run that capture stopped."""
    shutil.copytree(trace_dir, tmp_path / "failed")
    manifest = store.read_manifest(tmp_path / "failed")
    manifest.update(status="failed", capture_error="routing shard write failed: disk full")
    store.write_manifest(tmp_path / "failed", manifest)
    return tmp_path / "failed"


@pytest.mark.parametrize("command", [("metrics", "--json"), ("show", "c3")])
def test_metrics_and_show_warn_about_a_trace_that_is_not_complete(failed_trace_dir, command):
    result = moepath(command[0], failed_trace_dir, *command[1:])
    assert result.returncode == 0, result.stderr
    warning = (f"warning: trace '{failed_trace_dir}' is failed, not complete (capture error: "
               f"routing shard write failed: disk full); results cover its {len(SAMPLES)} "
               f"committed sample(s) only: finish it with `moepath trace ... --resume`, or "
               f"re-run the `moepath compare` that wrote it")
    assert warning in result.stderr.splitlines()


def test_show_unknown_sample(trace_dir):
    result = moepath("show", trace_dir, "m00")
    assert_one_line_error(result, f"sample 'm00' is not in trace '{trace_dir}' (9 samples); "
                                  "did you mean 'm0'? list its ids with `moepath metrics")


def test_unknown_group_column(trace_dir):
    result = moepath("metrics", trace_dir, "--group-by", "topic")
    assert_one_line_error(result, "has no column 'topic'; group by one of: domain, step, "
                                  "num_tokens")


def test_normalize_changes_only_the_per_layer_distances_as_its_help_says(trace_dir):
    raw, divided = (json.loads(moepath("metrics", trace_dir, "--json", "--normalize", how).stdout)
                    ["groups"][0] for how in ("none", "max"))
    assert [key for key in raw if raw[key] != divided[key]] == ["per_layer_distance"]
    assert divided["normalized_distance_mean"] == raw["normalized_distance_mean"] < 1
    text = " ".join(moepath("metrics", "--help").stdout.replace("│", " ").split())
    assert ("Per-layer distances (--layers, and per_layer_distance in --json): none (paper) or "
            "max (each pair divided by the longer segment's length). Whole-pathway distances "
            "are always shown both raw and divided by the longer pathway's length.") in text


def test_group_names_sharing_a_prefix_are_shown_whole_at_80_columns(tmp_path):
    """lm-eval task names such as moepath_arith_a / _b once both read 'moepath_…'."""
    names = ["moepath_arith_a", "moepath_arith_b"]
    trace_dir = write_synthetic_trace(tmp_path / "trace", columns={
        "task": [names[i % 2] for i in range(len(SAMPLES))]})
    result = moepath("metrics", trace_dir, "--group-by", "task", "--layers")
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    tables = sections(result.stdout)
    for title, lines in tables.items():
        if not title.startswith("per-layer"):  # those name the groups in the header
            rows = [line.split()[0] for line in lines if "│" in line]
            assert [row for row in rows if row.startswith("moepath")] == names, title
    layer_header = next(line for line in result.stdout.splitlines() if line.startswith("layer"))
    assert all(name in layer_header for name in names)


def test_grouping_by_the_id_column_is_refused(trace_dir):
    result = moepath("metrics", trace_dir, "--group-by", "sample_id")
    assert_one_line_error(result, "cannot group by 'sample_id': every sample would be a group "
                                  "of its own; group by one of: domain, step, num_tokens")


def test_negative_seed_is_refused(trace_dir):
    result = moepath("metrics", trace_dir, "--pairs", "3", "--seed", "-1")
    assert_one_line_error(result, "seed -1 is not an integer >= 0; pass a seed such as 0")


@pytest.mark.parametrize("command", [("metrics", "--json"), ("show", "c3")])
def test_missing_trace_dir(tmp_path, command):
    result = moepath(command[0], tmp_path / "nope", *command[1:])
    assert_one_line_error(result, f"trace directory '{tmp_path / 'nope'}' does not exist")


@pytest.mark.parametrize("command", [("metrics", "--json"), ("show", "c3")])
@pytest.mark.parametrize("shard", ["routing/run-r0-000000.parquet", "samples/000000.parquet"])
def test_a_corrupted_shard_is_named_and_the_trace_left_as_it_is(trace_dir, tmp_path, command,
                                                               shard):
    damaged = shutil.copytree(trace_dir, tmp_path / "damaged")
    (damaged / shard).write_bytes((damaged / shard).read_bytes()[:-10] + b"0123456789")
    before = files_of(damaged)
    result = moepath(command[0], damaged, *command[1:])
    assert_one_line_error(result, f"trace file '{shard}' in '{damaged}' is corrupted (sha256 "
                                  "differs from the manifest); restore it from a copy")
    assert files_of(damaged) == before


def test_per_sample_extension_is_checked_first(trace_dir, tmp_path):
    result = moepath("metrics", trace_dir, "--per-sample", tmp_path / "out.txt")
    assert_one_line_error(result, "has extension '.txt'; use one of .csv, .parquet")


def test_a_path_that_cannot_be_written_is_one_line_not_a_traceback(trace_dir, tmp_path):
    (tmp_path / "ids.csv").mkdir()
    result = moepath("metrics", trace_dir, "--json", "--per-sample", tmp_path / "ids.csv")
    assert result.returncode == 1
    assert result.stderr == (f"moepath: error: '{tmp_path / 'ids.csv'}': Is a directory; check "
                             "the path, and that it may be read or written\n")


def test_two_layer_trace_is_flagged_degenerate(tmp_path):
    trace_dir = write_synthetic_trace(tmp_path / "t", layers=2)
    result = moepath("metrics", trace_dir, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["degenerate"] is True
    assert "warning: the trace has 2 MoE layer(s), fewer than 3" in " ".join(
        result.stderr.split())

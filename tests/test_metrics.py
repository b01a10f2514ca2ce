"""Group metrics: options validation, composition of the three metric modules, per-sample table."""

from __future__ import annotations

import doctest
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from moepath.tracer import Trace, store
from moepath.tracer import metrics as metrics_module
from moepath.tracer.consistency import routing_consistency
from moepath.tracer.distance import distance_summary, per_layer_distance
from moepath.tracer.errors import InputError, MetricError, TraceFormatError
from moepath.tracer.manifest import InputInfo, Manifest, ModelInfo
from moepath.tracer.metrics import (
    GroupMetrics,
    MetricOptions,
    group_metrics,
    per_sample_frame,
    trace_distributions,
    trace_metrics,
    trace_sample_detail,
    trace_sample_frame,
)
from moepath.tracer.pathways import pathways, select_experts, topk_to_distribution
from moepath.tracer.writer import TraceWriter


def two_samples() -> tuple[np.ndarray, list[np.ndarray]]:
    """Sample a routes '0,1' in all 3 layers, sample b '2,1', through identity routers."""
    g = np.array([[[0.6, 0.3, 0.1]] * 3, [[0.1, 0.3, 0.6]] * 3], dtype=np.float32)
    return g, [np.eye(3)] * 3


def random_group(n: int, layers: int = 4, experts: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = rng.dirichlet(np.full(experts, 0.3), (n, layers)).astype(np.float32)
    return g, [rng.normal(size=(experts, 32)).astype(np.float32) for _ in range(layers)]


def test_group_metrics_hand_computed():
    # '0,1-0,1-0,1' vs '2,1-2,1-2,1': 3 substitutions in 11 characters; same routing in
    # every layer, so every cosine is 1 and consistency is 1 - 1e-8.
    result = group_metrics("math", *two_samples())
    # The baseline is a simulation (tests/test_baseline.py checks it); the rest is exact.
    assert result.baseline_distance > 0 and result.excess_sharing < 1
    result = replace(result, baseline_distance=None, baseline_distance_stderr=None,
                     baseline_normalized_distance=None, excess_sharing=None)
    assert result == GroupMetrics(
        name="math",
        n_samples=2,
        n_pairs=1,
        distance_mean=3.0,
        distance_stderr=0.0,
        distance_exact=True,
        normalized_distance_mean=pytest.approx(3 / 11),
        normalized_distance_stderr=0.0,
        consistency_mean=pytest.approx(1.0),
        complexity_mean=pytest.approx(1e-8, rel=1e-6),
        mean_pathway_length=6.0,
        per_layer_distance=[1.0, 1.0, 1.0],
        degenerate=False,
        # 2 samples: too few for a bootstrap interval (intervals.MIN_SAMPLES)
        consistency_median=pytest.approx(1.0),
        consistency_trimmed_mean=pytest.approx(1.0),
        nonpositive_cosine_share=0.0,
        per_layer_cosine=[1.0, 1.0],
        routing_entropy=pytest.approx(-(0.6 * np.log(0.6) + 0.3 * np.log(0.3)
                                        + 0.1 * np.log(0.1)), rel=1e-6),
        router_norm=1.0,
    )


def test_options_flow_to_every_metric():
    g, weights = random_group(30)
    options = MetricOptions(tau=0.5, unit="expert", normalize="max", pairs=200, seed=3)
    result = group_metrics("code", g, weights, options)
    paths = pathways(g, tau=0.5)
    distance = distance_summary(paths, unit="expert", pairs=200, seed=3)
    routing = routing_consistency(g, weights)
    assert (result.distance_mean, result.distance_stderr) == (
        distance["none"].mean,
        distance["none"].stderr,
    )
    assert result.normalized_distance_mean == distance["max"].mean
    assert (result.n_pairs, result.distance_exact) == (200, False)
    assert (
        result.per_layer_distance
        == per_layer_distance(paths, unit="expert", normalize="max", pairs=200, seed=3).tolist()
    )
    assert result.consistency_mean == pytest.approx(routing.consistency.mean())
    assert result.complexity_mean == pytest.approx(routing.complexity.mean())
    assert result.mean_pathway_length == pytest.approx(np.mean([p.n_experts for p in paths]))


def test_fewer_than_three_layers_are_flagged_degenerate():
    g, weights = random_group(5, layers=2)
    result = group_metrics("tiny", g, weights)
    assert result.degenerate
    assert abs(result.complexity_mean) < 1e-6


def test_group_of_one_is_refused_by_name():
    g, weights = random_group(1)
    with pytest.raises(MetricError) as error:
        group_metrics("commonsense", g, weights)
    assert str(error.value) == "group 'commonsense' has 1 sample: pathway distance needs at least 2"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tau": 0.0}, r"tau 0.0 is outside \(0, 1\]"),
        ({"tau": 1.5}, r"tau 1.5 is outside \(0, 1\]"),
        ({"unit": "token"}, "unit 'token' is not supported; choose one of: char, expert"),
        ({"normalize": "mean"}, "normalize 'mean' is not supported; choose one of: none, max"),
        ({"source": "logits"}, "source 'logits' is not supported; choose one of: full, topk"),
        ({"pairs": 0}, "pairs 0 is too few"),
        ({"seed": -1}, "seed -1 is not an integer >= 0; pass a seed such as 0"),
        ({"seed": 1.5}, "seed 1.5 is not an integer >= 0"),
    ],
)
def test_options_are_validated_on_construction(options, message):
    with pytest.raises(MetricError, match=message):
        MetricOptions(**options)


def test_per_sample_frame():
    g, weights = two_samples()
    frame = per_sample_frame(["a", "b"], g, weights)
    assert list(frame.columns) == [
        "sample_id",
        "pathway",
        "consistency",
        "complexity",
        "pathway_length",
        "layer_lengths",
    ]
    assert frame["sample_id"].tolist() == ["a", "b"]
    assert frame["pathway"].tolist() == ["0,1-0,1-0,1", "2,1-2,1-2,1"]
    assert frame["pathway_length"].tolist() == [6, 6]
    assert frame["layer_lengths"].tolist() == [[2, 2, 2], [2, 2, 2]]
    np.testing.assert_allclose(frame["consistency"], [1.0, 1.0])
    np.testing.assert_allclose(frame["complexity"], [1e-8, 1e-8], rtol=1e-6)


def test_per_sample_frame_uses_tau():
    g, weights = two_samples()
    frame = per_sample_frame(["a", "b"], g, weights, MetricOptions(tau=0.5))
    assert frame["pathway"].tolist() == ["0-0-0", "2-2-2"]


def test_per_sample_frame_refuses_mismatched_ids():
    g, weights = two_samples()
    with pytest.raises(MetricError, match="got 3 sample ids for 2 distributions"):
        per_sample_frame(["a", "b", "c"], g, weights)


# --- over a trace directory ---------------------------------------------------------------

K, E, HIDDEN = 2, 8, 6
# sample id -> (domain, step, tokens, prompt tokens): math and code of 4 samples each, a lone
# bio sample; c3 has 3 generated tokens after its 6 prompt tokens.
SAMPLES = {
    "m0": ("math", 1000, 7, 7), "m1": ("math", 200, 5, 5), "m2": ("math", 1000, 9, 9),
    "m3": ("math", 200, 6, 6), "c0": ("code", 1000, 8, 8), "c1": ("code", 200, 4, 4),
    "c2": ("code", 1000, 7, 7), "c3": ("code", 200, 9, 6), "b0": ("bio", 1000, 6, 6),
}


def routing_record(sample_id: str, layers: int, tokens: int, prompt: int, seed: int):
    """A sample whose tokens route by a sparse random distribution (pathways differ)."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(E, 0.4), size=(tokens, layers)).astype(np.float32)
    ids = np.argsort(-probs, -1, kind="stable")[..., :K]
    return store.RoutingRecord(
        sample_id=sample_id, request_id=f"req-{seed}", completion=0, num_prompt_tokens=prompt,
        positions=np.arange(tokens, dtype=np.int32),
        token_ids=rng.integers(0, 500, tokens).astype(np.int32),
        expert_ids=ids, gate_weights=np.take_along_axis(probs, ids, -1),
        router_mean=probs[:prompt].mean(0))


def write_synthetic_trace(trace_dir: Path, layers: int = 4, samples: dict = SAMPLES,
                          seed: int = 0, columns: dict | None = None,
                          reverse: bool = False, source: InputInfo | None = None) -> Path:
    """A committed trace without vLLM: routing (drawn from ``seed``), router weights and a
    samples table carrying ``domain``, ``step`` and ``columns`` ({name: value per sample});
    ``reverse``: the same records, committed in reverse order; ``source``: the manifest's
    ``input`` (the samples file it claims to be traced from)."""
    writer = TraceWriter.open(trace_dir)
    records = [routing_record(sid, layers, tokens, prompt, seed * len(samples) + i)
               for i, (sid, (_, _, tokens, prompt)) in enumerate(samples.items())]
    records = records[::-1] if reverse else records
    rng = np.random.default_rng(99)
    writer.begin(Manifest(model=ModelInfo(num_layers=layers, num_experts=E, top_k=K,
                                          architecture="Synthetic"), input=source),
                 router_weights=[rng.normal(size=(E, HIDDEN)).astype(np.float32)
                                 for _ in range(layers)])
    frame = pd.DataFrame({"sample_id": list(samples),
                          "domain": [v[0] for v in samples.values()],
                          "step": [v[1] for v in samples.values()],
                          "num_tokens": [v[2] for v in samples.values()], **(columns or {})})
    writer.commit(routing=[store.write_routing_shard(trace_dir, "run-r0-000000", records,
                                                     layers, K, E)],
                  samples=pa.Table.from_pandas(frame, preserve_index=False))
    writer.finish()
    return trace_dir


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Trace:
    return Trace.open(write_synthetic_trace(tmp_path_factory.mktemp("metrics") / "trace"))


def rows_of(trace: Trace, domain: str) -> list[int]:
    ids, _ = trace.router_means()
    return [i for i, sid in enumerate(ids) if SAMPLES[sid][0] == domain]


def test_trace_metrics_of_the_whole_trace_is_group_metrics(synthetic):
    ids, g = trace_distributions(synthetic)
    [result] = trace_metrics(synthetic)
    assert result == group_metrics("all", g, synthetic.router_weights())
    assert result.n_samples == len(SAMPLES) and result.note is None


def test_metrics_do_not_depend_on_the_order_the_samples_were_traced_in(synthetic, tmp_path):
    """Batch sizes, resumed runs and merged parts change the order of a trace's records,
    while intervals, the baseline and sampled pairs draw samples by position."""
    backwards = Trace.open(write_synthetic_trace(tmp_path / "backwards", reverse=True))
    assert backwards.sample_ids() == synthetic.sample_ids()[::-1]
    for options in (MetricOptions(), MetricOptions(pairs=5, seed=3)):
        assert (trace_metrics(backwards, options, group_by="domain")
                == trace_metrics(synthetic, options, group_by="domain"))


def test_trace_metrics_groups_by_a_carried_column(synthetic):
    _, g = synthetic.router_means()
    weights = synthetic.router_weights()
    options = MetricOptions(unit="expert", pairs=3, seed=4)
    groups = trace_metrics(synthetic, options, group_by="domain")
    assert [group.name for group in groups] == ["bio", "code", "math"]
    for group in groups[1:]:
        assert group == group_metrics(group.name, g[rows_of(synthetic, group.name)], weights,
                                      options)
        assert (group.n_pairs, group.distance_exact) == (3, False)


def test_group_of_one_has_empty_distance_and_a_note(synthetic):
    _, g = synthetic.router_means()
    bio = trace_metrics(synthetic, group_by="domain")[0]
    alone = routing_consistency(g[rows_of(synthetic, "bio")], synthetic.router_weights())
    assert (bio.name, bio.n_samples, bio.n_pairs) == ("bio", 1, 0)
    assert bio.distance_mean is bio.normalized_distance_mean is bio.per_layer_distance is None
    assert bio.consistency_mean == pytest.approx(alone.consistency[0])
    assert bio.note == ("group 'bio' has 1 sample: pathway distance needs at least 2, so it is "
                        "left empty (consistency and complexity are that sample's own)")


def test_numeric_groups_sort_by_value(synthetic):
    assert [group.name for group in trace_metrics(synthetic, group_by="step")] == ["200", "1000"]


def test_samples_without_a_label_form_the_last_group(tmp_path):
    trace = Trace.open(write_synthetic_trace(tmp_path / "t", samples={
        "a": ("x", 1, 5, 5), "b": (None, 1, 5, 5), "c": ("x", 1, 4, 4), "d": (None, 1, 6, 6)}))
    groups = trace_metrics(trace, group_by="domain")
    assert [(group.name, group.n_samples) for group in groups] == [("x", 2), ("(missing)", 2)]


def test_integer_labels_keep_integer_names_when_a_null_makes_the_column_float(tmp_path):
    epochs = [1, None, 2, 1, 2, 1, 2, 1, 2]  # read back as float64: 1.0, NaN, 2.0, ...
    trace = Trace.open(write_synthetic_trace(tmp_path / "t", columns={"epoch": epochs}))
    assert trace.samples["epoch"].dtype == np.float64
    groups = trace_metrics(trace, group_by="epoch")
    assert [(group.name, group.n_samples) for group in groups] == [
        ("1", 4), ("2", 4), ("(missing)", 1)]


@pytest.mark.parametrize(("labels", "names"), [
    ([1.0, None, 2.5, np.float32(3.0)], ["1", "(missing)", "2.5", "3"]),
    (["math", np.nan, "1.0"], ["math", "(missing)", "1.0"]),
    ([True, 7, -0.0], ["True", "7", "0"]),
])
def test_label_names(labels, names):
    assert metrics_module.label_names(pd.Series(labels, dtype=object)).tolist() == names


def test_unknown_group_column_lists_the_columns(synthetic):
    with pytest.raises(MetricError, match="has no column 'topic'; group by one of: domain, "
                                          "step, num_tokens$"):
        trace_metrics(synthetic, group_by="topic")


@pytest.mark.parametrize(("column", "message"), [
    ("sample_id", "cannot group by 'sample_id': every sample would be a group of its own; "
                  "group by one of: domain, step, num_tokens, tags$"),
    ("tags", r"column 'tags' of the samples table of trace '.*' holds lists \(sample 'm0'\); "
             "group by a column of single values$"),
])
def test_columns_without_one_label_per_sample_are_refused(tmp_path, column, message):
    tags = [["x"], ["x", "y"], [], ["y"], None, ["x"], ["y"], ["x"], ["y"]]
    trace = Trace.open(write_synthetic_trace(tmp_path / "t", columns={"tags": tags}))
    with pytest.raises(MetricError, match=message):
        trace_metrics(trace, group_by=column)


def test_topk_source_averages_gate_weights_over_prompt_tokens_only(synthetic):
    # Reference from the records as written: gate weights pass through float16 on disk.
    records = {sid: routing_record(sid, 4, tokens, prompt, seed)
               for seed, (sid, (_, _, tokens, prompt)) in enumerate(SAMPLES.items())}
    expected = np.stack([
        topk_to_distribution(r.expert_ids[:r.num_prompt_tokens],
                             r.gate_weights.astype(np.float16)[:r.num_prompt_tokens], E)
        for _, r in sorted(records.items())])
    ids, g = trace_distributions(synthetic, "topk")
    assert ids == sorted(SAMPLES)  # by id, whatever order the samples were traced in
    np.testing.assert_allclose(g, expected, rtol=1e-6)
    [result] = trace_metrics(synthetic, MetricOptions(source="topk"))
    assert result == group_metrics("all", expected, synthetic.router_weights())


def test_trace_without_router_weights_is_refused(tmp_path):
    trace_dir = write_synthetic_trace(tmp_path / "t")
    manifest = store.read_manifest(trace_dir)
    manifest["router_weights"] = None
    store.write_manifest(trace_dir, manifest)
    with pytest.raises(MetricError, match="has no router weights, which pathway consistency"):
        trace_metrics(Trace.open(trace_dir))


def test_a_model_without_readable_routers_reports_distance_and_why_not_consistency(
        tmp_path, synthetic):
    """A served model with no router matrix moepath could read: the manifest says why,
    Metric 1 is unchanged, Metric 2 is empty with that reason."""
    trace_dir = write_synthetic_trace(tmp_path / "t")
    manifest = store.read_manifest(trace_dir)
    manifest["router_weights"] = None
    manifest["router_weights_unavailable"] = "router linear 'mlp.gate' is quantised"
    store.write_manifest(trace_dir, manifest)
    trace = Trace.open(trace_dir)
    [result] = trace_metrics(trace)
    [full] = trace_metrics(synthetic)
    assert (result.consistency_mean, result.complexity_mean) == (None, None)
    assert result.note == ("consistency and complexity are unavailable: the traced model has "
                           "no router matrix moepath could read (router linear 'mlp.gate' is "
                           "quantised)")
    assert (result.distance_mean, result.per_layer_distance, result.mean_pathway_length) == (
        full.distance_mean, full.per_layer_distance, full.mean_pathway_length)
    frame = trace_sample_frame(trace)
    assert frame["consistency"].isna().all() and frame["pathway"].tolist() == trace_sample_frame(
        synthetic)["pathway"].tolist()
    with pytest.raises(MetricError, match="quantised\\); `moepath metrics` still reports"):
        trace_sample_detail(trace, trace.sample_ids()[0])


def test_fewer_than_three_layers_warn(tmp_path):
    trace = Trace.open(write_synthetic_trace(tmp_path / "t", layers=2))
    with pytest.warns(UserWarning, match=r"2 MoE layer\(s\), fewer than 3"):
        [result] = trace_metrics(trace)
    assert result.degenerate


def test_trace_sample_frame_carries_the_samples_table(synthetic):
    ids, g = trace_distributions(synthetic)
    frame = trace_sample_frame(synthetic, MetricOptions(tau=0.5))
    expected = per_sample_frame(ids, g, synthetic.router_weights(), MetricOptions(tau=0.5))
    pd.testing.assert_frame_equal(frame[expected.columns], expected)
    assert list(frame.columns[len(expected.columns):]) == ["domain", "step", "num_tokens"]
    assert frame["domain"].tolist() == [SAMPLES[sid][0] for sid in sorted(SAMPLES)]


def test_trace_sample_detail(synthetic):
    detail = trace_sample_detail(synthetic, "c3")
    g = synthetic.router_mean("c3")
    assert detail.pathway == select_experts(g)
    assert detail.weights[0] == [float(g[0, e]) for e in detail.pathway.layers[0]]
    assert all(0.7 < share <= 1.0 + 1e-6 for share in detail.layer_share)
    assert (detail.num_prompt_tokens, len(detail.token_ids)) == (6, 9)
    assert detail.carried == {"domain": "code", "step": 200, "num_tokens": 9}
    assert len(detail.cosines) == 3 and not detail.degenerate


def test_unknown_sample_is_named_with_close_ids(synthetic):
    with pytest.raises(InputError, match=r"sample 'm00' is not in trace .* \(9 samples\); "
                                         r"did you mean 'm0'\? list its ids with `moepath"):
        trace_sample_detail(synthetic, "m00")


def test_tracer_never_imports_engine_or_cli_libraries():
    modules = "pathways, distance, consistency, metrics"
    code = (
        f"import sys; from moepath.tracer import {modules}; "
        "print(sorted(m for m in ('vllm', 'typer', 'rich') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_docstring_examples_hold():
    assert doctest.testmod(metrics_module).failed == 0


# --- --store per-sample -----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["full", "topk"])
def test_metrics_of_a_per_sample_trace_equal_those_of_the_per_token_trace_of_its_records(
        tmp_path, source):
    """The same records written both ways give equal metrics, value for value: the worker's
    top-k means are those the reader computes from a per-token trace's stored weights."""
    from test_store import make_record, write_summary_trace, write_trace

    records = [make_record(f"s{i}", 6 + i, i, prompt=4 + i % 3) for i in range(6)]
    write_trace(tmp_path / "token", records)
    write_summary_trace(tmp_path / "sample", records)
    options = MetricOptions(source=source, resamples=50)
    by_token, by_sample = Trace.open(tmp_path / "token"), Trace.open(tmp_path / "sample")
    ids_token, token = trace_distributions(by_token, source)
    ids_sample, sample = trace_distributions(by_sample, source)
    assert ids_token == ids_sample == [r.sample_id for r in records]
    np.testing.assert_array_equal(token, sample)  # bit for bit
    assert trace_metrics(by_token, options) == trace_metrics(by_sample, options)


def test_show_refuses_a_per_sample_trace_naming_store_per_token(tmp_path):
    from test_store import make_record, write_summary_trace

    write_summary_trace(tmp_path / "t", [make_record("a", 4, 1), make_record("b", 5, 2)])
    with pytest.raises(TraceFormatError, match=r"^trace '.*' was written with --store "
                       r"per-sample and keeps no per-token routing, which `moepath show` \(the "
                       r"sample's token-by-token routing\) needs; trace the samples again with "
                       r"--store per-token$"):
        trace_sample_detail(Trace.open(tmp_path / "t"), "a")

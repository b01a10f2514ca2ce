"""`moepath compare`: checkpoints served in turn, metric trajectories, resume, and refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import TEST_MEMORY, files_of, sigkill_when, write_jsonl
from scipy import stats
from test_cli_trace import assert_one_line_error, dense_checkpoint, moepath
from test_metrics import SAMPLES, write_synthetic_trace
from test_store import make_record, write_trace
from test_sweep import assert_same_trace

from moepath.tracer import Trace, report, store
from moepath.tracer import checkpoints as ckpt
from moepath.tracer import compare as cmp
from moepath.tracer.errors import InputError, MetricError, ModelError
from moepath.tracer.memorisation import parse_memorised_group
from moepath.tracer.metrics import MetricOptions, trace_metrics
from moepath.tracer.samples import read_samples


def fake_checkpoint(path, **config):
    """A folder with only a config.json: enough for everything refused before serving."""
    path.mkdir(parents=True)
    base = {"architectures": ["OlmoeForCausalLM"], "num_hidden_layers": 4, "num_experts": 16,
            "num_experts_per_tok": 4}
    (path / "config.json").write_text(json.dumps(base | config))
    return path


def test_a_parent_folder_is_ordered_by_the_step_in_each_name(tmp_path):
    for name in ("step5000-tokens21B", "checkpoint-2000", "step300"):
        fake_checkpoint(tmp_path / "run" / name)
    found = ckpt.discover([tmp_path / "run"])
    assert [(c.name, c.step) for c in found] == [
        ("step300", 300), ("checkpoint-2000", 2000), ("step5000-tokens21B", 5000)]


def test_explicit_folders_keep_the_given_order(tmp_path):
    b, a = fake_checkpoint(tmp_path / "b"), fake_checkpoint(tmp_path / "a")
    assert [c.name for c in ckpt.discover([b, a])] == ["b", "a"]
    assert ckpt.steps(ckpt.discover([b, a])) == {"b": 0, "a": 1}


def test_a_final_folder_without_a_step_orders_every_checkpoint_by_position(tmp_path):
    found = ckpt.discover([fake_checkpoint(tmp_path / "step1000"),
                           fake_checkpoint(tmp_path / "final")])
    assert ckpt.steps(found) == {"step1000": 0, "final": 1}


def test_explicit_folders_out_of_step_order_or_sharing_a_step_are_refused(tmp_path):
    step1000, step2000 = fake_checkpoint(tmp_path / "step1000"), fake_checkpoint(
        tmp_path / "step2000")
    with pytest.raises(InputError, match="^'step2000' is given before 'step1000'; pass "
                                         "checkpoints in training order$"):
        ckpt.discover([step2000, step1000])
    ema = fake_checkpoint(tmp_path / "step1000-ema")
    with pytest.raises(InputError, match="^checkpoints 'step1000' and 'step1000-ema' share "
                                         "step 1000; pass one$"):
        ckpt.discover([step1000, ema])
    fake_checkpoint(tmp_path / "run" / "step1000")
    fake_checkpoint(tmp_path / "run" / "step1000-ema")
    with pytest.raises(InputError, match="share step 1000"):
        ckpt.discover([tmp_path / "run"])


def test_checkpoints_with_different_routing_shapes_are_refused_naming_the_difference(tmp_path):
    found = ckpt.discover([fake_checkpoint(tmp_path / "step1"),
                           fake_checkpoint(tmp_path / "step2", num_experts=32)])
    with pytest.raises(ModelError, match="'step1' and 'step2' differ in num_experts 16 vs 32"):
        ckpt.check_compatible(found)


def test_missing_folder_and_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="checkpoint folder '.*nope' does not exist"):
        ckpt.discover([tmp_path / "nope", tmp_path])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a model folder nor a folder of checkpoints"):
        ckpt.discover([tmp_path / "empty"])


def test_parent_folder_with_unnumbered_checkpoints_is_refused(tmp_path):
    fake_checkpoint(tmp_path / "run" / "step10")
    fake_checkpoint(tmp_path / "run" / "final")
    with pytest.raises(InputError, match=r"without a step number in their name: \['final'\]"):
        ckpt.discover([tmp_path / "run"])


def test_cli_refuses_mismatched_checkpoints_before_serving(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "text": "x"}])
    result = moepath("compare", fake_checkpoint(tmp_path / "step1"),
                     fake_checkpoint(tmp_path / "step2", num_experts_per_tok=2),
                     "--samples", samples, "--out", tmp_path / "out")
    assert_one_line_error(result, "differ in top_k 4 vs 2")
    assert not (tmp_path / "out").exists()


# --- options refused before any checkpoint is traced ----------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"epsilon_quantile": 1.5}, r"quantile 1.5 is outside \(0, 1\)"),
    ({"epsilon": 0.5, "epsilon_quantile": 0.2}, "got epsilon 0.5 and quantile 0.2; pass one"),
    ({"epsilon": float("inf")}, "epsilon inf is not a finite number"),
    ({"delta": -0.1}, "delta -0.1 is negative"),
    ({"min_group_size": 0}, r"min_group_size must be a whole number of at least 1 \(got 0\); "
                            "pass --min-group-size 1 or more"),
    ({"min_checkpoints": 2.5}, "min_checkpoints must be a whole number of at least 1"),
    ({"control": "entropy"}, "^--control 'entropy' is not a metric compare computes; use one "
                             "of: distance, normalized_distance, baseline_distance, .*, "
                             "routing_entropy, .*, or none$"),
])
def test_compare_options_are_validated_on_construction(options, message):
    with pytest.raises(InputError, match=message):
        cmp.CompareOptions(**options)


def two_checkpoints_and_samples(tmp_path):
    found = [ckpt.Checkpoint("step100", tmp_path / "step100", 100),
             ckpt.Checkpoint("step200", tmp_path / "step200", 200)]
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "text": "x", "domain": "math"},
                                                 {"id": "b", "text": "y", "tags": ["t"]}])
    return found, read_samples(samples)


def test_group_by_is_checked_against_the_samples_fields_and_trace_columns(tmp_path):
    found, sample_set = two_checkpoints_and_samples(tmp_path)
    for column in ("domain", "truncated"):  # a carried field, a column tracing adds
        cmp.check_before_tracing(found, sample_set, cmp.CompareOptions(group_by=column))
    with pytest.raises(MetricError) as error:
        cmp.check_before_tracing(found, sample_set, cmp.CompareOptions(group_by="domian"))
    assert str(error.value) == (f"samples file '{sample_set.path}' has no column 'domian'; "
                                "group by one of: domain, tags, num_tokens, truncated, nll")
    with pytest.raises(MetricError, match="column 'tags' of the samples file .* holds lists"):
        cmp.check_before_tracing(found, sample_set, cmp.CompareOptions(group_by="tags"))


def test_scores_are_read_before_tracing(tmp_path):
    found, sample_set = two_checkpoints_and_samples(tmp_path)
    scores = tmp_path / "scores.csv"
    scores.write_text("checkpoint,score\nstep100,0.1\nstep300,0.2\n")
    with pytest.raises(InputError, match="names checkpoint\\(s\\) that were not compared: "
                                         "'step300'; use a name or step of: step100 \\(100\\)"):
        cmp.check_before_tracing(found, sample_set, cmp.CompareOptions(scores=scores))


def three_checkpoints(tmp_path):
    return [ckpt.Checkpoint(f"step{step}", tmp_path / f"step{step}", step)
            for step in (100, 200, 300)]


@pytest.mark.parametrize(("scores", "options", "message"), [
    ("step100,0.1\nstep200,0.2\n", {}, "^2 checkpoints: correlation needs at least 3; "
                                         "compare more checkpoints or drop --scores$"),
    ("step100,0.1\nstep200,0.2\nstep300,0.3\n", {"from_step": 250},
     "^--from-step 250 leaves 1 of 3 checkpoints; correlation needs 3; pass an earlier "
     "--from-step$"),
])
def test_scores_over_too_few_checkpoints_are_refused_before_tracing(tmp_path, scores, options,
                                                                    message):
    _, sample_set = two_checkpoints_and_samples(tmp_path)
    (tmp_path / "scores.csv").write_text("checkpoint,score\n" + scores)
    found = three_checkpoints(tmp_path)[:scores.count("\n")]
    with pytest.raises(InputError, match=message):
        cmp.check_before_tracing(found, sample_set, cmp.CompareOptions(
            scores=tmp_path / "scores.csv", **options))


def test_score_groups_are_checked_against_the_group_by_values_before_tracing(tmp_path):
    _, sample_set = two_checkpoints_and_samples(tmp_path)  # domains: math, (missing)
    scores = tmp_path / "scores.csv"
    rows = "".join(f"step{s},0.{s // 100},{{group}}\n" for s in (100, 200, 300))
    options = cmp.CompareOptions(scores=scores, group_by="domain")
    for group in ("math", "all", "t*=200/math"):  # a value, every sample, a memorised group
        scores.write_text("checkpoint,score,group\n" + rows.format(group=group))
        cmp.check_before_tracing(three_checkpoints(tmp_path), sample_set, options)
    scores.write_text("checkpoint,score,group\n" + rows.format(group="maths"))
    with pytest.raises(InputError, match=r"^scores name group\(s\) 'maths' that no group of "
                                         r"this run has \(groups: \(missing\), all, math and"):
        cmp.check_before_tracing(three_checkpoints(tmp_path), sample_set, options)


def test_a_group_by_value_named_all_is_refused(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "text": "x", "domain": "all"}])
    with pytest.raises(InputError, match="--group-by domain: a sample has the value 'all', the "
                                         "name of the group of every sample; rename"):
        cmp.check_before_tracing(three_checkpoints(tmp_path), read_samples(samples),
                                 cmp.CompareOptions(group_by="domain"))


def two_checkpoints(kind: str, step100, step200, request) -> None:
    """Checkpoint folders step100 and step200 of ``kind``: ``fake`` (config.json only),
    ``missing`` (no step200), ``dense`` (step200 has no MoE layers), ``toy`` (both the toy
    OLMoE, with its tokenizer)."""
    if kind == "toy":
        toy = request.getfixturevalue("toy_olmoe")
        step100.symlink_to(toy)
        step200.symlink_to(toy)
        return
    fake_checkpoint(step100)
    if kind == "fake":
        fake_checkpoint(step200)
    elif kind == "dense":
        dense_checkpoint(step200)


LINE = '{"id": "a", "text": "x", "domain": "d"}\n'


@pytest.mark.parametrize(("kind", "lines", "extra", "message"), [
    ("fake", LINE, ("--scores", "missing.csv"), "scores file 'missing.csv' does not exist"),
    ("fake", LINE, ("--group-by", "domian"),
     "has no column 'domian'; group by one of: domain, num_tokens"),
    ("fake", LINE, ("--epsilon-quantile", "2"), "quantile 2.0 is outside (0, 1)"),
    ("fake", LINE, ("--min-group-size", "0"), "pass --min-group-size 1 or more"),
    ("missing", LINE, (), "step200' does not exist"),
    ("dense", LINE, (), "(LlamaForCausalLM) has no MoE layers"),
    ("fake", LINE + '{"id": "b", "text": oops}\n', (), "s.jsonl line 2: not valid JSON"),
    ("toy", '{"id": "essay", "text": "' + "word " * 40 + '"}\n', ("--max-model-len", "16"),
     "sample 'essay' of "),
], ids=["scores", "group-by", "epsilon-quantile", "min-group-size", "missing-checkpoint",
        "dense-checkpoint", "malformed-line", "over-long-sample"])
def test_cli_refuses_bad_input_before_serving_and_keeps_earlier_traces(
        tmp_path, request, kind, lines, extra, message):
    """One line, before any engine starts; the traces of an earlier run into the same --out
    stay as they were."""
    step100, step200 = tmp_path / "step100", tmp_path / "step200"
    two_checkpoints(kind, step100, step200, request)
    (tmp_path / "s.jsonl").write_text(lines)
    out = tmp_path / "out"
    write_trace(out / "traces" / "step100", [make_record("a", 4, 1)])
    before = files_of(out)
    result = moepath("compare", step100, step200, "--samples", tmp_path / "s.jsonl",
                     "--out", out, *extra)
    assert_one_line_error(result, message)
    assert files_of(out) == before


@pytest.mark.vllm
def test_compare_writes_every_output_and_equals_moepath_metrics(compared):
    root, _, result = compared
    out = root / "out"
    for name in ("metrics.csv", "metrics.parquet", "samples.parquet", "report.md",
                 "distance.png", "consistency.png", "loss.png"):
        assert (out / name).is_file(), name
    assert "checkpoint 2/3 step200: reloading weights in place" in result.stderr
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["checkpoint"]) == {"step100", "step200", "step300"}
    assert {"all", "math", "code", "long"} <= set(metrics["group"])
    direct = json.loads(moepath("metrics", out / "traces" / "step200", "--json").stdout)
    group = direct["groups"][0]
    row = metrics[(metrics.checkpoint == "step200") & (metrics.group == "all")].set_index(
        "metric")["value"]
    assert row["distance"] == pytest.approx(group["distance_mean"], rel=1e-12)
    assert row["consistency"] == pytest.approx(group["consistency_mean"], rel=1e-12)
    assert row["n_samples"] == group["n_samples"] == 43
    samples = pd.read_parquet(out / "samples.parquet")
    assert len(samples) == 3 * 43
    assert samples["memorised"].any()
    report = (out / "report.md").read_text()
    assert "pearson / spearman" in report.lower() or "Pearson" in report


@pytest.mark.vllm
def test_compare_resumes_recomputing_only_the_deleted_checkpoint(compared):
    root, args, _ = compared
    shutil.rmtree(root / "out" / "traces" / "step200")
    result = moepath(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint 1/3 step100: complete, skipped" in result.stderr
    assert "checkpoint 2/3 step200: starting engine" in result.stderr
    assert "checkpoint 3/3 step300: complete, skipped" in result.stderr


@pytest.mark.vllm
@pytest.mark.usefixtures("zen_platform")
def test_under_zentorch_engines_started_in_turn_in_one_process_trace_one_checkpoint_alike(
        toy_factory, samples_file, tmp_path):
    """zentorch reorders expert weights in place and remembers them by address for the
    whole process: an engine started after another one was closed could find its weights
    taken for reordered ones (a failed forward, or silently wrong routing). Three copies of
    one checkpoint, each served by a fresh engine in one process, trace alike."""
    for step in (100, 200, 300):
        shutil.copytree(toy_factory("olmoe"), tmp_path / "run" / f"step{step}")
    result = moepath("compare", tmp_path / "run", "--samples", samples_file, "--out",
                     tmp_path / "out", "--no-reuse-engine", "--enforce-eager",
                     "--gpu-memory-utilization", str(TEST_MEMORY), "--max-model-len", "512")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint 3/3 step300: starting engine" in result.stderr
    first, *others = (Trace.open(tmp_path / "out" / "traces" / f"step{step}")
                      for step in (100, 200, 300))
    for other in others:
        assert_same_trace(first, other)


def _trace_state(trace_dir) -> tuple[str | None, int]:
    """(status, committed samples) of a trace directory being written; (None, 0) before."""
    try:
        manifest = store.read_manifest(trace_dir)
    except Exception:  # noqa: BLE001 - not written yet, or mid-replace
        return None, 0
    return manifest["status"], sum(entry["rows"] for entry in manifest["shards"]["samples"])


@pytest.mark.vllm
def test_compare_killed_between_and_within_checkpoints_resumes_to_the_uninterrupted_result(
        compared, tmp_path):
    root, args, _ = compared
    out = tmp_path / "killed"
    argv = [str(a) for a in args]
    argv[argv.index("--out") + 1] = str(out)
    command = [sys.executable, "-m", "moepath.cli.main", *argv, "--batch-size", "8"]
    traces = out / "traces"

    # first kill: as soon as checkpoint 1 is complete (between checkpoints)
    sigkill_when(command, lambda: _trace_state(traces / "step100")[0] == "complete")
    assert _trace_state(traces / "step100")[0] == "complete"
    assert _trace_state(traces / "step300") == (None, 0)
    # second kill: checkpoint 2 half traced (within a checkpoint)
    sigkill_when(command, lambda: _trace_state(traces / "step200")[1] >= 16)
    status, done = _trace_state(traces / "step200")
    assert status != "complete" and 16 <= done < 43, "the kill must land inside step200"

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint 1/3 step100: complete, skipped" in resumed.stderr
    assert f"resuming: {done} sample(s) already traced" in resumed.stderr
    for name in ("step100", "step200", "step300"):
        killed, whole = Trace.open(traces / name), Trace.open(root / "out" / "traces" / name)
        ids = killed.sample_ids()
        assert len(ids) == len(set(ids)) == 43 and sorted(ids) == sorted(whole.sample_ids())
        for sid in ids:
            np.testing.assert_array_equal(killed.topk(sid)[0], whole.topk(sid)[0])
            np.testing.assert_allclose(killed.router_mean(sid), whole.router_mean(sid),
                                       atol=1e-2)
    killed_samples = pd.read_parquet(out / "samples.parquet").sort_values(
        ["checkpoint", "sample_id"], ignore_index=True)
    whole_samples = pd.read_parquet(root / "out" / "samples.parquet").sort_values(
        ["checkpoint", "sample_id"], ignore_index=True)
    assert (killed_samples["pathway"] == whole_samples["pathway"]).all()
    np.testing.assert_allclose(killed_samples["loss"], whole_samples["loss"], atol=2e-2)


# --- analysis of the checkpoints' traces (no engine) ---------------------------------------

# b0 has no domain label; final losses: math 0.1-0.4, code 2.0-2.3, b0 1.0 (all 3.0 at step 100)
UNLABELLED = {**SAMPLES, "b0": (None, *SAMPLES["b0"][1:])}
FINAL_LOSS = {"m0": 0.1, "m1": 0.2, "m2": 0.3, "m3": 0.4, "c0": 2.0, "c1": 2.1, "c2": 2.2,
              "c3": 2.3, "b0": 1.0}


def synthetic_run(root, layers: int = 4, source=None) -> list[ckpt.Checkpoint]:
    """Traces of three checkpoints under root/traces (routing differs by checkpoint); every
    sample's loss is 3.0 at step 100 and its FINAL_LOSS from step 200 on. ``source``: the
    traces' manifest ``input``."""
    found = []
    for seed, step in enumerate((100, 200, 300)):
        nll = [3.0 if step == 100 else FINAL_LOSS[sid] for sid in UNLABELLED]
        write_synthetic_trace(root / "traces" / f"step{step}", layers, UNLABELLED, seed,
                              columns={"nll": nll}, source=source)
        found.append(ckpt.Checkpoint(f"step{step}", root / f"step{step}", step))
    return found


def analyse(root, layers: int = 4, **options) -> cmp.CompareAnalysis:
    result = cmp.analyse(synthetic_run(root, layers), root / "traces",
                         cmp.CompareOptions(**options))
    report.write_outputs(root / "out", result, command="")
    return result


def memorised(result: cmp.CompareAnalysis) -> list[str]:
    return sorted(result.memorisation.t_star.dropna().index)


def test_epsilon_is_a_quantile_of_each_domain_s_final_losses(tmp_path):
    # per domain, the 0.25 quantile memorises the lowest quarter of each: m0, c0 and b0
    result = analyse(tmp_path, group_by="domain")
    assert memorised(result) == ["b0", "c0", "m0"]
    assert result.memorisation.epsilon_by_domain == pytest.approx(
        {"(missing)": 1.0, "code": 2.075, "math": 0.175})
    assert ("epsilon per domain (quantile 0.25 of each domain's final losses): (missing) 1, "
            "code 2.075, math 0.175, delta 0.05") in result.notes[0]
    groups = set(result.metrics["group"])
    assert {"all", "code", "math", "(missing)", "t*=200/code", "t*=200/math",
            "t*=200/(missing)"} == groups
    # one epsilon over all nine final losses memorises only math samples
    pooled = analyse(tmp_path / "pooled", group_by="domain", epsilon_per_group=False)
    assert memorised(pooled) == ["m0", "m1", "m2"]
    assert pooled.memorisation.thresholds() == (
        "epsilon 0.3 (quantile 0.25 of the final losses), delta 0.05")


def test_a_group_of_one_sample_keeps_its_consistency_as_moepath_metrics_does(tmp_path):
    result = analyse(tmp_path, group_by="domain")  # b0 alone has no domain: "(missing)"
    rows = result.metrics[(result.metrics.checkpoint == "step300")
                          & (result.metrics.group == "(missing)")].set_index("metric")["value"]
    assert set(rows.index) == {"n_samples", "loss", "pathway_length", "consistency",
                               "complexity", "consistency_median", "consistency_trimmed_mean",
                               "nonpositive_cosine_share", "routing_entropy", "router_norm"}
    # no distance, baseline or excess sharing: they need two samples
    [lone] = [g for g in trace_metrics(Trace.open(tmp_path / "traces" / "step300"),
                                       group_by="domain") if g.name == "(missing)"]
    assert rows["consistency"] == pytest.approx(lone.consistency_mean, rel=1e-12)
    assert rows["pathway_length"] == pytest.approx(lone.mean_pathway_length, rel=1e-12)


def test_compare_reads_the_distributions_of_the_source_option(tmp_path):
    result = analyse(tmp_path, metrics=MetricOptions(source="topk"))
    rows = result.metrics[(result.metrics.checkpoint == "step300")
                          & (result.metrics.group == "all")].set_index("metric")["value"]
    trace = Trace.open(tmp_path / "traces" / "step300")
    [topk] = trace_metrics(trace, MetricOptions(source="topk"))
    [full] = trace_metrics(trace)
    assert rows["distance"] == pytest.approx(topk.distance_mean, rel=1e-12)
    assert rows["consistency"] == pytest.approx(topk.consistency_mean, rel=1e-12)
    assert topk.distance_mean != pytest.approx(full.distance_mean)


def test_with_two_moe_layers_consistency_is_left_out_and_the_note_says_why(tmp_path):
    result = analyse(tmp_path, layers=2, scores=None)
    assert not {"consistency", "complexity", "consistency_median", "consistency_trimmed_mean",
                "nonpositive_cosine_share"} & set(result.metrics["metric"])
    assert {"distance", "normalized_distance", "loss"} <= set(result.metrics["metric"])
    assert result.samples[["consistency", "complexity"]].isna().all().all()
    [note] = [n for n in result.notes if "fewer than 3" in n]
    assert "2 MoE layer(s)" in note and "left out of the tables, plots and correlations" in note
    assert "| 0.0000 |" not in (tmp_path / "out" / "report.md").read_text()


def test_a_checkpoint_without_router_matrices_leaves_out_consistency_not_distances(tmp_path):
    """A served model whose router moepath could not read back (a quantised gate, say) has
    no router matrices in its trace: compare goes on, its distances computed."""
    found = synthetic_run(tmp_path)
    step200 = tmp_path / "traces" / "step200"
    manifest = store.read_manifest(step200)
    manifest["router_weights"] = None
    manifest["router_weights_unavailable"] = "router linear 'mlp.gate' is quantised"
    store.write_manifest(step200, manifest)

    result = cmp.analyse(found, tmp_path / "traces", cmp.CompareOptions())
    report.write_outputs(tmp_path / "out", result, command="")

    metrics = result.metrics[result.metrics.group == "all"]
    by_checkpoint = metrics.groupby("checkpoint")["metric"].apply(set)
    consistency = {"consistency", "complexity", "router_norm", "consistency_median"}
    assert not consistency & by_checkpoint["step200"]
    assert consistency <= by_checkpoint["step100"] and consistency <= by_checkpoint["step300"]
    [distance] = metrics[(metrics.checkpoint == "step200")
                         & (metrics.metric == "distance")]["value"]
    [full] = trace_metrics(Trace.open(step200))
    assert distance == pytest.approx(full.distance_mean, rel=1e-12)
    samples = result.samples.set_index("checkpoint")
    assert samples.loc["step200", "consistency"].isna().all()
    assert samples.loc["step300", "consistency"].notna().all()
    assert ("consistency and complexity are unavailable for 1 of 3 checkpoints (first: "
            "'step200': the traced model has no router matrix moepath could read (router "
            "linear 'mlp.gate' is quantised)); pathway distances and the other metrics are "
            "computed") in result.notes
    assert "unavailable for 1 of 3 checkpoints" in (tmp_path / "out" / "report.md").read_text()


def test_metrics_rows_carry_intervals_baseline_controls_and_robust_consistency(tmp_path):
    """The rows of each group equal ``group_metrics`` of its samples; layers go to their own
    frame (layers.parquet), so metrics.parquet keeps one row per quantity."""
    result = analyse(tmp_path, scores=None)
    frame = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(frame.columns) == list(cmp.METRIC_COLUMNS)
    rows = frame[(frame.checkpoint == "step300") & (frame.group == "all")].set_index("metric")
    trace = Trace.open(tmp_path / "traces" / "step300")
    [full] = trace_metrics(trace)  # 9 samples: below intervals.MIN_SAMPLES, so no interval
    expected = {"distance": full.distance_mean, "baseline_distance": full.baseline_distance,
                "baseline_normalized_distance": full.baseline_normalized_distance,
                "excess_sharing": full.excess_sharing, "routing_entropy": full.routing_entropy,
                "router_norm": full.router_norm, "consistency_median": full.consistency_median,
                "consistency_trimmed_mean": full.consistency_trimmed_mean,
                "nonpositive_cosine_share": full.nonpositive_cosine_share}
    for metric, value in expected.items():
        assert rows.loc[metric, "value"] == pytest.approx(value, rel=1e-9), metric
    assert rows[["ci_low", "ci_high"]].isna().all().all()

    layers = pd.read_parquet(tmp_path / "out" / "layers.parquet")
    assert list(layers.columns) == list(cmp.LAYER_COLUMNS)
    mine = layers[(layers.checkpoint == "step300") & (layers.group == "all")]
    assert mine[mine.metric == "distance"]["value"].tolist() == full.per_layer_distance
    assert mine[mine.metric == "cosine"]["value"].tolist() == pytest.approx(full.per_layer_cosine)
    assert mine[mine.metric == "cosine"]["layer"].tolist() == [0, 1, 2]  # pairs (l, l+1)
    assert set(layers["group"]) == set(result.metrics["group"])
    assert (tmp_path / "out" / "layers.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_rows_of_a_large_group_have_intervals_around_the_value():
    rng = np.random.default_rng(0)
    g = rng.dirichlet(np.full(8, 0.4), (30, 4)).astype(np.float32)
    weights = [rng.normal(size=(8, 16)).astype(np.float32) for _ in range(4)]
    data = cmp.CheckpointData([f"s{i}" for i in range(30)], g, weights,
                              pd.Series(np.ones(30), index=[f"s{i}" for i in range(30)]))
    options = MetricOptions(resamples=200)
    rows, layer_rows = cmp.checkpoint_tables("c", 10, data, {"all": list(range(30)),
                                                             "half": list(range(15))}, options)
    frame = pd.DataFrame(rows).set_index(["group", "metric"])
    with_ci = ["distance", "normalized_distance", "pathway_length", "routing_entropy",
               "consistency"]
    for group in ("all", "half"):
        for metric in with_ci:
            low, value, high = frame.loc[(group, metric), ["ci_low", "value", "ci_high"]]
            assert low <= value <= high, (group, metric)
    assert frame["ci_low"].notna().sum() == 2 * len(with_ci)
    assert len(layer_rows) == 2 * (4 + 3)  # per group: 4 layer distances, 3 layer-pair cosines


SETTLES = {"m0": 100, "m1": 200, "m2": 300, "m3": 500}  # step from which the loss is 0.2


def staggered_run(root) -> list[ckpt.Checkpoint]:
    """Six checkpoints (steps 100-600) at which m0-m3 settle at loss 0.2 from their SETTLES
    step on (3.0 before); every other sample stays at 3.0."""
    found = []
    for seed, step in enumerate(range(100, 700, 100)):
        nll = [0.2 if step >= SETTLES.get(sid, 10**6) else 3.0 for sid in SAMPLES]
        write_synthetic_trace(root / "traces" / f"step{step}", 4, SAMPLES, seed,
                              columns={"nll": nll})
        found.append(ckpt.Checkpoint(f"step{step}", root / f"step{step}", step))
    return found


def staggered_scores(root, val_loss: bool = False):
    path = root / "scores.csv"
    path.write_text("checkpoint,score" + (",val_loss" if val_loss else "") + "\n" + "".join(
        f"step{step},{score}" + (f",{loss}" if val_loss else "") + "\n"
        for step, score, loss in zip(range(100, 700, 100), (0.1, 0.2, 0.4, 0.5, 0.7, 0.8),
                                     (3.0, 2.5, 2.4, 2.0, 1.9, 1.95), strict=True)))
    return path


@pytest.mark.parametrize(("options", "pooled", "members", "first_step"), [
    # 5 checkpoints from the cut: S = 200 (100 with --all-checkpoints: correlated from 100)
    ({}, "t*<=200", ["m0", "m1"], 200),
    ({"from_t_star": False}, "t*<=200", ["m0", "m1"], 100),
    ({"min_checkpoints": 3}, "t*<=400", ["m0", "m1", "m2"], 400),
    ({"from_step": 300, "min_checkpoints": 3}, "t*<=400", ["m0", "m1", "m2"], 400),
    ({"group_by": "domain"}, "t*<=200/math", ["m0", "m1"], 200),
])
def test_the_pooled_memorised_group_is_every_sample_memorised_by_the_cut(tmp_path, options,
                                                                        pooled, members,
                                                                        first_step):
    """docs/method.md "Memorisation and groups": t*<=S holds the samples memorised at or
    before S, the step leaving --min-checkpoints checkpoints, and is correlated from S on."""
    result = cmp.analyse(staggered_run(tmp_path), tmp_path / "traces", cmp.CompareOptions(
        epsilon=0.5, scores=staggered_scores(tmp_path), **options))
    assert result.memorisation.t_star.dropna().to_dict() == SETTLES
    groups = list(dict.fromkeys(result.metrics["group"]))
    assert groups[-1] == pooled  # after the t*=N groups
    assert groups[-1 - len(SETTLES):-1] == [
        g + ("/math" if "group_by" in options else "") for g in
        ("t*=100", "t*=200", "t*=300", "t*=500")]
    sizes = result.metrics[(result.metrics.group == pooled)
                           & (result.metrics.metric == "n_samples")]["value"]
    assert set(sizes) == {len(members)}
    cut, _ = parse_memorised_group(pooled)
    assert sorted(sid for sid, t_star in SETTLES.items() if t_star <= cut) == members
    row = result.correlations[(result.correlations.group == pooled)
                              & (result.correlations.metric == "distance")].iloc[0]
    assert (row.first_step, row.last_step) == (first_step, 600)


def test_a_validation_loss_in_the_scores_gets_a_correlation_row_and_a_report_column(tmp_path):
    result = cmp.analyse(staggered_run(tmp_path), tmp_path / "traces", cmp.CompareOptions(
        epsilon=0.5, scores=staggered_scores(tmp_path, val_loss=True)))
    report.write_outputs(tmp_path / "out", result, command="")
    rows = result.correlations[result.correlations.metric == "val_loss"].set_index("group")
    assert list(rows.index) == list(dict.fromkeys(result.metrics["group"]))  # every group
    assert rows.loc["all", "pearson"] == pytest.approx(stats.pearsonr(
        [3.0, 2.5, 2.4, 2.0, 1.9, 1.95], [0.1, 0.2, 0.4, 0.5, 0.7, 0.8]).statistic)
    assert (rows.loc["t*=300", "first_step"], rows.loc["t*=300", "n"]) == (300, 4)
    assert "validation loss" in result.table1.index
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| checkpoint | step | group | score | validation loss |" in text
    assert "| step600 | 600 | (all) | 0.8 | 1.95 |" in text


def test_memorised_only_with_no_memorised_sample_is_an_error_naming_the_thresholds(tmp_path):
    with pytest.raises(InputError, match=r"^no sample is memorised \(epsilon 0.05 \(explicit\), "
                                         r"delta 0.05\); raise --epsilon or drop "
                                         r"--memorised-only$"):
        analyse(tmp_path, epsilon=0.05, memorised_only=True)


def test_scores_of_a_label_with_no_memorised_sample_are_noted_not_refused(tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text("checkpoint,score,group\n" + "".join(
        f"step{s},0.{s // 100},{g}\n" for s in (100, 200, 300) for g in ("math", "code")))
    # explicit epsilon 0.5: only math samples (final losses 0.1-0.4) are memorised
    result = analyse(tmp_path, group_by="domain", memorised_only=True, epsilon=0.5,
                     scores=scores)
    assert set(result.metrics["group"]) == {"t*=200/math"}
    assert ("the scores of group(s) 'code' match no group of this run (e.g. no sample of that "
            "label is memorised), so they were not used") in result.notes


def test_too_few_checkpoints_for_a_correlation_is_said_in_the_report(tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text("checkpoint,score\nstep100,0.1\nstep200,0.2\nstep300,0.3\n")
    result = analyse(tmp_path, scores=scores, from_step=200)
    assert result.correlations is None
    reason = "--from-step 200 leaves 2 of 3 checkpoints; correlation needs 3"
    assert f"correlations skipped: {reason}" in result.notes
    assert (f"No correlation was computed: {reason}."
            in (tmp_path / "out" / "report.md").read_text())


def test_correlations_of_small_groups_and_few_checkpoints_are_flagged_and_noted(tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text("checkpoint,score\nstep100,0.1\nstep200,0.2\nstep300,0.4\n")
    result = analyse(tmp_path, scores=scores, group_by="domain")
    correlations = result.correlations
    assert correlations["too_small"].notna().all()  # 3 checkpoints, groups of 1 to 9 samples
    all_ = correlations[(correlations["group"] == "all") & (correlations["metric"] == "loss")]
    assert all_["too_small"].item() == ("too few checkpoints (3 < 5) and group too small "
                                        "(9 < 20 samples)")
    assert all_["partial_control"].item() == "pathway_length"
    assert result.table1.isin(["too small", "n/a / n/a"]).all().all()  # no number headlined
    assert (f"{len(correlations)} of {len(correlations)} correlations are over fewer than 5 "
            "checkpoints or a group of fewer than 20 samples") in " ".join(result.notes)
    lenient = analyse(tmp_path / "lenient", scores=scores, group_by="domain",
                      min_checkpoints=3, min_group_size=1, control=None)
    flagged = lenient.correlations.dropna(subset=["too_small"])
    assert (flagged["n"] < 3).all()  # the t*=200 groups from step 200 on; no distance of one
    assert flagged["too_small"].str.startswith("too few checkpoints").all()
    assert lenient.correlations["partial_control"].isna().all()


def test_grouping_by_the_id_column_is_refused(tmp_path):
    with pytest.raises(MetricError, match="cannot group by 'sample_id': every sample would be "
                                          "a group of its own; group by one of: domain, step"):
        analyse(tmp_path, group_by="sample_id")

"""`moepath compare`: checkpoints served in turn, metric trajectories, resume, and refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import TEST_MEMORY, write_jsonl
from test_cli_trace import assert_one_line_error, moepath

from moepath.tracer import Trace, store
from moepath.tracer import compare as cmp
from moepath.tracer.errors import InputError, ModelError


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
    found = cmp.discover([tmp_path / "run"])
    assert [(c.name, c.step) for c in found] == [
        ("step300", 300), ("checkpoint-2000", 2000), ("step5000-tokens21B", 5000)]


def test_explicit_folders_keep_the_given_order(tmp_path):
    b, a = fake_checkpoint(tmp_path / "b"), fake_checkpoint(tmp_path / "a")
    assert [c.name for c in cmp.discover([b, a])] == ["b", "a"]
    assert cmp.steps(cmp.discover([b, a])) == {"b": 0, "a": 1}


def test_checkpoints_with_different_routing_shapes_are_refused_naming_the_difference(tmp_path):
    found = cmp.discover([fake_checkpoint(tmp_path / "step1"),
                          fake_checkpoint(tmp_path / "step2", num_experts=32)])
    with pytest.raises(ModelError, match="'step1' and 'step2' differ in num_experts 16 vs 32"):
        cmp.check_compatible(found)


def test_missing_folder_and_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="checkpoint folder '.*nope' does not exist"):
        cmp.discover([tmp_path / "nope", tmp_path])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a model folder nor a folder of checkpoints"):
        cmp.discover([tmp_path / "empty"])


def test_parent_folder_with_unnumbered_checkpoints_is_refused(tmp_path):
    fake_checkpoint(tmp_path / "run" / "step10")
    fake_checkpoint(tmp_path / "run" / "final")
    with pytest.raises(InputError, match=r"without a step number in their name: \['final'\]"):
        cmp.discover([tmp_path / "run"])


def test_cli_refuses_mismatched_checkpoints_before_serving(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "text": "x"}])
    result = moepath("compare", fake_checkpoint(tmp_path / "step1"),
                     fake_checkpoint(tmp_path / "step2", num_experts_per_tok=2),
                     "--samples", samples, "--out", tmp_path / "out")
    assert_one_line_error(result, "differ in top_k 4 vs 2")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def compared(toy_factory, samples_file, tmp_path_factory):
    """Three toy checkpoints (seeds 0, 1, 2 as steps 100-300) compared end to end."""
    root = tmp_path_factory.mktemp("compare")
    for step, seed in ((100, 0), (200, 1), (300, 2)):
        shutil.copytree(toy_factory("olmoe", seed=seed), root / "run" / f"step{step}")
    scores = root / "scores.csv"
    pd.DataFrame({"checkpoint": ["step100", "step200", "step300"],
                  "score": [0.1, 0.4, 0.8]}).to_csv(scores, index=False)
    args = ("compare", root / "run", "--samples", samples_file, "--out", root / "out",
            "--scores", scores, "--group-by", "domain", "--enforce-eager",
            "--gpu-memory-utilization", str(TEST_MEMORY),
            "--max-model-len", "512")
    result = moepath(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, args, result


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


def _trace_state(trace_dir) -> tuple[str | None, int]:
    """(status, committed samples) of a trace directory being written; (None, 0) before."""
    try:
        manifest = store.read_manifest(trace_dir)
    except Exception:  # noqa: BLE001 - not written yet, or mid-replace
        return None, 0
    return manifest["status"], sum(entry["rows"] for entry in manifest["shards"]["samples"])


def _kill_when(command, predicate, timeout=300.0) -> None:
    """Start ``command`` and SIGKILL it (and its engine process) once ``predicate()`` holds."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


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
    _kill_when(command, lambda: _trace_state(traces / "step100")[0] == "complete")
    assert _trace_state(traces / "step100")[0] == "complete"
    assert _trace_state(traces / "step300") == (None, 0)
    # second kill: checkpoint 2 half traced (within a checkpoint)
    _kill_when(command, lambda: _trace_state(traces / "step200")[1] >= 16)
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

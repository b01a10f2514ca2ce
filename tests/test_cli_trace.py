"""`moepath trace` from the command line: what users see when things go right and wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pyarrow as pa
import pytest
from conftest import TEST_MEMORY, files_of, write_jsonl
from test_store import make_record, write_trace

from moepath.tracer import Trace, checkpoints, store


def moepath(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moepath.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def small_samples(tmp_path):
    return write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "text": "one two three"},
                                               {"id": "b", "text": "four five six seven"}])


def assert_one_line_error(result, expected: str):
    """Exit code 1, nothing on stdout, no traceback, and the error as the last stderr line
    (progress lines such as "tracing with ..." may come before it)."""
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("moepath: error: ")
    assert expected in lines[-1], lines[-1]


def test_missing_model_path(tmp_path, small_samples):
    result = moepath("trace", tmp_path / "nope", "--samples", small_samples,
                     "--out", tmp_path / "o")
    assert_one_line_error(result, f"model path '{tmp_path / 'nope'}' does not exist")
    assert not (tmp_path / "o").exists()


def test_vllm_data_parallelism_is_refused_with_the_parts_that_replace_it(tmp_path, toy_olmoe,
                                                                          small_samples):
    result = moepath("trace", toy_olmoe, "--samples", small_samples, "--out", tmp_path / "o",
                     "--data-parallel-size", "2")
    assert_one_line_error(result, "--data-parallel-size 2: vLLM 0.32 runs data parallelism "
                                  "only as one engine process per rank")
    assert "moepath trace ... --part I/2 for I in 0..1, then moepath merge" in result.stderr
    assert not (tmp_path / "o").exists()


def dense_checkpoint(path):
    """A folder with the config.json of a dense (no MoE) model."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64}))
    return path


def test_dense_model_is_refused_before_loading_weights(tmp_path, small_samples):
    dense = dense_checkpoint(tmp_path / "dense")
    result = moepath("trace", dense, "--samples", small_samples, "--out", tmp_path / "o")
    assert_one_line_error(result, "(LlamaForCausalLM) has no MoE layers")
    assert not (tmp_path / "o").exists()
    write_trace(tmp_path / "old", [make_record("a", 4, 1)])
    before = files_of(tmp_path / "old")
    result = moepath("trace", dense, "--samples", small_samples, "--out", tmp_path / "old",
                     "--force")
    assert_one_line_error(result, "(LlamaForCausalLM) has no MoE layers")
    assert files_of(tmp_path / "old") == before


def test_malformed_line_is_named_and_nothing_is_written(tmp_path, toy_olmoe):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": oops}\n')
    result = moepath("trace", toy_olmoe, "--samples", bad, "--out", tmp_path / "o")
    assert_one_line_error(result, "line 2")
    assert "--skip-bad-lines" in result.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_directory_needs_resume_or_force(tmp_path, toy_olmoe, small_samples):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("precious")
    result = moepath("trace", toy_olmoe, "--samples", small_samples, "--out", tmp_path / "o")
    assert_one_line_error(result, "already exists; pass --resume")
    assert (tmp_path / "o" / "keep.txt").read_text() == "precious"


def test_force_does_not_wipe_a_directory_that_is_not_a_trace(tmp_path, toy_olmoe,
                                                              small_samples):
    result = moepath("trace", toy_olmoe, "--samples", small_samples, "--out", ".", "--force",
                     cwd=tmp_path)
    assert_one_line_error(result, "--force would delete '.', which is not a moepath trace")
    assert small_samples.is_file()
    result = moepath("trace", toy_olmoe, "--samples", small_samples, "--out", small_samples)
    assert_one_line_error(result, f"output directory '{small_samples}' is a file")


def name_as_model(trace_dir, manifest: dict, model) -> None:
    """Record ``model`` (its config and router weights) as the model of a synthetic trace."""
    by_layer = checkpoints.router_weights(model, checkpoints.moe_shape(model).num_experts)
    layer_ids = sorted(by_layer)
    manifest["model"].update(path=str(model), layer_ids=layer_ids,
                             num_experts=checkpoints.moe_shape(model).num_experts,
                             config_sha256=checkpoints.config_sha256(model))
    manifest["router_weights"] = asdict(store.write_router_weights(
        trace_dir, [by_layer[i] for i in layer_ids]))


def test_resuming_a_failed_trace_to_completion_clears_its_capture_error(tmp_path, toy_olmoe,
                                                                        small_samples, no_engine):
    """Every sample was committed before capture failed: resume finishes without an engine
    (the command runs in this process, where starting one fails the test)."""
    from typer.testing import CliRunner

    from moepath.cli.main import app
    from moepath.tracer.provenance import input_section
    from moepath.tracer.samples import read_samples

    out = tmp_path / "o"
    writer = write_trace(out, [make_record(sid, 4, i) for i, sid in enumerate("ab")])
    writer.commit(samples=pa.table({"sample_id": ["a", "b"], "num_tokens": [4, 4]}))
    manifest = store.read_manifest(out)
    manifest.update(input=input_section(read_samples(small_samples)).to_dict(),
                    status="failed", capture_error="routing shard write failed: disk full")
    name_as_model(out, manifest, toy_olmoe)  # resume checks it continues the same model
    store.write_manifest(out, manifest)

    result = CliRunner().invoke(app, ["trace", str(toy_olmoe), "--samples", str(small_samples),
                                      "--out", str(out), "--resume"])
    assert result.exit_code == 0, repr(result.exception)
    resumed = store.read_manifest(out)
    assert (resumed["status"], resumed["capture_error"]) == ("complete", None)
    assert resumed["shards"] == manifest["shards"]


def test_an_over_long_sample_is_named_with_the_fix(tmp_path, toy_olmoe):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "short", "text": "a b"},
                                                  {"id": "essay", "text": "word " * 300}])
    result = moepath("trace", toy_olmoe, "--samples", samples, "--out", tmp_path / "o",
                     "--max-model-len", "64")
    assert_one_line_error(result, f"sample 'essay' of '{samples}' is ")
    assert "tokens, longer than the limit 63" in result.stderr
    assert "--truncate" in result.stderr


def test_an_over_long_sample_is_refused_before_force_deletes_the_old_trace(tmp_path, toy_olmoe):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "essay", "text": "word " * 300}])
    write_trace(tmp_path / "o", [make_record("a", 4, 1)])  # a trace: --force would empty it
    before = files_of(tmp_path / "o")
    result = moepath("trace", toy_olmoe, "--samples", samples, "--out", tmp_path / "o",
                     "--max-model-len", "64", "--force")
    assert_one_line_error(result, "sample 'essay' of ")
    assert files_of(tmp_path / "o") == before  # manifest, router weights and shard


@pytest.mark.vllm
def test_trace_writes_a_complete_trace_and_resume_is_a_no_op(tmp_path, toy_olmoe):
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"id": f"x{i}", "text": "the router " * (i + 1), "domain": "d"} for i in range(6)]
        + [{"id": "essay", "text": "word " * 100, "domain": "long"}])
    out = tmp_path / "trace"
    result = moepath("trace", toy_olmoe, "--samples", samples, "--out", out, "--enforce-eager",
                     "--gpu-memory-utilization", str(TEST_MEMORY),
                     "--max-model-len", "64", "--truncate", "--batch-size", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "truncated samples" in result.stderr
    trace = Trace.open(out)
    assert trace.manifest.status == "complete"
    assert trace.manifest.counts.samples == 7
    assert trace.manifest.counts.truncated == 1
    samples_table = trace.samples.set_index("sample_id")
    assert samples_table.loc["essay", "num_tokens"] == 63
    assert bool(samples_table.loc["essay", "truncated"])
    assert samples_table["nll"].between(0, 20).all()
    assert len(trace.positions("x0")) == samples_table.loc["x0", "num_tokens"]
    committed = files_of(out)
    again = moepath("trace", toy_olmoe, "--samples", samples, "--out", out, "--enforce-eager",
                    "--gpu-memory-utilization", str(TEST_MEMORY),
                    "--max-model-len", "64", "--truncate", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "7 sample(s) already traced" in again.stderr
    assert len(Trace.open(out).samples) == 7
    del committed["manifest.json"]  # rewritten by the resume, with the same shards
    assert {name: data for name, data in files_of(out).items()
            if name != "manifest.json"} == committed
    assert store.read_manifest(out)["shards"] == trace.manifest.to_dict()["shards"]

"""Data parallel: engines trace disjoint parts of one samples file; `moepath merge` joins them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import TEST_MEMORY, files_of
from test_capture import agree_outside_near_ties
from test_cli_trace import assert_one_line_error, moepath
from test_store import make_record, write_trace

from moepath.tracer import Trace, store
from moepath.tracer.errors import InputError
from moepath.tracer.merge import merge_traces


def trace_part(model, samples, out, part: str) -> subprocess.Popen:
    """`moepath trace --part` on one core, eager (the session's ``olmoe_trace`` is compiled)."""
    index = part.split("/")[0]
    return subprocess.Popen(
        [sys.executable, "-m", "moepath.cli.main", "trace", str(model), "--samples",
         str(samples), "--out", str(out), "--max-model-len", "512", "--batch-size", "16",
         "--enforce-eager", "--gpu-memory-utilization", str(TEST_MEMORY), "--part", part],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": index})


@pytest.fixture(scope="module")
def parts(olmoe_trace, toy_olmoe, tmp_path_factory):
    """The standard samples traced as parts 0/2 and 1/2 by two engines at once."""
    root = tmp_path_factory.mktemp("parts")
    samples = Trace.open(olmoe_trace).manifest.input.path
    runs = [trace_part(toy_olmoe, samples, root / f"part{i}", f"{i}/2") for i in range(2)]
    for run in runs:
        _, stderr = run.communicate()
        assert run.returncode == 0, stderr[-3000:]
    return [root / "part0", root / "part1"]


@pytest.mark.vllm
def test_two_engines_on_disjoint_parts_merge_into_the_trace_of_the_whole_file(
        parts, olmoe_trace, hf_olmoe, tmp_path):
    halves = [Trace.open(p) for p in parts]
    assert [h.manifest.input.part for h in halves] == [(0, 2), (1, 2)]
    assert not set(halves[0].sample_ids()) & set(halves[1].sample_ids())

    result = moepath("merge", *parts, "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    whole = Trace.open(olmoe_trace)
    counts = whole.manifest.counts
    assert (f"merged 2 parts into {tmp_path / 'merged'}: {counts.samples} samples, "
            f"{counts.tokens} tokens") in " ".join(result.stderr.split())  # Rich wraps lines
    merged = Trace.open(tmp_path / "merged")
    assert merged.manifest.input.part is None
    assert merged.manifest.counts == whole.manifest.counts
    assert sorted(merged.sample_ids()) == sorted(whole.sample_ids())
    a = merged.samples.set_index("sample_id").sort_index()
    b = whole.samples.set_index("sample_id").sort_index()
    assert (a["num_tokens"] == b["num_tokens"]).all() and (a["domain"] == b["domain"]).all()
    np.testing.assert_allclose(a["nll"], b["nll"], atol=2e-2)
    overall, decided = zip(*(agree_outside_near_ties(hf_olmoe, merged.token_ids(sid).tolist(),
                                                     merged.topk(sid)[0], whole.topk(sid)[0])
                             for sid in merged.sample_ids()), strict=True)
    print(f"merged eager parts vs one compiled engine: top-k agreement {np.mean(overall):.4%} "
          f"({np.mean(decided):.4%} outside near-ties)")
    assert np.mean(decided) == 1.0  # compiled vs eager differ at near-ties only


@pytest.mark.vllm
def test_merge_refuses_parts_that_do_not_form_one_whole(parts, olmoe_trace, tmp_path):
    assert_one_line_error(moepath("merge", parts[0], "--out", tmp_path / "m1"),
                          "merge needs at least two part traces")
    assert_one_line_error(moepath("merge", parts[0], parts[0], "--out", tmp_path / "m2"),
                          "parts ['0/2', '0/2']; merge needs each part 0/2 .. 1/2 exactly once")
    assert_one_line_error(moepath("merge", parts[0], olmoe_trace, "--out", tmp_path / "m3"),
                          "the traces are parts ['0/2', 'whole']")
    other = tmp_path / "other-options"
    shutil.copytree(parts[1], other)
    manifest = store.read_manifest(other)
    manifest["options"]["dtype"] = "float32"
    store.write_manifest(other, manifest)
    assert_one_line_error(moepath("merge", parts[0], other, "--out", tmp_path / "m4"),
                          "other settings (--dtype bfloat16, now float32)")
    manifest["options"]["dtype"], manifest["status"] = "bfloat16", "running"
    store.write_manifest(other, manifest)
    assert_one_line_error(moepath("merge", parts[0], other, "--out", tmp_path / "m5"),
                          "is not complete (status 'running')")
    assert not any((tmp_path / f"m{i}").exists() for i in range(1, 6))


@pytest.mark.vllm
def test_resuming_with_another_part_or_file_is_refused_before_any_engine_starts(
        parts, toy_olmoe, tmp_path, no_engine):
    from moepath.patches.engine import trace_samples
    from moepath.tracer.errors import InputError
    from moepath.tracer.samples import read_samples

    samples = Trace.open(parts[0]).manifest.input.path
    before = files_of(parts[0])
    with pytest.raises(InputError, match=r"different part \('.*' part 0/2, now '.*' part 1/2\)"):
        trace_samples(toy_olmoe, read_samples(samples).take_part(1, 2), parts[0], resume=True)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(json.dumps({"id": "new", "text": "something else"}) + "\n")
    with pytest.raises(InputError, match="different samples file"):
        trace_samples(toy_olmoe, read_samples(changed), parts[0], resume=True)
    assert files_of(parts[0]) == before  # nothing lost


def write_part(trace_dir, index: int, count: int = 2):
    """A complete part trace without vLLM: sample 'p<index>', part index/count of one file."""
    write_trace(trace_dir, [make_record(f"p{index}", 4, index)])
    manifest = store.read_manifest(trace_dir)
    manifest.update(
        status="complete", created="2025-01-01T00:00:00+0000", versions={}, options={},
        input={"path": "s.jsonl", "sha256": "ab" * 32, "format": "jsonl", "part": [index, count]},
        counts={"samples": 1, "routing_records": 1, "tokens": 4, "skipped_lines": 0})
    store.write_manifest(trace_dir, manifest)
    return trace_dir


@pytest.fixture
def synthetic_parts(tmp_path):
    return [write_part(tmp_path / "parts" / f"p{i}", i) for i in range(2)]


def test_synthetic_parts_merge(synthetic_parts, tmp_path):
    merge_traces(synthetic_parts, tmp_path / "merged")
    merged = Trace.open(tmp_path / "merged")
    assert merged.sample_ids() == ["p0", "p1"]
    assert merged.manifest.counts.samples == 2


def test_merging_into_an_existing_trace_needs_force(synthetic_parts, tmp_path):
    merge_traces(synthetic_parts, tmp_path / "merged")
    result = moepath("merge", *synthetic_parts, "--out", tmp_path / "merged")
    assert_one_line_error(result, "already exists; pass --force to overwrite it, or another "
                                  "--out")
    assert "--resume" not in result.stderr  # merge has no --resume


@pytest.mark.parametrize(("out", "relation"), [
    ("parts/p0", "is part"),
    ("parts", "contains part"),
    ("parts/p0/merged", "is inside part"),
])
def test_an_out_that_overlaps_a_part_is_refused_before_anything_is_deleted(
        synthetic_parts, tmp_path, out, relation):
    with pytest.raises(InputError, match=f"--out '.*{out}' {relation} '.*p0'; choose an --out"):
        merge_traces(synthetic_parts, tmp_path / out, force=True)
    assert [Trace.open(p).sample_ids() for p in synthetic_parts] == [["p0"], ["p1"]]
    assert not (tmp_path / "parts" / "p0" / "merged").exists()


def rewrite(trace_dir, **sections) -> None:
    """Replace manifest sections of a part (only where a test needs the parts to differ)."""
    manifest = store.read_manifest(trace_dir)
    for key, values in sections.items():
        manifest[key] = {**manifest[key], **values}
    store.write_manifest(trace_dir, manifest)


def test_parts_that_differ_only_in_engine_resources_merge(synthetic_parts, tmp_path):
    # batch size and memory share change how fast a part runs, not what it records
    rewrite(synthetic_parts[0], options={"dtype": "bfloat16", "batch_size": 64,
                                         "gpu_memory_utilization": 0.3})
    rewrite(synthetic_parts[1], options={"dtype": "bfloat16", "batch_size": 256,
                                         "gpu_memory_utilization": 0.5})
    merge_traces(synthetic_parts, tmp_path / "merged")
    assert Trace.open(tmp_path / "merged").sample_ids() == ["p0", "p1"]


@pytest.mark.parametrize(("sections", "difference"), [
    ({"options": {"dtype": "float32"}}, "other settings (--dtype bfloat16, now float32)"),
    ({"input": {"read": {"id_field": "uid", "text_field": "text", "skip_bad_lines": False,
                         "limit": None}}}, "read otherwise (--id-field id, now uid)"),
    ({"input": {"read": {"id_field": "id", "text_field": "text", "skip_bad_lines": False,
                         "limit": 100}}}, "read otherwise (--limit None, now 100)"),
])
def test_parts_that_record_differently_or_cover_other_samples_are_refused(
        synthetic_parts, tmp_path, sections, difference):
    read = {"id_field": "id", "text_field": "text", "skip_bad_lines": False, "limit": None}
    rewrite(synthetic_parts[0], options={"dtype": "bfloat16"}, input={"read": read})
    rewrite(synthetic_parts[1], options={"dtype": "bfloat16"}, input={"read": read})
    rewrite(synthetic_parts[1], **sections)
    with pytest.raises(InputError, match=rf"belong with '.*p0': .*{re.escape(difference)}"):
        merge_traces(synthetic_parts, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def corrupt_shard(part) -> None:
    shard = part / "routing" / "run-r0-000000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda parts: shutil.rmtree(parts[1]),
     "trace directory '{p1}' does not exist; run `moepath trace` first"),
    (lambda parts: corrupt_shard(parts[1]),
     "trace file 'routing/run-r0-000000.parquet' in '{p1}' is corrupted (sha256 differs"),
    (lambda parts: rewrite(parts[1], input={"sha256": "cd" * 32, "path": "other.jsonl"}),
     "'{p1}' does not belong with '{p0}': it was traced from a different samples file "
     "('s.jsonl', now 'other.jsonl')"),
    (lambda parts: rewrite(parts[1], model={"architecture": "OtherMoE"}),
     "'{p1}' does not belong with '{p0}': it differs in its model"),
], ids=["missing-part", "corrupted-shard", "other-samples-file", "other-model"])
def test_a_missing_damaged_or_foreign_part_is_refused_and_nothing_is_written(
        synthetic_parts, tmp_path, damage, message):
    damage(synthetic_parts)
    before = [files_of(part) for part in synthetic_parts]
    result = moepath("merge", *synthetic_parts, "--out", tmp_path / "merged")
    assert_one_line_error(result, message.format(p0=synthetic_parts[0], p1=synthetic_parts[1]))
    assert not (tmp_path / "merged").exists()
    assert [files_of(part) for part in synthetic_parts] == before

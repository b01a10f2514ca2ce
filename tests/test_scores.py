"""Eval-harness scores: per-document tables, and their join onto a trace's samples."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_store import make_record, write_trace

from moepath.tracer import Trace, store
from moepath.tracer.errors import CaptureError, MetricError, TraceFormatError
from moepath.tracer.scores import attach_scores, doc_scores


def record(doc_id: int, filter_: str = "none", **metrics) -> dict:
    return {"doc_id": doc_id, "filter": filter_, "metrics": list(metrics), **metrics}


@pytest.mark.parametrize("logged, expected", [
    # the module docstring's example: one filter keeps plain names, values become floats
    ({"qa": [record(0, acc=1)]}, [{"task": "qa", "doc_id": 0, "acc": 1.0}]),
    # bools (numpy or not) are scores too
    ({"qa": [record(0, acc=True), record(1, acc=np.bool_(False))]},
     [{"task": "qa", "doc_id": 0, "acc": 1.0}, {"task": "qa", "doc_id": 1, "acc": 0.0}]),
    # several filters: one column per metric and filter, as in lm-eval's results
    ({"gsm": [record(0, "strict", exact_match=0), record(0, "flex", exact_match=1)]},
     [{"task": "gsm", "doc_id": 0, "exact_match,strict": 0.0, "exact_match,flex": 1.0}]),
    # non-scalar per-document terms (aggregated per task only) are left out
    ({"ppl": [record(0, word_perplexity=(-3.5, 4))]}, [{"task": "ppl", "doc_id": 0}]),
    ({}, []),
])
def test_doc_scores(logged, expected):
    assert doc_scores(logged).to_dict("records") == expected


def eval_trace(trace_dir, status: str = "complete"):
    """A trace as a committing engine leaves it: requests' metadata, no samples table."""
    requests = {"qa/0/0/loglikelihood": ("qa", 0), "qa/0/1/loglikelihood": ("qa", 0),
                "qa/1/0/loglikelihood": ("qa", 1), "gen/0/0/generate_until": ("gen", 0)}
    records = [dataclasses.replace(make_record(sid, 4, seed), meta={"task": task, "doc_id": doc})
               for seed, (sid, (task, doc)) in enumerate(requests.items())]
    write_trace(trace_dir, records)
    manifest = store.read_manifest(trace_dir)
    manifest["status"], manifest["counts"] = status, {"routing_records": len(records)}
    store.write_manifest(trace_dir, manifest)
    return list(requests)


def test_attach_scores_joins_by_task_and_document_and_commits(tmp_path):
    ids = eval_trace(tmp_path / "t")
    scores = doc_scores({"qa": [record(0, acc=1), record(1, acc=0)],
                         "gen": [record(0, exact_match=0)]})
    attach_scores(tmp_path / "t", scores, ids)
    samples = Trace.open(tmp_path / "t").samples.set_index("sample_id")  # checksums verified
    assert samples["acc"].to_dict() == {"qa/0/0/loglikelihood": 1.0, "qa/0/1/loglikelihood": 1.0,
                                        "qa/1/0/loglikelihood": 0.0,
                                        "gen/0/0/generate_until": pytest.approx(math.nan,
                                                                                nan_ok=True)}
    assert samples.loc["gen/0/0/generate_until", "exact_match"] == 0.0
    assert store.read_manifest(tmp_path / "t")["counts"]["samples"] == 4
    with pytest.raises(TraceFormatError, match="already has a samples table"):
        attach_scores(tmp_path / "t", scores, ids)


def test_a_request_missing_from_the_trace_is_an_error(tmp_path):
    ids = eval_trace(tmp_path / "t")
    with pytest.raises(CaptureError, match="1 traced request.*'qa/2/0/loglikelihood'"):
        attach_scores(tmp_path / "t", doc_scores({}), [*ids, "qa/2/0/loglikelihood"])


def test_an_unfinished_trace_is_refused(tmp_path):
    ids = eval_trace(tmp_path / "t", status="running")
    with pytest.raises(CaptureError, match="'running', not complete"):
        attach_scores(tmp_path / "t", doc_scores({}), ids)


def test_a_metric_named_like_a_sample_column_is_refused(tmp_path):
    ids = eval_trace(tmp_path / "t")
    with pytest.raises(MetricError, match=r"\['num_tokens'\] clash"):
        attach_scores(tmp_path / "t", doc_scores({"qa": [record(0, num_tokens=3)]}), ids)

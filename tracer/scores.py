"""Per-document scores of an evaluation harness, joined onto a trace's samples table.

lm-evaluation-harness logs one record per (task, document, filter) holding the
document's metric values (``acc``, ``exact_match``, ...). ``moepath eval``
traces every request of a document as its own sample, with ``task`` and
``doc_id`` in the request metadata; :func:`attach_scores` gives each of those
samples its document's scores, so ``moepath metrics TRACE --group-by acc``
compares the pathways of right and wrong answers.

Worked example (also a test, tests/test_scores.py)::

    >>> logged = {"qa": [{"doc_id": 0, "filter": "none", "metrics": ["acc"], "acc": 1}]}
    >>> doc_scores(logged).to_dict("records")
    [{'task': 'qa', 'doc_id': 0, 'acc': 1.0}]
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import CaptureError, MetricError, TraceFormatError
from .manifest import COMPLETE
from .trace import Trace
from .writer import TraceWriter

KEYS = ["task", "doc_id"]  # how a sample finds its document


def doc_scores(logged: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per (task, doc_id) with the document's scalar metric values (float).

    ``logged``: lm-eval's ``results["samples"]`` (task -> logged records). A task
    scored through one filter keeps plain metric names (``acc``); a task with
    several filters (gsm8k's strict and flexible answer extraction) gets one
    column per metric and filter, ``"exact_match,strict-match"``, as in lm-eval's
    results. Non-scalar per-document values (BLEU's (reference, prediction)
    pairs, aggregated only per task) are left out.
    """
    rows: dict[tuple[str, int], dict] = {}
    for task, records in logged.items():
        several_filters = len({record["filter"] for record in records}) > 1
        for record in records:
            row = rows.setdefault((task, record["doc_id"]),
                                  {"task": task, "doc_id": record["doc_id"]})
            for metric in record["metrics"]:
                value = record[metric]
                if isinstance(value, numbers.Real | np.bool_):
                    name = f"{metric},{record['filter']}" if several_filters else metric
                    row[name] = float(value)
    return pd.DataFrame(list(rows.values()), columns=None if rows else KEYS)


def attach_scores(trace_dir: str | Path, scores: pd.DataFrame,
                  expected_ids: Iterable[str]) -> pd.DataFrame:
    """Commit the samples table of a finished trace, each sample with its document's scores.

    The trace was written by a committing engine (``commit=True``): it has no
    samples table yet, and each sample's ``task`` and ``doc_id`` are in its
    request metadata. Every id in ``expected_ids`` (the requests that asked to
    be traced) must have been recorded: a gap is a CaptureError, never an empty
    row. Returns the table written (sample columns, then score columns; NaN for
    a sample whose document has no score).
    """
    writer = TraceWriter.reopen(trace_dir)
    manifest = writer.manifest
    if manifest.status != COMPLETE:
        reason = manifest.capture_error or "its engine did not shut down cleanly"
        raise CaptureError(f"trace '{trace_dir}' is {manifest.status!r}, not complete "
                           f"({reason}); re-run the evaluation")
    if manifest.sample_shards:
        raise TraceFormatError(f"trace '{trace_dir}' already has a samples table; scores are "
                               "attached once, to a fresh trace")
    samples = Trace(writer.trace_dir, manifest).samples
    missing = sorted(set(expected_ids) - set(samples["sample_id"]))
    if missing:
        raise CaptureError(f"{len(missing)} traced request(s) recorded no routing (first: "
                           f"'{missing[0]}'); the trace at '{trace_dir}' is incomplete")
    _check_columns(samples, scores, writer.trace_dir)
    table = samples.merge(scores, on=KEYS, how="left", validate="many_to_one")
    writer.commit(samples=pa.Table.from_pandas(table, preserve_index=False), count=True)
    return table


def _check_columns(samples: pd.DataFrame, scores: pd.DataFrame, trace_dir: Path) -> None:
    absent = [key for key in KEYS if key not in samples.columns]
    if absent:
        raise TraceFormatError(f"samples of trace '{trace_dir}' carry no {absent} metadata; "
                               "scores can only be attached to a trace written by `moepath eval`")
    clash = sorted((set(scores.columns) - set(KEYS)) & set(samples.columns))
    if clash:
        raise MetricError(f"metric column(s) {clash} clash with the samples table of trace "
                          f"'{trace_dir}'; rename the metric in the task config")

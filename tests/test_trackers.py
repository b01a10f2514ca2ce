"""Tracker sinks: metrics sent to TensorBoard, W&B (offline) and MLflow (file store) read back
with each tracker's own reader equal metrics.parquet; nothing is sent twice."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_compare import synthetic_run

from moepath.tracer import compare as cmp
from moepath.tracer import report, trackers
from moepath.tracer.errors import InputError, TrackerError


@pytest.mark.parametrize(("metric", "group", "name"), [
    ("distance", "all", "moepath/distance/all"),
    ("consistency", "math", "moepath/consistency/math"),
    ("distance", "t*=200/math", "moepath/distance/t_star_200/math"),
    ("loss", "(missing)", "moepath/loss/_missing_"),
    ("n_samples", "a+b=c", "moepath/n_samples/a_b_c"),
])
def test_metric_names_are_stable_and_safe_for_every_tracker(metric, group, name):
    assert trackers.metric_name(metric, group) == name


def test_unknown_tracker_and_missing_client_are_one_line_errors(monkeypatch):
    assert trackers.parse_trackers(" TensorBoard, mlflow,tensorboard") == ("tensorboard",
                                                                            "mlflow")
    with pytest.raises(InputError, match="^--log-to 'comet' is not a tracker moepath logs to; "
                                         "pass a comma-separated list of tensorboard, wandb, "
                                         "mlflow$"):
        trackers.parse_trackers("tensorboard,comet")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrackerError, match=r"^--log-to wandb needs the wandb client, which is "
                                           r"not installed; pip install 'moepath\[wandb\]'$"):
        trackers.check_available(("tensorboard", "wandb"))


def test_two_groups_that_log_under_one_name_are_refused():
    frame = pd.DataFrame({"checkpoint": ["a", "a"], "step": [1, 1], "group": ["x*y", "x?y"],
                          "metric": ["loss", "loss"], "value": [1.0, 2.0]})
    with pytest.raises(InputError, match="groups 'x\\*y' and 'x\\?y' both log as "
                                         "'moepath/loss/x_y'"):
        trackers.pending_rows(frame, {})


def tensorboard_points(out) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every event, read with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0},
                              purge_orphaned_data=False)
    events.Reload()
    return [(tag, event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
            for tag in events.Tags()["tensors"] for event in events.Tensors(tag)]


def tensorboard_values(out) -> dict[tuple[str, int], float]:
    """(tag, step) -> last value."""
    return {(tag, step): value for tag, step, value in tensorboard_points(out)}


def wandb_records(path: str):
    """The records of a W&B run file (``run-<id>.wandb``): wandb's log format (a file
    header ':W&B', magic 0xBEE1, version 0; then LevelDB-log blocks of 32 KiB whose records
    carry a crc32, length and type: full, first, middle, last), each a ``Record`` proto.
    wandb 0.31 ships no Python reader of its own (it moved to its Go core)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    position, pending, block = 7, b"", 32768
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if (kind, length) == (0, 0):
            position += room
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_values(out) -> dict[tuple[str, int], float]:
    """(metric, moepath/step) -> last value of every history row of the offline runs."""
    values = {}
    for path in sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                values.update({(key, row[trackers.STEP_METRIC]): value
                               for key, value in row.items() if key.startswith("moepath/")
                               and key != trackers.STEP_METRIC})
    return values


def mlflow_points(out) -> list[tuple[str, int, float]]:
    """(metric, step, value) of every point of the run in the file store, in the order
    logged (MLflow 3 opens the store only with MLFLOW_ALLOW_FILE_STORE, as the sink sets it
    in the process that logged)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / trackers.LEDGER).read_text())["runs"]["mlflow"]
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    return [(name, point.step, point.value) for name in client.get_run(run_id).data.metrics
            for point in sorted(client.get_metric_history(run_id, name),
                                key=lambda m: m.timestamp)]


def mlflow_values(out) -> dict[tuple[str, int], float]:
    """(metric, step) -> last value."""
    return {(name, step): value for name, step, value in mlflow_points(out)}


def expected_values(out) -> dict[tuple[str, int], float]:
    metrics = pd.read_parquet(out / "metrics.parquet")
    return {(trackers.metric_name(r.metric, r.group), int(r.step)): float(r.value)
            for r in metrics.itertuples()}


READERS = {"tensorboard": tensorboard_values, "wandb": wandb_values, "mlflow": mlflow_values}
POINTS = {"tensorboard": tensorboard_points, "mlflow": mlflow_points}


def assert_trackers_equal_metrics(out, names=trackers.TRACKERS) -> None:
    """Every tracker read back holds metrics.parquet's values at their steps as the last
    value sent (TensorBoard stores float32). Beyond them only memorised groups that an
    earlier update had and a later checkpoint redefined (trackers keep what was sent)."""
    expected = expected_values(out)
    for name in names:
        logged = READERS[name](out)
        assert set(expected) <= set(logged), name
        assert all("/t_star_" in key for key, _ in set(logged) - set(expected)), name
        for key, value in expected.items():
            assert logged[key] == pytest.approx(value, rel=1e-6 if name == "tensorboard"
                                                else 1e-12), (name, key)


def assert_stored_once(out, names=tuple(POINTS)) -> None:
    """Each tracker holds every value of metrics.parquet at its step exactly once."""
    for name in names:
        points = POINTS[name](out)
        assert len(points) == len(set(points)), name
    assert_trackers_equal_metrics(out, names)


def break_store(out, name: str) -> Path:
    """Make tracker ``name``'s store unwritable: a regular file where its folder goes (tests
    may run as root, whom chmod does not stop); return where the folder was moved to."""
    store = trackers.store_of(out, name)
    aside = store.with_name(f"{store.name}.aside")
    if store.exists():
        store.rename(aside)
    store.write_text("a file where a folder should be\n")
    return aside


def mend_store(out, name: str) -> None:
    store = trackers.store_of(out, name)
    store.unlink()
    aside = store.with_name(f"{store.name}.aside")
    if aside.exists():
        aside.rename(store)


@pytest.mark.slow
def test_a_failing_tracker_keeps_the_others_going_and_gets_what_it_lacks_once_it_works(
        tmp_path):
    """TensorBoard cannot open its folder; MLflow's store goes away half way. Each failure is
    noted with its error, first step and count; the other tracker logs on; once mended,
    each receives every value it lacked, and none twice (read back with their own readers)."""
    found = synthetic_run(tmp_path, layers=4)
    out = tmp_path / "out"
    analysis = cmp.analyse(found, tmp_path / "traces", cmp.CompareOptions(group_by="domain"))
    report.write_outputs(out, analysis, command="")
    metrics = analysis.metrics
    n = len(metrics) // 3  # values per checkpoint
    assert metrics.groupby("step").size().to_dict() == {100: n, 200: n, 300: n}

    break_store(out, "tensorboard")
    log = trackers.TrackerLog(out, ("tensorboard", "mlflow"))
    assert log.log(metrics[metrics.step == 100]) == {"tensorboard": 0, "mlflow": n}
    failure = log.failures["tensorboard"]
    assert (failure.tracker, failure.step, failure.checkpoint, failure.unsent) == (
        "tensorboard", 100, "step100", n)
    assert failure.error == f"FileExistsError: [Errno 17] File exists: '{out / 'tensorboard'}'"
    assert failure.describe() == (
        f"tracker tensorboard failed: {failure.error}; {n} value(s) from step 100 "
        f"('step100') on are not stored in '{out / 'tensorboard'}'")

    break_store(out, "mlflow")  # mid-run: the open MLflow run's store is gone
    assert log.log(metrics[metrics.step <= 200]) == {"tensorboard": 0, "mlflow": 0}
    assert {name: (f.step, f.unsent) for name, f in log.failures.items()} == {
        "tensorboard": (100, 2 * n), "mlflow": (200, n)}
    assert log.failures["tensorboard"].since == failure.since  # still the same failure
    assert "is not a directory" in log.failures["mlflow"].error

    mend_store(out, "tensorboard")
    assert log.log(metrics) == {"tensorboard": 3 * n, "mlflow": 0}
    assert set(log.failures) == {"mlflow"} and log.failures["mlflow"].unsent == 2 * n
    log.close()
    assert_stored_once(out, ["tensorboard"])

    # a compare meanwhile: the one-line error names the tracker and what to do
    with pytest.raises(TrackerError, match=(
            rf"^tracker mlflow failed: .*; {2 * n} value\(s\) from step 200 \('step200'\) "
            rf"on are not stored in '.*mlruns'; the outputs in '.*' and the other trackers are "
            rf"written; fix it and run the same command again: it sends only what the "
            rf"tracker lacks$")):
        trackers.log_metrics(out, metrics, ("tensorboard", "mlflow"))

    mend_store(out, "mlflow")  # a new process sends MLflow what it lacks, into its run
    assert trackers.log_metrics(out, metrics, ("tensorboard", "mlflow")) == {
        "tensorboard": 0, "mlflow": 2 * n}
    assert_stored_once(out)


@pytest.mark.slow
def test_trackers_read_back_equal_metrics_parquet_and_nothing_is_sent_twice(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    found = synthetic_run(tmp_path, layers=4)
    out = tmp_path / "out"
    analysis = cmp.analyse(found, tmp_path / "traces", cmp.CompareOptions(group_by="domain"))
    report.write_outputs(out, analysis, command="")
    counts = trackers.log_metrics(out, analysis.metrics, trackers.TRACKERS)
    assert counts == dict.fromkeys(trackers.TRACKERS, len(analysis.metrics))
    assert_trackers_equal_metrics(out)

    # a restart sends nothing again, into the same W&B and MLflow runs
    runs = json.loads((out / trackers.LEDGER).read_text())["runs"]
    assert trackers.log_metrics(out, analysis.metrics, trackers.TRACKERS) == dict.fromkeys(
        trackers.TRACKERS, 0)
    # a value that changed (a memorised group redefined by a later checkpoint) is sent again
    changed = analysis.metrics.copy()
    changed.loc[0, "value"] += 1.0
    assert trackers.log_metrics(out, changed, trackers.TRACKERS) == dict.fromkeys(
        trackers.TRACKERS, 1)
    assert json.loads((out / trackers.LEDGER).read_text())["runs"] == runs
    changed.to_parquet(out / "metrics.parquet", index=False)
    assert_trackers_equal_metrics(out)


# A process that logs to every tracker and is then killed (SIGKILL: no close, no finish).
_LOG_AND_DIE = """
import os, signal, sys
import pandas as pd
from moepath.tracer import trackers
log = trackers.TrackerLog(sys.argv[1], trackers.TRACKERS)
log.log(pd.read_parquet(sys.argv[1] + "/metrics.parquet"))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_values_a_killed_process_sent_but_wandb_had_not_stored_are_sent_again(tmp_path):
    """TensorBoard and MLflow store a value when it is flushed; W&B's service only when its
    run is finished, so a killed watch's W&B values count as unsent and a restart sends
    them again, into the same runs."""
    found = synthetic_run(tmp_path, layers=4)
    out = tmp_path / "out"
    analysis = cmp.analyse(found, tmp_path / "traces", cmp.CompareOptions())
    report.write_outputs(out, analysis, command="")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    killed = subprocess.run([sys.executable, "-c", _LOG_AND_DIE, str(out)], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ledger = json.loads((out / trackers.LEDGER).read_text())
    assert set(ledger["sent"]) == {"tensorboard", "mlflow"}  # stored before the kill
    assert set(ledger["runs"]) == {"wandb", "mlflow"}  # both runs continue after it

    counts = trackers.log_metrics(out, analysis.metrics, trackers.TRACKERS)
    assert counts == {"tensorboard": 0, "wandb": len(analysis.metrics), "mlflow": 0}
    assert json.loads((out / trackers.LEDGER).read_text())["runs"] == ledger["runs"]
    assert_trackers_equal_metrics(out)

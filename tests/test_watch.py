"""`moepath watch`: layouts, readiness, status, scores as they arrive; and a simulated training
run written while watch follows it (traced once each, never early, restart, rotation, a
failing checkpoint, --once)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from conftest import TEST_MEMORY, sigkill_when, write_jsonl
from test_compare import UNLABELLED, synthetic_run
from test_trackers import (
    assert_stored_once,
    assert_trackers_equal_metrics,
    break_store,
    mend_store,
    mlflow_points,
)

from moepath.fixtures.toy import corpus
from moepath.tracer import Trace, evallog, provenance, rundir, store
from moepath.tracer.errors import InputError, ModelError
from moepath.tracer.manifest import Manifest
from moepath.tracer.samples import SampleReadOptions, read_samples
from moepath.tracer.watchstatus import CheckpointStatus, WatchStatus

# --- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "step"), [
    ("checkpoint-2000", 2000), ("step_300", 300), ("step300", 300), ("step-7", 7),
    ("iter_0000100", 100), ("iter_5", 5), ("global_step42", 42), ("global_step_42", 42),
    ("tmp-checkpoint-400", None), ("checkpoint-400.partial", None), ("runs", None),
    ("step5000-tokens21B", None),
])
def test_known_layouts_give_the_step_and_only_whole_names_match(tmp_path, name, step):
    (tmp_path / name).mkdir()
    found = rundir.scan(tmp_path, rundir.layout_patterns())
    assert [(c.name, c.step) for c in found] == ([(name, step)] if step is not None else [])


def test_a_pattern_adds_a_layout_and_without_a_group_the_step_comes_from_trainer_state(
        tmp_path):
    (tmp_path / "ckpt.b").mkdir()
    (tmp_path / "ckpt.a").mkdir()
    (tmp_path / "ckpt.a" / "trainer_state.json").write_text('{"global_step": 900}')
    (tmp_path / "model-e12").mkdir()
    found = rundir.scan(tmp_path, rundir.layout_patterns(r"ckpt\.\w"))
    assert [(c.name, c.step) for c in found] == [("ckpt.a", 900), ("ckpt.b", None)]
    found = rundir.scan(tmp_path, rundir.layout_patterns(r"model-e(\d+)"))
    assert [(c.name, c.step) for c in found] == [("model-e12", 12)]


@pytest.mark.parametrize(("pattern", "message"), [
    ("ckpt_(\\d+", r"--pattern 'ckpt_\(\\\\d\+' is not a regular expression"),
    ("(a)_(\\d+)", "has 2 groups; use one, around the step number"),
])
def test_a_bad_pattern_is_refused(pattern, message):
    with pytest.raises(InputError, match=message):
        rundir.layout_patterns(pattern)


# --- readiness -------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def safetensors_bytes(tensors: dict[str, int]) -> bytes:
    """A valid safetensors file of float32 vectors of the given lengths."""
    header, offset = {}, 0
    for name, length in tensors.items():
        header[name] = {"dtype": "F32", "shape": [length], "data_offsets": [offset,
                                                                            offset + 4 * length]}
        offset += 4 * length
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(offset)


def test_a_checkpoint_is_ready_once_complete_and_unchanged_for_the_settle_time(tmp_path):
    folder, clock = tmp_path / "step1", Clock()
    folder.mkdir()
    ready = rundir.ReadinessClock(settle_s=5, clock=clock)
    assert ready.waiting_reason(folder) == "no complete config.json yet"
    (folder / "config.json").write_text('{"a": ')
    assert ready.waiting_reason(folder) == "no complete config.json yet"
    (folder / "config.json").write_text('{"a": 1}')
    (folder / rundir.INDEX).write_text(json.dumps(
        {"weight_map": {"w1": "model-1.safetensors", "w2": "model-2.safetensors"}}))
    assert ready.waiting_reason(folder) == "2 of 2 shard(s) the index lists not there yet"
    (folder / "model-1.safetensors").write_bytes(safetensors_bytes({"w1": 4}))
    (folder / "model-2.safetensors").write_bytes(safetensors_bytes({"w2": 4})[:-3])
    assert "still changing" in ready.waiting_reason(folder)
    clock.now = 3
    assert ready.waiting_reason(folder) == "files settling (3 of 5 s)"
    assert ready.next_due() == 2
    clock.now = 5
    assert ready.waiting_reason(folder) is None  # settled; the check of contents is next
    with pytest.raises(rundir.StillWriting, match="holds 84 of the 87 bytes its header lists"):
        rundir.verify(folder)
    (folder / "model-2.safetensors").write_bytes(safetensors_bytes({"w2": 4}))
    assert "still changing" in ready.waiting_reason(folder)  # it changed: settle again
    clock.now = 10
    assert ready.waiting_reason(folder) is None
    rundir.verify(folder)


def test_with_a_marker_a_checkpoint_is_ready_when_the_marker_is_there(tmp_path):
    folder = tmp_path / "step1"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(safetensors_bytes({"w": 2}))
    ready = rundir.ReadinessClock(settle_s=3600, marker="DONE")
    assert ready.waiting_reason(folder) == "no marker file 'DONE' yet"
    (folder / "DONE").touch()
    assert ready.waiting_reason(folder) is None


@pytest.mark.parametrize(("content", "error", "message"), [
    (b"garbage!" * 4, ModelError, "is not a safetensors file"),
    (struct.pack("<Q", 5) + b"{oops", ModelError, "header that does not parse"),
    (b"\x01\x00", rundir.StillWriting, "not yet a header"),
    (struct.pack("<Q", 500) + b"{}", rundir.StillWriting, "less than its header's 500"),
])
def test_bad_or_unfinished_safetensors_files_are_told_apart(tmp_path, content, error, message):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(error, match=message):
        rundir.verify(tmp_path)


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    (tmp_path / rundir.INDEX).write_text(json.dumps(
        {"weight_map": {"w1": "a.safetensors", "w9": "a.safetensors"}}))
    (tmp_path / "a.safetensors").write_bytes(safetensors_bytes({"w1": 2}))
    with pytest.raises(ModelError, match="lacks tensor 'w9'"):
        rundir.verify(tmp_path)


# --- status and scores ------------------------------------------------------------------------


def test_status_round_trips_and_a_foreign_file_is_refused(tmp_path):
    status = WatchStatus("/run", checkpoints={"step1": CheckpointStatus(1, "/run/step1")})
    status.checkpoints["step1"].set("failed", "bad header")
    status.write(tmp_path)
    again = WatchStatus.read(tmp_path)
    assert again == status
    assert json.loads((tmp_path / "status.json").read_text())["version"] == 1
    (tmp_path / "status.json").write_text('{"version": 9}')
    with pytest.raises(InputError, match="is not a moepath watch status"):
        WatchStatus.read(tmp_path)


@pytest.mark.parametrize(("name", "text"), [
    ("log.csv", "checkpoint,score\ncheckpoint-100,0.1\n200,0.2\n300,0.3\n"),
    ("log.jsonl", '{"step": 100, "score": 0.1}\n{"checkpoint": "checkpoint-200", "score": 0.2}'
                  '\n\n{"step": 300.0, "score": 0.3}\n'),
])
def test_scores_of_checkpoints_not_traced_yet_are_left_out(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    known = {"checkpoint-100": 100, "checkpoint-200": 200}
    assert evallog.known_scores(tmp_path / name, known, tmp_path / "seen.csv") == 2
    assert (tmp_path / "seen.csv").read_text() == (
        "checkpoint,score\ncheckpoint-100,0.1\ncheckpoint-200,0.2\n")
    assert evallog.known_scores(tmp_path / name, {"x": 5}, tmp_path / "none.csv") == 0


@pytest.mark.parametrize(("name", "text"), [
    ("log.csv", "step,score,eval_loss\n100,0.1,2.5\n200,0.2,\n"),
    ("log.jsonl", '{"step": 100, "score": 0.1, "eval_loss": 2.5}\n{"step": 200, "score": 0.2}\n'),
])
def test_a_validation_loss_in_the_evaluation_log_is_kept(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    known = {"checkpoint-100": 100, "checkpoint-200": 200}
    assert evallog.known_scores(tmp_path / name, known, tmp_path / "seen.csv") == 2
    assert (tmp_path / "seen.csv").read_text() == (
        "checkpoint,score,val_loss\ncheckpoint-100,0.1,2.5\ncheckpoint-200,0.2,\n")


def test_an_evaluation_log_in_a_folder_that_does_not_exist_is_refused_before_tracing(tmp_path):
    """A log that is not written yet is waited for (the `watched` run's trainer writes its
    log after watch starts); one whose folder is missing is a wrong path."""
    from moepath.patches.watch import WatchOptions, watch_run

    (tmp_path / "run").mkdir()
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"id": "a", "text": "one two"}])
    with pytest.raises(InputError, match="scores file '.*no-such-run/eval.jsonl' does not "
                                         "exist"):
        watch_run(tmp_path / "run", samples, tmp_path / "out",
                  WatchOptions(scores=tmp_path / "no-such-run" / "eval.jsonl"))


def test_a_bad_json_line_in_the_scores_is_named(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "score": 2}\n{"loss": 3}\n')
    with pytest.raises(InputError, match="log.jsonl' line 2: not a JSON object with 'step'"):
        evallog.read_log(tmp_path / "log.jsonl")


# --- a tracker that fails ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_failing_tracker_is_reported_the_watch_goes_on_and_a_later_watch_sends_what_it_lacks(
        tmp_path):
    """The traces of three checkpoints are in --out already (an earlier watch's: no engine
    starts); TensorBoard's folder is a file. `watch --once` finishes with every checkpoint
    in metrics.parquet, status.json and one stderr line name the failure, MLflow holds every
    value once; with the file gone, the next watch sends TensorBoard what it lacks, once."""
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"id": sid, "text": f"sample {sid}", "domain": domain}
        for sid, (domain, *_) in UNLABELLED.items()])
    out, run = tmp_path / "out", tmp_path / "run"
    source = provenance.input_section(read_samples(samples, SampleReadOptions()))
    for checkpoint in synthetic_run(out, source=source):
        (run / checkpoint.name).mkdir(parents=True)
    break_store(out, "tensorboard")
    watch = [sys.executable, "-m", "moepath.cli.main", "watch", str(run), "--samples",
             str(samples), "--out", str(out), "--once", "--log-to", "tensorboard,mlflow"]

    first = subprocess.run(watch, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert sorted(metrics["checkpoint"].unique()) == ["step100", "step200", "step300"]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished"
    assert {n: c["state"] for n, c in status["checkpoints"].items()} == dict.fromkeys(
        ["step100", "step200", "step300"], "done")
    failed = status["trackers"]["tensorboard"]
    error = f"FileExistsError: [Errno 17] File exists: '{out / 'tensorboard'}'"
    assert {k: failed[k] for k in ("error", "step", "checkpoint", "unsent", "store")} == {
        "error": error, "step": 100, "checkpoint": "step100", "unsent": len(metrics),
        "store": str(out / "tensorboard")}
    assert status["trackers"]["mlflow"]["error"] is None
    warnings = [line for line in first.stderr.splitlines() if "tracker tensorboard" in line]
    assert warnings[0] == (
        f"warning: tracker tensorboard failed: {error}; {len(metrics)} value(s) from step 100 "
        f"('step100') on are not stored in '{out / 'tensorboard'}'; fix that (space, "
        f"permissions): the watch goes on, and its next update, or the next watch, sends "
        f"them once")
    assert f"tracker tensorboard failing ({len(metrics)} value(s) unsent)" in warnings[1]
    assert len(warnings) == 2, first.stderr
    assert_stored_once(out, ["mlflow"])

    mend_store(out, "tensorboard")
    second = subprocess.run(watch, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "tracker tensorboard works again: every value it lacked is stored" in second.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["trackers"]["tensorboard"]["error"] is None
    assert status["trackers"]["tensorboard"]["unsent"] == 0
    assert status["report"]["logged"] == {"tensorboard": len(metrics), "mlflow": 0}
    assert_stored_once(out)


# A moepath whose W&B client cannot be imported (as if the extra were not installed).
_WITHOUT_WANDB = """
import sys
sys.modules["wandb"] = None
from moepath.cli.main import main
sys.argv = ["moepath", *sys.argv[1:]]
main()
"""


def test_a_tracker_whose_client_is_missing_stops_the_watch_before_anything_is_traced(tmp_path):
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"id": "a", "text": "one two"}])
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_WANDB, "watch", str(tmp_path / "run"), "--samples",
         str(samples), "--out", str(tmp_path / "out"), "--once", "--log-to", "mlflow,wandb"],
        capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "moepath: error: --log-to wandb needs the wandb client, which is not installed; pip "
        "install 'moepath[wandb]'"]
    assert not (tmp_path / "out").exists()


# --- a simulated training run ----------------------------------------------------------------

SETTLE = 1.0


def arrive(source, run_dir, name) -> None:
    """A checkpoint written elsewhere and moved into the run in one rename."""
    shutil.copytree(source, run_dir / f".{name}.tmp")
    os.rename(run_dir / f".{name}.tmp", run_dir / name)


def write_slowly(source, target, pause: float = 0.25, chunks: int = 10) -> float:
    """Write ``source``'s files into ``target`` one by one, the weights in ``chunks`` pieces
    ``pause`` s apart (less than the settle time); return when the last byte was written."""
    target.mkdir()
    for path in sorted(source.iterdir(), key=lambda p: p.suffix == ".safetensors"):
        data = path.read_bytes()
        with (target / path.name).open("wb") as handle:
            size = max(1, len(data) // chunks)
            for start in range(0, len(data), size):
                handle.write(data[start:start + size])
                handle.flush()
                time.sleep(pause)
    return time.time()


def corrupt_copy(source, target) -> None:
    shutil.copytree(source, target)
    (target / "model.safetensors").write_bytes(os.urandom(4096))


class Recorder:
    """A WatchProgress that notes when each checkpoint's engine was ready."""

    def __init__(self):
        self.ready: list[tuple[str, str, float]] = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def checkpoint(self, name, action):
        self.ready.append((name, action, time.time()))

    def tracing(self, name, step):
        import contextlib

        return contextlib.nullcontext()


@pytest.fixture(scope="module")
def watched(toy_factory, tmp_path_factory):
    """One watch followed a run while a trainer thread wrote into it: checkpoint-100
    arrives whole, checkpoint-200 is written slowly file by file, checkpoint-300 has a
    corrupt safetensors file, tmp-checkpoint-400 is a trainer's temporary folder."""
    from moepath.patches.options import EngineOptions, TraceOptions
    from moepath.patches.watch import WatchOptions, watch_run
    from moepath.tracer.compare import CompareOptions

    root = tmp_path_factory.mktemp("watch")
    toys = {seed: toy_factory("olmoe", seed=seed) for seed in (0, 1, 2, 3)}
    run, out = root / "run", root / "out"
    run.mkdir()
    samples = write_jsonl(root / "samples.jsonl", [
        {"id": f"s{i}", "text": line, "domain": ["math", "code"][i % 2]}
        for i, line in enumerate(corpus(48, seed=5))])
    scores = root / "eval.jsonl"  # the trainer's evaluation log: written after watch starts
    stop, finished = threading.Event(), {}

    def trainer():
        arrive(toys[0], run, "checkpoint-100")
        scores.write_text("".join(json.dumps({"step": s, "score": s / 1000})
                                  + "\n" for s in (100, 200, 300, 400)))
        (run / "tmp-checkpoint-400").mkdir()
        time.sleep(0.5)
        finished["checkpoint-200"] = write_slowly(toys[1], run / "checkpoint-200")
        corrupt_copy(toys[2], run / "checkpoint-300")

    def stopper():
        deadline = time.time() + 400
        while time.time() < deadline:
            status = WatchStatus.read(out) if (out / "status.json").exists() else None
            states = {n: c.state for n, c in status.checkpoints.items()} if status else {}
            if (states.get("checkpoint-200") == "done" and states.get("checkpoint-300")
                    == "failed" and status.report.get("checkpoints") == 2):
                break
            time.sleep(0.2)
        stop.set()

    threads = [threading.Thread(target=trainer), threading.Thread(target=stopper)]
    for thread in threads:
        thread.start()
    recorder = Recorder()
    result = watch_run(
        run, samples, out,
        WatchOptions(interval_s=0.3, settle_s=SETTLE, scores=scores,
                     log_to=("tensorboard", "wandb", "mlflow")),
        CompareOptions(group_by="domain"),
        EngineOptions(enforce_eager=True, max_model_len=512,
                      gpu_memory_utilization=TEST_MEMORY),
        TraceOptions(batch_size=4), progress=recorder, command="moepath watch", stop=stop)
    for thread in threads:
        thread.join()
    return {"root": root, "run": run, "out": out, "samples": samples, "scores": scores,
            "toys": toys, "result": result, "ready": recorder.ready, "finished": finished}


@pytest.mark.vllm
def test_each_checkpoint_is_traced_once_in_step_order_and_never_before_it_is_written(watched):
    result, out = watched["result"], watched["out"]
    assert result.traced == ["checkpoint-100", "checkpoint-200"]
    assert [(n, a) for n, a, _ in watched["ready"]] == [("checkpoint-100", "start"),
                                                       ("checkpoint-200", "reload")]
    ready_at = {n: t for n, _, t in watched["ready"]}
    assert ready_at["checkpoint-200"] >= watched["finished"]["checkpoint-200"] + SETTLE
    # the trace is of the checkpoint as finally written (routers of toy seed 1)
    trace_dir = out / "traces" / "checkpoint-200"
    manifest = Manifest.read(trace_dir)
    assert manifest.model.path == str((watched["run"] / "checkpoint-200").resolve())
    assert provenance.model_difference(trace_dir, manifest, watched["toys"][1]) is None
    ids = Trace.open(trace_dir).sample_ids()
    assert len(ids) == len(set(ids)) == 48


@pytest.mark.vllm
def test_status_json_reports_every_checkpoint_and_the_failing_one_with_its_reason(watched):
    status = json.loads((watched["out"] / "status.json").read_text())
    assert status["state"] == "stopped"
    states = {n: (c["state"], c["step"]) for n, c in status["checkpoints"].items()}
    assert states == {"checkpoint-100": ("done", 100), "checkpoint-200": ("done", 200),
                      "checkpoint-300": ("failed", 300)}
    reason = status["checkpoints"]["checkpoint-300"]["reason"]
    assert "model.safetensors' is not a safetensors file" in reason and "--retry" in reason
    assert not (watched["out"] / "traces" / "checkpoint-300").exists()


@pytest.mark.vllm
def test_the_report_and_trackers_cover_the_traced_checkpoints(watched):
    out = watched["out"]
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert sorted(metrics["checkpoint"].unique()) == ["checkpoint-100", "checkpoint-200"]
    report = (out / "report.md").read_text()
    assert "2 checkpoints: correlation needs at least 3" in report
    assert "2 checkpoint(s) traced so far: correlations appear from 3 on" in report
    assert_trackers_equal_metrics(out)


def watch_command(watched, *extra) -> list[str]:
    return [sys.executable, "-m", "moepath.cli.main", "watch", str(watched["run"]),
            "--samples", str(watched["samples"]), "--out", str(watched["out"]),
            "--scores", str(watched["scores"]), "--group-by", "domain",
            "--settle", str(SETTLE), "--interval", "0.3", "--enforce-eager",
            "--max-model-len", "512", "--gpu-memory-utilization", str(TEST_MEMORY),
            "--batch-size", "4", "--log-to", "tensorboard,wandb,mlflow", *map(str, extra)]


def committed(trace_dir) -> int:
    try:
        manifest = store.read_manifest(trace_dir)
    except Exception:  # noqa: BLE001 - not written yet, or mid-replace
        return 0
    return sum(entry["rows"] for entry in manifest["shards"]["samples"])


@pytest.mark.vllm
def test_stopped_killed_restarted_rotated_and_retried_every_checkpoint_is_traced_once(
        watched):
    run, out = watched["run"], watched["out"]
    # --once while checkpoint-300 stays broken: nothing to trace, no engine, still failed
    result = subprocess.run(watch_command(watched, "--once"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "traced now: none" in result.stderr and "starting engine" not in result.stderr

    # Ctrl-C while checkpoint-400 is half traced: status says stopped, the trace resumes
    arrive(watched["toys"][3], run, "checkpoint-400")
    process = subprocess.Popen(watch_command(watched), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while committed(out / "traces" / "checkpoint-400") < 8 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 130, stderr[-3000:]
    assert "moepath: interrupted; traced checkpoints and committed samples are kept" in stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped"
    assert status["checkpoints"]["checkpoint-400"]["state"] == "waiting"
    done = committed(out / "traces" / "checkpoint-400")
    assert 8 <= done < 48

    # rotation deletes checkpoint-100; checkpoint-300 is fixed; a --retry watch traces it
    # and is SIGKILLed (a crash, an OOM kill: no cleanup) half way into checkpoint-400
    shutil.rmtree(run / "checkpoint-100")
    shutil.copy(watched["toys"][2] / "model.safetensors", run / "checkpoint-300")
    sigkill_when(watch_command(watched, "--retry"),
                 lambda: committed(out / "traces" / "checkpoint-400") >= done + 8)
    killed = json.loads((out / "status.json").read_text())
    assert killed["state"] == "watching"  # as the killed process left it
    assert killed["checkpoints"]["checkpoint-300"]["state"] == "done"
    assert killed["checkpoints"]["checkpoint-400"]["state"] == "tracing"
    resumed = committed(out / "traces" / "checkpoint-400")
    assert done + 8 <= resumed < 48, "the kill must land inside checkpoint-400"

    # --once finishes: checkpoint-300 is not traced again, checkpoint-400 resumes; MLflow's
    # store is a file meanwhile: the watch goes on, the other trackers log
    break_store(out, "mlflow")
    result = subprocess.run(watch_command(watched, "--once"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {resumed} sample(s) already traced" in result.stderr
    assert "traced now: checkpoint-400; tracker mlflow failing" in result.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished"
    failed = status["trackers"]["mlflow"]
    assert str(out / "mlruns") in failed["error"]  # MLflow's own error, naming its store
    assert failed["unsent"] > 0 and failed["step"] <= 400
    assert status["trackers"]["tensorboard"]["error"] is None
    assert status["trackers"]["wandb"]["error"] is None
    assert_trackers_equal_metrics(out, ["tensorboard", "wandb"])
    mend_store(out, "mlflow")  # the next watch, with nothing to trace, sends what it lacks
    result = subprocess.run(watch_command(watched, "--once"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracker mlflow works again" in result.stderr
    assert "traced now: none" in result.stderr and "starting engine" not in result.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["report"]["logged"] == {"tensorboard": 0, "wandb": 0,
                                          "mlflow": failed["unsent"]}
    mlflow_at_400 = [point for point in mlflow_points(out) if point[1] == 400]
    assert len(mlflow_at_400) == len(set(mlflow_at_400)) > 0
    assert {n: (c["state"], c["deleted"]) for n, c in status["checkpoints"].items()} == {
        "checkpoint-100": ("done", True), "checkpoint-200": ("done", False),
        "checkpoint-300": ("done", False), "checkpoint-400": ("done", False)}
    for name in ("checkpoint-300", "checkpoint-400"):
        ids = Trace.open(out / "traces" / name).sample_ids()
        assert len(ids) == len(set(ids)) == 48
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert sorted(metrics["checkpoint"].unique()) == [
        "checkpoint-100", "checkpoint-200", "checkpoint-300", "checkpoint-400"]
    assert not metrics.duplicated(["checkpoint", "group", "metric"]).any()
    assert "correlations skipped" not in (out / "report.md").read_text()
    assert_trackers_equal_metrics(out)

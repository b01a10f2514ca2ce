"""Tracker sinks: the metrics of ``moepath compare`` and ``watch`` logged where pretraining
teams watch their runs, through each tracker's own client.

``--log-to tensorboard,wandb,mlflow`` logs every row of the long metrics frame
(checkpoint, step, group, metric, value) at its checkpoint's ``step``, named
:func:`metric_name` (``moepath/<metric>/<group>``, e.g. ``moepath/distance/all``):

- ``tensorboard``: event files in ``OUT/tensorboard`` (``tensorboard --logdir OUT``),
  written by TensorBoard's framework-free ``tensorboard.summary.Writer``;
- ``wandb``: a Weights & Biases run in offline mode under ``OUT/wandb`` (no network;
  ``wandb sync OUT/wandb/offline-run-*`` uploads it), steps on the ``moepath/step``
  axis, so checkpoints that arrive out of order still land at their step;
- ``mlflow``: a run of experiment ``moepath`` in a local file store, ``OUT/mlruns``
  (``mlflow ui --backend-store-uri OUT/mlruns``).

Idempotent across restarts: ``OUT/trackers.json`` records every value each tracker
has stored and the W&B and MLflow run ids, so a restarted watch continues the same
runs and sends only rows it has not stored. A value counts as stored once it is on
disk: TensorBoard's and MLflow's when they are written (flushed), W&B's only when
its run is finished (wandb's service buffers the run file), i.e. when the watch
exits; after a crash (SIGKILL) a restart sends them again, so W&B may hold a value
twice at one step (the same value). A value that changed is sent again at
the same step: the memorised groups (``t*=N``) are defined by the final loss, so
their values at earlier checkpoints change as checkpoints arrive; trackers show the
last value sent for a step, and keep the series of a memorised group that a later
checkpoint dissolved (``metrics.parquet`` is the reference). The clients are
imported only when used; a missing one is a
:class:`~moepath.tracer.errors.TrackerError` naming the extra to install.

A tracker whose client raises (a full disk, a store that became unwritable) does not
stop the others: :attr:`TrackerLog.failures` holds a :class:`TrackerFailure` (the
error, how many values it lacks and the first one's step and checkpoint), its run is
closed, and the next :meth:`TrackerLog.log` (or the next process) opens it again and
sends what it lacks, once. A client call that raised counts as having stored none of
its values (TensorBoard's: none since its last flush; W&B's: none since the run
started, unless finishing it still worked), so those are sent again; only when the
failure struck after some of them reached disk does the tracker hold those twice at
one step (the same value).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from .errors import InputError, TrackerError

TRACKERS = ("tensorboard", "wandb", "mlflow")
_CLIENT = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # module
LEDGER = "trackers.json"
STEP_METRIC = "moepath/step"
PROJECT = "moepath"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")  # MLflow allows only these (and ':')
_STORE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}  # in out_dir


def parse_trackers(value: str | None) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ("tensorboard", "wandb"); InputError naming an unknown one."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in (value or "").split(",")
                                if n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise InputError(f"--log-to {unknown[0]!r} is not a tracker moepath logs to; pass a "
                         f"comma-separated list of {', '.join(TRACKERS)}")
    return names


def check_available(names: tuple[str, ...]) -> None:
    """TrackerError naming the extra to install for the first tracker whose client is
    missing; call before hours of tracing."""
    for name in names:
        if importlib.util.find_spec(_CLIENT[name]) is None:
            raise TrackerError(f"--log-to {name} needs the {_CLIENT[name]} client, which is not "
                               f"installed; pip install 'moepath[{name}]'")


def store_of(out_dir: str | Path, name: str) -> Path:
    """Where tracker ``name`` writes in ``out_dir``: ``tensorboard``, ``wandb``, ``mlruns``."""
    return Path(out_dir) / _STORE[name]


def metric_name(metric: str, group: str) -> str:
    """The stable name of a metric of a group in every tracker: ``moepath/<metric>/<group>``,
    the group made safe for MLflow (``t*=N`` -> ``t_star_N``, ``t*<=N`` -> ``t_star_le_N``;
    other characters outside letters, digits, ``_-./`` and space -> ``_``)::

        >>> metric_name("distance", "t*=200/math")
        'moepath/distance/t_star_200/math'
        >>> metric_name("distance", "t*<=200")
        'moepath/distance/t_star_le_200'
        >>> metric_name("loss", "(missing)")
        'moepath/loss/_missing_'
    """
    safe = group.replace("t*<=", "t_star_le_").replace("t*=", "t_star_")
    return f"moepath/{metric}/{_UNSAFE.sub('_', safe)}"


def pending_rows(metrics: pd.DataFrame, sent: dict[str, float]) -> dict[int, dict[str, float]]:
    """step -> {metric name: value} of the rows of ``metrics`` not in ``sent`` (name@step
    -> value) with that value; NaN values are never sent.

    Raises:
        InputError: two groups map to one metric name.
    """
    pending: dict[int, dict[str, float]] = {}
    owners: dict[str, str] = {}
    for row in metrics.itertuples(index=False):
        name = metric_name(row.metric, row.group)
        if owners.setdefault(name, row.group) != row.group:
            raise InputError(f"groups '{owners[name]}' and '{row.group}' both log as '{name}'; "
                             f"rename one of the values")
        value = float(row.value)
        if not math.isnan(value) and sent.get(f"{name}@{int(row.step)}") != value:
            pending.setdefault(int(row.step), {})[name] = value
    return pending


@dataclass(frozen=True)
class TrackerFailure:
    """Tracker ``tracker``'s client raised ``error``; it lacks ``unsent`` values, the first
    at ``step`` (of ``checkpoint``), which the next :meth:`TrackerLog.log` sends again.
    ``store``: where it writes; ``since``: when it first failed (ISO 8601 UTC), kept while
    it goes on failing."""

    tracker: str
    error: str  # "FileExistsError: [Errno 17] File exists: '/out/tensorboard'"
    step: int | None
    checkpoint: str | None
    unsent: int
    store: str
    since: str

    def describe(self) -> str:
        """One line: the tracker, its error, what it lacks and where."""
        first = f" from step {self.step} ('{self.checkpoint}') on" if self.step is not None else ""
        return (f"tracker {self.tracker} failed: {self.error}; {self.unsent} value(s){first} "
                f"are not stored in '{self.store}'")


class TrackerLog:
    """The trackers of one output folder; :meth:`log` sends what they have not had yet.

    Sinks open on first use and stay open until :meth:`close` (a W&B run start takes
    seconds): ``moepath watch`` keeps one across its updates. A sink whose client raises
    is closed and noted in :attr:`failures` (tracker -> :class:`TrackerFailure`) until a
    later :meth:`log` sends it all it lacks; the other trackers go on.
    """

    def __init__(self, out_dir: str | Path, names: tuple[str, ...], run_name: str = "moepath"):
        check_available(names)
        self.out_dir, self.names, self.run_name = Path(out_dir), names, run_name
        self._ledger_path = self.out_dir / LEDGER
        self._ledger = (json.loads(self._ledger_path.read_text())
                        if self._ledger_path.exists() else {})
        self._sinks: dict[str, object] = {}
        # values a sink accepted but has not stored yet: name -> {metric@step: value}
        self._unstored: dict[str, dict[str, float]] = {}
        self.failures: dict[str, TrackerFailure] = {}

    def log(self, metrics: pd.DataFrame) -> dict[str, int]:
        """Send every new or changed row of ``metrics`` (the long frame) to every tracker;
        return how many values each accepted.

        Raises:
            InputError: two groups map to one metric name (before anything is sent).
        """
        pending = {name: pending_rows(metrics, self._sent(name)) for name in self.names}
        return {name: self._send(name, pending[name], metrics) for name in self.names}

    def close(self) -> None:
        """Close every sink; what they stored on closing is recorded in the ledger. One
        that fails to close is noted in :attr:`failures`; the next process sends again
        what it had not stored."""
        sinks, self._sinks = self._sinks, {}
        for name, sink in sinks.items():
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - the tracker's own library failed
                lost = self._unstored.pop(name, {})
                step = min((int(key.rsplit("@", 1)[1]) for key in lost), default=None)
                self._fail(name, exc, step, None, len(lost))
                continue
            self._store(name)

    def _sent(self, name: str) -> dict[str, float]:
        """metric@step -> value that tracker ``name`` stored or holds to store."""
        return {**self._ledger.get("sent", {}).get(name, {}), **self._unstored.get(name, {})}

    def _send(self, name: str, pending: dict[int, dict[str, float]],
              metrics: pd.DataFrame) -> int:
        """Send ``pending`` (step -> {metric: value}) to tracker ``name``; return how many
        values it accepted. An exception of its client fails this tracker only."""
        accepted = 0
        try:
            if pending:
                sink = self._sink(name)
                for step in sorted(pending):
                    sink.log(step, pending[step])
                    self._unstored.setdefault(name, {}).update(
                        {f"{metric}@{step}": value for metric, value in pending[step].items()})
                    accepted += len(pending[step])
                    if sink.STORED_BY == "log":
                        self._store(name)
                if sink.STORED_BY == "flush":
                    sink.flush()
                    self._store(name)
        except Exception as exc:  # noqa: BLE001 - the tracker's own library failed
            self._drop(name)
            lacking = pending_rows(metrics, self._sent(name))
            step = min(lacking, default=None)
            checkpoints = metrics.loc[metrics["step"] == step, "checkpoint"]
            self._fail(name, exc, step, str(checkpoints.iloc[0]) if len(checkpoints) else None,
                       sum(map(len, lacking.values())))
            return accepted
        self.failures.pop(name, None)
        return accepted

    def _drop(self, name: str) -> None:
        """Close a failed sink as well as it still can (stop a TensorBoard writer's thread,
        finish a W&B run); the values it accepted and did not store count as unsent."""
        sink = self._sinks.pop(name, None)
        try:
            if sink is not None:
                sink.close()
                if sink.STORED_BY == "close":  # W&B's run finished after all: stored
                    self._store(name)
        except Exception:  # noqa: BLE001, S110 - the failure that matters is noted
            pass
        self._unstored.pop(name, None)

    def _fail(self, name: str, exc: Exception, step: int | None, checkpoint: str | None,
              unsent: int) -> None:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        earlier = self.failures.get(name)
        self.failures[name] = TrackerFailure(
            name, f"{type(exc).__name__}: {text}" if text else type(exc).__name__, step,
            checkpoint, unsent, str(store_of(self.out_dir, name)),
            earlier.since if earlier else datetime.now(UTC).isoformat(timespec="seconds"))

    def _store(self, name: str) -> None:
        """Record the values sent to tracker ``name`` as stored (in the ledger, on disk)."""
        values = self._unstored.pop(name, {})
        if values:
            self._ledger.setdefault("sent", {}).setdefault(name, {}).update(values)
            self._save()

    def __enter__(self) -> TrackerLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sink(self, name: str):
        if name not in self._sinks:
            runs = self._ledger.setdefault("runs", {})
            sink = _SINKS[name](self.out_dir, runs.get(name), self.run_name)
            if runs.get(name) != sink.run_id:  # a restart continues this run
                runs[name] = sink.run_id
                self._save()
            self._sinks[name] = sink
        return self._sinks[name]

    def _save(self) -> None:
        tmp = self._ledger_path.with_name(f".{LEDGER}.tmp")
        tmp.write_text(json.dumps(self._ledger, indent=1))
        os.replace(tmp, self._ledger_path)


class TensorBoardSink:
    """Scalars in event files under ``out/tensorboard`` (one more file per process)."""

    STORED_BY = "flush"  # flush() writes the events to the file

    def __init__(self, out_dir: Path, run_id: str | None, run_name: str):
        from tensorboard.summary import Writer

        self.run_id = None
        self._writer = Writer(str(store_of(out_dir, "tensorboard")))

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """An offline W&B run under ``out/wandb``, resumed by id after a restart."""

    STORED_BY = "close"  # wandb's service writes the run file for sure only on finish

    def __init__(self, out_dir: Path, run_id: str | None, run_name: str):
        import wandb

        store_of(out_dir, "wandb").mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=PROJECT, name=run_name, id=run_id or secrets.token_hex(4),
            resume="allow", mode="offline", dir=str(out_dir),
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        self.run_id = self._run.id
        self._run.define_metric(STEP_METRIC)
        self._run.define_metric("moepath/*", step_metric=STEP_METRIC)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log({STEP_METRIC: step, **values})

    def flush(self) -> None:
        pass  # wandb has no public flush: the service buffers; finish() writes and closes

    def close(self) -> None:
        self._run.finish()


class MlflowSink:
    """A run of experiment ``moepath`` in the file store ``out/mlruns``.

    MLflow 3 keeps its file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set; moepath sets it (when unset) for this store.
    """

    STORED_BY = "log"  # log_batch writes the metric files before it returns

    def __init__(self, out_dir: Path, run_id: str | None, run_name: str):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=store_of(out_dir, "mlflow").resolve().as_uri())
        if run_id is None:
            experiment = self._client.get_experiment_by_name(PROJECT)
            experiment_id = (experiment.experiment_id if experiment
                             else self._client.create_experiment(PROJECT))
            run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(name, value, stamp, step) for name, value in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            self._client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the run stays open (RUNNING) while training goes on


_SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}


def log_metrics(out_dir: str | Path, metrics: pd.DataFrame, names: tuple[str, ...],
                run_name: str = "moepath") -> dict[str, int]:
    """Send ``metrics``' new rows to the trackers ``names`` once (``moepath compare``).

    Raises:
        TrackerError: a tracker's client raised (after every other tracker logged): the
            first failure, and how to send what it lacks.
    """
    if not names:
        return {}
    with TrackerLog(out_dir, names, run_name) as trackers:
        counts = trackers.log(metrics)
    failure = next(iter(trackers.failures.values()), None)
    if failure is not None:
        raise TrackerError(f"{failure.describe()}; the outputs in '{out_dir}' and the other "
                           f"trackers are written; fix it and run the same command again: it "
                           f"sends only what the tracker lacks")
    return counts

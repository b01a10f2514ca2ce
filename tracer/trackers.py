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
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import secrets
import time
from pathlib import Path

import pandas as pd

from .errors import InputError, TrackerError

TRACKERS = ("tensorboard", "wandb", "mlflow")
_CLIENT = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # module
LEDGER = "trackers.json"
STEP_METRIC = "moepath/step"
PROJECT = "moepath"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")  # MLflow allows only these (and ':')


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


class TrackerLog:
    """The trackers of one output folder; :meth:`log` sends what they have not had yet.

    Sinks open on first use and stay open until :meth:`close` (a W&B run start takes
    seconds): ``moepath watch`` keeps one across its updates.
    """

    def __init__(self, out_dir: str | Path, names: tuple[str, ...], run_name: str = "moepath"):
        check_available(names)
        self.out_dir, self.names, self.run_name = Path(out_dir), names, run_name
        self._ledger_path = self.out_dir / LEDGER
        self._ledger = (json.loads(self._ledger_path.read_text())
                        if self._ledger_path.exists() else {})
        self._sinks: dict[str, object] = {}
        # values sent to a sink that stores them only on close: name -> {metric@step: value}
        self._unstored: dict[str, dict[str, float]] = {}

    def log(self, metrics: pd.DataFrame) -> dict[str, int]:
        """Send every new or changed row of ``metrics`` (the long frame) to every tracker;
        return how many values each was sent."""
        counts = {}
        for name in self.names:
            sent = {**self._ledger.get("sent", {}).get(name, {}), **self._unstored.get(name, {})}
            pending = pending_rows(metrics, sent)
            if pending:
                sink = self._sink(name)
                for step in sorted(pending):
                    sink.log(step, pending[step])
                sink.flush()
                values = {f"{metric}@{step}": value for step, values in pending.items()
                          for metric, value in values.items()}
                self._unstored.setdefault(name, {}).update(values)
                if sink.STORED_ON_FLUSH:
                    self._store(name)
            counts[name] = sum(map(len, pending.values()))
        return counts

    def close(self) -> None:
        """Close every sink; what they stored on closing is recorded in the ledger."""
        sinks, self._sinks = self._sinks, {}
        for name, sink in sinks.items():
            sink.close()
            self._store(name)

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

    STORED_ON_FLUSH = True  # flush() writes the events to the file

    def __init__(self, out_dir: Path, run_id: str | None, run_name: str):
        from tensorboard.summary import Writer

        self.run_id = None
        self._writer = Writer(str(out_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """An offline W&B run under ``out/wandb``, resumed by id after a restart."""

    STORED_ON_FLUSH = False  # wandb's service writes the run file for sure only on finish

    def __init__(self, out_dir: Path, run_id: str | None, run_name: str):
        import wandb

        (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
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

    STORED_ON_FLUSH = True  # log_batch writes the metric files before it returns

    def __init__(self, out_dir: Path, run_id: str | None, run_name: str):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=(out_dir / "mlruns").resolve().as_uri())
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
    """Send ``metrics``' new rows to the trackers ``names`` once (``moepath compare``)."""
    if not names:
        return {}
    with TrackerLog(out_dir, names, run_name) as trackers:
        return trackers.log(metrics)

"""``status.json``: what ``moepath watch`` knows about a training run, for people and
for other tools to poll; also what a restarted watch continues from.

One JSON object, replaced atomically on every change::

    {"version": 1, "run_dir": "/runs/olmoe", "state": "watching",
     "updated": "2025-07-01T12:00:00+00:00", "pid": 4242,
     "report": {"updated": "...", "checkpoints": 3, "error": null},
     "checkpoints": {"checkpoint-200": {"step": 200, "state": "done", "reason": null,
                     "path": "/runs/olmoe/checkpoint-200", "since": "...",
                     "deleted": false}, ...},
     "trackers": {"tensorboard": {"error": "OSError: [Errno 28] No space left on device",
                                  "step": 200, "checkpoint": "checkpoint-200", "unsent": 54,
                                  "store": "/out/tensorboard", "since": "..."},
                  "mlflow": {"error": null, "step": null, "checkpoint": null, "unsent": 0,
                             "store": "/out/mlruns", "since": "..."}}}

``state`` of the watch: ``watching``, ``stopped`` (Ctrl-C, or killed while
``watching`` and not restarted), ``finished`` (``--once`` done). ``state`` of a
checkpoint: ``waiting`` (files not ready; ``reason`` says what it waits for),
``tracing``, ``done`` (its trace is complete; ``deleted`` once training's rotation
removed the folder: its metrics stay), ``failed`` (``reason``; retried with ``--retry``).
``trackers`` (with ``--log-to``): per tracker, ``error`` is null
while it stores every value; else its client's error, and ``unsent`` of its values,
from ``step`` (of ``checkpoint``) on, are not stored yet: the next update that works
sends them, once (``since``: when it started failing, or stopped).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .errors import InputError

VERSION = 1
FILE = "status.json"
WAITING, TRACING, DONE, FAILED = "waiting", "tracing", "done", "failed"
WATCHING, STOPPED, FINISHED = "watching", "stopped", "finished"


def now() -> str:
    """The current time as ISO 8601 UTC (what every time field holds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class CheckpointStatus:
    """One checkpoint folder the watch has seen (see the module for ``state``)."""

    step: int | None
    path: str
    state: str = WAITING
    reason: str | None = None
    since: str = field(default_factory=now)
    deleted: bool = False

    def set(self, state: str, reason: str | None = None) -> None:
        if (state, reason) != (self.state, self.reason):
            self.state, self.reason, self.since = state, reason, now()


@dataclass
class WatchStatus:
    """The whole of ``status.json``; checkpoints by folder name (also their trace's name)."""

    run_dir: str
    state: str = WATCHING
    updated: str = field(default_factory=now)
    pid: int = field(default_factory=os.getpid)
    report: dict = field(default_factory=dict)
    checkpoints: dict[str, CheckpointStatus] = field(default_factory=dict)
    trackers: dict[str, dict] = field(default_factory=dict)

    def in_state(self, state: str) -> list[str]:
        """Names of the checkpoints in ``state``, in step order."""
        return sorted((n for n, c in self.checkpoints.items() if c.state == state),
                      key=lambda n: (self.checkpoints[n].step or 0, n))

    def write(self, out_dir: str | Path) -> Path:
        """Replace ``out_dir/status.json`` atomically (a poller never reads half a file)."""
        self.updated = now()
        path = Path(out_dir) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"version": VERSION, **asdict(self)}
        tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, out_dir: str | Path) -> WatchStatus | None:
        """``out_dir/status.json``; None when there is none.

        Raises:
            InputError: it does not parse or is of another format version.
        """
        path = Path(out_dir) / FILE
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
            if record.pop("version") != VERSION:
                raise ValueError(f"version is not {VERSION}")
            checkpoints = {name: CheckpointStatus(**entry)
                           for name, entry in record.pop("checkpoints").items()}
            return cls(**record, checkpoints=checkpoints)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"'{path}' is not a moepath watch status ({exc}); delete it (the "
                             f"traces beside it are kept and found again)") from None

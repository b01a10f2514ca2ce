"""Server mode: the worker owns the trace's manifest (no driver process does).

With ``additional_config={"moepath": {"dir": ..., "commit": true}}`` (what
``vllm serve ... --additional-config`` sets), a background thread in the writing
worker flushes finished requests every ``flush_interval_s`` seconds and commits
the new shards in ``manifest.json``, so completed requests become readable while
the server runs; worker shutdown commits the rest and marks the trace complete.
Restarting a server on the same directory appends to the trace.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..tracer import checkpoints, provenance, store
from ..tracer.errors import InputError
from . import compat
from .settings import CaptureSettings


def engine_manifest(model: str | Path, dtype: str, routing: dict, source: dict,
                    options: dict) -> dict:
    """A new manifest for a trace of ``model`` served by this process's vLLM.

    ``routing``: the worker's ``moepath_describe`` reply; ``source``: the input
    (``path``, ``sha256``, ``format``); ``options``: what the run was asked to do.
    """
    import torch
    import vllm

    shape = checkpoints.moe_shape(model)
    return store.new_manifest(
        versions={"moepath": __version__, "vllm": vllm.__version__,
                  "torch": torch.__version__},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model={"path": str(Path(model).resolve()), "architecture": shape.architecture,
               "config_sha256": checkpoints.config_sha256(model), "dtype": dtype, **routing},
        input=source, options=options)


class ManifestCommitter:
    """The worker-side owner of a trace's manifest (server mode, see the module).

    Starting it prepares ``settings.dir``: a new trace, or the existing one appended
    to when its model is the same (InputError otherwise), then commits every
    ``settings.flush_interval_s`` from a background thread; :meth:`close` commits the
    rest and marks the trace complete (failed after a capture error).
    """

    def __init__(self, settings: CaptureSettings, recorder, routing: dict, model: str,
                 dtype: str):
        self.trace_dir = Path(settings.dir)
        self.recorder = recorder
        self.interval = settings.flush_interval_s
        previous = store.prepare_directory(
            self.trace_dir, resume=(self.trace_dir / store.MANIFEST).is_file(), force=False,
            fix="it holds no trace to append to (no manifest.json); trace into a new or "
                "empty directory")
        if previous is not None and (why := provenance.model_difference(
                self.trace_dir, previous, model)):
            raise InputError(f"moepath: cannot append to the trace in '{self.trace_dir}': "
                             f"{why}; serve this model into another trace directory")
        self.manifest = previous or engine_manifest(
            model, dtype, routing, {"path": "", "sha256": "", "format": store.SERVER_INPUT_FORMAT},
            settings.as_dict())
        weights = checkpoints.router_weights(model, routing["num_experts"])
        self.manifest["router_weights"] = asdict(store.write_router_weights(
            self.trace_dir, [weights[i] for i in routing["layer_ids"]]))
        store.set_status(self.manifest, "running")  # a restart clears an earlier failure
        store.write_manifest(self.trace_dir, self.manifest)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="moepath-commit", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.commit()

    def commit(self, final: bool = False) -> None:
        """Flush finished requests, record their shards, rewrite the manifest.

        A periodic commit that finds nothing new writes nothing: an idle server
        does not rewrite (and fsync) every second a manifest that grows with its
        shard list.
        """
        report = self.recorder.flush(requests_done=final)
        new_error = report["error"] not in (None, self.manifest.get("capture_error"))
        if not (final or report["shards"] or new_error):
            return
        store.add_shards(self.manifest, store.ROUTING_DIR,
                         [store.ShardInfo(**shard) for shard in report["shards"]])
        routing = self.manifest["shards"][store.ROUTING_DIR]
        self.manifest["counts"] = {"routing_records": sum(s["rows"] for s in routing),
                                   "tokens": sum(s["tokens"] for s in routing)}
        if report["error"]:
            store.set_status(self.manifest, "failed", report["error"])
        elif final:
            store.set_status(self.manifest, "complete")
        store.write_manifest(self.trace_dir, self.manifest)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.commit(final=True)  # also finishes requests cut by shutdown
        compat.logger.info("%s trace committed to %s", compat.LOG_PREFIX, self.trace_dir)

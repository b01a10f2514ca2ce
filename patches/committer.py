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
from dataclasses import replace
from pathlib import Path

from .. import __version__
from ..tracer import checkpoints, provenance, store
from ..tracer.errors import InputError
from ..tracer.manifest import InputInfo, Manifest, ModelInfo
from ..tracer.writer import TraceWriter
from . import compat
from .settings import CaptureSettings


def engine_manifest(model: str | Path, dtype: str, routing: ModelInfo, source: InputInfo,
                    options: dict, store_kind: str) -> Manifest:
    """A new manifest for a trace of ``model`` served by this process's vLLM.

    ``routing``: the worker's ``moepath_describe`` reply; ``source``: the input
    (``path``, ``sha256``, ``format``); ``options``: what the run was asked to do;
    ``store_kind``: what its routing shards keep (``CaptureSettings.store``).
    """
    import torch
    import vllm

    shape = checkpoints.moe_shape(model)
    return Manifest(
        versions={"moepath": __version__, "vllm": vllm.__version__, "torch": torch.__version__},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=replace(routing, path=str(Path(model).resolve()), architecture=shape.architecture,
                      config_sha256=checkpoints.config_sha256(model), dtype=dtype),
        input=source, options=options, store=store_kind)


class ManifestCommitter:
    """The worker-side owner of a trace's manifest (server mode, see the module).

    Starting it prepares ``settings.dir``: a new trace, or the existing one appended
    to when its model is the same (InputError otherwise), then commits every
    ``settings.flush_interval_s`` from a background thread; ``router_weights``: the
    served model's router matrices (``router_linear.py``); :meth:`close` commits the
    rest and marks the trace complete (failed after a capture error).
    """

    def __init__(self, settings: CaptureSettings, recorder, routing: ModelInfo,
                 router_weights: store.RouterWeights, model: str, dtype: str):
        self.recorder = recorder
        self.interval = settings.flush_interval_s
        self.writer = TraceWriter.append(
            settings.dir, fix="it holds no trace to append to (no manifest.json); trace into "
                              "a new or empty directory")
        self.trace_dir = self.writer.trace_dir
        if self.writer.resumed is not None and (why := provenance.model_difference(
                self.trace_dir, self.writer.resumed, model)):
            raise InputError(f"moepath: cannot append to the trace in '{self.trace_dir}': "
                             f"{why}; serve this model into another trace directory")
        if self.writer.resumed is not None and self.writer.resumed.store_kind != settings.store:
            raise InputError(
                f"moepath: cannot append to the trace in '{self.trace_dir}': it keeps "
                f"{self.writer.resumed.store_kind} routing, this engine {settings.store}; serve "
                f"with 'store': '{self.writer.resumed.store_kind}' or into another directory")
        self.writer.begin(
            lambda: engine_manifest(model, dtype, routing, InputInfo(
                format=store.SERVER_INPUT_FORMAT), settings.as_dict(), settings.store),
            router_weights=router_weights)
        self._error: str | None = None
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
        error = report["error"]
        shards = [store.ShardInfo(**shard) for shard in report["shards"]]
        if shards or final:
            self.writer.commit(routing=shards, count=True)
        if error and error != self._error:
            self.writer.fail(error)
        elif final and not error:
            self.writer.finish()
        self._error = error
    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.commit(final=True)  # also finishes requests cut by shutdown
        compat.logger.info("%s trace committed to %s", compat.LOG_PREFIX, self.trace_dir)

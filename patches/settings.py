"""Capture settings: the one channel through which tracing reaches vLLM workers.

Tracing is enabled per engine by vLLM's ``additional_config``::

    LLM(model, additional_config={"moepath": {"dir": "out/trace"}})
    vllm serve MODEL --additional-config '{"moepath": {"dir": "out/trace"}}'

``additional_config`` is part of vLLM's config hash, so a compiled graph cached
for an untraced engine (no hook inside) can never be loaded by a traced one,
and vice versa. Read once per worker, in :func:`from_vllm_config`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from pathlib import Path

from ..tracer import store as trace_store

CONFIG_KEY = "moepath"
REQUEST_ID_KEY = "moepath_id"  # SamplingParams.extra_args key: the caller's sample id
REQUEST_META_KEY = "moepath_meta"  # optional: dict (offline) or JSON string (server)


@dataclass(frozen=True)
class CaptureSettings:
    """Options of a traced engine (keys of ``additional_config["moepath"]``).

    Attributes:
        dir: trace directory the worker writes routing shards into.
        trace_all: record every request (sample id = the request id), not only
            requests whose ``extra_args`` carry ``moepath_id``.
        store_probs: also store per-token full router distributions (float16
            [T, L, E] per request; large, for small runs only).
        store: ``per-token`` (every token's routing) or ``per-sample`` (per request
            only its router mean, top-k mean and top-k histogram per layer, computed
            here from the per-token rows, which are then dropped).
        shard_tokens: buffered tokens that trigger writing a routing shard. A
            flush waits for the last, partial shard (the engine idles meanwhile),
            so smaller shards shorten that wait; each shard costs one file and an
            fsync. Bounds worker memory: records of at most 1 +
            ``sink.MAX_WRITES_IN_FLIGHT`` shards are held, each ~ shard_tokens * L
            * k * 3 bytes (uint8 ids, float16 weights; more with ``store_probs``).
        run: name prefix of this engine's shard files (unique per engine start).
        commit: the worker also commits the manifest itself (server mode: no
            driver process owns the trace); commits every ``flush_interval_s``.
        flush_interval_s: server mode: seconds between shard writes + commits.
        refusal_file: a file the worker writes its reason into when it refuses the model
            at load (``inspection.UnsupportedModelError``), for an offline driver to raise
            as one line (:func:`read_refusal`); empty: the reason is only logged.
    """

    dir: str
    trace_all: bool = False
    store_probs: bool = False
    store: str = trace_store.PER_TOKEN
    shard_tokens: int = 65_536
    run: str = ""
    commit: bool = False
    flush_interval_s: float = 5.0
    refusal_file: str = ""

    def with_run(self) -> CaptureSettings:
        """A copy with a fresh random ``run`` prefix when none was given."""
        if self.run:
            return self
        return CaptureSettings(**{**self.as_dict(), "run": secrets.token_hex(4)})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def parse(cls, options: dict) -> CaptureSettings:
        """Validate ``additional_config["moepath"]``; raise ValueError naming a bad key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"moepath: unknown option(s) {unknown} in additional_config['moepath']; "
                f"known: {sorted(known)}"
            )
        if not options.get("dir"):
            raise ValueError("moepath: additional_config['moepath'] needs 'dir' (trace directory)")
        kind = options.get("store", trace_store.PER_TOKEN)
        if kind not in trace_store.STORES:
            raise ValueError(f"moepath: additional_config['moepath']['store'] is {kind!r}; "
                             f"pass one of {', '.join(trace_store.STORES)}")
        if kind == trace_store.PER_SAMPLE and options.get("store_probs"):
            raise ValueError("moepath: 'store_probs' keeps per-token distributions, which "
                             "'store': 'per-sample' drops; pass one of them")
        return cls(**options).with_run()


def from_vllm_config(vllm_config) -> CaptureSettings | None:
    """The engine's capture settings, or None when tracing is off for it."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    options = additional.get(CONFIG_KEY) if isinstance(additional, dict) else None
    return CaptureSettings.parse(options) if options else None


def write_refusal(settings: CaptureSettings, reason: str) -> None:
    """In a worker that refuses its model: leave ``reason`` for the driver, if it asked."""
    if settings.refusal_file:
        Path(settings.refusal_file).write_text(reason)


def read_refusal(settings: CaptureSettings) -> str | None:
    """In the driver, after the engine failed to start: why a worker refused the model, if
    one did (the message without its log prefix)."""
    path = Path(settings.refusal_file) if settings.refusal_file else None
    if path is None or not path.is_file():
        return None
    return path.read_text().removeprefix("moepath: ")

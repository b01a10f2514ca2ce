"""`Manifest`: what a trace is, and its commit point, as typed data.

``manifest.json`` (docs/trace-format.md, "The manifest") is read into a
:class:`Manifest` by :meth:`Manifest.read` and written back only by the trace
writer (:mod:`.writer`). Its JSON keys appear in this module and in
:mod:`.store` only (a test holds the boundary): everything else reads typed
fields. :meth:`Manifest.to_dict` gives back exactly the JSON that was read:
optional sections absent on disk stay absent, and sections a newer minor
writer added are kept in ``extra``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import store
from .errors import TraceFormatError

RUNNING, COMPLETE, FAILED = "running", "complete", "failed"  # Manifest.status


@dataclass
class ModelInfo:
    """The ``model`` section: which checkpoint was traced, and its routing shape.

    ``num_layers``/``num_experts``/``top_k``: L, E, k of the records. The rest is
    optional (None: not recorded, as in older traces): ``path`` (resolved checkpoint
    folder), ``architecture``, ``config_sha256`` (of config.json), ``dtype`` (compute
    dtype), ``layer_ids`` (decoder layer of each trace layer), ``routing`` (router
    class, scoring function, renormalisation, scaling), ``writer`` (this worker
    wrote routing) with ``reload_blocker`` (why the engine could not reload
    checkpoints in place; None when it could, recorded whenever ``writer`` is).
    """

    num_layers: int
    num_experts: int
    top_k: int
    path: str | None = None
    architecture: str | None = None
    config_sha256: str | None = None
    dtype: str | None = None
    layer_ids: list[int] | None = None
    routing: dict | None = None
    writer: bool | None = None
    reload_blocker: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, section: dict) -> ModelInfo:
        known, extra = _split(cls, section)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        section = _present(self, keep=("reload_blocker",) if self.writer is not None else ())
        return {**section, **self.extra}


@dataclass
class InputInfo:
    """The ``input`` section: the samples file a trace covers and how it was read.

    ``path``/``sha256``/``format`` of the file (``format`` ``server``: requests a
    serving engine's worker committed, no file); ``read``: the read options
    (id and text fields, bad-line policy, limit); ``part``: (I, N) of ``--part I/N``.
    """

    path: str = ""
    sha256: str = ""
    format: str = ""
    read: dict | None = None
    part: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, section: dict) -> InputInfo:
        known, extra = _split(cls, section)
        if known.get("part") is not None:
            known["part"] = tuple(known["part"])
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        section = _present(self)
        if self.part is not None:
            section["part"] = list(self.part)
        return {**section, **self.extra}


@dataclass
class Counts:
    """The ``counts`` section (None: not counted). ``samples``: rows of the samples table;
    ``routing_records``: routing rows (one per completion); ``tokens``: recorded tokens,
    prompt and generated; ``truncated``: samples cut to the context; ``skipped_lines``:
    malformed input lines skipped (of the whole samples file)."""

    samples: int | None = None
    routing_records: int | None = None
    tokens: int | None = None
    truncated: int | None = None
    skipped_lines: int | None = None

    def to_dict(self) -> dict:
        return _present(self)


@dataclass
class Manifest:
    """A trace's manifest (see the module). ``routing_shards``/``sample_shards``: the
    committed files, in commit order; only they belong to the trace. ``store``: what its
    routing shards keep, ``per-token`` or ``per-sample`` (``--store``; None: written
    before the choice existed, per-token); read it through :attr:`store_kind`."""

    model: ModelInfo
    input: InputInfo | None = None
    options: dict | None = None
    versions: dict | None = None
    created: str | None = None
    status: str = RUNNING
    capture_error: str | None = None
    routing_shards: list[store.ShardInfo] = field(default_factory=list)
    sample_shards: list[store.ShardInfo] = field(default_factory=list)
    router_weights: store.ShardInfo | None = None
    router_weights_unavailable: str | None = None
    counts: Counts = field(default_factory=Counts)
    merged_from: list[str] | None = None
    format_version: int = store.FORMAT_VERSION
    store: str | None = None  # after every use of the module ``store`` in this class body
    extra: dict = field(default_factory=dict)

    @classmethod
    def read(cls, trace_dir: str | Path) -> Manifest:
        """The manifest of the trace in ``trace_dir``; TraceFormatError when there is none,
        it is damaged or of a newer format."""
        return cls.from_dict(store.read_manifest(Path(trace_dir)))

    @classmethod
    def from_dict(cls, manifest: dict) -> Manifest:
        known, extra = _split(cls, manifest, skip=("format", "shards"))
        if known.get("store") not in (None, *store.STORES):
            raise TraceFormatError(
                f"the trace keeps its routing as {known['store']!r}, a store this moepath does "
                f"not know ({', '.join(store.STORES)}); upgrade moepath to read it")
        shards = manifest.get("shards", {})
        weights = known.get("router_weights")
        return cls(**{
            **known, "model": ModelInfo.from_dict(known["model"]),
            "input": InputInfo.from_dict(known["input"]) if "input" in known else None,
            "counts": Counts(**known.get("counts", {})),
            "router_weights": store.ShardInfo(**weights) if weights else None,
            "routing_shards": [store.ShardInfo(**e) for e in shards.get(store.ROUTING_DIR, [])],
            "sample_shards": [store.ShardInfo(**e) for e in shards.get(store.SAMPLES_DIR, [])],
        }, extra=extra)

    def to_dict(self) -> dict:
        """The JSON object of manifest.json."""
        manifest = {
            "format": store.FORMAT_NAME,
            "format_version": self.format_version,
            "status": self.status,
            "capture_error": self.capture_error,
            "shards": {store.ROUTING_DIR: [asdict(s) for s in self.routing_shards],
                       store.SAMPLES_DIR: [asdict(s) for s in self.sample_shards]},
            "router_weights": asdict(self.router_weights) if self.router_weights else None,
            "counts": self.counts.to_dict(),
            "model": self.model.to_dict(),
        }
        optional = {"input": self.input.to_dict() if self.input else None,
                    "options": self.options, "versions": self.versions,
                    "created": self.created, "merged_from": self.merged_from,
                    "store": self.store,
                    "router_weights_unavailable": self.router_weights_unavailable}
        manifest.update({key: value for key, value in optional.items() if value is not None})
        return {**manifest, **self.extra}

    @property
    def committed_files(self) -> list[store.ShardInfo]:
        """Every file the manifest vouches for: shards, then the router weights."""
        weights = [self.router_weights] if self.router_weights else []
        return [*self.routing_shards, *self.sample_shards, *weights]

    @property
    def store_kind(self) -> str:
        """``per-token`` (every token's routing) or ``per-sample`` (summaries only)."""
        return self.store or store.PER_TOKEN

    @property
    def server_committed(self) -> bool:
        """Written by a serving engine's worker (``vllm serve``, ``moepath eval``, a
        committing ``TracedEngine``), not by a driver that can resume it."""
        return self.input is not None and self.input.format == store.SERVER_INPUT_FORMAT

    def shard_counts(self) -> Counts:
        """``samples`` (when the trace has a samples table), ``routing_records`` and
        ``tokens`` summed over the committed shards."""
        return Counts(
            samples=sum(s.rows for s in self.sample_shards) if self.sample_shards else None,
            routing_records=sum(s.rows for s in self.routing_shards),
            tokens=sum(s.tokens for s in self.routing_shards))


def _split(cls, section: dict, skip: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """``section``'s keys that are fields of ``cls`` (but ``extra``), and the rest."""
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: v for k, v in section.items() if k in names}
    extra = {k: v for k, v in section.items() if k not in names and k not in skip}
    return known, extra


def _present(section, keep: tuple[str, ...] = ()) -> dict:
    """The fields of ``section`` that are not None (or named in ``keep``), ``extra`` aside."""
    return {f.name: getattr(section, f.name) for f in fields(section)
            if f.name != "extra" and (getattr(section, f.name) is not None or f.name in keep)}

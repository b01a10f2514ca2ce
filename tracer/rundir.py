"""A training run's checkpoint directory while training writes into it: which subfolders
are checkpoints, at which step, and when one is complete enough to read.

``moepath watch`` must never read a checkpoint that is still being written: a
half-written shard loads as garbage or crashes the engine. A checkpoint is *ready*
when (1) its ``config.json`` parses, (2) its weights are there: every shard that
``model.safetensors.index.json`` lists (the index itself parses), or at least one
``*.safetensors`` file without an index, and (3) either the marker file the user
names exists, or no file in the folder changed size or modification time for
``settle_s`` seconds (two looks at the folder at least ``settle_s`` apart).
:func:`verify` then reads every safetensors header before the engine sees the files.

Layouts recognised by default (the whole folder name must match; ``tmp-checkpoint-N``
and ``checkpoint-N.partial`` do not): transformers ``checkpoint-N``, ``step_N`` /
``stepN`` / ``step-N``, ``iter_N`` / ``iter_000N``, ``global_stepN``. ``--pattern``
adds a regular expression of one's own, its first group the step; without a group
(or a number in the name) the step is ``global_step`` of the folder's
``trainer_state.json``.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, ModelError

LAYOUTS = {
    "transformers": r"checkpoint-(\d+)",
    "step": r"step[-_]?(\d+)",
    "iter": r"iter[-_]?(\d+)",
    "global_step": r"global[-_]?step[-_]?(\d+)",
}
INDEX = "model.safetensors.index.json"
TRAINER_STATE = "trainer_state.json"  # transformers' Trainer: {"global_step": N, ...}


@dataclass(frozen=True)
class Candidate:
    """A subfolder of the run whose name matches a layout; ``step`` None: neither the
    name nor its metadata gives one (yet: trainer_state.json may come last)."""

    name: str
    path: Path
    step: int | None


def layout_patterns(pattern: str | None = None) -> list[re.Pattern]:
    """The default layouts, after ``pattern`` (the user's, matched first) when given.

    Raises:
        InputError: ``pattern`` is not a regular expression, or has more than one group.
    """
    try:
        own = [re.compile(pattern)] if pattern else []
    except re.error as exc:
        raise InputError(f"--pattern {pattern!r} is not a regular expression ({exc}); pass "
                         f"one such as 'ckpt_(\\d+)' whose group is the step") from None
    if own and own[0].groups > 1:
        raise InputError(f"--pattern {pattern!r} has {own[0].groups} groups; use one, around "
                         f"the step number (or none: the step then comes from "
                         f"{TRAINER_STATE})")
    return own + [re.compile(layout, re.IGNORECASE) for layout in LAYOUTS.values()]


def scan(run_dir: str | Path, patterns: list[re.Pattern]) -> list[Candidate]:
    """The checkpoint folders now in ``run_dir``, in step order (no step: last, by name).

    Raises:
        InputError: ``run_dir`` does not exist or is not a folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run directory '{run_dir}' does not exist or is not a folder; pass "
                         f"the folder the training job writes its checkpoints into")
    found = [Candidate(child.name, child, step_of(child, patterns))
             for child in run_dir.iterdir()
             if child.is_dir() and _match(child.name, patterns) is not None]
    return sorted(found, key=lambda c: (c.step is None, c.step or 0, c.name))


def _match(name: str, patterns: list[re.Pattern]) -> re.Match | None:
    return next((m for p in patterns if (m := p.fullmatch(name))), None)


def step_of(folder: Path, patterns: list[re.Pattern]) -> int | None:
    """The step of checkpoint ``folder``: the number its name gives (the first pattern it
    matches, group 1), else its trainer_state.json's (the folder may be gone: None)."""
    match = _match(folder.name, patterns)
    if match is not None and match.re.groups:
        return int(match.group(1))
    return metadata_step(folder)


def metadata_step(folder: Path) -> int | None:
    """``global_step`` of the folder's trainer_state.json; None when absent or unreadable."""
    try:
        step = json.loads((folder / TRAINER_STATE).read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def missing_files(folder: Path, marker: str | None = None) -> str | None:
    """What the checkpoint in ``folder`` still lacks before it can be read, in words;
    None when config.json, the weights its index lists and ``marker`` are all there."""
    if not _parses(folder / "config.json"):
        return "no complete config.json yet"
    index = folder / INDEX
    if index.exists():
        if not _parses(index):
            return f"no complete {INDEX} yet"
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        absent = [s for s in shards if not (folder / s).is_file()]
        if not shards or absent:
            return f"{len(absent)} of {len(shards)} shard(s) the index lists not there yet"
    elif not any(folder.glob("*.safetensors")):
        return "no *.safetensors weights yet"
    if marker and not (folder / marker).exists():
        return f"no marker file '{marker}' yet"
    return None


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def fingerprint(folder: Path) -> tuple:
    """(relative path, size, mtime ns) of every file under ``folder``: equal twice means
    nothing was written in between."""
    return tuple(sorted((str(p.relative_to(folder)), s.st_size, s.st_mtime_ns)
                        for p in folder.rglob("*") if p.is_file() and (s := p.stat())))


class ReadinessClock:
    """Tells when a checkpoint folder is ready to read (see the module): its files
    complete, then either the marker present or its :func:`fingerprint` unchanged for
    ``settle_s`` seconds. Remembers each folder's fingerprint between calls."""

    def __init__(self, settle_s: float, marker: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.settle_s, self.marker, self._clock = settle_s, marker, clock
        self._seen: dict[Path, tuple[tuple, float]] = {}  # folder -> (fingerprint, since)

    def waiting_reason(self, folder: Path) -> str | None:
        """Why ``folder`` is not ready yet, or None when it is."""
        missing = missing_files(folder, self.marker)
        if missing is not None:
            self._seen.pop(folder, None)
            return missing
        if self.marker:
            return None
        now, current = self._clock(), fingerprint(folder)
        before, since = self._seen.get(folder, (None, now))
        if before != current:
            self._seen[folder] = (current, now)
            return f"files still changing (waiting {self.settle_s:g} s for them to settle)"
        if now - since < self.settle_s:
            return f"files settling ({now - since:.0f} of {self.settle_s:g} s)"
        return None

    def next_due(self) -> float | None:
        """Seconds until the earliest folder now settling may be ready (None: none is)."""
        if self.marker or not self._seen:
            return None
        now = self._clock()
        return max(0.0, min(since + self.settle_s - now for _, since in self._seen.values()))


class StillWriting(ModelError):
    """A safetensors file is shorter than its own header says: still being written."""


def verify(folder: Path) -> None:
    """Read the header of every safetensors file of the checkpoint (the index's shards, or
    every ``*.safetensors``): it must parse, and the file must hold every byte it lists;
    with an index, every tensor it maps must be in its shard. Reads no tensor data.

    Raises:
        StillWriting: a file is shorter than its header says (wait and look again).
        ModelError: a header does not parse, or the index names a tensor its shard lacks.
    """
    index = folder / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = {}, sorted(p.name for p in folder.glob("*.safetensors"))
    for name in files:
        tensors = _header_tensors(folder / name)
        lacking = [t for t, shard in weight_map.items() if shard == name and t not in tensors]
        if lacking:
            raise ModelError(f"'{folder / name}' lacks tensor '{lacking[0]}' that {INDEX} "
                             f"maps to it; re-save the checkpoint")


def _header_tensors(path: Path) -> set[str]:
    """Tensor names of a safetensors file, after checking its header and length: an
    8-byte little-endian header length, a JSON header, then the data its offsets cover."""
    size = path.stat().st_size
    fix = "re-save the checkpoint (or fix it) and run moepath watch with --retry"
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise StillWriting(f"'{path}' holds {len(head)} bytes, not yet a header")
        length = struct.unpack("<Q", head)[0]
        if length > 100_000_000:
            raise ModelError(f"'{path}' is not a safetensors file (bad header length); {fix}")
        if length > size - 8:
            raise StillWriting(f"'{path}' holds {size} bytes, less than its header's {length}")
        try:
            header = json.loads(handle.read(length))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
            raise ModelError(f"'{path}' has a safetensors header that does not parse; "
                             f"{fix}") from None
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        raise StillWriting(f"'{path}' holds {size} of the {needed} bytes its header lists")
    return {k for k in header if k != "__metadata__"}

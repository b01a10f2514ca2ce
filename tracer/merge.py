"""Join the traces of parts of one samples file into one trace (data parallel).

``moepath trace --part I/N`` traces every N-th sample from I; N such runs (N
engines, on one machine or many) cover the file once. :func:`merge_traces`
checks that the parts belong together (same samples file read the same way,
same model config and routing, the same options where they change the records
(:mod:`.provenance`), every part 0..N-1 exactly once, all complete) and
writes a normal trace directory: the parts' shard files copied under unique
names, checksums kept, counts summed. The parts are left untouched: an output
directory that is a part, holds one or lies inside one is refused before anything
is read or deleted.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from pathlib import Path

from . import provenance, store
from .errors import InputError, TraceFormatError
from .manifest import COMPLETE, Counts, Manifest
from .writer import TraceWriter

# Every field of how the samples file was read: parts must cover one list of samples.
_READ_OPTIONS = ("id_field", "text_field", "skip_bad_lines", "limit")


def merge_traces(parts: list[Path], out: Path, force: bool = False) -> Manifest:
    """Merge the complete part traces ``parts`` into the trace directory ``out``.

    Returns the merged manifest. Raises InputError when the parts do not form
    one whole or ``out`` overlaps a part, TraceFormatError when a part is
    damaged or incomplete.
    """
    _check_out(parts, Path(out))
    manifests = [_read_part(Path(part)) for part in parts]
    _check_parts(parts, manifests)
    writer = TraceWriter.open(out, force=force,
                              fix="pass --force to overwrite it, or another --out")
    first = manifests[0]
    writer.begin(Manifest(
        model=first.model, options=first.options, versions=first.versions,
        created=first.created, input=replace(first.input, part=None),
        merged_from=[str(Path(part).resolve()) for part in parts],
        router_weights_unavailable=first.router_weights_unavailable, store=first.store))
    if first.router_weights:
        writer.copy_router_weights(Path(parts[0]), first.router_weights)
    for number, (part, manifest) in enumerate(zip(parts, manifests, strict=True)):
        writer.copy_in(Path(part), manifest.routing_shards, manifest.sample_shards,
                       prefix=f"p{number}-")
    return writer.finish(**asdict(_merged_counts(manifests)))


def _merged_counts(manifests: list[Manifest]) -> Counts:
    """Each count summed over the parts (None where a part lacks it), but ``skipped_lines``:
    lines of the whole samples file, the same in every part."""
    summed = {}
    for name in (f.name for f in fields(Counts)):
        values = [getattr(m.counts, name) for m in manifests]
        summed[name] = None if None in values else sum(values)
    return replace(Counts(**summed), skipped_lines=manifests[0].counts.skipped_lines)


def _check_out(parts: list[Path], out: Path) -> None:
    """Refuse an ``out`` that is, holds or lies inside a part: --force would delete it."""
    target = out.resolve()
    for part in parts:
        source = Path(part).resolve()
        relation = ("is part" if target == source else "is inside part"
                    if target.is_relative_to(source) else "contains part"
                    if source.is_relative_to(target) else None)
        if relation:
            raise InputError(f"--out '{out}' {relation} '{part}'; choose an --out directory "
                             f"outside every part (the parts are left untouched)")


def _read_part(part: Path) -> Manifest:
    manifest = Manifest.read(part)
    if manifest.status != COMPLETE:
        raise TraceFormatError(
            f"trace '{part}' is not complete (status '{manifest.status}'); finish it with "
            f"`moepath trace ... --resume` before merging")
    store.verify_checksums(part, manifest.committed_files)
    return manifest


def _check_parts(parts: list[Path], manifests: list[Manifest]) -> None:
    if len(parts) < 2:
        raise InputError("merge needs at least two part traces")
    found = [m.input.part or () for m in manifests]
    count = len(manifests)
    if sorted(found) != [(index, count) for index in range(count)]:
        raise InputError(
            f"the traces are parts {sorted('/'.join(map(str, p)) or 'whole' for p in found)}; "
            f"merge needs each part 0/{count} .. {count - 1}/{count} exactly once")
    first, name = manifests[0], parts[0]
    for part, manifest in zip(parts[1:], manifests[1:], strict=True):
        difference = (provenance.input_difference(first.input, manifest.input,
                                                  _READ_OPTIONS, compare_part=False)
                      or provenance.options_difference(first.options, manifest.options)
                      or next((f"it differs in its {what}" for what, section in _same(manifest)
                               if section != dict(_same(first))[what]), None))
        if difference:
            raise InputError(f"'{part}' does not belong with '{name}': {difference}; parts "
                             f"must come from the same command with a different --part")


def _same(manifest: Manifest) -> list[tuple[str, object]]:
    """What must be identical across parts: the model (but its checkpoint path) and the
    router weights file."""
    return [("model", replace(manifest.model, path=None)),
            ("router_weights", manifest.router_weights), ("store", manifest.store_kind)]

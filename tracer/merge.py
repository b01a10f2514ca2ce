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

import shutil
from pathlib import Path

from . import provenance, store
from .errors import InputError, TraceFormatError

# Manifest sections that must be identical across parts (their paths apart).
_SAME = ("model", "router_weights")
# Every field of how the samples file was read: parts must cover one list of samples.
_READ_OPTIONS = ("id_field", "text_field", "skip_bad_lines", "limit")


def merge_traces(parts: list[Path], out: Path, force: bool = False) -> dict:
    """Merge the complete part traces ``parts`` into the trace directory ``out``.

    Returns the merged manifest. Raises InputError when the parts do not form
    one whole or ``out`` overlaps a part, TraceFormatError when a part is
    damaged or incomplete.
    """
    _check_out(parts, Path(out))
    manifests = [_read_part(Path(part)) for part in parts]
    _check_parts(parts, manifests)
    store.prepare_directory(out, resume=False, force=force,
                            fix="pass --force to overwrite it, or another --out")
    first = manifests[0]
    merged = store.new_manifest(**{key: first[key] for key in (
        "created", "versions", "model", "options", "router_weights")})
    merged["input"] = {k: v for k, v in first["input"].items() if k != "part"}
    merged["merged_from"] = [str(Path(part).resolve()) for part in parts]
    _copy(Path(parts[0]), out, store.ROUTER_WEIGHTS)
    for number, (part, manifest) in enumerate(zip(parts, manifests, strict=True)):
        for kind in (store.ROUTING_DIR, store.SAMPLES_DIR):
            for entry in manifest["shards"][kind]:
                name = f"{kind}/p{number}-{Path(entry['file']).name}"
                _copy(Path(part), out, entry["file"], name)
                merged["shards"][kind].append({**entry, "file": name})
    merged["counts"] = {key: sum(m["counts"][key] for m in manifests)
                        for key in first["counts"]}
    merged["counts"]["skipped_lines"] = first["counts"]["skipped_lines"]  # of the whole file
    store.set_status(merged, "complete")
    store.verify_checksums(out, merged)
    store.write_manifest(out, merged)
    return merged


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


def _read_part(part: Path) -> dict:
    manifest = store.read_manifest(part)
    if manifest["status"] != "complete":
        raise TraceFormatError(
            f"trace '{part}' is not complete (status '{manifest['status']}'); finish it with "
            f"`moepath trace ... --resume` before merging")
    store.verify_checksums(part, manifest)
    return manifest


def _check_parts(parts: list[Path], manifests: list[dict]) -> None:
    if len(parts) < 2:
        raise InputError("merge needs at least two part traces")
    found = [tuple(m["input"].get("part") or ()) for m in manifests]
    count = len(manifests)
    if sorted(found) != [(index, count) for index in range(count)]:
        raise InputError(
            f"the traces are parts {sorted('/'.join(map(str, p)) or 'whole' for p in found)}; "
            f"merge needs each part 0/{count} .. {count - 1}/{count} exactly once")
    first, name = manifests[0], parts[0]
    for part, manifest in zip(parts[1:], manifests[1:], strict=True):
        difference = (provenance.input_difference(first["input"], manifest["input"],
                                                  _READ_OPTIONS, compare_part=False)
                      or provenance.options_difference(first["options"], manifest["options"])
                      or next((f"it differs in its {key}" for key in _SAME
                               if _comparable(manifest[key]) != _comparable(first[key])), None))
        if difference:
            raise InputError(f"'{part}' does not belong with '{name}': {difference}; parts "
                             f"must come from the same command with a different --part")


def _comparable(section):
    """A manifest section without what legitimately differs between parts (paths)."""
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in ("path",)}
    return section


def _copy(part: Path, out: Path, relative: str, target: str | None = None) -> None:
    destination = out / (target or relative)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part / relative, destination)

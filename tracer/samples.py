"""Read the user's sample files for ``moepath trace`` and ``moepath compare``.

This is the only module that reads sample files. It turns a file into a
:class:`SampleSet` of validated :class:`Sample` records, or raises
:class:`~moepath.tracer.errors.InputError` with one line that names the file,
the line (or Parquet row) and the fix.

Formats, chosen by extension (case-insensitive):

- ``.jsonl`` / ``.json``: JSON Lines, one object per line, blank lines ignored;
  read line by line, never whole.
- ``.parquet``: one row per sample, read batch by batch.
- ``.csv``: a header row, then one record per row. CSV has no types: every
  cell is a string, an empty cell is null, an ``input_ids`` cell holds a JSON
  list such as ``[1, 2, 3]``. Quoting is strict: a quoted cell (it may span
  lines) must be closed, a quote inside it is doubled (``""``), and only a comma
  or the line end may follow the closing quote; anything else is an error
  naming the line the record starts on. Python's csv module caps a cell at
  131072 characters; use JSONL for longer prompts.
- ``.txt``: one sample per non-blank line; the line without its line ending
  is the text. There are no other fields.

A record gives its prompt either as a string with a non-whitespace character
in the text field (``--text-field``, default ``text``) or, for pre-tokenised
data, as a non-empty list of non-negative token ids in ``input_ids``; exactly
one of the two. The id field (``--id-field``, default ``id``) is optional in
each record; a field named with ``--id-field`` other than ``id`` must be a
CSV/Parquet column, or in JSONL be in at least one record read, else a
mistyped name would silently generate ids and carry the real id column as
meta. Every other field goes into ``Sample.meta`` and from there into the
trace's samples table.

Sample ids:

- An id in the file is a string or an integer (an integer becomes its decimal
  string). It must be non-empty, at most ``MAX_ID_LENGTH`` characters and
  printable (``str.isprintable``: no newline, tab, control or bidi character),
  so that it is safe in log lines and in Parquet. Ids are never used as file
  paths, so ``"../etc"`` is a valid id.
- A missing id (field absent or null) is generated from the content alone, see
  :func:`content_id`: the same prompt gets the same id in every run and on
  every machine. Two samples with the same content therefore share an id.
- Ids are unique within a file. A repeated id is an error naming both lines,
  even with ``skip_bad_lines``: dropping either sample would change the data.

Meta field names ``sample_id`` and :data:`TRACE_COLUMNS` are reserved for the
columns of the trace's samples table. Meta values are JSON scalars (null,
boolean, number, string) or flat lists of them, and a field keeps one type
across the file (integers and floats may mix unless an integer exceeds 2**53),
so that the samples table can be written as Parquet before any expensive
tracing starts. Objects, nested lists, NaN or Infinity, integers outside int64
and unpaired surrogate escapes (``"\\ud800"``) are bad lines.

Bad lines (not UTF-8, not JSON, no prompt, bad id or meta value) raise
``InputError``; with ``skip_bad_lines`` they are skipped and their 1-based
numbers returned in ``SampleSet.skipped_lines`` (Parquet: row numbers). A file
without a single sample is always an error.

Example (``path`` is ``samples.jsonl``)::

    path.write_text('{"id": 7, "text": "hi", "lang": "en"}\\n{"text": "hello"}\\n')
    [(s.sample_id, s.text, s.meta) for s in read_samples(path).samples]
    # [('7', 'hi', {'lang': 'en'}), ('s-aaf4c61ddcc5', 'hello', {})]
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import pandas as pd

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv", ".txt": "txt"}
INPUT_IDS_FIELD = "input_ids"
DEFAULT_ID_FIELD = "id"  # optional; an id field named otherwise must exist
SAMPLE_ID_COLUMN = "sample_id"  # the id column of sample_table(); no meta field may take it
# The columns tracing adds to the samples table (the prompt's token count, whether it was cut,
# its mean NLL): a meta field of one of these names would be overwritten, so none may take them.
TRACE_COLUMNS = ("num_tokens", "truncated", "nll")
_RESERVED = {
    SAMPLE_ID_COLUMN: "the id column (rename it, or pass --id-field sample_id)",
    **dict.fromkeys(TRACE_COLUMNS, "a column tracing adds to the samples table (rename it)"),
}
MAX_ID_LENGTH = 256
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT64_EXACT = 2**53  # larger integers do not survive a float64 column
_PARQUET_BATCH_ROWS = 4096
_SKIP_HINT = "pass --skip-bad-lines"
_FLAT_META = "meta values must be JSON scalars or flat lists (flatten it or encode it as a string)"


@dataclass(frozen=True)
class Sample:
    """One prompt to trace: exactly one of ``text`` and ``input_ids`` is set.

    ``meta`` holds the record's other fields (JSON scalars or flat lists), in
    file order; they become columns of the trace's samples table.
    """

    sample_id: str
    text: str | None
    input_ids: tuple[int, ...] | None
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError(f"sample '{self.sample_id}' needs exactly one of text and input_ids")


@dataclass(frozen=True)
class SampleReadOptions:
    """How to read a samples file; built from the ``--id-field``, ``--text-field``,
    ``--skip-bad-lines`` and ``--limit`` flags. ``limit`` keeps the first N valid samples.
    An ``id_field`` other than :data:`DEFAULT_ID_FIELD` must exist in the file."""

    id_field: str = DEFAULT_ID_FIELD
    text_field: str = "text"
    skip_bad_lines: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if not self.id_field or not self.text_field:
            raise InputError("--id-field and --text-field must not be empty")
        if self.id_field == self.text_field:
            raise InputError(
                f"--id-field and --text-field are both '{self.id_field}'; name two different fields"
            )
        if INPUT_IDS_FIELD in (self.id_field, self.text_field):
            raise InputError(
                f"'{INPUT_IDS_FIELD}' is reserved for pre-tokenised prompts; "
                "pick another --id-field or --text-field"
            )
        limit = self.limit
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise InputError(f"--limit must be a positive integer, got {limit!r}")


@dataclass(frozen=True)
class SampleSet:
    """The samples of one file, in file order, plus where they came from.

    ``skipped_lines``: 1-based line numbers (Parquet: row numbers) of bad lines
    skipped with ``skip_bad_lines``. ``source_sha256``: hex SHA-256 of the file's
    bytes, for provenance. ``format``: ``"jsonl"``, ``"parquet"``, ``"csv"`` or ``"txt"``.
    """

    samples: list[Sample]
    skipped_lines: list[int]
    source_sha256: str
    format: str
    path: str = ""
    part: tuple[int, int] | None = None  # (index, count) after take_part
    read_options: SampleReadOptions = field(default_factory=SampleReadOptions)

    def take_part(self, index: int, count: int) -> SampleSet:
        """Part ``index`` of ``count`` (0-based): samples index, index + count, ... in file order.

        The parts are disjoint and together hold every sample, so ``count``
        engines can trace them in parallel; ``moepath merge`` joins their traces.
        """
        if self.part is not None:
            raise InputError("the samples are already a part; take parts of the whole file")
        if count < 1 or not 0 <= index < count:
            raise InputError(f"part {index}/{count} does not exist: use I/N with 0 <= I < N")
        if index >= len(self.samples):
            raise InputError(f"part {index}/{count} of '{self.path}' is empty: the file has "
                             f"only {len(self.samples)} sample(s); use fewer parts")
        return replace(self, samples=self.samples[index::count], part=(index, count))


class _BadLine(Exception):
    """One record is unusable; the message says why (without file or line, added by the caller)."""


def read_samples(path: str | Path, options: SampleReadOptions | None = None) -> SampleSet:
    """Read and validate every sample of ``path`` (see the module docstring for the rules)."""
    options = options or SampleReadOptions()
    path = Path(path)
    fmt = _format_of(path)
    unit = "row" if fmt == "parquet" else "line"
    fields: dict[str, None] = {}  # the field names of the records read, in first-seen order
    try:
        with contextlib.closing(_READERS[fmt](path, options)) as records:
            samples, skipped = _collect(_noting_fields(records, fields), str(path), unit, options)
        with path.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        raise InputError(f"cannot read samples file '{path}' ({exc.strerror or exc})") from exc
    if not samples:
        why = f" ({len(skipped)} bad {unit}s skipped)" if skipped else ""
        raise InputError(f"samples file '{path}' has no samples{why}")
    _check_named_id(path, list(fields), options)
    return SampleSet(samples=samples, skipped_lines=skipped, source_sha256=digest, format=fmt,
                     path=str(path), read_options=options)


def content_id(text: str | None, input_ids: Sequence[int] | None) -> str:
    """The id of a sample that has none: ``"s-"`` + the first 12 hex digits of a SHA-1.

    The SHA-1 is of the UTF-8 text, or of ``"input_ids:"`` + the ids joined by
    commas (so a text can never collide with token ids).
    ``content_id("hello", None) == "s-aaf4c61ddcc5"``.
    """
    if text is not None:
        payload = text.encode("utf-8")
    else:
        payload = ("input_ids:" + ",".join(str(token) for token in input_ids or ())).encode()
    return "s-" + hashlib.sha1(payload, usedforsecurity=False).hexdigest()[:12]


def sample_table(samples: Sequence[Sample]) -> pd.DataFrame:
    """The trace's samples table: ``sample_id``, then one column per meta key.

    Meta keys appear in first-seen order; a sample without a key has None there.
    All columns have object dtype, so integers stay integers and missing stays
    None (not NaN); pyarrow infers each column's Parquet type when writing.
    """
    import pandas as pd

    keys = dict.fromkeys(key for sample in samples for key in sample.meta)
    columns = {SAMPLE_ID_COLUMN: [sample.sample_id for sample in samples]}
    columns.update({key: [sample.meta.get(key) for sample in samples] for key in keys})
    return pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})


# --- reading: the format readers yield (number, record dict or _BadLine) ---------------------


def _format_of(path: Path) -> str:
    if not path.exists():
        raise InputError(f"samples file '{path}' does not exist")
    supported = ", ".join(FORMATS)
    if path.is_dir():
        raise InputError(f"samples file '{path}' is a directory; pass a file ({supported})")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"samples file '{path}' has unsupported extension '{path.suffix}'; "
            f"use one of {supported}"
        )
    return fmt


def _collect(
    records: Iterator[tuple[int, dict | _BadLine]], src: str, unit: str, options: SampleReadOptions
) -> tuple[list[Sample], list[int]]:
    """Validate records in order: skip or raise on bad ones, stop at the limit, no duplicates."""
    samples: list[Sample] = []
    skipped: list[int] = []
    first_seen: dict[str, int] = {}  # sample id -> its line number
    field_types = _FieldTypes(unit)
    for number, record in records:
        try:
            if isinstance(record, _BadLine):
                raise record
            sample = _to_sample(record, options, field_types, number)
        except _BadLine as bad:
            if not options.skip_bad_lines:
                raise InputError(
                    f"{src} {unit} {number}: {bad}; fix the {unit} or {_SKIP_HINT}"
                ) from None
            skipped.append(number)
            continue
        first = first_seen.setdefault(sample.sample_id, number)
        if first != number:
            raise InputError(_duplicate_message(sample, src, unit, first, number))
        samples.append(sample)
        if options.limit is not None and len(samples) >= options.limit:
            break
    return samples, skipped


def _noting_fields(
    records: Iterator[tuple[int, dict | _BadLine]], fields: dict[str, None]
) -> Iterator[tuple[int, dict | _BadLine]]:
    """``records`` unchanged, adding each record's field names to ``fields`` as it passes."""
    for number, record in records:
        if isinstance(record, dict):
            fields.update(dict.fromkeys(record))
        yield number, record


def _duplicate_message(sample: Sample, src: str, unit: str, first: int, number: int) -> str:
    generated = sample.sample_id == content_id(sample.text, sample.input_ids)
    why = " (generated from the content: the two samples are identical)" if generated else ""
    return (
        f"{src} {unit}s {first} and {number}: duplicate sample id {_quoted(sample.sample_id)}"
        f"{why}; ids must be unique"
    )


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based number, raw bytes including the line ending), streamed; a UTF-8 BOM is dropped."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            yield number, raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw


def _jsonl_records(path: Path, options: SampleReadOptions) -> Iterator[tuple[int, dict | _BadLine]]:
    for number, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            record = _json_object(_decode(raw.rstrip(b"\r\n")))
        except _BadLine as bad:
            record = bad
        yield number, record


def _txt_records(path: Path, options: SampleReadOptions) -> Iterator[tuple[int, dict | _BadLine]]:
    for number, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            record = {options.text_field: _decode(raw.rstrip(b"\r\n"))}
        except _BadLine as bad:
            record = bad
        yield number, record


def _csv_records(path: Path, options: SampleReadOptions) -> Iterator[tuple[int, dict | _BadLine]]:
    """A CSV record may span lines (quoted newlines), so undecodable bytes are decoded with
    surrogateescape for the parser and the whole record holding them is reported as bad."""
    consumed: list[int] = []  # numbers of the lines the parser read for the current record
    undecodable: dict[int, str] = {}

    def text_lines() -> Iterator[str]:
        for number, raw in _lines(path):
            consumed.append(number)
            try:
                yield _decode(raw)
            except _BadLine as bad:
                undecodable[number] = str(bad)
                yield raw.decode("utf-8", "surrogateescape")

    rows = csv.reader(text_lines(), strict=True)  # not strict: an unclosed quote eats the file
    try:
        header = next(rows, None)
        if header is None:
            return
        if undecodable:
            line = min(undecodable)
            raise InputError(
                f"{path} line {line} (the header): {undecodable[line]}; re-save the file as UTF-8"
            )
        _check_header(path, header, options)
        consumed.clear()
        for row in rows:
            number, bad = consumed[0], [undecodable[n] for n in consumed if n in undecodable]
            consumed.clear()
            if any(cell.strip() for cell in row):  # else a blank line
                yield number, _BadLine(bad[0]) if bad else _csv_record(header, row)
    except csv.Error as exc:
        line = consumed[0] if consumed else 1
        raise InputError(f"{path} line {line}: {_csv_problem(exc)}") from None


def _csv_problem(error: csv.Error) -> str:
    """The csv module's complaint and its fix; at the end of the file it is an unclosed quote."""
    if str(error) == "unexpected end of data":
        return ('a quoted cell starts in this record and is never closed; add its closing '
                'quote (a quote inside a quoted cell is written "")')
    return f"not valid CSV ({error}); fix the file or use JSONL"


def _check_header(path: Path, header: list[str], options: SampleReadOptions) -> None:
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError(
            f"{path} header repeats column {_quoted(repeated[0])}; column names must be unique"
        )
    _check_columns(path, header, options)


def _csv_record(header: list[str], row: list[str]) -> dict | _BadLine:
    if len(row) != len(header):
        return _BadLine(f"has {len(row)} fields but the header has {len(header)}")
    record: dict[str, object] = {name: cell or None for name, cell in zip(header, row, strict=True)}
    ids = record.get(INPUT_IDS_FIELD)
    if ids is None:
        return record
    try:
        record[INPUT_IDS_FIELD] = _loads(str(ids))
    except _BadLine:
        return _BadLine(f"'{INPUT_IDS_FIELD}' is not a JSON list like [1, 2, 3]")
    return record


def _parquet_records(
    path: Path, options: SampleReadOptions
) -> Iterator[tuple[int, dict | _BadLine]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        file = pq.ParquetFile(path)
        _check_columns(path, file.schema_arrow.names, options)
        for batch in file.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except pa.ArrowException as exc:
        where = f"row {number + 1}" if number else "the file"
        raise InputError(
            f"samples file '{path}' is not a readable Parquet file ({where}: {exc}); re-write it"
        ) from None


def _check_columns(path: Path, names: Sequence[str], options: SampleReadOptions) -> None:
    """Tabular formats name their columns once: a missing text column or named id column is
    one file-level error, raised before any row is read."""
    if options.text_field not in names and INPUT_IDS_FIELD not in names:
        raise InputError(
            f"samples file '{path}' has no '{options.text_field}' column (columns: "
            f"{_listed(names)}); use --text-field to name the text column, or give "
            f"'{INPUT_IDS_FIELD}'"
        )
    _check_named_id(path, names, options)


def _check_named_id(path: Path, names: Sequence[str], options: SampleReadOptions) -> None:
    """Refuse an id field named other than the default that is not among ``names`` (the
    columns, or the fields of the JSONL records read): it is a typo, not missing ids."""
    if options.id_field == DEFAULT_ID_FIELD or options.id_field in names:
        return
    raise InputError(
        f"samples file '{path}' has no '{options.id_field}' field (fields: {_listed(names)}); "
        "pass the id field's name to --id-field, or leave it out to generate ids"
    )


def _listed(names: Sequence[str]) -> str:
    """The first 10 names, quoted, for a one-line message."""
    return ", ".join(_quoted(name) for name in names[:10]) + (", ..." if len(names) > 10 else "")


_READERS = {
    "jsonl": _jsonl_records,
    "txt": _txt_records,
    "csv": _csv_records,
    "parquet": _parquet_records,
}


# --- validation of one record -----------------------------------------------------------------


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadLine(f"not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1})") from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON; use null")


def _loads(text: str) -> object:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # NaN/Infinity, integers of more than 4300 digits
        raise _BadLine(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise _BadLine("not valid JSON (nested too deeply)") from None


def _json_object(text: str) -> dict:
    try:
        value = _loads(text)
    except _BadLine as bad:
        if text.strip() in ("[", "{"):
            raise _BadLine(
                f"{bad} (the file looks pretty-printed: JSON Lines needs one object per line)"
            ) from None
        raise
    if isinstance(value, list):
        raise _BadLine("is a JSON array, not an object (JSON Lines needs one object per line)")
    if not isinstance(value, dict):
        raise _BadLine(f"is {_typed(value)}, not a JSON object")
    return value


def _to_sample(
    record: dict, options: SampleReadOptions, field_types: _FieldTypes, number: int
) -> Sample:
    text, input_ids = _prompt(record, options.text_field)
    sample_id = _sample_id(record.get(options.id_field), options.id_field, text, input_ids)
    own = (options.id_field, options.text_field, INPUT_IDS_FIELD)
    meta = {key: value for key, value in record.items() if key not in own}
    field_types.check(meta, number)
    return Sample(sample_id=sample_id, text=text, input_ids=input_ids, meta=meta)


def _prompt(record: dict, text_field: str) -> tuple[str | None, tuple[int, ...] | None]:
    text, ids = record.get(text_field), record.get(INPUT_IDS_FIELD)
    if text is not None and ids is not None:
        raise _BadLine(f"has both '{text_field}' and '{INPUT_IDS_FIELD}' (keep one)")
    if ids is not None:
        return None, _token_ids(ids)
    if text_field not in record:
        raise _BadLine(f"no '{text_field}' field (use --text-field to name it)")
    if text is not None and not isinstance(text, str):
        raise _BadLine(f"'{text_field}' is {_typed(text)}, not a string")
    if not (text or "").strip():  # a prompt of only whitespace is as empty as none
        raise _BadLine(f"'{text_field}' is empty" + (" (only whitespace)" if text else ""))
    _check_unicode(text, f"'{text_field}'")
    return text, None


def _token_ids(value: object) -> tuple[int, ...]:
    wanted = f"'{INPUT_IDS_FIELD}' must be a non-empty list of non-negative integers"
    if not isinstance(value, list) or not value:
        raise _BadLine(f"{wanted}, got {'an empty list' if value == [] else _typed(value)}")
    for index, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= _INT64_MAX:
            raise _BadLine(f"{wanted}; item {index} is {_preview(token)}")
    return tuple(value)


def _sample_id(
    value: object, id_field: str, text: str | None, input_ids: tuple[int, ...] | None
) -> str:
    if value is None:
        return content_id(text, input_ids)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _BadLine(f"'{id_field}' is {_typed(value)}; ids must be strings or integers")
    sample_id = str(value)
    if not sample_id:
        raise _BadLine(
            f"'{id_field}' is empty (give an id, or leave the field out to generate one)"
        )
    if len(sample_id) > MAX_ID_LENGTH:
        raise _BadLine(
            f"'{id_field}' is {len(sample_id)} characters; ids have at most {MAX_ID_LENGTH}"
        )
    if not sample_id.isprintable():
        raise _BadLine(
            f"'{id_field}' {_preview(sample_id)} has a non-printable character "
            "(ids must be printable: no newline, tab or control character)"
        )
    return sample_id


class _FieldTypes:
    """The types each meta field has had so far, so the samples table stays writable as Parquet.

    Types are ``boolean``, ``string``, ``integer``, ``large integer`` (beyond
    2**53), ``float``, ``list of <one of those>`` and ``list`` (empty or
    all-null, fits any list type); null fits every type. A field keeps one type,
    except that integers and floats mix (pyarrow makes the column float64), as
    long as no integer is too large for a float64 to hold exactly.
    """

    def __init__(self, unit: str) -> None:
        self._unit = unit
        self._seen: dict[str, dict[str, int]] = {}  # field -> {type: number of its first line}

    def check(self, meta: dict[str, object], number: int) -> None:
        kinds = {key: _kinds(key, value) for key, value in meta.items()}
        for key, new in kinds.items():
            for known, first in self._seen.get(key, {}).items():
                clash = next((kind for kind in new if not _compatible(known, kind)), None)
                if clash is not None:
                    raise _BadLine(
                        f"{_field(key)} is {_a(clash)} here but {_a(known)} on {self._unit} "
                        f"{first} (a field keeps one type, so the samples table can be written)"
                    )
        for key, new in kinds.items():
            for kind in new:
                self._seen.setdefault(key, {}).setdefault(kind, number)


def _compatible(known: str, kind: str) -> bool:
    if known.startswith("list") != kind.startswith("list"):
        return False
    if "list" in (known, kind):
        return True
    pair = {known.removeprefix("list of "), kind.removeprefix("list of ")}
    return len(pair) == 1 or pair in ({"integer", "float"}, {"integer", "large integer"})


def _kinds(key: str, value: object) -> set[str]:
    """The types in ``value`` (several only for a list of mixed numbers; none for null)."""
    if key in _RESERVED:
        raise _BadLine(f"{_field(key)} is reserved for {_RESERVED[key]}")
    _check_unicode(key, "a field name")
    if not isinstance(value, list):
        kind = _scalar_kind(key, value)
        return {kind} if kind else set()
    if any(isinstance(item, list | dict) for item in value):
        raise _BadLine(f"{_field(key)} holds a nested list or object; {_FLAT_META}")
    kinds = sorted({_scalar_kind(key, item) for item in value} - {None})
    for index, kind in enumerate(kinds):
        clash = next((other for other in kinds[index:] if not _compatible(kind, other)), None)
        if clash is not None:
            raise _BadLine(f"{_field(key)} mixes {kind} and {clash} values in one list")
    return {f"list of {kind}" for kind in kinds} or {"list"}


def _scalar_kind(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise _BadLine(f"{_field(key)} is an integer outside int64 (write it as a string)")
        return "large integer" if abs(value) > _FLOAT64_EXACT else "integer"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _BadLine(f"{_field(key)} is {value}, which JSON cannot hold (use null)")
        return "float"
    if isinstance(value, str):
        _check_unicode(value, _field(key))
        return "string"
    raise _BadLine(f"{_field(key)} holds {_typed(value)}; {_FLAT_META}")


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _check_unicode(text: str, what: str) -> None:
    """Reject unpaired surrogates (JSON escapes such as "\\ud800"): UTF-8 cannot encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _BadLine(f"{what} has an unpaired surrogate \\u{ord(text[exc.start]):04x}") from None


def _typed(value: object) -> str:
    """The JSON type of ``value`` with its article, for messages: "an integer", "an object"."""
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a float"}
    names.update({str: "a string", list: "a list", dict: "an object"})
    return names.get(type(value), f"a {type(value).__name__}")


def _field(key: str) -> str:
    return f"field {_quoted(key)}"


def _quoted(name: str) -> str:
    """A user-chosen name in quotes, escaped when needed so that a message stays one line."""
    return f"'{name}'" if name.isprintable() else ascii(name)


def _preview(value: object, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."

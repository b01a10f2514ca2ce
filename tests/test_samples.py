"""Reading sample files: every format, stable ids, every error message, and properties."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moepath.tracer.errors import InputError
from moepath.tracer.samples import (
    Sample,
    SampleReadOptions,
    content_id,
    read_samples,
    sample_table,
)

SKIP = SampleReadOptions(skip_bad_lines=True)


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def jsonl(path: Path, *records: dict) -> Path:
    return write(path, "".join(json.dumps(record) + "\n" for record in records))


# --- formats -----------------------------------------------------------------------------------


def test_jsonl_keeps_id_text_and_extra_fields(tmp_path):
    path = write(
        tmp_path / "samples.jsonl",
        '{"id": "a1", "text": "The cat sat.", "lang": "en", "tags": ["x", "y"]}\n'
        "\n"
        '{"id": 17, "text": "Zwei", "lang": "de", "score": 0.5, "ok": true, "note": null}\n',
    )
    result = read_samples(path)
    assert result.samples == [
        Sample("a1", "The cat sat.", None, {"lang": "en", "tags": ["x", "y"]}),
        Sample("17", "Zwei", None, {"lang": "de", "score": 0.5, "ok": True, "note": None}),
    ]
    assert result.format == "jsonl"
    assert result.skipped_lines == []
    assert result.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_module_docstring_example(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": 7, "text": "hi", "lang": "en"}\n{"text": "hello"}\n')
    assert [(s.sample_id, s.text, s.meta) for s in read_samples(path).samples] == [
        ("7", "hi", {"lang": "en"}),
        ("s-aaf4c61ddcc5", "hello", {}),
    ]


def test_json_extension_is_json_lines_with_crlf_and_bom(tmp_path):
    path = write(tmp_path / "samples.JSON", b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    result = read_samples(path)
    assert [s.text for s in result.samples] == ["a", "b"]
    assert result.format == "jsonl"


def test_custom_id_and_text_fields(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", {"uid": "q1", "prompt": "2+2=", "text": "kept as meta"})
    options = SampleReadOptions(id_field="uid", text_field="prompt")
    assert read_samples(path, options).samples == [
        Sample("q1", "2+2=", None, {"text": "kept as meta"})
    ]


def test_input_ids_replace_text_for_pretokenised_data(tmp_path):
    path = jsonl(
        tmp_path / "s.jsonl",
        {"id": "t", "input_ids": [5, 0, 42], "split": "train"},
        {"id": "u", "text": "plain", "input_ids": None},
    )
    assert read_samples(path).samples == [
        Sample("t", None, (5, 0, 42), {"split": "train"}),
        Sample("u", "plain", None, {}),
    ]


def test_parquet_rows_with_int_ids_text_or_input_ids(tmp_path):
    path = tmp_path / "s.parquet"
    table = pa.table(
        {
            "id": pa.array([10, 11], pa.int64()),
            "text": ["first", None],
            "input_ids": pa.array([None, [3, 1, 4]], pa.list_(pa.int32())),
            "label": ["a", None],
            "score": [1.5, 2.0],
        }
    )
    pq.write_table(table, path)
    result = read_samples(path)
    assert result.samples == [
        Sample("10", "first", None, {"label": "a", "score": 1.5}),
        Sample("11", None, (3, 1, 4), {"label": None, "score": 2.0}),
    ]
    assert result.format == "parquet"
    assert result.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_csv_cells_are_strings_empty_is_none_and_records_may_span_lines(tmp_path):
    path = write(
        tmp_path / "s.csv",
        'id,text,input_ids,label\na,"two\nlines",,x\n\nb,,"[7, 8]",\nc,third,,3\n',
    )
    result = read_samples(path)
    assert result.samples == [
        Sample("a", "two\nlines", None, {"label": "x"}),
        Sample("b", None, (7, 8), {"label": None}),
        Sample("c", "third", None, {"label": "3"}),
    ]
    assert result.format == "csv"


def test_csv_text_of_only_whitespace_is_empty(tmp_path):
    path = write(tmp_path / "s.csv", 'id,text\na,x\nb,"  \n "\nc,y\n')
    with pytest.raises(InputError) as caught:
        read_samples(path)
    assert str(caught.value) == (
        f"{path} line 3: 'text' is empty (only whitespace); fix the line or pass --skip-bad-lines")
    assert [s.sample_id for s in read_samples(path, SKIP).samples] == ["a", "c"]


def test_csv_error_names_the_line_a_record_starts_on(tmp_path):
    path = write(tmp_path / "s.csv", 'id,text\na,"multi\nline"\nb\n')
    with pytest.raises(InputError) as caught:
        read_samples(path)
    assert str(caught.value) == (
        f"{path} line 4: has 1 fields but the header has 2; fix the line or pass --skip-bad-lines"
    )


@pytest.mark.parametrize(("content", "problem"), [
    # without strict parsing, the unclosed quote made lines 3-4 part of sample a's text
    ('id,text\nz,fine\na,"unterminated\nb,y\nc,z\n',
     'line 3: a quoted cell starts in this record and is never closed; add its closing quote '
     '(a quote inside a quoted cell is written "")'),
    ('id,text\na,"quoted"tail\n',
     """line 2: not valid CSV (',' expected after '"'); fix the file or use JSONL"""),
])
def test_csv_quotes_must_be_closed(tmp_path, content, problem):
    path = write(tmp_path / "s.csv", content)
    for options in (SampleReadOptions(), SKIP):
        with pytest.raises(InputError) as caught:
            read_samples(path, options)
        assert str(caught.value) == f"{path} {problem}"


def test_txt_is_one_sample_per_nonblank_line(tmp_path):
    path = write(tmp_path / "s.txt", b"\xef\xbb\xbfhello\r\n\n   \n  spaced  \nlast")
    result = read_samples(path)
    assert [(s.sample_id, s.text, s.meta) for s in result.samples] == [
        ("s-aaf4c61ddcc5", "hello", {}),
        (content_id("  spaced  ", None), "  spaced  ", {}),
        (content_id("last", None), "last", {}),
    ]
    assert result.format == "txt"


# --- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "input_ids", "expected"),
    [
        # sha1(b"hello") = aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d
        ("hello", None, "s-aaf4c61ddcc5"),
        # sha1(b"input_ids:1,2,3") = 64134528e55d1260317264ec34fc318f37fc14ec1
        (None, (1, 2, 3), "s-64134528e55d"),
        ("1,2,3", None, "s-" + hashlib.sha1(b"1,2,3").hexdigest()[:12]),
    ],
)
def test_generated_ids_are_hand_checked(text, input_ids, expected):
    assert content_id(text, input_ids) == expected


def test_generated_ids_depend_on_content_only(tmp_path):
    first = jsonl(tmp_path / "a.jsonl", {"text": "hello", "run": 1}, {"input_ids": [1, 2, 3]})
    second = jsonl(tmp_path / "b.jsonl", {"input_ids": [1, 2, 3]}, {"id": None, "text": "hello"})
    ids_first = [s.sample_id for s in read_samples(first).samples]
    ids_second = [s.sample_id for s in read_samples(second).samples]
    assert ids_first == ["s-aaf4c61ddcc5", "s-64134528e55d"]
    assert sorted(ids_second) == sorted(ids_first)


def test_ids_are_opaque_strings_never_paths(tmp_path):
    path = jsonl(
        tmp_path / "s.jsonl", {"id": "../../etc/passwd", "text": "x"}, {"id": -3, "text": "y"}
    )
    assert [s.sample_id for s in read_samples(path).samples] == ["../../etc/passwd", "-3"]


# --- errors ------------------------------------------------------------------------------------

BAD_LINES = [
    ('{"id": "a7" "text": "x"}', "not valid JSON (Expecting ',' delimiter at column 13)"),
    ("[1, 2]", "is a JSON array, not an object (JSON Lines needs one object per line)"),
    ('"just a string"', "is a string, not a JSON object"),
    (
        "[",
        "not valid JSON (Expecting value at column 2) "
        "(the file looks pretty-printed: JSON Lines needs one object per line)",
    ),
    ('{"text": NaN}', "not valid JSON (NaN is not JSON; use null)"),
    ("[" * 100_000, "not valid JSON (nested too deeply)"),
    ('{"id": "b"}', "no 'text' field (use --text-field to name it)"),
    ('{"text": null}', "'text' is empty"),
    ('{"text": ""}', "'text' is empty"),
    ('{"text": " \\t\\u3000\\n"}', "'text' is empty (only whitespace)"),
    ('{"text": 3}', "'text' is an integer, not a string"),
    ('{"text": ["a"]}', "'text' is a list, not a string"),
    ('{"text": "\\ud800"}', "'text' has an unpaired surrogate \\ud800"),
    ('{"text": "a", "input_ids": [1]}', "has both 'text' and 'input_ids' (keep one)"),
    (
        '{"input_ids": "1 2"}',
        "'input_ids' must be a non-empty list of non-negative integers, got a string",
    ),
    (
        '{"input_ids": []}',
        "'input_ids' must be a non-empty list of non-negative integers, got an empty list",
    ),
    (
        '{"input_ids": [1, -1]}',
        "'input_ids' must be a non-empty list of non-negative integers; item 1 is -1",
    ),
    (
        '{"input_ids": [1.5]}',
        "'input_ids' must be a non-empty list of non-negative integers; item 0 is 1.5",
    ),
    (
        '{"input_ids": [true]}',
        "'input_ids' must be a non-empty list of non-negative integers; item 0 is True",
    ),
    ('{"id": 1.5, "text": "x"}', "'id' is a float; ids must be strings or integers"),
    ('{"id": true, "text": "x"}', "'id' is a boolean; ids must be strings or integers"),
    (
        '{"id": "", "text": "x"}',
        "'id' is empty (give an id, or leave the field out to generate one)",
    ),
    (
        '{"id": "a\\nb", "text": "x"}',
        "'id' 'a\\nb' has a non-printable character "
        "(ids must be printable: no newline, tab or control character)",
    ),
    ('{"id": "' + "x" * 300 + '", "text": "x"}', "'id' is 300 characters; ids have at most 256"),
    (
        '{"text": "x", "sample_id": 1}',
        "field 'sample_id' is reserved for the id column (rename it, or pass --id-field sample_id)",
    ),
    (
        '{"text": "x", "nll": 2.5}',
        "field 'nll' is reserved for a column tracing adds to the samples table (rename it)",
    ),
    (
        '{"text": "x", "num_tokens": 3}',
        "field 'num_tokens' is reserved for a column tracing adds to the samples table "
        "(rename it)",
    ),
    (
        '{"text": "x", "m": {"k": 1}}',
        "field 'm' holds an object; meta values must be JSON scalars "
        "or flat lists (flatten it or encode it as a string)",
    ),
    (
        '{"text": "x", "m": [[1]]}',
        "field 'm' holds a nested list or object; meta values must be JSON scalars "
        "or flat lists (flatten it or encode it as a string)",
    ),
    ('{"text": "x", "m": [1, "a"]}', "field 'm' mixes integer and string values in one list"),
    (
        '{"text": "x", "m": [9007199254740993, 0.5]}',
        "field 'm' mixes float and large integer values in one list",
    ),
    (
        '{"text": "x", "m": 9223372036854775808}',
        "field 'm' is an integer outside int64 (write it as a string)",
    ),
    (
        '{"text": "x", "lang": 5}',
        "field 'lang' is an integer here but a string on line 1 "
        "(a field keeps one type, so the samples table can be written)",
    ),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_bad_line_message_names_file_line_and_fix(tmp_path, line, problem):
    path = write(tmp_path / "samples.jsonl", '{"text": "ok", "lang": "en"}\n' + line + "\n")
    with pytest.raises(InputError) as caught:
        read_samples(path)
    assert str(caught.value) == f"{path} line 2: {problem}; fix the line or pass --skip-bad-lines"
    assert read_samples(path, SKIP).skipped_lines == [2]


def test_malformed_json_on_line_7(tmp_path):
    lines = [json.dumps({"id": f"a{n}", "text": "x"}) for n in range(6)]
    path = write(tmp_path / "samples.jsonl", "\n".join([*lines, '{"id": "a7" "text": "x"}']))
    with pytest.raises(InputError, match=r"samples\.jsonl line 7: not valid JSON \(Expecting ','"):
        read_samples(path)


def test_non_utf8_bytes_name_the_line_and_are_skippable(tmp_path):
    path = write(tmp_path / "s.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "b"}\n')
    with pytest.raises(InputError) as caught:
        read_samples(path)
    assert str(caught.value) == (
        f"{path} line 2: not UTF-8 (byte 0xe9 at byte 14); fix the line or pass --skip-bad-lines"
    )
    result = read_samples(path, SKIP)
    assert ([s.text for s in result.samples], result.skipped_lines) == (["a", "b"], [2])


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_non_utf8_is_skippable_in_txt_and_csv(tmp_path, suffix):
    header = b"text\n" if suffix == ".csv" else b""
    path = write(tmp_path / f"s{suffix}", header + b"good\nbad \xff\nalso good\n")
    first_bad = 3 if suffix == ".csv" else 2
    with pytest.raises(InputError, match=rf"line {first_bad}: not UTF-8 \(byte 0xff at byte 5\)"):
        read_samples(path)
    result = read_samples(path, SKIP)
    assert ([s.text for s in result.samples], result.skipped_lines) == (
        ["good", "also good"],
        [first_bad],
    )


def test_missing_file(tmp_path):
    path = tmp_path / "x.jsonl"
    with pytest.raises(InputError) as caught:
        read_samples(path)
    assert str(caught.value) == f"samples file '{path}' does not exist"


def test_directory_is_not_a_samples_file(tmp_path):
    with pytest.raises(InputError, match="is a directory; pass a file"):
        read_samples(tmp_path)


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = write(tmp_path / "s.tsv", "text\nx\n")
    with pytest.raises(InputError) as caught:
        read_samples(path)
    assert str(caught.value) == (
        f"samples file '{path}' has unsupported extension '.tsv'; "
        "use one of .jsonl, .json, .parquet, .csv, .txt"
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.jsonl", ""), ("b.jsonl", "\n  \n\r\n"), ("e.txt", "\n\n"), ("h.csv", "id,text\n")],
)
def test_file_without_samples(tmp_path, name, content):
    path = write(tmp_path / name, content)
    for options in (SampleReadOptions(), SKIP):
        with pytest.raises(InputError) as caught:
            read_samples(path, options)
        assert str(caught.value) == f"samples file '{path}' has no samples"


def test_all_lines_bad_is_no_samples_even_when_skipping(tmp_path):
    path = write(tmp_path / "s.jsonl", "nope\n{}\n")
    with pytest.raises(InputError) as caught:
        read_samples(path, SKIP)
    assert str(caught.value) == f"samples file '{path}' has no samples (2 bad lines skipped)"


def test_duplicate_ids_name_both_lines_even_when_skipping(tmp_path):
    ids = ["a1", "a2", "a17", "a4", "a5", "a6", "a7", "a8", "a17"]  # lines 3 and 9
    path = jsonl(tmp_path / "s.jsonl", *({"id": i, "text": f"t{n}"} for n, i in enumerate(ids)))
    for options in (SampleReadOptions(), SKIP):
        with pytest.raises(InputError) as caught:
            read_samples(path, options)
        assert str(caught.value) == (
            f"{path} lines 3 and 9: duplicate sample id 'a17'; ids must be unique")


def test_int_and_string_ids_that_print_alike_are_duplicates(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", {"id": 5, "text": "x"}, {"id": "5", "text": "y"})
    with pytest.raises(InputError, match="s.jsonl lines 1 and 2: duplicate sample id '5'"):
        read_samples(path)


def test_identical_content_without_ids_is_a_duplicate(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", {"text": "same"}, {"text": "other"}, {"text": "same"})
    with pytest.raises(InputError) as caught:
        read_samples(path)
    assert str(caught.value) == (
        f"{path} lines 1 and 3: duplicate sample id '{content_id('same', None)}' "
        "(generated from the content: the two samples are identical); ids must be unique"
    )


def test_parquet_duplicates_and_errors_count_rows(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "a"], "text": ["x", "y", "z"]}), path)
    with pytest.raises(InputError, match="s.parquet rows 1 and 3: duplicate sample id 'a'"):
        read_samples(path)


def test_csv_columns_tracing_adds_are_reserved(tmp_path):
    path = write(tmp_path / "s.csv", "id,text,truncated\na,x,no\n")
    with pytest.raises(InputError) as caught:
        read_samples(path)
    assert str(caught.value) == (
        f"{path} line 2: field 'truncated' is reserved for a column tracing adds to the samples "
        "table (rename it); fix the line or pass --skip-bad-lines")


def test_tabular_file_without_text_column(tmp_path):
    path = write(tmp_path / "s.csv", "id,prompt\n1,hi\n")
    with pytest.raises(InputError) as caught:
        read_samples(path)
    assert str(caught.value) == (
        f"samples file '{path}' has no 'text' column (columns: 'id', 'prompt'); "
        "use --text-field to name the text column, or give 'input_ids'"
    )
    assert read_samples(path, SampleReadOptions(text_field="prompt")).samples[0].text == "hi"


def _id_typo_files(tmp_path) -> list[Path]:
    """The same two samples with an 'id' field, as JSONL, CSV and Parquet."""
    parquet = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), parquet)
    return [jsonl(tmp_path / "s.jsonl", {"id": "a", "text": "x"}, {"id": "b", "text": "y"}),
            write(tmp_path / "s.csv", "id,text\na,x\nb,y\n"), parquet]


def test_a_mistyped_id_field_is_refused_naming_the_fields(tmp_path):
    for path in _id_typo_files(tmp_path):
        with pytest.raises(InputError) as caught:
            read_samples(path, SampleReadOptions(id_field="uid", skip_bad_lines=True))
        assert str(caught.value) == (
            f"samples file '{path}' has no 'uid' field (fields: 'id', 'text'); pass the id "
            "field's name to --id-field, or leave it out to generate ids")
        ids = [s.sample_id for s in read_samples(path, SampleReadOptions(id_field="id")).samples]
        assert ids == ["a", "b"]


def test_a_named_id_field_may_be_missing_from_some_jsonl_records(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", {"text": "hello"}, {"uid": "q2", "text": "y"})
    samples = read_samples(path, SampleReadOptions(id_field="uid")).samples
    assert [s.sample_id for s in samples] == ["s-aaf4c61ddcc5", "q2"]


def test_corrupt_parquet(tmp_path):
    path = write(tmp_path / "s.parquet", b"not parquet at all")
    with pytest.raises(InputError, match="is not a readable Parquet file"):
        read_samples(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "--limit must be a positive integer, got 0"),
        ({"id_field": "k", "text_field": "k"}, "--id-field and --text-field are both 'k'"),
        ({"text_field": "input_ids"}, "'input_ids' is reserved for pre-tokenised prompts"),
        ({"id_field": ""}, "--id-field and --text-field must not be empty"),
    ],
)
def test_options_are_validated(kwargs, message):
    with pytest.raises(InputError, match=message):
        SampleReadOptions(**kwargs)


# --- skipping and limits -----------------------------------------------------------------------


def test_skip_bad_lines_counts_1_based_line_numbers(tmp_path):
    path = write(
        tmp_path / "s.jsonl",
        '{"id": 1, "text": "a"}\nbroken\n\n{"id": 2}\n{"id": 3, "text": "c"}\n[]\n',
    )
    result = read_samples(path, SKIP)
    assert [s.sample_id for s in result.samples] == ["1", "3"]
    assert result.skipped_lines == [2, 4, 6]


def test_limit_keeps_first_valid_samples_and_stops_reading(tmp_path):
    path = write(
        tmp_path / "s.jsonl",
        '{"text": "a"}\nbroken\n{"text": "b"}\n{"text": "c"}\n{"text": "a"}\nbroken\n',
    )
    result = read_samples(path, SampleReadOptions(skip_bad_lines=True, limit=2))
    assert [s.text for s in result.samples] == ["a", "b"]
    assert result.skipped_lines == [2]  # lines after the limit are never read
    assert result.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# --- samples table -----------------------------------------------------------------------------


def test_sample_table_has_one_column_per_meta_key(tmp_path):
    path = jsonl(
        tmp_path / "s.jsonl",
        {"id": "a", "text": "x", "n": 3, "tags": []},
        {"id": "b", "text": "y", "lang": "en", "tags": ["t"]},
        {"id": "c", "input_ids": [1], "n": 2.5},
    )
    table = sample_table(read_samples(path).samples)
    assert list(table.columns) == ["sample_id", "n", "tags", "lang"]
    assert table.to_dict("list") == {
        "sample_id": ["a", "b", "c"],
        "n": [3, None, 2.5],
        "tags": [[], ["t"], None],
        "lang": [None, "en", None],
    }
    written = pa.Table.from_pandas(table, preserve_index=False)
    assert written.schema.field("tags").type == pa.list_(pa.string())
    assert written.column("n").to_pylist() == [3.0, None, 2.5]


def test_sample_table_of_no_samples():
    assert list(sample_table([]).columns) == ["sample_id"]


# --- properties --------------------------------------------------------------------------------

_PRINTABLE = st.characters(
    codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
)
_SCALARS = {
    "boolean": st.booleans(),
    "integer": st.integers(-(2**63), 2**63 - 1),
    # floats mix with integers that a float64 holds exactly
    "number": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53),
    "string": st.text(),
}
_FIELD_NAMES = st.text(max_size=8).filter(
    lambda k: k not in {"id", "text", "input_ids", "sample_id", "num_tokens", "truncated", "nll"}
)


@st.composite
def _records(draw):
    """Records with unique ids (explicit or missing) and a fixed type per meta field."""
    schema = draw(st.dictionaries(_FIELD_NAMES, st.sampled_from(["list", *_SCALARS]), max_size=4))
    scalar_kind = {key: draw(st.sampled_from(list(_SCALARS))) for key in schema}
    records, seen = [], set()
    for _ in range(draw(st.integers(1, 6))):
        record = {}
        sample_id = draw(st.none() | st.integers(-(2**63), 2**63) | st.text(_PRINTABLE, min_size=1))
        if sample_id is not None or draw(st.booleans()):
            record["id"] = sample_id
        record["text"] = draw(st.text(min_size=1).filter(str.strip))  # blank text is refused
        for key, kind in schema.items():
            value = _SCALARS[scalar_kind[key]]
            if kind == "list":
                value = st.lists(value, max_size=3)
            if draw(st.booleans()):
                record[key] = draw(st.none() | value)
        key = str(sample_id) if sample_id is not None else content_id(record["text"], None)
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=_records(), ensure_ascii=st.booleans())
def test_jsonl_round_trip_keeps_ids_text_and_meta(tmp_path, records, ensure_ascii):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps(record, ensure_ascii=ensure_ascii) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    samples = read_samples(path).samples
    assert len(samples) == len(records)
    for sample, record in zip(samples, records, strict=True):
        expected_id = record.get("id")
        expected_id = content_id(record["text"], None) if expected_id is None else str(expected_id)
        meta = {key: value for key, value in record.items() if key not in ("id", "text")}
        assert (sample.sample_id, sample.text, sample.input_ids) == (
            expected_id,
            record["text"],
            None,
        )
        assert sample.meta == meta
        assert json.dumps(sample.meta) == json.dumps(meta)  # same key order, ints stay ints
    pa.Table.from_pandas(sample_table(samples), preserve_index=False)


_FRAGMENTS = st.sampled_from(
    [
        b'{"text": "a"}',
        b'{"id": 1, "text": "b"}',
        b'{"input_ids": [1, 2]}',
        b'{"text": "a", "m": 1}',
        b'{"text": "c", "m": "x"}',
        b"text,id",
        b'"unclosed',
        b"[",
        b"\xff\xfe",
        b'{"text": "\\udc80"}',
        b'{"n": ' + b"9" * 5000 + b"}",
        b"\x00",
        b"",
    ]
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(_FRAGMENTS | st.binary(max_size=30), max_size=8),
    suffix=st.sampled_from([".jsonl", ".txt", ".csv", ".parquet"]),
    skip=st.booleans(),
)
def test_arbitrary_bytes_raise_only_input_error(tmp_path, lines, suffix, skip):
    path = write(tmp_path / f"fuzz{suffix}", b"\n".join(lines))
    try:
        result = read_samples(path, SampleReadOptions(skip_bad_lines=skip))
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    ids = [s.sample_id for s in result.samples]
    assert result.samples and len(set(ids)) == len(ids)
    assert result.skipped_lines == sorted(set(result.skipped_lines))


def test_parts_are_disjoint_and_cover_the_file_in_order(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "text": "t"}) + "\n" for i in range(7)))
    whole = read_samples(path)
    parts = [whole.take_part(i, 3) for i in range(3)]
    assert [[s.sample_id for s in p.samples] for p in parts] == [
        ["x0", "x3", "x6"], ["x1", "x4"], ["x2", "x5"]]
    assert [p.part for p in parts] == [(0, 3), (1, 3), (2, 3)]
    assert parts[0].source_sha256 == whole.source_sha256


@pytest.mark.parametrize(("index", "count", "message"), [
    (2, 2, r"part 2/2 does not exist: use I/N with 0 <= I < N"),
    (0, 0, r"part 0/0 does not exist"),
    (7, 8, r"part 7/8 of '.*s.jsonl' is empty: the file has only 7 sample\(s\)"),
])
def test_impossible_parts_are_refused(tmp_path, index, count, message):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(7)))
    with pytest.raises(InputError, match=message):
        read_samples(path).take_part(index, count)

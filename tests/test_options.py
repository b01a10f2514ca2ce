"""Shared CLI option parsers: what each accepts, and the one-line refusals of the rest."""

from __future__ import annotations

import pytest
import typer

from moepath.cli.options import parse_pairs, parse_part
from moepath.tracer.distance import ALL_PAIRS


@pytest.mark.parametrize(("value", "pairs"), [("auto", None), ("all", ALL_PAIRS), ("200", 200)])
def test_parse_pairs(value, pairs):
    assert parse_pairs(value) == pairs


# '²' and '³' are digits to str.isdigit, but int() refuses them
@pytest.mark.parametrize("value", ["1", "-5", "many", "²", "2²", ""])
def test_parse_pairs_refuses_what_is_not_a_count(value):
    with pytest.raises(typer.BadParameter) as error:
        parse_pairs(value)
    assert error.value.message == f"--pairs takes auto, all or a number >= 2, not {value!r}"


@pytest.mark.parametrize(("value", "part"), [(None, None), ("0/2", (0, 2)), ("11/12", (11, 12))])
def test_parse_part(value, part):
    assert parse_part(value) == part


@pytest.mark.parametrize("value", ["²/3", "1/³", "1", "-1/2", "a/b", "1/2/3"])
def test_parse_part_refuses_what_is_not_i_of_n(value):
    with pytest.raises(typer.BadParameter) as error:
        parse_part(value)
    assert error.value.message == f"--part takes I/N such as 0/2, not {value!r}"


def test_skipped_bad_lines_are_counted_on_stderr_in_the_file_s_own_unit(tmp_path, capsys):
    from moepath.cli import render
    from moepath.tracer.samples import SampleReadOptions, read_samples

    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "text": "x"}\nnot json\n{"id": "b", "text": "y"}\n{"id": 3\n')
    render.skipped_lines(read_samples(path, SampleReadOptions(skip_bad_lines=True)))
    assert capsys.readouterr().err.strip() == "skipped 2 bad line(s) (first: line 2)"

"""The output layer: tables stay readable at 80 columns."""

from __future__ import annotations

from rich.console import Console

from moepath.cli import render


def rendered(table, width: int = 80) -> str:
    console = Console(width=width, record=True)
    console.print(table)
    return console.export_text()


def test_a_name_too_wide_for_its_column_wraps_instead_of_being_cut():
    names = ["moepath_arithmetic_addition_mod_97", "moepath_arithmetic_subtraction_mod_97"]
    table = render.table("t", ["group", "samples", "distance", "consistency", "complexity",
                               "experts / path"], [[name, 120, 17.5, 0.123456, 0.876544, 18.25]
                                                   for name in names])
    text = rendered(table)
    assert "…" not in text
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines()
                           if line.count("│") > 1)  # the body rows: a name over several lines
    assert all(name in first_column for name in names)
    assert text.count("0.1235") == 2 and text.count("0.8765") == 2

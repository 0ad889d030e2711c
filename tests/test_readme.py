"""README.md's "Configuration reference" says what qproxy.TABLES says.

One markdown table per TOML table, under a heading naming it (``[[name]]`` for
an array of tables, ``[name]`` for a table), columns ``key | type | default |
description``, one row per key in TABLES order.  A default cell is "required",
"same as `other_key`", or a TOML value in backticks.
"""

from __future__ import annotations

import re

import pytest

import qproxy
from conftest import ROOT

SECTION = "## Configuration reference"
COLUMNS = ["key", "type", "default", "description"]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def reference() -> dict[str, tuple[bool, list[list[str]]]]:
    """Heading name -> (is an array of tables, rows of cells), in README order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if SECTION not in text.splitlines():
        pytest.fail(f"README.md has no {SECTION!r} section")
    section = text.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    tables = {}
    for part in section.split("\n### ")[1:]:
        heading, *lines = part.splitlines()
        match = re.fullmatch(r"`\[(\[?)(\w+)\]?\]`", heading.strip())
        assert match, f"heading {heading!r} names no TOML table"
        rows = [cells(line) for line in lines if line.startswith("|")]
        assert rows[0] == COLUMNS, f"{heading}: columns {rows[0]}"
        assert set("".join(rows[1])) <= set("-: "), f"{heading}: no separator row"
        tables[match.group(2)] = (match.group(1) == "[", rows[2:])
    return tables


def parse_key(cell: str) -> tuple[str, bool]:
    match = re.fullmatch(r"`(\w+)`( \(extension\))?", cell)
    assert match, f"key cell {cell!r}"
    return match.group(1), match.group(2) is not None


def parse_default(cell: str) -> tuple[str, object]:
    if cell == "required":
        return "required", None
    match = re.fullmatch(r"same as `(\w+)`", cell)
    if match:
        return "same as", match.group(1)
    match = re.fullmatch(r"`(.+)`", cell)
    assert match, f"default cell {cell!r}"
    return "value", qproxy.tomllib.loads(f"value = {match.group(1)}")["value"]


def test_every_table_in_order():
    found = reference()
    assert list(found) == list(qproxy.TABLES)
    assert {name: array for name, (array, _) in found.items()} == {n: t.array for n, t in qproxy.TABLES.items()}


@pytest.mark.parametrize("name", list(qproxy.TABLES))
def test_rows_match_fields(name):
    fields = qproxy.TABLES[name].fields
    _, rows = reference()[name]
    assert all(len(row) == len(COLUMNS) for row in rows), rows
    assert [parse_key(row[0])[0] for row in rows] == list(fields)  # every key, no other, in order
    for row in rows:
        key, extension = parse_key(row[0])
        field = fields[key]
        assert extension == field.extension, key
        kind, default = parse_default(row[2])
        if field.required:
            assert kind == "required", key
        elif field.same_as:
            assert (kind, default) == ("same as", field.same_as), key
        else:
            assert (kind, default) == ("value", field.default), key
        if field.kind in qproxy.INTEGER_RANGES:
            low, high = qproxy.INTEGER_RANGES[field.kind]
            assert row[1] == f"integer, {low} to {high}", row
        elif field.kind == "seconds":
            assert row[1] == "number of seconds, {} to {}".format(*qproxy.SECONDS_RANGE), row
        elif field.kind == "boolean":
            assert row[1] == "boolean", row
        else:
            assert row[1].startswith("string"), row
        if field.kind == "log_level":
            assert all(f"`{level}`" in row[1] for level in qproxy.LOG_LEVELS), row
        assert row[3] == field.description, key

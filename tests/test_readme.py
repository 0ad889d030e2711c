"""README.md's "Configuration reference" says what qproxy.TABLES says, and its
"Limits" table what the Bounds block of qproxy.py says.

One markdown table per TOML table, under a heading naming it (``[[name]]`` for
an array of tables, ``[name]`` for a table), columns ``key | type | default |
description``, one row per key in TABLES order.  A default cell is "required",
"same as `other_key`", or a TOML value in backticks.
"""

from __future__ import annotations

import ast
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
        assert row[1] == qproxy.KINDS[field.kind].words, row
        assert row[3] == field.description, key


# ---------------------------------------------------------------------------
# The Limits section: its table and the "Bounds" block of qproxy.py
# ---------------------------------------------------------------------------

LIMITS = "## Limits"


def limits_table() -> list[list[str]]:
    """The rows of README's Limits table: (limit, default, how to change it)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{LIMITS}\n", 1)[1].split("\n## ", 1)[0]
    rows = [cells(line) for line in section.splitlines() if line.startswith("|")]
    assert rows[0] == ["limit", "default", "how to change it"]
    return rows[2:]


def bounds_block() -> dict[str, object]:
    """Every constant of qproxy.py's Bounds block, by name."""
    source = (ROOT / "qproxy.py").read_text(encoding="utf-8")
    parts = re.split(r"^# -{20,}$", source, flags=re.M)  # a section's heading, then its text, then the next
    block = parts[1 + [part.strip() for part in parts].index("# Bounds: every limit and timing of a half, in one place")]
    return {name: getattr(qproxy, name) for name in re.findall(r"^([A-Z][A-Z_]+) = ", block, re.M)}


def renderings(value: object) -> list[str]:
    """The ways README writes a value: 1024 or 1,024; 64 KiB; 5 s, or 50 ms below a second."""
    if isinstance(value, float):
        return [f"{value:g} s"] + ([f"{value * 1000:g} ms"] if value < 1 else [])
    found = [str(value), f"{value:,}"]
    for unit, size in (("KiB", 1024), ("MiB", 1024 * 1024)):
        if value % size == 0:
            found.append(f"{value // size} {unit}")
    return found


NUMBER_BEFORE, NUMBER_AFTER = r"(?<![\d.])(?<!\d,)", r"(?!,?\d)"  # no more of the number either side


def shows(cell: str, value: object) -> bool:
    """Whether cell gives value as a number of its own (not the 1 of 0.1 s or of 16)."""
    values = value if isinstance(value, tuple) else (value,)
    return all(
        any(re.search(NUMBER_BEFORE + re.escape(text) + NUMBER_AFTER, cell) for text in renderings(item))
        for item in values
    )


def test_the_limits_table_names_every_bound_and_no_other():
    named = [name for row in limits_table() for name in re.findall(r"`([A-Z][A-Z_]+)`", row[2])]
    assert sorted(named) == sorted(bounds_block())
    assert len(named) == len(set(named)), "a bound in two rows"


@pytest.mark.parametrize("name", sorted(bounds_block()))
def test_the_limits_table_gives_each_bound_its_value(name):
    value = bounds_block()[name]
    row = next(row for row in limits_table() if f"`{name}`" in row[2])
    assert shows(row[1], value), f"{name} = {value!r}, but README says {row[1]!r}"


CONFIGURED = [(table, key) for table in ("limits", "log_location") for key, field in qproxy.TABLES[table].fields.items()
              if field.kind in ("seconds", "mebibytes", "count")]


@pytest.mark.parametrize("table, key", CONFIGURED)
def test_the_limits_table_gives_each_configured_bound_its_default(table, key):
    field = qproxy.TABLES[table].fields[key]
    rows = [row for row in limits_table() if re.search(rf"`(\[{table}\] )?{key}`", row[2])]
    assert len(rows) == 1, f"[{table}] {key}: in {len(rows)} rows of the Limits table"
    if field.default:  # 0 turns the bound off, which each row says in words
        unit = {"seconds": " s", "mebibytes": " MiB"}.get(field.kind, "")
        assert re.search(NUMBER_BEFORE + f"{field.default:g}{unit}" + NUMBER_AFTER, rows[0][1]), (key, rows[0][1])


# ---------------------------------------------------------------------------
# SECURITY.md: the audit guide names functions that exist, and paths as long as it says
# ---------------------------------------------------------------------------


def definitions() -> dict[str, int]:
    """Every top-level function and class of qproxy.py, and every method as Class.method: its length in lines."""
    tree = ast.parse((ROOT / "qproxy.py").read_text(encoding="utf-8"))
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node.end_lineno - node.lineno + 1
            for member in node.body if isinstance(node, ast.ClassDef) else ():
                if isinstance(member, ast.FunctionDef):
                    found[f"{node.name}.{member.name}"] = member.end_lineno - member.lineno + 1
    return found


def audit_paths() -> dict[str, tuple[int, list[str]]]:
    """Each guarantee of SECURITY.md: (the length it states, the functions its bullets begin with)."""
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    paths = {}
    for part in text.split("\n### ")[1:]:
        heading, body = part.split("\n", 1)
        stated = re.search(r"\(([0-9]+) lines\):", body)
        assert stated, f"{heading}: says not how long its path is"
        names = [name for line in body.splitlines() if line.startswith("- ")
                 for name in re.findall(r"`([\w.]+)`", line.partition(": ")[0])]
        paths[heading] = (int(stated.group(1)), names)
    assert len(paths) == 5
    return paths


@pytest.mark.parametrize("heading", sorted(audit_paths()))
def test_the_audit_guide_names_only_what_exists_and_says_how_long_it_is(heading):
    stated, names = audit_paths()[heading]
    lengths = definitions()
    assert names and [name for name in names if name not in lengths] == []
    actual = sum(lengths[name] for name in names)
    assert abs(actual - stated) <= max(10, actual // 10), f"{heading}: {stated} lines stated, {actual} to read"

"""config_schema.py and qproxy.py's validator describe the same file.

(a) On documents near the valid space, the JSON Schema accepts exactly what
    qproxy.check_document accepts (the cross-field rules, which JSON Schema
    cannot express, are kept out of play by giving every port a fresh number).
(b) The TypedDicts have the keys, required-ness and types of qproxy.TABLES.
(c) ``python3 config_schema.py`` prints a valid draft-07 JSON Schema.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, FormatChecker, validators

import config_schema
import qproxy

# Below 3.11 NotRequired comes from typing_extensions, whose get_type_hints strips it as typing's does from 3.11.
if sys.version_info >= (3, 11):
    from typing import get_type_hints
else:
    from typing_extensions import get_type_hints
import test_config
from conftest import ROOT

SCHEMA = config_schema.json_schema()
VALIDATOR = Draft7Validator(SCHEMA, format_checker=FormatChecker())
CONTROL_PORT = qproxy.DEFAULT_CONTROL_PORT

# ---------------------------------------------------------------------------
# (a) Schema and validator agree
# ---------------------------------------------------------------------------

RANGES = {"tcp_port": qproxy.TCP_PORT_RANGE, "vsock_port": qproxy.VSOCK_PORT_RANGE, "count": qproxy.COUNT_RANGE,
          "mebibytes": qproxy.MEBIBYTES_RANGE}

# Values of the wrong type.  Not 80.0: JSON has one number type, so to a JSON
# Schema validator 80.0 *is* the integer 80, while qproxy rightly refuses TOML's
# float 80.0 as a port.  Not NaN either: a JSON Schema range cannot exclude it, so
# an editor takes TOML's nan for a number of seconds, and qproxy does not.  Both
# differences are documented in config_schema.py.
wrong_types = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False).filter(lambda x: not x.is_integer()),
    st.lists(st.integers(0, 9), max_size=2),
    st.dictionaries(st.sampled_from(["a", "port"]), st.integers(0, 9), max_size=2),
    st.dates(),
)

# Hostnames keep clear of two characters:
# - "\n": Python's jsonschema applies "pattern" with re.search, where "$" also
#   matches before a final newline, so "a.com\n" passes the pattern there though
#   not in the ECMAScript and Rust engines editors use (nor in qproxy, which uses
#   re.fullmatch).  The difference is Python's, not the schema's.
# - "%": qproxy accepts a scoped IPv6 literal ("fe80::1%eth0") because Python's
#   ipaddress does; JSON Schema's "ipv6" format (RFC 4291) has no scope.
TRICKY_HOSTNAMES = [
    "a", "localhost", "host.example.", "_srv._tcp.example.com", "-bad.com", "bad-.com", "a..b", ".a", "a.",
    "1.2.3", "1.2.3.4", "1.2.3.4.", "01.2.3.4", "256.1.1.1", "::1", "::", "::ffff:1.2.3.4", "1::2::3", ":::",
    "example.123", "example.123a", "123.example", "bücher.de", "a b", "", "a" * 63 + ".com", "a" * 64 + ".com",
    ".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61]) + ".",
    ".".join(["a" * 63] * 3 + ["b" * 62]), ".".join(["a" * 63] * 3 + ["b" * 61]) + "..",
]
hostnames = st.one_of(
    st.sampled_from(TRICKY_HOSTNAMES),
    st.from_regex(qproxy.HOSTNAME_PATTERN, fullmatch=True),
    st.ip_addresses().map(str),
    st.text(alphabet="ab1_-.:", max_size=20),
    st.text(max_size=8),
).filter(lambda text: "\n" not in text and "%" not in text)

# Rules of every shape qproxy takes, and bad ones that the schema's shape refuses too (what only
# check-config can refuse, such as host bits in a range, is left out, as config_schema.py says).
GOOD_RULES = ["api.example.com", "*.example.com:443", "*:443", "*", "bücher.example:80,443", "10.0.0.0/8:5432",
              "127.0.0.1", "2001:db8::/32", "[2001:db8::1]:443", "[::1]:1-1024,8080", "0.0.0.0/0:*"]
BAD_RULES = ["", "a b", "a.test:", "a.test:http", "api.*.com", "[::1", "[::1]443", "[a.test]:443", "::1:443:x",
             "a.test:1,,2"]
texts = st.one_of(st.text(max_size=8), st.sampled_from(["", "\0", "a\0", "host.log", "日志"]))
GOOD = {
    "hostname": st.one_of(
        st.from_regex(qproxy.HOSTNAME_PATTERN, fullmatch=True).filter(lambda text: not text.rstrip(".").isdigit()),
        st.ip_addresses().map(str),
    ).filter(lambda text: "\n" not in text),
    "ip_address": st.ip_addresses().map(str),
    "log_level": st.sampled_from(qproxy.LOG_LEVELS),
    "proxy_protocol": st.sampled_from(qproxy.PROXY_VERSIONS),
    "loopback_address": st.one_of(st.just("auto"), st.integers(0x7F000001, 0x7FFFFFFE).map(
        lambda number: str(ipaddress.IPv4Address(number)))),
    "text": st.text(min_size=1, max_size=8).filter(lambda text: "\0" not in text),
    "seconds": st.one_of(st.integers(*qproxy.SECONDS_RANGE), st.floats(*qproxy.SECONDS_RANGE)),
    "boolean": st.booleans(),
    "rules": st.lists(st.sampled_from(GOOD_RULES), max_size=3),
}
BAD = {
    "hostname": hostnames,  # about half of these are bad
    "ip_address": hostnames,  # most of these are bad
    "log_level": st.one_of(st.sampled_from(["INFO", "Warn", "warning", ""]), texts),
    "proxy_protocol": st.one_of(st.sampled_from(["V1", "v3", "on", ""]), texts),
    "loopback_address": st.one_of(st.sampled_from(["127.0.0.0", "127.255.255.255", "128.0.0.1", "127.1", "AUTO"]),
                                  st.ip_addresses().map(str), texts),
    "text": texts,
    "seconds": st.one_of(
        st.integers(max_value=qproxy.SECONDS_RANGE[0] - 1), st.integers(min_value=qproxy.SECONDS_RANGE[1] + 1),
        st.floats(allow_nan=False).filter(lambda x: not qproxy.SECONDS_RANGE[0] <= x <= qproxy.SECONDS_RANGE[1]),
        texts, st.booleans(),
    ),
    "boolean": st.one_of(st.integers(0, 1), texts),
    "rules": st.one_of(st.lists(st.sampled_from(BAD_RULES), min_size=1, max_size=2),
                       st.lists(st.integers(0, 9), min_size=1, max_size=2), texts),
}
UNKNOWN_KEYS = ["host_prot", "hostnames", "extra", "Log_Level", ""]


def rarely(draw) -> bool:
    """True about one time in twenty: most values, entries and tables are right, so whole documents often are."""
    return draw(st.integers(0, 19)) == 0


@st.composite
def field_value(draw, kind: str, used: dict) -> object:
    """Mostly a valid value; sometimes out of range or of the wrong type."""
    if rarely(draw):
        return draw(wrong_types | (st.just("1") if kind in RANGES else st.integers(0, 9)))
    if kind in RANGES:
        low, high = RANGES[kind]
        if rarely(draw):
            return draw(st.one_of(st.sampled_from([low - 1, high + 1, -1, 2**64]), st.integers(max_value=low - 1),
                                  st.integers(min_value=high + 1)))
        # A port never used before in this document, so no cross-field rule applies.
        port = draw(st.integers(low, high))
        while port in used[kind]:
            port = port % high + 1
        used[kind].add(port)
        return port
    return draw(BAD[kind] if rarely(draw) else GOOD[kind])


@st.composite
def entries(draw, table: qproxy.Table, used: dict) -> object:
    if rarely(draw):  # not a table at all
        return draw(st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2)))
    entry = {}
    for key, field in table.fields.items():
        if (rarely(draw) if field.required else draw(st.booleans())) is False:
            entry[key] = draw(field_value(field.kind, used))
    if rarely(draw):
        entry[draw(st.sampled_from(UNKNOWN_KEYS))] = 1
    return entry


@st.composite
def documents(draw) -> dict:
    used = {"tcp_port": set(), "vsock_port": {CONTROL_PORT}, "count": set(), "mebibytes": set()}
    document = {}
    for name, table in qproxy.TABLES.items():
        if draw(st.booleans()):
            continue
        wrong_shape = rarely(draw)
        if table.array:
            found = draw(st.lists(entries(table, used), max_size=3))
            document[name] = (found[0] if found else {}) if wrong_shape else found
        else:
            found = draw(entries(table, used))
            document[name] = [found] if wrong_shape else found
    if rarely(draw):
        document[draw(st.sampled_from(["inbound_connection", "log", "outbound"]))] = {}
    return document


@settings(max_examples=300, deadline=None)
@given(document=documents())
def test_schema_accepts_exactly_what_qproxy_accepts(document):
    _, problems = qproxy.check_document(document, CONTROL_PORT, {})
    assert not any("already used" in p or "loop" in p for p in problems), problems  # the generator's promise
    schema_errors = [error.message for error in VALIDATOR.iter_errors(document)]
    assert (schema_errors == []) == (problems == []), (problems, schema_errors)


# Egress rules of a right shape that only check-config refuses: a port beyond 65535, host bits, no address.
RULES_BEYOND_SHAPE = {"a.test:0", "a.test:65536", "a.test:443-80", "10.0.0.1/8", "10.0.0.0/33", "1.2.3"}


def comparable(value: object) -> bool:
    """Whether schema and validator are meant to agree on value (see wrong_types, hostnames and GOOD_RULES above)."""
    if isinstance(value, float) and (value.is_integer() or value != value):
        return False
    if isinstance(value, list) and RULES_BEYOND_SHAPE.intersection(item for item in value if isinstance(item, str)):
        return False
    return not (isinstance(value, str) and ("\n" in value or "%" in value))


@pytest.mark.parametrize("table, key, value", [
    case for case in test_config.cases(test_config.VALID) + test_config.cases(test_config.INVALID)
    if comparable(case.values[2])
])
def test_schema_agrees_on_every_pinned_value(table, key, value):
    """test_config's valid and invalid values for every field, boundaries included, judged by both."""
    document = test_config.with_value(table, key, value)
    assert VALIDATOR.is_valid(document) is (qproxy.check_document(document, CONTROL_PORT, {})[1] == [])


@pytest.mark.parametrize("text, valid", [
    ("a.com", True), ("1.2.3.4", True), ("::1", True), ("x" * 63 + ".example.", True),
    ("1.2.3", False), ("-bad.com", False), ("a..b", False), ("x" * 64 + ".com", False), ("bücher.de", False),
    ("", False), ("1.2.3.4.", False), ("1.2.3.04", False),
])
def test_hostname_schema(text, valid):
    """A few pinned cases, so a broken hostname schema fails here by name, not only in the property."""
    document = {"outbound_connections": [{"hostname": text, "vsock_port": 7777, "tcp_port": 443}]}
    assert VALIDATOR.is_valid(document) is valid
    assert (qproxy.check_document(document, CONTROL_PORT, {})[1] == []) is valid


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.ip_addresses(v=4).map(str), hostnames, st.text(alphabet="0123456789.", max_size=16)))
def test_ipv4_pattern_is_pythons_ipv4_address(text):
    """The pattern editors check in place of "format": "ipv4" accepts exactly what ipaddress does."""
    try:
        ipaddress.IPv4Address(text)
        is_address = True
    except ValueError:
        is_address = False
    assert (re.search(config_schema.IPV4_PATTERN, text) is not None) is is_address


def test_hostname_schema_checks_addresses_without_format_support():
    """Editors that treat "format" as a mere annotation still reject a name that is no address."""
    no_formats = Draft7Validator(SCHEMA)  # no format_checker: formats are annotations only
    assert not no_formats.is_valid({"outbound_connections": [{"hostname": "1.2.3", "vsock_port": 1, "tcp_port": 1}]})
    assert not no_formats.is_valid({"outbound_connections": [{"hostname": "a b", "vsock_port": 1, "tcp_port": 1}]})


@pytest.mark.parametrize("example", ["VENDOR_WALKTHROUGH", "VENDOR_REFERENCE"])
def test_vendor_examples_fit_the_schema(example):
    document = qproxy.tomllib.loads(getattr(test_config, example))
    assert list(VALIDATOR.iter_errors(document)) == []


# ---------------------------------------------------------------------------
# (b) The TypedDicts match the table
# ---------------------------------------------------------------------------

PYTHON_TYPES = {
    "tcp_port": int, "vsock_port": int, "count": int, "mebibytes": int, "seconds": float, "boolean": bool, "hostname": str,
    "ip_address": str, "loopback_address": str, "text": str, "rules": list[str],
}
CHOICE_KINDS = {"log_level": qproxy.LOG_LEVELS, "proxy_protocol": qproxy.PROXY_VERSIONS}


def typed_dicts() -> dict:
    """Table name -> the TypedDict of one of its entries, read off QproxyConfig."""
    found = {}
    for name, hint in get_type_hints(config_schema.QproxyConfig).items():
        if typing.get_origin(hint) is list:
            (hint,) = typing.get_args(hint)
            found[name] = ("array", hint)
        else:
            found[name] = ("table", hint)
    return found


def test_config_typed_dict_has_every_table_all_optional():
    assert list(get_type_hints(config_schema.QproxyConfig)) == list(qproxy.TABLES)
    assert config_schema.QproxyConfig.__required_keys__ == frozenset()
    assert {name: shape for name, (shape, _) in typed_dicts().items()} == {
        name: "array" if table.array else "table" for name, table in qproxy.TABLES.items()
    }


@pytest.mark.parametrize("name", list(qproxy.TABLES))
def test_entry_typed_dict_matches_table(name):
    table = qproxy.TABLES[name]
    _, typed = typed_dicts()[name]
    hints = get_type_hints(typed)
    assert list(hints) == list(table.fields)
    assert typed.__required_keys__ == {key for key, field in table.fields.items() if field.required}
    assert typed.__optional_keys__ == {key for key, field in table.fields.items() if not field.required}
    for key, field in table.fields.items():
        if field.kind in CHOICE_KINDS:
            assert typing.get_origin(hints[key]) is typing.Literal
            assert typing.get_args(hints[key]) == CHOICE_KINDS[field.kind]
        else:
            assert hints[key] == PYTHON_TYPES[field.kind], key  # == for list[str]: each is a new alias


# ---------------------------------------------------------------------------
# (c) The printed schema
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "config_schema.py")], capture_output=True, text=True,
                            cwd=tmp_path_factory.mktemp("schema"), timeout=30)
    assert (result.returncode, result.stderr) == (0, "")
    return json.loads(result.stdout)


def test_printed_schema_is_a_valid_draft_07_schema(printed):
    assert printed == SCHEMA
    assert printed["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert validators.validator_for(printed) is Draft7Validator
    Draft7Validator.check_schema(printed)


def test_printed_schema_is_derived_from_the_table(printed):
    assert printed["additionalProperties"] is False
    assert list(printed["properties"]) == list(qproxy.TABLES)
    for name, table in qproxy.TABLES.items():
        schema = printed["properties"][name]
        if table.array:
            assert schema["type"] == "array"
            schema = schema["items"]
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert list(schema["properties"]) == list(table.fields)
        assert schema.get("required", []) == [key for key, field in table.fields.items() if field.required]
        for key, field in table.fields.items():
            prop = schema["properties"][key]
            assert prop["description"].startswith(field.description)
            assert ("extension" in prop["description"]) == field.extension
            assert prop.get("default") == field.default
            if field.kind in RANGES:
                assert (prop["type"], prop["minimum"], prop["maximum"]) == ("integer", *RANGES[field.kind])
            elif field.kind == "seconds":
                assert (prop["type"], prop["minimum"], prop["maximum"]) == ("number", *qproxy.SECONDS_RANGE)
            elif field.kind == "boolean":
                assert prop["type"] == "boolean"
            elif field.kind == "rules":
                assert (prop["type"], prop["items"]["type"]) == ("array", "string")
            else:
                assert prop["type"] == "string"
            if field.kind in CHOICE_KINDS:
                assert prop["enum"] == list(CHOICE_KINDS[field.kind])


def patterns(node: object) -> typing.Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern":
                yield value
            else:
                yield from patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from patterns(value)


def test_patterns_suit_editor_regex_engines(printed):
    found = list(patterns(printed))
    assert qproxy.HOSTNAME_PATTERN in found and qproxy.NUMERIC_NAME_PATTERN in found
    for pattern in found:
        # No look-around or other (?...) group (Rust's regex has no look-around), no Python-only \A \Z,
        # and no \d or \w, whose meaning differs between engines.
        for construct in ("(?", r"\A", r"\Z", r"\d", r"\w"):
            assert construct not in pattern, (construct, pattern)

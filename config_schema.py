#!/usr/bin/env python3
"""The qproxy configuration file, described for tools: typed definitions and a JSON Schema.

qproxy.py's ``TABLES`` is the one source of truth for the TOML file: every
key with its type, range, default and description.  This module offers the
same format two other ways, and tests/test_schema.py proves all three agree:

* TypedDicts (``QproxyConfig`` and one per table) for code that writes or
  reads configuration documents and wants a type checker's help.  They are
  written out, because a type checker cannot read a table built at run time;
  the test compares them with ``TABLES`` key by key.
* A JSON Schema (draft-07) for TOML editors, *derived* from ``TABLES`` by
  ``json_schema()``, never edited by hand.  Generate it with

      python3 config_schema.py > qproxy.schema.json

  then point the editor at it.  Taplo (CLI and language server), and so
  Even Better TOML in VS Code, reads a directive on the config's first line:

      #:schema ./qproxy.schema.json

  or, without touching the file, an association in VS Code's settings.json:

      "evenBetterToml.schema.associations": {
          "config_qproxy\\.toml$": "file:///absolute/path/to/qproxy.schema.json"
      }

What the schema cannot say: the rules that span entries (vsock ports unique
and distinct from the control port, host ports unique, enclave-side listening
ports unique), the warning for an inbound entry that loops back out, and of an
egress rule more than its shape (a range without host bits, ports from 1 to
65535, a name's IDNA form).
``qproxy.py check-config FILE`` checks those.
An editor also sees TOML's float 80.0 as the JSON number 80, an integer, so it
misses ``port = 80.0``; qproxy does not.
"""

import json
import sys
from typing import Any, Literal

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:  # NotRequired is new in 3.11; typing_extensions' TypedDict understands it below
    from typing_extensions import NotRequired, TypedDict

import qproxy

# ---------------------------------------------------------------------------
# Typed definitions
# ---------------------------------------------------------------------------
# No `from __future__ import annotations` here: TypedDict must see NotRequired
# itself, not a string naming it, to count a key as optional.

LogLevel = Literal["off", "error", "warn", "info", "debug", "trace"]
ProxyProtocol = Literal["off", "v1", "v2"]


class InboundConnection(TypedDict):
    """One [[inbound_connections]] entry: a client of the parent VM reaches a service in the enclave."""

    host_port: int
    enclave_port: int
    vsock_port: int
    bind_address: NotRequired[str]  # extension; default: "0.0.0.0"
    proxy_protocol: NotRequired[ProxyProtocol]  # extension; default: "off"
    accept_proxy_protocol: NotRequired[bool]  # extension; default: false


class OutboundConnection(TypedDict):
    """One [[outbound_connections]] entry: code in the enclave reaches a service outside."""

    hostname: str
    vsock_port: int
    tcp_port: int
    enclave_port: NotRequired[int]  # extension; default: tcp_port
    enclave_address: NotRequired[str]  # extension; default: "127.0.0.1"; or "auto"


class Egress(TypedDict):
    """The [egress] table (extension): the enclave's HTTP CONNECT and SOCKS5 proxy, and its rules."""

    proxy_port: int
    vsock_port: int
    allow: NotRequired[list[str]]  # default: [], nothing allowed
    deny: NotRequired[list[str]]  # default: []


class LogLocation(TypedDict, total=False):
    """The [log_location] table; every key has a default."""

    host_log: str
    enclave_log: str
    log_level: LogLevel
    host_log_dir: str
    enclave_log_dir: str
    forward_enclave_log: bool  # extension
    log_max_size: int  # extension; MiB
    log_backups: int  # extension


class Limits(TypedDict, total=False):
    """The [limits] table (extension); every key has a default."""

    connections_per_listener: int
    connect_timeout: float  # seconds; an int is a float to a type checker
    idle_timeout: float
    queue_timeout: float
    buffer_memory: int  # MiB


class QproxyConfig(TypedDict, total=False):
    """A whole configuration file, as tomllib.load returns it."""

    inbound_connections: list[InboundConnection]
    outbound_connections: list[OutboundConnection]
    egress: Egress
    log_location: LogLocation
    limits: Limits


# ---------------------------------------------------------------------------
# JSON Schema, derived from qproxy.TABLES
# ---------------------------------------------------------------------------
# Draft-07 rather than 2020-12: Taplo's validator and older editor plugins
# implement draft-07 (and draft-04) fully, while 2020-12 support is partial.
# The schema uses only keywords that mean the same in drafts 4 to 2020-12.
DRAFT = "http://json-schema.org/draft-07/schema#"

# Formats are only annotations to many validators, so each address branch also
# carries a pattern an editor does check.  No look-around anywhere: editors use
# ECMAScript or Rust regex engines.
OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"^({OCTET}\.){{3}}{OCTET}$"
IPV6_SHAPE = r"^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*$"  # the characters of an IPv6 address; "format" does the rest

IP_ADDRESS_SCHEMA = {"anyOf": [{"pattern": IPV4_PATTERN, "format": "ipv4"}, {"pattern": IPV6_SHAPE, "format": "ipv6"}]}
HOSTNAME_SCHEMA = {
    "anyOf": [
        {
            "pattern": qproxy.HOSTNAME_PATTERN,
            "not": {"pattern": qproxy.NUMERIC_NAME_PATTERN},
            # At most HOSTNAME_MAX_LENGTH characters, not counting one final dot.
            "anyOf": [
                {"maxLength": qproxy.HOSTNAME_MAX_LENGTH},
                {"maxLength": qproxy.HOSTNAME_MAX_LENGTH + 1, "pattern": r"\.$"},
            ],
        },
        *IP_ADDRESS_SCHEMA["anyOf"],
    ],
}


# An egress rule's shape: a name pattern (any characters but space, ':', '[', ']' and '/'), an
# IPv4 address or range, or an IPv6 one (in brackets when ports follow), then ports or not.
# check-config checks the rest: ranges without host bits, ports within 1-65535, IDNA.
PORTS_SHAPE = r"(:(\*|[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*))?"
RULE_SHAPE = (r"^((\*\.)?[^\s:\[\]/*]+|\*|[0-9.]+(/[0-9]{1,2})?|\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/[0-9]{1,3})?\])"
              + PORTS_SHAPE + r"$|^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/[0-9]{1,3})?$")

# An address of 127.0.0.0/8 but its first and last, or auto.
LOOPBACK_SCHEMA = {
    "anyOf": [{"pattern": rf"^127\.({OCTET}\.){{2}}{OCTET}$", "not": {"pattern": r"^127\.(0\.0\.0|255\.255\.255)$"}},
              {"const": "auto"}],
}

# What JSON Schema needs of a kind beyond its type, range and choices (qproxy.KINDS): the shape of its values.
STRING_SCHEMAS: dict[str, dict[str, Any]] = {
    "hostname": HOSTNAME_SCHEMA,
    "ip_address": IP_ADDRESS_SCHEMA,
    "loopback_address": LOOPBACK_SCHEMA,
    "text": {"minLength": 1, "pattern": r"^[^\x00]*$"},
    "rules": {"items": {"type": "string", "pattern": RULE_SHAPE}},
}


def field_schema(field: qproxy.Field) -> dict[str, Any]:
    """The JSON Schema of one key, from its kind, range and default."""
    kind = qproxy.KINDS[field.kind]
    schema: dict[str, Any] = {"type": kind.type, **STRING_SCHEMAS.get(field.kind, {})}
    if kind.range:
        schema["minimum"], schema["maximum"] = kind.range
    if kind.choices:
        schema["enum"] = list(kind.choices)
    description = field.description
    if field.extension:
        description += " (qproxy extension: not in the vendor's format)"
    schema["description"] = description
    if field.default is not None:
        schema["default"] = field.default
    return schema


def table_schema(table: qproxy.Table) -> dict[str, Any]:
    """The JSON Schema of one table, or of one entry of an array of tables."""
    required = [key for key, field in table.fields.items() if field.required]
    schema = {
        "type": "object",
        "description": table.description,
        "properties": {key: field_schema(field) for key, field in table.fields.items()},
        "additionalProperties": False,
        # Taplo offers these keys when it completes a new table.
        "x-taplo": {"initKeys": required},
    }
    if required:
        schema["required"] = required
    return schema


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the whole file."""
    properties = {}
    for name, table in qproxy.TABLES.items():
        if table.array:
            properties[name] = {"type": "array", "description": table.description, "items": table_schema(table)}
        else:
            properties[name] = table_schema(table)
    return {
        "$schema": DRAFT,
        "title": "qproxy configuration",
        "description": "The configuration file of qproxy, the TCP-over-vsock proxy for enclaves."
        " Rules that span entries (unique ports) are checked by `qproxy check-config FILE`.",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }


if __name__ == "__main__":
    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")

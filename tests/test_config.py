"""The configuration file's validator, through its real entry points.

Most tests read a file with ``qproxy.load_config`` or run ``qproxy.main(["check-config", ...])``
in this process (fast); a few run ``qproxy.py check-config`` as a subprocess to pin the exit codes
and output a user sees.  Nothing here needs vsock.
"""

from __future__ import annotations

import datetime
import errno
import math
import re
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qproxy
from conftest import run_qproxy

# ---------------------------------------------------------------------------
# Helpers: a tiny TOML writer, and the three ways to run the validator
# ---------------------------------------------------------------------------

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: object) -> str:
    """A value as TOML; tables nested in values are written inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(document: dict) -> str:
    """A document as TOML: [table] and [[array of tables]] sections where the shape allows."""
    lines = []
    sections = []
    for key, value in document.items():
        if isinstance(value, dict):
            sections.append((f"[{toml_key(key)}]", [value]))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            sections.append((f"[[{toml_key(key)}]]", value))
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for header, tables in sections:
        for table in tables:
            lines += ["", header] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write(tmp_path, text: str | bytes, name: str = "config.toml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def problems_in(path: str, control_port: int = qproxy.DEFAULT_CONTROL_PORT) -> list[str]:
    """The validator's complaints about a file, [] when it loads."""
    try:
        qproxy.load_config(path, control_port)
    except qproxy.ConfigError as error:
        return error.problems
    return []


def problems(tmp_path, document: dict | str, control_port: int = qproxy.DEFAULT_CONTROL_PORT) -> list[str]:
    text = document if isinstance(document, str) else to_toml(document)
    path = write(tmp_path, text)
    # Every complaint names the file, first thing on its line, and the line in it where it can.
    found = problems_in(path, control_port)
    assert all(re.match(re.escape(path) + r"(:[0-9]+)?: ", line) for line in found), found
    return [re.sub(re.escape(path) + r"(:[0-9]+)?: ", "", line, count=1) for line in found]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("QPROXY_CONTROL_PORT", "QPROXY_PARENT_CID", "QPROXY_LISTEN_CID", "TOKIO_WORKER_THREADS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def check_config(capsys, clean_env):
    """Run `qproxy check-config ARGS` in this process: (exit code, stdout lines, stderr lines)."""

    def run(*args: str) -> tuple[int, list[str], list[str]]:
        capsys.readouterr()
        code = qproxy.main(["check-config", *args])
        out, err = capsys.readouterr()
        return code, out.splitlines(), err.splitlines()

    return run


# ---------------------------------------------------------------------------
# The vendor's documented configurations, verbatim (trailing blanks and comments included)
# ---------------------------------------------------------------------------

VENDOR_WALKTHROUGH = """\
[[inbound_connections]]
host_port = 5050 
enclave_port = 5050 
vsock_port = 9995  

[[inbound_connections]]
host_port = 5443 
enclave_port = 5443 
vsock_port = 9994  

[log_location]
host_log = "host.log" # qproxy host log name, e.g./var/log/qproxy/host.log
enclave_log = "enclave.log" # qproxy enclave log name, e.g./var/log/qproxy/enclave.log
log_level = "info" # qproxy logger level, e.g. "off", "info", "warn", "error", "debug", "trace"
host_log_dir = "/var/log/qproxy" # qproxy host log dir, and its default value is "/var/log/qproxy"
enclave_log_dir = "/var/log/qproxy" # qproxy enclave log dir, and its default value is "/var/log/qproxy"
"""

VENDOR_REFERENCE = """\
[[outbound_connections]]
hostname = "api.myservice.com" 
vsock_port = 7777 
tcp_port = 443  

[[outbound_connections]]
hostname = "another.api.com" 
vsock_port = 7778 
tcp_port = 5555  

[[inbound_connections]]
host_port = 80  
enclave_port = 80  
vsock_port = 9000   

[[inbound_connections]]
host_port = 443 
enclave_port = 443 
vsock_port = 9001  

[log_location]
host_log = "host.log"  
enclave_log = "enclave.log"  
log_level = "info"  
host_log_dir = "/var/log/qproxy"  
enclave_log_dir = "/var/log/qproxy"
"""


def test_vendor_walkthrough_config_is_valid(tmp_path, clean_env):
    result = run_qproxy("check-config", write(tmp_path, VENDOR_WALKTHROUGH))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[1:] == [
        "host: listen tcp 0.0.0.0:5050 -> vsock <enclave CID>:9995",
        "host: listen tcp 0.0.0.0:5443 -> vsock <enclave CID>:9994",
        "host: listen vsock :6666 for the enclave half's control connection",
        "enclave: listen vsock :9995 -> tcp 127.0.0.1:5050",
        "enclave: listen vsock :9994 -> tcp 127.0.0.1:5443",
        "enclave: dial vsock 3:6666 for the control connection",
        "log: host /var/log/qproxy/host.log, enclave /var/log/qproxy/enclave.log, level info, rotated at 8 MiB,"
        " 2 kept",
        "limits: no connection limit per listener, connect timeout 10 s, idle timeout none, queue timeout 30 s,"
        " buffer memory 32 MiB",
    ]


def test_vendor_reference_config_is_valid(tmp_path):
    config = qproxy.load_config(write(tmp_path, VENDOR_REFERENCE), qproxy.DEFAULT_CONTROL_PORT)
    assert [o.hostname for o in config.outbound] == ["api.myservice.com", "another.api.com"]
    assert [(o.vsock_port, o.tcp_port, o.enclave_port) for o in config.outbound] == [(7777, 443, 443), (7778, 5555, 5555)]
    assert [(i.host_port, i.enclave_port, i.vsock_port) for i in config.inbound] == [(80, 80, 9000), (443, 443, 9001)]
    assert config.log_location == qproxy.LogLocation(
        "host.log", "enclave.log", "info", "/var/log/qproxy", "/var/log/qproxy", True, 8, 2
    )


def test_check_config_describes_every_route(check_config, tmp_path):
    # The vendor's reference file, with the inbound services moved off the ports where outbound listens.
    text = VENDOR_REFERENCE.replace("enclave_port = 80 ", "enclave_port = 8080")
    text = text.replace("enclave_port = 443", "enclave_port = 8443")
    code, out, err = check_config(write(tmp_path, text), "--parent-cid", "7", "--control-port", "7000")
    assert (code, err) == (0, [])
    assert out == [
        f"{tmp_path / 'config.toml'}: valid",
        "host: listen tcp 0.0.0.0:80 -> vsock <enclave CID>:9000",
        "host: listen tcp 0.0.0.0:443 -> vsock <enclave CID>:9001",
        "host: listen vsock :7777 -> tcp api.myservice.com:443",
        "host: listen vsock :7778 -> tcp another.api.com:5555",
        "host: listen vsock :7000 for the enclave half's control connection",
        "enclave: listen vsock :9000 -> tcp 127.0.0.1:8080",
        "enclave: listen vsock :9001 -> tcp 127.0.0.1:8443",
        "enclave: listen tcp 127.0.0.1:443 -> vsock 7:7777",
        "enclave: listen tcp 127.0.0.1:5555 -> vsock 7:7778",
        "enclave: dial vsock 7:7000 for the control connection",
        "enclave: --hosts-file maps api.myservice.com to 127.0.0.1",
        "enclave: --hosts-file maps another.api.com to 127.0.0.1",
        "log: host /var/log/qproxy/host.log, enclave /var/log/qproxy/enclave.log, level info, rotated at 8 MiB,"
        " 2 kept",
        "limits: no connection limit per listener, connect timeout 10 s, idle timeout none, queue timeout 30 s,"
        " buffer memory 32 MiB",
    ]


def test_check_config_shows_the_limits(check_config, tmp_path):
    path = write(tmp_path, "[limits]\nconnections_per_listener = 64\nconnect_timeout = 0\nidle_timeout = 2.5\n")
    code, out, err = check_config(path)
    assert (code, err) == (0, [])
    assert out[-1] == ("limits: 64 connections per listener, connect timeout the system's, idle timeout 2.5 s,"
                       " queue timeout 30 s, buffer memory 32 MiB")


def test_check_config_outbound_enclave_port_extension(check_config, tmp_path):
    path = write(tmp_path, to_toml({"outbound_connections": [
        {"hostname": "a.example", "vsock_port": 8001, "tcp_port": 443, "enclave_port": 8443},
        {"hostname": "b.example", "vsock_port": 8002, "tcp_port": 443},
    ]}))
    code, out, err = check_config("--config", path)
    assert (code, err) == (0, [])
    assert "enclave: listen tcp 127.0.0.1:8443 -> vsock 3:8001" in out
    assert "enclave: listen tcp 127.0.0.1:443 -> vsock 3:8002" in out
    assert "host: listen vsock :8001 -> tcp a.example:443" in out


def test_check_config_empty_file_and_no_log_table(check_config, tmp_path):
    code, out, err = check_config(write(tmp_path, ""))
    assert (code, err) == (0, [])
    assert "no connections configured: the halves will only talk to each other" in out
    assert out[-2] == "log: both halves to stderr"


# ---------------------------------------------------------------------------
# Every field: valid and invalid values
# ---------------------------------------------------------------------------

# The kind of each key, as the vendor documents it (ports u16, vsock ports u32, the rest strings).
KINDS = {
    "inbound_connections": {
        "host_port": "tcp_port", "enclave_port": "tcp_port", "vsock_port": "vsock_port", "bind_address": "ip_address",
        "proxy_protocol": "proxy_protocol", "accept_proxy_protocol": "boolean",
    },
    "outbound_connections": {
        "hostname": "hostname", "vsock_port": "vsock_port", "tcp_port": "tcp_port", "enclave_port": "tcp_port",
        "enclave_address": "loopback_address",
    },
    "egress": {"proxy_port": "tcp_port", "vsock_port": "vsock_port", "allow": "rules", "deny": "rules"},
    "log_location": {
        "host_log": "text", "enclave_log": "text", "log_level": "log_level",
        "host_log_dir": "text", "enclave_log_dir": "text", "forward_enclave_log": "boolean",
        "log_max_size": "mebibytes", "log_backups": "count",
    },
    "limits": {"connections_per_listener": "count", "connect_timeout": "seconds", "idle_timeout": "seconds",
               "queue_timeout": "seconds", "buffer_memory": "mebibytes"},
}

LONGEST_NAME = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
assert len(LONGEST_NAME) == 253

VALID = {
    "tcp_port": [1, 80, 65535],
    "vsock_port": [1, 65536, 0xFFFFFFFE],
    "count": [0, 1, 512, 1_000_000],
    "mebibytes": [1, 32, 65536],
    "seconds": [0, 0.5, 10, 2.5, 86400, 86400.0],
    "boolean": [True, False],
    "hostname": [
        "api.myservice.com", "localhost", "a", "host.example.", "_service._tcp.example.com", "xn--bcher-kva.example",
        "a-b.c-d", "123abc.example", "example.123a", "a" * 63 + ".com", LONGEST_NAME, LONGEST_NAME + ".",
        "1.2.3.4", "0.0.0.0", "255.255.255.255", "::1", "2001:db8::1", "FE80::1", "::ffff:192.0.2.1",
    ],
    "ip_address": ["0.0.0.0", "127.0.0.1", "10.1.2.3", "::", "::1", "2001:db8::1"],
    "log_level": list(qproxy.LOG_LEVELS),
    "proxy_protocol": ["off", "v1", "v2"],
    "loopback_address": ["127.0.0.1", "127.0.0.2", "127.1.2.3", "127.255.255.254", "127.0.0.255", "auto"],
    "text": ["x", "日志.log", "/var/log/with space", "a" * 300],
    "rules": [
        [], ["api.example.com"], ["*.example.com:443"], ["*:443"], ["*"], ["API.Example.COM.:80,443"],
        ["bücher.example:443"], ["10.0.0.0/8:5432"], ["127.0.0.1"], ["2001:db8::/32"], ["[2001:db8::1]:443"],
        ["[::1]:1-1024,8080"], ["0.0.0.0/0:*"], ["::ffff:10.0.0.0/104"], ["a.test:1-65535", "b.test:22"],
    ],
}

INVALID = {
    "tcp_port": [0, -1, 65536, 2**70, True, False, 80.0, 80.5, "80", [80], {"port": 80}],
    "vsock_port": [0, -1, 0xFFFFFFFF, 2**32, 2**64, True, 9000.0, "9000", [9000]],
    "count": [-1, 1_000_001, 2**64, True, 10.0, "10", [10]],
    "mebibytes": [0, -1, 65537, 2**64, True, 32.0, "32", [32]],
    "boolean": [0, 1, "true", "yes", [True]],
    "seconds": [-1, -0.5, 86401, 86400.5, float("inf"), float("-inf"), float("nan"), True, "10", "10s", [10]],
    "hostname": [
        "", "1.2.3", "1.2.3.4.", "256.1.1.1", "01.2.3.4", "10.0.0.1.5", "-bad.com", "bad-.com", "a..b", ".a",
        "a.-b.com", "a" * 64 + ".com", LONGEST_NAME + "c", "a" * 300, "bücher.de", "exa mple.com", "a.com\n",
        "a\0b", "[::1]", "::1:::", "host:80", "1.2.3.4:80", "a/b", "*.example.com", 8080, True, ["a.com"],
        "0x7f000001", "127.0.0.0x1", "0x7f.0x0.0x0.0x1", "0X7F.0.0.1", "0x", "017700000001", "0x7f.1.",
    ],
    "ip_address": ["", "localhost", "eth0", "1.2.3", "256.1.1.1", "[::1]", "1.2.3.4:80", "fe80::1%eth0", 0, True],
    "log_level": ["INFO", "Warn", "WARN", "warning", "none", "", " info", 3, True, ["info"]],
    "proxy_protocol": ["V1", "v3", "1", "on", "true", "", 1, 2, True, ["v1"]],
    "loopback_address": ["127.0.0.0", "127.255.255.255", "128.0.0.1", "10.0.0.1", "0.0.0.0", "::1", "127.1",
                         "127.000.0.1", "localhost", "AUTO", "", " 127.0.0.1", 2130706433, True],
    "text": ["", "a\0b", 1, True, 1.5, ["host.log"], {"name": "host.log"}],
    "rules": [
        [""], ["a.test:"], ["a.test:0"], ["a.test:65536"], ["a.test:443-80"], ["a.test:http"], ["a.test:1,,2"],
        ["*.*.example.com"], ["api.*.com"], ["*example.com"], ["a b"], ["10.0.0.1/8"], ["10.0.0.0/33"], ["1.2.3"],
        ["[::1"], ["[::1]443"], ["[a.test]:443"], ["::1:443:x"], ["fe80::1%eth0"], ["a.test", 443], [["a.test"]],
        "a.test", 443, True, {"allow": "a.test"},
    ],
}

LEVEL_CHOICES = ", ".join(qproxy.LOG_LEVELS)
EXPECTED = {
    "tcp_port": "expected an integer from 1 to 65535, found ",
    "vsock_port": "expected an integer from 1 to 4294967294, found ",
    "count": "expected an integer from 0 to 1000000, found ",
    "mebibytes": "expected an integer from 1 to 65536, found ",
    "seconds": "expected a number of seconds from 0 to 86400, found ",
    "boolean": "expected true or false, found ",
    "hostname": "expected a ",  # a DNS name or an IP address / a string
    "ip_address": "expected a",  # an IPv4 or IPv6 address / a string
    "log_level": "expected ",  # one of ... / a string
    "proxy_protocol": "expected ",  # one of ... / a string
    "loopback_address": "expected a",  # an IPv4 address in 127.0.0.0/8 ... / a string
    "text": "expected a ",
    "rules": "",  # an array of egress rules / rule N (...): what is wrong with it
}


def valid_document() -> dict:
    """Two entries of each array, so a broken value lands in entry 2."""
    return {
        "inbound_connections": [
            {"host_port": 5050, "enclave_port": 5050, "vsock_port": 9995},
            {"host_port": 5443, "enclave_port": 5443, "vsock_port": 9994},
        ],
        "outbound_connections": [
            {"hostname": "api.myservice.com", "vsock_port": 7777, "tcp_port": 443},
            {"hostname": "another.api.com", "vsock_port": 7778, "tcp_port": 5555, "enclave_port": 5556},
        ],
        "log_location": {
            "host_log": "host.log", "enclave_log": "enclave.log", "log_level": "info",
            "host_log_dir": "/var/log/qproxy", "enclave_log_dir": "/var/log/qproxy",
        },
        "limits": {"connections_per_listener": 100, "connect_timeout": 3, "idle_timeout": 600},
        "egress": {"proxy_port": 3128, "vsock_port": 8000, "allow": ["*.example.com:443"], "deny": ["10.0.0.0/8"]},
    }


def with_value(table: str, key: str, value: object) -> dict:
    document = valid_document()
    if qproxy.TABLES[table].array:
        document[table][1][key] = value
    else:
        document[table][key] = value
    return document


def where(table: str) -> str:
    return f"[[{table}]] entry 2" if qproxy.TABLES[table].array else f"[{table}]"


def loaded(config: qproxy.Config, table: str, key: str) -> object:
    entry = {"inbound_connections": config.inbound[1:2], "outbound_connections": config.outbound[1:2],
             "log_location": (config.log_location,), "limits": (config.limits,), "egress": (config.egress,)}[table][0]
    return getattr(entry, key)


def cases(values: dict) -> list:
    return [
        pytest.param(table, key, value, id=f"{table}.{key}={value!r:.40}")
        for table, keys in KINDS.items() for key, kind in keys.items() for value in values[kind]
    ]


def test_kinds_cover_every_field():
    assert {t: list(fields) for t, fields in KINDS.items()} == {t: list(table.fields) for t, table in qproxy.TABLES.items()}


def test_valid_base_document(tmp_path):
    assert problems(tmp_path, valid_document()) == []


@pytest.mark.parametrize("table, key, value", cases(VALID))
def test_valid_value_is_accepted_and_kept(tmp_path, table, key, value):
    path = write(tmp_path, to_toml(with_value(table, key, value)))
    assert problems_in(path) == []
    assert loaded(qproxy.load_config(path, qproxy.DEFAULT_CONTROL_PORT), table, key) == value


@pytest.mark.parametrize("table, key, value", cases(INVALID))
def test_invalid_value_is_one_error_naming_entry_and_field(tmp_path, table, key, value):
    found = problems(tmp_path, with_value(table, key, value))
    assert len(found) == 1, found
    prefix = f"{where(table)}: {key}: {EXPECTED[KINDS[table][key]]}"
    assert found[0].startswith(prefix), found
    if KINDS[table][key] == "rules" and isinstance(value, list):  # the rule, and what is wrong with it
        assert re.match(r"rule [0-9]+ (\(.*\): .|is )", found[0][len(prefix):]), found
    else:
        assert ", found " in found[0]
    if isinstance(value, int) and not isinstance(value, bool):
        assert found[0].endswith(f"found {value}")


def test_error_shows_what_was_found(tmp_path):
    found = problems(tmp_path, with_value("outbound_connections", "hostname", "1.2.3"))
    assert found == ["[[outbound_connections]] entry 2: hostname: expected a DNS name or an IP address, found '1.2.3'"]
    found = problems(tmp_path, with_value("log_location", "log_level", "INFO"))
    assert found == [f"[log_location]: log_level: expected one of {LEVEL_CHOICES}, found 'INFO'"]
    found = problems(tmp_path, with_value("inbound_connections", "host_port", True))
    assert found == ["[[inbound_connections]] entry 2: host_port: expected an integer from 1 to 65535, found true"]


@pytest.mark.parametrize("table, key", [
    (table, key) for table, fields in qproxy.TABLES.items() for key, field in fields.fields.items() if field.required
])
def test_missing_required_key(tmp_path, table, key):
    document = valid_document()
    del (document[table][1] if qproxy.TABLES[table].array else document[table])[key]
    assert problems(tmp_path, document) == [f"{where(table)}: {key}: missing (required)"]


def test_required_keys_are_the_vendors():
    required = {t: [k for k, f in table.fields.items() if f.required] for t, table in qproxy.TABLES.items()}
    assert required == {
        "inbound_connections": ["host_port", "enclave_port", "vsock_port"],
        "outbound_connections": ["hostname", "vsock_port", "tcp_port"],
        "egress": ["proxy_port", "vsock_port"],  # an extension: its table is optional, these two are not
        "log_location": [],
        "limits": [],
    }


def test_log_location_defaults(tmp_path):
    config = qproxy.load_config(write(tmp_path, "[log_location]\n"), qproxy.DEFAULT_CONTROL_PORT)
    assert config.log_location == qproxy.LogLocation(
        host_log="host.log", enclave_log="enclave.log", log_level="warn",
        host_log_dir="/var/log/qproxy", enclave_log_dir="/var/log/qproxy", forward_enclave_log=True,
        log_max_size=8, log_backups=2,
    )
    assert qproxy.load_config(write(tmp_path, ""), qproxy.DEFAULT_CONTROL_PORT).log_location is None


def test_limits_defaults(tmp_path):
    expected = qproxy.Limits(connections_per_listener=0, connect_timeout=10, idle_timeout=0, queue_timeout=30,
                             buffer_memory=32)
    assert qproxy.load_config(write(tmp_path, "[limits]\n"), qproxy.DEFAULT_CONTROL_PORT).limits == expected
    assert qproxy.load_config(write(tmp_path, ""), qproxy.DEFAULT_CONTROL_PORT).limits == expected


def test_outbound_enclave_port_defaults_to_tcp_port(tmp_path):
    text = to_toml({"outbound_connections": [{"hostname": "a.example", "vsock_port": 8001, "tcp_port": 8443}]})
    (entry,) = qproxy.load_config(write(tmp_path, text), qproxy.DEFAULT_CONTROL_PORT).outbound
    assert (entry.tcp_port, entry.enclave_port) == (8443, 8443)


# ---------------------------------------------------------------------------
# Unknown keys and wrong shapes
# ---------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_known_one(tmp_path):
    document = valid_document()
    document["inbound_connection"] = document.pop("inbound_connections")
    assert problems(tmp_path, document) == ["unknown key 'inbound_connection'; did you mean 'inbound_connections'?"]


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path):
    assert problems(tmp_path, "zzz = 1\n") == ["unknown key 'zzz'"]


@pytest.mark.parametrize("table, typo, meant", [
    ("inbound_connections", "host_prot", "host_port"),
    ("inbound_connections", "vsockport", "vsock_port"),
    ("outbound_connections", "host_name", "hostname"),
    ("outbound_connections", "enclave-port", "enclave_port"),
    ("log_location", "loglevel", "log_level"),
    ("log_location", "host_logdir", "host_log_dir"),
])
def test_unknown_key_in_an_entry_suggests_the_known_one(tmp_path, table, typo, meant):
    document = valid_document()
    entry = document[table][1] if qproxy.TABLES[table].array else document[table]
    entry[typo] = 1
    assert problems(tmp_path, document) == [f"{where(table)}: unknown key {typo!r}; did you mean {meant!r}?"]


def test_array_of_tables_written_as_a_table(tmp_path):
    text = "[inbound_connections]\nhost_port = 1\nenclave_port = 2\nvsock_port = 3\n"
    assert problems(tmp_path, text) == [
        "inbound_connections: expected an array of tables ([[inbound_connections]]), found a table"
    ]


@pytest.mark.parametrize("text, found", [
    ("outbound_connections = 5\n", "5"),
    ("outbound_connections = 'x'\n", "'x'"),
])
def test_array_of_tables_given_a_scalar(tmp_path, text, found):
    assert problems(tmp_path, text) == [
        f"outbound_connections: expected an array of tables ([[outbound_connections]]), found {found}"
    ]


def test_array_of_tables_holding_non_tables(tmp_path):
    assert problems(tmp_path, "inbound_connections = [1, 'a']\n") == [
        "[[inbound_connections]] entry 1: expected a table, found 1",
        "[[inbound_connections]] entry 2: expected a table, found 'a'",
    ]


def test_empty_array_of_tables_is_no_entries(tmp_path):
    config = qproxy.load_config(write(tmp_path, "inbound_connections = []\n"), qproxy.DEFAULT_CONTROL_PORT)
    assert config.inbound == ()


@pytest.mark.parametrize("text", ["[[log_location]]\nlog_level = 'info'\n", "log_location = ['info']\n"])
def test_table_written_as_an_array(tmp_path, text):
    assert problems(tmp_path, text) == ["[log_location]: expected a table, found an array"]


def test_table_given_a_scalar(tmp_path):
    assert problems(tmp_path, "log_location = 'stderr'\n") == ["[log_location]: expected a table, found 'stderr'"]


# ---------------------------------------------------------------------------
# Rules that span entries
# ---------------------------------------------------------------------------


def inbound(host: int, enclave: int, vsock: int) -> dict:
    return {"host_port": host, "enclave_port": enclave, "vsock_port": vsock}


def outbound(vsock: int, tcp: int, enclave: int | None = None, hostname: str = "up.example") -> dict:
    entry = {"hostname": hostname, "vsock_port": vsock, "tcp_port": tcp}
    if enclave is not None:
        entry["enclave_port"] = enclave
    return entry


def test_vsock_ports_unique_among_inbound(tmp_path):
    found = problems(tmp_path, {"inbound_connections": [inbound(1, 1, 9000), inbound(2, 2, 9000)]})
    assert found == [
        "[[inbound_connections]] entry 2: vsock_port: 9000 is already used by the vsock_port of"
        " [[inbound_connections]] entry 1 (line 2); every vsock port must be unique"
    ]


def test_vsock_ports_unique_among_outbound(tmp_path):
    found = problems(tmp_path, {"outbound_connections": [outbound(9000, 1), outbound(9001, 2), outbound(9000, 3)]})
    assert len(found) == 1
    assert found[0].startswith("[[outbound_connections]] entry 3: vsock_port: 9000 is already used by"
                               " the vsock_port of [[outbound_connections]] entry 1 (line 2);")


def test_vsock_ports_unique_across_inbound_and_outbound(tmp_path):
    found = problems(tmp_path, {"inbound_connections": [inbound(1, 1, 9000)], "outbound_connections": [outbound(9000, 2)]})
    assert len(found) == 1
    assert found[0].startswith("[[outbound_connections]] entry 1: vsock_port: 9000 is already used by"
                               " the vsock_port of [[inbound_connections]] entry 1 (line 2);")


@pytest.mark.parametrize("table", ["inbound_connections", "outbound_connections"])
def test_vsock_port_may_not_be_the_control_port(tmp_path, table):
    entry = inbound(1, 1, 6666) if table == "inbound_connections" else outbound(6666, 1)
    found = problems(tmp_path, {table: [entry]})
    assert found == [f"[[{table}]] entry 1: vsock_port: 6666 is already used by the control port;"
                     " every vsock port must be unique"]


def test_control_port_is_the_one_given(tmp_path):
    document = {"inbound_connections": [inbound(1, 1, 6666), inbound(2, 2, 7000)]}
    found = problems(tmp_path, document, control_port=7000)
    assert found == ["[[inbound_connections]] entry 2: vsock_port: 7000 is already used by the control port;"
                     " every vsock port must be unique"]


def test_check_config_takes_the_control_port_from_option_and_environment(check_config, clean_env, tmp_path):
    path = write(tmp_path, to_toml({"inbound_connections": [inbound(1, 1, 7000)]}))
    assert check_config(path)[0] == 0
    code, out, err = check_config(path, "--control-port", "7000")
    assert (code, out) == (2, [])
    assert err == [f"qproxy: error: {path}:2: [[inbound_connections]] entry 1: vsock_port: 7000 is already used by"
                   " the control port; every vsock port must be unique"]
    clean_env.setenv("QPROXY_CONTROL_PORT", "7000")
    assert check_config(path)[0] == 2


def test_host_ports_unique(tmp_path):
    found = problems(tmp_path, {"inbound_connections": [inbound(80, 1, 9000), inbound(80, 2, 9001)]})
    assert found == ["[[inbound_connections]] entry 2: host_port: 80 is already used by the host_port of"
                     " [[inbound_connections]] entry 1 (line 2); every host_port must be unique"]


def test_outbound_enclave_ports_unique(tmp_path):
    found = problems(tmp_path, {"outbound_connections": [outbound(9000, 443, 8443), outbound(9001, 444, 8443)]})
    assert len(found) == 1
    assert found[0].startswith("[[outbound_connections]] entry 2: enclave_port: 8443 is already used by"
                               " the enclave_port of [[outbound_connections]] entry 1 (line 2);")


def test_outbound_enclave_port_defaults_count_as_listening_ports(tmp_path):
    found = problems(tmp_path, {"outbound_connections": [outbound(9000, 443), outbound(9001, 443)]})
    assert len(found) == 1
    assert found[0].startswith("[[outbound_connections]] entry 2: enclave_port: 443 is already used by"
                               " the enclave_port of [[outbound_connections]] entry 1 (line 2);")
    # ...and the extension is the way out: same upstream port, another local one.
    assert problems(tmp_path, {"outbound_connections": [outbound(9000, 443), outbound(9001, 443, 8443)]}) == []
    found = problems(tmp_path, {"outbound_connections": [outbound(9000, 443), outbound(9001, 8443, 443)]})
    assert len(found) == 1 and found[0].startswith("[[outbound_connections]] entry 2: enclave_port: 443 ")


def at(entry: dict, address: str) -> dict:
    return dict(entry, enclave_address=address)


def test_two_upstreams_on_one_port_each_keep_it_at_an_address_of_their_own(tmp_path):
    assert problems(tmp_path, {"outbound_connections": [
        at(outbound(9000, 443, hostname="a.example"), "auto"), at(outbound(9001, 443, hostname="b.example"), "auto"),
        at(outbound(9002, 443, hostname="c.example"), "127.0.0.2"), outbound(9003, 443, hostname="d.example"),
    ]}) == []


def test_one_address_and_port_twice_is_an_error_naming_both_entries(tmp_path):
    found = problems(tmp_path, {"outbound_connections": [
        at(outbound(9000, 443, hostname="a.example"), "127.0.0.2"), at(outbound(9001, 443, hostname="b.example"),
                                                                        "127.0.0.2")]})
    assert found == ["[[outbound_connections]] entry 2: enclave_port: 443 is already used by the enclave_port of"
                     " [[outbound_connections]] entry 1 (line 2); both listen on 127.0.0.2; every address and port"
                     " the enclave half listens on must be unique"]


def test_an_auto_address_that_meets_another_says_to_set_one_by_hand(tmp_path):
    chosen = qproxy.loopback_for("a.example")
    found = problems(tmp_path, {"outbound_connections": [
        at(outbound(9000, 443, hostname="a.example"), "auto"), at(outbound(9001, 443, hostname="b.example"), chosen)]})
    assert found == ["[[outbound_connections]] entry 2: enclave_port: 443 is already used by the enclave_port of"
                     f" [[outbound_connections]] entry 1 (line 2); both listen on {chosen}; auto chose it: set one"
                     " enclave_address by hand; every address and port the enclave half listens on must be unique"]


def test_the_egress_proxy_port_shares_127_0_0_1_only(tmp_path):
    egress = {"proxy_port": 3128, "vsock_port": 8000}
    assert problems(tmp_path, {"outbound_connections": [at(outbound(9000, 3128), "auto")], "egress": egress}) == []
    found = problems(tmp_path, {"outbound_connections": [at(outbound(9000, 3128), "127.0.0.1")], "egress": egress})
    assert len(found) == 1 and found[0].startswith("[egress]: proxy_port: 3128 is already used by the enclave_port")


def test_one_hostname_at_two_addresses_is_an_error(tmp_path):
    found = problems(tmp_path, {"outbound_connections": [
        at(outbound(9000, 443, hostname="a.example"), "auto"), at(outbound(9001, 80, hostname="A.example."),
                                                                   "127.0.0.2")]})
    assert found == [f"[[outbound_connections]] entry 2: enclave_address: 127.0.0.2, but [[outbound_connections]]"
                     f" entry 1 (line 2) has A.example. at {qproxy.loopback_for('a.example')}: a name resolves to one"
                     " address"]
    # auto gives every entry of a name the same address, whatever its case or final dot
    assert problems(tmp_path, {"outbound_connections": [
        at(outbound(9000, 443, hostname="a.example"), "auto"), at(outbound(9001, 80, hostname="A.example."), "auto"),
        at(outbound(9002, 443, hostname="10.0.0.1"), "127.0.0.2"), at(outbound(9003, 80, hostname="10.0.0.1"),
                                                                       "127.0.0.3")]}) == []


def test_auto_addresses_are_the_names_own_within_127_1_1_1_and_127_254_254_254():
    """A function of the name alone (CRC-32), fixed here: an app that kept an address across a
    restart must be led to the same entry."""
    assert qproxy.loopback_for("payments.example.com") == "127.51.17.233"
    assert qproxy.loopback_for("PAYMENTS.example.com.") == "127.51.17.233"
    addresses = {qproxy.loopback_for(f"service-{number}.example") for number in range(5000)}
    assert len(addresses) >= 4990  # a clash is rare, and then an error of the file (see above)
    for address in addresses:
        octets = [int(octet) for octet in address.split(".")]
        assert octets[0] == 127 and all(1 <= octet <= 254 for octet in octets[1:]), address


def test_an_inbound_loop_needs_the_outbound_entry_on_127_0_0_1(tmp_path, check_config):
    path = write(tmp_path, to_toml({"inbound_connections": [inbound(80, 5000, 9000)],
                                    "outbound_connections": [at(outbound(9001, 5000), "auto")]}))
    code, lines, errors = check_config(path)
    assert (code, errors) == (0, [])
    assert not any(line.startswith("warning:") for line in lines)


@pytest.mark.parametrize("out", [outbound(9001, 5000), outbound(9001, 443, 5000)], ids=["default", "explicit"])
def test_inbound_to_an_outbound_listening_port_is_a_warning(tmp_path, check_config, out):
    """A loop, but only a warning: the vendor's own reference file has one, and must be accepted."""
    path = write(tmp_path, to_toml({"inbound_connections": [inbound(80, 5000, 9000)], "outbound_connections": [out]}))
    code, lines, errors = check_config(path)
    assert (code, errors) == (0, [])
    assert lines[1] == (f"warning: {path}:2: [[inbound_connections]] entry 1: enclave_port: 5000 is where the"
                        " enclave half listens for [[outbound_connections]] entry 1 (line 7); inbound traffic to it"
                        " goes back out of the enclave, and the service cannot listen there too")
    assert sum(line.startswith("warning:") for line in lines) == 1


def test_a_warning_names_the_file_it_comes_from(tmp_path, check_config):
    """With --enclave-config the loop is the enclave file's, which is the one a warning names."""
    host = write(tmp_path, to_toml({"inbound_connections": [inbound(80, 5000, 9000)]}), "host.toml")
    enclave = write(tmp_path, "# the enclave's own copy\n\n" + to_toml(
        {"inbound_connections": [inbound(80, 5000, 9000)], "outbound_connections": [outbound(9001, 5000)]}
    ), "enclave.toml")
    code, lines, errors = check_config(host, "--enclave-config", enclave)
    assert [line.partition(" [[")[0] for line in lines if line.startswith("warning:")] == [f"warning: {enclave}:4:"]


def test_check_config_lists_the_problems_of_both_files(tmp_path, check_config):
    host = write(tmp_path, to_toml({"inbound_connections": [inbound(0, 5000, 9000)]}), "host.toml")
    enclave = write(tmp_path, to_toml({"inbound_connections": [inbound(80, 0, 9000)]}), "enclave.toml")
    code, lines, errors = check_config(host, "--enclave-config", enclave)
    assert (code, lines) == (2, [])
    assert [error.partition(" [[")[0] for error in errors] == [f"qproxy: error: {host}:2:",
                                                                f"qproxy: error: {enclave}:2:"]


def test_same_number_in_different_port_spaces_is_fine(tmp_path):
    # One number as host port, vsock port and enclave port; an outbound tcp_port
    # reused as an inbound host_port; two inbound entries to one enclave service.
    document = {
        "inbound_connections": [inbound(5000, 5000, 5000), inbound(5001, 5000, 5001), inbound(443, 80, 9000)],
        "outbound_connections": [outbound(9001, 5001, 6000), outbound(9002, 443, 6001)],
    }
    assert problems(tmp_path, document) == []


def test_a_bad_value_does_not_cascade_but_the_entrys_good_ones_are_still_checked(tmp_path):
    """Every problem at once: an entry with a typo still has its other ports compared with the rest."""
    document = {"inbound_connections": [inbound(80, 1, 9000), {"host_port": 80, "enclave_port": 2, "vsock_port": 0},
                                        {"host_port": 81, "enclave_port": 3, "vsock_port": 9000, "bind_adress": "x"}]}
    assert problems(tmp_path, document) == [
        "[[inbound_connections]] entry 2: vsock_port: expected an integer from 1 to 4294967294, found 0",
        "[[inbound_connections]] entry 2: host_port: 80 is already used by the host_port of [[inbound_connections]]"
        " entry 1 (line 2); every host_port must be unique",
        "[[inbound_connections]] entry 3: unknown key 'bind_adress'; did you mean 'bind_address'?",
        "[[inbound_connections]] entry 3: vsock_port: 9000 is already used by the vsock_port of"
        " [[inbound_connections]] entry 1 (line 2); every vsock port must be unique",
    ]


# ---------------------------------------------------------------------------
# Every problem at once
# ---------------------------------------------------------------------------


def test_all_errors_are_reported_in_file_order_with_their_lines(tmp_path):
    # Tables out of the order the validator checks them in, and one entry between two of another table.
    path = write(tmp_path, """\
# problems, each at the line of the entry it names
[log_location]
log_level = "INFO"
host_log = ""

[[inbound_connections]]
host_port = 0
enclave_port = "80"
vsock_port = 9000

[[outbound_connections]]
hostname = "1.2.3"
vsock_port = 9002
tcp_port = 443

[extra]

[[inbound_connections]]
host_port = 81
enclave_port = 81
vsock_prot = 9001
""")
    assert problems_in(path) == [
        f"{path}:2: [log_location]: host_log: expected a non-empty string without NUL, found ''",
        f"{path}:2: [log_location]: log_level: expected one of {LEVEL_CHOICES}, found 'INFO'",
        f"{path}:6: [[inbound_connections]] entry 1: host_port: expected an integer from 1 to 65535, found 0",
        f"{path}:6: [[inbound_connections]] entry 1: enclave_port: expected an integer from 1 to 65535, found '80'",
        f"{path}:11: [[outbound_connections]] entry 1: hostname: expected a DNS name or an IP address, found '1.2.3'",
        f"{path}:16: unknown key 'extra'",
        f"{path}:18: [[inbound_connections]] entry 2: unknown key 'vsock_prot'; did you mean 'vsock_port'?",
        f"{path}:18: [[inbound_connections]] entry 2: vsock_port: missing (required)",
    ]


def test_cross_field_errors_name_both_entries_by_line(tmp_path):
    path = write(tmp_path, to_toml({"inbound_connections": [inbound(80, 1, 9000), inbound(81, 2, 9000)]}))
    assert problems_in(path) == [
        f"{path}:7: [[inbound_connections]] entry 2: vsock_port: 9000 is already used by the vsock_port of"
        " [[inbound_connections]] entry 1 (line 2); every vsock port must be unique"
    ]


@pytest.mark.parametrize("text, expected_line", [
    # Top-level keys: the line of the key; dotted keys: the first line that names the table.
    ("\n\nlog_location = 5\n", 3),
    ("\nlimits.idle_timeout = -1\nlimits.connect_timeout = 1\n", 2),
    # A quoted header, and one with spaces, are headers all the same.
    ("# x\n[[ 'inbound_connections' ]]\nhost_port = 0\nenclave_port = 1\nvsock_port = 1\n", 2),
    ('[ "limits" ]  # the limits\nidle_timeout = -1\n', 1),
])
def test_a_problem_names_the_line_however_the_table_is_written(tmp_path, text, expected_line):
    path = write(tmp_path, text)
    found = problems_in(path)
    assert found and all(line.startswith(f"{path}:{expected_line}: ") for line in found), found


def test_lines_that_only_look_like_headers_never_give_a_wrong_line(tmp_path):
    """A header inside a multi-line string is not where an entry begins: the entry is at its real header's
    line.  An inline array's entries have the line of its key; a header tomllib reads but this file
    cannot (an escape in its name) gives no line rather than a wrong one."""
    path = write(tmp_path, '[log_location]\nhost_log = """\n[[inbound_connections]]\n"""\n'
                           '[[inbound_connections]]\nhost_port = 0\nenclave_port = 1\nvsock_port = 1\n')
    assert [line.partition(" ")[0] for line in problems_in(path)] == [f"{path}:5:"]
    path = write(tmp_path, '[[inbound_connections]]\nhost_port = 1\nenclave_port = 1\nvsock_port = 10\n'
                           'note = """\n[[inbound_connections]]\n"""\n'
                           '[["inbound_\\u0063onnections"]]\nhost_port = 2\nenclave_port = 2\nvsock_port = 10\n')
    assert [line.partition(" ")[0] for line in problems_in(path)] == [f"{path}:", f"{path}:1:"]  # entry 2; note
    path = write(tmp_path, "outbound_connections = [\n  {hostname = 'a..b', vsock_port = 1, tcp_port = 1},\n"
                           "  {hostname = 'c..d', vsock_port = 2, tcp_port = 2},\n]\n")
    assert [line.partition(" ")[0] for line in problems_in(path)] == [f"{path}:1:", f"{path}:1:"]


def test_all_cross_field_errors_are_reported(tmp_path):
    document = {
        "inbound_connections": [inbound(80, 1, 9000), inbound(80, 2, 9000), inbound(81, 443, 6666)],
        "outbound_connections": [outbound(9001, 443), outbound(9001, 443)],
    }
    found = problems(tmp_path, document)
    assert [line.split(" is ")[0] for line in found] == [
        "[[inbound_connections]] entry 2: vsock_port: 9000",
        "[[inbound_connections]] entry 2: host_port: 80",
        "[[inbound_connections]] entry 3: vsock_port: 6666",
        "[[outbound_connections]] entry 2: vsock_port: 9001",
        "[[outbound_connections]] entry 2: enclave_port: 443",
    ]


# ---------------------------------------------------------------------------
# Files that are not configurations at all, and exit codes
# ---------------------------------------------------------------------------


def test_invalid_config_exit_2_one_line_per_problem(tmp_path):
    path = write(tmp_path, "[[inbound_connections]]\nhost_port = 0\nenclave_port = 1\nvsock_port = 0xFFFFFFFF\n")
    result = run_qproxy("check-config", path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"qproxy: error: {path}:1: [[inbound_connections]] entry 1: host_port: expected an integer from 1 to 65535,"
        " found 0",
        f"qproxy: error: {path}:1: [[inbound_connections]] entry 1: vsock_port: expected an integer from 1 to"
        " 4294967294, found 4294967295",
    ]


@pytest.mark.parametrize("text, expected", [
    # A header whose name has an escape is one this file cannot read; a line in it that only looks like
    # a header, and ends a string, must not pass for where the table begins.
    ('["lim\\u0069ts"]\nidle_timeout = -1\nnote = """\n[[x]]"""\n', [":", ":"]),
    # Keys named like the markers that find lines: neither taken for one nor a crash.
    ('# c\n"qproxy key at line 1" = 1\n', [":"]),
    ('"qproxy key at line 99" = 1\n', [":"]),
    ('\n\n[limits]\n"qproxy header at line 1" = 1\n', [":3:"]),
    ("[[inbound_connections]]\nhost_port = 1\nenclave_port = 1\nvsock_port = 9\n\n[[inbound_connections]]\n"
     '"qproxy header at line 1" = true\nhost_port = 2\nenclave_port = 2\nvsock_port = 9\n', [":6:", ":6:"]),
])
def test_lines_are_never_wrong_whatever_the_file_holds(tmp_path, text, expected):
    path = write(tmp_path, text)
    found = problems_in(path)
    assert [line[len(path):].partition(" ")[0] for line in found] == expected, found


def test_a_file_nested_just_deep_enough_is_a_config_error_not_a_crash(tmp_path, check_config):
    """Finding lines parses the file once more, a level deeper: where that no longer fits, no lines."""
    for depth in range(300, 400, 5):
        path = write(tmp_path, "a = " + "{b = " * depth + "1" + "}" * depth + "\n")
        code, out, err = check_config(path)
        assert code == 2 and all(line.startswith(f"qproxy: error: {path}") for line in err), (depth, err)


@pytest.mark.parametrize("content, message", [
    ("[[inbound_connections]\n", ":1: invalid TOML: "),
    ("a = 1\na = 2\n", ":2: invalid TOML: "),
    ("[log_location]\n[log_location]\n", ":2: invalid TOML: "),  # a table twice
    ("[limits]\nidle_timeout = 1\n[limits]\nidle_timeout = 2\n", ":3: invalid TOML: "),
    ("[[inbound_connections]]\nhost_port = 1\nhost_port = 2\n", ":3: invalid TOML: "),  # a key twice in an entry
    ("x = " + "[" * 5000 + "]" * 5000, ": invalid TOML: nested too deeply"),  # deeper than the parser's recursion
    (b"log_level = '\xff'\n", ": invalid TOML: the file is not UTF-8"),
    ("\ufeff[limits]\n", ":1: invalid TOML: Invalid statement (column 1); the file begins with a byte-order mark"),
])
def test_not_toml_exit_2(tmp_path, content, message):
    """tomllib's complaint at its line, as every problem is, and without its traceback's last words."""
    path = write(tmp_path, content)
    result = run_qproxy("check-config", path)
    assert (result.returncode, result.stdout) == (2, "")
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"qproxy: error: {path}{message}"), line


def test_missing_file_exit_2(tmp_path, check_config):
    path = str(tmp_path / "absent.toml")
    code, out, err = check_config(path)
    assert (code, out) == (2, [])
    assert err == [f"qproxy: error: {path}: cannot read: No such file or directory"]


def test_check_config_needs_a_file(check_config):
    code, out, err = check_config()
    assert (code, out) == (2, [])
    assert len(err) == 1 and err[0].startswith("qproxy: error: ")


# ---------------------------------------------------------------------------
# Property: whatever the file holds, check-config exits 0 or 2 with error lines, never a traceback
# ---------------------------------------------------------------------------

KNOWN_NAMES = sorted({*qproxy.TABLES, *(key for table in qproxy.TABLES.values() for key in table.fields)})
keys = st.one_of(
    st.sampled_from(KNOWN_NAMES), st.sampled_from(["host_prot", "Hostname", "", " ", "a.b"]), st.text(max_size=12)
)
scalars = st.one_of(
    st.integers(),
    st.sampled_from([0, 1, -1, 65535, 65536, 0xFFFFFFFE, 0xFFFFFFFF, 6666, 2**63, -(2**63), 2**200]),
    st.floats(),
    st.booleans(),
    st.text(max_size=20),
    st.text(min_size=250, max_size=400),
    st.sampled_from(["", "warn", "INFO", "::1", "1.2.3", "bücher.de", "a\0b", "x" * 64 + ".com", "fe80::1%eth0"]),
    st.dates(), st.datetimes(), st.times(),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12,
)


def entry_strategy(fields: dict) -> st.SearchStrategy:
    known = st.fixed_dictionaries({}, optional={key: values for key in fields})
    return st.builds(lambda a, b: {**a, **b}, known, st.dictionaries(keys, values, max_size=2))


table_shapes = {
    name: (st.lists(entry_strategy(table.fields), max_size=4) if table.array else entry_strategy(table.fields)) | values
    for name, table in qproxy.TABLES.items()
}
documents = st.builds(
    lambda a, b: {**b, **a},
    st.fixed_dictionaries({}, optional=table_shapes),
    st.dictionaries(keys, values, max_size=3),
)
toml_like_text = st.text(alphabet="[]{}=\"'.,#\n\t -_+:0123456789abcdefghijklmnopqrstuvwxyz_é\\", max_size=200)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("property") / "config.toml"


def assert_exit_0_or_errors(code: int, out: list[str], err: list[str], path: str) -> None:
    assert code in (0, 2), (code, err)
    if code == 0:
        assert err == [] and out[0] == f"{path}: valid"
    else:
        assert out == [] and err, (code, err)
        for line in err:
            assert re.match(re.escape(f"qproxy: error: {path}") + "(:[0-9]+)?: ", line), line
    assert not any("Traceback" in line or "internal error" in line for line in err)


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(document=documents)
def test_any_toml_document_loads_or_fails_cleanly(check_config, scratch, document):
    scratch.write_text(to_toml(document), encoding="utf-8")
    assert_exit_0_or_errors(*check_config(str(scratch)), str(scratch))


@PROPERTY
@given(content=st.one_of(st.binary(max_size=200), toml_like_text.map(str.encode), st.text(max_size=200).map(str.encode)))
def test_any_bytes_load_or_fail_cleanly(check_config, scratch, content):
    scratch.write_bytes(content)
    assert_exit_0_or_errors(*check_config(str(scratch)), str(scratch))


# ---------------------------------------------------------------------------
# [egress]: what check-config says of it, and what its rules match
# ---------------------------------------------------------------------------

EGRESS = '[egress]\nproxy_port = 3128\nvsock_port = 8000\nallow = ["*.example.com:443", "10.0.0.0/8:5432"]\n'


def test_check_config_shows_the_egress_routes_and_each_halfs_rules(check_config, tmp_path):
    host = write(tmp_path, EGRESS + 'deny = ["bad.example.com"]\n', "host.toml")
    enclave = write(tmp_path, EGRESS, "enclave.toml")
    code, out, err = check_config(str(host), "--enclave-config", str(enclave), "--parent-cid", "7")
    assert (code, err) == (0, [])
    assert "host: listen vsock :8000 -> tcp any destination the rules allow" in out
    assert "enclave: listen tcp 127.0.0.1:3128 -> vsock 7:8000" in out
    assert "host: egress rules: allow *.example.com:443, 10.0.0.0/8:5432; deny bad.example.com" in out
    assert "enclave: egress rules: allow *.example.com:443, 10.0.0.0/8:5432; deny nothing" in out
    assert out[-1].endswith("valid, and matches " + str(host))  # the rules are each half's own: no mismatch


def test_the_egress_proxy_port_and_vsock_port_share_the_ports_of_entries(tmp_path):
    text = EGRESS.replace("8000", "7777").replace("3128", "443") + outbound_entry("api.test", 7777, 443)
    found = problems(tmp_path, text)
    assert [problem.split(": ", 2)[1] for problem in found] == ["vsock_port", "proxy_port"], found


def outbound_entry(hostname: str, vsock_port: int, tcp_port: int) -> str:
    return f'[[outbound_connections]]\nhostname = "{hostname}"\nvsock_port = {vsock_port}\ntcp_port = {tcp_port}\n'


def policy(allow=(), deny=()) -> qproxy.Policy:
    return qproxy.Policy.of(qproxy.Egress(3128, 8000, list(allow), list(deny)), "host")


@pytest.mark.parametrize("rule, host, port, matches", [
    ("*.example.com", "a.example.com", 443, True),
    ("*.example.com", "a.b.example.com", 443, True),
    ("*.example.com", "example.com", 443, False),  # not the apex
    ("*.example.com", "example.com.evil.net", 443, False),
    ("*.example.com", "badexample.com", 443, False),
    ("api.example.com", "api.example.com", 443, True),
    ("API.Example.COM.", "api.example.com", 443, True),  # compared in one case, without the final dot
    ("bücher.example", "xn--bcher-kva.example", 443, True),  # in IDNA form
    ("api.example.com:443", "api.example.com", 80, False),
    ("api.example.com:80,8000-8999", "api.example.com", 8500, True),
    ("*", "anything.test", 1, True),
    ("*", "93.184.216.34", 443, False),  # a name pattern matches no address
    ("93.184.216.0/24", "93.184.216.34", 443, True),
    ("93.184.216.0/24", "93.184.217.34", 443, False),
    ("0.0.0.0/0:443", "93.184.216.34", 443, True),
    ("[2001:db8::/32]:443", "2001:db8::1", 443, True),
    ("::ffff:93.184.216.0/120", "93.184.216.34", 443, True),  # an IPv4-mapped range is the IPv4 one
])
def test_what_a_rule_matches(rule, host, port, matches):
    assert policy(allow=[rule]).judge(qproxy.destination(host), port)[0] is matches


def test_a_deny_rule_wins_over_every_allow_rule():
    rules = policy(allow=["*.example.com:443", "*"], deny=["secret.example.com"])
    assert rules.judge("secret.example.com", 443) == (False, "the host half's deny rule secret.example.com")
    assert rules.judge("open.example.com", 443) == (True, "the host half's rule *.example.com:443")
    assert policy().judge("open.example.com", 443) == (False, "no allow rule of the host half's matches")


@pytest.mark.parametrize("address, allow, refused", [
    ("93.184.216.34", ["*"], False),  # a public address a name resolved to
    ("127.0.0.1", ["*"], True),  # loopback, private, link-local (the metadata service), mapped ones too
    ("10.1.2.3", ["*", "0.0.0.0/0"], True),  # a rule wider than the special ranges opens none of them
    ("169.254.169.254", ["*"], True),
    ("::ffff:127.0.0.1", ["*"], True),
    ("fe80::1", ["*", "::/0"], True),
    ("64:ff9b::a00:1", ["*"], True),  # NAT64, which leads to 10.0.0.1
    ("10.1.2.3", ["*", "10.0.0.0/8"], False),  # an address rule within them opens them
    ("10.1.2.3", ["*", "10.0.0.0/8:22"], True),  # for its ports only
    ("127.0.0.1", ["*", "127.0.0.1"], False),
])
def test_an_address_in_a_special_range_needs_an_address_rule_within_them(address, allow, refused):
    assert bool(policy(allow=allow).refuses(qproxy.canonical_address(address), 443)) is refused


def test_a_deny_rule_refuses_an_address_a_name_resolved_to():
    rules = policy(allow=["*"], deny=["93.184.216.0/24"])
    assert "deny rule 93.184.216.0/24" in rules.refuses(qproxy.canonical_address("93.184.216.34"), 443)


@pytest.mark.parametrize("text", ["0x7f.1", "0x7f000001", "0x5d.0xb8.0xd8.0x22", "0177.0.0.1", "127.1", "1.2.3.0x4"])
def test_an_ipv4_address_in_a_form_of_its_own_is_no_name(text):
    # glibc's resolver reads them as addresses, which only address rules may judge: "*" would let them by.
    with pytest.raises(ValueError, match="IPv4 address in a form of its own|not a DNS name"):
        qproxy.destination(text)


@pytest.mark.parametrize("text", ["faß.example", "STRAẞE.example", "παράδειγμας.example", "a\u200db.example"])
def test_a_name_that_idna_2003_and_2008_read_apart_must_be_written_in_its_xn_form(text):
    with pytest.raises(ValueError, match="xn-- form"):
        qproxy.destination(text)
    assert qproxy.destination("xn--fa-hia.example") == "xn--fa-hia.example"


@pytest.mark.parametrize("host, given, answered", [
    ("secret", "secret.corp.example", "secret.corp.example"),  # a search domain, an alias, a CNAME
    ("api.example.com", "API.Example.COM.", "api.example.com"),
    ("api.example.com", "", "api.example.com"),  # no name given back: the name asked for
    ("10.1.2.3", "10.1.2.3", "10.1.2.3"),
    ("odd", "not a name", "not a name"),  # no rule matches it, but it is still what is judged
])
def test_the_name_the_resolver_answered_for_is_the_canonical_name_it_gives(host, given, answered):
    addresses = [(socket.AF_INET, socket.SOCK_STREAM, 6, given, ("10.1.2.3", 443))]
    assert qproxy.answered_name(host, addresses) == answered


class NoPeeking(socket.socket):
    """A socket of a kernel that cannot peek at it, as vsock before Linux 5.5."""

    def recv(self, size, flags=0):
        if flags & socket.MSG_PEEK:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return super().recv(size, flags)


@pytest.mark.parametrize("peeks", [True, False])
def test_a_line_is_read_through_its_end_and_no_further_with_or_without_peeking(peeks):
    left, right = socket.socketpair()
    reader = right if peeks else NoPeeking(fileno=right.detach())
    with left, reader:
        left.sendall(b"qproxy-egress 1 connected 1.2.3.4 443\nfirst bytes of the tunnel")
        deadline = time.monotonic() + 5
        assert qproxy.read_through(reader, b"\n", 512, deadline) == b"qproxy-egress 1 connected 1.2.3.4 443\n"
        assert reader.recv(100) == b"first bytes of the tunnel"
        left.sendall(b"x" * 600)
        with pytest.raises(ValueError):
            qproxy.read_through(reader, b"\n", 512, deadline)
        left.close()
        with pytest.raises(EOFError):
            qproxy.read_through(reader, b"\n", 10_000, deadline)


def test_an_inbound_entry_to_the_egress_proxy_port_is_an_error(tmp_path):
    # The proxy asks no credentials, as only the enclave reaches it: an inbound entry would open it to all.
    text = EGRESS + "[[inbound_connections]]\nhost_port = 3128\nenclave_port = 3128\nvsock_port = 9000\n"
    assert problems(tmp_path, text) == [
        "[[inbound_connections]] entry 1: enclave_port: 3128 is the [egress] proxy_port: clients of the parent"
        " would use the enclave's egress proxy"]


def test_every_bad_rule_of_a_list_is_named(tmp_path):
    text = EGRESS.replace('"10.0.0.0/8:5432"]', '"bad one", "ok.example", "*:0", 7]')
    (problem,) = problems(tmp_path, text)
    assert re.fullmatch(r"\[egress\]: allow: rule 2 \('bad one'\): .*; rule 4 \('\*:0'\): .*; rule 5 is 7, not a string",
                        problem), problem


@pytest.mark.parametrize("address, rule, matches", [
    ("64:ff9b::93.184.216.34", "93.184.216.34", True),  # NAT64 leads to the IPv4 address it carries
    ("64:ff9b::169.254.169.254", "169.254.0.0/16", True),
    ("::ffff:10.0.0.5", "10.0.0.0/8", True),
    ("10.0.0.5", "[64:ff9b::a00:0/104]", True),  # and a rule written for them is the IPv4 one
    ("2606:4700::93.184.216.34", "93.184.216.34", False),  # other prefixes carry nothing
])
def test_an_ipv6_address_that_carries_an_ipv4_one_is_judged_as_that(address, rule, matches):
    assert bool(policy(deny=[rule]).refuses(qproxy.canonical_address(address), 443)) is matches


def test_check_config_says_what_each_half_does_with_proxy_headers_and_names(check_config, tmp_path):
    path = write(tmp_path, to_toml({
        "inbound_connections": [dict(inbound(80, 8080, 9000), proxy_protocol="v2", accept_proxy_protocol=True),
                                dict(inbound(81, 8081, 9001), proxy_protocol="v1"), inbound(82, 8082, 9002)],
        "outbound_connections": [at(outbound(9003, 443, hostname="pay.example"), "auto")],
    }))
    code, lines, errors = check_config(path, "--parent-cid", "7")
    assert (code, errors) == (0, [])
    chosen = qproxy.loopback_for("pay.example")
    assert lines[1].startswith(f"warning: {path}:2: [[inbound_connections]] entry 1: accept_proxy_protocol: true on"
                               " bind_address 0.0.0.0")
    assert lines[2:5] == [
        "host: listen tcp 0.0.0.0:80 -> vsock <enclave CID>:9000; a load balancer's PROXY header (v1 or v2) read"
        " first; the client's address sent ahead in a PROXY v2 header",
        "host: listen tcp 0.0.0.0:81 -> vsock <enclave CID>:9001; the client's address sent ahead in a PROXY v1 header",
        "host: listen tcp 0.0.0.0:82 -> vsock <enclave CID>:9002",
    ]
    assert f"enclave: listen tcp {chosen}:443 -> vsock 7:9003" in lines
    assert f"enclave: --hosts-file maps pay.example to {chosen}" in lines

"""The command line: every subcommand and option, the environment variables, exit codes, help.

Pure argument handling runs in-process through qproxy.main() with the step that
would start a half replaced by a sentinel (so a check that went missing makes
the test fail instead of hang).  Anything that needs a real process (signals,
ports, log files, the two halves meeting) runs the halves as subprocesses over
emulated vsock, through conftest's Proxy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import qproxy
from conftest import DEADLINE, QPROXY, ROOT, Half, free_port, inbound, outbound, recv_all, wait_for

CLI_VARIABLES = ("QPROXY_LISTEN_CID", "QPROXY_PARENT_CID", "QPROXY_CONTROL_PORT", "TOKIO_WORKER_THREADS", "RUST_LOG")


# ---------------------------------------------------------------------------
# In-process helpers
# ---------------------------------------------------------------------------


class WouldStart(BaseException):
    """Raised where a half would begin serving: the command line was accepted.

    A BaseException, so that main()'s catch-all for internal errors lets it through.
    """


@pytest.fixture(autouse=True)
def clean_cli(monkeypatch, tmp_path):
    """No stray variables from the outer environment, emulated vsock only, logger restored."""
    for name in CLI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QPROXY_VSOCK_EMULATION", str(tmp_path / "inprocess-vsock"))
    saved = (list(qproxy.log.handlers), qproxy.log.level, qproxy.log.propagate)
    yield
    qproxy.log.handlers[:], qproxy.log.level, qproxy.log.propagate = saved


@pytest.fixture
def no_start(monkeypatch):
    def would_start(*args, **kwargs):
        raise WouldStart()

    monkeypatch.setattr(qproxy, "Half", would_start)


def cli(capsys, *argv: str) -> tuple[int | str | None, str, str]:
    """Run qproxy.main in-process: (exit code, stdout, stderr)."""
    try:
        code = qproxy.main(list(argv))
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def starts(capsys, *argv: str) -> str:
    """Assert the command line is accepted up to the point where the half would start; return stderr."""
    with pytest.raises(WouldStart):
        qproxy.main(list(argv))
    err = capsys.readouterr().err
    assert "error" not in err
    return err


def assert_usage_error(code, err: str, *needles: str) -> None:
    """Exit 2 with one short message that names what is wrong, and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip(), "a usage error must say what is wrong"
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    return lines[0]


# ---------------------------------------------------------------------------
# Subprocess helpers
# ---------------------------------------------------------------------------


def run_to_end(proxy, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run qproxy.py to completion with the proxy's environment (emulated vsock), RUST_LOG unset."""
    return subprocess.run(
        [sys.executable, str(QPROXY), *args], capture_output=True, text=True,
        env=proxy.env(dict({"RUST_LOG": ""}, **(env or {}))), timeout=DEADLINE,
    )


def start_half(proxy, role: str, args: list[str], env: dict | None = None) -> Half:
    """A half started with exactly these arguments (Proxy.start would add a CID)."""
    half = Half(role, args, proxy.env(env), proxy.folder / f"{role}-{len(proxy.halves)}.log")
    proxy.halves.append(half)
    return half


def echo_once(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def wait_echo(port: int, payload: bytes = b"ping") -> None:
    """Wait until a connection through 127.0.0.1:port comes back with its own bytes."""
    def through() -> bool:
        try:
            return echo_once(port, payload) == payload
        except OSError:
            return False
    wait_for(through, f"an echo through 127.0.0.1:{port}")


def unix_echo(path: Path, payload: bytes) -> bytes:
    """Talk to an emulated vsock port by hand, as `socat - UNIX-CONNECT:DIR/PORT` would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


inbound_config = inbound


def outbound_config(hostname: str, tcp_port: int, enclave_port: int, vsock_port: int = 7777) -> str:
    return outbound(hostname, tcp_port, enclave_port, vsock_port)


# ---------------------------------------------------------------------------
# Help and version
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_every_command(capsys, flag):
    code, out, err = cli(capsys, flag)
    assert code == 0
    for word in ("host", "enclave", "check-config", "help", "--version", "-V"):
        assert word in out
    assert "usage: qproxy" in out.lower()


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(capsys, flag):
    code, out, err = cli(capsys, flag)
    assert code == 0
    assert out.strip() == f"qproxy {qproxy.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", qproxy.__version__)


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, err = cli(capsys)
    assert code == 2
    both = out + err
    for word in ("host", "enclave", "check-config"):
        assert word in both
    assert "Traceback" not in both


def test_help_command_prints_top_level_help(capsys):
    code, out, err = cli(capsys, "help")
    assert code == 0
    assert out == cli(capsys, "--help")[1]


@pytest.mark.parametrize("command, words", [
    ("host", ["CID", "QPROXY_LISTEN_CID", "--config", "-t", "--threads", "TOKIO_WORKER_THREADS",
              "--ipv4", "--ipv6", "--control-port", "QPROXY_CONTROL_PORT", "6666"]),
    ("enclave", ["--parent-cid", "QPROXY_PARENT_CID", "default: 3", "--config", "-t", "--threads",
                 "TOKIO_WORKER_THREADS", "--control-port", "QPROXY_CONTROL_PORT", "6666"]),
    ("check-config", ["PATH", "--config"]),
])
def test_help_for_each_command(capsys, command, words):
    code, out, err = cli(capsys, "help", command)
    assert code == 0
    assert f"usage: qproxy {command}" in out.lower()
    for word in words:
        assert word in out, f"{word!r} missing from `qproxy help {command}`"
    for flag in ("--help", "-h"):
        code, same, _ = cli(capsys, command, flag)
        assert code == 0
        assert same == out  # `qproxy help X` and `qproxy X --help` print the same text


def test_help_for_unknown_command_exits_2(capsys):
    code, out, err = cli(capsys, "help", "nosuch")
    assert_usage_error(code, err, "nosuch")


@pytest.mark.parametrize("argv", [["nosuch"], ["--nosuch"], ["host", "4", "--nosuch"], ["enclave", "4"]])
def test_unknown_command_or_option_exits_2(capsys, argv):
    code, out, err = cli(capsys, *argv)
    assert_usage_error(code, err)
    assert one_error_line(err).startswith("qproxy: error: ")


@pytest.mark.parametrize("typed, meant", [("hots", "host"), ("enclav", "enclave"), ("check_config", "check-config")])
def test_a_mistyped_command_gets_a_did_you_mean(capsys, typed, meant):
    code, out, err = cli(capsys, typed)
    assert_usage_error(code, err, f"did you mean {meant!r}?")
    one_error_line(err)


def test_top_level_help_names_the_environment_variables(capsys):
    code, out, err = cli(capsys, "--help")
    for variable in ("RUST_LOG", "QPROXY_VSOCK_EMULATION", "QPROXY_LISTEN_CID", "TOKIO_WORKER_THREADS"):
        assert variable in out


@pytest.mark.parametrize("argv, code, stream, text", [
    (["--version"], 0, "stdout", f"qproxy {qproxy.__version__}\n"),
    (["help", "host"], 0, "stdout", "QPROXY_LISTEN_CID"),
    ([], 2, None, "check-config"),
    (["nosuch"], 2, "stderr", "nosuch"),
    (["host"], 2, "stderr", "QPROXY_LISTEN_CID"),
])
def test_the_script_exits_with_mains_code(tmp_path, argv, code, stream, text):
    env = {name: "" for name in CLI_VARIABLES}
    result = subprocess.run([sys.executable, str(QPROXY), *argv], capture_output=True, text=True, timeout=DEADLINE,
                            env=dict(os.environ, QPROXY_VSOCK_EMULATION=str(tmp_path / "vsock"), **env))
    assert result.returncode == code
    output = {"stdout": result.stdout, "stderr": result.stderr, None: result.stdout + result.stderr}[stream]
    assert text in output
    assert "Traceback" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------
# host: CID, options, environment
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["host", "4"],
    ["host", "1"],
    ["host", "4294967294"],
    ["host", "--config", "{config}", "-t", "8", "--ipv4", "--control-port", "7000", "5"],
    ["host", "--config={config}", "--threads=8", "--ipv6", "--control-port=7000", "5"],
    ["host", "5", "--config", "{config}"],
])
def test_host_accepts(capsys, no_start, tmp_path, argv):
    config = tmp_path / "config.toml"
    config.write_text("")
    starts(capsys, *(arg.format(config=config) for arg in argv))


def test_host_takes_cid_from_QPROXY_LISTEN_CID(capsys, no_start, monkeypatch):
    monkeypatch.setenv("QPROXY_LISTEN_CID", "5")
    starts(capsys, "host")


def test_host_without_cid_names_the_variable(capsys, no_start):
    code, out, err = cli(capsys, "host")
    assert_usage_error(code, err, "QPROXY_LISTEN_CID")
    one_error_line(err)


@pytest.mark.parametrize("cid", ["0", "-1", "4294967295", "abc", "", "1.5"])
def test_host_rejects_invalid_cid(capsys, no_start, cid):
    code, out, err = cli(capsys, "host", cid)
    assert_usage_error(code, err, "CID")


@pytest.mark.parametrize("cid", ["0", "4294967295", "abc"])
def test_host_rejects_invalid_cid_from_environment(capsys, no_start, monkeypatch, cid):
    monkeypatch.setenv("QPROXY_LISTEN_CID", cid)
    code, out, err = cli(capsys, "host")
    assert_usage_error(code, err, "QPROXY_LISTEN_CID")
    one_error_line(err)


def test_host_ipv4_and_ipv6_are_mutually_exclusive(capsys, no_start):
    code, out, err = cli(capsys, "host", "--ipv4", "--ipv6", "4")
    assert_usage_error(code, err, "--ipv4", "--ipv6")


@pytest.mark.parametrize("role", ["host", "enclave"])
@pytest.mark.parametrize("option, value", [
    ("--control-port", "0"), ("--control-port", "65536"), ("--control-port", "abc"), ("--control-port", "-1"),
    ("-t", "0"), ("-t", "abc"), ("--threads", "-1"), ("--threads", "1.5"),
])
def test_invalid_port_or_threads_exit_2(capsys, no_start, role, option, value):
    cid = ["4"] if role == "host" else []
    code, out, err = cli(capsys, role, option, value, *cid)
    assert_usage_error(code, err, value)


@pytest.mark.parametrize("role", ["host", "enclave"])
@pytest.mark.parametrize("variable, value", [
    ("QPROXY_CONTROL_PORT", "99999"), ("QPROXY_CONTROL_PORT", "0"), ("QPROXY_CONTROL_PORT", "x"),
    ("TOKIO_WORKER_THREADS", "0"), ("TOKIO_WORKER_THREADS", "many"),
])
def test_invalid_variable_exits_2_naming_it(capsys, no_start, monkeypatch, role, variable, value):
    monkeypatch.setenv(variable, value)
    cid = ["4"] if role == "host" else []
    code, out, err = cli(capsys, role, *cid)
    assert_usage_error(code, err, variable, value)
    one_error_line(err)


@pytest.mark.parametrize("role", ["host", "enclave"])
def test_valid_variables_are_accepted(capsys, no_start, monkeypatch, role):
    monkeypatch.setenv("QPROXY_CONTROL_PORT", "7000")
    monkeypatch.setenv("TOKIO_WORKER_THREADS", "3")
    monkeypatch.setenv("QPROXY_PARENT_CID", "9")
    starts(capsys, role, *(["4"] if role == "host" else []))


def test_option_wins_over_its_variable(capsys, no_start, monkeypatch):
    # The variable is read only when the option is absent, as the vendor's clap does.
    monkeypatch.setenv("QPROXY_CONTROL_PORT", "99999")
    monkeypatch.setenv("TOKIO_WORKER_THREADS", "0")
    monkeypatch.setenv("QPROXY_LISTEN_CID", "abc")
    starts(capsys, "host", "--control-port", "7000", "-t", "2", "4")


@pytest.mark.parametrize("rust_log", ["verbose", "qproxy=loud", "info,qproxy=7x", "6", "qproxyy"])
@pytest.mark.parametrize("role", ["host", "enclave"])
def test_invalid_RUST_LOG_exits_2(capsys, no_start, monkeypatch, role, rust_log):
    monkeypatch.setenv("RUST_LOG", rust_log)
    code, out, err = cli(capsys, role, *(["4"] if role == "host" else []))
    assert_usage_error(code, err, "RUST_LOG")
    one_error_line(err)


@pytest.mark.parametrize("flag, hostname", [("--ipv4", "::1"), ("--ipv4", "2001:db8::1"), ("--ipv6", "127.0.0.1")])
def test_address_family_flag_against_a_literal_of_the_other_family(capsys, no_start, tmp_path, flag, hostname):
    config = tmp_path / "config.toml"
    config.write_text(outbound_config(hostname, 443, 8443))
    code, out, err = cli(capsys, "host", "--config", str(config), flag, "4")
    assert_usage_error(code, err, hostname, flag)
    one_error_line(err)
    assert f"{config}:1: [[outbound_connections]] entry 1: hostname {hostname} " in err  # where to change it
    starts(capsys, "host", "--config", str(config), "4")  # without the flag the same file is fine


def test_every_literal_the_address_family_flag_rules_out_is_named(capsys, no_start, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(outbound_config("::1", 443, 8443, 7777) + "\n" + outbound_config("127.0.0.1", 80, 8080, 7778)
                      + "\n" + outbound_config("2001:db8::1", 443, 8444, 7779))
    code, out, err = cli(capsys, "host", "--config", str(config), "--ipv4", "4")
    assert code == 2
    assert [line.partition(" [[")[0] for line in err.splitlines()] == [f"qproxy: error: {config}:1:",
                                                                       f"qproxy: error: {config}:13:"]


@pytest.mark.parametrize("flag, works", [(None, True), ("--ipv4", True), ("--ipv6", False)])
def test_address_family_flag_decides_how_hostnames_resolve(proxy, echo_server, flag, works):
    # The upstream listens on IPv4 only; "localhost" reaches it over IPv4 and never with --ipv6
    # (::1 refuses, or the name has no IPv6 address at all).
    app_port = free_port()
    proxy.write_config(outbound_config("localhost", echo_server.port, app_port))
    enclave = proxy.start("enclave")
    host = proxy.start("host", *([flag] if flag else []))
    payload = b"which family? " + flag.encode() if flag else b"any family"
    if works:
        assert echo_once(app_port, payload) == payload
    else:
        try:
            answer = echo_once(app_port, payload)
        except ConnectionResetError:
            answer = b""
        assert answer == b""
        host.wait_log(rf"conn \d+: cannot reach tcp localhost:{echo_server.port}")
        assert echo_server.accepted == 0
    enclave.wait_log(r"conn 1 (closed|refused|reset)")


def test_host_cid_reaches_the_routes(proxy, echo_server):
    """The positional CID wins over QPROXY_LISTEN_CID, and the variable is used when it is absent."""
    proxy.write_config(inbound_config(free_port(), echo_server.port))
    from_variable = start_half(proxy, "host", ["--config", str(proxy.config)], {"QPROXY_LISTEN_CID": "9"})
    from_variable.wait_log(r"-> vsock 9:9000\b")
    assert from_variable.stop() == 0
    positional = start_half(proxy, "host", ["--config", str(proxy.config), "17"], {"QPROXY_LISTEN_CID": "9"})
    positional.wait_log(r"-> vsock 17:9000\b")
    assert "vsock 9:9000" not in positional.log()


# ---------------------------------------------------------------------------
# enclave: --parent-cid and the control port
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cid", ["0", "4294967295", "x", "-3"])
def test_enclave_rejects_invalid_parent_cid(capsys, no_start, cid):
    code, out, err = cli(capsys, "enclave", "--parent-cid", cid)
    assert_usage_error(code, err, "CID")


@pytest.mark.parametrize("role", ["enclave", "check-config"])
def test_invalid_QPROXY_PARENT_CID_exits_2_naming_it(capsys, no_start, monkeypatch, tmp_path, role):
    monkeypatch.setenv("QPROXY_PARENT_CID", "x")
    config = tmp_path / "config.toml"
    config.write_text("")
    code, out, err = cli(capsys, role, "--config", str(config))
    assert_usage_error(code, err, "QPROXY_PARENT_CID")
    one_error_line(err)


def test_enclave_accepts_parent_cid(capsys, no_start):
    starts(capsys, "enclave", "--parent-cid", "7", "--control-port", "7000", "-t", "4")


def test_control_port_option_and_variable_meet(proxy):
    """A host half told port P on the command line meets an enclave half told P in QPROXY_CONTROL_PORT."""
    port = free_port()
    assert port != proxy.control_port  # the variable the host half also sees names another port
    proxy.write_config("")
    host = proxy.start("host", "--control-port", str(port))
    enclave = proxy.start("enclave", env={"QPROXY_CONTROL_PORT": str(port)})
    host.wait_log("control: enclave half connected")
    enclave.wait_log("control: connected to the host half")


def test_different_control_ports_do_not_meet(proxy):
    """The enclave dials QPROXY_PARENT_CID:--control-port; a host on another port never hears of it."""
    host_port, enclave_port = free_port(), free_port()
    proxy.write_config("")
    host = proxy.start("host", "--control-port", str(host_port))
    host.wait_log(rf"listening on vsock :{host_port}\b")
    enclave = proxy.start("enclave", "--control-port", str(enclave_port), env={"QPROXY_PARENT_CID": "9"})
    line = rf"control: host half not reachable at vsock 9:{enclave_port}\b"
    wait_for(lambda: len(re.findall(line, enclave.log())) >= 2, "the enclave half to retry the control port")
    assert "enclave half connected" not in host.log()
    assert "connected to the host half" not in enclave.log()


def test_enclave_parent_cid_defaults_to_3(proxy):
    proxy.write_config("")
    enclave = proxy.start("enclave")
    enclave.wait_log(rf"control: host half not reachable at vsock 3:{proxy.control_port}\b")


def test_enclave_parent_cid_option_wins_over_variable(proxy):
    proxy.write_config("")
    enclave = proxy.start("enclave", "--parent-cid", "7", env={"QPROXY_PARENT_CID": "9"})
    enclave.wait_log(rf"control: host half not reachable at vsock 7:{proxy.control_port}\b")
    assert "vsock 9:" not in enclave.log()


# ---------------------------------------------------------------------------
# check-config
# ---------------------------------------------------------------------------


@pytest.fixture
def vendor_config(tmp_path) -> Path:
    """The vendor's reference file, as examples/ has it."""
    path = tmp_path / "config_qproxy.toml"
    path.write_text((ROOT / "examples" / "config_reference.toml").read_text())
    return path


@pytest.mark.parametrize("form", ["positional", "option", "option=", "both"])
def test_check_config_takes_the_file_either_way(capsys, vendor_config, form):
    argv = {
        "positional": [str(vendor_config)],
        "option": ["--config", str(vendor_config)],
        "option=": [f"--config={vendor_config}"],
        "both": [str(vendor_config), "--config", str(vendor_config)],
    }[form]
    code, out, err = cli(capsys, "check-config", *argv)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{vendor_config}: valid"
    assert "host: listen tcp 0.0.0.0:80 -> vsock <enclave CID>:9000" in lines
    assert "host: listen vsock :7777 -> tcp api.myservice.com:443" in lines
    assert "enclave: listen tcp 127.0.0.1:443 -> vsock 3:7777" in lines
    assert "enclave: listen vsock :9001 -> tcp 127.0.0.1:443" in lines
    assert "enclave: dial vsock 3:6666 for the control connection" in lines
    assert "host: listen vsock :6666 for the enclave half's control connection" in lines


def test_check_config_with_two_different_files_exits_2(capsys, vendor_config, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text("")
    code, out, err = cli(capsys, "check-config", str(vendor_config), "--config", str(other))
    assert_usage_error(code, err)
    one_error_line(err)
    assert out == ""


def test_check_config_without_a_file_exits_2(capsys):
    code, out, err = cli(capsys, "check-config")
    assert_usage_error(code, err, "check-config")
    one_error_line(err)


@pytest.mark.parametrize("option, variable, cid", [
    (None, None, "3"), ("7", None, "7"), (None, "9", "9"), ("7", "9", "7"),
])
def test_check_config_parent_cid(capsys, monkeypatch, vendor_config, option, variable, cid):
    if variable:
        monkeypatch.setenv("QPROXY_PARENT_CID", variable)
    code, out, err = cli(capsys, "check-config", str(vendor_config), *(["--parent-cid", option] if option else []))
    assert code == 0, err
    assert f"enclave: listen tcp 127.0.0.1:443 -> vsock {cid}:7777" in out.splitlines()
    assert f"enclave: dial vsock {cid}:6666 for the control connection" in out.splitlines()


@pytest.mark.parametrize("option, variable, port", [
    (None, None, "6666"), ("7000", None, "7000"), (None, "7100", "7100"), ("7000", "7100", "7000"),
])
def test_check_config_control_port(capsys, monkeypatch, vendor_config, option, variable, port):
    if variable:
        monkeypatch.setenv("QPROXY_CONTROL_PORT", variable)
    code, out, err = cli(capsys, "check-config", str(vendor_config), *(["--control-port", option] if option else []))
    assert code == 0, err
    assert f"host: listen vsock :{port} for the enclave half's control connection" in out.splitlines()


def test_check_config_validates_against_the_control_port(capsys, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(inbound_config(8080, 8080, vsock_port=6666))
    code, out, err = cli(capsys, "check-config", str(config))
    assert_usage_error(code, err, "control port")
    code, out, err = cli(capsys, "check-config", str(config), "--control-port", "7000")
    assert code == 0, err


# ---------------------------------------------------------------------------
# Exit codes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["host", "--config", "{missing}", "4"],
    ["enclave", "--config", "{missing}"],
    ["check-config", "{missing}"],
])
def test_missing_config_file_exits_2(capsys, no_start, tmp_path, argv):
    missing = tmp_path / "no-such-config.toml"
    code, out, err = cli(capsys, *(arg.format(missing=missing) for arg in argv))
    assert_usage_error(code, err, str(missing), "cannot read")
    one_error_line(err)


@pytest.mark.parametrize("kind", ["fifo", "folder", "dev-zero", "too-big"])
def test_a_config_path_that_is_no_config_file_is_one_line_at_once(capsys, tmp_path, kind):
    """A FIFO would block open() for ever, /dev/zero would fill memory: each is refused at once."""
    path = tmp_path / "config.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "dev-zero":
        path = "/dev/zero"
    else:
        path.write_text("# " + "x" * qproxy.CONFIG_MAX_SIZE + "\n")
    code, out, err = cli(capsys, "check-config", str(path))
    assert_usage_error(code, err, str(path))
    one_error_line(err)


@pytest.mark.parametrize("rust_log", ["²", "٣", "qproxy=①"])
def test_RUST_LOG_with_digits_of_other_scripts_is_a_usage_error(capsys, no_start, monkeypatch, rust_log):
    monkeypatch.setenv("RUST_LOG", rust_log)
    code, out, err = cli(capsys, "enclave")
    assert_usage_error(code, err, "RUST_LOG")
    assert "internal error" not in err


def test_output_whose_reader_goes_away_ends_quietly(tmp_path):
    """`qproxy check-config FILE | head -1`: no traceback, no "internal error", on a pipe closed early."""
    config = tmp_path / "config.toml"
    config.write_text("".join(inbound_config(port, port, port) for port in range(1, 3001)))
    reader = subprocess.Popen([sys.executable, str(QPROXY), "check-config", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert reader.stdout.readline().endswith(b": valid\n")
    reader.stdout.close()  # more than a pipe holds is still to come
    assert reader.wait(timeout=DEADLINE) == 1
    assert reader.stderr.read() == b""


def test_the_demo_without_a_toml_parser_says_so_at_once(tmp_path):
    """Below Python 3.11 without tomli: the first line says what to install, without waiting for the halves."""
    launcher = ("import sys; sys.modules['tomllib'] = sys.modules['tomli'] = None; sys.path.insert(0, sys.argv[1]);"
                " import qproxy; sys.exit(qproxy.main(['demo']))")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", launcher, str(QPROXY.parent)], capture_output=True, text=True,
                            timeout=DEADLINE)
    assert time.monotonic() - started < 5
    assert result.returncode == 1
    assert one_error_line(result.stderr).startswith("qproxy: error: reading a config file needs tomli")


@pytest.mark.parametrize("role", ["host", "enclave", "check-config"])
def test_config_error_exits_2(capsys, no_start, tmp_path, role):
    config = tmp_path / "config.toml"
    config.write_text(inbound_config(0, 80) + "\n[log_location]\nlog_levle = 'info'\n")
    argv = [str(config)] if role == "check-config" else ["--config", str(config)] + (["4"] if role == "host" else [])
    code, out, err = cli(capsys, role, *argv)
    assert_usage_error(code, err, "host_port", "log_levle", "did you mean 'log_level'")
    assert all(line.startswith("qproxy: error: ") for line in err.splitlines())


def test_unusable_QPROXY_VSOCK_EMULATION_exits_1(capsys, no_start, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QPROXY_VSOCK_EMULATION", str(blocker / "vsock"))
    monkeypatch.setenv("RUST_LOG", "off")  # the error line is not a log record: it shows at any level
    code, out, err = cli(capsys, "host", "4")
    assert code == 1
    assert "QPROXY_VSOCK_EMULATION" in one_error_line(err)
    assert "Traceback" not in err


def test_tcp_port_in_use_exits_1(proxy):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        # The host half listens on 0.0.0.0:host_port; hold exactly that, without SO_REUSEADDR.
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proxy.write_config(inbound_config(port, 8080))
        result = run_to_end(proxy, "host", "--config", str(proxy.config), "4")
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert line.startswith(f"qproxy: error: tcp port {port} is already in use")
    assert "Traceback" not in result.stderr + result.stdout


def test_vsock_port_held_by_a_live_half_exits_1(proxy, echo_server):
    proxy.write_config(outbound_config("127.0.0.1", echo_server.port, free_port()))
    first = proxy.start("host")
    second = run_to_end(proxy, "host", "--config", str(proxy.config), "4")
    assert second.returncode == 1, second.stderr
    line = one_error_line(second.stderr)
    assert line.startswith("qproxy: error: vsock port 7777 is already in use")
    assert "Traceback" not in second.stderr + second.stdout
    # The live half keeps its socket files and keeps serving, and was not probed with a connection.
    assert first.process.poll() is None
    assert "conn 1 opened" not in first.log()
    assert (proxy.vsock_dir / str(proxy.control_port)).exists()
    assert unix_echo(proxy.vsock_dir / "7777", b"still mine") == b"still mine"


def test_stale_socket_file_of_a_killed_half_is_taken_over(proxy, echo_server):
    proxy.write_config(outbound_config("127.0.0.1", echo_server.port, free_port()))
    proxy.start("host").kill()  # SIGKILL: no chance to remove its socket files
    assert (proxy.vsock_dir / "7777").exists()
    assert (proxy.vsock_dir / str(proxy.control_port)).exists()
    second = proxy.start("host")
    assert unix_echo(proxy.vsock_dir / "7777", b"taken over") == b"taken over"
    assert "Traceback" not in second.log()


@pytest.mark.parametrize("role", ["host", "enclave"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_with_exit_0(proxy, role, sig):
    proxy.write_config(outbound_config("127.0.0.1", 9, free_port()) if role == "host" else inbound_config(free_port(), 9))
    half = proxy.start(role)
    listened = proxy.vsock_dir / "7777" if role == "host" else proxy.vsock_dir / "9000"
    assert listened.exists()
    assert half.stop(sig) == 0
    log = half.log()
    assert f"{sig.name}: stopping" in log
    assert f"{role} half stopped" in log
    assert "Traceback" not in log
    assert not listened.exists()  # a clean stop removes its socket files


# ---------------------------------------------------------------------------
# -t / --threads / TOKIO_WORKER_THREADS: how many connections each direction runs at once
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["-t", "--threads", "TOKIO_WORKER_THREADS"])
def test_threads_bound_concurrent_connections(proxy, echo_server, source):
    host_port = free_port()
    proxy.write_config(inbound_config(host_port, echo_server.port))
    proxy.start("enclave")
    if source == "TOKIO_WORKER_THREADS":
        host = proxy.start("host", env={"TOKIO_WORKER_THREADS": "2"})
    else:
        host = proxy.start("host", source, "2")
    first = socket.create_connection(("127.0.0.1", host_port), timeout=DEADLINE)
    second = socket.create_connection(("127.0.0.1", host_port), timeout=DEADLINE)
    third = None
    try:
        for sock, payload in ((first, b"one"), (second, b"two")):
            sock.sendall(payload)
            assert sock.recv(100) == payload
        third = socket.create_connection(("127.0.0.1", host_port), timeout=DEADLINE)  # the kernel accepts it
        third.sendall(b"three")
        host.wait_log(r"WARN  qproxy::host inbound \(-t/--threads\): 2 connections at once, the limit")
        # Negative check: no echo while both slots are taken.  0.5 s is ample for a relay on loopback.
        third.settimeout(0.5)
        with pytest.raises(socket.timeout):
            third.recv(100)
        assert echo_server.accepted == 2
        first.close()
        third.settimeout(DEADLINE)
        assert third.recv(100) == b"three"
        second.sendall(b"again")
        assert second.recv(100) == b"again"
    finally:
        for sock in (first, second, third):
            if sock is not None:
                sock.close()


# ---------------------------------------------------------------------------
# RUST_LOG: what each level lets through
# ---------------------------------------------------------------------------

LEVEL_SEEN = {
    "off": set(),
    "error": {"ERROR"},
    "warn": {"ERROR", "WARN"},
    "info": {"ERROR", "WARN", "INFO"},
    "debug": {"ERROR", "WARN", "INFO", "DEBUG"},
}
LEVEL_SEEN["trace"] = LEVEL_SEEN["debug"]  # nothing logs at trace yet; trace lets debug through


def fake_enclave_hello(vsock_dir: Path, control_port: int) -> None:
    """Greet the host half with entries that do not match its own: it logs that at ERROR.

    The host half takes it in place of the real enclave half, which dials again and
    takes its place back: the answer may or may not arrive before that, so only the
    host half's hello, when it comes, is checked.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(vsock_dir / str(control_port)))
        hello = {"type": "hello", "protocol": 2, "role": "enclave", "version": "test",
                 "entries": {"inbound": [], "outbound": []}}
        sock.sendall(json.dumps(hello).encode() + b"\n")
        with sock.makefile("rb") as reader:
            answer = reader.readline()
        assert answer == b"" or json.loads(answer)["type"] == "hello"


@pytest.mark.parametrize("rust_log, level", [
    ("off", "off"), ("error", "error"), ("warn", "warn"), ("info", "info"), ("debug", "debug"), ("trace", "trace"),
    ("", "warn"), ("OFF", "off"), ("Info", "info"), ("WARN", "warn"),
    ("qproxy=debug,warn", "debug"), ("warn,qproxy=error", "error"), ("info,hyper=trace", "info"),
    ("qproxy", "trace"), ("0", "off"), ("3", "info"), ("warn,qproxy=4", "debug"),
])
def test_RUST_LOG_decides_what_is_logged(proxy, echo_server, rust_log, level):
    host_port = free_port()
    proxy.write_config(inbound_config(host_port, echo_server.port))
    env = {"RUST_LOG": rust_log}
    enclave = proxy.start("enclave", "--parent-cid", "7", env=env, ready=False)
    wait_for((proxy.vsock_dir / "9000").exists, "the enclave half's vsock listener")
    unreachable = f"control: host half not reachable at vsock 7:{proxy.control_port}"
    if "DEBUG" in LEVEL_SEEN[level]:
        enclave.wait_log(re.escape(unreachable))  # DEBUG, before the host half exists
    host = proxy.start("host", env=env, ready=False)
    wait_echo(host_port)  # both halves are serving: INFO "conn N opened"
    fake_enclave_hello(proxy.vsock_dir, proxy.control_port)  # ERROR, and WARN "runs qproxy test", on the host half
    if "ERROR" in LEVEL_SEEN[level]:
        host.wait_log("config mismatch")
    assert enclave.stop() == 0 and host.stop() == 0  # INFO "SIGTERM: stopping"
    logs = host.log() + enclave.log()
    seen = set(re.findall(r"Z (ERROR|WARN|INFO|DEBUG|TRACE) +qproxy::", logs))
    assert seen == LEVEL_SEEN[level], logs
    if level == "off":
        assert logs == ""
    expected = {
        "ERROR": "config mismatch",
        "WARN": "control: the enclave half runs qproxy test",
        "INFO": "host half ready",
        "DEBUG": unreachable,
    }
    for name in seen:
        assert expected[name] in logs


# ---------------------------------------------------------------------------
# [log_location]: the log file
# ---------------------------------------------------------------------------


def test_log_file_has_connections_and_never_payload(proxy, echo_server, tmp_path):
    host_port = free_port()
    host_dir, enclave_dir = tmp_path / "logs" / "host", tmp_path / "logs" / "enclave"
    proxy.write_config(
        inbound_config(host_port, echo_server.port)
        + f'\n[log_location]\nhost_log = "h.log"\nenclave_log = "e.log"\nlog_level = "warn"\n'
        f'host_log_dir = "{host_dir}"\nenclave_log_dir = "{enclave_dir}"\n'
    )
    env = {"RUST_LOG": "trace"}  # overrides log_level; the most a log can say
    enclave = proxy.start("enclave", env=env, ready=False)
    host = proxy.start("host", env=env, ready=False)
    host_log, enclave_log = host_dir / "h.log", enclave_dir / "e.log"

    def logged(path: Path, pattern: str):
        return lambda: path.exists() and re.search(pattern, path.read_text())

    wait_for(logged(enclave_log, "enclave half ready"), "the enclave half's log file")
    wait_for(logged(host_log, "host half ready"), "the host half's log file")
    marker = f"payload-marker-{uuid.uuid4().hex}".encode()
    assert echo_once(host_port, marker) == marker
    n = len(marker)
    for path in (host_log, enclave_log):
        wait_for(logged(path, r"conn 1 opened"), f"conn 1 opened in {path.name}")
        wait_for(logged(path, rf"conn 1 closed: .*\b{n} bytes up, {n} bytes down"), f"conn 1 closed in {path.name}")
    assert enclave.stop() == 0 and host.stop() == 0
    for folder, path in ((host_dir, host_log), (enclave_dir, enclave_log)):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750, folder  # created for the log: no one else reads it
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    for text in (host_log.read_text(), enclave_log.read_text(), host.log(), enclave.log()):
        assert marker.decode() not in text
        assert marker.hex() not in text
    assert "half ready" not in host.log() + enclave.log()  # the file, not stderr, got the log


def test_log_level_from_the_file_applies_without_RUST_LOG(proxy, tmp_path):
    proxy.write_config(f'[log_location]\nlog_level = "info"\nhost_log_dir = "{tmp_path / "logs"}"\n')
    host = proxy.start("host", env={"RUST_LOG": ""}, ready=False)
    wait_for(lambda: (tmp_path / "logs" / "host.log").exists()
             and "host half ready" in (tmp_path / "logs" / "host.log").read_text(), "INFO in host.log")
    assert host.stop() == 0


def test_unwritable_log_dir_falls_back_to_stderr(proxy, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log_dir = blocker / "logs"
    proxy.write_config(f'[log_location]\nlog_level = "info"\nhost_log_dir = "{log_dir}"\n')
    host = proxy.start("host", env={"RUST_LOG": ""}, ready=False)
    host.wait_log("host half ready")  # still runs, and logs to stderr at the file's level
    complaints = [line for line in host.log().splitlines() if "log" in line and str(log_dir) in line]
    # One for its own log, one for the enclave half's records that it writes in the same folder.
    assert [complaint.split(str(log_dir))[1] for complaint in complaints] == [
        "/host.log (Not a directory); logging to stderr", "/enclave.log (Not a directory); logging to stderr",
    ], host.log()
    assert all(complaint.startswith("qproxy: cannot write the log file ") for complaint in complaints)
    assert "Traceback" not in host.log()
    assert (proxy.vsock_dir / str(proxy.control_port)).exists()
    assert host.stop() == 0


@pytest.mark.parametrize("text", ["\u0664", "1_0", " 7", "0x4", "4.0", "+"])
def test_numbers_are_ascii_digits_only(capsys, no_start, text):
    code, out, err = cli(capsys, "enclave", "--parent-cid", text)
    assert_usage_error(code, err, "CID")


def test_a_failed_start_leaves_no_socket_file_behind(proxy, echo_server):
    proxy.write_config("")
    holder = proxy.start("host")  # holds the control port
    proxy.write_config(outbound_config("127.0.0.1", echo_server.port, free_port()))
    second = run_to_end(proxy, "host", "--config", str(proxy.config), "4")
    assert second.returncode == 1, second.stderr
    assert f"vsock port {proxy.control_port} is already in use" in second.stderr
    # Port 7777 was bound before the control port failed; it must be gone again.
    assert not (proxy.vsock_dir / "7777").exists()
    assert holder.process.poll() is None

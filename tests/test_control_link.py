"""The control connection once greeted: config comparison, heartbeats, the enclave's log on the host, sd_notify.

Real halves run as subprocesses over emulated vsock, where the control port is
the socket file DIR/<control port>.  Where a test needs the other half to do
what a real one would only do slowly (fall silent after a short heartbeat),
the test plays that half itself, speaking the protocol as README documents it.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qproxy
from conftest import DEADLINE, free_port, inbound, outbound, read_to_end, run_qproxy, wait_for
from test_relay import exchange


def message(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"


class Peer:
    """The test's side of a control connection: whole messages in, whole messages out."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(DEADLINE)
        self.reader = sock.makefile("rb")

    def send(self, **fields: object) -> None:
        self.sock.sendall(message(**fields))

    def receive(self) -> dict:
        line = self.reader.readline()
        assert line, "the half closed the control connection"
        return json.loads(line)

    def receive_until(self, wanted) -> list[dict]:
        """Messages until one for which wanted() is true; all of them, that one last."""
        seen = []
        while not seen or not wanted(seen[-1]):
            seen.append(self.receive())
        return seen

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def as_enclave(proxy, heartbeat: float, entries: dict) -> Peer:
    """Dial the host half's control port and greet it as an enclave half; return after its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(proxy.vsock_dir / str(proxy.control_port)))
    peer = Peer(sock)
    peer.send(type="hello", protocol=qproxy.CONTROL_PROTOCOL, role="enclave", version="test", heartbeat=heartbeat,
              entries=entries)
    answer = peer.receive()
    assert (answer["type"], answer["role"], answer["protocol"]) == ("hello", "host", qproxy.CONTROL_PROTOCOL)
    assert answer["heartbeat"] == qproxy.HEARTBEAT_INTERVAL
    return peer


def no_entries() -> dict:
    return {"inbound": [], "outbound": []}


# ---------------------------------------------------------------------------
# Handshake: the host half compares the enclave half's entries with its own
# ---------------------------------------------------------------------------


def test_matching_halves_say_so_and_log_no_error(proxy, echo_server):
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, echo_server.port) + outbound("127.0.0.1", 1, free_port()))
    host.wait_log(r"INFO  qproxy::host control: the enclave half's entries match this host half's")
    assert exchange(host_port, b"ping") == b"ping"
    assert " ERROR " not in host.log() + enclave.log()


def test_every_mismatch_is_an_error_in_plain_words_and_both_halves_keep_serving(proxy, echo_server):
    shared_port, app_port = free_port(), free_port()
    proxy.write_config(
        inbound(shared_port, echo_server.port, 9000)
        + outbound("127.0.0.1", echo_server.port, app_port, 8001)  # the enclave dials vsock 8001
    )
    enclave = proxy.start("enclave")
    proxy.write_config(
        inbound(shared_port, echo_server.port, 9000)
        + inbound(free_port(), 80, 9002)  # no enclave listener behind it
        + outbound("api.example.com", 443, 443, 8003)  # the enclave has no entry for it
    )
    host = proxy.start("host")
    host.wait_log("config mismatch: the host half forwards vsock port 8003")
    errors = re.findall(r"ERROR qproxy::host control: config mismatch: (.*)", host.log())
    assert sorted(errors) == sorted([
        "the host half forwards tcp port %d to vsock port 9002, but the enclave half has no inbound entry for vsock"
        " port 9002" % int(re.search(r"listening on tcp 0\.0\.0\.0:(\d+) -> vsock 4:9002", host.log()).group(1)),
        "the host half forwards vsock port 8003 to api.example.com:443, but the enclave half has no outbound entry"
        " for vsock port 8003",
        f"the enclave half forwards 127.0.0.1:{app_port} to vsock port 8001, but the host half has no outbound"
        " entry for vsock port 8001",
    ]), host.log()
    assert exchange(shared_port, b"still relaying") == b"still relaying"
    assert host.process.poll() is None and enclave.process.poll() is None


def test_differing_details_of_one_entry_are_named(proxy):
    host = proxy.start_both(outbound("a.example", 443, 8443, 8001))[0]
    host.wait_log("match this host half's")
    peer = as_enclave(proxy, 5, {"inbound": [], "outbound": [
        {"vsock_port": 8001, "hostname": "b.example", "tcp_port": 443, "enclave_port": 443},
    ]})
    try:
        host.wait_log("enclave_port is 8443")
        errors = re.findall(r"ERROR qproxy::host control: config mismatch: (.*)", host.log())
        assert errors == [
            "outbound vsock port 8001: the host half's hostname is a.example, the enclave half's b.example",
            "outbound vsock port 8001: the host half's enclave_port is 8443, the enclave half's 443",
        ]
    finally:
        peer.close()


@pytest.mark.parametrize("entries", [None, [], {"inbound": {}}, {"inbound": [{"vsock_port": True}], "outbound": []}])
def test_unusable_entries_are_a_warning_not_a_crash(proxy, entries):
    proxy.write_config(outbound("a.example", 443, 8443, 8001))
    host = proxy.start("host")
    peer = as_enclave(proxy, 5, entries)
    try:
        host.wait_log(r"WARN  qproxy::host control: cannot compare the configurations: the enclave half sent ")
        peer.send(type="heartbeat")  # the connection goes on
        host.wait_log("control: enclave half connected")
        assert host.process.poll() is None
    finally:
        peer.close()


def test_the_same_mismatches_are_logged_once_not_at_every_hello(proxy):
    proxy.write_config(outbound("a.example", 443, 8443, 8001))
    host = proxy.start("host")
    for _ in range(2):
        peer = as_enclave(proxy, 5, no_entries())
        peer.close()
    host.wait_log(r"WARN  qproxy::host control: the enclave half's entries still differ from this host half's, in"
                  r" the 1 ways logged before")
    assert host.log().count("config mismatch:") == 1


def test_many_mismatches_are_logged_up_to_a_bound_and_counted(proxy):
    proxy.write_config("")
    host = proxy.start("host")
    extra = qproxy.CONTROL_MISMATCHES_LOGGED + 10
    entries = {"inbound": [{"vsock_port": 9000 + n, "host_port": 1000 + n, "enclave_port": 2000 + n}
                           for n in range(extra)], "outbound": []}
    as_enclave(proxy, 5, entries).close()
    host.wait_log(r"ERROR qproxy::host control: config mismatch: 10 more; `qproxy check-config HOST_FILE"
                  r" --enclave-config ENCLAVE_FILE` lists them all")
    assert host.log().count("config mismatch: the enclave half") == qproxy.CONTROL_MISMATCHES_LOGGED


def test_hellos_are_answered_at_a_bounded_pace(proxy):
    """Whatever redials the control port in a loop gets one hello answered a CONTROL_HELLO_INTERVAL,
    and so adds its arrival and departure lines to the host's log at that pace, none refused."""
    proxy.write_config("")
    host = proxy.start("host")
    started = qproxy.time.monotonic()
    for _ in range(4):
        as_enclave(proxy, 5, no_entries()).close()
    elapsed = qproxy.time.monotonic() - started
    assert elapsed >= 3 * qproxy.CONTROL_HELLO_INTERVAL - 0.1, f"4 hellos answered in {elapsed:.2f} s"
    host.wait_log(r"(?s)(control: enclave half connected.*){4}")


def test_an_enclave_half_without_entries_is_told_apart(proxy):
    proxy.write_config("")
    host = proxy.start("host")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(proxy.vsock_dir / str(proxy.control_port)))
    peer = Peer(sock)
    try:
        peer.send(type="hello", protocol=1, role="enclave", version="0.0.1\nERROR forged")  # an older qproxy, or a liar
        assert peer.receive()["type"] == "hello"
        host.wait_log("control: the enclave half did not send its entries; cannot compare the configurations")
        assert re.search(r"WARN  qproxy::host control: the enclave half speaks control protocol 1", host.log())
        assert re.search(r"WARN  qproxy::host control: the enclave half runs qproxy 0\.0\.1\\nERROR forged, ", host.log())
        assert not re.search("^ERROR", host.log(), re.M)
    finally:
        peer.close()


def test_check_config_compares_the_enclave_file(tmp_path):
    host_file, enclave_file = tmp_path / "host.toml", tmp_path / "enclave.toml"
    host_file.write_text(outbound("api.example.com", 443, 443, 8001))
    enclave_file.write_text(outbound("api.example.com", 443, 443, 8002))
    result = run_qproxy("check-config", str(host_file), "--enclave-config", str(enclave_file))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "qproxy: error: config mismatch: the host half forwards vsock port 8001 to api.example.com:443, but the"
        " enclave half has no outbound entry for vsock port 8001",
        "qproxy: error: config mismatch: the enclave half forwards 127.0.0.1:443 to vsock port 8002, but the host"
        " half has no outbound entry for vsock port 8002",
    ]
    assert "enclave: listen tcp 127.0.0.1:443 -> vsock 3:8002" in result.stdout  # the enclave's lines, its file
    enclave_file.write_text(outbound("api.example.com", 443, 443, 8001))
    result = run_qproxy("check-config", str(host_file), "--enclave-config", str(enclave_file))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[-1] == f"{enclave_file}: valid, and matches {host_file}"


# ---------------------------------------------------------------------------
# Heartbeats: each half notices when the other falls silent, and when it speaks again
# ---------------------------------------------------------------------------


def test_the_host_half_notices_a_silent_enclave_half_and_its_return(proxy):
    proxy.write_config("")
    host = proxy.start("host")
    peer = as_enclave(proxy, 0.1, no_entries())  # promises a heartbeat every 0.1 s (taken as 1 s), then sends none
    try:
        host.wait_log(r"WARN  qproxy::host control: the enclave half has said nothing for [3-9]\.\d s"
                      r" \(it promised a heartbeat every 1 s\)")
        peer.send(type="heartbeat")
        host.wait_log(r"WARN  qproxy::host control: the enclave half is heard from again")
        assert host.log().count("has said nothing") == 1  # said once per silence, not at every check
    finally:
        peer.close()


@pytest.fixture
def fake_host(proxy):
    """The control port's socket file, held by the test instead of a host half."""
    proxy.vsock_dir.mkdir(mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(proxy.vsock_dir / str(proxy.control_port)))
    listener.listen(4)
    listener.settimeout(DEADLINE)
    yield listener
    listener.close()


def accept_enclave(listener: socket.socket, heartbeat: float) -> tuple[Peer, dict]:
    sock, _ = listener.accept()
    peer = Peer(sock)
    greeting = peer.receive()
    peer.send(type="hello", protocol=qproxy.CONTROL_PROTOCOL, role="host", version="test", heartbeat=heartbeat)
    return peer, greeting


def test_the_enclave_half_greets_with_its_entries_and_notices_a_silent_host_half(proxy, fake_host):
    app_port = free_port()
    proxy.write_config(inbound(free_port(), 8080, 9000) + outbound("api.example.com", 443, app_port, 8001))
    enclave = proxy.start("enclave")
    peer, greeting = accept_enclave(fake_host, heartbeat=1)
    try:
        assert greeting == {
            "type": "hello", "protocol": qproxy.CONTROL_PROTOCOL, "role": "enclave", "version": qproxy.__version__,
            "heartbeat": qproxy.HEARTBEAT_INTERVAL,
            "entries": {
                "inbound": [{"vsock_port": 9000, "host_port": greeting["entries"]["inbound"][0]["host_port"],
                             "enclave_port": 8080, "proxy_protocol": "off"}],
                "outbound": [{"vsock_port": 8001, "hostname": "api.example.com", "tcp_port": 443,
                              "enclave_port": app_port, "enclave_address": "127.0.0.1"}],
                "egress": [],
            },
        }
        enclave.wait_log(r"WARN  qproxy::enclave control: the host half has said nothing for [3-9]\.")
        peer.send(type="heartbeat")
        enclave.wait_log(r"WARN  qproxy::enclave control: the host half is heard from again")
    finally:
        peer.close()


def test_entries_too_many_for_one_message_are_left_out_of_the_hello(proxy, fake_host):
    """A valid config can hold more entries than a 64 KiB hello: the enclave half says so and
    greets without them, so the link (and the log forwarding) still comes up."""
    long_name = ".".join(["a" * 60] * 4)
    proxy.write_config("".join(outbound(long_name, 443, free_port(), 8000 + n) for n in range(250)))
    enclave = proxy.start("enclave")
    peer, greeting = accept_enclave(fake_host, heartbeat=5)
    try:
        assert greeting["type"] == "hello" and "entries" not in greeting
        enclave.wait_log(r"WARN  qproxy::enclave control: the connection entries take \d+ bytes, more than a control"
                         r" message holds \(65536\)")
        enclave.wait_log(r"control: connected to the host half")
    finally:
        peer.close()


def test_the_enclave_half_sends_heartbeats(proxy, fake_host):
    proxy.write_config("")
    proxy.start("enclave")
    peer, _ = accept_enclave(fake_host, heartbeat=qproxy.HEARTBEAT_INTERVAL)
    try:
        received = peer.receive_until(lambda m: m["type"] == "heartbeat")
        assert {m["type"] for m in received} <= {"log", "heartbeat"}
    finally:
        peer.close()


# ---------------------------------------------------------------------------
# The enclave half's log, written on the host
# ---------------------------------------------------------------------------


def log_location(folder, level: str = "info") -> str:
    return (f'[log_location]\nlog_level = "{level}"\nhost_log_dir = "{folder / "host"}"\n'
            f'enclave_log_dir = "{folder / "enclave"}"\n')


def wait_ready(log_file, role: str) -> None:
    wait_for(lambda: log_file.exists() and f"{role} half ready" in log_file.read_text(), f"the {role} half to start")


def test_the_host_half_writes_the_enclave_halfs_log_as_the_enclave_wrote_it(proxy, echo_server, tmp_path):
    host_port = free_port()
    proxy.write_config(inbound(host_port, echo_server.port) + log_location(tmp_path / "logs"))
    own = tmp_path / "logs" / "enclave" / "enclave.log"  # the enclave half's own file
    copy = tmp_path / "logs" / "host" / "enclave.log"  # what the host half writes from the control connection
    enclave = proxy.start("enclave", ready=False)
    wait_ready(own, "enclave")
    proxy.start("host", ready=False)
    wait_ready(tmp_path / "logs" / "host" / "host.log", "host")
    assert exchange(host_port, b"ping") == b"ping"  # the enclave half logs this connection too
    wait_for(lambda: copy.exists() and "conn 1 closed" in copy.read_text(), "the enclave's records on the host")
    # The same lines, times and levels, once each writer has written what it holds (each gathers its
    # records for LOG_LINGER, so either file may be a batch ahead of the other for a moment).
    wait_for(lambda: copy.read_text().splitlines() == own.read_text().splitlines(), "the two files to agree")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO  qproxy::enclave ", copy.read_text())
    assert oct(copy.stat().st_mode & 0o777) == "0o640"
    assert enclave.stop() == 0
    wait_for(lambda: "enclave half stopped" in copy.read_text(), "the enclave half's last record on the host")


def test_records_sent_as_the_host_half_dies_are_written_when_it_is_back(proxy, echo_server, tmp_path):
    """Records on their way when the host half is killed (in its socket, not yet written) are sent again
    to the next one: every record of the enclave's own log reaches the host's copy, none silently lost."""
    host_port = free_port()
    proxy.write_config(inbound(host_port, echo_server.port) + log_location(tmp_path / "logs"))
    own = tmp_path / "logs" / "enclave" / "enclave.log"
    copy = tmp_path / "logs" / "host" / "enclave.log"
    quiet = {"RUST_LOG": ""}  # the file's level, info: two records a connection
    proxy.start("enclave", ready=False, env=quiet)
    wait_ready(own, "enclave")
    host = proxy.start("host", ready=False, env=quiet)
    wait_ready(tmp_path / "logs" / "host" / "host.log", "host")
    wait_for(lambda: "control: connected to the host half" in own.read_text(), "the control link")
    burst = threading.Event()

    def log_a_lot() -> None:  # a few hundred records a second: what a link takes, so none is dropped for speed
        while not burst.wait(0.005):
            with socket.create_connection(("127.0.0.1", host_port), timeout=DEADLINE):
                pass

    load = threading.Thread(target=log_a_lot)
    load.start()
    try:
        wait_for(lambda: copy.exists() and copy.read_text().count("closed") >= 100, "records on their way")
        host.process.kill()  # mid-stream: some were sent and not yet written
    finally:
        burst.set()
        load.join(DEADLINE)
    host.process.wait()
    proxy.start("host", ready=False, env=quiet)
    wait_for(lambda: "control: connected again to the host half" in own.read_text(), "the control link again",
             timeout=2 * DEADLINE)
    own_lines = own.read_text().splitlines()
    wait_for(lambda: set(own_lines) <= set(copy.read_text().splitlines()),
             "every record of the enclave's own log in the host's copy")
    assert "dropped" not in copy.read_text()


def test_records_made_while_the_host_half_is_away_wait_and_overflow_is_counted(proxy, tmp_path):
    app_port = free_port()
    proxy.write_config(outbound("127.0.0.1", 1, app_port) + log_location(tmp_path / "logs"))
    own = tmp_path / "logs" / "enclave" / "enclave.log"
    copy = tmp_path / "logs" / "host" / "enclave.log"
    proxy.start("enclave", ready=False, env={"RUST_LOG": ""})  # the file's level, info: no retries logged
    wait_ready(own, "enclave")
    attempts = qproxy.LOG_BACKLOG + 200  # each logs "cannot reach" (its dial fails, so no "opened"): 1 record
    for _ in range(attempts):
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # the reset may come as early as connect()
            with socket.create_connection(("127.0.0.1", app_port), timeout=DEADLINE) as app:
                app.sendall(b"x")
                app.recv(1)
    wait_for(lambda: own.read_text().count("cannot reach") == attempts, "the enclave half to log every attempt")
    assert len(own.read_text().splitlines()) > qproxy.LOG_BACKLOG
    proxy.start("host", ready=False, env={"RUST_LOG": ""})
    wait_for(lambda: copy.exists() and "log records were dropped" in copy.read_text(), "the count of dropped records")
    # The note is the enclave half's own record too: its own log writer may write it after the host's copy has it.
    wait_for(lambda: "log records were dropped" in own.read_text(), "the count in the enclave half's own log")
    own_lines, copy_lines = own.read_text().splitlines(), copy.read_text().splitlines()
    note = re.fullmatch(r".* WARN  qproxy::enclave control: (\d+) log records were dropped while the host half was"
                        r" away or took them too slowly \(%d are kept\)" % qproxy.LOG_BACKLOG, copy_lines[-1])
    assert note, copy_lines[-1]
    lost = int(note.group(1))
    assert lost == len(own_lines) - 1 - qproxy.LOG_BACKLOG  # everything before the note itself, but the newest kept
    assert copy_lines == own_lines[lost:]  # those, in order, none twice, then the note


def test_a_forwarded_record_cannot_forge_a_host_log_line(proxy, tmp_path):
    proxy.write_config(log_location(tmp_path / "logs"))
    proxy.start("host", ready=False)
    wait_ready(tmp_path / "logs" / "host" / "host.log", "host")
    peer = as_enclave(proxy, 5, no_entries())
    forged = "hello\n2026-01-01T00:00:00.000Z ERROR qproxy::host forged\r\x1b[2J\u2028end \\n is a backslash and an n"
    try:
        peer.send(type="log", time="2026-11-27T10:00:00.123Z", level="ERROR", message=forged)
        peer.send(type="log", time="yesterday", level="INFO", message="malformed: dropped")
        peer.send(type="log", time="2026-11-27T10:00:00.124Z", level="INFO", message="after")
        copy = tmp_path / "logs" / "host" / "enclave.log"
        wait_for(lambda: copy.exists() and "after" in copy.read_text(), "the records on the host")
        assert copy.read_text().splitlines() == [
            "2026-11-27T10:00:00.123Z ERROR qproxy::enclave hello\\n2026-01-01T00:00:00.000Z ERROR qproxy::host"
            " forged\\r\\x1b[2J\\u2028end \\\\n is a backslash and an n",
            "2026-11-27T10:00:00.124Z INFO  qproxy::enclave after",
        ]
    finally:
        peer.close()


def test_a_record_of_every_level_an_enclave_half_logs_is_written(proxy, tmp_path):
    """CRITICAL included: the line a failing enclave half logs last is the one most worth having."""
    proxy.write_config(log_location(tmp_path / "logs"))
    proxy.start("host", ready=False)
    wait_ready(tmp_path / "logs" / "host" / "host.log", "host")
    peer = as_enclave(proxy, 5, no_entries())
    levels = ["CRITICAL", "ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
    try:
        for level in levels:
            peer.send(type="log", time="2026-11-27T10:00:00.000Z", level=level, message=f"at {level}")
        copy = tmp_path / "logs" / "host" / "enclave.log"
        wait_for(lambda: copy.exists() and "at TRACE" in copy.read_text(), "the records on the host")
        assert [line.split()[1] for line in copy.read_text().splitlines()] == levels
    finally:
        peer.close()


@pytest.mark.parametrize("bad", [
    {"level": [], "time": "2026-11-27T10:00:00.000Z", "message": "unhashable level"},
    {"level": "LOUD", "time": "2026-11-27T10:00:00.000Z", "message": "no such level"},
    {"level": "INFO", "time": 1764237600, "message": "a number for a time"},
    {"level": "INFO", "time": "2026-11-27T10:00:00.000Z", "message": {"not": "text"}},
])
def test_a_malformed_log_record_is_dropped_and_the_link_goes_on(proxy, tmp_path, bad):
    proxy.write_config(log_location(tmp_path / "logs"))
    proxy.start("host", ready=False)
    wait_ready(tmp_path / "logs" / "host" / "host.log", "host")
    peer = as_enclave(proxy, 5, no_entries())
    try:
        peer.send(type="log", **bad)
        peer.send(type="log", time="2026-11-27T10:00:00.001Z", level="INFO", message="after")
        copy = tmp_path / "logs" / "host" / "enclave.log"
        wait_for(lambda: copy.exists() and "after" in copy.read_text(), "the good record on the host")
        assert copy.read_text() == "2026-11-27T10:00:00.001Z INFO  qproxy::enclave after\n"
        host_log = (tmp_path / "logs" / "host" / "host.log").read_text()
        assert "control: dropped a malformed log record from the enclave half" in host_log
        assert "unexpected error" not in host_log and "disconnected" not in host_log
    finally:
        peer.close()


def flood_the_host(proxy, tmp_path, records: int, length: int) -> tuple[float, str]:
    """Send records log records of length characters at once, as an enclave half; wait until the
    host half has written every one.  The seconds that took, and the host half's copy."""
    proxy.write_config(log_location(tmp_path / "logs"))
    proxy.start("host", ready=False)
    wait_ready(tmp_path / "logs" / "host" / "host.log", "host")
    copy = tmp_path / "logs" / "host" / "enclave.log"
    peer = as_enclave(proxy, 5, no_entries())
    try:
        started = qproxy.time.monotonic()
        peer.sock.sendall(b"".join(
            message(type="log", time="2026-11-27T10:00:00.000Z", level="INFO", message=f"record {n} ".ljust(length, "."))
            for n in range(records)
        ))
        wait_for(lambda: copy.exists() and copy.read_text().count("record ") == records, "every record on the host")
        return qproxy.time.monotonic() - started, copy.read_text()
    finally:
        peer.close()


def test_a_flood_of_messages_is_held_back_not_dropped(proxy, tmp_path):
    """The host half takes CONTROL_MESSAGE_RATE messages a second: four seconds' worth wait in the
    socket and are written over at least two whole seconds, every one of them."""
    elapsed, copy = flood_the_host(proxy, tmp_path, 4 * qproxy.CONTROL_MESSAGE_RATE, 10)
    assert elapsed >= 1.9, f"{4 * qproxy.CONTROL_MESSAGE_RATE} messages taken in {elapsed:.2f} s"
    assert [int(line.split()[4]) for line in copy.splitlines()] == list(range(4 * qproxy.CONTROL_MESSAGE_RATE))


def test_a_flood_of_bytes_is_held_back_and_long_records_are_cut(proxy, tmp_path):
    """Few messages, many bytes: CONTROL_BYTE_RATE a second holds them back; each record arrives
    whole (under 64 KiB) and is written cut to LOG_MESSAGE_MAX characters."""
    records = 3 * qproxy.CONTROL_BYTE_RATE // 40_000 + 2  # more than three seconds' worth: two whole seconds
    elapsed, copy = flood_the_host(proxy, tmp_path, records, 40_000)
    assert elapsed >= 1.9, f"{records * 40_000} bytes taken in {elapsed:.2f} s"
    messages = [line.split(" qproxy::enclave ", 1)[1] for line in copy.splitlines()]
    assert len(messages) == records
    assert {len(text) for text in messages} == {qproxy.LOG_MESSAGE_MAX}


def test_a_flood_from_the_host_half_is_held_back_by_the_enclave_half(proxy, fake_host, echo_server):
    """The parent is not trusted: what it sends on the control link the enclave half takes at
    CONTROL_BYTE_RATE, so the sender waits, and the enclave half relays meanwhile."""
    host_port = free_port()
    proxy.write_config(inbound(host_port, echo_server.port))
    proxy.start("enclave")
    peer, _ = accept_enclave(fake_host, heartbeat=5)
    # Nearly four seconds' worth: the last second's bytes do not fit the socket's buffers, so
    # sendall() returns only after two whole seconds.
    flood = message(type="news", padding="x" * 60_000) * (4 * qproxy.CONTROL_BYTE_RATE // 60_000)
    sent = threading.Event()

    def send_flood():
        peer.sock.sendall(flood)
        sent.set()

    started = qproxy.time.monotonic()
    threading.Thread(target=send_flood, daemon=True).start()
    try:
        with socket.socket(socket.AF_UNIX) as relay:  # the enclave half's inbound port, as the host half dials it
            relay.settimeout(DEADLINE)
            relay.connect(str(proxy.vsock_dir / "9000"))
            relay.sendall(b"still relaying")
            relay.shutdown(socket.SHUT_WR)
            assert read_to_end(relay) == (b"still relaying", "eof")
        assert sent.wait(DEADLINE)
        elapsed = qproxy.time.monotonic() - started
        assert elapsed >= 1.5, f"{len(flood)} bytes taken in {elapsed:.2f} s"
    finally:
        peer.close()


def test_a_long_record_fits_one_control_message_whatever_its_characters():
    outbox = qproxy.LogOutbox()
    for text in ("a" * 100_000, "\x01" * 100_000, "\U0001F600" * 100_000):
        outbox.emit(qproxy.logging.LogRecord("qproxy", qproxy.logging.INFO, "", 0, text, None, None))
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(DEADLINE)
        reader = qproxy.MessageReader(b)
        threading.Thread(target=outbox.send, args=(a,), daemon=True).start()
        for _ in range(3):
            record = reader.read(deadline=qproxy.time.monotonic() + DEADLINE)  # ValueError if over the bound
            assert len(record["message"]) == qproxy.LOG_MESSAGE_MAX


def test_without_log_location_the_enclave_records_go_to_the_hosts_stderr(proxy):
    proxy.write_config("")
    enclave = proxy.start("enclave")
    host = proxy.start("host")
    for record in (r"WARN  qproxy::enclave no connections configured", r"INFO  qproxy::enclave enclave half ready"):
        line = enclave.wait_log(f".*{record}.*").group(0)  # from the first record on
        host.wait_log(re.escape(line))


# ---------------------------------------------------------------------------
# Readiness: sd_notify
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_the_host_half_tells_systemd_when_it_is_ready_and_stopping(proxy, echo_server, tmp_path, abstract):
    name = f"\0qproxy-test-{tmp_path.name}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(name)
        systemd.settimeout(DEADLINE)
        host_port = free_port()
        proxy.write_config(inbound(host_port, echo_server.port))
        notify = "@" + name[1:] if abstract else name
        host = proxy.start("host", env={"NOTIFY_SOCKET": notify}, ready=False)
        assert systemd.recv(4096) == b"READY=1\nSTATUS=waiting for the enclave half"
        try:  # listening already: accepted, then reset at once, as no enclave half answers yet
            socket.create_connection(("127.0.0.1", host_port), timeout=DEADLINE).close()
        except ConnectionResetError:
            pass  # the reset came before connect() returned; a refusal would be ConnectionRefusedError
        proxy.start("enclave", env={"NOTIFY_SOCKET": ""})
        assert systemd.recv(4096).startswith(b"STATUS=enclave half connected")
        host.process.send_signal(signal.SIGTERM)
        assert systemd.recv(4096) == b"STOPPING=1"
        assert host.stop() == 0


# ---------------------------------------------------------------------------
# Whatever entries an enclave half sends, the comparison answers or says why it cannot
# ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=10,
)
entry_like = st.fixed_dictionaries({}, optional={
    key: st.one_of(st.integers(0, 9), st.booleans(), st.text(max_size=3),
                   st.sampled_from(["a.example", "a\nb", "v1", "auto", "127.0.0.2"]))
    for key in ("vsock_port", "host_port", "enclave_port", "hostname", "tcp_port", "proxy_protocol", "enclave_address")
})
entries_like = json_values | st.fixed_dictionaries({}, optional={
    "inbound": st.lists(entry_like, max_size=3) | json_values, "outbound": st.lists(entry_like, max_size=3) | json_values,
})


@settings(max_examples=1000, deadline=None)
@given(entries=entries_like)
def test_any_entries_compare_or_fail_with_a_value_error(entries):
    host = qproxy.entries_of(qproxy.Config(
        inbound=(qproxy.Inbound(80, 8080, 1, "0.0.0.0", "v2", False),),
        outbound=(qproxy.Outbound("a.example", 2, 443, 443, "auto"),),
    ))
    try:
        mismatches = qproxy.config_mismatches(host, entries)
    except ValueError:
        return
    assert all(isinstance(line, str) and "\n" not in line for line in mismatches)
    assert qproxy.config_mismatches(entries, entries) == []  # well-formed entries match themselves


@pytest.mark.parametrize("hostname", ["a\nb", "api.example.com\r\nERROR qproxy::host forged", "", "a b"])
def test_an_enclave_hostname_that_is_no_hostname_is_refused_not_logged(hostname):
    entries = {"inbound": [], "outbound": [{"vsock_port": 2, "hostname": hostname, "tcp_port": 443, "enclave_port": 443}]}
    with pytest.raises(ValueError):
        qproxy.config_mismatches(qproxy.entries_of(qproxy.Config()), entries)


def test_the_enclave_half_survives_a_host_half_that_sends_garbage(proxy, fake_host):
    proxy.write_config("")
    enclave = proxy.start("enclave")
    peer, _ = accept_enclave(fake_host, heartbeat=5)
    peer.sock.sendall(b"[" * 5000 + b"]" * 5000 + b"\n")
    # Too deep for the JSON parser (Python 3.12 and older), or parsed and then no object (3.13): a bad message.
    enclave.wait_log(r"control: connection to the host half failed: a message (nested too deeply|without a type)")
    peer.close()
    again, greeting = accept_enclave(fake_host, heartbeat=5)  # it dials again
    again.close()
    assert greeting["type"] == "hello" and "Traceback" not in enclave.log()


def test_a_host_half_that_hangs_up_at_once_meets_the_back_off(proxy, fake_host):
    proxy.write_config("")
    proxy.start("enclave")
    hellos = 0
    started = qproxy.time.monotonic()
    fake_host.settimeout(0.5)
    while qproxy.time.monotonic() - started < 3.0:  # a window to count dials in, not a wait
        try:
            peer, _ = accept_enclave(fake_host, heartbeat=5)
        except socket.timeout:
            continue
        hellos += 1
        peer.close()  # answered, then gone
    # Back-off from 0.1 s doubling: 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s fills the window with about five dials.
    assert 2 <= hellos <= 7, f"{hellos} dials in 3 s"


def test_forward_enclave_log_false_keeps_the_enclaves_log_in_the_enclave(proxy, fake_host, tmp_path):
    proxy.write_config(log_location(tmp_path / "logs") + "forward_enclave_log = false\n")
    proxy.start("enclave", ready=False)
    wait_ready(tmp_path / "logs" / "enclave" / "enclave.log", "enclave")
    peer, _ = accept_enclave(fake_host, heartbeat=5)
    try:
        assert peer.receive()["type"] == "heartbeat"  # the first message after the hello: no log record before it
    finally:
        peer.close()


def test_records_a_stuck_writer_has_not_written_cost_the_link_one_entry_a_queue_position():
    """A host half whose log writer is stuck (its queue full: a position that no longer moves) keeps
    what it owes the enclave half in one entry however many records a peer floods it with, rather
    than one entry per read for as long as the writer stays stuck."""
    ours, theirs = socket.socketpair()
    writes = qproxy.LogQueue()  # nothing takes from it: the position stays where it is
    link = qproxy.ControlLink(ours, qproxy.MessageReader(ours), "enclave", None, lambda message: None,
                              written_by=writes)
    try:
        for n in range(200):
            theirs.sendall(message(type="log", time="2026-11-27T10:00:00.000Z", level="INFO", message=f"r{n}"))
            assert link.receive(qproxy.time.monotonic())
        assert list(link.unwritten) == [(0, 200)]
    finally:
        ours.close()
        theirs.close()


EGRESS_ENTRY = qproxy.Egress(3128, 8000, ["*.example.com:443"], [])


def test_the_egress_tables_are_compared_by_their_ports_not_their_rules():
    host = qproxy.entries_of(qproxy.Config(egress=EGRESS_ENTRY._replace(allow=[], deny=["a.example.com"])))
    enclave = qproxy.entries_of(qproxy.Config(egress=EGRESS_ENTRY))
    assert qproxy.config_mismatches(host, enclave) == []  # each half's rules are its own
    moved = qproxy.entries_of(qproxy.Config(egress=EGRESS_ENTRY._replace(proxy_port=1080)))
    assert qproxy.config_mismatches(host, moved) == [
        "egress vsock port 8000: the host half's proxy_port is 3128, the enclave half's 1080"]
    assert qproxy.config_mismatches(qproxy.entries_of(qproxy.Config()), enclave) == [
        "the enclave half asks for the destinations of proxy port 127.0.0.1:3128 on vsock port 8000, but the host"
        " half has no egress entry for vsock port 8000"]
    assert qproxy.config_mismatches(host, qproxy.entries_of(qproxy.Config())) == [
        "the host half dials the destinations asked for on vsock port 8000, but the enclave half has no egress"
        " entry for vsock port 8000"]


def test_a_hello_from_a_version_before_egress_compares_as_one_without_it():
    older = {"inbound": [], "outbound": []}
    assert qproxy.config_mismatches(qproxy.entries_of(qproxy.Config()), older) == []

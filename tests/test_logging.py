"""Issue 11, items 1-3: logging that never stalls traffic, bounded logs, and signals (SIGHUP reopens and
reloads, SIGQUIT drains, SIGUSR1/SIGUSR2 do nothing).  Both halves run as real subprocesses over emulated
vsock; each test fails when the behaviour it names is removed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    DEADLINE, QPROXY, ROOT, Half, ThreadedServer, echo, free_port, inbound, read_to_end, recv_all, wait_for,
)

MiB = 1 << 20
F_GETPIPE_SZ = 1032  # fcntl.F_GETPIPE_SZ from Python 3.10 on
STOP_WITHIN = 8.0  # seconds from SIGTERM to the exit: the grace period (5 s), the log's last second, slack


# --- helpers ---------------------------------------------------------------------------------


def toml_string(value) -> str:
    return json.dumps(str(value))  # a TOML basic string, for the plain paths used here


def log_location(host_dir: Path, enclave_dir: Path, **keys) -> str:
    lines = [f"host_log_dir = {toml_string(host_dir)}", f"enclave_log_dir = {toml_string(enclave_dir)}"]
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "[log_location]\n" + "\n".join(lines) + "\n"


def start(proxy, role: str, config: Path, env: dict | None = None, args: tuple = ()) -> Half:
    """A half with exactly this config file (the host given enclave CID 4); its stdout and stderr go to a file."""
    extra = ["4"] if role == "host" else []
    half = Half(role, ["--config", str(config), *args, *extra], proxy.env(env),
                proxy.folder / f"{role}-{len(proxy.halves)}.out")
    proxy.halves.append(half)
    return half


def text_of(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_file(path: Path, pattern: str, half: Half | None = None, timeout: float = DEADLINE) -> re.Match:
    """Wait until pattern is in the file at path; fail at once if half exits meanwhile."""
    def found():
        match = re.search(pattern, text_of(path))
        if not match and half is not None and half.process.poll() is not None:
            raise AssertionError(f"{half.role} half exited with {half.process.returncode}:\n{half.log()}\n"
                                 f"{path}:\n{text_of(path)[-3000:]}")
        return match
    return wait_for(found, f"{pattern!r} in {path}", timeout)


def echo_once(port: int, payload: bytes = b"ping", timeout: float = DEADLINE) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def wait_echo(port: int, payload: bytes = b"ping", processes=()) -> None:
    """Wait until a connection through 127.0.0.1:port comes back with its own bytes."""
    def through() -> bool:
        for process in processes:
            assert process.poll() is None, f"a half exited with {process.returncode} before serving"
        try:
            return echo_once(port, payload, timeout=2) == payload
        except OSError:
            return False
    wait_for(through, f"an echo through 127.0.0.1:{port}")


def relay_many(port: int, count: int, threads: int = 8, timeout: float = 5.0, within: float = 45.0) -> list[str]:
    """count connections through 127.0.0.1:port, threads at a time, each exchanging a few bytes; what went
    wrong (empty when every one was served).  Stops at the first failure or after `within` seconds."""
    failures: list[str] = []
    stop = threading.Event()
    end = time.monotonic() + within
    counter = iter(range(count))
    lock = threading.Lock()

    def work() -> None:
        while not stop.is_set():
            with lock:
                number = next(counter, None)
            if number is None:
                return
            if time.monotonic() > end:
                failures.append(f"not done within {within} s")
                stop.set()
                return
            payload = b"%d" % number
            try:
                got = echo_once(port, payload, timeout)
                if got != payload:
                    raise AssertionError(f"{got!r} came back for {payload!r}")
            except (OSError, AssertionError) as error:
                failures.append(f"connection {number}: {error!r}")
                stop.set()

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(within + 2 * timeout)
    return failures


def stop_in_time(process: subprocess.Popen, within: float = STOP_WITHIN, sig=signal.SIGTERM) -> tuple[int | None, float]:
    """Signal the process and wait up to `within` seconds: its exit code (None when still running) and the time."""
    started = time.monotonic()
    process.send_signal(sig)
    try:
        return process.wait(within), time.monotonic() - started
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - started


@pytest.fixture
def echo2():
    """A second service, told apart from echo_server by what it answers."""
    def tagged(sock: socket.socket) -> None:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(b"two:" + data)
        sock.shutdown(socket.SHUT_WR)
    server = ThreadedServer(tagged)
    yield server
    server.stop()


# --- 1. logging never stalls the data path -------------------------------------------------------


def test_a_stderr_pipe_nobody_reads_neither_stalls_2000_connections_nor_a_stop(proxy, echo_server):
    host_port = free_port()
    proxy.write_config(inbound(host_port, echo_server.port))
    env = proxy.env({"RUST_LOG": "info", "NOTIFY_SOCKET": ""})
    halves = {}
    try:
        for role, extra in (("enclave", []), ("host", ["4"])):
            halves[role] = subprocess.Popen(  # stderr: a pipe this test never reads
                [sys.executable, str(QPROXY), role, "--config", str(proxy.config), *extra],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        wait_echo(host_port, processes=halves.values())
        failures = relay_many(host_port, 2000, within=40.0)
        problems = [f"{len(failures)} connections not served, the first: {failures[0]}"] if failures else []
        for role, process in halves.items():
            code, took = stop_in_time(process)
            if code != 0:
                problems.append(f"the {role} half, its stderr blocked: exit {code} {took:.1f} s after SIGTERM")
        assert not problems, "; ".join(problems)
        for role, process in halves.items():  # the scenario held: each half's stderr pipe was full
            capacity = fcntl.fcntl(process.stderr.fileno(), F_GETPIPE_SZ)
            held = len(process.stderr.read())
            assert held >= capacity // 2, f"only {held} bytes waited in the {role} half's stderr pipe ({capacity})"
    finally:
        for process in halves.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stderr.close()


# --- 2. bounded logs: rotation ----------------------------------------------------------------------


def log_files(folder: Path, name: str) -> dict[str, Path]:
    return {path.name: path for path in folder.glob(name + "*")}


def assert_rotated(folder: Path, name: str, first_record: str) -> None:
    files = log_files(folder, name)
    assert sorted(files) == [name, name + ".1", name + ".2"], f"in {folder}: {sorted(files)}"
    for path in files.values():
        text = path.read_text(errors="replace")
        longest = max(map(len, text.splitlines(keepends=True)), default=0)
        assert path.stat().st_size <= MiB + longest, f"{path}: {path.stat().st_size} bytes"
        assert first_record not in text, f"{path} still holds the first records: rotated too few times"


def test_logs_rotate_at_log_max_size_keeping_log_backups(proxy, echo_server, tmp_path):
    host_dir, enclave_dir = tmp_path / "host-logs", tmp_path / "enclave-logs"
    host_port = free_port()
    proxy.write_config(log_location(host_dir, enclave_dir, log_max_size=1, log_backups=2)
                       + inbound(host_port, echo_server.port))
    enclave = start(proxy, "enclave", proxy.config, {"RUST_LOG": "info"})
    wait_file(enclave_dir / "enclave.log", "enclave half ready", enclave)
    host = start(proxy, "host", proxy.config, {"RUST_LOG": "info"})
    wait_file(host_dir / "host.log", "host half ready", host)
    wait_echo(host_port)

    # Each connection writes about 270 bytes to each log.  Go on until the first records (the "ready"
    # lines) were rotated out of every file: at least three rotations of each, over 3 MiB written.
    def rotated_out(folder: Path, name: str, first: str) -> bool:
        return not any(first in text_of(path) for path in log_files(folder, name).values())

    wanted = [(host_dir, "host.log", "host half ready"), (host_dir, "enclave.log", "enclave half ready"),
              (enclave_dir, "enclave.log", "enclave half ready")]
    end = time.monotonic() + 50
    relayed = 0
    while not all(rotated_out(*each) for each in wanted):
        assert time.monotonic() < end and relayed < 40_000, (
            f"after {relayed} connections: " + ", ".join(f"{folder.name}: {sorted(log_files(folder, name))}"
                                                           for folder, name, _ in wanted))
        failures = relay_many(host_port, 1000, within=30)
        assert not failures, failures[0]
        relayed += 1000
    assert host.stop() == 0 and enclave.stop() == 0
    for folder, name, first in wanted:
        assert_rotated(folder, name, first)


# --- 2. bounded logs: a full disk ----------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path, proxy):
    """A 256 KiB tmpfs, unmounted at the end whatever happens (after the halves that write there)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs takes root and mount(8)")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True, text=True, timeout=DEADLINE)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        for half in proxy.halves:
            if half.process.poll() is None:
                half.process.kill()
                half.process.wait()
        if subprocess.run(["umount", str(folder)], capture_output=True, timeout=DEADLINE).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=DEADLINE)


def fill(folder: Path, leave: int) -> Path:
    """A file that takes all the room in folder but `leave` bytes (bounded: the tmpfs is 256 KiB)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        for _ in range(1024):
            try:
                out.write(b"\0" * 4096)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                break
        else:
            raise AssertionError(f"{folder} never filled up")
        out.truncate(max(os.fstat(out.fileno()).st_size - leave, 0))
    return filler


def test_a_full_disk_costs_a_line_on_stderr_not_traffic_and_logging_resumes(proxy, echo_server, small_tmpfs, tmp_path):
    host_port = free_port()
    proxy.write_config(log_location(small_tmpfs, tmp_path / "enclave-logs") + inbound(host_port, echo_server.port))
    enclave = start(proxy, "enclave", proxy.config, {"RUST_LOG": "info"})
    wait_file(tmp_path / "enclave-logs" / "enclave.log", "enclave half ready", enclave)
    host = start(proxy, "host", proxy.config, {"RUST_LOG": "info"})
    host_log = small_tmpfs / "host.log"
    wait_file(host_log, "host half ready", host)
    wait_echo(host_port)
    filler = fill(small_tmpfs, leave=8192)

    failures = relay_many(host_port, 500)
    assert not failures, f"traffic suffered from the full disk: {failures[0]}"
    wait_for(lambda: re.search("qproxy: cannot write the log|Logging error", host.log()),
             "the host half saying it cannot write its log")
    assert host.process.poll() is None
    stderr = host.log()
    assert "Logging error" not in stderr and "Traceback" not in stderr, stderr[:3000]
    reports = [line for line in stderr.splitlines() if line.startswith("qproxy: cannot write the log")]
    assert 1 <= len(reports) <= 2, stderr[:3000]
    assert all(re.fullmatch(r"qproxy: cannot write the log to \S+ \(.+\); records are lost until it can be"
                            r" written again", line) for line in reports), reports

    filler.unlink()  # room again
    def resumed():  # in the host half's own log, and in its copy of the enclave's, whose lines have the enclave's time
        assert not relay_many(host_port, 20)
        return all(re.search(rf"WARN  qproxy::{role} \d+ log records were lost while the log could not be written\n"
                             rf"(.*\n)*.*INFO  qproxy::{role} conn \d+ closed", text_of(small_tmpfs / f"{role}.log"))
                   for role in ("host", "enclave"))
    wait_for(resumed, "records in host.log and the enclave log's copy again, after the count of those lost")
    assert host.stop() == 0 and enclave.stop() == 0
    stderr = host.log()
    assert "Logging error" not in stderr and "Traceback" not in stderr, stderr[:3000]
    assert "Formatting field" not in stderr, stderr[:3000]
    assert len([line for line in stderr.splitlines() if line.startswith("qproxy: cannot write the log")]) <= 2


def test_a_fifo_nobody_reads_as_the_log_file_does_not_hold_the_start(proxy, tmp_path):
    """A log path that is a FIFO no process has open: the half waits for no reader to come; it says
    it cannot write there, logs to stderr, and serves."""
    folder = tmp_path / "logs"
    folder.mkdir()
    os.mkfifo(folder / "host.log")
    proxy.write_config(log_location(folder, tmp_path / "enclave-logs"))
    host = start(proxy, "host", proxy.config, {"RUST_LOG": "info"})
    host.wait_log("host half ready")
    assert re.search(r"qproxy: cannot write the log file \S+/host\.log \(No such device or address\); logging to"
                     r" stderr", host.log()), host.log()[:3000]
    assert host.stop() == 0


# --- 3. signals: logrotate and SIGHUP -------------------------------------------------------------


@pytest.fixture
def logrotate():
    found = shutil.which("logrotate") or next(
        (path for path in ("/usr/sbin/logrotate", "/sbin/logrotate") if os.access(path, os.X_OK)), None)
    if not found:
        pytest.skip("logrotate is not installed (Debian: apt-get install logrotate)")
    return found


def logrotate_config(folder: Path, postrotate: str | None, copytruncate: bool = False) -> Path:
    """examples/qproxy.logrotate for logs in folder: its postrotate script replaced (or removed), copytruncate added."""
    text = (ROOT / "examples" / "qproxy.logrotate").read_text()
    assert "/var/log/qproxy/*.log" in text
    text = text.replace("/var/log/qproxy", str(folder))
    script = re.compile(r"^(\s*)postrotate\n.*?^\s*endscript\n", re.M | re.S)
    assert script.search(text), "examples/qproxy.logrotate has no postrotate script"
    if postrotate is None:
        text = script.sub("", text)
    else:
        text = script.sub(lambda m: f"{m[1]}postrotate\n{m[1]}    {postrotate}\n{m[1]}endscript\n", text)
    if copytruncate:
        text = text.replace("{\n", "{\n    copytruncate\n", 1)
    config = folder.parent / "logrotate.conf"
    config.write_text(text)
    os.chmod(config, 0o644)
    return config


def run_logrotate(binary: str, config: Path) -> None:
    done = subprocess.run([binary, "-f", "-s", str(config.parent / "logrotate.state"), str(config)],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, f"logrotate: {done.returncode}\n{done.stdout}{done.stderr}\n{config.read_text()}"


# qproxy's own rotation left on (far from log_max_size here), or off as examples/qproxy.logrotate suggests:
# with it off, nothing seeks to the end of the file before a write, so O_APPEND alone makes copytruncate work.
OWN_ROTATION = pytest.mark.parametrize("own_rotation", [{}, {"log_backups": 0}], ids=["own-rotation", "log_backups-0"])


def started_with_logs(proxy, echo_server, tmp_path, own_rotation: dict) -> tuple[Half, Half, Path, int]:
    host_dir = tmp_path / "logs"
    host_port = free_port()
    proxy.write_config(log_location(host_dir, tmp_path / "enclave-logs", **own_rotation)
                       + inbound(host_port, echo_server.port))
    enclave = start(proxy, "enclave", proxy.config, {"RUST_LOG": "info"})
    wait_file(tmp_path / "enclave-logs" / "enclave.log", "enclave half ready", enclave)
    host = start(proxy, "host", proxy.config, {"RUST_LOG": "info"})
    wait_file(host_dir / "host.log", "host half ready", host)
    wait_echo(host_port)
    wait_file(host_dir / "enclave.log", "enclave half ready", host)
    return host, enclave, host_dir, host_port


def last_conn(path: Path) -> int:
    return max(map(int, re.findall(r"conn (\d+) closed", text_of(path))), default=0)


@OWN_ROTATION
def test_logrotate_renames_and_sighup_makes_the_host_half_write_new_files(
        proxy, echo_server, tmp_path, logrotate, own_rotation):
    host, enclave, logs, host_port = started_with_logs(proxy, echo_server, tmp_path, own_rotation)
    run_logrotate(logrotate, logrotate_config(logs, postrotate=f"kill -HUP {host.process.pid}"))
    assert (logs / "host.log.1").exists() and (logs / "enclave.log.1").exists(), sorted(os.listdir(logs))
    wait_file(logs / "host.log", r"INFO  qproxy::host SIGHUP: reopening the log files", host)
    sizes = {name: (logs / name).stat().st_size for name in ("host.log.1", "enclave.log.1")}
    before = last_conn(logs / "host.log.1")
    assert not relay_many(host_port, 50)
    wait_for(lambda: last_conn(logs / "host.log") > before, "new connections in the new host.log")
    wait_for(lambda: "qproxy::enclave conn" in text_of(logs / "enclave.log"), "new records in the new enclave.log")
    assert host.process.poll() is None, f"the host half exited with {host.process.returncode} on SIGHUP"
    assert host.stop() == 0 and enclave.stop() == 0
    assert {name: (logs / name).stat().st_size for name in sizes} == sizes, "a renamed file kept growing"
    assert "host half stopped" in text_of(logs / "host.log")


@OWN_ROTATION
def test_logrotate_copytruncate_needs_no_signal(proxy, echo_server, tmp_path, logrotate, own_rotation):
    host, enclave, logs, host_port = started_with_logs(proxy, echo_server, tmp_path, own_rotation)
    size = (logs / "host.log").stat().st_size
    run_logrotate(logrotate, logrotate_config(logs, postrotate=None, copytruncate=True))
    assert "host half ready" in text_of(logs / "host.log.1")
    before = last_conn(logs / "host.log.1")
    assert not relay_many(host_port, 50)
    wait_for(lambda: last_conn(logs / "host.log") > before, "new connections in the truncated host.log")
    assert host.stop() == 0 and enclave.stop() == 0
    data = (logs / "host.log").read_bytes()
    assert b"\0" not in data, "written at the old offset: the truncated file got a hole"
    assert data.startswith(b"20") and "host half ready" not in data.decode(errors="replace")
    assert len(data) < size + 50 * 600


# --- 3. signals: SIGHUP reloads the host half's file ------------------------------------------------------


class Systemd:
    """The test's NOTIFY_SOCKET: the datagrams a half sends, read with a deadline."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(DEADLINE)
        self.path = path

    def until(self, prefix: str) -> list[str]:
        """Messages up to the first that starts with prefix, that one last."""
        seen = []
        while not seen or not seen[-1].startswith(prefix):
            try:
                seen.append(self.sock.recv(4096).decode())
            except socket.timeout:
                raise AssertionError(f"no {prefix!r} from the half within {DEADLINE} s; got {seen}") from None
        return seen

    def close(self):
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    listener = Systemd(tmp_path / "notify")
    yield listener
    listener.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
    except ConnectionRefusedError:
        return True
    return False


def open_through(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(b"first")
    assert sock.recv(100) == b"first"
    return sock


def finish(sock: socket.socket, payload: bytes = b"second") -> None:
    """The open connection still carries bytes, and ends in order."""
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == (payload, "eof")


def test_sighup_reloads_the_host_halfs_entries_and_keeps_them_when_the_file_is_bad(
        proxy, echo_server, echo2, systemd, tmp_path):
    kept, removed, changed, added = (free_port() for _ in range(4))
    enclave_config = tmp_path / "enclave.toml"  # the enclave half never reloads: it has every route from the start
    enclave_config.write_text(inbound(kept, echo_server.port, 9001) + inbound(removed, echo_server.port, 9002)
                              + inbound(changed, echo_server.port, 9003) + inbound(free_port(), echo2.port, 9004)
                              + inbound(added, echo_server.port, 9005))
    host_config = tmp_path / "host.toml"
    host_config.write_text(inbound(kept, echo_server.port, 9001) + inbound(removed, echo_server.port, 9002)
                           + inbound(changed, echo_server.port, 9003))
    enclave = start(proxy, "enclave", enclave_config, {"NOTIFY_SOCKET": ""})
    enclave.wait_log("enclave half ready")
    host = start(proxy, "host", host_config, {"NOTIFY_SOCKET": str(systemd.path)})
    host.wait_log("host half ready")
    systemd.until("STATUS=enclave half connected")
    for port in (kept, removed, changed):
        assert echo_once(port) == b"ping"
    assert refused(added)
    still_open = open_through(removed)

    # Added, removed while a connection is open, and changed: vsock port 9004 leads to the other service.
    host_config.write_text(inbound(kept, echo_server.port, 9001) + inbound(changed, echo_server.port, 9004)
                           + inbound(added, echo_server.port, 9005))
    host.process.send_signal(signal.SIGHUP)
    reloading = systemd.until("RELOADING=1")[-1]
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", reloading)
    assert match, reloading
    assert abs(int(match[1]) - time.monotonic_ns() // 1000) < 60_000_000, "MONOTONIC_USEC is not CLOCK_MONOTONIC"
    ready = systemd.until("READY=1")[-1]
    assert ready.startswith("READY=1\nSTATUS=reloaded: ")
    assert sorted(ready.split(": ", 1)[1].split(", ")) == ["1 added", "1 changed", "1 removed"], ready
    host.wait_log(rf"reload: {re.escape(str(host_config))}: .*1 removed")
    log = host.log()
    assert re.search(rf"reload: no longer listening on tcp 0\.0\.0\.0:{removed}\n", log)
    assert re.search(rf"reload: tcp 0\.0\.0\.0:{changed} -> vsock 4:9004 from now on\n", log)
    assert re.search(rf"listening on tcp 0\.0\.0\.0:{added} -> vsock 4:9005\n", log)

    def served_as_reloaded() -> None:
        assert echo_once(kept) == b"ping"
        assert echo_once(added) == b"ping"
        assert echo_once(changed) == b"two:ping"
        assert refused(removed)
    served_as_reloaded()
    finish(still_open)  # its listener is gone, it goes on to its end

    # A file with problems: every problem logged, nothing changes.
    host_config.write_text(inbound(kept, echo_server.port, 9001) + "[[inbound_connections]]\nhost_port = 0\n"
                           "vsock_port = 9006\n")
    host.process.send_signal(signal.SIGHUP)
    assert systemd.until("RELOADING=1")[-1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert systemd.until("READY=1")[-1].startswith("READY=1\nSTATUS=reload failed")
    host.wait_log(rf"ERROR qproxy::host reload: {re.escape(str(host_config))} has problems; the running"
                  r" configuration stays")
    problems = re.findall(r"ERROR qproxy::host reload: (.*)\n", host.log())
    assert len(problems) >= 3, problems  # host_port 0, the missing enclave_port, then the verdict
    served_as_reloaded()
    assert host.process.poll() is None and enclave.process.poll() is None
    assert host.stop() == 0 and enclave.stop() == 0


# --- 3. signals: SIGUSR1, SIGUSR2, SIGQUIT, SIGHUP on the enclave half, a routine stop ------------------


def test_sigusr1_and_sigusr2_leave_both_halves_serving(proxy, echo_server):
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, echo_server.port))
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        for half in (host, enclave):
            half.process.send_signal(sig)
        assert echo_once(host_port) == b"ping"  # both halves ran after the signal came
        for half in (host, enclave):
            assert half.process.poll() is None, f"{sig.name} ended the {half.role} half: {half.process.returncode}"
    assert host.stop() == 0 and enclave.stop() == 0


@pytest.mark.parametrize("role", ["host", "enclave"])
def test_sigquit_drains_like_sigterm(proxy, echo_server, role):
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, echo_server.port))
    half = host if role == "host" else enclave
    connection = open_through(host_port)
    half.process.send_signal(signal.SIGQUIT)
    half.wait_log(rf"INFO  qproxy::{role} SIGQUIT: stopping")
    finish(connection)  # within the grace period
    assert half.process.wait(STOP_WITHIN) == 0
    assert half.wait_log(f"{role} half stopped")


def test_sighup_on_the_enclave_half_reopens_its_log_and_nothing_else(proxy, echo_server, tmp_path):
    host_port = free_port()
    enclave_dir = tmp_path / "enclave-logs"
    proxy.write_config(log_location(tmp_path / "host-logs", enclave_dir) + inbound(host_port, echo_server.port))
    enclave = start(proxy, "enclave", proxy.config, {"RUST_LOG": "info"})
    wait_file(enclave_dir / "enclave.log", "enclave half ready", enclave)
    host = start(proxy, "host", proxy.config, {"RUST_LOG": "info"})
    wait_file(tmp_path / "host-logs" / "host.log", "host half ready", host)
    wait_echo(host_port)
    os.rename(enclave_dir / "enclave.log", enclave_dir / "enclave.log.old")
    enclave.process.send_signal(signal.SIGHUP)
    wait_file(enclave_dir / "enclave.log", r"INFO  qproxy::enclave SIGHUP: reopening the log files", enclave)
    assert echo_once(host_port) == b"ping"
    wait_file(enclave_dir / "enclave.log", r"conn \d+ closed", enclave)
    assert enclave.process.poll() is None
    assert "reload" not in text_of(enclave_dir / "enclave.log")
    assert host.stop() == 0 and enclave.stop() == 0


@pytest.mark.parametrize("role", ["host", "enclave"])
def test_a_routine_sigterm_stop_logs_at_info(proxy, echo_server, role):
    host, enclave = proxy.start_both(inbound(free_port(), echo_server.port))
    half = host if role == "host" else enclave
    assert half.stop() == 0
    log = half.log()
    assert re.search(rf"INFO  qproxy::{role} SIGTERM: stopping\n", log), log[-2000:]
    assert not re.search(r"WARN .*SIGTERM", log), log[-2000:]


# --- 2. bounded logs: a recurring warning is throttled ---------------------------------------------------------


def test_an_unreachable_service_is_one_warning_not_one_per_connection(proxy):
    host_port, closed_port = free_port(), free_port()
    proxy.write_config(inbound(host_port, closed_port))
    enclave = proxy.start("enclave", env={"RUST_LOG": ""}, ready=False)  # the default level: warn
    wait_for(lambda: (proxy.vsock_dir / "9000").exists() or enclave.process.poll() is not None,
             "the enclave half's vsock port")
    host = proxy.start("host", env={"RUST_LOG": ""}, ready=False)

    def ends(sock_port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", sock_port), timeout=DEADLINE) as sock:
                sock.sendall(b"x")
                read_to_end(sock)
            return True
        except ConnectionRefusedError:
            return False
        except OSError:
            return True
    wait_for(lambda: ends(host_port), "the host half listening")
    for _ in range(200):
        assert ends(host_port)
    assert host.process.poll() is None and enclave.process.poll() is None
    assert enclave.stop() == 0 and host.stop() == 0
    lines = [line for line in enclave.log().splitlines() if "cannot reach" in line]
    assert 1 <= len(lines) <= 2, "\n".join(lines[:5])
    assert re.search(rf"WARN  qproxy::enclave conn \d+: cannot reach tcp 127\.0\.0\.1:{closed_port}: ", lines[0])

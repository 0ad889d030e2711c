#!/usr/bin/env python3
"""The part of build-rootfs.sh that needs Python: the standard library qproxy imports, compiled.

    python3 rootfs_stdlib.py QPROXY_PY ROOTFS TARGET FLAG...

Run it with the python3 the image gets: bytecode is that version's.  It runs
QPROXY_PY as the image will (python3 FLAG... qproxy.py) under ``-X importtime``,
which names on stderr every module a process imports, as it imports it:

- both halves over emulated vsock, connected, relaying a connection each way
  and one to a dead service, then SIGHUP (the logs reopened) and SIGTERM;
- ``check-config`` on a good file and on one with a misspelled key, a mistyped
  command and ``enclave --help``: paths that import late (difflib, textwrap).

So the list is made, not kept, and follows qproxy.py as it changes; the VM
checks (tests/vm/) then run both halves from the result.  Into ROOTFS, at the
same absolute paths as on this machine, go each module that is a source file,
as bytecode in the source's place (x.py -> x.pyc, which Python loads with no
source beside it), and each extension module (.so); QPROXY_PY's bytecode goes
to ROOTFS/TARGET.  Built-in and frozen modules need no file; os.pyc goes in
though os is frozen, as the landmark by which python3 finds its standard
library at start.

One family goes in whether the probe meets it or not: the codecs of Unicode's
own encodings (UNICODE_CODECS).  A codec is imported when first looked up by
name, and the name may come from the data: json.loads() picks UTF-16 or -32,
big- or little-endian, by the first bytes of a message, and a control message
is whatever the other side sent; escaped() turns a character the other half
sent into unicode_escape.  Without them a hostile or odd message would make a
half fail with LookupError (the VM check control_hostile found it).
"""

from __future__ import annotations

import json
import os
import py_compile
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

DEADLINE = 20.0  # seconds any one wait of the probe may take
LANDMARK = "os"  # python3 looks for lib/pythonX.Y/os.py, or os.pyc, to find its prefix
# Bytecode that is the same on every build of the same files: the EIF's measurement (PCR0) with it.
INVALIDATION = py_compile.PycInvalidationMode.UNCHECKED_HASH
# The standard library as python3 -OO compiles it (a configuration CPython tests): no docstrings or
# assert statements, 0.4 MB less image and 0.6 MB less RSS.  qproxy.py keeps both: it runs as tested.
STDLIB_OPTIMIZE = 2
UNICODE_CODECS = ("utf_8", "utf_8_sig", "utf_16", "utf_16_be", "utf_16_le", "utf_32", "utf_32_be", "utf_32_le",
                  "unicode_escape", "raw_unicode_escape")  # a few kilobytes each
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)$")
RESOLVE = """
import importlib.util, json, sys
origins = {}
for name in sys.argv[1:]:
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        spec = None  # tried and missed by its importer (pickle's org.python.core): nothing to copy
    origins[name] = spec.origin if spec else None
print(json.dumps(origins))
"""


class ProbeFailed(Exception):
    """qproxy did not run through the probe as expected: its module list would be short."""


def imported(stderr: str) -> set[str]:
    return {match.group(1) for match in map(IMPORT_LINE.match, stderr.splitlines()) if match}


def without_imports(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


class Probe:
    """qproxy.py run as the image runs it, in a scratch folder; every process's imports noted."""

    def __init__(self, qproxy: str, flags: list[str], folder: Path):
        self.command = [sys.executable, *flags, "-X", "importtime", qproxy]
        self.folder = folder
        self.modules: set[str] = set()
        self.halves: dict[str, subprocess.Popen] = {}
        # The image's environment: what qproxy reads and nothing else (no LANG: the C locale, so UTF-8).
        self.env = {"QPROXY_VSOCK_EMULATION": str(folder / "vsock"), "RUST_LOG": "debug"}

    def run(self, *args: str, status: int) -> None:
        """A command that ends by itself, with this exit status."""
        done = subprocess.run([*self.command, *args], capture_output=True, text=True, env=self.env,
                              cwd=self.folder, timeout=DEADLINE)
        if done.returncode != status:
            raise ProbeFailed(f"qproxy {' '.join(args)} exited with {done.returncode}, not {status}:\n"
                              + without_imports(done.stderr))
        self.modules |= imported(done.stderr)

    def start(self, role: str, *args: str) -> None:
        """A half, its stderr (the import lines) kept in a file named after its role."""
        with open(self.folder / f"{role}.stderr", "w") as stderr:
            self.halves[role] = subprocess.Popen([*self.command, role, *args], stdin=subprocess.DEVNULL,
                                                 stdout=subprocess.DEVNULL, stderr=stderr, env=self.env,
                                                 cwd=self.folder)

    def output(self, role: str) -> str:
        """The half's log file, then its stderr without the import lines."""
        log = self.folder / role / f"{role}.log"
        stderr = (self.folder / f"{role}.stderr").read_text(errors="replace")
        return (log.read_text(errors="replace") if log.exists() else "") + without_imports(stderr)

    def wait_log(self, role: str, text: str) -> None:
        """Wait until the half has logged text; fail at once if it exits."""
        log = self.folder / role / f"{role}.log"
        end = time.monotonic() + DEADLINE
        while not (log.exists() and text in log.read_text(errors="replace")):
            if self.halves[role].poll() is not None:
                raise ProbeFailed(f"the {role} half exited with {self.halves[role].returncode} before logging "
                                  f"{text!r}:\n{self.output(role)}")
            if time.monotonic() > end:
                raise ProbeFailed(f"the {role} half did not log {text!r} within {DEADLINE:.0f} s:\n"
                                  f"{self.output(role)}")
            time.sleep(0.02)

    def stop(self, role: str) -> None:
        """SIGTERM, exit 0 expected; its imports noted."""
        half = self.halves[role]
        half.send_signal(signal.SIGTERM)
        try:
            status = half.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            raise ProbeFailed(f"the {role} half did not stop within {DEADLINE:.0f} s of SIGTERM") from None
        if status != 0:
            raise ProbeFailed(f"the {role} half exited with {status}, not 0:\n{self.output(role)}")
        self.modules |= imported((self.folder / f"{role}.stderr").read_text(errors="replace"))

    def kill(self) -> None:
        for half in self.halves.values():
            if half.poll() is None:
                half.kill()
                half.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(folder: Path, ports: dict) -> str:
    """Inbound to a service and to a dead port, outbound to an upstream by name, a log file per half."""
    return f"""
[[inbound_connections]]
host_port = {ports["inbound"]}
enclave_port = {ports["service"]}
vsock_port = 9000

[[inbound_connections]]
host_port = {ports["dead inbound"]}
enclave_port = {ports["dead"]}
vsock_port = 9001

[[outbound_connections]]
hostname = "localhost"
vsock_port = 7000
tcp_port = {ports["upstream"]}
enclave_port = {ports["outbound"]}

[log_location]
log_level = "debug"
host_log_dir = "{folder / "host"}"
enclave_log_dir = "{folder / "enclave"}"
"""


def serve_upper(port: int) -> socket.socket:
    """A TCP service on 127.0.0.1:port answering each connection with what it read, upper-cased."""
    listener = socket.create_server(("127.0.0.1", port))

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the probe is over
            with conn:
                conn.settimeout(DEADLINE)
                conn.sendall(read_all(conn).upper())
    threading.Thread(target=loop, daemon=True).start()
    return listener


def read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, request: bytes) -> bytes:
    """Send request to 127.0.0.1:port, end our side, return what came back (b"" on a reset, which may come
    before connect() returns)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            return read_all(client)
    except ConnectionError:
        return b""


def run_halves(probe: Probe) -> None:
    ports = {name: free_port() for name in ("inbound", "service", "dead inbound", "dead", "upstream", "outbound")}
    path = probe.folder / "qproxy.toml"
    path.write_text(config(probe.folder, ports))
    (probe.folder / "vsock").mkdir()
    services = [serve_upper(ports["service"]), serve_upper(ports["upstream"])]
    try:
        probe.start("host", "--config", str(path), "4")
        probe.wait_log("host", "host half ready")
        probe.start("enclave", "--config", str(path))
        probe.wait_log("enclave", "enclave half ready")
        probe.wait_log("host", "control: enclave half connected")
        for name, request in (("inbound", b"in"), ("outbound", b"out")):
            answer = exchange(ports[name], request)
            if answer != request.upper():
                raise ProbeFailed(f"{name}: got {answer!r}\n{probe.output('host')}\n{probe.output('enclave')}")
        exchange(ports["dead inbound"], b"nobody")
        probe.wait_log("enclave", f"127.0.0.1:{ports['dead']}")
        for role in ("enclave", "host"):
            probe.halves[role].send_signal(signal.SIGHUP)
            probe.wait_log(role, "SIGHUP: reopening the log files")
            probe.stop(role)
    finally:
        probe.kill()
        for service in services:
            service.close()


def probe_modules(qproxy: str, flags: list[str]) -> set[str]:
    with tempfile.TemporaryDirectory(prefix="qproxy-rootfs-") as scratch:
        probe = Probe(qproxy, flags, Path(scratch))
        run_halves(probe)
        probe.run("check-config", str(probe.folder / "qproxy.toml"), status=0)
        (probe.folder / "typo.toml").write_text("[[inbound_connections]]\nhost_prot = 1\n")
        probe.run("check-config", str(probe.folder / "typo.toml"), status=2)
        probe.run("enclaev", status=2)
        probe.run("enclave", "--help", status=0)
        return probe.modules


def origins(names: set[str], flags: list[str]) -> dict:
    """name -> the file the image's python3 imports it from; built-in, frozen and missed ones left out."""
    done = subprocess.run([sys.executable, *flags, "-c", RESOLVE, *sorted(names)], capture_output=True, text=True,
                          check=True, env={})
    return {name: origin for name, origin in json.loads(done.stdout).items() if origin and os.path.isabs(origin)}


def install(files: dict, root: Path) -> None:
    """Each module's file into root at the same path: sources as sourceless bytecode, extensions copied."""
    libraries = {os.path.realpath(sysconfig.get_path(name)) for name in ("stdlib", "platstdlib")}
    for name, origin in sorted(files.items()):
        if not any(os.path.realpath(origin).startswith(folder + os.sep) for folder in libraries):
            raise ProbeFailed(f"qproxy imports {name} from {origin}, outside the standard library")
        target = root / origin.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.endswith(".py"):
            py_compile.compile(origin, cfile=f"{target}c", doraise=True, optimize=STDLIB_OPTIMIZE,
                               invalidation_mode=INVALIDATION)
        else:
            shutil.copy(origin, target)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.exit(__doc__)
    qproxy, root, target, flags = argv[0], Path(argv[1]), argv[2], argv[3:]
    try:
        files = origins(probe_modules(qproxy, flags) | {f"encodings.{codec}" for codec in UNICODE_CODECS}, flags)
        files[LANDMARK] = os.path.join(sysconfig.get_path("stdlib"), f"{LANDMARK}.py")
        install(files, root)
        (root / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        py_compile.compile(qproxy, cfile=str(root / target.lstrip("/")), dfile=target, doraise=True,
                           invalidation_mode=INVALIDATION)
    except (ProbeFailed, py_compile.PyCompileError) as error:
        sys.exit(f"rootfs_stdlib.py: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

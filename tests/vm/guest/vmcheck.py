"""What the guest-side checks share: qproxy's halves, the enclave's namespace, services, clients.

Each check_NAME.py beside this file is an ordinary Python script.  It starts
qproxy's two halves as separate processes over real AF_VSOCK loopback (the
host half is given CID 1 as the enclave's CID, the enclave half
``--parent-cid 1``), drives them with real TCP clients and services, prints
one line, ``PASS NAME`` or ``FAIL NAME: reason`` (followed by indented detail
and both halves' logs on failure), and exits 0 or 1.  Every wait has a
deadline; nothing sleeps and hopes.

The enclave half runs in a network namespace of its own, made with
``unshare -n``: there, as in a fresh enclave, lo is the only interface and
starts down, and vsock (which namespaces do not confine) is the only way out.
The host half stays in the root namespace, so both can use the vendor's
same-port layout (host port 5050, enclave port 5050).  A service or an app
"in the enclave" is a socket created inside that namespace (``Enclave.socket``):
a socket stays in the namespace it was made in, whichever thread uses it.

A half runs as the enclave image's entry point runs it, with no environment
but debug logging (``env -i``): in the VM, whose root filesystem is the image
(examples/build-rootfs.sh), init.sh names the command in QPROXY_VM_HALF
(python3 -I -S /opt/qproxy/qproxy.pyc), so a half can import only what the
image holds, never the checks' own standard library, and a module missing from
the image fails a check.

The VM (tests/vm/run.sh) runs them, but so can you, as root on a Linux machine
whose kernel has vsock_loopback loaded and whose own vsock you do not mind
sharing: ``python3 tests/vm/guest/check_inbound.py``; a half is then this
Python running the repository's qproxy.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
if "QPROXY_VM_HALF" in os.environ:
    HALF = os.environ["QPROXY_VM_HALF"].split()
else:
    HALF = [sys.executable, str(HERE.parent.parent.parent / "qproxy.py")]  # tests/vm/guest/ -> the repository root
QPROXY = Path(HALF[-1])  # qproxy.py, or the image's qproxy.pyc: either imports as the module qproxy
NETNS = HERE / "netns.py"
sys.path.insert(0, str(HERE))
from netns import setns  # noqa: E402

LOCAL_CID = 1  # VMADDR_CID_LOCAL: the vsock loopback transport
DEADLINE = 20.0  # seconds any one wait may take before the check fails
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1


class Failed(AssertionError):
    """The check found qproxy misbehaving."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise Failed(message)


def wait_for(predicate: Callable, what: str, timeout: float = DEADLINE):
    end = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > end:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def recv_all(sock: socket.socket, timeout: float = DEADLINE) -> bytes:
    """Read until EOF; a reset or the deadline raises."""
    sock.settimeout(timeout)
    chunks = []
    end = time.monotonic() + timeout
    while True:
        chunk = sock.recv(256 * 1024)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        if time.monotonic() > end:
            raise Failed(f"no EOF within {timeout:.0f} s")


def exchange(sock: socket.socket, payload: bytes, timeout: float = DEADLINE) -> bytes:
    """Send payload (then end the sending side) while reading the peer's data to EOF; return what was read."""
    def send():
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got = recv_all(sock, timeout)
    sender.join(timeout)
    return got


def read_to_end(sock: socket.socket, timeout: float = DEADLINE) -> tuple[bytes, str]:
    """Read until the peer ends the stream: the bytes, and "EOF" or "reset" for how it ended."""
    data = bytearray()
    end = time.monotonic() + timeout
    while True:
        sock.settimeout(max(end - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(256 * 1024)
        except ConnectionResetError:
            return bytes(data), "reset"
        except TimeoutError:
            raise Failed(f"the stream did not end within {timeout:.0f} s ({len(data)} bytes read)") from None
        if not chunk:
            return bytes(data), "EOF"
        data += chunk


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Process:
    """A child process whose output goes to a log file we can search."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict | None = None):
        self.name = name
        self.role = None  # "host" or "enclave" for a half of qproxy, whose log lines say qproxy::ROLE
        self.log_path = log_path
        self.log_file = open(log_path, "ab")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, env=env)
        self.pid = self.process.pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """User plus system CPU time so far (while it runs), from /proc/PID/stat."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fds(self) -> list[str]:
        """What its open file descriptors are ("socket:[1234]", "anon_inode:[eventpoll]", ...), from /proc/PID/fd."""
        found = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                found.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
            except OSError:
                pass  # closed while we looked
        return found

    def wait_fds(self, count: int, timeout: float = DEADLINE) -> None:
        """Wait until it holds count descriptors; the failure says which it holds instead."""
        try:
            wait_for(lambda: len(self.fds()) == count, f"the {self.name} to hold {count} descriptors", timeout)
        except Failed as error:
            raise Failed(f"{error}; it holds {len(self.fds())}: {sorted(self.fds())}") from None

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_log(self, pattern: str, count: int = 1, timeout: float = DEADLINE) -> list[re.Match]:
        """Wait until pattern has matched count times in the log; fail at once if the process ends."""
        def found():
            matches = list(re.finditer(pattern, self.text()))
            if len(matches) >= count:
                return matches
            if not self.alive():
                raise Failed(f"{self.name} exited with {self.process.returncode} before logging {pattern!r}")
            return None
        return wait_for(found, f"{pattern!r} (x{count}) in the log of {self.name}", timeout)

    def send(self, number: int) -> None:
        if self.alive():
            self.process.send_signal(number)

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"{self.name} still running {timeout:.0f} s later") from None

    def stop(self, number: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        self.send(number)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()
        self.log_file.close()


class Enclave:
    """A fresh network namespace standing in for the enclave: lo only, and lo down."""

    def __init__(self, box: "Box"):
        self.box = box
        self.holder = box.spawn("namespace", ["unshare", "-n", "sleep", "86400"])
        self.path = f"/proc/{self.holder.pid}/ns/net"
        own = os.readlink("/proc/self/ns/net")

        def entered():
            if not self.holder.alive():
                raise Failed(f"unshare -n failed: {self.holder.text().strip()}")
            try:
                return os.readlink(self.path) != own
            except OSError:
                return False
        wait_for(entered, "unshare -n to make the enclave's network namespace")

    def command(self, argv: list[str], uid: int | None = None) -> list[str]:
        """argv run inside this namespace (as uid, when given)."""
        return [sys.executable, str(NETNS), self.path, *(["--uid", str(uid)] if uid is not None else []), *argv]

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in this namespace, made by a thread that entered it."""
        made: dict = {}

        def make():
            try:
                setns(self.path)
                made["socket"] = socket.socket(family, kind)
            except BaseException as error:  # handed to the caller below
                made["error"] = error
        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if "error" in made:
            raise made["error"]
        return made["socket"]

    def lo_is_up(self) -> bool:
        with self.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH", b"lo", 0)
            flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request)[:18])[1]
        return bool(flags & IFF_UP)

    def listening(self, port: int) -> bool:
        """Whether a TCP socket in this namespace listens on port (from /proc/PID/net/tcp)."""
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{self.holder.pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return True
        return False


def half_command(role: str, *args: str) -> list[str]:
    """A half's command line: HALF with no environment but debug logging, as the image runs it."""
    return ["env", "-i", "RUST_LOG=debug", *HALF, role, *args]


def toml_config(inbound: list[tuple[int, int, int]] = (), outbound: list[tuple[str, int, int]] = ()) -> str:
    """inbound: (host_port, enclave_port, vsock_port); outbound: (hostname, vsock_port, tcp_port)."""
    parts = []
    for host_port, enclave_port, vsock_port in inbound:
        parts.append(f"[[inbound_connections]]\nhost_port = {host_port}\nenclave_port = {enclave_port}\n"
                     f"vsock_port = {vsock_port}\n")
    for hostname, vsock_port, tcp_port in outbound:
        parts.append(f'[[outbound_connections]]\nhostname = "{hostname}"\nvsock_port = {vsock_port}\n'
                     f"tcp_port = {tcp_port}\n")
    return "\n".join(parts)


class Box:
    """One check's world: its folder, processes, servers and sockets, all cleaned up at the end."""

    def __init__(self, name: str):
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"qproxy-vm-{name}-"))
        os.chmod(self.dir, 0o755)  # an unprivileged enclave half must read its config here
        self.processes: list[Process] = []
        self.sockets: list[socket.socket] = []
        self.errors: list[str] = []  # failures inside service threads
        self.halves: list[Process] = []
        self.notes: list[str] = []  # measurements worth showing even when the check passes

    # -- processes ---------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> Process:
        taken = {process.name for process in self.processes}
        unique, number = name, 1
        while unique in taken:
            number += 1
            unique = f"{name} #{number}"
        process = Process(unique, argv, self.dir / f"{len(self.processes):02d}-{unique}.log".replace(" ", "-"), env)
        self.processes.append(process)
        return process

    def config(self, text: str, name: str = "qproxy.toml") -> Path:
        path = self.dir / name
        path.write_text(text)
        os.chmod(path, 0o644)
        return path

    def host_half(self, config: Path, name: str = "host half", extra: list[str] = (), cid: int = LOCAL_CID) -> Process:
        half = self.spawn(name, half_command("host", "--config", str(config), *extra, str(cid)))
        half.role = "host"
        self.halves.append(half)
        return half

    def enclave_half(self, config: Path, enclave: Enclave, name: str = "enclave half", uid: int | None = None,
                     parent_cid: int = LOCAL_CID, extra: list[str] = ()) -> Process:
        argv = half_command("enclave", "--config", str(config), *extra, "--parent-cid", str(parent_cid))
        half = self.spawn(name, enclave.command(argv, uid))
        half.role = "enclave"
        self.halves.append(half)
        return half

    def start_pair(self, config: Path, enclave: Enclave) -> tuple[Process, Process]:
        """Both halves, ready, over AF_VSOCK, with the control connection made."""
        host = self.host_half(config)
        host.wait_log(r"host half ready \(.*AF_VSOCK\)")
        guest = self.enclave_half(config, enclave)
        guest.wait_log(r"enclave half ready \(.*AF_VSOCK\)")
        host.wait_log(r"control: enclave half connected")
        return host, guest

    # -- sockets -----------------------------------------------------------

    def note(self, text: str) -> None:
        self.notes.append(text)

    def keep(self, sock: socket.socket) -> socket.socket:
        self.sockets.append(sock)
        return sock

    def connect(self, port: int, enclave: Enclave | None = None, timeout: float = DEADLINE) -> socket.socket:
        """A TCP client to 127.0.0.1:port, inside the enclave's namespace or outside it."""
        sock = self.keep(enclave.socket() if enclave else socket.socket())
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        return sock

    def vsock(self, port: int, cid: int = LOCAL_CID, timeout: float = DEADLINE) -> socket.socket:
        """An AF_VSOCK client to cid:port; from this guest, its CID is LOCAL_CID too."""
        sock = self.keep(socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))
        sock.settimeout(timeout)
        sock.connect((cid, port))
        return sock

    def exchange(self, port: int, request: bytes, enclave: Enclave | None = None) -> bytes:
        """Send request through port, end our side, and return the whole reply."""
        with self.connect(port, enclave) as client:
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            return recv_all(client)

    def server(self, port: int, handler: Callable[[socket.socket], None], enclave: Enclave | None = None) -> None:
        """A TCP service on 127.0.0.1:port, a thread per connection, inside the enclave or outside."""
        listener = self.keep(enclave.socket() if enclave else socket.socket())
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)

        def serve_one(conn: socket.socket) -> None:
            try:
                with conn:
                    conn.settimeout(DEADLINE)
                    handler(conn)
            except Exception as error:
                self.errors.append(f"service on port {port}: {type(error).__name__}: {error}")

        def accept_loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # the listener was closed: the check is over
                threading.Thread(target=serve_one, args=(conn,), daemon=True).start()
        threading.Thread(target=accept_loop, daemon=True).start()

    # -- the end -----------------------------------------------------------

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
        for process in reversed(self.processes):
            process.kill()


def start_both_paths(box: Box, service: Callable[[socket.socket], None]) -> tuple[Path, Enclave, Process, Process]:
    """The pair relaying both ways, service at each far end: host port 5050 to a service in the
    enclave, and an app's 127.0.0.1:8443 in the enclave to a server outside.  (config, enclave, host, guest)."""
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)], outbound=[("127.0.0.1", 7777, 8443)]))
    box.server(8443, service)
    enclave = Enclave(box)
    box.server(5050, service, enclave)
    host, guest = box.start_pair(config, enclave)
    return config, enclave, host, guest


def round_trip(box: Box, enclave: Enclave, label: str) -> None:
    """One exchange each way through start_both_paths' pair, whose service answers upper-cased."""
    for path, port, side in (("inbound", 5050, None), ("outbound", 8443, enclave)):
        request = f"{path} {label}".encode()
        answer = box.exchange(port, request, side)
        expect(answer == request.upper(), f"{path} {label}: got {answer!r}")


def main(name: str, body: Callable[[Box], None]) -> None:
    """Run one check: print PASS or FAIL (with detail and the halves' logs), exit 0 or 1."""
    box = Box(name)
    started = time.monotonic()
    detail = []
    try:
        body(box)
        expect(not box.errors, "; ".join(box.errors))
        outcome = f"PASS {name} ({time.monotonic() - started:.1f} s)"
        detail = box.notes
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not isinstance(error, Failed):
            reason = f"{type(error).__name__}: {reason}"
        outcome = f"FAIL {name}: {reason}"
        detail = traceback.format_exc().splitlines()
        detail += [f"service errors: {error}" for error in box.errors]
        for half in box.halves:
            state = "running" if half.alive() else f"exited with {half.process.returncode}"
            detail.append(f"--- log of the {half.name} ({state}):")
            detail += half.text().splitlines()[-60:]
    finally:
        box.close()
    print(outcome, flush=True)
    for line in detail:
        print(f"    {line}", flush=True)
    sys.exit(0 if outcome.startswith("PASS") else 1)

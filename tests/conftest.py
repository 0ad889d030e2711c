"""Shared harness: both halves as real subprocesses over emulated vsock, real sockets, deadlines."""

from __future__ import annotations

import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QPROXY = ROOT / "qproxy.py"
sys.path.insert(0, str(ROOT))

DEADLINE = 15.0  # seconds any one wait may take before the test fails
LOG_LINES_SHOWN = 60  # of each half's log, under a failed test


def wait_for(predicate, what: str, timeout: float = DEADLINE):
    """Poll predicate until it returns something true; fail the test at the deadline."""
    end = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never the same one twice in a test run.

    The kernel may offer a port it just offered again, and a test that got
    one port twice (a listener and a "dead" target) would relay into itself.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port


def run_qproxy(*args: str, env: dict | None = None, timeout: float = 30, cwd=None) -> subprocess.CompletedProcess:
    """Run qproxy.py to completion with this Python; return its exit code and output."""
    return subprocess.run(
        [sys.executable, str(QPROXY), *args], capture_output=True, text=True,
        env=dict(os.environ, **(env or {})), timeout=timeout, cwd=cwd,
    )


def inbound(host_port: int, enclave_port: int, vsock_port: int = 9000) -> str:
    """One [[inbound_connections]] entry, as TOML."""
    return f"[[inbound_connections]]\nhost_port = {host_port}\nenclave_port = {enclave_port}\nvsock_port = {vsock_port}\n"


def outbound(hostname: str, tcp_port: int, enclave_port: int, vsock_port: int = 7000) -> str:
    """One [[outbound_connections]] entry, as TOML, with the enclave_port extension."""
    return (
        f'[[outbound_connections]]\nhostname = "{hostname}"\nvsock_port = {vsock_port}\n'
        f"tcp_port = {tcp_port}\nenclave_port = {enclave_port}\n"
    )


class Half:
    """A running half of qproxy: a subprocess whose stderr goes to a log file."""

    def __init__(self, role: str, args: list[str], env: dict, log_path: Path, wrapper: list[str] = ()):
        self.role = role
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, str(QPROXY), role, *args], env=env,
            stdout=self.log_file, stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = DEADLINE) -> re.Match:
        def found():
            exited = self.process.poll() is not None
            match = re.search(pattern, self.log())
            if exited and not match:
                raise AssertionError(f"{self.role} half exited with {self.process.returncode}:\n{self.log()}")
            return match
        return wait_for(found, f"{pattern!r} in the {self.role} half's log", timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = DEADLINE) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self.log_file.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


class Proxy:
    """Both halves in one folder, sharing an emulated vsock directory."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.vsock_dir = folder / "vsock"
        self.halves: list[Half] = []
        self.config = folder / "config.toml"
        self.control_port = free_port()

    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ, QPROXY_VSOCK_EMULATION=str(self.vsock_dir), RUST_LOG="debug",
                   QPROXY_CONTROL_PORT=str(self.control_port))
        env.pop("QPROXY_LISTEN_CID", None)
        env.pop("TOKIO_WORKER_THREADS", None)
        env.update(extra or {})
        return env

    def write_config(self, text: str) -> Path:
        self.config.write_text(text)
        return self.config

    def start(self, role: str, *args: str, env: dict | None = None, ready: bool = True,
              wrapper: list[str] = (), cid: str | None = "4") -> Half:
        """Start a half (the host given enclave CID cid, unless None), by default waiting until ready."""
        extra = [cid] if role == "host" and cid is not None else []
        half = Half(role, ["--config", str(self.config), *args, *extra], self.env(env),
                    self.folder / f"{role}-{len(self.halves)}.log", wrapper)
        self.halves.append(half)
        if ready:
            half.wait_log(f"{role} half ready")
        return half

    def start_both(self, config: str, host_args=(), enclave_args=()) -> tuple[Half, Half]:
        self.write_config(config)
        enclave = self.start("enclave", *enclave_args)
        host = self.start("host", *host_args)
        return host, enclave

    def close(self) -> None:
        for half in self.halves:
            half.kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test, so a fixture can tell that its test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def proxy(tmp_path, request):
    p = Proxy(tmp_path)
    yield p
    p.close()
    if getattr(request.node, "report_call", None) and request.node.report_call.failed:
        for half in p.halves:  # shown under the failure as the teardown's output
            lines = half.log().splitlines()[-LOG_LINES_SHOWN:]
            print(f"--- the last {len(lines)} lines of {half.log_path.name}", *lines, sep="\n")


class ThreadedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 256  # 100 connections at once must not overflow the backlog

    def __init__(self, handle, address: str = "127.0.0.1", port: int = 0):
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.handle = handle
        self.accepted = 0
        super().__init__((address, port), None)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def finish_request(self, request, client_address):
        self.accepted += 1
        request.settimeout(DEADLINE)
        self.handle(request)

    def stop(self):
        self.shutdown()
        self.server_close()


def echo(sock: socket.socket) -> None:
    """Send back everything received; end our side at the client's EOF."""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@pytest.fixture
def echo_server():
    server = ThreadedServer(echo)
    yield server
    server.stop()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """What arrives until the connection ends, and how it ends: "eof" or "reset"."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, "eof"
            data += chunk
    except ConnectionResetError:
        return data, "reset"


def private_resolver(folder: Path, hosts: str) -> list[str]:
    """A wrapper that runs a command with its own /etc/hosts and a files-only nsswitch.conf, in a mount
    namespace of its own: the test names resolve the same anywhere, and none waits on a DNS server."""
    (folder / "hosts").write_text(hosts)
    (folder / "nsswitch.conf").write_text("hosts: files\n")
    mounts = f'mount --bind "{folder}/hosts" /etc/hosts'
    if os.path.exists("/etc/nsswitch.conf"):
        mounts += f' && mount --bind "{folder}/nsswitch.conf" /etc/nsswitch.conf'
    return ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$0" "$@"']


def make_certificates(folder: Path, names: dict[str, list[str]]) -> None:
    """A test CA (folder/ca.pem) and, for each key of names, a server certificate it signed for those
    names (folder/KEY.pem, folder/KEY.key), made with the openssl CLI."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=qproxy test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for key, dns_names in names.items():
        openssl("req", *ec, "-keyout", f"{key}.key", "-out", f"{key}.csr", "-subj", f"/CN={dns_names[0]}")
        (folder / f"{key}.ext").write_text(
            "subjectAltName = " + ",".join(f"DNS:{name}" for name in dns_names) + "\n"
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n"
            "extendedKeyUsage = serverAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n")
        openssl("x509", "-req", "-in", f"{key}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{key}.pem", "-days", "2", "-extfile", f"{key}.ext")


def https_server(folder: Path, key: str, body: bytes, address: str, port: int = 0) -> ThreadedServer:
    """An HTTPS server with folder/KEY's certificate, answering every request with 200 and body."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / f"{key}.pem", folder / f"{key}.key")

    def serve(sock: socket.socket) -> None:
        try:
            with context.wrap_socket(sock, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    request += chunk
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                            b"Connection: close\r\n\r\n%s" % (len(body), body))
        except (ssl.SSLError, OSError):
            pass  # a client that gave up on the certificate

    return ThreadedServer(serve, address, port)


class SilentListener:
    """A loopback TCP port that never answers a SYN, so that a dial to it times out.

    The trick: a listening socket with backlog 0 whose accept queue is filled first by connections
    nobody accepts.  Linux then drops further SYNs on the floor (net.ipv4.tcp_abort_on_overflow is
    0 by default): no SYN-ACK and no RST, so the connect hangs until the dialer's own timeout, which
    is exactly "no answer within connect_timeout".  It needs no route to nowhere, no network
    namespace and no privilege.  The constructor checks it worked on this kernel: the last filler's
    connect must itself have hung.
    """

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(8):  # the kernel may queue one or two beyond the backlog: stop at the first that hangs
            filler = socket.socket()
            filler.settimeout(0.5)
            try:
                filler.connect(("127.0.0.1", self.port))
            except socket.timeout:
                filler.close()
                return
            self.fillers.append(filler)
        raise AssertionError("the listen queue never filled: cannot make a port that does not answer")

    def close(self):
        for sock in self.fillers:
            sock.close()
        self.sock.close()


@pytest.fixture
def silent_listener():
    listener = SilentListener()
    yield listener
    listener.close()

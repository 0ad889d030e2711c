"""The egress proxy end to end ([egress], issue 14): both halves as real subprocesses over emulated
vsock, real clients (curl, urllib) and raw sockets on the proxy port, real TLS upstreams on loopback.

What a client sees is the spec's table (HTTP status / SOCKS5 REP per outcome); each test checks the
exact status line or REP byte, that a refused destination was never dialed, and that the port goes on
serving.  Names resolve on the host half only, through its own /etc/hosts in a mount namespace (needs
root and unshare); everything else uses IP literals on 127.0.0.0/8 and runs unprivileged.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    DEADLINE, Half, ThreadedServer, echo, free_port, https_server, make_certificates, private_resolver, read_to_end,
    wait_for,
)

CURL = "/usr/bin/curl"
OPENSSL = "/usr/bin/openssl"
VSOCK_PORT = 8000  # the egress vsock port; the emulated vsock directory is the test's own
BODY = b"hello from the TLS upstream behind qproxy's egress\n"
NAMES = ("good.test", "other.test", "a.b.wild.test")  # the TLS upstream's certificate names all of them
TLS_ADDRESS = "127.0.0.2"  # where the names resolve (host half's private /etc/hosts) and the TLS upstream listens
ECHO_ADDRESS = "127.0.0.3"

needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root and unshare to give the host half its own /etc/hosts (names resolve on the host half)",
)
needs_curl = pytest.mark.skipif(not os.access(CURL, os.X_OK), reason=f"needs {CURL}")
needs_openssl = pytest.mark.skipif(not os.access(OPENSSL, os.X_OK), reason=f"needs {OPENSSL} to make the test CA")

# Proxy settings a developer's shell may carry would send curl and urllib elsewhere, or around the proxy.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                   "NO_PROXY")


def clean_env(**extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in PROXY_VARIABLES}
    env.update(extra)
    return env


# --- configuration and halves ----------------------------------------------------------------


def toml_list(items) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def egress(proxy_port: int, allow=(), deny=(), connect_timeout: float | None = None) -> str:
    """An [egress] table (and [limits] connect_timeout when given), as TOML."""
    text = (f"[egress]\nproxy_port = {proxy_port}\nvsock_port = {VSOCK_PORT}\n"
            f"allow = {toml_list(allow)}\ndeny = {toml_list(deny)}\n")
    if connect_timeout is not None:
        text += f"[limits]\nconnect_timeout = {connect_timeout}\n"
    return text


def start_half(proxy, role: str, config: str, wrapper: list[str] = (), ready: bool = True,
               env: dict | None = None) -> Half:
    """Start one half with a config file of its own (the halves' files may differ), as Proxy.start does."""
    path = proxy.folder / f"{role}-{len(proxy.halves)}.toml"
    path.write_text(config)
    args = ["--config", str(path)] + (["4"] if role == "host" else [])  # the host half is given the enclave's CID
    half = Half(role, args, proxy.env(env), proxy.folder / f"{role}-{len(proxy.halves)}.log", wrapper)
    half.config_path = path
    proxy.halves.append(half)
    if ready:
        half.wait_log(f"{role} half ready")
    return half


def start_egress(proxy, enclave_config: str, host_config: str | None = None, hosts: str | None = None):
    """Both halves, each with its own file (the same text unless host_config is given); with hosts, the
    host half resolves through that /etc/hosts.  Returns (host, enclave)."""
    enclave = start_half(proxy, "enclave", enclave_config)
    wrapper = private_resolver(proxy.folder, hosts) if hosts is not None else ()
    host = start_half(proxy, "host", enclave_config if host_config is None else host_config, wrapper)
    return host, enclave


def name_hosts() -> str:
    return "".join(f"{TLS_ADDRESS} {name}\n" for name in NAMES) + f"{ECHO_ADDRESS} echo.test\n"


def own_lines(half: Half) -> list[str]:
    """The half's own log lines: the host half's log also carries the enclave half's, forwarded."""
    return [line for line in half.log().splitlines() if f"qproxy::{half.role}" in line]


def wait_decision(half: Half, verdict: str, target: str, rule: str | None = None) -> str:
    """Wait for the half's own line giving its verdict ("allowed", "denied") on target (HOST:PORT), with the
    rule that made it when given.  The spec's wording is an example, so only these parts are checked."""
    def found():
        if half.process.poll() is not None:
            raise AssertionError(f"{half.role} half exited with {half.process.returncode}:\n{half.log()}")
        for line in own_lines(half):
            if verdict in line and target.lower() in line.lower() and (rule is None or rule in line.split(verdict, 1)[1]):
                return line
        return None
    return wait_for(found, f"the {half.role} half's line: {target} {verdict}" + (f" by rule {rule}" if rule else ""))


# --- the two ways in: HTTP CONNECT and SOCKS5, spoken by hand ----------------------------------


def connect_port(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP response head (up to the blank line) and any bytes after it; b"" head if the proxy closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return b"", data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


class HttpReply:
    def __init__(self, head: bytes, body: bytes):
        self.head = head
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        match = re.match(r"HTTP/1\.[01] (\d{3})( |$)", self.status_line)
        assert match, f"not an HTTP status line: {self.status_line!r} (head {head!r})"
        self.status = int(match.group(1))
        self.headers = {}
        for line in lines[1:]:
            if ":" in line:
                key, _, value = line.partition(":")
                self.headers[key.strip().lower()] = value.strip()
        self.body = body

    def __repr__(self):
        return f"<{self.status_line!r} {self.headers} {self.body!r}>"


def http_connect(port: int, target: str) -> tuple[HttpReply, socket.socket]:
    """Send CONNECT target; return the reply and the socket (a tunnel on 200; read to its end otherwise)."""
    sock = connect_port(port)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: qproxy-egress-test\r\n\r\n".encode())
    head, rest = read_head(sock)
    assert head, f"the proxy closed without answering CONNECT {target}"
    reply = HttpReply(head, rest)
    if reply.status != 200:
        reply.body += read_until_closed(sock)
    return reply, sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def http_refusal(port: int, target: str) -> HttpReply:
    reply, sock = http_connect(port, target)
    sock.close()
    return reply


def assert_http_error(reply: HttpReply, status: int) -> None:
    """The spec's error response: the status, Connection: close, text/plain reason, RFC 9209 Proxy-Status."""
    assert reply.status == status, reply
    assert reply.headers.get("connection", "").lower() == "close", reply
    assert reply.headers.get("content-type", "").startswith("text/plain"), reply
    assert re.match(r"qproxy; *error=", reply.headers.get("proxy-status", "")), reply
    assert reply.body.strip(), f"no reason in the body: {reply}"


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"the proxy closed after {data!r}, {count} bytes expected")
        data += chunk
    return data


def socks_address(host: str) -> bytes:
    """ATYP and DST.ADDR for host: IPv4, IPv6 or a domain name (socks5h: the proxy resolves it)."""
    for family, atyp in ((socket.AF_INET, 1), (socket.AF_INET6, 4)):
        try:
            return bytes([atyp]) + socket.inet_pton(family, host)
        except OSError:
            pass
    name = host.encode("idna")
    return bytes([3, len(name)]) + name


def socks_greet(sock: socket.socket) -> None:
    sock.sendall(b"\x05\x01\x00")  # version 5, one method: no authentication
    assert recv_exact(sock, 2) == b"\x05\x00"


def socks_connect(port: int, host: str, dport: int, command: int = 1, address: bytes | None = None
                  ) -> tuple[int, socket.socket]:
    """A SOCKS5 request; returns (REP, socket).  On REP 0 the whole reply is read and the tunnel is open."""
    sock = connect_port(port)
    socks_greet(sock)
    address = socks_address(host) if address is None else address
    sock.sendall(bytes([5, command, 0]) + address + struct.pack("!H", dport))
    version, rep = recv_exact(sock, 2)
    assert version == 5, f"SOCKS reply version {version}"
    if rep == 0:
        _, atyp = recv_exact(sock, 2)
        length = {1: 4, 4: 16}.get(atyp) or recv_exact(sock, 1)[0]
        recv_exact(sock, length + 2)  # BND.ADDR, BND.PORT
    return rep, sock


def socks_refusal(port: int, host: str, dport: int, **how) -> int:
    rep, sock = socks_connect(port, host, dport, **how)
    sock.close()
    return rep


def tunnel_echoes(sock: socket.socket, payload: bytes = b"through the tunnel") -> None:
    sock.sendall(payload)
    assert recv_exact(sock, len(payload)) == payload


def assert_still_serving(proxy_port: int, upstream: ThreadedServer) -> None:
    """The port keeps serving: a normal CONNECT to the echo upstream opens a tunnel that echoes."""
    reply, sock = http_connect(proxy_port, f"{upstream.server_address[0]}:{upstream.port}")
    with sock:
        assert reply.status == 200, reply
        tunnel_echoes(sock, b"still serving")


# --- upstreams: a TLS server with a test CA's certificate, a port that never answers ---------------


@pytest.fixture(scope="session")
def ca_folder(tmp_path_factory):
    """A test CA and a server certificate it signed for NAMES, made with the openssl CLI."""
    if not os.access(OPENSSL, os.X_OK):
        pytest.skip(f"needs {OPENSSL} to make the test CA")
    folder = tmp_path_factory.mktemp("egress-ca")
    make_certificates(folder, {"server": list(NAMES)})
    return folder


@pytest.fixture
def tls_server(ca_folder):
    """An HTTPS server on TLS_ADDRESS answering every request with 200 and BODY."""
    server = https_server(ca_folder, "server", BODY, TLS_ADDRESS)
    yield server
    server.stop()


@pytest.fixture
def echo_upstream():
    server = ThreadedServer(echo, ECHO_ADDRESS)
    yield server
    server.stop()




def curl(*args: str, timeout: float = 2 * DEADLINE) -> subprocess.CompletedProcess:
    return subprocess.run([CURL, "--silent", "--show-error", "--max-time", str(DEADLINE), *args],
                          capture_output=True, timeout=timeout, env=clean_env())


# --- real clients reach an allowed name, TLS verified end to end ---------------------------------


def allowed_name_config(proxy_port: int, tls_port: int) -> str:
    return egress(proxy_port, allow=[f"good.test:{tls_port}", "127.0.0.0/8"])


@needs_mount_namespace
@needs_curl
def test_curl_reaches_an_allowed_name_through_connect_with_tls_verified(proxy, ca_folder, tls_server):
    proxy_port = free_port()
    host, _ = start_egress(proxy, allowed_name_config(proxy_port, tls_server.port), hosts=name_hosts())
    result = curl("--cacert", str(ca_folder / "ca.pem"), "-x", f"http://127.0.0.1:{proxy_port}",
                  f"https://good.test:{tls_server.port}/")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == BODY
    assert tls_server.accepted == 1
    target = f"good.test:{tls_server.port}"
    wait_decision(host, "allowed", target, rule=target)


@needs_mount_namespace
@needs_curl
def test_curl_reaches_an_allowed_name_through_socks5_hostname_with_tls_verified(proxy, ca_folder, tls_server):
    proxy_port = free_port()
    start_egress(proxy, allowed_name_config(proxy_port, tls_server.port), hosts=name_hosts())
    result = curl("--cacert", str(ca_folder / "ca.pem"), "--socks5-hostname", f"127.0.0.1:{proxy_port}",
                  f"https://good.test:{tls_server.port}/")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == BODY
    assert tls_server.accepted == 1


URLLIB_CLIENT = """
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
with urllib.request.urlopen(sys.argv[1], context=context, timeout=15) as response:
    sys.stdout.buffer.write(response.read())
"""


@needs_mount_namespace
def test_urllib_with_https_proxy_reaches_an_allowed_name_with_tls_verified(proxy, ca_folder, tls_server):
    proxy_port = free_port()
    start_egress(proxy, allowed_name_config(proxy_port, tls_server.port), hosts=name_hosts())
    result = subprocess.run(
        [sys.executable, "-c", URLLIB_CLIENT, f"https://good.test:{tls_server.port}/", str(ca_folder / "ca.pem")],
        capture_output=True, timeout=2 * DEADLINE, env=clean_env(HTTPS_PROXY=f"http://127.0.0.1:{proxy_port}"))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == BODY
    assert tls_server.accepted == 1


@needs_mount_namespace
@needs_curl
def test_curl_fails_verification_for_a_name_the_certificate_does_not_carry(proxy, ca_folder, tls_server):
    """The tunnel carries TLS end to end: the certificate curl checks is the upstream's own, so a name it
    does not carry (same address, allowed by the rules) fails verification; the proxy terminates nothing."""
    proxy_port = free_port()
    hosts = name_hosts() + f"{TLS_ADDRESS} stranger.test\n"
    start_egress(proxy, egress(proxy_port, allow=["*.test", "127.0.0.0/8"]), hosts=hosts)
    result = curl("--cacert", str(ca_folder / "ca.pem"), "-x", f"http://127.0.0.1:{proxy_port}",
                  f"https://stranger.test:{tls_server.port}/")
    assert result.returncode == 60, result.stderr.decode()  # CURLE_PEER_FAILED_VERIFICATION
    assert tls_server.accepted == 1  # it did reach the upstream: the refusal is curl's, not the proxy's


@needs_mount_namespace
def test_a_wildcard_rule_allows_subdomains_at_any_depth_but_not_the_apex_or_a_lookalike(proxy, tls_server):
    proxy_port = free_port()
    hosts = name_hosts() + f"{TLS_ADDRESS} wild.test\n{TLS_ADDRESS} wild.test.evil.test\n"
    start_egress(proxy, egress(proxy_port, allow=["*.wild.test", "127.0.0.0/8"]), hosts=hosts)
    reply, sock = http_connect(proxy_port, f"A.B.Wild.Test:{tls_server.port}")  # names compare case-insensitively
    sock.close()
    assert reply.status == 200, reply
    for name in ("wild.test", "wild.test.evil.test"):
        assert_http_error(http_refusal(proxy_port, f"{name}:{tls_server.port}"), 403)
        assert socks_refusal(proxy_port, name, tls_server.port) == 2
    wait_for(lambda: tls_server.accepted == 1, "the one allowed connection to reach the upstream")


@needs_mount_namespace
def test_names_compare_case_insensitively_in_idna_form_ignoring_a_trailing_dot(proxy, tls_server):
    """A rule written in Unicode with a trailing dot matches the A-label, any case, with or without the dot;
    a SOCKS5 client may send the name in UTF-8."""
    proxy_port = free_port()
    hosts = name_hosts() + f"{TLS_ADDRESS} xn--bcher-kva.test\n"
    start_egress(proxy, egress(proxy_port, allow=["Bücher.test.", "127.0.0.0/8"]), hosts=hosts)
    for target in ("xn--bcher-kva.test", "XN--BCHER-KVA.TEST."):
        reply, sock = http_connect(proxy_port, f"{target}:{tls_server.port}")
        sock.close()
        assert reply.status == 200, (target, reply)
    rep, sock = socks_connect(proxy_port, "", tls_server.port, address=b"\x03" + bytes([len("bücher.test".encode())])
                              + "bücher.test".encode())
    sock.close()
    assert rep == 0
    assert_http_error(http_refusal(proxy_port, f"xn--bcher-kva.test.evil:{tls_server.port}"), 403)
    wait_for(lambda: tls_server.accepted == 3, "the three allowed connections to reach the upstream")


# --- each outcome: its HTTP status and SOCKS5 REP -------------------------------------------------


def test_a_destination_the_enclaves_rules_deny_gets_403_and_socks_02_without_asking_the_host(proxy, echo_upstream):
    """The host's rules would allow both; the enclave's do not: one has no allow rule, and for the other
    a deny rule beats its allow rule.  The enclave half decides alone: the host half never hears of them."""
    unlisted, denied = ThreadedServer(echo, "127.0.0.4"), ThreadedServer(echo, "127.0.0.5")
    try:
        proxy_port = free_port()
        enclave_config = egress(proxy_port, allow=[f"{ECHO_ADDRESS}:{echo_upstream.port}", f"127.0.0.5:{denied.port}"],
                                deny=[f"127.0.0.5:{denied.port}"])
        host, enclave = start_egress(proxy, enclave_config, host_config=egress(proxy_port, allow=["127.0.0.0/8"]))
        for address, port in (("127.0.0.4", unlisted.port), ("127.0.0.5", denied.port)):
            target = f"{address}:{port}"
            assert_http_error(http_refusal(proxy_port, target), 403)
            assert socks_refusal(proxy_port, address, port) == 2
            wait_decision(enclave, "denied", target, rule=target if address == "127.0.0.5" else None)
            assert not [line for line in own_lines(host) if target in line], \
                "the enclave half asked the host half about a destination it denies"
        assert unlisted.accepted == 0 and denied.accepted == 0
        assert_still_serving(proxy_port, echo_upstream)  # what both allow goes through
    finally:
        unlisted.stop()
        denied.stop()


def test_a_destination_the_hosts_rules_deny_gets_403_and_socks_02(proxy, echo_upstream):
    proxy_port = free_port()
    host, _ = start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"]),
                           host_config=egress(proxy_port, allow=["127.0.0.1"], deny=[ECHO_ADDRESS]))
    target = f"{ECHO_ADDRESS}:{echo_upstream.port}"
    assert_http_error(http_refusal(proxy_port, target), 403)
    assert socks_refusal(proxy_port, ECHO_ADDRESS, echo_upstream.port) == 2
    wait_decision(host, "denied", target, rule=ECHO_ADDRESS)
    assert echo_upstream.accepted == 0


@needs_curl
def test_curl_reports_the_status_and_socks_code_of_a_denial(proxy, echo_upstream):
    """Real clients see the codes too: curl's %{http_connect} is the CONNECT status, and its SOCKS5
    error names the REP code in parentheses."""
    proxy_port = free_port()
    start_egress(proxy, egress(proxy_port, allow=["127.0.0.1"]))
    url = f"https://denied.test:{echo_upstream.port}/"
    result = curl("-o", "/dev/null", "-w", "%{http_connect}", "-x", f"http://127.0.0.1:{proxy_port}", url)
    assert result.returncode == 56 and result.stdout == b"403", result  # CURLE_RECV_ERROR: the tunnel failed
    result = curl("-o", "/dev/null", "--socks5-hostname", f"127.0.0.1:{proxy_port}", url)
    assert result.returncode == 97, result  # CURLE_PROXY
    assert re.search(rb"SOCKS5 .*\(2\)", result.stderr), result.stderr


@needs_mount_namespace
@pytest.mark.parametrize("allow, deny", [
    (["good.test"], []),  # no address rule at all: 127.0.0.2 is loopback, special space
    (["good.test", "0.0.0.0/0"], []),  # an address rule, but not itself inside special space
    (["good.test", "127.0.0.0/8"], [TLS_ADDRESS]),  # the one address is denied
], ids=["no-address-rule", "everywhere-rule", "address-denied"])
def test_a_name_resolving_only_into_denied_addresses_gets_403_and_socks_02(proxy, tls_server, allow, deny):
    proxy_port = free_port()
    host, _ = start_egress(proxy, egress(proxy_port, allow=allow, deny=deny), hosts=name_hosts())
    assert_http_error(http_refusal(proxy_port, f"good.test:{tls_server.port}"), 403)
    assert socks_refusal(proxy_port, "good.test", tls_server.port) == 2
    wait_decision(host, "denied", f"good.test:{tls_server.port}")
    assert tls_server.accepted == 0


@needs_mount_namespace
def test_a_name_that_does_not_resolve_gets_502_and_socks_04(proxy, tls_server):
    proxy_port = free_port()
    start_egress(proxy, egress(proxy_port, allow=["*.test", "127.0.0.0/8"]), hosts=name_hosts())
    started = time.monotonic()
    assert_http_error(http_refusal(proxy_port, "nosuch.test:443"), 502)
    assert socks_refusal(proxy_port, "nosuch.test", 443) == 4
    assert time.monotonic() - started < 5.0  # files-only resolver: nothing to wait for
    reply, sock = http_connect(proxy_port, f"good.test:{tls_server.port}")  # the resolver itself works
    sock.close()
    assert reply.status == 200, reply


def test_a_refused_connection_gets_502_and_socks_05(proxy, echo_upstream):
    proxy_port = free_port()
    dead_port = free_port()  # nothing listens: loopback answers the SYN with a RST
    host, _ = start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"]))
    assert_http_error(http_refusal(proxy_port, f"127.0.0.1:{dead_port}"), 502)
    assert socks_refusal(proxy_port, "127.0.0.1", dead_port) == 5
    assert_still_serving(proxy_port, echo_upstream)


def test_no_answer_within_connect_timeout_gets_504_and_socks_06(proxy, silent_listener):
    proxy_port = free_port()
    start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"], connect_timeout=1))
    for ask in (lambda: http_refusal(proxy_port, f"127.0.0.1:{silent_listener.port}"),
                lambda: socks_refusal(proxy_port, "127.0.0.1", silent_listener.port)):
        started = time.monotonic()
        outcome = ask()
        took = time.monotonic() - started
        if isinstance(outcome, HttpReply):
            assert_http_error(outcome, 504)
        else:
            assert outcome == 6
        assert 1.0 <= took < 5.0, f"answered after {took:.2f} s with connect_timeout = 1"


def test_without_the_host_half_the_client_gets_502_and_socks_01(proxy):
    proxy_port = free_port()
    enclave = start_half(proxy, "enclave", egress(proxy_port, allow=["127.0.0.0/8"]))
    assert_http_error(http_refusal(proxy_port, f"127.0.0.1:{free_port()}"), 502)
    assert socks_refusal(proxy_port, "127.0.0.1", free_port()) == 1
    assert enclave.process.poll() is None


def test_a_plain_http_proxy_request_gets_501(proxy, echo_upstream):
    proxy_port = free_port()
    start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"]))
    with connect_port(proxy_port) as sock:
        target = f"{ECHO_ADDRESS}:{echo_upstream.port}"
        sock.sendall(f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head, rest = read_head(sock)
        assert head, "closed without an answer"
        assert_http_error(HttpReply(head, rest + read_until_closed(sock)), 501)
    assert echo_upstream.accepted == 0
    assert_still_serving(proxy_port, echo_upstream)


@pytest.mark.parametrize("request_line", [b"CONNECT 127.0.0.1 HTTP/1.1", b"CONNECT :443 HTTP/1.1", b"HELLO"],
                         ids=["no-port", "no-host", "not-a-request-line"])
def test_a_malformed_http_request_gets_400(proxy, echo_upstream, request_line):
    proxy_port = free_port()
    start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"]))
    with connect_port(proxy_port) as sock:
        sock.sendall(request_line + b"\r\n\r\n")
        head, rest = read_head(sock)
        assert head, "closed without an answer"
        assert_http_error(HttpReply(head, rest + read_until_closed(sock)), 400)
    assert_still_serving(proxy_port, echo_upstream)


# --- the tunnel ---------------------------------------------------------------------------------


def pump(sock: socket.socket, payload: bytes) -> bytes:
    """Send payload while reading its echo (a sender that waited would deadlock on full buffers)."""
    errors = []

    def send():
        try:
            sock.sendall(payload)
        except OSError as error:
            errors.append(error)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    while len(received) < len(payload):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    sender.join(DEADLINE)
    assert not errors, errors
    return bytes(received)


@pytest.mark.parametrize("way", ["connect", "socks5"])
def test_the_tunnel_carries_megabytes_both_ways_unchanged(proxy, echo_upstream, way):
    proxy_port = free_port()
    start_egress(proxy, egress(proxy_port, allow=[f"{ECHO_ADDRESS}:{echo_upstream.port}", "127.0.0.0/8"]))
    if way == "connect":
        reply, sock = http_connect(proxy_port, f"{ECHO_ADDRESS}:{echo_upstream.port}")
        assert reply.status_line == "HTTP/1.1 200 Connection established", reply
        assert reply.body == b""
    else:
        rep, sock = socks_connect(proxy_port, ECHO_ADDRESS, echo_upstream.port)
        assert rep == 0
    payload = os.urandom(4 * 1024 * 1024)
    with sock:
        sock.settimeout(DEADLINE)
        received = pump(sock, payload)
    assert len(received) == len(payload)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.skipif(not socket.has_ipv6, reason="needs IPv6")
def test_an_ipv6_literal_reaches_its_upstream_by_connect_and_socks5(proxy):
    try:
        upstream = ThreadedServer(echo, "::1")
    except OSError as error:
        pytest.skip(f"no ::1 to listen on: {error}")
    try:
        proxy_port = free_port()
        start_egress(proxy, egress(proxy_port, allow=[f"[::1]:{upstream.port}"]))
        reply, sock = http_connect(proxy_port, f"[::1]:{upstream.port}")
        with sock:
            assert reply.status == 200, reply
            tunnel_echoes(sock)
        rep, sock = socks_connect(proxy_port, "::1", upstream.port)
        with sock:
            assert rep == 0
            tunnel_echoes(sock)
        assert_http_error(http_refusal(proxy_port, f"[::1]:{free_port()}"), 403)  # the rule names one port
    finally:
        upstream.stop()


# --- hostile input on the proxy port --------------------------------------------------------------


@pytest.fixture
def served(proxy, echo_upstream):
    """Both halves, everything on 127/8 allowed; yields (proxy_port, enclave half, echo upstream)."""
    proxy_port = free_port()
    _, enclave = start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"]))
    assert_still_serving(proxy_port, echo_upstream)
    return proxy_port, enclave, echo_upstream


def ending(sock: socket.socket, bound: float) -> tuple[bytes, float]:
    """Read until the proxy ends the connection (EOF or reset); what came and when, failing past bound."""
    started = time.monotonic()
    sock.settimeout(bound)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if re.match(rb"HTTP/1\.[01] 200 .*?\r\n\r\n", data, re.S):
                break  # a tunnel opened: the caller's check fails on it now, not at the bound
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"the proxy kept the connection open for {bound} s, having sent {data!r}") from None
    return data, time.monotonic() - started


def assert_refused_or_closed(data: bytes, status: int) -> None:
    """An answer of exactly status, or nothing at all (closed); never a tunnel."""
    if data:
        assert re.match(rb"HTTP/1\.[01] %d " % status, data), data[:200]


def test_an_oversized_request_header_gets_431_or_is_closed_and_the_port_keeps_serving(served):
    proxy_port, enclave, upstream = served
    with connect_port(proxy_port) as sock:
        request = (f"CONNECT {ECHO_ADDRESS}:{upstream.port} HTTP/1.1\r\n".encode()
                   + b"X-Padding: " + b"a" * 16384 + b"\r\n\r\n")  # twice the 8 KiB bound
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: allowed
        data, _ = ending(sock, DEADLINE)
    assert_refused_or_closed(data, 431)
    assert upstream.accepted == 1  # the served fixture's check only
    assert_still_serving(proxy_port, upstream)


def test_an_endless_header_gets_431_or_is_closed_before_the_proxy_reads_much(served):
    proxy_port, enclave, upstream = served
    with connect_port(proxy_port) as sock:
        sock.sendall(f"CONNECT {ECHO_ADDRESS}:{upstream.port} HTTP/1.1\r\nX-Padding: ".encode())
        sock.settimeout(DEADLINE)  # a proxy that stops reading without closing makes sendall time out
        sent = 0
        try:
            while sent < 4 * 1024 * 1024:  # far beyond the 8 KiB bound; the proxy must stop reading
                sock.sendall(b"a" * 4096)
                sent += 4096
        except (BrokenPipeError, ConnectionResetError):
            pass
        except socket.timeout:
            pass  # the proxy stopped reading; it must now end the connection
        data, _ = ending(sock, DEADLINE)
    assert_refused_or_closed(data, 431)
    assert_still_serving(proxy_port, upstream)


def test_a_trickled_header_that_never_completes_is_ended_within_the_time_bound(served):
    proxy_port, enclave, upstream = served
    started = time.monotonic()
    data = b""
    with connect_port(proxy_port) as sock:
        sock.sendall(f"CONNECT {ECHO_ADDRESS}:{upstream.port} HTTP/1.1\r\nX-Trickle: ".encode())
        sock.settimeout(0.2)  # one byte every 0.2 s: the header grows, never completes, stays far below 8 KiB
        while True:
            assert time.monotonic() - started < DEADLINE, "a trickled header kept the connection open past 15 s"
            try:
                sock.sendall(b"x")
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            data += chunk
            if not chunk:
                break
            if b"\r\n\r\n" in data:
                break
    took = time.monotonic() - started
    assert_refused_or_closed(data, 408)
    assert took < DEADLINE
    assert upstream.accepted == 1  # the served fixture's check only
    assert_still_serving(proxy_port, upstream)


def test_a_stalled_socks5_request_is_closed_within_the_time_bound(served):
    proxy_port, enclave, upstream = served
    started = time.monotonic()
    with connect_port(proxy_port) as sock:
        socks_greet(sock)
        sock.sendall(b"\x05\x01\x00")  # VER CMD RSV, and never the address
        data, _ = ending(sock, DEADLINE)
    assert data == b""  # SOCKS5 has no reply for it: closed
    assert time.monotonic() - started < DEADLINE
    assert_still_serving(proxy_port, upstream)


def test_an_unterminated_request_then_eof_is_closed_without_a_tunnel(served):
    proxy_port, enclave, upstream = served
    with connect_port(proxy_port) as sock:
        sock.sendall(f"CONNECT {ECHO_ADDRESS}:{upstream.port} HTTP/1.1\r\nHost: x\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        # The EOF ends the wait for the rest of the header: well before the 10 s header bound.
        data, took = ending(sock, 8.0)
    assert_refused_or_closed(data, 400)
    assert upstream.accepted == 1  # the served fixture's check only: no tunnel was dialed
    assert_still_serving(proxy_port, upstream)


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello: TLS spoken to the proxy
    b"\x00\x00\x00\x00",
    b"\x04\x01\x01\xbb\x7f\x00\x00\x01\x00",  # SOCKS4, not 5
    b"\xff\xfe\r\n\r\n",
], ids=["tls-client-hello", "zeros", "socks4", "binary"])
def test_garbage_first_bytes_are_closed_without_an_answer(served, garbage):
    proxy_port, enclave, upstream = served
    with connect_port(proxy_port) as sock:
        sock.sendall(garbage)
        data, _ = ending(sock, DEADLINE)
    assert data == b""
    assert_still_serving(proxy_port, upstream)


@pytest.mark.parametrize("command", [2, 3], ids=["bind", "udp-associate"])
def test_a_socks5_command_other_than_connect_gets_07(served, command):
    proxy_port, enclave, upstream = served
    assert socks_refusal(proxy_port, ECHO_ADDRESS, upstream.port, command=command) == 7
    assert upstream.accepted == 1  # the served fixture's check only
    assert_still_serving(proxy_port, upstream)


def test_a_socks5_bad_address_type_gets_08(served):
    proxy_port, enclave, upstream = served
    assert socks_refusal(proxy_port, "", upstream.port, address=b"\x05\x7f\x00\x00\x03") == 8
    assert_still_serving(proxy_port, upstream)


def test_a_socks5_client_offering_only_authentication_gets_no_acceptable_method(served):
    proxy_port, enclave, upstream = served
    with connect_port(proxy_port) as sock:
        sock.sendall(b"\x05\x01\x02")  # username/password only
        assert recv_exact(sock, 2) == b"\x05\xff"  # RFC 1928: no acceptable methods; then the client closes
    assert_still_serving(proxy_port, upstream)


def test_a_flood_of_idle_connections_does_not_stop_the_port_serving(served):
    proxy_port, enclave, upstream = served
    flood = []
    try:
        for _ in range(200):
            flood.append(connect_port(proxy_port))
        # Served while the flood holds its 200 connections open, and after.
        assert_still_serving(proxy_port, upstream)
    finally:
        for sock in flood:
            sock.close()
    assert_still_serving(proxy_port, upstream)
    assert enclave.process.poll() is None


# --- the host's rules change by SIGHUP, the enclave half untouched ---------------------------------


def test_sighup_applies_a_host_rule_change_to_new_connections_without_touching_the_enclave(proxy, echo_upstream):
    proxy_port = free_port()
    target = f"{ECHO_ADDRESS}:{echo_upstream.port}"
    host, enclave = start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"]))
    enclave_pid = enclave.process.pid
    reply, open_tunnel = http_connect(proxy_port, target)
    assert reply.status == 200, reply
    with open_tunnel:
        tunnel_echoes(open_tunnel, b"before the reload")
        reload_line = r"reload: .*%s" % re.escape(str(host.config_path))  # its summary, or its problems
        reloads = len(re.findall(reload_line, host.log()))
        host.config_path.write_text(egress(proxy_port, allow=["127.0.0.0/8"], deny=[target]))
        host.process.send_signal(signal.SIGHUP)
        wait_for(lambda: len(re.findall(reload_line, host.log())) > reloads, "the host half's reload line")
        assert "problems" not in host.log(), host.log()

        assert_http_error(http_refusal(proxy_port, target), 403)
        assert socks_refusal(proxy_port, ECHO_ADDRESS, echo_upstream.port) == 2
        wait_decision(host, "denied", target, rule=target)
        tunnel_echoes(open_tunnel, b"after the reload")  # new connections only: the open tunnel stays

    assert enclave.process.poll() is None and enclave.process.pid == enclave_pid
    assert len(re.findall(r"enclave half ready", enclave.log())) == 1  # started once, never again
    assert echo_upstream.accepted == 1


def test_a_reload_cannot_add_egress_to_a_host_half_started_without_it_but_may_remove_it(proxy, echo_upstream):
    proxy_port = free_port()
    target = f"{ECHO_ADDRESS}:{echo_upstream.port}"
    host, _ = start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"]), host_config="")
    host.wait_log(r"in each direction \(inbound, outbound\)")  # no share of the descriptors for egress

    host.config_path.write_text(egress(proxy_port, allow=["127.0.0.0/8"]))
    host.process.send_signal(signal.SIGHUP)
    host.wait_log(r"reload: \[egress\] is new; restart the host half to serve it")
    host.wait_log(r"reload: .*: no entry changed")
    assert_http_error(http_refusal(proxy_port, target), 502)  # nothing listens on the egress vsock port

    host.stop()
    host = start_half(proxy, "host", egress(proxy_port, allow=["127.0.0.0/8"]))
    host.wait_log(r"in each direction \(inbound, outbound, egress\)")
    reply, tunnel = http_connect(proxy_port, target)
    tunnel.close()
    assert reply.status == 200, reply
    host.config_path.write_text("")
    host.process.send_signal(signal.SIGHUP)
    host.wait_log(r"reload: no longer listening on vsock :%d" % VSOCK_PORT)
    assert_http_error(http_refusal(proxy_port, target), 502)


@needs_mount_namespace
@pytest.mark.parametrize("rules_of", ["host", "enclave"])
def test_deny_rules_judge_the_name_the_resolver_answered_for_in_place_of_the_one_asked(proxy, echo_upstream,
                                                                                        rules_of):
    # "secret" is an alias of secret.corp.test in the parent's /etc/hosts, as a search domain or a CNAME
    # could make it: the deny rule for *.corp.test, the host half's or the enclave half's, must judge it,
    # though "*" allows the name as it is asked for.
    proxy_port = free_port()
    open_rules = egress(proxy_port, allow=["*", "127.0.0.0/8"])
    closed_rules = egress(proxy_port, allow=["*", "127.0.0.0/8"], deny=["*.corp.test"])
    enclave, host = (open_rules, closed_rules) if rules_of == "host" else (closed_rules, open_rules)
    halves = dict(zip(("host", "enclave"), start_egress(proxy, enclave, host_config=host,
                                                       hosts=f"{ECHO_ADDRESS} secret.corp.test secret\n")))
    reply = http_refusal(proxy_port, f"secret:{echo_upstream.port}")
    assert_http_error(reply, 403)
    assert b"secret.corp.test" in reply.body, reply
    assert socks_refusal(proxy_port, "secret", echo_upstream.port) == 2
    wait_decision(halves[rules_of], "denied", f"secret:{echo_upstream.port}", rule="*.corp.test")
    if rules_of == "host":
        assert echo_upstream.accepted == 0  # never dialed (the enclave half can judge only what was reached)


def test_a_name_sent_in_utf8_is_judged_in_its_idna_form_whichever_way_it_comes(proxy, echo_upstream):
    proxy_port = free_port()
    start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"]))
    with connect_port(proxy_port) as sock:
        sock.sendall("CONNECT bücher.test:443 HTTP/1.1\r\n\r\n".encode())
        head, body = read_head(sock)
        body += read_to_end(sock)[0]
    assert head.startswith(b"HTTP/1.1 403 ") and b"xn--bcher-kva.test:443 is denied" in body, (head, body)
    assert socks_refusal(proxy_port, "bücher.test", 443) == 2


@pytest.mark.parametrize("target", ["0x7f.1", "0x7f000001", "127.1"])
def test_an_ipv4_address_in_a_form_of_its_own_is_refused_not_resolved(proxy, echo_upstream, target):
    proxy_port = free_port()
    start_egress(proxy, egress(proxy_port, allow=["*", "127.0.0.0/8"]))  # "*" must not let an address by
    assert_http_error(http_refusal(proxy_port, f"{target}:{echo_upstream.port}"), 400)
    assert echo_upstream.accepted == 0


def test_an_unexpected_error_in_one_request_ends_only_that_request(proxy, echo_upstream, tmp_path):
    """A bug while a request is set up (injected into Policy.judge, once) resets that client and
    logs an ERROR; the half goes on serving the next."""
    from test_robustness import LAUNCHER

    proxy_port = free_port()
    config = egress(proxy_port, allow=["127.0.0.0/8"])
    marker = tmp_path / "armed"
    once = LAUNCHER.format(target="Policy.judge", mode="now", marker=str(marker)).replace(
        "raise RuntimeError(", "os.unlink(marker); raise RuntimeError(")
    enclave = start_half(proxy, "enclave", config, wrapper=[sys.executable, "-c", once])
    start_half(proxy, "host", config)
    marker.touch()
    target = f"{ECHO_ADDRESS}:{echo_upstream.port}"
    with connect_port(proxy_port) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        assert read_to_end(sock) == (b"", "reset")
    enclave.wait_log(r"ERROR qproxy::enclave conn 1: unexpected error while setting it up")
    reply, tunnel = http_connect(proxy_port, target)
    with tunnel:
        assert reply.status == 200, reply
        tunnel_echoes(tunnel)
    assert enclave.process.poll() is None


def test_a_reload_that_moves_the_egress_port_is_compared_with_the_enclave_halfs_entries(proxy):
    proxy_port = free_port()
    host, _ = start_egress(proxy, egress(proxy_port, allow=["127.0.0.0/8"]))
    host.wait_log(r"control: the enclave half's entries match this host half's")
    host.config_path.write_text(egress(proxy_port, allow=["127.0.0.0/8"]).replace(
        f"vsock_port = {VSOCK_PORT}", f"vsock_port = {VSOCK_PORT + 1}"))
    host.process.send_signal(signal.SIGHUP)
    host.wait_log(r"ERROR qproxy::host control: config mismatch: the enclave half asks for the destinations of proxy"
                  rf" port 127\.0\.0\.1:{proxy_port} on vsock port {VSOCK_PORT}, but the host half has no egress entry")

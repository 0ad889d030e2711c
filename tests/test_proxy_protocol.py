"""The PROXY protocol on inbound entries (issue 15): both halves as real subprocesses over emulated vsock.

The host half writes a v1 or v2 header ahead of the client's bytes (proxy_protocol), and with
accept_proxy_protocol first reads one from a load balancer.  What the service in the enclave
receives is checked byte for byte against headers built here from HAProxy's specification, not by
qproxy's code; a real nginx (listen ... proxy_protocol) in the enclave's network namespace shows
the client's address in its access log, for IPv4 and IPv6 clients.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from conftest import DEADLINE, ThreadedServer, free_port, read_to_end, wait_for

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PAYLOAD = b"the client's first bytes\r\n"
CLIENT_ADDRESS = "127.0.0.5"  # an IPv4 client's source: not 127.0.0.1, which every relayed connection comes from


def v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2(source: tuple[str, int], destination: tuple[str, int], command: int = 1, tlvs: bytes = b"") -> bytes:
    ends = [ipaddress.ip_address(address) for address, _ in (source, destination)]
    family = 0x11 if ends[0].version == 4 else 0x21
    body = ends[0].packed + ends[1].packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return SIGNATURE + bytes((0x20 | command, family)) + struct.pack("!H", len(body)) + body


HEADERS = {"v1": v1, "v2": v2}


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="needs IPv6 on loopback (::1)")


class Recorder:
    """A service in the enclave that keeps every byte each connection sent, then answers "ok"."""

    def __init__(self):
        self.received: list[bytes] = []
        self.server = ThreadedServer(self.serve)
        self.port = self.server.port

    def serve(self, sock: socket.socket) -> None:
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.received.append(data)
        sock.sendall(b"ok")

    def wait(self, count: int = 1) -> list[bytes]:
        wait_for(lambda: len(self.received) >= count, f"{count} connection(s) at the service")
        return self.received


@pytest.fixture
def recorder():
    service = Recorder()
    yield service
    service.server.stop()


def entry(host_port: int, enclave_port: int, vsock_port: int, bind: str = "::", **keys: object) -> str:
    text = (f'[[inbound_connections]]\nhost_port = {host_port}\nenclave_port = {enclave_port}\n'
            f'vsock_port = {vsock_port}\nbind_address = "{bind}"\n')
    for key, value in keys.items():
        text += f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}\n".replace("'", '"')
    return text


def send_from(source: str, host: str, port: int, data: bytes) -> tuple[bytes, tuple[str, int]]:
    """Connect from source to host:port, send data and EOF; return the answer and the source's address and port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(DEADLINE)
        sock.bind((source, 0))
        sock.connect((host, port))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer, _ = read_to_end(sock)
        return answer, sock.getsockname()[:2]


CLIENTS = [
    pytest.param(CLIENT_ADDRESS, "127.0.0.1", id="ipv4"),
    pytest.param("::1", "::1", id="ipv6", marks=needs_ipv6),
]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("source, host", CLIENTS)
def test_the_service_receives_the_clients_address_and_port_ahead_of_its_bytes(proxy, recorder, version, source, host):
    """A dual-stack listener ("::"): an IPv4 client arrives with an IPv4-mapped address there, and is
    written as TCP4 all the same."""
    host_port = free_port()
    proxy.start_both(entry(host_port, recorder.port, 9000, proxy_protocol=version))
    answer, client = send_from(source, host, host_port, PAYLOAD)
    assert answer == b"ok"
    (received,) = recorder.wait()
    assert received == HEADERS[version](client, (host, host_port)) + PAYLOAD


def test_an_entry_without_proxy_protocol_passes_the_clients_bytes_alone(proxy, recorder):
    host_port = free_port()
    proxy.start_both(entry(host_port, recorder.port, 9000))
    answer, _ = send_from(CLIENT_ADDRESS, "127.0.0.1", host_port, PAYLOAD)
    assert (answer, recorder.wait()) == (b"ok", [PAYLOAD])


def test_entries_with_and_without_a_header_side_by_side(proxy, recorder):
    plain, with_header = free_port(), free_port()
    proxy.start_both(entry(plain, recorder.port, 9000) + entry(with_header, recorder.port, 9001, proxy_protocol="v1"))
    _, first = send_from(CLIENT_ADDRESS, "127.0.0.1", with_header, b"one")
    recorder.wait(1)
    send_from(CLIENT_ADDRESS, "127.0.0.1", plain, b"two")
    assert recorder.wait(2) == [v1(first, ("127.0.0.1", with_header)) + b"one", b"two"]


# --- accept_proxy_protocol: a load balancer in front of the host half -----------------------------

BALANCED = [
    pytest.param(v1(("203.0.113.7", 40000), ("198.51.100.1", 443)), ("203.0.113.7", 40000), ("198.51.100.1", 443),
                 id="v1-tcp4"),
    pytest.param(v1(("2001:db8::7", 1), ("2001:db8::1", 65535)), ("2001:db8::7", 1), ("2001:db8::1", 65535),
                 id="v1-tcp6"),
    pytest.param(v2(("203.0.113.7", 40000), ("198.51.100.1", 443), tlvs=b"\x04\x00\x03abc\xea\x00\x02xy"),
                 ("203.0.113.7", 40000), ("198.51.100.1", 443), id="v2-tcp4-with-tlvs"),
    pytest.param(v2(("2001:db8::7", 40000), ("2001:db8::1", 443)), ("2001:db8::7", 40000), ("2001:db8::1", 443),
                 id="v2-tcp6"),
]


@pytest.mark.parametrize("header, source, destination", BALANCED)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_load_balancers_header_is_passed_on_as_the_client(proxy, recorder, header, source, destination, version):
    """Its addresses stand for the client's, in the version the entry writes; the bytes that came
    with the header in one segment are the client's, unchanged."""
    host_port = free_port()
    proxy.start_both(entry(host_port, recorder.port, 9000, bind="127.0.0.1", proxy_protocol=version,
                           accept_proxy_protocol=True))
    answer, _ = send_from(CLIENT_ADDRESS, "127.0.0.1", host_port, header + PAYLOAD)
    assert answer == b"ok"
    assert recorder.wait() == [HEADERS[version](source, destination) + PAYLOAD]


@pytest.mark.parametrize("header", [
    pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
    pytest.param(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", id="v1-unknown-with-addresses"),
    pytest.param(b"PROXY UNKNOWN \xff\x00 anything\r\n", id="v1-unknown-with-anything"),
    pytest.param(SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), id="v2-udp"),
    pytest.param(SIGNATURE + b"\x20\x00\x00\x00", id="v2-local"),
    pytest.param(SIGNATURE + b"\x21\x00\x00\x00", id="v2-unspec"),
    pytest.param(SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), id="v2-unix"),
])
def test_a_header_without_a_tcp_client_leaves_the_real_connection_as_the_client(proxy, recorder, header):
    """A load balancer's health check: the connection's own addresses are written on."""
    host_port = free_port()
    proxy.start_both(entry(host_port, recorder.port, 9000, bind="127.0.0.1", proxy_protocol="v1",
                           accept_proxy_protocol=True))
    answer, client = send_from(CLIENT_ADDRESS, "127.0.0.1", host_port, header + PAYLOAD)
    assert answer == b"ok"
    assert recorder.wait() == [v1(client, ("127.0.0.1", host_port)) + PAYLOAD]


def test_accepting_a_header_without_writing_one_passes_the_bytes_after_it(proxy, recorder):
    host_port = free_port()
    proxy.start_both(entry(host_port, recorder.port, 9000, bind="127.0.0.1", accept_proxy_protocol=True))
    send_from(CLIENT_ADDRESS, "127.0.0.1", host_port, v1(("203.0.113.7", 1), ("198.51.100.1", 2)) + PAYLOAD)
    assert recorder.wait() == [PAYLOAD]


NOT_HEADERS = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", id="http"),
    pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", id="v1-bad-address"),
    pytest.param(b"PROXY TCP4 ::1 ::1 1 2\r\n", id="v1-address-of-the-other-family"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", id="v1-port-too-big"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", id="v1-extra-word"),
    pytest.param(b"PROXY TCP4 " + b"1" * 200 + b"\r\n", id="v1-longer-than-107"),
    pytest.param(b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n", id="v1-bare-newline"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n", id="v1-not-ascii"),
    pytest.param(b"PROXY UNKNOWNJUNK\r\n", id="v1-unknown-run-on"),
    pytest.param(b"PROXY TCP6 fe80::1%x\n2026-12-02T11:45:00.000Z\tERROR\tqproxy::host\tforged ::1 1 2\r\n",
                 id="v1-zone-with-a-newline"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", id="v1-zone"),
    pytest.param(SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), id="v2-family-4"),
    pytest.param(SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), id="v2-protocol-3"),
    pytest.param(SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), id="v2-version-1"),
    pytest.param(SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), id="v2-command-2"),
    pytest.param(SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), id="v2-addresses-cut-short"),
    pytest.param(SIGNATURE + b"\x21\x11\xff\xff" + bytes(2000), id="v2-longer-than-the-bound"),
    pytest.param(SIGNATURE[:11] + b"X\x21\x11\x00\x0c" + bytes(12), id="v2-bad-signature"),
]


@pytest.mark.parametrize("data", NOT_HEADERS)
def test_a_client_without_a_valid_header_is_reset_and_the_port_goes_on(proxy, recorder, data):
    host_port = free_port()
    host, _ = proxy.start_both(entry(host_port, recorder.port, 9000, bind="127.0.0.1", proxy_protocol="v2",
                                     accept_proxy_protocol=True))
    with socket.create_connection(("127.0.0.1", host_port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        answer, ending = read_to_end(sock)
    assert (answer, ending) == (b"", "reset")
    line = host.wait_log(r"conn 1: no PROXY header \(accept_proxy_protocol\).*").group(0)
    assert "forged" not in host.log().replace(line, "")  # nothing the client sent makes a line of its own
    good = v1(("203.0.113.9", 9), ("198.51.100.1", 443))
    send_from(CLIENT_ADDRESS, "127.0.0.1", host_port, good + b"after")
    assert recorder.wait() == [v2(("203.0.113.9", 9), ("198.51.100.1", 443)) + b"after"]  # the bad one never got there


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_client_that_resets_at_once_is_a_reset_not_an_unreachable_enclave(proxy, recorder, version):
    """Its header is written from the addresses accept() gave: a reset client has no peer name any more."""
    host_port = free_port()
    host, _ = proxy.start_both(entry(host_port, recorder.port, 9000, bind="127.0.0.1", proxy_protocol=version))
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", host_port), timeout=DEADLINE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    host.wait_log(r"conn 20 (closed|reset|refused)")
    assert "cannot reach" not in host.log()
    send_from(CLIENT_ADDRESS, "127.0.0.1", host_port, b"still")
    wait_for(lambda: any(data.endswith(b"still") for data in recorder.received), "the next client at the service")


def test_a_header_read_before_the_half_ran_out_of_descriptors_is_not_read_again(proxy, recorder):
    """The dial after the header finds no descriptor: the connection waits for one, as any does, and
    then goes on with the header it had; the client's own "PROXY ..." bytes stay its payload."""
    import resource

    host_port = free_port()
    host, _ = proxy.start_both(entry(host_port, recorder.port, 9000, bind="127.0.0.1", proxy_protocol="v2",
                                     accept_proxy_protocol=True))
    pid = host.process.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = min(set(range(len(used) + 1)) - used)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free + 1, hard))  # one descriptor: the accept's
    payload = v1(("6.6.6.6", 6666), ("7.7.7.7", 7777)) + b"hello"
    with socket.create_connection(("127.0.0.1", host_port), timeout=DEADLINE) as sock:
        sock.sendall(v2(("1.2.3.4", 1111), ("5.6.7.8", 2222)) + payload)
        host.wait_log(r"conn 1: cannot dial vsock 4:9000: Too many open files")
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        sock.shutdown(socket.SHUT_WR)
        answer, _ = read_to_end(sock)
    assert answer == b"ok"
    assert recorder.wait() == [v2(("1.2.3.4", 1111), ("5.6.7.8", 2222)) + payload]


def test_a_header_that_never_completes_is_reset_within_the_time_bound(proxy, recorder):
    import qproxy

    host_port = free_port()
    proxy.start_both(entry(host_port, recorder.port, 9000, bind="127.0.0.1", accept_proxy_protocol=True))
    with socket.create_connection(("127.0.0.1", host_port), timeout=DEADLINE + qproxy.PROXY_HEADER_TIMEOUT) as sock:
        began = time.monotonic()
        for byte in b"PROXY TCP4 1.2":
            sock.send(bytes((byte,)))
            time.sleep(0.05)
        _, ending = read_to_end(sock)
        waited = time.monotonic() - began
    assert ending == "reset"
    assert qproxy.PROXY_HEADER_TIMEOUT - 0.5 <= waited <= qproxy.PROXY_HEADER_TIMEOUT + 5
    assert recorder.received == []


# --- the halves compare the key; a reload changes it for new connections -----------------------------


def test_the_halves_name_a_proxy_protocol_that_differs(proxy, recorder):
    host_port = free_port()
    proxy.write_config(entry(host_port, recorder.port, 9000))
    enclave = proxy.start("enclave")
    proxy.write_config(entry(host_port, recorder.port, 9000, proxy_protocol="v2"))
    host = proxy.start("host")
    host.wait_log("config mismatch: inbound vsock port 9000: the host half's proxy_protocol is v2, the enclave"
                  " half's off")
    assert enclave.process.poll() is None


def test_auto_and_the_address_it_stands_for_are_no_mismatch(tmp_path):
    import qproxy

    name = "payments.example.com"
    base = f'[[outbound_connections]]\nhostname = "{name}"\nvsock_port = 8001\ntcp_port = 443\nenclave_address = '
    host, enclave = tmp_path / "host.toml", tmp_path / "enclave.toml"
    host.write_text(base + '"auto"\n')
    enclave.write_text(base + f'"{qproxy.loopback_for(name)}"\n')
    from conftest import run_qproxy

    result = run_qproxy("check-config", str(host), "--enclave-config", str(enclave))
    assert (result.returncode, result.stderr) == (0, "")
    enclave.write_text(base + '"127.0.0.7"\n')
    result = run_qproxy("check-config", str(host), "--enclave-config", str(enclave))
    assert result.returncode == 2
    assert (f"config mismatch: outbound vsock port 8001: the host half's enclave_address is {qproxy.loopback_for(name)},"
            " the enclave half's 127.0.0.7") in result.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not has_ipv6_loopback(),
                    reason="needs root, unshare and IPv6 for a network namespace with net.ipv6.bindv6only = 1")
def test_a_listener_on_the_unspecified_ipv6_address_takes_ipv4_whatever_the_system_default():
    """bind_address = "::" is every address of both families, also where net.ipv6.bindv6only is 1."""
    from conftest import ROOT

    script = ("import socket, qproxy\n"
              "listener = qproxy.open_listener(qproxy.Endpoint('tcp', '::', 8080), qproxy.Vsock(None))\n"
              "socket.create_connection(('127.0.0.1', 8080), timeout=5).close()\n"
              "socket.create_connection(('::1', 8080), timeout=5).close()\nprint('both')\n")
    result = subprocess.run(["unshare", "-n", "sh", "-c", 'echo 1 > /proc/sys/net/ipv6/bindv6only && ip link set lo up'
                             ' && exec "$0" "$@"', sys.executable, "-c", script],
                            capture_output=True, text=True, cwd=ROOT, timeout=DEADLINE)
    assert (result.returncode, result.stdout) == (0, "both\n"), result.stderr


def test_check_config_warns_of_a_load_balancers_header_taken_from_any_address(tmp_path):
    from conftest import run_qproxy

    path = tmp_path / "config.toml"
    path.write_text(entry(443, 8443, 9000, bind="0.0.0.0", accept_proxy_protocol=True)
                    + entry(444, 8444, 9001, bind="10.0.0.5", accept_proxy_protocol=True)
                    + entry(445, 8445, 9002, bind="::ffff:0.0.0.0", accept_proxy_protocol=True)
                    + entry(446, 8446, 9003, bind="::", accept_proxy_protocol=False))
    result = run_qproxy("check-config", str(path))
    assert result.returncode == 0
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {path}:{line}: [[inbound_connections]] entry {number}: accept_proxy_protocol: true on"
        f" bind_address {bind}: every client that reaches host_port {port} can name any address as its own;"
        " listen where only the load balancer reaches"
        for line, number, bind, port in ((1, 1, "0.0.0.0", 443), (13, 3, "::ffff:0.0.0.0", 445))]


def test_a_reload_onto_a_wildcard_address_with_accept_proxy_protocol_is_warned_about(proxy, recorder):
    host_port = free_port()
    host, _ = proxy.start_both(entry(host_port, recorder.port, 9000, bind="127.0.0.1", accept_proxy_protocol=True))
    proxy.write_config(entry(host_port, recorder.port, 9000, bind="0.0.0.0", accept_proxy_protocol=True))
    host.process.send_signal(signal.SIGHUP)
    host.wait_log(r"WARN  qproxy::host reload: .*accept_proxy_protocol: true on bind_address 0\.0\.0\.0: every client")


def test_a_config_path_cannot_forge_a_line_of_the_log_or_of_check_config(tmp_path):
    from conftest import run_qproxy

    path = tmp_path / "x\n2026-12-02T00:00:00.000Z ERROR qproxy::host FORGED.toml"
    path.write_text("[[inbound_connections]]\nhost_port = 0\n")
    result = run_qproxy("check-config", str(path))
    assert result.returncode == 2
    assert all("FORGED" not in line or line.startswith("qproxy: error:") for line in result.stderr.splitlines())
    assert "\\n2026" in result.stderr


def test_a_reload_turns_the_header_on_for_new_connections(proxy, recorder):
    host_port = free_port()
    host, _ = proxy.start_both(entry(host_port, recorder.port, 9000, bind="127.0.0.1"))
    send_from(CLIENT_ADDRESS, "127.0.0.1", host_port, b"before")
    recorder.wait(1)
    proxy.write_config(entry(host_port, recorder.port, 9000, bind="127.0.0.1", proxy_protocol="v1"))
    host.process.send_signal(signal.SIGHUP)
    host.wait_log(r"reload: tcp 127\.0\.0\.1:\d+ -> vsock 4:9000; the client's address sent ahead in a PROXY v1"
                  r" header from now on")
    _, client = send_from(CLIENT_ADDRESS, "127.0.0.1", host_port, b"after")
    assert recorder.wait(2) == [b"before", v1(client, ("127.0.0.1", host_port)) + b"after"]


# --- a real nginx in the enclave's network namespace ----------------------------------------------

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
needs_nginx_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter") or not os.access(NGINX, os.X_OK),
    reason="needs root, unshare, nsenter and nginx (Debian's nginx-light) for nginx in the enclave's namespace",
)
NGINX_CONFIG = """daemon off; master_process off; worker_processes 1;
pid {folder}/nginx.pid; error_log {folder}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    log_format client '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
    client_body_temp_path {folder}/body; proxy_temp_path {folder}/proxy;
    server {{ listen 127.0.0.1:{v1} proxy_protocol; access_log {folder}/v1.log client; return 200 "v1\\n"; }}
    server {{ listen 127.0.0.1:{v2} proxy_protocol; access_log {folder}/v2.log client; return 200 "v2\\n"; }}
    server {{ listen 127.0.0.1:{off}; access_log {folder}/off.log client; return 200 "off\\n"; }}
}}
"""


@pytest.fixture
def nginx_in_the_enclave(proxy):
    """Both halves, the enclave half in a network namespace of its own with nginx listening there,
    one server for each of v1, v2 and no header; each inbound entry on a dual-stack listener."""
    ports = {"v1": 8081, "v2": 8082, "off": 8083}  # the enclave's own namespace: no other listener there
    host_ports = {version: free_port() for version in ports}
    proxy.write_config("".join(
        entry(host_ports[version], port, 9000 + number, proxy_protocol=version)
        for number, (version, port) in enumerate(ports.items())))
    enclave = proxy.start("enclave", wrapper=["unshare", "-n"])
    (proxy.folder / "nginx.conf").write_text(NGINX_CONFIG.format(folder=proxy.folder, **ports))
    nginx = subprocess.Popen(["nsenter", f"--net=/proc/{enclave.process.pid}/ns/net", NGINX, "-c",
                              str(proxy.folder / "nginx.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (proxy.folder / "nginx.pid").exists() or nginx.poll() is not None, "nginx to start")
        assert nginx.poll() is None, (proxy.folder / "nginx-error.log").read_text(errors="replace")
        proxy.start("host")
        yield host_ports
    finally:
        nginx.kill()  # its workers end with it (master_process off: there are none of its own)
        nginx.wait(DEADLINE)


def http_get(source: str, host: str, port: int) -> tuple[bytes, tuple[str, int]]:
    answer, client = send_from(source, host, port, b"GET / HTTP/1.0\r\nHost: enclave\r\n\r\n")
    return answer, client


@needs_nginx_namespace
@pytest.mark.parametrize("source, host", CLIENTS)
def test_nginx_in_the_enclave_logs_the_clients_real_address(proxy, nginx_in_the_enclave, source, host):
    host_ports = nginx_in_the_enclave
    for version in ("v1", "v2"):
        answer, client = http_get(source, host, host_ports[version])
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(f"{version}\n".encode()), answer
        log_file = proxy.folder / f"{version}.log"
        line = wait_for(lambda: log_file.exists() and log_file.read_text().strip(), f"nginx's {version} access log")
        # $proxy_protocol_addr $proxy_protocol_port $remote_addr: nginx's own peer is the enclave half, on loopback.
        assert line.splitlines()[-1] == f"{client[0]} {client[1]} 127.0.0.1", line
        log_file.unlink()


@needs_nginx_namespace
def test_nginx_without_proxy_protocol_is_unaffected_on_an_entry_without_the_header(proxy, nginx_in_the_enclave):
    answer, _ = http_get(CLIENT_ADDRESS, "127.0.0.1", nginx_in_the_enclave["off"])
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"off\n"), answer
    log_file = proxy.folder / "off.log"
    line = wait_for(lambda: log_file.exists() and log_file.read_text().strip(), "nginx's access log")
    assert re.fullmatch(r"- - 127\.0\.0\.1", line), line  # no header: nginx saw the enclave half, as before

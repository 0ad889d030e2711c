"""Faults end to end: resets, stalls, dead halves, floods and hostile bytes, both halves as real processes.

Each test names a behaviour and fails if qproxy loses it.  Resources are read from /proc:
descriptors and threads (as test_relay's process_counts does) and VmRSS/VmHWM for memory.
"""

from __future__ import annotations

import collections
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import struct
import threading
import time

import pytest

import qproxy
from conftest import (
    DEADLINE, ThreadedServer, echo, free_port, inbound, outbound, private_resolver, read_to_end, recv_all, wait_for,
)
from test_relay import connect, exchange, process_counts

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors and threads")

# Worker threads outlive their last job by SETUP_THREAD_IDLE, so counts settle only after that.
SETTLE = qproxy.SETUP_THREAD_IDLE + DEADLINE
QUIET = 0.5  # seconds without progress after which a sender counts as blocked
FLOOD = 200 * 1024 * 1024  # what a flooding sender offers: far more than every buffer on the way holds
# qproxy holds at most one BUFFER_SIZE (256 KiB) buffer per direction of a connection, plus a few
# spares, so one stalled connection costs it well under 1 MiB.  16 MiB leaves room for the
# interpreter's noise (a worker thread's stack, allocator arenas), while a proxy that read
# what it cannot deliver would hold tens of MB of the 200 MB on offer.
RSS_BOUND_KIB = 16 * 1024


# --- helpers ---------------------------------------------------------------------------


def counts(halves) -> dict[str, tuple[int, int]]:
    """(descriptors, threads) of each running half, by role."""
    return {half.role: process_counts(half.process.pid) for half in halves}


def kinds(half) -> collections.Counter:
    """How many of each kind of descriptor (socket, pipe, ...) a half holds."""
    return collections.Counter(name.split(":")[1] for name in descriptors(half.process.pid))


def settle_to(baseline: dict, halves) -> None:
    """Wait until every half is back to its baseline counts; fail saying what is left over."""
    seen: dict = {}

    def settled() -> bool:
        seen.update(counts(halves))
        return seen == baseline

    try:
        wait_for(settled, "descriptors and threads back to their baseline", SETTLE)
    except AssertionError as error:
        open_now = {half.role: descriptors(half.process.pid) for half in halves}
        raise AssertionError(f"{error}: baseline {baseline}, last seen {seen}; open now: {open_now}") from None


def descriptors(pid: int) -> list[str]:
    """What a process's descriptors point at, for a failure message."""
    found = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            found.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass  # closed meanwhile
    return found


def memory_kib(half) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a half: resident now, and the most it has been resident (where the
    kernel keeps that high-water mark; else resident now)."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{half.process.pid}/status"))
    rss = int(fields["VmRSS"].split()[0])
    return rss, int(fields["VmHWM"].split()[0]) if "VmHWM" in fields else rss


def abort(sock: socket.socket) -> None:
    """Close with a reset (RST) instead of an orderly FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the connection ended after {len(data)} of {size} bytes"
        data += chunk
    return data


def send_until_blocked(sock: socket.socket, limit: int = FLOOD) -> int:
    """Send as fast as the far end takes it, up to limit bytes; return how much went once
    nothing has moved for QUIET seconds (the far end stopped taking), or limit was reached."""
    chunk = memoryview(os.urandom(1 << 20))
    sock.setblocking(False)
    sent, moved = 0, time.monotonic()
    give_up = moved + 4 * DEADLINE
    try:
        while sent < limit:
            try:
                sent += sock.send(chunk[: limit - sent])
                moved = time.monotonic()
                continue
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now - moved >= QUIET:
                break
            assert now < give_up, f"still trickling after {4 * DEADLINE} s, {sent} bytes sent"
            wait_writable(sock, 0.05)
    finally:
        sock.settimeout(DEADLINE)
    return sent


def wait_writable(sock: socket.socket, timeout: float) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        selector.select(timeout)


class EchoLoop:
    """An echo service on one thread and a selector: a thousand connections cost it no thread each."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.pending: dict[socket.socket, bytes] = {}  # what a connection has not taken back yet
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            for key, _ in self.selector.select(0.05):
                if key.fileobj is self.listener:
                    self.accept()
                    continue
                try:
                    self.serve(key.fileobj)
                except OSError:
                    self.drop(key.fileobj)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)

    def serve(self, sock: socket.socket) -> None:
        was_pending = sock in self.pending
        data = self.pending.pop(sock, None)
        if data is None:
            data = sock.recv(65536)
            if not data:
                self.drop(sock)
                return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.pending[sock] = data[sent:]  # read no more until the client takes this back
            if not was_pending:
                self.selector.modify(sock, selectors.EVENT_WRITE)
        elif was_pending:
            self.selector.modify(sock, selectors.EVENT_READ)

    def drop(self, sock: socket.socket) -> None:
        self.pending.pop(sock, None)
        self.selector.unregister(sock)
        sock.close()

    def stop(self) -> None:
        self.running = False
        self.thread.join(DEADLINE)


@pytest.fixture
def echo_loop():
    server = EchoLoop()
    yield server
    server.stop()


class Stream:
    """A connection that sends without pause and reads whatever comes back, until it ends.

    Records how its receiving side ended ("eof" or "reset") and when, the error that
    ended its sending side, and when bytes last arrived.
    """

    CHUNK = os.urandom(64 * 1024)

    def __init__(self, port: int):
        self.sock = connect(port)
        self.received = 0
        self.last_data = 0.0
        self.ending: str | None = None
        self.ended_at = 0.0
        self.send_error: OSError | None = None
        self.threads = [threading.Thread(target=self.send, daemon=True),
                        threading.Thread(target=self.receive, daemon=True)]
        for thread in self.threads:
            thread.start()

    def send(self) -> None:
        try:
            while True:
                self.sock.sendall(self.CHUNK)
        except OSError as error:
            self.send_error = error

    def receive(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    self.ending = "eof"
                    break
                self.received += len(data)
                self.last_data = time.monotonic()
        except ConnectionResetError:
            self.ending = "reset"
        except OSError as error:
            self.ending = f"error {error!r}"
        self.ended_at = time.monotonic()

    @property
    def over(self) -> bool:
        return self.ending is not None and self.send_error is not None

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked in sendall
        except OSError:
            pass
        for thread in self.threads:
            thread.join(DEADLINE)
        self.sock.close()


def start_connected(proxy, config: str):
    """Both halves, up and joined by their control connection, so that counts taken now are a baseline."""
    host, enclave = proxy.start_both(config)
    host.wait_log("control: enclave half connected")
    enclave.wait_log("control: connected to the host half")
    return host, enclave


def route(direction: str, service_port: int, port: int) -> str:
    """A config whose clients connect to port and reach service_port through both halves."""
    return inbound(port, service_port) if direction == "inbound" else outbound("127.0.0.1", service_port, port)


def refused(port: int) -> bool:
    try:
        connect(port).close()
    except ConnectionRefusedError:
        return True
    return False


# --- 1. a reset mid-stream ----------------------------------------------------------------

REQUEST_SIZE = 10_000
PARTIAL_REPLY = os.urandom(50_000)


def resetting_service(cue: threading.Event):
    """Reads a request, sends part of a reply and, once cued, resets the connection.
    A request that starts with b"echo" is echoed instead, to the client's EOF."""

    def handle(sock: socket.socket) -> None:
        request = recv_exactly(sock, REQUEST_SIZE)
        if request.startswith(b"echo"):
            sock.sendall(request)
            echo(sock)
            return
        sock.sendall(PARTIAL_REPLY)
        cue.wait(DEADLINE)
        abort(sock)

    return handle


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_a_reset_mid_stream_ends_the_clients_connection_and_leaves_nothing_behind(proxy, direction):
    cue = threading.Event()
    service = ThreadedServer(resetting_service(cue))
    port = free_port()
    halves = start_connected(proxy, route(direction, service.port, port))
    host, enclave = halves
    far = host if direction == "outbound" else enclave  # the half whose TCP leg is reset
    baseline = counts(halves)

    # The client only reading when the reset comes, its sending side open.  Vsock carries no
    # reset, but the half next to the reset closes its vsock socket, and the other half, finding
    # it closed while the client's direction towards it is open, resets the client in turn.
    with connect(port) as sock:
        sock.sendall(b"part" + os.urandom(REQUEST_SIZE - 4))
        assert recv_exactly(sock, len(PARTIAL_REPLY)) == PARTIAL_REPLY
        cue.set()
        assert read_to_end(sock) == (b"", "reset")
    far.wait_log(r"conn 1 reset \(Connection reset by peer\)")

    # The client still sending when the reset comes: what it sends has nowhere to go, and
    # the half next to it resets it.
    cue.clear()
    with connect(port) as sock:
        sock.sendall(b"part" + os.urandom(REQUEST_SIZE - 4))
        assert recv_exactly(sock, len(PARTIAL_REPLY)) == PARTIAL_REPLY
        send_until_blocked(sock)  # the service reads no more, so every buffer on the way fills
        cue.set()
        assert read_to_end(sock) == (b"", "reset")
    far.wait_log(r"conn 2 reset \(Connection reset by peer\)")

    # The client done sending (its side ended) and reading the reply when the reset comes:
    # nothing more goes towards the other half, so its close looks like an end, and the client
    # gets EOF after the partial reply (README: check lengths, or use a framed protocol).
    cue.clear()
    with connect(port) as sock:
        sock.sendall(b"part" + os.urandom(REQUEST_SIZE - 4))
        assert recv_exactly(sock, len(PARTIAL_REPLY)) == PARTIAL_REPLY
        sock.shutdown(socket.SHUT_WR)
        cue.set()
        assert read_to_end(sock) == (b"", "eof")
    far.wait_log(r"conn 3 reset \((Connection reset by peer|Transport endpoint is not connected)\)")

    request = b"echo" + os.urandom(REQUEST_SIZE - 4)
    assert exchange(port, request) == request
    settle_to(baseline, halves)
    service.stop()


# --- 2. an upstream that accepts and then stalls ----------------------------------------------


def test_a_stalled_upstream_holds_only_its_own_connection_until_it_closes(proxy):
    stalled, release = threading.Event(), threading.Event()
    first = threading.Lock()

    def upstream(sock):
        if first.acquire(blocking=False):  # the first connection: never read, never write, stay open
            stalled.set()
            release.wait(4 * DEADLINE)
            return  # socketserver closes it, with the request unread
        echo(sock)

    outside = ThreadedServer(upstream)
    app_port = free_port()
    halves = start_connected(proxy, outbound("127.0.0.1", outside.port, app_port))
    baseline = counts(halves)
    sockets = {half.role: kinds(half) for half in halves}
    with connect(app_port) as sock:
        wait_for(stalled.is_set, "the upstream to accept the connection")
        send_until_blocked(sock)  # every buffer on the way fills: a write in either half would block

    for number in range(20):  # the stalled connection holds up no other
        message = b"still serving %d" % number
        assert exchange(app_port, message) == message
    # ...and each half keeps exactly that connection's two sockets, not one more or less, and at most
    # the pipe that its stalled direction splices through (Python 3.10+), holding bytes it could not send.
    wait_for(lambda: all(kinds(half)["socket"] == sockets[half.role]["socket"] + 2 and kinds(half)["pipe"] <= 2
                         for half in halves),
             "each half to hold the stalled connection's two sockets and nothing else")

    release.set()
    settle_to(baseline, halves)
    assert all(half.process.poll() is None for half in halves)
    outside.stop()


# --- 3. DNS that answers only the family --ipv4 leaves out ----------------------------------

needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare to give the host half its own resolver files"
)


@needs_mount_namespace
@pytest.mark.parametrize("flag, excluded, allowed", [
    ("--ipv6", "127.0.0.1", "::1"),
    # Not ::1: glibc answers an IPv4 lookup of a name listed as ::1 in /etc/hosts with 127.0.0.1.
    # 2001:db8::/32 is for documentation (RFC 3849), routed nowhere; qproxy must not try it anyway.
    ("--ipv4", "2001:db8::1", "127.0.0.1"),
])
def test_a_name_with_only_excluded_addresses_resets_the_app_and_is_named_in_a_warning(
        proxy, tmp_path, flag, excluded, allowed):
    # Would answer on the excluded address, were the flag ignored; on the allowed one, it does.
    lost = ThreadedServer(echo, excluded) if excluded.startswith("127.") else None
    served = ThreadedServer(echo, allowed)
    excluded_port = lost.port if lost else free_port()
    excluded_app, allowed_app = free_port(), free_port()
    proxy.write_config(outbound("excluded.test", excluded_port, excluded_app, 7000)
                       + outbound("allowed.test", served.port, allowed_app, 7001))
    proxy.start("enclave")
    hosts = f"{excluded} excluded.test\n{allowed} allowed.test\n"
    host = proxy.start("host", flag, wrapper=private_resolver(tmp_path, hosts))

    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            with connect(excluded_app) as sock:
                sock.sendall(b"hello?")
                recv_all(sock)
        # Promptly: neither a connect timeout (10 s) nor a resolver's was waited out.
        assert time.monotonic() - started < 3.0
    family = "IPv4" if flag == "--ipv4" else "IPv6"
    host.wait_log(r"WARN .*conn \d+: cannot reach tcp excluded\.test:%d: name resolution failed \(.*; only %s"
                  r" addresses \(%s\) were asked for\)" % (excluded_port, family, flag))
    assert exchange(allowed_app, b"still serving") == b"still serving"
    assert host.process.poll() is None
    if lost:
        assert lost.accepted == 0
        lost.stop()
    served.stop()


# --- 4. memory while a peer reads nothing -----------------------------------------------------


@pytest.mark.parametrize("case", ["client-to-deaf-service", "service-to-deaf-client", "app-to-stalled-upstream"])
def test_memory_stays_bounded_while_a_peer_reads_nothing(proxy, case):
    release = threading.Event()
    offered: list[int] = []

    def service(sock):
        if case == "service-to-deaf-client":
            offered.append(send_until_blocked(sock))
        release.wait(4 * DEADLINE)

    deaf = ThreadedServer(service)
    port = free_port()
    direction = "outbound" if case == "app-to-stalled-upstream" else "inbound"
    halves = start_connected(proxy, route(direction, deaf.port, port))
    before = {half.role: memory_kib(half)[0] for half in halves}

    with connect(port) as sock:
        if case == "service-to-deaf-client":
            wait_for(lambda: offered, "the service's sending to block", 4 * DEADLINE)
            sent = offered[0]
        else:
            sent = send_until_blocked(sock)
        assert sent < FLOOD, "the sender was never held back: something swallows what it cannot deliver"
        for half in halves:
            rss, peak = memory_kib(half)
            assert peak - before[half.role] < RSS_BOUND_KIB, (
                f"{half.role} half grew from {before[half.role]} KiB to a peak of {peak} KiB (now {rss}) "
                f"with {sent} bytes offered"
            )
        release.set()
    assert all(half.process.poll() is None for half in halves)
    deaf.stop()


# --- 5. the other half dies mid-stream --------------------------------------------------------


# The half killed, the path its stream takes, how the survivor tells the other half left, how it sees it back.
DEATHS = {
    "enclave": ("inbound", r"control: the enclave half \(.*\) (disconnected|failed)",
                lambda proxy, survivor: wait_for(lambda: survivor.log().count("control: enclave half connected") == 2,
                                                 "the new enclave half to connect")),
    "host": ("outbound", r"control: (the host half went away|connection to the host half failed)",
             lambda proxy, survivor: proxy.halves[-1].wait_log("control: enclave half connected")),
}


@pytest.mark.parametrize("dead", list(DEATHS))
def test_a_half_killed_mid_stream_ends_the_stream_and_the_survivor_serves_the_next_one(proxy, echo_loop, dead):
    direction, noticed, back = DEATHS[dead]
    port = free_port()
    host, enclave = start_connected(proxy, route(direction, echo_loop.port, port))
    victim, survivor = (enclave, host) if dead == "enclave" else (host, enclave)
    baseline = counts([survivor])
    stream = Stream(port)
    wait_for(lambda: stream.received > 1 << 20, "bytes to flow both ways")
    victim.process.kill()
    victim.process.wait()

    wait_for(lambda: stream.over, "the client's connection to end")
    # The dead half's vsock reads as EOF and refuses writes; the survivor's reactor meets one or the
    # other first, so the client reads EOF or a reset.  Its sending always meets the reset.
    assert stream.ending in ("eof", "reset"), stream.ending
    assert isinstance(stream.send_error, (ConnectionResetError, BrokenPipeError)), stream.send_error
    stream.close()
    survivor.wait_log(r"conn 1 reset \(")
    survivor.wait_log(noticed)
    assert survivor.process.poll() is None

    proxy.start(dead)
    back(proxy, survivor)
    assert exchange(port, b"after the crash") == b"after the crash"
    settle_to(baseline, [survivor])


# --- 6. many connections, in a row and at once ------------------------------------------------


def test_10000_short_connections_in_a_row_leave_nothing_behind(proxy, echo_loop):
    host_port = free_port()
    halves = start_connected(proxy, inbound(host_port, echo_loop.port))
    baseline = counts(halves)
    started = time.monotonic()
    for number in range(10_000):
        message = b"%05d" % number
        with socket.socket() as sock:  # not create_connection: no name lookup, 10,000 times
            sock.settimeout(DEADLINE)
            sock.connect(("127.0.0.1", host_port))
            sock.sendall(message)
            assert recv_exactly(sock, len(message)) == message
    print(f"\n10,000 connections in a row took {time.monotonic() - started:.1f} s")
    assert echo_loop.accepted == 10_000
    settle_to(baseline, halves)


@pytest.fixture
def many_descriptors():
    """This process's soft limit on descriptors raised for a thousand clients and their service ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4096  # 1,000 clients and 1,000 service sockets here; each half holds 2,000
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard limit on open files ({hard}) is below {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_1000_connections_at_once_leave_nothing_behind(many_descriptors, proxy, echo_loop):
    host_port = free_port()
    halves = start_connected(proxy, inbound(host_port, echo_loop.port))  # within -t, 1024 by default
    baseline = counts(halves)
    sockets = [connect(host_port) for _ in range(1000)]
    try:
        for number, sock in enumerate(sockets):
            sock.sendall(b"%04d" % number)
        for number, sock in enumerate(sockets):
            assert recv_exactly(sock, 4) == b"%04d" % number
        busy = counts(halves)
        # Every one relayed at the same time: two descriptors each in each half.
        assert all(busy[role][0] >= baseline[role][0] + 2000 for role in baseline), (baseline, busy)
    finally:
        for sock in sockets:
            sock.close()
    assert echo_loop.accepted == 1000
    settle_to(baseline, halves)


# --- 7. SIGTERM under load --------------------------------------------------------------------


def start_streams(port: int, number: int = 20) -> list[Stream]:
    streams = [Stream(port) for _ in range(number)]
    wait_for(lambda: all(stream.received > 256 * 1024 for stream in streams), "every stream to flow", 2 * DEADLINE)
    return streams


def test_sigterm_under_load_drains_for_the_grace_period_then_cuts(proxy, echo_loop):
    host_port = free_port()
    host, enclave = start_connected(proxy, inbound(host_port, echo_loop.port))
    streams = start_streams(host_port)
    try:
        signalled = time.monotonic()
        host.process.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(host_port), "the host half to stop accepting")
        assert time.monotonic() - signalled < 1.0, "the listener stayed open after SIGTERM"

        # Still flowing: every stream moves another MiB after the listeners closed, before the cut.
        marks = [stream.received for stream in streams]
        wait_for(lambda: all(s.received > mark + (1 << 20) for s, mark in zip(streams, marks)),
                 "every stream to keep flowing during the grace period",
                 max(signalled + qproxy.GRACE_PERIOD - time.monotonic(), 0.01))

        assert host.process.wait(qproxy.GRACE_PERIOD + DEADLINE) == 0
        exited = time.monotonic() - signalled
        # GRACE_PERIOD, then at most 1 s for the cut connections to close, plus slack for a busy machine.
        assert qproxy.GRACE_PERIOD <= exited < qproxy.GRACE_PERIOD + 3.0, exited
        wait_for(lambda: all(stream.over for stream in streams), "every stream to end")
        for stream in streams:
            assert stream.ended_at - signalled >= qproxy.GRACE_PERIOD, "a connection was cut before the grace period ended"
            assert stream.ended_at - stream.last_data < 1.0, "a connection stopped flowing before it was cut"
            assert stream.ending in ("eof", "reset"), stream.ending
            assert isinstance(stream.send_error, (ConnectionResetError, BrokenPipeError)), stream.send_error
        # The cut resets each client's connection, so that a cut stream cannot pass for a complete one.  The
        # kernel reports a reset once, to whichever of a client's two threads asks first: the other sees an
        # end.  With an orderly end before the reset, as a shutdown() would send, no receiver sees the reset.
        for stream in streams:
            assert stream.ending == "reset" or isinstance(stream.send_error, ConnectionResetError), stream.ending
        assert any(stream.ending == "reset" for stream in streams), [stream.ending for stream in streams]
        host.wait_log(r"grace period over: cutting 20 open connections")
        assert len(re.findall(r"qproxy::host conn \d+ cut at the end of the grace period", host.log())) == 20
        assert enclave.process.poll() is None
    finally:
        for stream in streams:
            stream.close()


def test_a_second_signal_under_load_exits_at_once(proxy, echo_loop):
    host_port = free_port()
    host, enclave = start_connected(proxy, inbound(host_port, echo_loop.port))
    streams = start_streams(host_port)
    try:
        host.process.send_signal(signal.SIGTERM)
        host.wait_log("SIGTERM: stopping")
        marks = [stream.received for stream in streams]
        wait_for(lambda: all(s.received > mark for s, mark in zip(streams, marks)), "the drain to carry traffic")
        again = time.monotonic()
        host.process.send_signal(signal.SIGTERM)
        assert host.process.wait(DEADLINE) == 0
        assert time.monotonic() - again < 1.5, "the second signal did not exit at once"
        host.wait_log("second signal: exiting now")
        wait_for(lambda: all(stream.over for stream in streams), "every stream to end")
    finally:
        for stream in streams:
            stream.close()


# --- 8. payloads that steer other proxies ---------------------------------------------------


def steering_payloads(port: int) -> dict[str, bytes]:
    """Requests that make other proxies connect to 127.0.0.1:port."""
    address = socket.inet_aton("127.0.0.1")
    return {
        "HTTP CONNECT": b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port),
        "HTTP absolute URI": b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port),
        "PROXY v1": b"PROXY TCP4 127.0.0.1 127.0.0.1 50000 %d\r\nGET / HTTP/1.0\r\n\r\n" % port,
        "PROXY v2": b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + address + address + struct.pack("!HH", 50000, port),
        "SOCKS5": b"\x05\x01\x00" + b"\x05\x01\x00\x01" + address + struct.pack("!H", port),
        "SOCKS4": b"\x04\x01" + struct.pack("!H", port) + address + b"\x00",
    }


def test_payloads_that_steer_other_proxies_reach_the_configured_target_verbatim(proxy):
    decoy = socket.socket()
    decoy.bind(("127.0.0.1", 0))
    decoy.listen(16)
    decoy.setblocking(False)
    received: list[bytes] = []

    def target(sock):
        received.append(recv_all(sock))
        sock.sendall(b"from the configured target")

    upstream = ThreadedServer(target)
    app_port, host_port = free_port(), free_port()
    proxy.start_both(outbound("127.0.0.1", upstream.port, app_port) + inbound(host_port, upstream.port))
    payloads = steering_payloads(decoy.getsockname()[1])
    for port in (app_port, host_port):  # outbound, and inbound for good measure
        for name, payload in payloads.items():
            assert exchange(port, payload) == b"from the configured target", name
            assert received[-1] == payload, name
    assert upstream.accepted == 2 * len(payloads)
    with pytest.raises(BlockingIOError):  # a connection to the decoy would wait in its listen queue
        decoy.accept()
    decoy.close()
    upstream.stop()


# --- a client that ended its side and left: a far side that streams on is not fed to nowhere for ever ---

@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_client_that_left_after_ending_its_side_ends_an_endless_stream(proxy, direction):
    """A log tail or an event stream answers a request and sends until its client goes away.  The
    client ends its side, reads a little and closes with bytes unread (its kernel resets).  Directly,
    the stream's next sends would fail; through both halves they must fail too, not go nowhere."""
    ended = threading.Event()
    chunk = os.urandom(65536)

    def streamer(sock):
        sock.recv(100)
        try:
            while True:
                sock.sendall(chunk)
        except OSError:
            ended.set()

    service = ThreadedServer(streamer)
    port = free_port()
    start_connected(proxy, route(direction, service.port, port))
    try:
        with connect(port) as sock:
            sock.sendall(b"GET /stream\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1000)
        wait_for(ended.is_set, "the stream's sends to fail, as they would without qproxy between")
    finally:
        service.stop()

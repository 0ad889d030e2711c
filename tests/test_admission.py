"""Admission (issue 10, items 1, 4, 7): budgets per direction, waiting for room, stops, descriptors.

-t/--threads bounds each direction of a half on its own (inbound and outbound), so
no limit can make a request that calls out wait on itself, within a half or across
the two.  A connection beyond a limit is accepted and waits inside the half, in
arrival order, for at most [limits] queue_timeout seconds, then is reset.  A stop
gives every accepted connection, waiting ones included, the grace period.  Out of
descriptors, clients wait rather than being reset.

Both halves run as subprocesses over emulated vsock; every service is on loopback.
"""

from __future__ import annotations

import collections
import os
import selectors
import shutil
import signal
import socket
import threading
import time

import pytest

import qproxy
from conftest import DEADLINE, ThreadedServer, echo, free_port, inbound, outbound, read_to_end, recv_all, wait_for
from test_faults import EchoLoop, recv_exactly
from test_limits import assert_no_reply_yet, limits
from test_relay import connect

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")

REQUEST_SIZE = 16


# --- helpers ---------------------------------------------------------------------------


class BigServer(ThreadedServer):
    """A ThreadedServer whose listen queue takes a thousand connections at once."""

    request_queue_size = 2048


def request(number: int, tag: str = "req") -> bytes:
    return f"{tag} {number:08d}".encode().ljust(REQUEST_SIZE, b".")


def open_clients(port: int, requests: list[bytes]) -> list[socket.socket]:
    """One connection per request, all opened and sent at once (before any reply is read)."""
    clients = []
    try:
        for payload in requests:
            sock = socket.socket()
            sock.settimeout(DEADLINE)
            clients.append(sock)
            sock.connect(("127.0.0.1", port))
            sock.sendall(payload)
    except BaseException:
        for sock in clients:
            sock.close()
        raise
    return clients


def await_replies(clients: list[socket.socket], expected: list[bytes], timeout: float) -> dict[int, str]:
    """Read every client's reply at once (a selector, no thread each) until it is whole, then close
    that client: each holds its connection only as long as it needs.  Returns, for each client,
    "ok" or what went wrong; every client is closed on return."""
    outcome: dict[int, str] = {}
    got = [b""] * len(clients)
    selector = selectors.DefaultSelector()
    for number, sock in enumerate(clients):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, number)
    end = time.monotonic() + timeout
    try:
        while selector.get_map() and time.monotonic() < end:
            for key, _ in selector.select(min(0.2, max(end - time.monotonic(), 0.0))):
                number, sock = key.data, key.fileobj
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    outcome[number] = "reset"
                except OSError as error:
                    outcome[number] = f"error {error!r}"
                else:
                    if chunk:
                        got[number] += chunk
                        if len(got[number]) < len(expected[number]):
                            continue
                        outcome[number] = "ok" if got[number] == expected[number] else f"wrong reply {got[number][:60]!r}"
                    else:
                        outcome[number] = f"ended after {len(got[number])} bytes"
                selector.unregister(sock)
                sock.close()
    finally:
        for key in list(selector.get_map().values()):
            outcome.setdefault(key.data, f"no whole reply within {timeout:g} s ({len(got[key.data])} bytes)")
            key.fileobj.close()
        selector.close()
    return outcome


def assert_all_ok(outcome: dict[int, str], what: str) -> None:
    failed = {number: how for number, how in outcome.items() if how != "ok"}
    if failed:
        summary = collections.Counter(failed.values()).most_common(5)
        raise AssertionError(f"{len(failed)} of {len(outcome)} {what} failed: {summary}; first: {sorted(failed)[:10]}")


def accepted(port: int, client: socket.socket) -> bool:
    """Whether some process has accept()ed the server end of client's connection to port: a connection
    still in the kernel's listen queue has no socket inode yet (0 in /proc/net/tcp)."""
    client_port = client.getsockname()[1]
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if (int(fields[1].rsplit(":", 1)[1], 16) == port and int(fields[2].rsplit(":", 1)[1], 16) == client_port
                        and fields[3] == "01"):
                    return fields[9] != "0"
    return False


def exchange_once(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


# --- 1. no limit can deadlock: inside one half ----------------------------------------


class CallingOut:
    """The usual enclave service: answers each request by asking an upstream outside through the
    enclave half's outbound port, and answers with what came back.

    It holds every request until gate_at of them are in the service at once (or DEADLINE passes),
    so that the inbound budgets are full when the calls out start."""

    def __init__(self, outbound_port: int, gate_at: int):
        self.outbound_port = outbound_port
        self.gate_at = gate_at
        self.lock = threading.Lock()
        self.arrived = 0
        self.gate = threading.Event()
        self.gate_filled = False  # gate_at requests were held at once
        self.errors: list[str] = []
        self.server = BigServer(self.handle)
        self.port = self.server.port

    def handle(self, sock: socket.socket) -> None:
        try:
            asked = recv_exactly(sock, REQUEST_SIZE)
            with self.lock:
                self.arrived += 1
                if self.arrived >= self.gate_at and not self.gate.is_set():
                    self.gate_filled = True
                    self.gate.set()
            self.gate.wait(DEADLINE)
            with socket.create_connection(("127.0.0.1", self.outbound_port), timeout=2 * DEADLINE) as out:
                out.sendall(asked)
                out.shutdown(socket.SHUT_WR)
                answer = recv_all(out)
            sock.sendall(b"answer to " + answer)
        except Exception as error:  # the client sees the failure; keep socketserver from printing each
            self.errors.append(repr(error))

    def stop(self) -> None:
        self.gate.set()
        self.server.stop()


def run_calls_out(proxy, threads: int | None, requests: int, timeout: float) -> None:
    upstream = EchoLoop()
    host_port, enclave_port = free_port(), free_port()
    service = CallingOut(enclave_port, gate_at=min(requests, threads or qproxy.DEFAULT_MAX_CONNECTIONS))
    args = ("-t", str(threads)) if threads else ()
    try:
        proxy.start_both(inbound(host_port, service.port) + outbound("127.0.0.1", upstream.port, enclave_port),
                         host_args=args, enclave_args=args)
        asked = [request(number) for number in range(requests)]
        started = time.monotonic()
        clients = open_clients(host_port, asked)
        outcome = await_replies(clients, [b"answer to " + a for a in asked], timeout)
        print(f"\n{requests} requests that call out, -t {threads or 'default'}: {time.monotonic() - started:.1f} s")
        assert_all_ok(outcome, "requests that call out")
        assert service.gate_filled, f"never {service.gate_at} requests in the service at once"
    finally:
        service.stop()
        upstream.stop()


@pytest.mark.parametrize("requests", [4, 8])
def test_requests_that_call_out_through_the_same_half_never_wait_on_themselves(proxy, requests):
    """-t 4 on both halves, 4 then 8 requests at once, each answered by a call out through the
    enclave half's own outbound entry: all are answered within the deadline."""
    run_calls_out(proxy, threads=4, requests=requests, timeout=DEADLINE)


def test_1024_requests_that_call_out_at_the_default_limit_all_complete(proxy):
    """The same at the default -t (1,024) with 1,024 requests in the service at once."""
    run_calls_out(proxy, threads=None, requests=qproxy.DEFAULT_MAX_CONNECTIONS, timeout=2 * DEADLINE)


# --- 1. no limit can deadlock: across the halves ----------------------------------------


def cross_config(host_port: int, service_port: int, enclave_port: int, upstream_port: int) -> str:
    return inbound(host_port, service_port) + outbound("127.0.0.1", upstream_port, enclave_port)


class BothWays:
    """The service in the enclave and the upstream outside, echoing each request, but only once
    `need` requests of each direction are in their services at once: both directions full."""

    def __init__(self, need: int):
        self.need = need
        self.lock = threading.Lock()
        self.arrived = collections.Counter()
        self.full = threading.Event()
        self.servers = {direction: ThreadedServer(self.handler(direction)) for direction in ("inbound", "outbound")}

    def handler(self, direction: str):
        def handle(sock: socket.socket) -> None:
            try:
                asked = recv_exactly(sock, REQUEST_SIZE)
                with self.lock:
                    self.arrived[direction] += 1
                    if all(self.arrived[d] >= self.need for d in self.servers):
                        self.full.set()
                self.full.wait(2 * DEADLINE)
                sock.sendall(asked)
            except Exception:  # the client sees the failure
                pass
        return handle

    def stop(self) -> None:
        self.full.set()
        for server in self.servers.values():
            server.stop()


def test_inbound_and_outbound_load_at_once_across_the_halves_all_finish(proxy):
    """-t 2 on each half; 6 inbound and 6 outbound requests at once, answered only once 2 of each
    direction are in their services together (both directions' budgets full in both halves):
    every request is answered within the deadline."""
    both = BothWays(need=2)
    host_port, enclave_port = free_port(), free_port()
    try:
        proxy.start_both(cross_config(host_port, both.servers["inbound"].port, enclave_port,
                                      both.servers["outbound"].port),
                         host_args=("-t", "2"), enclave_args=("-t", "2"))
        asked = [request(number, tag) for number in range(6) for tag in ("in", "out")]  # interleaved
        clients = []
        try:
            for payload in asked:
                clients += open_clients(host_port if payload.startswith(b"in") else enclave_port, [payload])
        except BaseException:
            for sock in clients:
                sock.close()
            raise
        assert_all_ok(await_replies(clients, asked, DEADLINE), "requests of both directions")
        assert both.arrived == {"inbound": 6, "outbound": 6}, both.arrived
    finally:
        both.stop()


@pytest.mark.parametrize("held", ["inbound", "outbound"])
def test_one_direction_full_of_idle_connections_does_not_starve_the_other(proxy, held):
    """-t 2 on each half; two idle connections hold one direction's budget in both halves:
    a connection the other way is still served at once."""
    service, upstream = ThreadedServer(echo), ThreadedServer(echo)
    host_port, enclave_port = free_port(), free_port()
    held_port, other_port = (host_port, enclave_port) if held == "inbound" else (enclave_port, host_port)
    idle = []
    try:
        proxy.start_both(cross_config(host_port, service.port, enclave_port, upstream.port),
                         host_args=("-t", "2"), enclave_args=("-t", "2"))
        for _ in range(2):
            idle.append(connect(held_port))
            exchange_once(idle[-1], b"held open")
        with socket.create_connection(("127.0.0.1", other_port), timeout=5.0) as sock:
            sock.settimeout(5.0)  # at once: nothing of this direction is in use
            exchange_once(sock, b"the other way")
        for sock in idle:  # and the held ones are still relayed
            exchange_once(sock, b"still here")
    finally:
        for sock in idle:
            sock.close()
        service.stop()
        upstream.stop()


# --- 1. queue_timeout: a connection waits for room, but not forever -----------------------


def one_route(direction: str, service_port: int) -> tuple[str, int, str]:
    """A config with one entry, the port its clients connect to, and the role of the half that listens there."""
    port = free_port()
    if direction == "inbound":
        return inbound(port, service_port), port, "host"
    return outbound("127.0.0.1", service_port, port), port, "enclave"


def assert_waits_then_is_reset(port: int, held: socket.socket, half) -> None:
    """With held relaying at the limit and queue_timeout = 1, a second connection to port gets no
    byte and a reset 1 to 5 s later, half logs why, and held still relays."""
    exchange_once(held, b"held")
    started = time.monotonic()
    with connect(port) as waiting:
        waiting.sendall(b"let me in")
        data, ending = read_to_end(waiting)
    took = time.monotonic() - started
    assert (data, ending) == (b"", "reset"), (data, ending)
    assert 0.9 <= took < 5.0, f"reset after {took:.2f} s with queue_timeout = 1"
    half.wait_log(r"WARN .*no room within")
    exchange_once(held, b"still held")


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_connection_waiting_longer_than_queue_timeout_is_reset(proxy, direction):
    """connections_per_listener = 1, queue_timeout = 1: a second connection waits, then is reset
    between 1 and 5 s after it came, with a WARN naming the wait."""
    service = ThreadedServer(echo)
    config, port, role = one_route(direction, service.port)
    held = None
    try:
        host, enclave = proxy.start_both(config + limits(connections_per_listener=1, queue_timeout=1))
        half = host if role == "host" else enclave
        held = connect(port)
        assert_waits_then_is_reset(port, held, half)
    finally:
        if held is not None:
            held.close()
        service.stop()


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_connection_that_gets_room_within_queue_timeout_is_relayed_with_what_it_sent(proxy, direction):
    service = ThreadedServer(echo)
    config, port, _ = one_route(direction, service.port)
    held = None
    try:
        proxy.start_both(config + limits(connections_per_listener=1, queue_timeout=10))
        held = connect(port)
        exchange_once(held, b"held")
        with connect(port) as waiting:
            waiting.sendall(b"sent while waiting")
            assert_no_reply_yet(waiting)
            held.close()
            assert recv_exactly(waiting, 18) == b"sent while waiting"
            exchange_once(waiting, b"and after")
    finally:
        if held is not None:
            held.close()
        service.stop()


def test_the_enclave_half_at_its_limit_over_vsock_makes_the_host_reset_its_client(proxy):
    """The enclave half's inbound budget (-t 1) full, queue_timeout = 1: the host half's TCP client of
    the waiting connection ends with a reset, within 1 to 5 s."""
    service = ThreadedServer(echo)
    host_port = free_port()
    held = None
    try:
        _, enclave = proxy.start_both(inbound(host_port, service.port) + limits(queue_timeout=1),
                                      enclave_args=("-t", "1"))
        held = connect(host_port)
        assert_waits_then_is_reset(host_port, held, enclave)
    finally:
        if held is not None:
            held.close()
        service.stop()


# --- 4. a stop serves every connection it accepted ----------------------------------------


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_stop_relays_a_connection_that_was_waiting_for_room(proxy, direction):
    """-t 1 on the half the clients reach: one connection relaying, a second accepted and waiting for
    room; SIGTERM; the first finishes and closes about a second later; the waiting one is relayed
    during the grace period, its echo whole, and the half exits 0."""
    service = ThreadedServer(echo)
    config, port, role = one_route(direction, service.port)
    payload = os.urandom(32 * 1024)
    first = waiting = None
    try:
        proxy.write_config(config)
        t_args = ("-t", "1")
        enclave = proxy.start("enclave", *(t_args if role == "enclave" else ()))
        host = proxy.start("host", *(t_args if role == "host" else ()))
        half = host if role == "host" else enclave
        first = connect(port)
        exchange_once(first, b"first")
        waiting = connect(port)
        waiting.sendall(payload)
        wait_for(lambda: accepted(port, waiting), f"the {role} half to accept the second connection")
        assert_no_reply_yet(waiting)  # accepted, but waiting for room

        signalled = time.monotonic()
        half.process.send_signal(signal.SIGTERM)
        half.wait_log("SIGTERM: stopping")
        exchange_once(first, b"last words")  # still relayed during the stop
        time.sleep(1.0)  # the first client's own pace: it finishes a second later
        first.shutdown(socket.SHUT_WR)
        assert read_to_end(first) == (b"", "eof")
        first.close()

        assert recv_exactly(waiting, len(payload)) == payload
        waiting.shutdown(socket.SHUT_WR)
        assert read_to_end(waiting) == (b"", "eof")
        assert time.monotonic() - signalled < qproxy.GRACE_PERIOD, "relayed only after the grace period"
        assert half.stop() == 0
        assert "cutting" not in half.log()
    finally:
        for sock in (first, waiting):
            if sock is not None:
                sock.close()
        service.stop()


# --- 7. out of descriptors, clients wait ---------------------------------------------------


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
@pytest.mark.parametrize("role", ["host", "enclave"])
def test_out_of_descriptors_every_client_waits_and_is_served(proxy, role):
    """A half with 64 descriptors; 200 connections at once, each sending a little and closing once
    its echo is back: every one is served, none reset."""
    service = EchoLoop()
    host_port = free_port()
    wrapper = ["prlimit", "--nofile=64:64", "--"]
    try:
        proxy.write_config(inbound(host_port, service.port))
        enclave = proxy.start("enclave", wrapper=wrapper if role == "enclave" else [])
        host = proxy.start("host", wrapper=wrapper if role == "host" else [])
        host.wait_log("control: enclave half connected")
        asked = [request(number, "fd") for number in range(200)]
        started = time.monotonic()
        clients = open_clients(host_port, asked)
        outcome = await_replies(clients, asked, 3 * DEADLINE)
        print(f"\n200 connections through a {role} half with 64 descriptors: {time.monotonic() - started:.1f} s")
        assert_all_ok(outcome, "connections")
        for half in (host, enclave):
            assert half.process.poll() is None, f"the {half.role} half exited"
    finally:
        service.stop()


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
def test_two_halves_at_their_open_files_limit_never_hold_each_others_connections(proxy):
    """Both halves with 40 descriptors, a few connections each.  The host half is stopped while
    inbound clients queue in its listen queue and apps' outbound connections fill the enclave half,
    whose dials wait in the host half's vsock listen queue.  Resumed, the host half takes the
    inbound ones first: if they could take every descriptor, their dials would wait in the
    enclave half's queue behind its outbound connections, which wait in the host half's, for
    ever (no timeout covers a connection in a listen queue).  Each direction has half of them."""
    def answer(sock: socket.socket) -> None:
        sock.sendall(b"echo:" + sock.recv(100))

    service = ThreadedServer(answer)
    host_port, app_port = free_port(), free_port()
    wrapper = ["prlimit", "--nofile=40:40", "--"]
    proxy.write_config(inbound(host_port, service.port) + outbound("127.0.0.1", service.port, app_port))
    enclave = proxy.start("enclave", wrapper=wrapper)
    host = proxy.start("host", wrapper=wrapper)
    clients = []
    try:
        host.process.send_signal(signal.SIGSTOP)
        clients += [connect(host_port) for _ in range(4)]  # wait in the stopped host half's listen queue
        clients += [connect(app_port) for _ in range(4)]
        wait_for(lambda: enclave.log().count("dialing for") >= 2, "the enclave half to dial for the apps")
        host.process.send_signal(signal.SIGCONT)
        for sock in clients:
            sock.sendall(b"hello")
        for sock in clients:  # each closed once answered, making room for the next
            assert recv_all(sock) == b"echo:hello"
            sock.close()
    finally:
        host.process.send_signal(signal.SIGCONT)
        for sock in clients:
            sock.close()
        service.stop()


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
def test_an_enclave_half_that_listens_one_way_gives_it_every_descriptor(proxy):
    """An enclave half with inbound entries only and 64 descriptors holds as many inbound
    connections at once as they allow: no share is kept for a direction it never relays (it
    never reloads).  Its log says how many, and that many are served at once."""
    service = ThreadedServer(echo)
    port = free_port()
    proxy.write_config(inbound(port, service.port))
    enclave = proxy.start("enclave", wrapper=["prlimit", "--nofile=64:64", "--"])
    proxy.start("host")
    held = int(enclave.wait_log(r"qproxy::enclave the open-files limit \(64\) lets this half hold (\d+)"
                                r" connections at once \(inbound, the only direction")[1])
    clients = []
    try:
        for _ in range(held):  # each echoed while every one before it stays open
            clients.append(connect(port))
            clients[-1].sendall(b"x")
            assert recv_exactly(clients[-1], 1) == b"x"
        waiting = connect(port)  # one more waits for room
        clients.append(waiting)
        waiting.sendall(b"y")
        assert_no_reply_yet(waiting)
        clients.pop(0).close()
        assert recv_exactly(waiting, 1) == b"y"
    finally:
        for sock in clients:
            sock.close()
        service.stop()


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
def test_a_host_half_reloaded_into_a_second_direction_has_its_share_for_it(proxy):
    """A host half with 40 descriptors and inbound entries only keeps a share for outbound from
    the start: a reload may add an outbound entry while inbound connections hold all of theirs,
    and those may be requests waiting on calls out through it."""
    service = ThreadedServer(echo)
    port, app_port = free_port(), free_port()
    both = inbound(port, service.port) + outbound("127.0.0.1", service.port, app_port)
    proxy.write_config(both)
    proxy.start("enclave")
    proxy.write_config(inbound(port, service.port))
    host = proxy.start("host", wrapper=["prlimit", "--nofile=40:40", "--"])
    share = int(host.wait_log(r"qproxy::host the open-files limit \(40\) lets this half hold (\d+) connections"
                              r" at once in each direction")[1])
    clients = []
    try:
        for _ in range(share):
            clients.append(connect(port))
            clients[-1].sendall(b"x")
            assert recv_exactly(clients[-1], 1) == b"x"
        proxy.write_config(both)
        host.process.send_signal(signal.SIGHUP)
        host.wait_log(r"reload: .*1 added")
        with connect(app_port) as app:  # through the host half's new outbound listener
            app.sendall(b"out")
            assert recv_exactly(app, 3) == b"out"
    finally:
        for sock in clients:
            sock.close()
        service.stop()

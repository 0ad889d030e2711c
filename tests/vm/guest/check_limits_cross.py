#!/usr/bin/env python3
"""-t bounds each direction of a half on its own; a connection waiting for room is reset after queue_timeout.

in-half call-out, -t 1 on both halves: a client of host port 5050 asks the
service in the enclave, which answers only after a call of its own out
through the same enclave half (127.0.0.1:8443 to the upstream outside).  With
one budget for both directions that call would wait for the slot its own
request holds.

cross, -t 2 on both halves: two apps in the enclave hold outbound connections
to the upstream, which answers them only once two clients of the host have
reached the service in the enclave (so both directions are full at once) and
the service's two calls out wait in the enclave half for the apps' room (its
WARN names the outbound limit).  Every answer is checked, all within
CROSS_DEADLINE.

queue timeout, `[limits] queue_timeout = 2` and `connections_per_listener = 1`
on the enclave half only: one inbound connection holds the service; a second
one waits in the enclave half for room and its TCP client, on the host side,
must be reset after about 2 s (accepted: RESET_EARLIEST to RESET_LATEST), with
no byte, and the enclave half logs "no room within".  The first is answered
afterwards, and a third connection then gets through.
"""

import queue
import socket
import threading
import time

from vmcheck import Box, Enclave, Failed, expect, main, read_to_end, recv_all, toml_config

CROSS_DEADLINE = 60.0  # seconds for the whole cross exchange under emulation
IN_HALF_DEADLINE = 30.0  # seconds for the one in-half call-out
CALL_TIMEOUT = 40.0  # one service's call out, waiting for room included
RESET_EARLIEST, RESET_LATEST = 1.5, 10.0
CONFIG = toml_config(inbound=[(5050, 5050, 9995)], outbound=[("127.0.0.1", 7777, 8443)])


def read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1024)
        if not chunk:
            raise AssertionError(f"the stream ended after {data!r}, before a whole line")
        data += chunk
    return data


class World:
    """The service in the enclave and the upstream outside, and what they have seen."""

    def __init__(self, box: Box, enclave: Enclave):
        self.box, self.enclave = box, enclave
        self.inbound_arrived = queue.Queue()  # each request line the service got
        self.apps_arrived = queue.Queue()  # each "app" line the upstream got
        self.release_apps = threading.Event()  # the upstream answers the apps once this is set
        self.release_held = threading.Event()  # the service answers "hold" requests once this is set
        self.held = queue.Queue()
        self.calls = queue.Queue()  # each request whose call out has connected to the enclave half

    def service(self, conn):
        """In the enclave: "call X" answers after calling the upstream out through the enclave half."""
        request = read_line(conn)
        self.inbound_arrived.put(request)
        if request.startswith(b"hold"):
            self.held.put(request)
            self.release_held.wait(60)
            conn.sendall(b"held " + request)
            return
        out = self.enclave.socket()
        with out:
            out.settimeout(CALL_TIMEOUT)
            out.connect(("127.0.0.1", 8443))
            self.calls.put(request)
            out.sendall(b"call " + request)
            out.shutdown(socket.SHUT_WR)
            answer = recv_all(out, CALL_TIMEOUT)
        conn.sendall(b"via " + answer)

    def upstream(self, conn):
        """Outside: answers a line upper-cased; an "app" line only once release_apps is set."""
        conn.settimeout(CALL_TIMEOUT)
        request = read_line(conn)
        if request.startswith(b"app"):
            self.apps_arrived.put(request)
            self.release_apps.wait(CALL_TIMEOUT)
        conn.sendall(request.upper())


def start_pair(box: Box, enclave: Enclave, threads: int | None = None, enclave_config=None):
    """Both halves, with -t threads when given; the enclave half with its own config when given."""
    config = box.config(CONFIG)
    extra = ["-t", str(threads)] if threads else []
    host = box.host_half(config, extra=extra)
    host.wait_log(r"host half ready \(.*AF_VSOCK\)")
    guest = box.enclave_half(enclave_config or config, enclave, extra=extra)
    guest.wait_log(r"enclave half ready \(.*AF_VSOCK\)")
    host.wait_log(r"control: enclave half connected")
    return host, guest


def stop_pair(host, guest) -> None:
    for half in (guest, host):
        code = half.stop()
        expect(code == 0, f"the {half.name} exited with {code} on SIGTERM")


def ask(box: Box, port: int, request: bytes, side, results: dict, key: str) -> None:
    """One request in a thread of its own: results[key] is the answer or the error."""
    def run():
        try:
            with box.connect(port, side, CROSS_DEADLINE) as client:
                client.sendall(request)
                client.shutdown(socket.SHUT_WR)
                results[key] = recv_all(client, CROSS_DEADLINE)
        except Exception as error:
            results[key] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def in_half_call_out(box: Box, enclave: Enclave, world: World) -> None:
    host, guest = start_pair(box, enclave, threads=1)
    results = {}
    started = time.monotonic()
    ask(box, 5050, b"in-half\n", None, results, "answer").join(IN_HALF_DEADLINE)
    answer = results.get("answer")
    expect(answer == b"via CALL IN-HALF\n",
           f"-t 1: an inbound request whose service calls out through the same enclave half got {answer!r}"
           f" after {time.monotonic() - started:.1f} s")
    box.note(f"-t 1: the in-half call-out answered in {time.monotonic() - started:.1f} s")
    stop_pair(host, guest)


def cross(box: Box, enclave: Enclave, world: World) -> None:
    host, guest = start_pair(box, enclave, threads=2)
    results, threads = {}, []
    started = time.monotonic()
    for index in range(2):  # the apps take both outbound slots of each half, and keep them
        threads.append(ask(box, 8443, f"app {index}\n".encode(), enclave, results, f"app {index}"))
    for _ in range(2):
        try:
            world.apps_arrived.get(timeout=30)
        except queue.Empty:
            raise Failed(f"-t 2: two apps' outbound connections did not reach the upstream: {results}") from None
    for index in range(2):  # both inbound slots of each half, while the outbound ones are taken
        threads.append(ask(box, 5050, f"in {index}\n".encode(), None, results, f"in {index}"))
    arrived = []
    try:
        for _ in range(2):
            arrived.append(world.inbound_arrived.get(timeout=30))
    except queue.Empty:
        raise Failed(f"-t 2: with two outbound connections open on each half, only {len(arrived)} of two"
                             " inbound requests reached the service within 30 s") from None
    try:
        for _ in range(2):
            world.calls.get(timeout=30)
    except queue.Empty:
        raise Failed("-t 2: the services' calls out did not connect to the enclave half within 30 s") from None
    try:  # the services' calls out arrive at the enclave half's full outbound direction, and wait there
        guest.wait_log(r"WARN +qproxy::enclave [^\n]*outbound", timeout=30)
    except Failed as error:
        raise Failed(f"-t 2: the services' calls out never met the outbound limit, named in a WARN: {error}") from None
    world.release_apps.set()  # the apps end, and the calls out get their room
    for thread in threads:
        thread.join(max(started + CROSS_DEADLINE - time.monotonic(), 0.1))
    expected = {f"app {i}": f"APP {i}\n".encode() for i in range(2)}
    expected.update({f"in {i}": f"via CALL IN {i}\n".encode() for i in range(2)})
    wrong = {key: results.get(key, "no answer yet") for key in expected if results.get(key) != expected[key]}
    expect(not wrong, f"-t 2, both directions full at once: after {time.monotonic() - started:.1f} s, wrong or"
                      f" missing answers: {wrong}")
    box.note(f"-t 2: two apps and two inbound requests calling out, answered in {time.monotonic() - started:.1f} s")
    stop_pair(host, guest)


def queue_timeout(box: Box, enclave: Enclave, world: World) -> None:
    limited = box.config(CONFIG + "\n[limits]\nqueue_timeout = 2\nconnections_per_listener = 1\n", "enclave.toml")
    host, guest = start_pair(box, enclave, enclave_config=limited)
    first = box.connect(5050, None)
    first.sendall(b"hold first\n")
    try:
        world.held.get(timeout=20)
    except queue.Empty:
        raise Failed("the first inbound connection did not reach the service") from None
    second = box.connect(5050, None)
    started = time.monotonic()
    second.sendall(b"hold second\n")
    data, how = read_to_end(second, 30)
    waited = time.monotonic() - started
    expect((data, how) == (b"", "reset"),
           f"a second inbound connection, waiting for room with queue_timeout = 2, saw {len(data)} bytes and"
           f" {how} after {waited:.1f} s, not a reset")
    expect(RESET_EARLIEST <= waited <= RESET_LATEST,
           f"the waiting connection was reset after {waited:.1f} s, not about 2 s (queue_timeout = 2)")
    guest.wait_log(r"no room within")
    expect(world.held.empty(), "the second connection reached the service, past connections_per_listener = 1")
    host.wait_log(r"qproxy::host conn \d+ (?:refused|reset)")
    box.note(f"queue_timeout = 2: the waiting client was reset after {waited:.1f} s")
    world.release_held.set()
    first.shutdown(socket.SHUT_WR)
    answer = recv_all(first)
    expect(answer == b"held hold first\n", f"the connection that held the room got {answer!r}")
    first.close()
    answer = box.exchange(5050, b"hold third\n")
    expect(answer == b"held hold third\n", f"a connection after the room freed got {answer!r}")
    stop_pair(host, guest)


def check(box: Box) -> None:
    enclave = Enclave(box)
    world = World(box, enclave)
    box.server(8443, world.upstream)
    box.server(5050, world.service, enclave)
    in_half_call_out(box, enclave, world)
    cross(box, enclave, world)
    queue_timeout(box, enclave, world)


if __name__ == "__main__":
    main("limits_cross", check)

#!/usr/bin/env python3
"""The host half's control port under hostile input over real AF_VSOCK: an oversized message, garbage, a flood.

Every connection in the guest comes from CID 1, the CID the host half is told
is the enclave's, so each one here passes the peer check and meets the control
protocol itself, while the real enclave half holds its control connection.
Whatever arrives, the host half must close what it cannot use well inside its
hello timeout (so the close is its judgement, not the timeout's), keep the
real enclave half, stay up, and keep relaying: an inbound exchange goes
through both halves after each step, and during the flood.

The bad-hello warning is logged at most once per 10 s, so the log shows the
first refusal, the oversized message, whose reason names the limit; the
garbage that follows is shown refused by its prompt close.  The flood is 20
silent connections: CONTROL_MAX_UNGREETED of them may wait for a hello, the
rest are closed at once, and the host half holds no more than that many.
"""

import itertools
import select
import socket
import sys
import time

from vmcheck import QPROXY, Box, Enclave, Failed, expect, main, read_to_end, recv_all, toml_config

sys.path.insert(0, str(QPROXY.parent))
import qproxy  # noqa: E402  (its limits: CONTROL_MAX_MESSAGE, CONTROL_MAX_UNGREETED, CONTROL_HELLO_TIMEOUT)

CONTROL_PORT = 6666
PROMPT = qproxy.CONTROL_HELLO_TIMEOUT / 2  # a close later than this may be the hello timeout's
FLOOD = 20
EXCHANGES = itertools.count(1)
NESTED = b"[" * 5000 + b"\n"  # valid UTF-8, but deeper than json's recursion limit
GARBAGE = (b"\x00\xff\xfe garbage\n", b"[1, 2, 3]\n", b'{"no": "type"}\n', b'{"type": "hello", "role": "host"}\n',
           NESTED)


def echo(conn):
    conn.sendall(recv_all(conn))


def closed_promptly(sock: socket.socket, what: str) -> None:
    """The host half ends the connection (EOF or reset) within PROMPT, having sent nothing."""
    try:
        data, _ = read_to_end(sock, PROMPT)
    except Failed:
        raise Failed(f"{what}: the host half kept the connection open for {PROMPT:.0f} s") from None
    expect(data == b"", f"{what}: the host half answered {data[:60]!r}")
    sock.close()


def data_path_works(box: Box, host, when: str) -> None:
    """An inbound exchange through both halves, its sockets closed in the host half when this returns."""
    request = f"inbound {when}".encode()
    answer = box.exchange(5050, request)
    expect(answer == request, f"inbound {when}: got {answer!r}")
    host.wait_log(r"qproxy::host conn \d+ closed", count=next(EXCHANGES))


def flood(box: Box, host) -> list[socket.socket]:
    """FLOOD silent control connections; the ones still waiting for a hello, once the rest are closed."""
    limit = qproxy.CONTROL_MAX_UNGREETED
    baseline = len(host.fds())
    started = time.monotonic()
    silent = [box.vsock(CONTROL_PORT) for _ in range(FLOOD)]
    closed: list[socket.socket] = []
    while len(closed) < FLOOD - limit:
        left = started + PROMPT - time.monotonic()
        if left <= 0:
            raise Failed(f"flood: {len(closed)} of {FLOOD} silent connections closed within {PROMPT:.0f} s; "
                         f"expected all but {limit}")
        readable, _, _ = select.select([s for s in silent if s not in closed], [], [], min(left, 0.1))
        for sock in readable:  # readable: the host half ended it (it never speaks first)
            closed_promptly(sock, "flood")
            closed.append(sock)
    waiting = [s for s in silent if s not in closed]
    readable, _, _ = select.select(waiting, [], [], 0)
    expect(not readable and len(waiting) == limit,
           f"flood: {len(waiting) - len(readable)} connections wait for a hello, expected {limit}")
    held = len(host.fds()) - baseline
    expect(held <= limit, f"flood: the host half holds {held} more descriptors than before it, more than the "
                          f"{limit} connections that may wait")
    host.wait_log(r"WARN .*control: too many connections without a hello; closing vsock 1:\d+")
    box.note(f"flood: {len(closed)} of {FLOOD} closed at once (in {time.monotonic() - started:.1f} s), "
             f"{len(waiting)} left waiting for a hello")
    return waiting


def check(box: Box) -> None:
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)]))
    enclave = Enclave(box)
    box.server(5050, echo, enclave)
    host, guest = box.start_pair(config, enclave)
    data_path_works(box, host, "before")
    baseline = len(host.fds())

    oversized = box.vsock(CONTROL_PORT)
    try:
        oversized.sendall(b"a" * (qproxy.CONTROL_MAX_MESSAGE + 10_000))  # no newline: one endless message
    except (BrokenPipeError, ConnectionResetError):
        pass  # the host half may close before it has read it all
    closed_promptly(oversized, "a message over the limit")
    host.wait_log(rf"WARN .*control: no valid hello from vsock 1:\d+: a message over {qproxy.CONTROL_MAX_MESSAGE} bytes")
    data_path_works(box, host, "after an oversized message")

    for junk in GARBAGE:
        sock = box.vsock(CONTROL_PORT)
        sock.sendall(junk)
        closed_promptly(sock, f"garbage {junk[:40]!r}")
    data_path_works(box, host, "after garbage")
    expect("unexpected error" not in host.text() and "Traceback" not in host.text(),
           "garbage made the host half log an unexpected error (a traceback), not a bad hello")

    waiting = flood(box, host)
    data_path_works(box, host, "during the flood")
    for sock in waiting:
        sock.close()
    host.wait_fds(baseline)
    data_path_works(box, host, "after the flood")

    expect(host.alive() and guest.alive(), "a half exited")
    log = host.text()
    expect(log.count("control: enclave half connected") == 1 and "disconnected" not in log and "replaces" not in log,
           "the host half lost or replaced the real enclave half's control connection")
    expect("went away" not in guest.text(), "the enclave half lost its control connection")


if __name__ == "__main__":
    main("control_hostile", check)

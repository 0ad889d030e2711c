#!/usr/bin/env python3
"""Far ends that reset (close with SO_LINGER 0) over real vsock: the other end sees the end, the halves carry on.

Outbound, the upstream is a TCP server outside; inbound, the service is in
the enclave.  Each answers b"reset" with a first part of its stream, waits for
the client's b"ack" (so the stream is under way end to end), sends some more
and resets.  The client must get a prefix of the stream and then its end, EOF
or reset (which one is noted: vsock cannot carry a reset, so the half on the
other side of it sees a close).  Each also answers b"refuse" with a reset
before any byte, which qproxy promises to pass on as a reset.  Afterwards both
halves serve the next connection on each path, and both halves' descriptor
counts come back to where they were before the resets.
"""

import os
import re
import socket
import struct

from vmcheck import Box, expect, main, read_to_end, round_trip, start_both_paths

FIRST = os.urandom(64 * 1024)
MORE = os.urandom(192 * 1024)


def reset_close(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def service(conn):
    request = conn.recv(100)
    if request == b"refuse":
        reset_close(conn)
    elif request == b"reset":
        conn.sendall(FIRST)
        ack = conn.recv(3)
        if ack != b"ack":
            raise AssertionError(f"got {ack!r} for an ack")
        conn.sendall(MORE)
        reset_close(conn)
    else:
        conn.sendall(request.upper())


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        expect(chunk, f"the stream ended after {len(data)} of the first {size} bytes")
        data += chunk
    return bytes(data)


def reset_mid_stream(box, port, side, what) -> None:
    client = box.connect(port, side)
    client.sendall(b"reset")
    expect(recv_exactly(client, len(FIRST)) == FIRST, f"{what}: the first part came garbled")
    client.sendall(b"ack")
    rest, how = read_to_end(client)
    client.close()
    expect(MORE.startswith(rest), f"{what}: after the first part came {len(rest)} bytes that the far end never sent")
    box.note(f"{what}: the client read {len(FIRST)} + {len(rest)} of {len(FIRST) + len(MORE)} bytes, then {how}")


def refused(box, port, side, what) -> None:
    client = box.connect(port, side)
    client.sendall(b"refuse")
    data, how = read_to_end(client)
    client.close()
    expect((data, how) == (b"", "reset"), f"{what}: the client saw {len(data)} bytes and {how}, not a reset")


def check(box: Box) -> None:
    _, enclave, host, guest = start_both_paths(box, service)
    round_trip(box, enclave, "before")
    guest.wait_log(r"control: connected to the host half")
    for half in (host, guest):
        half.wait_log(rf"qproxy::{half.role} conn \d+ closed", count=2)  # the round trip's sockets are closed
    baseline = {half: len(half.fds()) for half in (host, guest)}

    reset_mid_stream(box, 8443, enclave, "outbound, the upstream resets")
    reset_mid_stream(box, 5050, None, "inbound, the service resets")
    refused(box, 8443, enclave, "outbound, the upstream resets before answering")
    refused(box, 5050, None, "inbound, the service resets before answering")
    round_trip(box, enclave, "after the resets")
    expect(host.alive() and guest.alive(), "a half exited")
    for half in (host, guest):
        half.wait_fds(baseline[half])
    for half in (host, guest):
        ends = re.findall(rf"qproxy::{half.role} conn (\d+ (?:reset|refused by [^(]*?) \([^)]*\)):", half.text())
        box.note(f"{half.name} logged: conn {'; conn '.join(ends)}")


if __name__ == "__main__":
    main("upstream_reset", check)

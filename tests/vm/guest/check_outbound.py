#!/usr/bin/env python3
"""Outbound: an app in the enclave connects to its local port and reaches a server outside.

The outside world is a TCP server in the guest's root namespace, reached by
name ("localhost", resolved by the host half for each connection); the app is
a socket inside the enclave's namespace, where the enclave half listens on
127.0.0.1 at the same port number.
"""

from vmcheck import Box, Enclave, expect, main, recv_all, toml_config

OUTSIDE_PORT = 8443


def outside(conn):
    request = conn.recv(1024)
    peer = conn.getpeername()[0]
    conn.sendall(b"Hello from outside! you said " + request + f" from {peer}".encode())


def check(box: Box) -> None:
    config = box.config(toml_config(outbound=[("localhost", 7777, OUTSIDE_PORT)]))
    box.server(OUTSIDE_PORT, outside)  # outside the enclave
    enclave = Enclave(box)
    host, guest = box.start_pair(config, enclave)

    for attempt in range(3):
        app = box.connect(OUTSIDE_PORT, enclave)
        app.sendall(b"ping %d" % attempt)
        answer = recv_all(app)
        expected = b"Hello from outside! you said ping %d from 127.0.0.1" % attempt
        expect(answer == expected, f"the app got {answer!r}, expected {expected!r}")
        app.close()

    guest.wait_log(rf"conn 1 opened: tcp 127\.0\.0\.1:\d+ -> tcp 127\.0\.0\.1:{OUTSIDE_PORT} -> vsock 1:7777")
    host.wait_log(rf"conn 1 opened: vsock 1:\d+ -> vsock :7777 -> tcp localhost:{OUTSIDE_PORT}")
    host.wait_log(r"conn \d+ closed", count=3)


if __name__ == "__main__":
    main("outbound", check)

#!/usr/bin/env python3
"""Egress: an app in the enclave reaches a destination by name through the proxy port, with HTTP
CONNECT and with SOCKS5, over real AF_VSOCK; a destination the rules do not allow is refused.

The destination is a TCP server in the guest's root namespace, reached as "localhost" (resolved by
the host half); the app is a socket in the enclave's namespace, where the enclave half listens on
127.0.0.1:PROXY_PORT.  localhost is loopback, a special-purpose range: the rules allow it by name
and by an address rule within 127.0.0.0/8, and the port alone.
"""

import socket
import struct

from vmcheck import Box, Enclave, expect, main, recv_all

OUTSIDE_PORT = 8443
PROXY_PORT = 3128
CONFIG = f"""
[egress]
proxy_port = {PROXY_PORT}
vsock_port = 8000
allow = ["localhost:{OUTSIDE_PORT}", "127.0.0.0/8:{OUTSIDE_PORT}"]
"""


def outside(conn):
    request = conn.recv(1024)
    conn.sendall(b"outside got " + request)


def read_head(sock) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        expect(byte, f"the proxy ended its answer after {head!r}")
        head += byte
    return head


def check(box: Box) -> None:
    config = box.config(CONFIG)
    box.server(OUTSIDE_PORT, outside)  # outside the enclave
    enclave = Enclave(box)
    host, guest = box.start_pair(config, enclave)

    app = box.connect(PROXY_PORT, enclave)
    app.sendall(f"CONNECT localhost:{OUTSIDE_PORT} HTTP/1.1\r\nHost: localhost:{OUTSIDE_PORT}\r\n\r\n".encode())
    head = read_head(app)
    expect(head.startswith(b"HTTP/1.1 200 "), f"CONNECT got {head!r}")
    expect_through(app, b"through connect")

    app = box.connect(PROXY_PORT, enclave)
    app.sendall(b"\x05\x01\x00")
    expect(recv_all_of(app, 2) == b"\x05\x00", "SOCKS5: no method accepted")
    name = b"localhost"
    app.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", OUTSIDE_PORT))
    reply = recv_all_of(app, 10)
    expect(reply[:2] == b"\x05\x00", f"SOCKS5 CONNECT got {reply!r}")
    expect_through(app, b"through socks")

    app = box.connect(PROXY_PORT, enclave)
    app.sendall(b"CONNECT localhost:22 HTTP/1.1\r\n\r\n")
    head = read_head(app)
    expect(head.startswith(b"HTTP/1.1 403 "), f"a port the rules do not allow got {head!r}")

    host.wait_log(rf"localhost:{OUTSIDE_PORT} allowed by the host half's rule")
    guest.wait_log(r"localhost:22 is denied: no allow rule of the enclave half's matches")


def expect_through(app, payload: bytes) -> None:
    """payload reaches the server outside through the open tunnel, and its answer comes back."""
    app.sendall(payload)
    app.shutdown(socket.SHUT_WR)
    answer = recv_all(app)
    expect(answer == b"outside got " + payload, f"the tunnel gave {answer!r}")


def recv_all_of(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        expect(chunk, f"the proxy ended after {data!r}")
        data += chunk
    return data


if __name__ == "__main__":
    main("egress", check)

#!/usr/bin/env python3
"""Half-close in both directions, on the inbound and the outbound path.

client-first: the client sends, shuts down its sending side, and still gets
the reply, which the server sends only after it has seen that EOF.
server-first: the server sends and shuts down its sending side at once; the
client reads to EOF, then still sends, and the server gets every byte.
"""

import os
import queue
import socket

from vmcheck import Box, Enclave, expect, main, recv_all, sha, toml_config

SIZE = 256 * 1024
CLIENT_FIRST, SERVER_FIRST = 5050, 5051  # inbound host and enclave ports, one service each
OUT_CLIENT_FIRST, OUT_SERVER_FIRST = 8443, 8444  # outbound ports, one outside server each


class Services:
    def __init__(self):
        self.server_sent = queue.Queue()  # sha of what a server-first service sent
        self.server_got = queue.Queue()  # sha of what it then received

    def client_first(self, conn):
        data = recv_all(conn)
        conn.sendall(sha(data).encode())

    def server_first(self, conn):
        payload = os.urandom(SIZE)
        self.server_sent.put(sha(payload))
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        self.server_got.put(sha(recv_all(conn)))


def client_first(box, port, enclave, path):
    client = box.connect(port, enclave)
    data = os.urandom(SIZE)
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    answer = recv_all(client)
    expect(answer == sha(data).encode(),
           f"{path}, client-first: after the client's EOF the reply was {answer[:80]!r}, not the sha256 of its data")
    client.close()


def server_first(box, port, enclave, path, services):
    client = box.connect(port, enclave)
    got = recv_all(client)  # the server's data, then its EOF, while our side stays open
    expect(sha(got) == services.server_sent.get(timeout=5),
           f"{path}, server-first: the client got {len(got)} bytes that do not match what the server sent")
    data = os.urandom(SIZE)
    client.sendall(data)  # the other direction still flows
    client.shutdown(socket.SHUT_WR)
    try:
        received = services.server_got.get(timeout=20)
    except queue.Empty:
        raise AssertionError(f"{path}, server-first: the server never saw the client's data end") from None
    expect(received == sha(data), f"{path}, server-first: the server got other bytes than the client sent")
    client.close()


def check(box: Box) -> None:
    config = box.config(toml_config(
        inbound=[(CLIENT_FIRST, CLIENT_FIRST, 9995), (SERVER_FIRST, SERVER_FIRST, 9996)],
        outbound=[("127.0.0.1", 7777, OUT_CLIENT_FIRST), ("127.0.0.1", 7778, OUT_SERVER_FIRST)],
    ))
    inside, outside = Services(), Services()
    box.server(OUT_CLIENT_FIRST, outside.client_first)
    box.server(OUT_SERVER_FIRST, outside.server_first)
    enclave = Enclave(box)
    host, guest = box.start_pair(config, enclave)
    box.server(CLIENT_FIRST, inside.client_first, enclave)
    box.server(SERVER_FIRST, inside.server_first, enclave)

    client_first(box, CLIENT_FIRST, None, "inbound")
    server_first(box, SERVER_FIRST, None, "inbound", inside)
    client_first(box, OUT_CLIENT_FIRST, enclave, "outbound")
    server_first(box, OUT_SERVER_FIRST, enclave, "outbound", outside)
    host.wait_log(r"conn \d+ closed", count=4)
    guest.wait_log(r"conn \d+ closed", count=4)


if __name__ == "__main__":
    main("half_close", check)

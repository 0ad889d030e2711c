#!/usr/bin/env python3
"""PROXY protocol: the host half writes the client's addresses ahead of its bytes, v1 or v2, as HAProxy's spec says.

Five inbound entries, each to its own service in the enclave, which reads to
EOF and answers with how many bytes it got.  Clients in the guest's root namespace bind
to SOURCE (an address of lo that is not the one they dial), so the service
must get exactly the header built here from the client's own socket, then the
payload, byte for byte: proxy_protocol v1 and v2; accept_proxy_protocol with
a load balancer's v1 header (written on as v2), with a v2 LOCAL header (the
real connection's addresses), and with none (the client is reset, nothing
reaches the service); no proxy_protocol (the payload alone); and v1 on a
dual-stack listener ("::"), whose IPv4 client is written as TCP4, not as an
IPv4-mapped address, and whose IPv6 client as TCP6.
"""

import os
import socket
import struct

from vmcheck import DEADLINE, Box, Enclave, exchange, expect, main, read_to_end, recv_all

SOURCE = "127.0.0.5"
PAYLOAD = b"GET / HTTP/1.1\r\nHost: service\r\n\r\n" + os.urandom(4096)
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
ENTRIES = {  # host port (the service's is 1000 more): the entry's own keys
    5051: 'proxy_protocol = "v1"',
    5052: 'proxy_protocol = "v2"',
    5053: 'proxy_protocol = "v2"\naccept_proxy_protocol = true',
    5054: "",
    5055: 'proxy_protocol = "v1"\nbind_address = "::"',
}
CONFIG = "\n".join(f"[[inbound_connections]]\nhost_port = {port}\nenclave_port = {port + 1000}\n"
                   f"vsock_port = {port + 4900}\n{keys}\n" for port, keys in ENTRIES.items())


def v1(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


def v2(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    return (SIGNATURE + b"\x21\x11\x00\x0c" + socket.inet_aton(source) + socket.inet_aton(destination)
            + struct.pack(">HH", source_port, destination_port))


def recorder(got: list, port: int):
    def serve(conn):
        got.append(recv_all(conn))
        conn.sendall(b"service %d got %d bytes" % (port, len(got[-1])))
    return serve


def check(box: Box) -> None:
    got = {port: [] for port in ENTRIES}
    enclave = Enclave(box)
    for port in ENTRIES:
        box.server(port + 1000, recorder(got[port], port + 1000), enclave)
    box.start_pair(box.config(CONFIG), enclave)

    def client(port: int, source: str = SOURCE, to: str = "127.0.0.1") -> tuple[socket.socket, int]:
        sock = box.keep(socket.socket(socket.AF_INET6 if ":" in to else socket.AF_INET))
        sock.bind((source, 0))
        sock.settimeout(DEADLINE)
        sock.connect((to, port))
        return sock, sock.getsockname()[1]

    def relayed(port: int, header, sent: bytes = b"", source: str = SOURCE, to: str = "127.0.0.1") -> None:
        """A client of port sends sent + PAYLOAD: the service must get header(client's port) + PAYLOAD."""
        sock, source_port = client(port, source, to)
        answer = exchange(sock, sent + PAYLOAD)
        wanted = header(source_port) + PAYLOAD
        seen = got[port][-1] if got[port] else None
        expect(seen == wanted, f"port {port}: the service got {seen and seen[:80]!r}..., expected {wanted[:80]!r}...")
        reply = b"service %d got %d bytes" % (port + 1000, len(wanted))
        expect(answer == reply, f"port {port}: the client got {answer!r}, expected {reply!r}")

    relayed(5051, lambda sport: v1(SOURCE, "127.0.0.1", sport, 5051))
    relayed(5052, lambda sport: v2(SOURCE, "127.0.0.1", sport, 5052))
    relayed(5053, lambda sport: v2("203.0.113.7", "198.51.100.1", 40000, 443),
            sent=b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n")
    relayed(5053, lambda sport: v2(SOURCE, "127.0.0.1", sport, 5053), sent=SIGNATURE + b"\x20\x00\x00\x00")
    relayed(5054, lambda sport: b"")
    relayed(5055, lambda sport: v1(SOURCE, "127.0.0.1", sport, 5055))
    relayed(5055, lambda sport: v1("::1", "::1", sport, 5055), source="::1", to="::1")

    sock, _ = client(5053)  # no header: reset, and the service never sees it
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    data, end = read_to_end(sock)
    expect((data, end) == (b"", "reset"), f"a client without a PROXY header got {data!r} then {end}, not a reset")
    relayed(5053, lambda sport: v2("203.0.113.7", "198.51.100.1", 40000, 443),  # then the entry serves on
            sent=b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n")
    expect(len(got[5053]) == 3, f"the service of port 6053 saw {len(got[5053])} connections, not 3")


if __name__ == "__main__":
    main("proxy_protocol", check)

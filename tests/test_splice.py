"""Bulk moves through a pipe with splice (Python 3.10 and newer), and a kernel that refuses to
splice a socket costs no byte: the direction copies from then on, what the pipe held first."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time

import pytest

import qproxy
from conftest import DEADLINE, ThreadedServer, echo, free_port, inbound, outbound, recv_all, wait_for
from test_faults import kinds
from test_relay import connect

needs_splice = pytest.mark.skipif(not qproxy.SPLICE, reason="os.splice is Python 3.10 and newer")

BULK = os.urandom(24 * 1024 * 1024)

# Runs a half with os.splice refused (EINVAL, as a kernel that cannot splice a socket says) on every
# fill of a pipe from a socket, or on every drain of a pipe into a socket, after the fill worked.
REFUSING = r"""
import errno, os, stat, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[2])))
import qproxy
refused, original = {refused!r}, qproxy.splice
def splice(source, destination, count, **flags):
    into_pipe = stat.S_ISFIFO(os.fstat(destination).st_mode)
    if into_pipe == (refused == "fill"):
        raise OSError(errno.EINVAL, "Invalid argument")
    return original(source, destination, count, **flags)
qproxy.splice = splice
sys.exit(qproxy.main(sys.argv[3:]))
"""


def echoed(port: int, data: bytes) -> bytes:
    """Send data while reading what comes back, to the end."""
    with connect(port) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        received = recv_all(sock)
        sender.join(DEADLINE)
    return received


def same(received: bytes, sent: bytes) -> bool:
    return len(received) == len(sent) and hashlib.sha256(received).digest() == hashlib.sha256(sent).digest()


@needs_splice
@pytest.mark.parametrize("refused", ["fill", "drain"])
@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_kernel_that_refuses_to_splice_costs_no_byte(proxy, refused, direction):
    service = ThreadedServer(echo)
    port = free_port()
    proxy.write_config(inbound(port, service.port) if direction == "inbound"
                       else outbound("127.0.0.1", service.port, port))
    wrapper = [sys.executable, "-c", REFUSING.format(refused=refused)]
    host = proxy.start("host", wrapper=wrapper)
    enclave = proxy.start("enclave", wrapper=wrapper)
    try:
        assert same(echoed(port, BULK), BULK), "bytes lost or reordered by the fall back to copying"
        for half in (host, enclave):
            half.wait_log(r"DEBUG .*cannot splice \w+ to \w+ \(Invalid argument\): copying")
        assert same(echoed(port, BULK[:1_000_000]), BULK[:1_000_000]), "the next connection"
    finally:
        service.stop()


def sender_of(data: bytes, release: threading.Event):
    def handle(sock: socket.socket) -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        release.wait(DEADLINE)
    return handle


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_bulk_goes_through_a_pipe_held_only_while_it_flows(proxy, direction):
    """A download the client reads slowly: on Python 3.10 and newer each half is seen splicing it
    through a pipe (two descriptors); on 3.9, or once the connection closed, no pipe is left.

    A stalled flow may hold its bytes in a buffer instead (its last fill fell short of bulk size),
    so the halves are watched while bytes move, not once they stopped."""
    release = threading.Event()
    service = ThreadedServer(sender_of(BULK, release))
    port = free_port()
    host, enclave = proxy.start_both(inbound(port, service.port) if direction == "inbound"
                                     else outbound("127.0.0.1", service.port, port))
    try:
        with connect(port) as sock:
            sock.sendall(b"go")
            received, splicing = bytearray(), set()
            end = time.monotonic() + DEADLINE
            while qproxy.SPLICE and len(splicing) < 2:
                splicing.update(name for name, half in (("host", host), ("enclave", enclave))
                                if kinds(half)["pipe"] == 2)
                chunk = sock.recv(64 * 1024)
                assert chunk and time.monotonic() < end, (
                    f"{len(received)} bytes came and only {sorted(splicing) or 'no half'} spliced them")
                received += chunk
            received += recv_all(sock)
            assert same(received, BULK)
        wait_for(lambda: not any(kinds(half)["pipe"] for half in (host, enclave)), "every pipe closed")
    finally:
        release.set()
        service.stop()


def digest_of_all(sock: socket.socket) -> None:
    """Read to the end, then answer with the length and hash of what came."""
    data = recv_all(sock)
    sock.sendall(b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_urgent_data_in_a_bulk_stream_stops_nothing(proxy, direction):
    """TCP urgent data (MSG_OOB) in the middle of bulk: splice stops at its mark for good, recv goes
    past it.  The stream goes on, every ordinary byte arrives, and the urgent byte is left out, as
    a relay that reads with recv() always did."""
    service = ThreadedServer(digest_of_all)
    port = free_port()
    proxy.start_both(inbound(port, service.port) if direction == "inbound"
                     else outbound("127.0.0.1", service.port, port))
    first, second = BULK[:4_000_000], BULK[4_000_000:8_000_000]
    try:
        with connect(port) as sock:
            sock.sendall(first)
            sock.send(b"!", socket.MSG_OOB)
            sock.sendall(second)
            sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock)
        whole = first + second
        assert answer == b"%d %s" % (len(whole), hashlib.sha256(whole).hexdigest().encode())
    finally:
        service.stop()

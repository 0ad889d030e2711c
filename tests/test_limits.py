"""The settable limits of [limits]: connections per listener, connect timeout, idle timeout.

Both halves run as subprocesses over emulated vsock; the far sides are real
TCP servers on loopback.  -t/--threads, the bound on a whole half, is tested
in test_cli.py with the other command-line options.
"""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from conftest import DEADLINE, ThreadedServer, echo, free_port, inbound, outbound, read_to_end, wait_for
from test_relay import connect


def limits(**values: object) -> str:
    return "[limits]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())


def assert_no_reply_yet(sock: socket.socket) -> None:
    """A negative check: nothing comes back for 0.5 s, ample for a relay on loopback."""
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        sock.recv(100)
    sock.settimeout(DEADLINE)


def test_a_listener_at_its_limit_waits_while_the_others_serve(proxy):
    busy, other = ThreadedServer(echo), ThreadedServer(echo)
    busy_port, other_port = free_port(), free_port()
    host, _ = proxy.start_both(
        inbound(busy_port, busy.port, 9000) + inbound(other_port, other.port, 9001)
        + limits(connections_per_listener=2)
    )
    held = [connect(busy_port) for _ in range(2)]
    waiting = None
    try:
        for sock in held:
            sock.sendall(b"held")
            assert sock.recv(100) == b"held"
        waiting = connect(busy_port)  # accepted, and held by the half until there is room
        waiting.sendall(b"third")
        host.wait_log(r"WARN  qproxy::host tcp 0\.0\.0\.0:%d \(\[limits\] connections_per_listener\): "
                      r"2 connections at once, the limit; more wait for room, up to 30 s" % busy_port)
        assert_no_reply_yet(waiting)
        with connect(other_port) as sock:  # another listener is not held up
            sock.sendall(b"other")
            assert sock.recv(100) == b"other"
        assert busy.accepted == 2
        held.pop().close()
        assert waiting.recv(100) == b"third"
        host.wait_log(r"INFO  qproxy::host tcp 0\.0\.0\.0:%d .*: below the limit again" % busy_port)
        for round in range(3):  # at the limit again and again: one warning, not one a connection
            waiting.close()
            waiting = connect(busy_port)
            waiting.sendall(b"again")
            assert waiting.recv(100) == b"again"
        assert len(re.findall(r"qproxy::host .*connections at once, the limit", host.log())) == 1, host.log()
    finally:
        for sock in held + [waiting]:
            if sock is not None:
                sock.close()
        busy.stop()
        other.stop()


def test_the_enclave_half_keeps_its_listeners_within_the_limit_too(proxy):
    """Outbound: the enclave's 127.0.0.1 listener holds the third app connection back."""
    upstream = ThreadedServer(echo)
    enclave_port = free_port()
    _, enclave = proxy.start_both(outbound("127.0.0.1", upstream.port, enclave_port) + limits(connections_per_listener=2))
    held = [connect(enclave_port) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"held")
            assert sock.recv(100) == b"held"
        held.append(connect(enclave_port))
        held[-1].sendall(b"third")
        enclave.wait_log(r"WARN  qproxy::enclave tcp 127\.0\.0\.1:%d .*: 2 connections at once, the limit" % enclave_port)
        assert_no_reply_yet(held[-1])
        held.pop(0).close()
        assert held[-1].recv(100) == b"third"
    finally:
        for sock in held:
            sock.close()
        upstream.stop()




def test_connect_timeout_resets_the_app_after_the_configured_time(proxy, silent_listener):
    enclave_port = free_port()
    host, _ = proxy.start_both(outbound("127.0.0.1", silent_listener.port, enclave_port) + limits(connect_timeout=1))
    started = time.monotonic()
    with connect(enclave_port) as sock:
        sock.sendall(b"hello?")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    took = time.monotonic() - started
    host.wait_log(r"WARN  qproxy::host conn \d+: cannot reach tcp 127\.0\.0\.1:%d: timed out" % silent_listener.port)
    assert 1.0 <= took < 5.0, f"reset after {took:.2f} s with connect_timeout = 1"


def test_a_stop_waits_for_a_connection_whose_far_side_has_not_answered_yet(proxy, silent_listener):
    """SIGTERM while the host half still dials: the grace period covers that connection too, so it
    is relayed once the far side answers (at the kernel's next SYN, about 1 s later)."""
    enclave_port = free_port()
    host, _ = proxy.start_both(outbound("127.0.0.1", silent_listener.port, enclave_port))
    with connect(enclave_port) as app:
        app.sendall(b"hello?")
        host.wait_log(r"conn \d+: dialing for .* -> tcp 127\.0\.0\.1:%d" % silent_listener.port)
        host.process.send_signal(signal.SIGTERM)
        host.wait_log("SIGTERM: stopping")
        listener = silent_listener.sock
        listener.settimeout(DEADLINE)
        for _ in silent_listener.fillers:  # room in the listen queue again
            listener.accept()[0].close()
        upstream, _ = listener.accept()  # the host half's connection
        with upstream:
            upstream.settimeout(DEADLINE)
            assert upstream.recv(100) == b"hello?"
            upstream.sendall(b"answer")
            assert app.recv(100) == b"answer"
    assert host.stop() == 0
    assert "cutting" not in host.log()


def test_idle_timeout_cuts_a_quiet_connection_and_spares_a_busy_one(proxy):
    service = ThreadedServer(echo)
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, service.port) + limits(idle_timeout=1))
    try:
        quiet, busy = connect(host_port), connect(host_port)
        for sock in (quiet, busy):
            sock.sendall(b"hi")
            assert sock.recv(100) == b"hi"
        started = time.monotonic()
        # The busy connection moves a byte every 0.25 s for 2 s, twice the idle timeout: it must survive.
        while time.monotonic() - started < 2.0:
            busy.sendall(b".")
            assert busy.recv(100) == b"."
            time.sleep(0.25)  # the pace of a client, not a wait for qproxy
        # Both halves keep the timeout; whichever cuts first, the client sees the end (a reset from the
        # host half, or an orderly end passed on from the enclave half's cut across vsock).
        assert read_to_end(quiet)[0] == b""
        wait_for(lambda: re.search(r"INFO  qproxy::\w+ conn \d+ cut after 1 s idle", host.log() + enclave.log()),
                 "a half to log the cut")
        busy.sendall(b"still")
        assert busy.recv(100) == b"still"
    finally:
        quiet.close()
        busy.close()
        service.stop()


def test_idle_timeout_frees_a_connection_whose_upstream_stalls(proxy):
    """An upstream that accepts and then neither reads nor writes nor closes holds nothing for long."""
    stalled = []
    upstream = ThreadedServer(lambda sock: stalled.append(sock) or time.sleep(DEADLINE))
    enclave_port = free_port()
    host, _ = proxy.start_both(outbound("127.0.0.1", upstream.port, enclave_port) + limits(idle_timeout=0.5))
    try:
        with connect(enclave_port) as app:
            app.sendall(b"anyone?")
            wait_for(lambda: stalled, "the upstream to accept")
            app.shutdown(socket.SHUT_WR)  # the app is done talking and waits: only the timeout ends this
            assert read_to_end(app)[0] == b""
        host.wait_log(r"INFO  qproxy::host conn \d+ cut after 0\.5 s idle")
        assert read_to_end(stalled[0])[0] == b"anyone?"
    finally:
        upstream.stop()

"""The host half's control port under hostile input: garbage, oversized messages, a trickle, a flood.

Whatever arrives there, the host half stays up, says so in its log, and the data path
keeps working.  Over emulated vsock, where the control port is the socket file
DIR/<control port>.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import qproxy
from conftest import DEADLINE, free_port, inbound, recv_all, wait_for
from test_relay import exchange


def start(proxy, echo_server):
    """A host half alone (the test plays the enclave half), serving one inbound entry."""
    host_port = free_port()
    proxy.write_config(inbound(host_port, echo_server.port))
    proxy.start("enclave")  # carries the data path, and holds the control connection
    host = proxy.start("host")
    host.wait_log("control: enclave half connected")
    return host, host_port


def control(proxy) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    sock.connect(str(proxy.vsock_dir / str(proxy.control_port)))
    return sock


def closed_by_host(sock: socket.socket) -> bool:
    try:
        return recv_all(sock) == b""
    except ConnectionResetError:
        return True


def hello() -> bytes:
    return json.dumps({"type": "hello", "protocol": 1, "role": "enclave", "version": "test"}).encode() + b"\n"


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_garbage_is_refused_and_the_data_path_is_untouched(proxy, echo_server):
    host, host_port = start(proxy, echo_server)
    for junk in (b"\x00\xff\xfe garbage\n", b"[1, 2, 3]\n", b'{"no": "type"}\n', b'{"type": "hello", "role": "host"}\n'):
        with control(proxy) as sock:
            sock.sendall(junk)
            assert closed_by_host(sock), junk
    host.wait_log(r"WARN .*control: (no valid hello from|.* did not introduce itself)")
    assert exchange(host_port, b"still relaying") == b"still relaying"
    assert host.process.poll() is None


def test_an_oversized_message_is_cut_off(proxy, echo_server):
    host, host_port = start(proxy, echo_server)
    with control(proxy) as sock:
        try:
            sock.sendall(b"a" * (qproxy.CONTROL_MAX_MESSAGE + 10_000))  # no newline: one endless message
        except (BrokenPipeError, ConnectionResetError):
            pass  # the host may close before it has read it all
        assert closed_by_host(sock)
    host.wait_log(rf"no valid hello from .*: a message over {qproxy.CONTROL_MAX_MESSAGE} bytes")
    assert exchange(host_port, b"fine") == b"fine"


def test_a_trickle_gets_the_hello_timeout_in_all_and_a_quiet_enclave_stays(proxy, echo_server):
    host, host_port = start(proxy, echo_server)
    enclave = proxy.halves[0]  # connected, and quiet from now on: it must outlast the hello timeout
    trickler = control(proxy)
    stop = threading.Event()

    def trickle():
        for byte in b'{"type": "hello", "role": "enclave"' * 10:
            if stop.wait(0.5):
                return
            try:
                trickler.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=trickle)
    started = time.monotonic()
    thread.start()
    try:
        assert closed_by_host(trickler)
        elapsed = time.monotonic() - started
        assert qproxy.CONTROL_HELLO_TIMEOUT - 1 <= elapsed <= qproxy.CONTROL_HELLO_TIMEOUT + DEADLINE, elapsed
    finally:
        stop.set()
        thread.join()
        trickler.close()
    host.wait_log(r"no valid hello from .*: timed out")
    assert "went away" not in enclave.log(), "the host half dropped a quiet enclave half after the hello timeout"
    assert "disconnected" not in host.log()
    assert exchange(host_port, b"meanwhile") == b"meanwhile"


def test_a_flood_of_silent_connections_is_bounded(proxy, echo_server):
    host, host_port = start(proxy, echo_server)
    baseline = fds(host.process.pid)
    flood = [control(proxy) for _ in range(100)]
    try:
        host.wait_log(r"control: too many connections without a hello; closing")
        # Past the few that may wait for a hello, the host half has closed its side of the flood.
        wait_for(lambda: fds(host.process.pid) <= baseline + qproxy.CONTROL_MAX_UNGREETED,
                 "the host half to close the connections it has no room for")
        assert exchange(host_port, b"during the flood") == b"during the flood"
    finally:
        for sock in flood:
            sock.close()
    assert host.process.poll() is None


def test_a_new_enclave_half_replaces_the_old_connection(proxy, echo_server):
    host, host_port = start(proxy, echo_server)  # the real enclave half is connected
    with control(proxy) as newcomer:
        newcomer.sendall(hello())
        assert json.loads(newcomer.makefile("rb").readline())["type"] == "hello"
        host.wait_log("control: a new enclave half replaces the one connected before")
        wait_for(lambda: host.log().count("control: enclave half connected") >= 2, "the newcomer to be taken")


NESTED = b"[" * 5000 + b"]" * 5000 + b"\n"  # deeper than the JSON parser's recursion


def test_deeply_nested_json_is_garbage_before_and_after_the_hello(proxy, echo_server):
    host, host_port = start(proxy, echo_server)
    with control(proxy) as sock:
        sock.sendall(NESTED)
        assert closed_by_host(sock)
    # Too deep for the JSON parser (Python 3.12 and older), or parsed and then no object (3.13): a bad message.
    host.wait_log(r"control: no valid hello from .*: a message (nested too deeply|without a type)")
    with control(proxy) as sock:  # a greeted connection that then sends it
        sock.sendall(hello())
        assert json.loads(sock.makefile("rb").readline())["type"] == "hello"
        sock.sendall(NESTED)
        host.wait_log(r"control: the enclave half \(.*\) failed: a message (nested too deeply|without a type)")
    # The control port still takes an enclave half: the real one dials again and is answered.
    wait_for(lambda: host.log().count("control: enclave half connected") >= 3, "the enclave half to be back")
    assert "Traceback" not in host.log() and "unexpected error" not in host.log()
    assert exchange(host_port, b"unaffected") == b"unaffected"

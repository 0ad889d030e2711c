"""End to end over emulated vsock: both halves as real subprocesses, real TCP clients and servers."""

from __future__ import annotations

import hashlib
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import qproxy
from conftest import DEADLINE, QPROXY, ThreadedServer, free_port, inbound, outbound, recv_all, wait_for


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=DEADLINE)


def exchange(port: int, request: bytes) -> bytes:
    """Send a request, end our side, read the whole reply."""
    with connect(port) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def reply_after_eof(sock: socket.socket) -> None:
    """A server that answers only once the client has finished: needs half-close to work."""
    request = recv_all(sock)
    sock.sendall(b"got " + str(len(request)).encode() + b" bytes: " + hashlib.sha256(request).hexdigest().encode())
    sock.shutdown(socket.SHUT_WR)


def expect_reset(port: int, speak_first: bool = True) -> None:
    """The proxy must fail a connection to port promptly with a reset, not hang and not close cleanly.

    A silent client (speak_first=False) only reads: it sees the reset only if no orderly
    end (FIN) reached it first.  The reset may come so fast that connect() reports it.
    """
    with pytest.raises(ConnectionResetError):
        with connect(port) as sock:
            if speak_first:
                sock.sendall(b"hello?")
            recv_all(sock)


# --- inbound and outbound -------------------------------------------------------------


def test_inbound_reaches_the_service_in_the_enclave(proxy):
    service = ThreadedServer(lambda s: (s.recv(100), s.sendall(b"HTTP/1.1 200 OK\r\n\r\nHello world!")))
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, service.port))
    with connect(host_port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert recv_all(sock).endswith(b"Hello world!")
    host.wait_log(r"conn 1 closed: tcp 127\.0\.0\.1:\d+ -> tcp 0\.0\.0\.0:%d -> vsock 4:9000, 18 bytes up, 31 bytes down" % host_port)
    enclave.wait_log(r"conn 1 closed: .* -> vsock :9000 -> tcp 127\.0\.0\.1:%d, 18 bytes up, 31 bytes down" % service.port)
    service.stop()


def test_outbound_reaches_a_service_outside(proxy):
    outside = ThreadedServer(reply_after_eof)
    app_port = free_port()
    host, enclave = proxy.start_both(outbound("127.0.0.1", outside.port, app_port))
    assert exchange(app_port, b"x" * 1000).startswith(b"got 1000 bytes")
    host.wait_log(r"conn 1 closed: vsock \(emulated\) @\w+ -> vsock :7000 -> tcp 127\.0\.0\.1:%d, 1000 bytes up" % outside.port)
    outside.stop()


def test_both_halves_name_a_connection_alike_and_say_what_they_dialed(proxy):
    """The name of the vsock connection (its source port on real vsock, the name the kernel gives the
    dialing end under emulation) is in both halves' lines, and the opened line says where it went."""
    outside = ThreadedServer(reply_after_eof)
    app_port = free_port()
    host, enclave = proxy.start_both(outbound("localhost", outside.port, app_port))
    assert exchange(app_port, b"x" * 10).startswith(b"got 10 bytes")
    name = enclave.wait_log(r"conn 1 opened: tcp 127\.0\.0\.1:\d+ -> tcp 127\.0\.0\.1:%d -> vsock 3:7000, from @(\w+)"
                            % app_port).group(1)
    host.wait_log(r"conn 1 opened: vsock \(emulated\) @%s -> vsock :7000 -> tcp localhost:%d, connected to tcp"
                  r" (127\.0\.0\.1|::1):%d" % (name, outside.port, outside.port))
    host.wait_log(r"DEBUG qproxy::host conn 1: localhost resolves to ")


def test_outbound_resolves_a_name(proxy):
    outside = ThreadedServer(reply_after_eof)
    app_port = free_port()
    proxy.start_both(outbound("localhost", outside.port, app_port))
    assert exchange(app_port, b"abc").startswith(b"got 3 bytes")
    outside.stop()


# --- half-close -------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_client_half_close_still_reads_the_whole_reply(proxy, direction):
    """The client ends its side first; the server answers only after that EOF, and a large answer."""
    payload = os.urandom(300_000)

    def server(sock):
        request = recv_all(sock)
        sock.sendall(hashlib.sha256(request).digest() + payload)
        sock.shutdown(socket.SHUT_WR)

    service = ThreadedServer(server)
    port = free_port()
    config = inbound(port, service.port) if direction == "inbound" else outbound("127.0.0.1", service.port, port)
    proxy.start_both(config)
    request = os.urandom(200_000)
    reply = exchange(port, request)
    assert reply[:32] == hashlib.sha256(request).digest()
    assert reply[32:] == payload
    service.stop()


def test_server_half_close_lets_the_client_keep_sending(proxy):
    """The server ends its side first; what the client sends afterwards still arrives."""
    received = []

    def server(sock):
        sock.sendall(b"banner")
        sock.shutdown(socket.SHUT_WR)
        received.append(recv_all(sock))

    service = ThreadedServer(server)
    host_port = free_port()
    proxy.start_both(inbound(host_port, service.port))
    with connect(host_port) as sock:
        assert recv_all(sock) == b"banner"  # the server's EOF arrived...
        late = os.urandom(500_000)
        sock.sendall(late)  # ...and our direction is still open
        sock.shutdown(socket.SHUT_WR)
        wait_for(lambda: received, "the server to read to EOF")
    assert received[0] == late
    service.stop()


# --- many at once -----------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_100_concurrent_connections_move_1mb_each_way(proxy, echo_server, direction):
    port = free_port()
    config = inbound(port, echo_server.port) if direction == "inbound" else outbound("127.0.0.1", echo_server.port, port)
    host, enclave = proxy.start_both(config)
    results: dict[int, tuple[str, str]] = {}
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            data = os.urandom(1 << 20)
            with connect(port) as sock:
                sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
                sender.start()
                echoed = recv_all(sock)
                sender.join()
            results[index] = (hashlib.sha256(data).hexdigest(), hashlib.sha256(echoed).hexdigest())
        except BaseException as error:  # reported below; a thread cannot fail the test itself
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    assert len(results) == 100
    assert all(sent == echoed for sent, echoed in results.values())
    assert echo_server.accepted == 100
    assert host.stop() == 0 and enclave.stop() == 0


# --- failures ---------------------------------------------------------------------------


def dead_port() -> int:
    """A loopback port where nothing listens."""
    return free_port()


def test_unreachable_upstream_resets_the_app_and_the_proxy_keeps_serving(proxy):
    outside = ThreadedServer(reply_after_eof)
    dead_app_port, good_app_port = free_port(), free_port()
    host, enclave = proxy.start_both(
        outbound("127.0.0.1", dead_port(), dead_app_port, 7000) + outbound("127.0.0.1", outside.port, good_app_port, 7001)
    )
    for _ in range(3):
        expect_reset(dead_app_port)
    host.wait_log(r"conn \d+: cannot reach tcp 127\.0\.0\.1:\d+: Connection refused")
    assert exchange(good_app_port, b"still here").startswith(b"got 10 bytes")
    assert host.process.poll() is None and enclave.process.poll() is None
    outside.stop()


@pytest.mark.parametrize("speak_first", [True, False], ids=["client-speaks-first", "silent-client"])
def test_unreachable_service_in_the_enclave_resets_the_client(proxy, speak_first):
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, dead_port()))
    expect_reset(host_port, speak_first)
    enclave.wait_log(r"cannot reach tcp 127\.0\.0\.1:\d+: Connection refused")


def test_absent_enclave_half_resets_the_client(proxy):
    host_port = free_port()
    proxy.write_config(inbound(host_port, dead_port()))
    host = proxy.start("host")
    expect_reset(host_port)
    host.wait_log(r"cannot reach vsock 4:9000")


def test_unresolvable_name_resets_the_app(proxy):
    app_port = free_port()
    host, enclave = proxy.start_both(outbound("no-such-host.invalid", 443, app_port))
    expect_reset(app_port)
    host.wait_log(r"cannot reach tcp no-such-host\.invalid:443: name resolution failed")


def test_enclave_restart_serves_new_connections_without_touching_the_host(proxy, echo_server):
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, echo_server.port))
    assert exchange(host_port, b"before") == b"before"
    host.wait_log("control: enclave half connected")
    enclave.process.kill()
    enclave.process.wait()
    host.wait_log(r"control: the enclave half .* disconnected")
    proxy.start("enclave")
    assert exchange(host_port, b"after") == b"after"
    wait_for(lambda: host.log().count("control: enclave half connected") == 2, "the enclave half to reconnect")


def test_host_restart_is_noticed_and_the_enclave_reconnects(proxy, echo_server):
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, echo_server.port))
    host.wait_log("control: enclave half connected")
    assert host.stop() == 0
    enclave.wait_log("control: the host half went away")
    host = proxy.start("host")
    host.wait_log("control: enclave half connected")
    assert exchange(host_port, b"again") == b"again"


# --- DNS on the host: per connection, every address, --ipv4/--ipv6 -------------------------

needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare to give the host half its own /etc/hosts"
)


def outbound_by_name(proxy, hosts_file, hosts: str, name: str, port: int, *host_args: str) -> int:
    """Both halves for one outbound entry to name:port, the host half reading hosts as its
    /etc/hosts (hosts_file, bind-mounted in a mount namespace of its own); the app's port."""
    hosts_file.write_text(hosts)
    app_port = free_port()
    proxy.write_config(outbound(name, port, app_port))
    proxy.start("enclave")
    proxy.start("host", *host_args, wrapper=[
        "unshare", "-m", "sh", "-c", f'mount --bind "{hosts_file}" /etc/hosts && exec "$0" "$@"',
    ])
    return app_port


@needs_mount_namespace
def test_every_address_is_tried_when_the_first_is_dead(proxy, tmp_path):
    outside = ThreadedServer(reply_after_eof, "127.0.0.3")  # 127.0.0.1 on that port is dead
    app_port = outbound_by_name(proxy, tmp_path / "hosts", "127.0.0.1 upstream.test\n127.0.0.3 upstream.test\n",
                                "upstream.test", outside.port)
    assert exchange(app_port, b"abc").startswith(b"got 3 bytes")
    outside.stop()


@needs_mount_namespace
def test_the_name_is_resolved_again_for_each_connection(proxy, tmp_path):
    first = ThreadedServer(reply_after_eof, "127.0.0.2")
    second = ThreadedServer(reply_after_eof, "127.0.0.3", first.port)
    hosts = tmp_path / "hosts"
    app_port = outbound_by_name(proxy, hosts, "127.0.0.2 moving.test\n", "moving.test", first.port)
    exchange(app_port, b"1")
    with open(hosts, "r+") as file:  # same inode, so the bind mount sees the change
        file.write("127.0.0.3 moving.test\n")
    exchange(app_port, b"2")
    assert (first.accepted, second.accepted) == (1, 1)


@needs_mount_namespace
@pytest.mark.parametrize("flag, works", [("--ipv4", False), ("--ipv6", True), (None, True)])
def test_ipv4_and_ipv6_flags_choose_the_family(proxy, tmp_path, flag, works):
    six = ThreadedServer(reply_after_eof, "::1")
    # nothing listens on 127.0.0.1 at six.port: only the IPv6 address answers
    app_port = outbound_by_name(proxy, tmp_path / "hosts", "127.0.0.1 dual.test\n::1 dual.test\n",
                                "dual.test", six.port, *([flag] if flag else []))
    if works:
        assert exchange(app_port, b"v6").startswith(b"got 2 bytes")
    else:
        expect_reset(app_port)
    six.stop()


# --- stopping ---------------------------------------------------------------------------


def test_sigterm_lets_an_open_connection_finish(proxy):
    gate = threading.Event()

    def slow(sock):
        request = recv_all(sock)
        gate.wait(DEADLINE)
        sock.sendall(request[::-1])
        sock.shutdown(socket.SHUT_WR)

    service = ThreadedServer(slow)
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, service.port))
    with connect(host_port) as sock:
        sock.sendall(b"abc")
        sock.shutdown(socket.SHUT_WR)
        enclave.wait_log("conn 1 opened")
        host.process.send_signal(signal.SIGTERM)
        host.wait_log("SIGTERM: stopping")
        wait_for(lambda: not os.path.exists(proxy.vsock_dir / str(proxy.control_port)), "the host to close its listeners")
        with pytest.raises(ConnectionRefusedError):
            connect(host_port).close()
        gate.set()
        assert recv_all(sock) == b"cba"
    assert host.stop() == 0
    assert enclave.stop() == 0
    service.stop()


def test_second_signal_exits_at_once(proxy, echo_server):
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, echo_server.port))
    with connect(host_port) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"  # the connection is open and idle; the grace period would wait for it
        host.process.send_signal(signal.SIGTERM)
        host.wait_log("SIGTERM: stopping")
        host.process.send_signal(signal.SIGTERM)
        assert host.process.wait(2) == 0  # well inside the grace period
    host.wait_log("second signal: exiting now")


# --- the enclave's loopback ------------------------------------------------------------

needs_net_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for a network namespace"
)


@needs_net_namespace
def test_enclave_brings_loopback_up_in_a_fresh_namespace(proxy, echo_server):
    proxy.write_config(outbound("127.0.0.1", 1, free_port()))
    enclave = proxy.start("enclave", wrapper=["unshare", "-n"])
    enclave.wait_log("brought the loopback interface lo up")
    assert enclave.stop() == 0


@needs_net_namespace
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv to drop CAP_NET_ADMIN")
def test_enclave_without_the_right_to_raise_loopback_names_the_command(proxy):
    proxy.write_config("")
    enclave = proxy.start("enclave", ready=False, wrapper=["unshare", "-n", "setpriv", "--bounding-set=-net_admin"])
    assert enclave.process.wait(DEADLINE) == 1
    log = enclave.log()
    assert "qproxy: error: the loopback interface lo is down" in log
    assert "ip link set lo up" in log
    assert "Traceback" not in log


# --- the demo ---------------------------------------------------------------------------


def run_demo(wrapper: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """The demo's output, and for each request (inbound, outbound) the port asked and the service's port."""
    result = subprocess.run(wrapper + [sys.executable, str(QPROXY), "demo"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "'Hello world!'" in result.stdout
    assert "'Hello from outside!'" in result.stdout
    assert "stopped cleanly" in result.stdout
    folder = re.search(r"demo: folder (\S+),", result.stdout).group(1)
    assert not os.path.exists(folder), "a demo that worked leaves nothing behind"
    return result.stdout, re.findall(r"GET http://127\.0\.0\.1:(\d+)/ .*-> 127\.0\.0\.1:(\d+): ", result.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace takes root")
def test_demo_runs_the_vendors_layout_with_the_enclave_in_its_own_network():
    """Each entry's port the same on both sides: only works if the enclave's listeners are not the host's."""
    output, ports = run_demo([])
    assert "in a network namespace of their own" in output
    assert len(ports) == 2 and all(asked == served for asked, served in ports), output


@pytest.mark.skipif(not shutil.which("setpriv") or os.geteuid() != 0, reason="needs root and setpriv")
def test_demo_without_a_network_namespace_uses_ports_of_its_own():
    output, ports = run_demo(["setpriv", "--bounding-set=-sys_admin"])  # unshare(CLONE_NEWNET) is then refused
    assert "no network namespace for the enclave half (Operation not permitted" in output
    assert len(ports) == 2 and all(asked != served for asked, served in ports), output


def test_a_demo_that_fails_keeps_its_folder_and_says_where():
    """The outbound request made to fail (its client raises): the halves' logs are kept, and named."""
    launcher = ("import sys; sys.path.insert(0, sys.argv[1]); import qproxy; get = qproxy.http_get\n"
                "def failing(*args):\n"
                "    if failing.calls: raise qproxy.StartError('made to fail')\n"
                "    failing.calls = 1; return get(*args)\n"
                "failing.calls = 0; qproxy.http_get = failing; sys.exit(qproxy.main(['demo']))")
    result = subprocess.run([sys.executable, "-c", launcher, str(QPROXY.parent)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result.stderr
    folder = re.search(r"is kept: (\S+)$", result.stderr, re.M).group(1)
    try:
        assert "host half ready" in open(os.path.join(folder, "host.log")).read()
        assert "enclave half ready" in open(os.path.join(folder, "enclave.log")).read()
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_demo_stopped_midway_stops_its_halves_and_keeps_its_folder(stop):
    """Ctrl-C, or a SIGTERM, while the outbound request hangs: no traceback, no half left running."""
    launcher = ("import sys, threading; sys.path.insert(0, sys.argv[1]); import qproxy; get = qproxy.http_get\n"
                "def hanging(*args):\n"
                "    if hanging.calls: print('demo: hanging', flush=True); threading.Event().wait()\n"
                "    hanging.calls = 1; return get(*args)\n"
                "hanging.calls = 0; qproxy.http_get = hanging; sys.exit(qproxy.main(['demo']))")
    demo = subprocess.Popen([sys.executable, "-c", launcher, str(QPROXY.parent)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    output = []
    for line in demo.stdout:
        output.append(line)
        if line.startswith("demo: hanging"):
            break
    halves = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", "".join(output))]
    assert len(halves) == 2, output
    demo.send_signal(stop)
    out, err = demo.communicate(timeout=DEADLINE)
    assert demo.returncode == 1 and "Traceback" not in err, err
    folder = re.search(r"is kept: (\S+)$", err, re.M).group(1)
    try:
        assert err.startswith("demo interrupted\n")
        for pid in halves:  # reaped by the demo, so no such process, not even a zombie
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        shutil.rmtree(folder)


def processes_naming(text: str) -> list[int]:
    """The processes whose command line holds text."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if text.encode() in cmdline.read():
                    found.append(int(pid))
        except OSError:
            pass  # ended meanwhile
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the halves")
def test_a_demo_stopped_at_any_moment_leaves_no_half_running(tmp_path):
    """A signal before, while and after the halves start (a half whose handle an interrupt took would run
    on for ever, as root in a network namespace of its own): no traceback, and no half left running."""
    for delay in (0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6):
        for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            temporary = tmp_path / f"{delay}-{stop.name}"  # every half's command line names its folder, in here
            temporary.mkdir()
            demo = subprocess.Popen([sys.executable, str(QPROXY), "demo"], env=dict(os.environ, TMPDIR=str(temporary)),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for(lambda: any(temporary.iterdir()), "the demo's folder")  # Python and qproxy have started
            time.sleep(delay)  # the moment the signal comes, from there: not a wait for anything
            demo.send_signal(stop)
            out, err = demo.communicate(timeout=DEADLINE)
            assert demo.returncode in (0, 1) and "Traceback" not in err, (delay, stop, demo.returncode, err)
            assert processes_naming(str(temporary)) == [], (delay, stop, out, err)


def test_a_half_that_exits_at_once_fails_the_demo_at_once():
    """A half that cannot start (here: a bad TOKIO_WORKER_THREADS it inherits) fails the demo in
    seconds, not after the whole deadline."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(QPROXY), "demo"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, TOKIO_WORKER_THREADS="junk"))
    assert result.returncode == 1
    assert re.search(r"^demo failed: the (enclave|host) half exited with 2", result.stderr, re.M), result.stderr
    assert time.monotonic() - started < 10
    shutil.rmtree(re.search(r"is kept: (\S+)$", result.stderr, re.M).group(1))


def test_the_demos_ports_are_all_different():
    """The demo failed once because it was given one port for two listeners: taken one at a time,
    500 free ports hold several repeats; taken together, none."""
    ports = qproxy.free_ports(500)
    assert len(set(ports)) == 500


# --- resources ----------------------------------------------------------------------------


def process_counts(pid: int) -> tuple[int, int]:
    """(open file descriptors, threads) of a process."""
    threads = int(re.search(r"^Threads:\s+(\d+)", open(f"/proc/{pid}/status").read(), re.M).group(1))
    return len(os.listdir(f"/proc/{pid}/fd")), threads


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors and threads")
def test_fds_and_threads_return_to_baseline_after_a_burst(proxy, echo_server):
    host_port = free_port()
    host, enclave = proxy.start_both(inbound(host_port, echo_server.port))
    host.wait_log("control: enclave half connected")
    halves = (host.process.pid, enclave.process.pid)
    baseline = {pid: process_counts(pid) for pid in halves}
    sockets = [connect(host_port) for _ in range(60)]
    for sock in sockets:
        sock.sendall(b"ping")
    for sock in sockets:
        assert sock.recv(4) == b"ping"
    busy = {pid: process_counts(pid) for pid in halves}
    assert all(busy[pid][0] >= baseline[pid][0] + 120 for pid in halves), (baseline, busy)  # 2 fds a connection
    for sock in sockets:
        sock.close()
    # Connections close at once; setup threads end after SETUP_THREAD_IDLE without work.
    import qproxy
    wait_for(lambda: all(process_counts(pid) == baseline[pid] for pid in halves),
             "descriptors and threads back to their baseline", timeout=qproxy.SETUP_THREAD_IDLE + DEADLINE)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not shutil.which("prlimit") or not os.path.isdir("/proc/self"), reason="needs prlimit and /proc")
def test_out_of_descriptors_the_host_backs_off_and_recovers(proxy, echo_server):
    """Out of descriptors (accept() or the dial failing with EMFILE): logged, no busy loop, the clients
    wait, and service resumes once descriptors free up."""
    host_port = free_port()
    proxy.write_config(inbound(host_port, echo_server.port))
    proxy.start("enclave")
    host = proxy.start("host", wrapper=["prlimit", "--nofile=32:32"])
    held = []
    try:
        for _ in range(40):  # each relayed connection takes two of the host's 32 descriptors
            sock = connect(host_port)
            held.append(sock)
        host.wait_log(r"WARN .*(open-files limit is reached|Too many open files).*; connections wait until one ends")
        before = cpu_seconds(host.process.pid)
        time.sleep(1.0)  # a measuring window, not a wait for something to happen
        assert cpu_seconds(host.process.pid) - before < 0.5, "the accept loop spins while out of descriptors"
    finally:
        for sock in held:
            sock.close()

    def served() -> bool:
        # The queued connections of closed clients drain first; until then a new one may
        # still find no descriptor for its far side, and is reset for it.
        try:
            return exchange(host_port, b"after") == b"after"
        except ConnectionResetError:
            return False

    wait_for(served, "the host half to serve again once descriptors are free")
    assert host.process.poll() is None


def test_bind_address_keeps_an_inbound_entry_on_one_address(proxy, echo_server):
    host_port = free_port()
    proxy.write_config(inbound(host_port, echo_server.port) + 'bind_address = "127.0.0.1"\n')
    proxy.start("enclave")
    host = proxy.start("host")
    host.wait_log(rf"listening on tcp 127\.0\.0\.1:{host_port} -> vsock 4:9000")
    assert exchange(host_port, b"on loopback") == b"on loopback"
    with pytest.raises(ConnectionRefusedError):  # another loopback address: nothing listens there
        connect(host_port, "127.0.0.2").close()

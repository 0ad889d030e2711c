"""bench/run.py: a fast subset runs end to end and writes sane JSON; wrk's output is read right;
the asyncio relay peer carries bytes and half-closes right; CPU is counted for a hop's forks too;
the egress row's load generator speaks CONNECT as a client does and counts a refusal as an error.

The subset (start-up and idle RSS) needs no external tool: socat joins it only
when installed, uvloop only when this Python imports it.  The load workloads
(iperf3, wrk, nginx) are not run here; they take minutes and want a quiet
machine: `python3 bench/run.py --quick`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

from conftest import ROOT, ThreadedServer, free_port, wait_for

BENCH = ROOT / "bench" / "run.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_quick_startup_and_idle_write_sane_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "startup,idle", "--json", str(out),
         "--python", sys.executable, "--no-lock"],
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "start-up, host half" in done.stdout and "idle RSS, enclave half" in done.stdout
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    assert results["meta"]["cores"] >= 1 and results["meta"]["python"].startswith("3.")
    figures = results["figures"]
    for role in ("host", "enclave"):
        startup = figures[f"startup_{role}"]
        assert len(startup["qproxy"]["runs"]) >= 5
        assert 1 < startup["qproxy"]["median"] < 5000, startup
        assert startup["met"] in (True, False)
        idle = figures[f"idle_{role}_rss"]
        assert len(idle["qproxy"]["runs"]) >= 3
        assert 1 < idle["qproxy"]["median"] < 500, idle
        assert idle["asyncio"]["median"] > 0 and idle["ratios"]["asyncio"] > 0
        if shutil.which("socat"):
            assert idle["socat"]["median"] > 0 and idle["ratios"]["socat"] > 0
        assert idle["best_peer"] in ("socat", "asyncio", "uvloop")
    assert ("uvloop" in results["meta"]["chains"]) == bool(results["meta"]["uvloop"])
    assert "start-up, host half" in done.stdout and "qproxy / best peer" in done.stdout
    assert results["targets_missed"] == [f["label"] for f in figures.values() if f["met"] is False]


WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:40000/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    2.00ms  40.00ms   90.00%
    Req/Sec     8.00k   500.00     9.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    2.50ms
     90%    6.10ms
     99%    1.20s
  32000 requests in 2.00s, 4.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  15995.50
Transfer/sec:      2.00MB
"""


def test_wrk_output_is_read_with_its_units():
    parsed = load_bench().parse_wrk(WRK_OUTPUT)
    assert parsed["rate"] == 15995.5 and parsed["requests"] == 32000
    assert (parsed["p50"], parsed["p90"], parsed["p99"]) == (0.85, 6.1, 1200.0)
    assert parsed["errors"] == 6


def test_ratios_best_peer_and_targets():
    bench = load_bench()
    runs = {"direct": [10, 30, 20], "socat": [4, 5, 6], "asyncio": [3, 4, 5], "qproxy": [6, 5, 7]}
    figure = bench.make_figure("x", "req/s", runs, *bench.versus("socat", 1.2, higher=True), higher=True)
    assert figure["qproxy"] == {"median": 6, "min": 5, "max": 7, "runs": [6, 5, 7]}
    assert figure["ratios"] == {"direct": 0.3, "socat": 1.2, "asyncio": 1.5}
    assert figure["best_peer"] == "socat" and figure["qproxy_best"] == 1.2  # direct is the ceiling, not a peer
    assert figure["target"] == ">= 1.2x socat" and figure["met"] is True
    costs = bench.make_figure("y", "s", runs, *bench.versus("asyncio", 0.8, higher=False))
    assert costs["best_peer"] == "asyncio" and costs["met"] is False  # lower is better: 6 / 4 = 1.5x
    absent = bench.make_figure("z", "s", runs, *bench.versus("uvloop", 1.1, higher=True), higher=True)
    assert absent["met"] is False  # a target against a peer that was not measured is not met


def test_table_has_a_column_per_chain_measured_and_the_best_peer():
    bench = load_bench()
    figure = bench.make_figure("rate", "req/s", {"socat": [100.0], "asyncio": [200.0], "qproxy": [300.0]},
                               decimals=0, higher=True)
    figure["workload"] = "keepalive"
    lines = bench.table({"rate": figure}).splitlines()
    assert lines[0].split() == ["figure", "socat", "asyncio", "qproxy", "qproxy", "/", "best", "peer", "target", "met?"]
    assert lines[1].split() == ["rate", "(req/s)", "100", "200", "300", "1.50x", "asyncio"]


def test_a_figure_relative_to_another_way_shows_that_ratio():
    """The egress row compares qproxy's CONNECT proxy with its own outbound entry, not with a peer."""
    bench = load_bench()
    connect = bench.make_figure("connect", "req/s", {"direct": [900.0], "qproxy": [100.0]}, decimals=0, higher=True)
    outbound = bench.make_figure("outbound", "req/s", {"direct": [900.0], "qproxy": [200.0]}, decimals=0, higher=True)
    bench.relative_to(connect, outbound, "outbound")
    connect["workload"] = outbound["workload"] = "egress"
    lines = bench.table({"connect": connect, "outbound": outbound}).splitlines()
    assert lines[1].split() == ["connect", "(req/s)", "900", "100", "0.50x", "outbound"]
    assert lines[2].split() == ["outbound", "(req/s)", "900", "200", "-"]


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    return head


def fake_proxy(answer: bytes, heads: list):
    """A loopback server that plays both the CONNECT proxy and nginx behind it: a CONNECT gets answer,
    then (on a 200) the GET through the "tunnel" gets nginx's "Hello world!", and the connection ends.
    heads: what each connection sent, in order."""
    def handle(sock):
        sent = [read_head(sock)]
        heads.append(sent)
        if sent[0].startswith(b"CONNECT "):
            sock.sendall(answer)
            if not answer.startswith(b"HTTP/1.1 200"):
                return
            sent.append(read_head(sock))
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nHello world!")

    return ThreadedServer(handle)


def test_the_load_generator_tunnels_then_gets_and_counts_refusals():
    bench = load_bench()
    heads: list[list[bytes]] = []
    server = fake_proxy(b"HTTP/1.1 200 Connection established\r\n\r\n", heads)
    try:
        tunnelled = bench.LoadGenerator(server.port, 8080, tunnel=True, connections=4).run(0.5)
        assert tunnelled["requests"] > 0 and tunnelled["errors"] == 0, tunnelled
        assert 0 < tunnelled["in_time"] <= tunnelled["requests"]
        get = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n"
        assert heads[0] == [b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n", get]
        heads.clear()
        straight = bench.LoadGenerator(server.port, 8080, tunnel=False, connections=4).run(0.5)
        assert straight["requests"] > 0 and straight["errors"] == 0, straight
        assert heads and all(sent == [get] for sent in heads)
    finally:
        server.stop()
    server = fake_proxy(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n", [])
    try:
        denied = bench.LoadGenerator(server.port, 8080, tunnel=True, connections=2).run(0.3)
    finally:
        server.stop()
    assert denied["requests"] == 0 and denied["errors"] > 0
    assert denied["first_error"] == "the proxy answered b'HTTP/1.1 403 Forbidden'"


def echo_server() -> int:
    """A loopback server that echoes each connection and half-closes it on the client's EOF."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def test_the_asyncio_relay_carries_every_byte_both_ways_and_the_half_close(tmp_path):
    """Two hops of bench/peers/asyncio_relay.py, as the bench chains them: 4 MiB out, the client's EOF,
    4 MiB back and then the server's EOF.  A peer that lost bytes or hung on EOF would spoil every figure."""
    target, port, path = echo_server(), free_port(), str(tmp_path / "vsock")
    relay = [sys.executable, str(ROOT / "bench" / "peers" / "asyncio_relay.py")]
    hops = [subprocess.Popen(relay + [f"unix:{path}", f"tcp:127.0.0.1:{target}"]),
            subprocess.Popen(relay + [f"tcp:127.0.0.1:{port}", f"unix:{path}"])]
    try:
        payload = bytes(range(256)) * (4 * 4096)
        wait_for(lambda: os.path.exists(path), "the enclave hop's socket")
        sock = wait_for(lambda: try_connect(port), "the host hop's listener")
        with sock:
            sock.settimeout(15)
            sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
            sender.start()
            received = bytearray()
            while data := sock.recv(65536):
                received += data
            sender.join()
        assert bytes(received) == payload
    finally:
        for hop in hops:
            hop.kill()
            hop.wait()


def try_connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError:
        return None


def test_cpu_of_a_hop_counts_its_reaped_forks():
    """socat forks per connection: a hop's CPU must include children that ended meanwhile."""
    bench = load_bench()
    burn = "import time; end = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; time.sleep(0.5); "
                               f"subprocess.run([sys.executable, '-c', {burn!r}]); time.sleep(30)"],
                              start_new_session=True)
    try:
        time.sleep(0.2)
        assert bench.session_members(parent.pid) == [parent.pid]  # before the fork
        before = bench.session_cpu([parent.pid])
        wait_for(lambda: len(bench.session_members(parent.pid)) == 2, "the child", timeout=10)
        wait_for(lambda: bench.session_members(parent.pid) == [parent.pid], "the child's end", timeout=10)
        assert bench.session_cpu([parent.pid]) - before >= 0.3  # its 0.3 s now in the parent's cutime
    finally:
        parent.kill()
        parent.wait()

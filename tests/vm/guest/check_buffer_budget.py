#!/usr/bin/env python3
"""`[limits] buffer_memory = 1` on both halves: stalled downloads spend the budget, and every flow still moves.

20 clients of host port 5050 each ask the service in the enclave for 4 MiB
and do not read.  Once the services have pushed what the sockets take (each
half then has more lagging flows than its 1 MiB of buffers covers, so it must
move bytes by peeking at the source, over real vsock and TCP), 5 other
clients each send 1 MiB that the service echoes, and must get it back whole
(checked by hash) while the 20 still stall.  Then the 20 read: each must get
its 4 MiB whole and in order (hash).  No connection is reset or cut, and
the halves' logs agree on the byte counts.  Each half's peak memory (VmHWM)
is noted.

As in check_concurrent, the payloads are slices of one random pool, checked
with MD5 (used only to detect corruption: it is cheap under emulation).
"""

import hashlib
import os
import random
import re
import socket
import threading
import time
from pathlib import Path

from vmcheck import Box, Enclave, exchange, expect, main, recv_all, toml_config, wait_for

STALLED, ECHOED = 20, 5
DOWNLOAD, ECHO = 4 * 1024 * 1024, 1024 * 1024
TIMEOUT = 120.0  # for one connection's whole life, under emulation
PUSHED = 256 * 1024  # what each stalled service must have handed its socket before the echoes start
CLIENT_RCVBUF = 64 * 1024  # the stalled clients' receive buffers: the bytes wait in the halves, not in them
POOL = os.urandom(2 * DOWNLOAD)
OFFSETS = random.Random(os.urandom(8)).sample(range(DOWNLOAD), STALLED + ECHOED)
HEADER = 16  # b"D" or b"E", then the payload's number, padded


def payload(index: int, size: int) -> memoryview:
    return memoryview(POOL)[OFFSETS[index]:OFFSETS[index] + size]


def digest(data) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"the stream ended after {len(data)} of {size} bytes")
        data += chunk
    return data


class Service:
    """In the enclave: b"D" sends that download and waits for the client's end; b"E" echoes to the end."""

    def __init__(self):
        self.pushed = [0] * STALLED  # bytes each download's service has handed to its socket
        self.done = [False] * STALLED

    def __call__(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        header = recv_exactly(conn, HEADER)
        index = int(header[1:])
        if header[:1] == b"D":
            data = payload(index, DOWNLOAD)
            for start in range(0, DOWNLOAD, 64 * 1024):
                conn.sendall(data[start:start + 64 * 1024])
                self.pushed[index] = start + 64 * 1024
            conn.shutdown(socket.SHUT_WR)
            self.done[index] = True
            recv_all(conn, TIMEOUT)
        else:
            while True:
                chunk = conn.recv(256 * 1024)
                if not chunk:
                    break
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)


def header(kind: bytes, index: int) -> bytes:
    return kind + str(index).rjust(HEADER - 1, "0").encode()


def echo(box: Box, index: int, failures: list) -> None:
    try:
        data = payload(STALLED + index, ECHO)
        client = box.connect(5050, None, TIMEOUT)
        client.sendall(header(b"E", STALLED + index))

        got = exchange(client, data, TIMEOUT)
        client.close()
        if len(got) != ECHO or digest(got) != digest(data):
            failures.append(f"echo #{index}: got {len(got)} bytes back" + (", other bytes" if len(got) == ECHO else ""))
    except Exception as error:
        failures.append(f"echo #{index}: {type(error).__name__}: {error}")


def memory(half) -> tuple[int, int]:
    """VmRSS and VmHWM of a half, in KiB."""
    status = Path(f"/proc/{half.pid}/status").read_text()
    return tuple(int(re.search(rf"^{name}:\s+(\d+) kB", status, re.M).group(1)) for name in ("VmRSS", "VmHWM"))


def byte_counts(half, listen: str) -> list[tuple[int, int]]:
    pattern = rf"conn \d+ closed: [^\n]*-> {re.escape(listen)} ->[^\n]*?, (\d+) bytes up, (\d+) bytes down"
    return sorted((int(up), int(down)) for up, down in re.findall(pattern, half.text()))


def check(box: Box) -> None:
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)]) + "\n[limits]\nbuffer_memory = 1\n")
    service = Service()
    enclave = Enclave(box)
    box.server(5050, service, enclave)
    host, guest = box.start_pair(config, enclave)
    idle = {half: memory(half)[0] for half in (host, guest)}

    stalled = []
    for index in range(STALLED):
        sock = box.keep(socket.socket())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", 5050))
        sock.sendall(header(b"D", index))
        stalled.append(sock)
    wait_for(lambda: min(service.pushed) >= PUSHED, f"every stalled download's service to push {PUSHED} bytes", 60)
    time.sleep(2)  # the pipelines fill up to where the halves hold back
    pushed_before = sum(service.pushed)

    started = time.monotonic()
    failures: list[str] = []
    threads = [threading.Thread(target=echo, args=(box, index, failures)) for index in range(ECHOED)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    expect(not any(thread.is_alive() for thread in threads), f"echoes still running after {TIMEOUT:.0f} s")
    expect(not failures, f"while {STALLED} downloads stalled, {len(failures)} of {ECHOED} echoes failed: "
                         + "; ".join(failures[:3]))
    echo_time = time.monotonic() - started
    box.note(f"{STALLED} stalled downloads had pushed {pushed_before / 2**20:.1f} MiB in all ({sum(service.done)}"
             f" whole, now {sum(service.pushed) / 2**20:.1f} MiB); {ECHOED} x "
             f"{ECHO // 1024} KiB echoed meanwhile in {echo_time:.1f} s")

    results: dict[int, object] = {}

    def read(index: int) -> None:
        try:
            results[index] = recv_all(stalled[index], TIMEOUT)
        except Exception as error:
            results[index] = error
    started = time.monotonic()
    readers = [threading.Thread(target=read, args=(index,)) for index in range(STALLED)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join(TIMEOUT)
    wrong = []
    for index in range(STALLED):
        got = results.get(index, "still reading")
        if not isinstance(got, bytes):
            wrong.append(f"#{index}: {got!r}")
        elif len(got) != DOWNLOAD or digest(got) != digest(payload(index, DOWNLOAD)):
            wrong.append(f"#{index}: {len(got)} bytes" + (", out of order or garbled" if len(got) == DOWNLOAD else ""))
    expect(not wrong, f"{len(wrong)} of {STALLED} stalled downloads came wrong: " + "; ".join(wrong[:3]))
    box.note(f"then the {STALLED} x {DOWNLOAD // 2**20} MiB downloads read in {time.monotonic() - started:.1f} s")
    for sock in stalled:
        sock.close()

    for half, listen in ((host, "tcp 0.0.0.0:5050"), (guest, "vsock :9995")):
        wanted = sorted([(HEADER, DOWNLOAD)] * STALLED + [(HEADER + ECHO, ECHO)] * ECHOED)
        counts = wait_for(lambda: len(byte_counts(half, listen)) >= STALLED + ECHOED and byte_counts(half, listen),
                          f"{STALLED + ECHOED} closed connections in the log of the {half.name}")
        expect(counts == wanted, f"the {half.name} logged byte counts {sorted(set(counts))}, not {sorted(set(wanted))}")
        expect(not re.search(r"conn \d+ (?:reset|cut|refused)", half.text()), f"the {half.name} reset or cut a connection")
        rss, hwm = memory(half)
        box.note(f"{half.name}: VmRSS idle {idle[half] / 1024:.1f} MiB, peak (VmHWM) {hwm / 1024:.1f} MiB,"
                 f" now {rss / 1024:.1f} MiB")


if __name__ == "__main__":
    main("buffer_budget", check)

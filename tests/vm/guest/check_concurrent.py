#!/usr/bin/env python3
"""50 concurrent connections, each moving 1 MB of random data each way at once, checked by hash.

Done on the inbound path and then on the outbound path.  Each side of each
connection sends its own random megabyte while reading the other's; the
first 16 bytes the client sends name the connection, and the two sides
compare the hash of what they received with the hash of what the other sent.
The halves' own byte counts in their logs must agree too.

Under software emulation the checking costs more CPU than qproxy does, so
each megabyte is a slice of a random pool at its own random offset (no two
connections carry the same bytes) and the hash is MD5, used here only to
detect corruption: five times faster than SHA-256 in the VM.
"""

import hashlib
import itertools
import os
import random
import re
import threading
import time

from vmcheck import Box, Enclave, exchange, expect, main, toml_config, wait_for

CONNECTIONS = 50
SIZE = 1024 * 1024
TIMEOUT = 120.0  # for one connection's transfer, under software emulation
POOL = os.urandom(4 * SIZE)
OFFSETS = random.Random(os.urandom(8)).sample(range(3 * SIZE), 4 * CONNECTIONS)  # distinct: distinct data


def payload(index: int) -> memoryview:
    return memoryview(POOL)[OFFSETS[index]:OFFSETS[index] + SIZE]


def digest(data) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Service:
    def __init__(self, first_payload: int):
        self.records = {}  # token -> (hash of what the service received, hash of what it sent)
        self.lock = threading.Lock()
        self.payloads = itertools.count(first_payload)

    def __call__(self, conn):
        conn.settimeout(TIMEOUT)
        with self.lock:
            data = payload(next(self.payloads))
        got = exchange(conn, data, TIMEOUT)
        with self.lock:
            self.records[bytes(got[:16])] = (digest(got), digest(data))


def run_path(box, port, enclave, service, path, first_payload):
    failures = []

    def one(index):
        try:
            data = payload(first_payload + index)
            sock = box.connect(port, enclave, TIMEOUT)
            got = exchange(sock, data, TIMEOUT)
            sock.close()
            token = bytes(data[:16])
            wait_for(lambda: token in service.records, f"the service's record of connection {index}")
            received, sent = service.records[token]
            if received != digest(data):
                failures.append(f"{path} #{index}: the service received other bytes than were sent")
            if digest(got) != sent:
                failures.append(f"{path} #{index}: the client received {len(got)} bytes, not what the service sent")
        except Exception as error:
            failures.append(f"{path} #{index}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=one, args=(index,)) for index in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    expect(not any(thread.is_alive() for thread in threads), f"{path}: connections still running")
    expect(not failures, f"{len(failures)} of {CONNECTIONS} failed: " + "; ".join(failures[:3]))


def byte_counts(half, listen):
    pattern = rf"conn \d+ closed: [^\n]*-> {re.escape(listen)} ->[^\n]*?, (\d+) bytes up, (\d+) bytes down"
    return [(int(up), int(down)) for up, down in re.findall(pattern, half.text())]


def check(box: Box) -> None:
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)], outbound=[("127.0.0.1", 7777, 8443)]))
    # Payloads 0-49 and 50-99 for the clients of each path, 100-149 and 150-199 for the services.
    inside, outside = Service(2 * CONNECTIONS), Service(3 * CONNECTIONS)
    box.server(8443, outside)
    enclave = Enclave(box)
    host, guest = box.start_pair(config, enclave)
    box.server(5050, inside, enclave)

    paths = (("inbound", 5050, None, inside, 0), ("outbound", 8443, enclave, outside, CONNECTIONS))
    for path, port, side, service, first_payload in paths:
        started, cpu = time.monotonic(), [host.cpu_seconds(), guest.cpu_seconds(), sum(os.times()[:2])]
        run_path(box, port, side, service, path, first_payload)
        cpu = [now - before for now, before in zip([host.cpu_seconds(), guest.cpu_seconds(), sum(os.times()[:2])], cpu)]
        box.note(f"{path}: {CONNECTIONS} connections x {SIZE // 1024} KiB each way in {time.monotonic() - started:.1f} s;"
                 f" CPU s: host half {cpu[0]:.1f}, enclave half {cpu[1]:.1f}, clients and services {cpu[2]:.1f}")

    for half, listen in ((host, "tcp 0.0.0.0:5050"), (guest, "tcp 127.0.0.1:8443")):
        counts = wait_for(lambda: len(byte_counts(half, listen)) >= CONNECTIONS and byte_counts(half, listen),
                          f"{CONNECTIONS} closed connections in the log of the {half.name}")
        expect(all(count == (SIZE, SIZE) for count in counts),
               f"the {half.name} logged byte counts other than {SIZE} each way: {sorted(set(counts))[:5]}")


if __name__ == "__main__":
    main("concurrent", check)

#!/usr/bin/env python3
"""The control link over real vsock: config comparison, and the enclave's log written on the host.

The halves log to files ([log_location], a folder each).  First they share one
config: the host half says the entries match, and the lines of the enclave
half's own log file reappear, identical, in host_log_dir/enclave.log on the
host, those written before the host half started included.  Then a host half
with a different config takes over: it names each mismatch at ERROR, and both
halves go on relaying the entry they share.
"""

import socket
from pathlib import Path

from vmcheck import Box, Enclave, expect, main, toml_config, wait_for


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def echo(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


def check(box: Box) -> None:
    logs = box.dir / "logs"
    log_location = (f'\n[log_location]\nlog_level = "info"\nhost_log_dir = "{logs / "host"}"\n'
                    f'enclave_log_dir = "{logs / "enclave"}"\n')
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)], outbound=[("localhost", 7777, 8443)]) + log_location)
    host_log, own, copy = logs / "host" / "host.log", logs / "enclave" / "enclave.log", logs / "host" / "enclave.log"
    enclave = Enclave(box)
    box.server(5050, echo, enclave)

    guest = box.enclave_half(config, enclave)
    wait_for(lambda: any("enclave half ready" in line for line in lines(own)), "the enclave half to start")
    host = box.host_half(config)
    wait_for(lambda: any("control: the enclave half's entries match this host half's" in line for line in lines(host_log)),
             "the host half to find the entries matching")
    expect(box.exchange(5050, b"through") == b"through", "the inbound entry does not relay")
    wait_for(lambda: any("conn 1 closed" in line for line in lines(copy)), "the enclave's record of conn 1 on the host")
    wait_for(lambda: lines(copy) == lines(own), "the host's copy of the enclave's log to equal the enclave's own")
    expect(any("enclave half ready" in line and "qproxy::enclave" in line for line in lines(copy)),
           "the enclave half's start-up record, made before the host half started, is not on the host")

    expect(host.stop() == 0, "the host half did not exit 0 on SIGTERM")
    other = box.config(toml_config(inbound=[(5050, 5050, 9995), (6060, 6060, 9996)],
                                   outbound=[("localhost", 7778, 8443)]) + log_location, name="other.toml")
    box.host_half(other, name="host half, other config")
    mismatches = [
        "the host half forwards tcp port 6060 to vsock port 9996, but the enclave half has no inbound entry for"
        " vsock port 9996",
        "the host half forwards vsock port 7778 to localhost:8443, but the enclave half has no outbound entry for"
        " vsock port 7778",
        "the enclave half forwards 127.0.0.1:8443 to vsock port 7777, but the host half has no outbound entry for"
        " vsock port 7777",
    ]

    def errors() -> list[str]:
        return [line.split("control: config mismatch: ", 1)[1] for line in lines(host_log)
                if " ERROR qproxy::host control: config mismatch: " in line]

    wait_for(lambda: len(errors()) >= len(mismatches), "the new host half to log the mismatches")
    expect(sorted(errors()) == sorted(mismatches), f"mismatches logged: {errors()}")
    expect(box.exchange(5050, b"still") == b"still", "the shared inbound entry stopped relaying after a mismatch")
    expect(guest.alive(), "the enclave half exited")


if __name__ == "__main__":
    main("control_link", check)

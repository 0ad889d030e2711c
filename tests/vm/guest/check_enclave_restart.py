#!/usr/bin/env python3
"""The enclave half killed and restarted while the host half runs: new connections work again.

The enclave half is killed with SIGKILL (a crash: no goodbye on the control
connection) and later with SIGTERM; each time a new one is started in the same
enclave namespace.  The host half is never touched: the same process serves
the new connections, inbound and outbound.
"""

import signal

from vmcheck import Box, Enclave, expect, main, recv_all, toml_config


def echo_upper(conn):
    conn.sendall(conn.recv(100).upper())


def round_trip(box, enclave, label):
    for path, port, side in (("inbound", 5050, None), ("outbound", 8443, enclave)):
        client = box.connect(port, side)
        client.sendall(f"{path} {label}".encode())
        answer = recv_all(client)
        expect(answer == f"{path} {label}".upper().encode(), f"{path} {label}: got {answer!r}")
        client.close()


def check(box: Box) -> None:
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)], outbound=[("127.0.0.1", 7777, 8443)]))
    box.server(8443, echo_upper)
    enclave = Enclave(box)
    host, guest = box.start_pair(config, enclave)
    box.server(5050, echo_upper, enclave)  # the enclave's service lives on; only qproxy restarts
    round_trip(box, enclave, "before")

    for number, how in enumerate((signal.SIGKILL, signal.SIGTERM), start=2):
        guest.send(how)
        guest.wait()
        host.wait_log(r"control: the enclave half \(.*\) disconnected", count=number - 1)
        guest = box.enclave_half(config, enclave)
        guest.wait_log(r"enclave half ready \(.*AF_VSOCK\)")
        host.wait_log(r"control: enclave half connected", count=number)
        round_trip(box, enclave, f"after {signal.Signals(how).name}")
    expect(host.alive(), "the host half exited")
    expect(len(host.text().split("host half ready")) == 2, "the host half restarted")


if __name__ == "__main__":
    main("enclave_restart", check)

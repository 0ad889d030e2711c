#!/usr/bin/env python3
"""Loopback down at enclave start: the enclave half, run as root, brings lo up itself.

A fresh network namespace is what an enclave starts with: lo down.  No one
runs 'ip link set lo up'; the enclave half must, then listen on 127.0.0.1.
"""

from vmcheck import Box, Enclave, expect, main, recv_all, toml_config


def check(box: Box) -> None:
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)], outbound=[("127.0.0.1", 7777, 8443)]))
    box.server(8443, lambda conn: conn.sendall(b"outside"))
    enclave = Enclave(box)
    expect(not enclave.lo_is_up(), "lo is already up in a fresh namespace: the check proves nothing")
    host, guest = box.start_pair(config, enclave)
    guest.wait_log(r"brought the loopback interface lo up")
    expect(enclave.lo_is_up(), "the enclave half said it brought lo up, but lo is down")
    app = box.connect(8443, enclave)  # the enclave half's listener on 127.0.0.1, reachable now
    expect(recv_all(app) == b"outside", "the outbound connection through the enclave's lo did not work")


if __name__ == "__main__":
    main("loopback_up", check)

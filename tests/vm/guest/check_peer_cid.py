#!/usr/bin/env python3
"""Peer checks: each half's vsock ports accept the other half's CID only, and relay nothing else.

Every peer in the guest is CID 1 (the loopback transport).  A host half told
that the enclave is CID 5 must refuse the enclave half on its control and
outbound ports; an enclave half told that its parent is CID 5 must refuse the
host half on its inbound port.  The clients see a reset, the services behind
never see a connection, and each refusal is logged.
"""

from vmcheck import Box, Enclave, expect, main, recv_all, toml_config

OUTSIDE_PORT = 8443


def refused(box: Box, port: int, enclave: Enclave | None, what: str) -> None:
    client = box.connect(port, enclave)
    try:
        client.sendall(b"hello?")
        data = recv_all(client)
    except ConnectionResetError:
        return
    raise AssertionError(f"{what}: got {data!r} and an orderly end, not a reset")


def check(box: Box) -> None:
    seen = []
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)], outbound=[("localhost", 7777, OUTSIDE_PORT)]))
    box.server(OUTSIDE_PORT, lambda conn: seen.append("outside"))
    enclave = Enclave(box)
    box.server(5050, lambda conn: seen.append("enclave service"), enclave)

    host = box.host_half(config, cid=5)  # the enclave half is CID 1, not 5
    host.wait_log(r"host half ready")
    guest = box.enclave_half(config, enclave)
    guest.wait_log(r"enclave half ready")
    host.wait_log(r"refused a vsock connection to port 6666 from CID 1: only CID 5 may connect")
    refused(box, OUTSIDE_PORT, enclave, "outbound through a host half expecting CID 5")
    expect("control: enclave half connected" not in host.text(), "the host half took a control connection from CID 1")
    expect(host.stop() == 0 and guest.stop() == 0, "a half did not exit 0 on SIGTERM")

    host = box.host_half(config, name="host half #2")
    host.wait_log(r"host half ready")
    guest = box.enclave_half(config, enclave, name="enclave half #2", parent_cid=5)  # the host half is CID 1
    guest.wait_log(r"enclave half ready")
    refused(box, 5050, None, "inbound through an enclave half expecting parent CID 5")
    guest.wait_log(r"refused a vsock connection to port 9995 from CID 1: only CID 5 may connect")
    expect(seen == [], f"a refused connection reached a service: {seen}")


if __name__ == "__main__":
    main("peer_cid", check)

#!/usr/bin/env python3
"""Loopback down at enclave start, and no right to bring it up: exit 1 with the promised message.

The enclave half runs as nobody (uid 65534) in a fresh namespace whose lo is
down; it cannot change lo, so it must refuse to start, saying what to do.
"""

from vmcheck import Box, Enclave, expect, main, toml_config

MESSAGE = "qproxy: error: the loopback interface lo is down and qproxy cannot bring it up"


def check(box: Box) -> None:
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)]))
    enclave = Enclave(box)
    expect(not enclave.lo_is_up(), "lo is already up in a fresh namespace: the check proves nothing")
    guest = box.enclave_half(config, enclave, uid=65534)
    status = guest.wait()
    output = guest.text()
    expect(status == 1, f"the unprivileged enclave half exited with {status}, not 1: {output.strip()[-300:]!r}")
    expect(MESSAGE in output, f"the message is not the promised one: {output.strip()[-300:]!r}")
    expect("run 'ip link set lo up' as root" in output, "the message does not say what to do")
    expect(not enclave.lo_is_up(), "lo came up anyway")


if __name__ == "__main__":
    main("loopback_denied", check)

#!/usr/bin/env python3
"""The control port: the host half logs the enclave half's arrival and departure.

Arrival and departure twice over, the second enclave half started before the
host half is even up (it keeps dialing until the host half appears), and the
enclave half's own view when the host half goes away.
"""

from vmcheck import Box, Enclave, expect, main, toml_config


def check(box: Box) -> None:
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)]))
    enclave = Enclave(box)
    host, guest = box.start_pair(config, enclave)
    host.wait_log(r"control: enclave half connected from vsock 1:\d+ \(qproxy [^)]+\)")
    guest.wait_log(r"control: connected to the host half")
    expect(guest.stop() == 0, "the enclave half did not exit 0 on SIGTERM")
    host.wait_log(r"control: the enclave half \(vsock 1:\d+\) disconnected")

    # The enclave half first, the host half later: the enclave half finds it.
    expect(host.stop() == 0, "the host half did not exit 0 on SIGTERM")
    guest = box.enclave_half(config, enclave, name="enclave half")
    guest.wait_log(r"enclave half ready")
    host = box.host_half(config, name="host half")
    host.wait_log(r"control: enclave half connected from vsock 1:\d+")
    guest.wait_log(r"control: connected to the host half")

    # The host half leaves: the enclave half notices and keeps running.
    expect(host.stop() == 0, "host half #2 did not exit 0 on SIGTERM")
    guest.wait_log(r"control: the host half went away")
    expect(guest.alive(), "the enclave half exited when the host half left")


if __name__ == "__main__":
    main("control", check)

#!/usr/bin/env python3
"""SIGTERM: both halves exit 0, idle or with a connection still open.

First a pair with nothing open; then a pair with an inbound connection open
mid-conversation, which they cut after their grace period (a reset to
the TCP peers); each must still exit 0.
"""

import signal

from vmcheck import Box, Enclave, expect, main, toml_config

GRACE = 5.0  # qproxy's grace period for open connections


def chatter(conn):
    """Echo until the end; the cut at the end of the grace period comes as a reset."""
    try:
        while True:
            data = conn.recv(1024)
            if not data:
                return
            conn.sendall(data)
    except ConnectionResetError:
        pass


def check(box: Box) -> None:
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)]))
    for round_number, keep_open in ((1, False), (2, True)):
        enclave = Enclave(box)
        host, guest = box.start_pair(config, enclave)
        box.server(5050, chatter, enclave)
        client = box.connect(5050)
        client.sendall(b"hello")
        expect(client.recv(5) == b"hello", "the connection does not work")
        if not keep_open:
            client.close()
            host.wait_log(r"conn 1 closed")
        host.send(signal.SIGTERM)
        guest.send(signal.SIGTERM)
        for half in (host, guest):
            status = half.wait(GRACE + 10)
            expect(status == 0, f"round {round_number}: the {half.name} exited with {status} after SIGTERM, not 0")
            half.wait_log(rf"{'host' if half is host else 'enclave'} half stopped")
        client.close()


if __name__ == "__main__":
    main("sigterm", check)

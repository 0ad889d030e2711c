#!/usr/bin/env python3
"""Upstream unreachable: the client's connection fails promptly (a reset), and both halves keep serving.

Three dead ends, each tried several times: an inbound entry with no service
behind its enclave port, an outbound entry to a port where nothing listens,
and an outbound entry to a name that does not resolve.  Some clients talk
first, some wait for the server to speak.  Afterwards the working entries of
the same two processes still carry traffic.
"""

import time

from vmcheck import Box, Enclave, expect, main, recv_all, toml_config

PROMPT = 5.0  # seconds a failure may take to reach the client
ATTEMPTS = 4


def fails_promptly(box, port, enclave, what, talk):
    started = time.monotonic()
    client = box.connect(port, enclave, timeout=PROMPT)
    try:
        if talk:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = recv_all(client, PROMPT)
    except ConnectionResetError:
        pass  # the promised outcome
    except OSError as error:
        raise AssertionError(f"{what}: {type(error).__name__} {error} instead of a reset") from None
    else:
        raise AssertionError(f"{what}: the client saw an orderly end (after {data[:40]!r}), not a reset")
    finally:
        client.close()
    elapsed = time.monotonic() - started
    expect(elapsed < PROMPT, f"{what}: the failure took {elapsed:.1f} s")


def hello(conn):
    conn.sendall(b"still here")


def check(box: Box) -> None:
    config = box.config(toml_config(
        inbound=[(5050, 5050, 9995), (5051, 5051, 9996)],
        outbound=[("127.0.0.1", 7777, 8440), ("nonexistent.invalid", 7778, 8441), ("127.0.0.1", 7779, 8443)],
    ))
    box.server(8443, hello)  # the outside world, on the working outbound entry only
    enclave = Enclave(box)
    host, guest = box.start_pair(config, enclave)
    box.server(5051, hello, enclave)  # nothing on 5050 in the enclave

    for attempt in range(ATTEMPTS):
        talk = attempt % 2 == 0
        fails_promptly(box, 5050, None, f"inbound to a dead enclave port (attempt {attempt + 1})", talk)
        fails_promptly(box, 8440, enclave, f"outbound to a closed port (attempt {attempt + 1})", talk)
        fails_promptly(box, 8441, enclave, f"outbound to an unresolvable name (attempt {attempt + 1})", talk)

    guest.wait_log(r"cannot reach tcp 127\.0\.0\.1:5050")
    host.wait_log(r"cannot reach tcp 127\.0\.0\.1:8440")
    host.wait_log(r"cannot reach tcp nonexistent\.invalid:8441: name resolution failed")
    for path, port, side in (("inbound", 5051, None), ("outbound", 8443, enclave)):
        client = box.connect(port, side)
        answer = recv_all(client)
        expect(answer == b"still here", f"after the failures, {path} got {answer!r}")
    expect(host.alive() and guest.alive(), "a half exited")


if __name__ == "__main__":
    main("unreachable", check)

#!/usr/bin/env python3
"""A far side that shuts its sending side before a byte is a half-close; one that closes is a refusal.

half-close first: the service in the enclave (inbound) or the upstream outside
(outbound) does shutdown(SHUT_WR) at once, before sending anything, and then
reads the upload to its end.  The client, sending 1 MiB meanwhile, must read
EOF (not a reset), finish sending, and the far side must get the whole MiB,
checked by hash.  Over real vsock a peer's close() and its shutdown(SHUT_WR)
look the same to poll(), so this is what tells them apart.

close first: the far side close()s at once while the client keeps sending.
The client must see a reset (ConnectionResetError, or BrokenPipeError from a
send after one) within RESET_WITHIN seconds, and no byte; whether an EOF came
before the reset is noted.  Afterwards both halves still serve each path.
"""

import os
import queue
import re
import socket
import threading
import time

from vmcheck import Box, Enclave, Failed, expect, main, read_to_end, recv_all, sha, toml_config, DEADLINE

SIZE = 1024 * 1024
RESET_WITHIN = 5.0  # seconds, in the slow emulated VM
HALF_FIRST, CLOSE_FIRST = 5050, 5051  # inbound: host and enclave ports, one service each
OUT_HALF_FIRST, OUT_CLOSE_FIRST = 8443, 8444  # outbound: the app's ports in the enclave, one upstream each


class FarSide:
    """The service (or upstream) of one path: what each half-close-first connection received."""

    def __init__(self):
        self.received = queue.Queue()  # (byte count, sha256) per half-close-first connection

    def half_close_first(self, conn):
        conn.shutdown(socket.SHUT_WR)  # before sending anything
        data = recv_all(conn)
        self.received.put((len(data), sha(data)))

    def close_first(self, conn):
        conn.close()


def half_close_first(box: Box, port: int, side, path: str, far: FarSide) -> None:
    client = box.connect(port, side)
    data = os.urandom(SIZE)
    upload = {}

    def send():
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            upload["done"] = True
        except OSError as error:
            upload["error"] = error
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got, how = read_to_end(client)
    expect((got, how) == (b"", "EOF"),
           f"{path}: the far side shut its sending side first; the client read {len(got)} bytes and then {how},"
           " not EOF")
    sender.join(DEADLINE)
    expect(not sender.is_alive(), f"{path}: after the EOF, the client's 1 MiB upload did not finish in {DEADLINE:.0f} s")
    expect("done" in upload, f"{path}: after the EOF, the client's upload failed: {upload.get('error')!r}")
    try:
        count, digest = far.received.get(timeout=DEADLINE)
    except queue.Empty:
        raise Failed(f"{path}: the far side never saw the end of the upload") from None
    expect((count, digest) == (SIZE, sha(data)),
           f"{path}: the far side received {count} bytes" + (", other bytes than were sent" if count == SIZE else
                                                             f" of {SIZE}"))
    client.close()


def close_first(box: Box, port: int, side, path: str) -> None:
    """The client sends until something ends it; return a note of what it saw and when."""
    client = box.connect(port, side)
    started = time.monotonic()
    seen = {}  # event -> seconds after connect: "eof", "bytes", "reset"
    chunk = os.urandom(64 * 1024)

    def mark(event, detail=None):
        seen.setdefault(event, (time.monotonic() - started, detail))

    def send():
        try:
            while time.monotonic() < started + DEADLINE and "reset" not in seen:
                client.sendall(chunk)
        except (ConnectionResetError, BrokenPipeError) as error:
            mark("reset", f"{type(error).__name__} on send")
        except OSError as error:
            mark("send failed", repr(error))
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while True:
            got = client.recv(65536)
            if not got:
                mark("eof")
                break
            mark("bytes", len(got))
    except ConnectionResetError:
        mark("reset", "ConnectionResetError on recv")
    except OSError as error:
        mark("recv failed", repr(error))
    sender.join(DEADLINE + 5)
    client.close()
    events = ", ".join(f"{event} at {when:.2f} s" + (f" ({detail})" if detail else "")
                       for event, (when, detail) in sorted(seen.items(), key=lambda item: item[1][0]))
    expect("bytes" not in seen, f"{path}: the far side closed without a byte, yet the client read some: {events}")
    expect("reset" in seen, f"{path}: the far side closed at once while the client sent; the client saw no reset"
                            f" within {DEADLINE:.0f} s: {events or 'nothing'}")
    expect(seen["reset"][0] <= RESET_WITHIN,
           f"{path}: the client was reset only {seen['reset'][0]:.1f} s after connecting (> {RESET_WITHIN:.0f} s): "
           f"{events}")
    box.note(f"{path}, the far side closes at once: the client saw {events}")


def still_serves(box: Box, enclave: Enclave, inside: FarSide, outside: FarSide) -> None:
    half_close_first(box, HALF_FIRST, None, "inbound, again afterwards", inside)
    half_close_first(box, OUT_HALF_FIRST, enclave, "outbound, again afterwards", outside)


def check(box: Box) -> None:
    config = box.config(toml_config(
        inbound=[(HALF_FIRST, HALF_FIRST, 9995), (CLOSE_FIRST, CLOSE_FIRST, 9996)],
        outbound=[("127.0.0.1", 7777, OUT_HALF_FIRST), ("127.0.0.1", 7778, OUT_CLOSE_FIRST)],
    ))
    inside, outside = FarSide(), FarSide()
    box.server(OUT_HALF_FIRST, outside.half_close_first)
    box.server(OUT_CLOSE_FIRST, outside.close_first)
    enclave = Enclave(box)
    box.server(HALF_FIRST, inside.half_close_first, enclave)
    box.server(CLOSE_FIRST, inside.close_first, enclave)
    host, guest = box.start_pair(config, enclave)

    half_close_first(box, HALF_FIRST, None, "inbound, the service half-closes first", inside)
    half_close_first(box, OUT_HALF_FIRST, enclave, "outbound, the upstream half-closes first", outside)
    for half in (host, guest):
        half.wait_log(rf"qproxy::{half.role} conn \d+ closed: ", count=2)
    close_first(box, CLOSE_FIRST, None, "inbound")
    close_first(box, OUT_CLOSE_FIRST, enclave, "outbound")
    expect(host.alive() and guest.alive(), "a half exited")
    still_serves(box, enclave, inside, outside)
    for half in (host, guest):
        half.wait_log(rf"qproxy::{half.role} conn \d+ closed: ", count=4)
        ends = re.findall(rf"qproxy::{half.role} conn (\d+ (?:closed|reset \([^)]*\)|refused by [^(]*?\([^)]*\))):",
                          half.text())
        box.note(f"{half.name} logged: conn " + "; conn ".join(ends))


if __name__ == "__main__":
    main("half_close_first", check)

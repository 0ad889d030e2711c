#!/usr/bin/env python3
"""A half killed (SIGKILL) in the middle of a transfer over real vsock: the far end sees the end, the other half lives on.

Inbound: a service in the enclave streams to a client of the host half; once
the bytes flow, the enclave half is killed.  The client sees a reset, not an
orderly EOF that would pass a cut stream for a whole one: the dead process's
vsock socket closed while the host half's direction towards it (the client's
side, which never ended) was still open, and a zero-length send tells the host
half so.  The host half stays up, logs the control disconnect, gets its
descriptors back once the client has gone, and a new enclave half serves the
next connections.

Outbound: a server outside streams to an app in the enclave; the host half is
killed.  The app sees a reset as well; the enclave half stays up, logs that the
host half went away, gets its descriptors back, reconnects its control
connection when a new host half starts, and outbound works again.
"""

import signal

from vmcheck import Box, expect, main, read_to_end, round_trip, start_both_paths

FLOWING = 256 * 1024  # bytes the client reads before the kill: the transfer is under way
CHUNK = bytes(64 * 1024)


def service(conn):
    """b"stream": send until the reader goes away; anything else: answer it upper-cased."""
    request = conn.recv(100)
    if request != b"stream":
        conn.sendall(request.upper())
        return
    try:
        while True:
            conn.sendall(CHUNK)
    except OSError:
        pass  # the killed half's socket went away under us: what this check does


def killed_mid_stream(box, port, side, victim, what) -> str:
    """Start a stream through port, SIGKILL the victim while it flows; how the client saw it end."""
    client = box.connect(port, side)
    client.sendall(b"stream")
    before = 0
    while before < FLOWING:
        chunk = client.recv(256 * 1024)
        expect(chunk, f"{what}: the stream ended after {before} bytes, before the kill")
        before += len(chunk)
    victim.send(signal.SIGKILL)
    victim.wait()
    after, how = read_to_end(client)
    client.close()
    box.note(f"{what}: the client read {before} bytes, the kill, {len(after)} more, then {how}")
    return how


def ended_in_log(half, vsock_port, count) -> str:
    """The half's log line for the end of the count-th connection it relayed to vsock 1:vsock_port."""
    pattern = rf"qproxy::{half.role} (conn \d+ [^\n]*-> vsock 1:{vsock_port}, [^\n]*)"
    return half.wait_log(pattern, count)[count - 1].group(1)


def check(box: Box) -> None:
    config, enclave, host, guest = start_both_paths(box, service)
    round_trip(box, enclave, "before")
    host.wait_log(r"qproxy::host conn \d+ closed", count=2)  # the round trip's sockets are closed: a settled baseline
    host_fds = len(host.fds())

    # The enclave half dies mid-stream; the host half carries on.
    how = killed_mid_stream(box, 5050, None, guest, "inbound, enclave half killed")
    expect(how == "reset", f"inbound: the client saw {how} when the enclave half was killed, not a reset")
    host.wait_log(r"control: the enclave half \(vsock 1:\d+\) disconnected")
    box.note(f"host half: {ended_in_log(host, 9995, 2)}")
    guest = box.enclave_half(config, enclave)
    host.wait_log(r"control: enclave half connected", count=2)
    round_trip(box, enclave, "after the enclave half was killed")
    host.wait_fds(host_fds)  # the dead connection's and the old control connection's are closed
    expect(host.alive(), "the host half exited")

    # The host half dies mid-stream; the enclave half carries on and finds the next one.
    guest.wait_log(r"control: connected to the host half")
    guest.wait_log(r"qproxy::enclave conn \d+ closed", count=2)
    guest_fds = len(guest.fds())
    how = killed_mid_stream(box, 8443, enclave, host, "outbound, host half killed")
    host = box.host_half(config)  # at once: the enclave half's redials back off, up to 5 s apart
    expect(how == "reset", f"outbound: the app saw {how} when the host half was killed, not a reset")
    guest.wait_log(r"control: the host half went away")
    box.note(f"enclave half: {ended_in_log(guest, 7777, 2)}")
    host.wait_log(r"control: enclave half connected")  # the only enclave half there is: it dialed again
    expect(guest.alive(), "the enclave half exited when the host half was killed")
    round_trip(box, enclave, "after the host half was killed")
    guest.wait_fds(guest_fds)  # the dead connection's and the old control connection's are closed, a new one open
    expect(len(guest.text().split("enclave half ready")) == 2, "the enclave half restarted")


if __name__ == "__main__":
    main("half_dies", check)

#!/usr/bin/env python3
"""Names: two upstreams on one port, each at an enclave address of its own, and the hosts file that names them.

Outside, two servers listen on port 8443, at 127.0.0.2 and 127.0.0.3, each
answering with its name; the host half resolves payments.example and
ledger.example to them through a hosts file of its own (bind-mounted on
/etc/hosts in a mount namespace of its own: the guest's stays untouched).
The enclave half listens for payments.example at its "auto" address (the
CRC-32 rule; check-config must name it too) and for ledger.example at
127.0.0.9, and runs with --hosts-file /etc/hosts in a mount namespace of its
own, whose /etc/hosts is a file of the check's with two lines of the image's:
the half must keep both and add exactly one line per name between its marker
lines.  An app in the enclave's namespaces (network and mount: it resolves
with getaddrinfo, through that /etc/hosts) dials each name on port 8443 and
must reach that name's server.
"""

import binascii
import socket
import subprocess
import sys
import threading

from vmcheck import DEADLINE, LOCAL_CID, Box, Enclave, expect, half_command, main, recv_all, wait_for

PORT = 8443
OUTSIDE = {"payments.example": "127.0.0.2", "ledger.example": "127.0.0.3"}  # as the host half resolves them
ENTRIES = (("payments.example", 7001, "auto"), ("ledger.example", 7002, "127.0.0.9"))  # name, vsock port, address
CONFIG = "".join(f'[[outbound_connections]]\nhostname = "{name}"\nvsock_port = {vsock}\ntcp_port = {PORT}\n'
                 f'enclave_address = "{address}"\n\n' for name, vsock, address in ENTRIES)
KEPT = ["127.0.0.1 localhost", "10.1.2.3 kept.example  # the image's own"]
APP = """import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), 20)
sock.sendall(b"hello"); sock.shutdown(socket.SHUT_WR)
print(sock.getpeername()[0], b"".join(iter(lambda: sock.recv(4096), b"")).decode())"""


def auto(name: str) -> str:
    """enclave_address = "auto": 127.X.Y.Z, each from 1 to 254, from the CRC-32 of the name."""
    index = binascii.crc32(name.encode()) % 254 ** 3
    return f"127.{1 + index // 254 ** 2}.{1 + index // 254 % 254}.{1 + index % 254}"


def private_hosts(hosts, argv: list[str]) -> list[str]:
    """argv in a mount namespace of its own, whose /etc/hosts is the file hosts (bind-mounted)."""
    return ["unshare", "-m", "sh", "-c", 'mount -o bind "$0" /etc/hosts && exec "$@"', str(hosts), *argv]


def outside(box: Box, name: str, address: str) -> None:
    listener = box.keep(socket.socket())
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, PORT))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the check is over
            with conn:
                conn.sendall(f"{name} at {address} got ".encode() + recv_all(conn))
    threading.Thread(target=serve, daemon=True).start()


def check(box: Box) -> None:
    inside = {"payments.example": auto("payments.example"), "ledger.example": "127.0.0.9"}
    config = box.config(CONFIG)
    summary = subprocess.run(half_command("check-config", str(config)), capture_output=True, text=True,
                             timeout=DEADLINE).stdout
    expect(any("payments.example" in line and inside["payments.example"] in line for line in summary.splitlines()),
           f"check-config does not name payments.example's auto address {inside['payments.example']}:\n{summary}")
    for name, address in OUTSIDE.items():
        outside(box, name, address)
    host_hosts = box.config("".join(f"{address} {name}\n" for name, address in OUTSIDE.items()), "host-hosts")
    enclave_hosts = box.config("\n".join(KEPT) + "\n", "enclave-hosts")
    enclave = Enclave(box)

    host = box.spawn("host half", private_hosts(host_hosts, half_command("host", "--config", str(config),
                                                                          str(LOCAL_CID))))
    guest = box.spawn("enclave half", private_hosts(enclave_hosts, enclave.command(half_command(
        "enclave", "--config", str(config), "--hosts-file", "/etc/hosts", "--parent-cid", str(LOCAL_CID)))))
    host.role, guest.role = "host", "enclave"
    box.halves += [host, guest]
    host.wait_log(r"control: enclave half connected")
    wait_for(lambda: "# qproxy enclave half: end" in enclave_hosts.read_text(), "the enclave half's hosts file")

    lines = enclave_hosts.read_text().splitlines()
    expect(lines[:2] == KEPT, f"the hosts file's own lines are gone: {lines}")
    expect(len(lines) == 6 and lines[2].startswith("# qproxy enclave half: begin")
           and lines[5].startswith("# qproxy enclave half: end"), f"no marker lines around two names: {lines}")
    expect(sorted(lines[3:5]) == sorted(f"{address} {name}" for name, address in inside.items()),
           f"the hosts file names {lines[3:5]}, expected {inside}")

    for name, address in inside.items():
        app = subprocess.run(["nsenter", "-t", str(guest.pid), "-m", "-n", sys.executable, "-c", APP, name,
                              str(PORT)], capture_output=True, text=True, timeout=DEADLINE)
        wanted = f"{address} {name} at {OUTSIDE[name]} got hello"
        expect(app.stdout.strip() == wanted, f"an app dialing {name}:{PORT} in the enclave got {app.stdout.strip()!r}"
                                             f" ({app.stderr.strip()[-300:]!r}), expected {wanted!r}")


if __name__ == "__main__":
    main("names", check)

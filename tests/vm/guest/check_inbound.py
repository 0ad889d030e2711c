#!/usr/bin/env python3
"""Inbound, the vendor's walk-through: a client on the host port gets "Hello world!" from the enclave.

The vendor's example exactly: host_port 5050, enclave_port 5050, vsock_port
9995; in the enclave, ``echo -e "HTTP/1.1 200 OK ... Hello world!" | nc -l``
on port 5050; on the parent, the equivalent of ``curl localhost:5050``.
"""

from vmcheck import Box, Enclave, expect, main, recv_all, toml_config, wait_for

RESPONSE = r"HTTP/1.1 200 OK\nContent-Type: text/plain\n\nHello world!"


def check(box: Box) -> None:
    config = box.config(toml_config(inbound=[(5050, 5050, 9995)]))
    enclave = Enclave(box)
    host, guest = box.start_pair(config, enclave)
    service = box.spawn("nc service", enclave.command(["sh", "-c", f'echo -e "{RESPONSE}" | nc -l -p 5050']))
    wait_for(lambda: enclave.listening(5050), "nc to listen on port 5050 in the enclave")

    client = box.connect(5050)  # the parent's localhost:5050: the host half
    client.sendall(b"GET / HTTP/1.1\r\nHost: localhost:5050\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
    answer = recv_all(client).decode(errors="replace")
    expect("Hello world!" in answer, f"the client got {answer!r}, not 'Hello world!'")
    expect(answer.startswith("HTTP/1.1 200 OK"), f"the reply does not start with the status line: {answer!r}")

    client.close()  # as curl does once it has the reply; nc then ends too
    service.wait()

    # Both ends saw the connection, and it came over vsock from CID 1.
    host.wait_log(r"conn 1 opened: tcp 127\.0\.0\.1:\d+ -> tcp 0\.0\.0\.0:5050 -> vsock 1:9995")
    guest.wait_log(r"conn 1 opened: vsock 1:\d+ -> vsock :9995 -> tcp 127\.0\.0\.1:5050")
    host.wait_log(r"conn 1 closed")


if __name__ == "__main__":
    main("inbound", check)

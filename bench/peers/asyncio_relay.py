#!/usr/bin/env python3
"""An asyncio Protocol relay: one hop of a benchmark chain, the Python peer qproxy is measured against.

    python3 asyncio_relay.py tcp:127.0.0.1:8000 unix:/tmp/s     # the host hop
    python3 asyncio_relay.py unix:/tmp/s tcp:127.0.0.1:9000     # the enclave hop
    python3 asyncio_relay.py --uvloop ...                       # the same on uvloop's event loop

Every accepted connection gets one to the connect address; bytes go across as
they come.  It is built to be as fast as asyncio allows: no streams, no task of
its own per connection beyond the dial, no copies of its own.

* data_received() hands the bytes straight to the other transport's write(),
  which sends them at once when the socket has room;
* flow control is the transports' own: when one transport's write buffer
  passes its high-water mark it calls pause_writing(), and the relay stops
  reading from the other side until resume_writing();
* half-close goes across: eof_received() becomes write_eof() on the other side,
  and the pair is closed once both directions have ended;
* a reset (connection_lost with an error) aborts the other side, a clean close
  closes it after its buffered bytes are out;
* TCP_NODELAY on TCP sockets (asyncio and uvloop set it too; this makes sure).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

BACKLOG = 1024  # as qproxy's listeners and the benchmark's socat and nginx


class Half(asyncio.Protocol):
    """One side of a relayed pair; `other` is the opposite side, None until both are connected."""

    def __init__(self, other: Half | None = None):
        self.other = other
        self.transport: asyncio.Transport | None = None
        self.ended = False  # EOF read from this side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if not self.other.transport.is_closing():
            self.other.transport.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        if self.other.ended:
            self.transport.close()
            self.other.transport.close()
        elif not self.other.transport.is_closing():
            self.other.transport.write_eof()
        return True  # keep the transport: the other direction may still be carrying bytes

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is None or self.other.transport.is_closing():
            return
        if exc is None:
            self.other.transport.close()  # after what it still has to send
        else:
            self.other.transport.abort()

    # The other side reads no faster than this side can send.
    def pause_writing(self) -> None:
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.other.transport.resume_reading()


class Accepted(Half):
    """The side a client connected to: it dials the connect address and stops reading until that is up
    (uvloop may still hand over a first read: it is kept, like an early EOF, and sent once connected)."""

    def __init__(self, dial):
        super().__init__()
        self.dial = dial
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        try:
            _, self.other = await self.dial(lambda: Half(self))
        except OSError:
            self.transport.abort()  # as if the far side had refused the client itself
            return
        if self.transport.is_closing():  # the client went while the dial was in flight
            self.other.transport.close()
            return
        for data in self.early:
            self.other.transport.write(data)
        if self.ended:
            self.other.transport.write_eof()
        else:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.other is None:
            self.early.append(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.other is None:
            self.ended = True
            return True
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None:  # else the dial, once done, finds this side closed
            super().connection_lost(exc)


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_address(text: str) -> tuple[str, tuple[str, int] | str]:
    """tcp:HOST:PORT or unix:PATH."""
    kind, _, rest = text.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return kind, (host, int(port))
    if kind == "unix":
        return kind, rest
    raise SystemExit(f"asyncio_relay: {text!r}: expected tcp:HOST:PORT or unix:PATH")


def dialer(loop: asyncio.AbstractEventLoop, connect: str):
    """A function that connects a new protocol (from a factory) to the connect address."""
    kind, address = parse_address(connect)
    if kind == "tcp":
        return lambda factory: loop.create_connection(factory, *address)
    return lambda factory: loop.create_unix_connection(factory, address)


async def relay(listen: str, connect: str) -> None:
    loop = asyncio.get_running_loop()
    if hasattr(asyncio, "eager_task_factory"):  # 3.12+: the dial runs at once, without a trip round the loop
        loop.set_task_factory(asyncio.eager_task_factory)
    dial = dialer(loop, connect)
    kind, address = parse_address(listen)
    if kind == "tcp":
        server = await loop.create_server(lambda: Accepted(dial), *address, backlog=BACKLOG)
    else:
        server = await loop.create_unix_server(lambda: Accepted(dial), address, backlog=BACKLOG)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listen", help="tcp:HOST:PORT or unix:PATH")
    parser.add_argument("connect", help="tcp:HOST:PORT or unix:PATH")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(relay(args.listen, args.connect))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())

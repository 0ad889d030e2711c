#!/usr/bin/env python3
"""qproxy: carry TCP across vsock between a confidential-computing enclave and its parent VM.

An enclave (Huawei QingTian, AWS Nitro) has no network: its only link to the
world is vsock to the parent VM.  qproxy has two halves in this one file,
``qproxy.py host CID`` on the parent and ``qproxy.py enclave`` inside the
enclave, and together they carry TCP streams both ways:

    inbound   client --TCP--> host 0.0.0.0:host_port --[host]--> vsock CID:vsock_port
              --[enclave]--> TCP 127.0.0.1:enclave_port --> the service in the enclave

    outbound  app --TCP--> 127.0.0.1:tcp_port --[enclave]--> vsock parent:vsock_port   (or enclave_address:enclave_port)
              --[host]--> TCP hostname:tcp_port (resolved on the host, per connection)

    egress    app --HTTP CONNECT or SOCKS5--> 127.0.0.1:proxy_port --[enclave]--> vsock parent:vsock_port
              --[host]--> TCP the destination asked for, if both halves' rules allow it

    control   [enclave] --vsock parent:control_port--> [host]

The configuration file and the command line are those of the vendor's Rust
tool, unchanged; what this file adds is optional and changes nothing when absent.

Design, in the order the data meets it:

* Configuration.  One table (``TABLES``) names every field of the TOML file
  with its type, range, default and description.  The validator, the JSON
  Schema in config_schema.py and the README's reference all come from it.
  Every error names the file, the entry and the field; all errors are reported
  at once.
* Transport.  A vsock port is AF_VSOCK in the kernel, or, with
  QPROXY_VSOCK_EMULATION=DIR set, a Unix stream socket named after the port
  inside DIR.  Only the socket factory (``Vsock``) differs; everything above
  it is the same code on both transports.
* Data path.  Raw bytes, no framing, so either half also works against a
  plain relay such as socat.  The accept loop (the main thread) accepts on
  every listener without blocking.  It is this file's own, some forty lines,
  not socketserver's: a server there owns one listener and decides alone
  when to accept, where a half must turn between hundreds of listeners, hold
  back the ones at a limit while the others go on, and keep connections
  waiting for room in arrival order across them; socketserver's hooks would
  all be overridden and its cleanup bypassed.  The accept loop also begins
  dialing the far side of each admitted connection whose target has no name
  to resolve (a vsock port, an IP literal), without blocking; a hostname is
  resolved and dialed by a worker thread, as DNS may take its time.  Either
  way the connection then goes to the reactor, one thread per process, which
  sees a connect through and moves the bytes of every established connection
  with non-blocking sockets and epoll.  A read goes into one scratch buffer
  and out at once; a direction holds a buffer only for what its destination
  did not take, and all such buffers together stay within a budget; beyond
  it bytes wait in the sockets, so memory does not grow with connections,
  backpressure comes from the sockets, and an idle connection costs two
  descriptors and no thread.  A direction whose reads bring bulk moves its
  bytes with splice(2) through a pipe (Python 3.10 and newer), so that they
  never enter Python; a kernel that refuses has it copy instead.  Half-close
  is honoured: EOF one way becomes shutdown(SHUT_WR) on the other socket
  while the other way keeps flowing.  Vsock has no reset a peer can see, so
  a far side that closes without sending a byte while the client is still
  talking (the other half could not reach its target) is passed on to a TCP
  client as a reset; one that only half-closes is not.
* The client's address and the upstreams' names.  An inbound entry may ask
  for a PROXY protocol header (v1 or v2): the host half, which alone knows
  the client, writes it ahead of the client's bytes, and may first read one
  from a load balancer in front of it.  An outbound entry may listen on an
  address of its own in 127.0.0.0/8, so that upstreams keep their real ports,
  and the enclave half may write each entry's hostname into a hosts file, so
  that apps dial the real names.
* Egress.  An optional proxy port in the enclave takes HTTP CONNECT and
  SOCKS5 requests.  Each half judges the destination by its own rules, deny
  first, then allow, nothing else; the host half, which resolves, judges each
  address again, and dials one in a special-purpose range (loopback, private,
  link-local) only when an address rule within those ranges allows it.  One
  line each way on the egress vsock port asks and answers before the bytes
  flow; every other data connection stays raw bytes.
* Limits.  ``-t N`` bounds the connections a half relays at once in each
  direction: inbound, outbound and egress never share a budget, so a request that
  calls out cannot wait for a slot only its own end would free.  A
  connection that arrives at a limit (its direction's, or its listener's
  ``[limits] connections_per_listener``) is accepted and waits in the half,
  in arrival order, for at most ``queue_timeout``; then its client is reset.
  A half accepts only what it has descriptors to dial for.  Dialing has a
  timeout; the reactor can cut connections that stay idle.
* Control.  The enclave half dials the host half's control port and says
  hello with a versioned, line-delimited JSON message carrying its entries;
  the host half logs every way they differ from its own.  Then both send
  heartbeats and log when the other falls silent, and the enclave half sends
  its log records, which the host half writes next to its own log: an
  operator with only the parent VM reads both.  The data path never needs it.
* Logging.  No thread that accepts or relays waits on a log write: records
  go through a bounded queue to one writer thread, and are dropped and
  counted when it cannot keep up.  Files rotate at a size; SIGHUP reopens
  them for logrotate, and on the host half reloads the entries.
* Lifecycle.  SIGTERM or SIGINT closes the listeners, lets every connection
  accepted so far finish for a grace period, then cuts what is left and exits
  0; every cut resets the TCP peers it can.  Exit 1 means the process could
  not start, exit 2 a usage or configuration error; either comes with one line
  on stderr that says what to do.  A thread the half cannot work without that
  fails makes it log CRITICAL, reset its connections and exit 3, so that a
  supervisor restarts it: it never goes on accepting what it cannot relay.

The sections below come in the order a connection meets them: bounds and
helpers, configuration, logging, transport, listeners and admission, routes
and setup, egress requests, the data path, the control link and log forwarding, a half's
lifecycle, the command line, the demo.  SECURITY.md names the functions each
guarantee rests on.
"""

from __future__ import annotations

import _thread
import argparse
import collections
import contextlib
import errno
import fcntl
import io
import ipaddress
import itertools
import json
import logging
import logging.handlers
import math
import mmap
import os
import queue
import re
import select
import selectors
import signal
import socket
import socketserver
import stat
import struct
import sys
import termios
import threading
import time
import typing
from collections.abc import Callable, Iterator, Mapping

if typing.TYPE_CHECKING:
    import subprocess  # the demo's, which imports it where it runs: the halves never do

# A control message, as JSON decodes it; a socket's address: (host, port, ...) or (cid, port), a Unix path.
Message = dict[str, typing.Any]
Address = typing.Union[tuple[typing.Any, ...], str, bytes]
# One answer of socket.getaddrinfo: family, type, protocol, canonical name, address.
AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[typing.Any, ...]]

try:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python < 3.11 reads TOML with tomli, the same parser
        import tomli as tomllib
except ModuleNotFoundError:  # below 3.11 without tomli: a command that reads a file says what to install
    tomllib = None  # type: ignore[assignment]

__version__ = "0.1.0"

EXIT_OK = 0
EXIT_CANNOT_START = 1
EXIT_USAGE = 2
EXIT_FAILED = 3  # a running half stopped on an internal error, logged at CRITICAL: a supervisor restarts it

DEFAULT_PARENT_CID = 3
DEFAULT_CONTROL_PORT = 6666
# SIGQUIT stops as gracefully as SIGTERM, as nginx's does; the user signals, which would kill, do nothing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

# ---------------------------------------------------------------------------
# Bounds: every limit and timing of a half, in one place
# ---------------------------------------------------------------------------
# README's Limits table gives each of them, with the [limits] keys of the
# configuration; tests/test_readme.py holds the two equal.
#
# Worst-case memory of a half, beyond the interpreter and this file (about
# 24 MB resident on CPython 3.11): [limits] buffer_memory (32 MiB by default)
# plus SPARE_BUFFERS + 1 buffers; about 4 KB of objects per connection open or
# waiting for room (-t each way, WAITING_PER_LISTENER per listener); up to
# LOG_QUEUE records waiting for a stalled log writer, about 0.6 KB each, or
# 4.7 KB each for the enclave's records on the host half (up to ~47 MB);
# twice LOG_BACKLOG records of LOG_MESSAGE_MAX characters in the enclave half
# (those waiting, and those sent but not confirmed yet); and
# two CONTROL_MAX_MESSAGE a control connection (a message's unfinished tail and one
# read).  Socket buffers are the kernel's.

# Connections
DEFAULT_MAX_CONNECTIONS = 1024  # per direction of a half (-t): inbound and outbound each
LISTEN_BACKLOG = 1024  # connections the kernel holds for a listener before the half accepts them
WAITING_PER_LISTENER = LISTEN_BACKLOG  # accepted connections one listener holds while they wait for room
ACCEPTS_PER_TURN = 64  # connections one listener accepts before the accept loop turns to the others
DESCRIPTOR_RESERVE = 16  # descriptors kept free of connections: for the control link, DNS, the log
SHORTAGE_RETRY = 1.0  # seconds after which a half that ran out of descriptors or threads tries again
SETUP_THREAD_IDLE = 5.0  # seconds a setup thread without work lives on, so a burst leaves no threads behind

# Memory
BUFFER_SIZE = 256 * 1024  # one read's worth of bytes, held only while its destination lags
SPARE_BUFFERS = 4  # freed buffers kept for reuse; the rest go back to the system
SPLICE_FROM = 64 * 1024  # bytes of one read from which a flow splices (Python 3.10+): bulk skips Python's copies
SPLICE_PIPES = 64  # pipes a half holds at most, two descriptors each; one holding bytes counts as a buffer
CONFIG_MAX_SIZE = 1024 * 1024  # bytes; a bigger file is not a configuration (/dev/zero, a log)

# Time
GRACE_PERIOD = 5.0  # seconds the connections accepted before SIGTERM may finish
CUT_WAIT = 1.0  # seconds a stop waits for the connections it cut to be closed
IDLE_SWEEP = (0.05, 1.0)  # seconds between looks for idle connections: a quarter of idle_timeout, within these

# Logging
LOG_QUEUE = 10_000  # records waiting for the log writer; more are dropped and counted
LOG_DRAIN = 1.0  # seconds a stopping half gives the log writer to write what waits
ABORT_LOG_DRAIN = 0.25  # the same when a second stop signal cuts the stop short
LOG_DRAIN_POLL = 0.01  # seconds between a stopping half's looks at whether its log is written
# Seconds records gather before the log writer writes them, or the enclave half's link sends them:
# a thread woken for each record would take the GIL from the reactor a few times a connection.
LOG_LINGER = 0.05
LOG_ERROR_REPORT = 60.0  # seconds between the lines on stderr that say a log cannot be written
WARNING_INTERVAL = 10.0  # seconds between two warnings of one recurring problem; the ones between are counted

# Egress: what a request on the proxy port, and the header between the halves, may cost
EGRESS_REQUEST_MAX = 8192  # bytes of a client's HTTP CONNECT request header, or of its SOCKS5 messages
EGRESS_REQUEST_TIMEOUT = 10.0  # seconds a client has for its whole request, however slowly its bytes come
EGRESS_HEADER_MAX = 512  # bytes of one line between the halves: a 253-character name, a port, an answer
EGRESS_ANSWER_TIMEOUT = 120.0  # seconds the enclave half waits for the host half's answer: resolving and dialing
EGRESS_REASON_SHOWN = 200  # characters of the host half's reason that reach the client

# PROXY protocol: what a load balancer's header may cost the host half (accept_proxy_protocol)
PROXY_HEADER_MAX = 1024  # bytes of a v2 header with its TLVs; a v1 header is 107 at most, by its spec
PROXY_HEADER_TIMEOUT = 10.0  # seconds for the whole header, however slowly its bytes come

# The enclave half's hosts file (--hosts-file)
HOSTS_LOCK_TIMEOUT = 10.0  # seconds a start waits for another writer's lock on the file, then gives up
HOSTS_LOCK_POLL = 0.05  # seconds between its tries meanwhile

# Control link
CONTROL_MAX_MESSAGE = 64 * 1024  # bytes of one message, and of one read
CONTROL_HELLO_TIMEOUT = 10.0  # seconds for a whole hello, however slowly its bytes come
CONTROL_MAX_UNGREETED = 8  # control connections that have not said hello yet, at once
CONTROL_HELLO_INTERVAL = 1.0  # seconds between the hellos the host half answers: a redial loop floods no log
CONTROL_MISMATCHES_LOGGED = 20  # config mismatches logged one by one for a hello; the rest are counted
CONTROL_VALUE_SHOWN = 100  # characters of a value from the other half that its log lines show
CONTROL_RETRY = (0.1, 5.0)  # seconds between the enclave half's dials of the host half: doubling, within these
HEARTBEAT_INTERVAL = 5.0  # seconds between the heartbeats a half sends; announced in its hello
HEARTBEAT_RANGE = (1.0, 3600.0)  # the other's announced interval, kept within this: no log-flooding flaps
SILENT_AFTER = 3  # heartbeat intervals without a word before the other half counts as silent
ACK_POLL = 0.05  # seconds between the host half's looks at whether the log records it took are written yet
LOG_BACKLOG = 1000  # enclave log records kept while no host half listens; older ones are dropped
STOP_RECORDS_WAIT = 1.0  # seconds a stopping enclave half gives the host half to take its last records
# Characters of one forwarded log message; the rest is cut.  JSON spends at most
# 12 bytes on a character (an escaped surrogate pair), so a record stays well
# within CONTROL_MAX_MESSAGE.
LOG_MESSAGE_MAX = 4096
# What a half takes from the other on a greeted link in a second; the rest waits in the socket,
# so the other half is held back, not this one's CPU spent (a whole log backlog in half a second).
CONTROL_MESSAGE_RATE = 2 * LOG_BACKLOG
CONTROL_BYTE_RATE = 1024 * 1024

log = logging.getLogger("qproxy")


class UsageError(Exception):
    """A bad command line or environment: exit 2."""


class ConfigError(Exception):
    """A configuration file that cannot be used: exit 2, listing every problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class StartError(Exception):
    """The process cannot start (port in use, no vsock, no permission): exit 1."""


# ---------------------------------------------------------------------------
# Helpers every part uses: why an error happened, text made safe for a log line, warnings
# that recur, waking a thread from its selector, and what systemd is told
# ---------------------------------------------------------------------------


def explain(error: BaseException) -> str:
    """Why an operation failed, in the fewest words that say it: "timed out", "Connection refused"."""
    if isinstance(error, socket.gaierror):
        return f"name resolution failed ({error.strerror})"
    if isinstance(error, socket.timeout):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def escaped(text: str) -> str:
    """text with the backslash and every character that is not printable escaped, as Python
    writes them ("\\n", "\\x1b", "\\u2028"): whatever the other half sends stays one line of
    this half's log and cannot pass for a line of its own."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        char if char.isprintable() and char != "\\" else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def quoted(value: object) -> str:
    """Something the other half said, short and fit for one line of this half's log."""
    return escaped(str(value)[:CONTROL_VALUE_SHOWN])


class Throttle:
    """At most one warning a while for a recurring problem, counting the ones held back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}
        self.held: collections.Counter[str] = collections.Counter()

    def due(self, key: str) -> int | None:
        """How many times key was held back since its last report, or None (and counted) while that is recent."""
        now = time.monotonic()
        with self.lock:
            if key in self.last and now - self.last[key] < WARNING_INTERVAL:
                self.held[key] += 1
                return None
            self.last[key] = now
            return self.held.pop(key, 0)

    def warning(self, key: str, message: str, *args: object) -> None:
        """A warning now and then; those held back in between are counted in the next."""
        held = self.due(key)
        if held is not None:
            log.warning(message + (f" ({held} more since the last report)" if held else ""), *args)

    def warning_or_info(self, key: str, message: str, *args: object) -> None:
        """For what happens to one connection: a warning now and then, an info line in between."""
        held = self.due(key)
        if held is None:
            log.info(message, *args)
        else:
            log.warning(message + (f" ({held} more since the last report)" if held else ""), *args)


throttled = Throttle()


class Wakeup:
    """Wakes a thread that waits in a selector, from any other thread: register ``reader``."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # wake-ups are pending already
            self.writer.send(b"\0")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.reader.recv(4096):
                pass


def ignore_from_now_on(*numbers: int) -> None:
    """For a process whose stop is done: what is left is the interpreter's own exit, which puts
    back the default handlers, and a late signal must not turn a clean stop into death by signal."""
    for number in numbers:
        signal.signal(number, signal.SIG_IGN)


def notify_systemd(state: str) -> None:
    """Tell systemd how the half is doing (a Type=notify unit sets NOTIFY_SOCKET); nothing otherwise."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError as error:
        throttled.warning("notify", "cannot tell systemd %s at NOTIFY_SOCKET=%s: %s", state, path, explain(error))


# ---------------------------------------------------------------------------
# Configuration: the field table, the loader, the validator
# ---------------------------------------------------------------------------

TCP_PORT_RANGE = (1, 65535)
# Port 0xFFFFFFFF is VMADDR_PORT_ANY, which no listener can be told to use.
VSOCK_PORT_RANGE = (1, 0xFFFFFFFE)
# CID 0 is the hypervisor and 0xFFFFFFFF is VMADDR_CID_ANY; 1 is local loopback.
CID_RANGE = (1, 0xFFFFFFFE)
COUNT_RANGE = (0, 1_000_000)  # connections; 0: no bound of this kind
SECONDS_RANGE = (0, 86400)  # a timeout; 0 turns it off
MEBIBYTES_RANGE = (1, 65536)
# The log levels, as the file and RUST_LOG name them, in the order of tracing's numbers (0 off ... 5 trace).
TRACE = 5
LEVEL_NUMBERS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
LOG_LEVELS = tuple(LEVEL_NUMBERS)
PROXY_VERSIONS = ("off", "v1", "v2")  # of the PROXY protocol header an inbound entry's connections begin with

# A DNS name: dot-separated labels of letters, digits, '_' and '-', neither
# first nor last character a hyphen, at most 63 characters a label.  The
# patterns avoid look-around so that editors' regex engines accept them too.
HOSTNAME_PATTERN = (
    r"^([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$"
)
# ...whose last label is not all digits ("10.1.2" is no name, and no address either), and which is
# not an IPv4 address in a form inet_aton takes and glibc resolves as one ("0x7f000001", "127.0.0.0x1").
NUMERIC_NAME_PATTERN = r"(^|\.)[0-9]+\.?$|^(0[xX][0-9A-Fa-f]*|[0-9]+)(\.(0[xX][0-9A-Fa-f]*|[0-9]+)){0,3}\.?$"
HOSTNAME_MAX_LENGTH = 253


# Records are typing.NamedTuple: tomllib imports typing anyway (Python 3.11 on);
# below it typing costs a half about 0.6 MB (measured on 3.9), dataclasses more.


class Field(typing.NamedTuple):
    """One key of a configuration table.

    kind: a key of KINDS.
    default: the value when the key is absent; with neither default nor
    same_as (the other key of the entry whose value it takes) the key is
    required.  extension: not in the vendor's format.
    """

    kind: str
    description: str
    default: object = None
    same_as: str | None = None
    extension: bool = False

    @property
    def required(self) -> bool:
        return self.default is None and self.same_as is None


class Table(typing.NamedTuple):
    """A top-level table: array is True for [[name]] (any number of entries), False for [name] (one)."""

    array: bool
    description: str
    fields: dict[str, Field]


TABLES = {
    "inbound_connections": Table(
        array=True,
        description="Traffic from clients of the parent VM to a service inside the enclave.",
        fields={
            "host_port": Field("tcp_port", "TCP port the host half listens on, on 0.0.0.0."),
            "enclave_port": Field(
                "tcp_port", "TCP port of the service in the enclave; the enclave half dials 127.0.0.1 on it."
            ),
            "vsock_port": Field(
                "vsock_port", "Vsock port the enclave half listens on for this entry; unique in the file."
            ),
            "bind_address": Field(
                "ip_address",
                "Address the host half listens on for host_port: keep an entry on an internal interface"
                " or on loopback; :: is every address of both families.",
                default="0.0.0.0",
                extension=True,
            ),
            "proxy_protocol": Field(
                "proxy_protocol",
                "PROXY protocol header the host half writes ahead of each connection's bytes, so that the"
                " service learns the client's address and port: v1 (text) or v2 (binary); off: none.",
                default="off",
                extension=True,
            ),
            "accept_proxy_protocol": Field(
                "boolean",
                "Whether each client of host_port must begin with a PROXY protocol header (v1 or v2), as a load"
                " balancer in front of the host half sends; its addresses stand for the client's. Only for a"
                " port that nothing but the load balancer can reach.",
                default=False,
                extension=True,
            ),
        },
    ),
    "outbound_connections": Table(
        array=True,
        description="Traffic from code in the enclave to a service outside.",
        fields={
            "hostname": Field("hostname", "Host the host half connects to: a DNS name or an IP address."),
            "vsock_port": Field(
                "vsock_port", "Vsock port the host half listens on for this entry; unique in the file."
            ),
            "tcp_port": Field("tcp_port", "TCP port the host half connects to on hostname."),
            "enclave_port": Field(
                "tcp_port",
                "TCP port the enclave half listens on, on enclave_address (default: tcp_port).",
                same_as="tcp_port",
                extension=True,
            ),
            "enclave_address": Field(
                "loopback_address",
                "Address in 127.0.0.0/8 the enclave half listens on for this entry, so that two upstreams on"
                " one port (two HTTPS services) both keep it; auto: one chosen by the hostname.",
                default="127.0.0.1",
                extension=True,
            ),
        },
    ),
    "egress": Table(
        array=False,
        description="A proxy in the enclave (HTTP CONNECT and SOCKS5) to any destination that the rules of"
        " both halves allow; without this table there is none.",
        fields={
            "proxy_port": Field(
                "tcp_port", "TCP port the enclave half listens on, on 127.0.0.1, for HTTP CONNECT and SOCKS5.",
                extension=True,
            ),
            "vsock_port": Field(
                "vsock_port", "Vsock port the host half listens on for the destinations the enclave half asks"
                " for; unique in the file.", extension=True,
            ),
            "allow": Field(
                "rules", "Destinations that may be reached, unless a deny rule matches: nothing else may.",
                default=[], extension=True,
            ),
            "deny": Field("rules", "Destinations that may not be reached, whatever allows them.", default=[],
                          extension=True),
        },
    ),
    "log_location": Table(
        array=False,
        description="Where each half writes its log; without this table both log to stderr.",
        fields={
            "host_log": Field("text", "File name of the host half's log.", default="host.log"),
            "enclave_log": Field("text", "File name of the enclave half's log.", default="enclave.log"),
            "log_level": Field("log_level", "Least severe level logged; RUST_LOG overrides it.", default="warn"),
            "host_log_dir": Field("text", "Folder of the host half's log.", default="/var/log/qproxy"),
            "enclave_log_dir": Field("text", "Folder of the enclave half's log.", default="/var/log/qproxy"),
            "forward_enclave_log": Field(
                "boolean",
                "Whether the enclave half sends its log records to the host half, which writes them to"
                " host_log_dir/enclave_log. They never hold payload, but do name hosts and ports.",
                default=True,
                extension=True,
            ),
            "log_max_size": Field(
                "mebibytes",
                "MiB a log file may reach before it is rotated (renamed to NAME.1, the older ones to NAME.2 and"
                " on), each half's and the host half's copy of the enclave's.",
                default=8,
                extension=True,
            ),
            "log_backups": Field(
                "count",
                "Rotated log files kept next to each log; the oldest beyond them is removed. 0: qproxy never"
                " rotates, and the log grows until something else (logrotate) acts.",
                default=2,
                extension=True,
            ),
        },
    ),
    "limits": Table(
        array=False,
        description="What one connection may cost each half; without this table the defaults apply.",
        fields={
            "connections_per_listener": Field(
                "count",
                "Most connections one listener relays at once; more wait for room (queue_timeout), and"
                " other listeners go on. 0: no bound of its own; -t/--threads bounds each direction.",
                default=0,
                extension=True,
            ),
            "connect_timeout": Field(
                "seconds",
                "Seconds the far side of a new connection has to answer, for each address tried;"
                " 0: as long as the system tries.",
                default=10,
                extension=True,
            ),
            "idle_timeout": Field(
                "seconds",
                "Seconds a connection may move no byte either way before it is cut; 0: never.",
                default=0,
                extension=True,
            ),
            "queue_timeout": Field(
                "seconds",
                "Seconds a connection that arrives at a limit waits for room before its client is reset;"
                " 0: as long as it takes.",
                default=30,
                extension=True,
            ),
            "buffer_memory": Field(
                "mebibytes",
                "MiB a half may hold for bytes that wait for a slow destination, however many connections"
                " it has; beyond it, bytes wait in the sockets.",
                default=32,
                extension=True,
            ),
        },
    ),
}


# A checked configuration: one record a table, its fields those of TABLES (tests/test_config.py holds them equal).


class Inbound(typing.NamedTuple):
    host_port: int
    enclave_port: int
    vsock_port: int
    bind_address: str
    proxy_protocol: str
    accept_proxy_protocol: bool


class Outbound(typing.NamedTuple):
    hostname: str
    vsock_port: int
    tcp_port: int
    enclave_port: int
    enclave_address: str

    @property
    def listen_address(self) -> str:
        """Where the enclave half listens for this entry: enclave_address, auto chosen."""
        return listen_address(self.hostname, self.enclave_address)


class Egress(typing.NamedTuple):
    proxy_port: int
    vsock_port: int
    allow: list[str]
    deny: list[str]


class LogLocation(typing.NamedTuple):
    host_log: str
    enclave_log: str
    log_level: str
    host_log_dir: str
    enclave_log_dir: str
    forward_enclave_log: bool
    log_max_size: int
    log_backups: int


class Limits(typing.NamedTuple):
    connections_per_listener: int
    connect_timeout: float
    idle_timeout: float
    queue_timeout: float
    buffer_memory: int


DEFAULT_LIMITS = Limits._make(field.default for field in TABLES["limits"].fields.values())


class Config(typing.NamedTuple):
    inbound: tuple[Inbound, ...] = ()
    outbound: tuple[Outbound, ...] = ()
    egress: Egress | None = None
    log_location: LogLocation | None = None
    limits: Limits = DEFAULT_LIMITS
    lines: Mapping[tuple[str, int], int] = {}  # where each entry begins in the file; only messages use it


def is_ip_literal(text: str) -> bool:
    """An IPv4 or IPv6 address, without an IPv6 zone (which JSON Schema's ipv6 format lacks)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text


LOOPBACK_NETWORK = ipaddress.IPv4Network("127.0.0.0/8")


def is_loopback_address(text: str) -> bool:
    """An address of 127.0.0.0/8 a socket can listen on (not its first or last), in the usual dotted
    form; or auto."""
    if text == "auto":
        return True
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return (address in LOOPBACK_NETWORK and str(address) == text
            and address not in (LOOPBACK_NETWORK.network_address, LOOPBACK_NETWORK.broadcast_address))


def listen_address(hostname: str, enclave_address: str) -> str:
    """Where the enclave half listens for an outbound entry: its enclave_address, auto chosen."""
    return loopback_for(hostname) if enclave_address == "auto" else enclave_address


def loopback_for(hostname: str) -> str:
    """The address enclave_address = "auto" stands for: 127.X.Y.Z, each of X, Y and Z from 1 to 254,
    chosen by the CRC-32 of the hostname in lower case, without a final dot.

    It depends on nothing but the name: the same in every file, and an app that
    holds on to an address it once resolved is never led to another entry when
    entries are added or moved.  Two names that meet at one address and port are
    an error of the file, which says to set one by hand.
    """
    import binascii  # built into the interpreter: unlike hashlib, it loads no OpenSSL into the enclave

    index = binascii.crc32(hostname.lower().rstrip(".").encode()) % 254 ** 3
    return f"127.{1 + index // 254 ** 2}.{1 + index // 254 % 254}.{1 + index % 254}"


def is_hostname(text: str) -> bool:
    """A DNS name or an IP literal, as the config's hostname field allows."""
    if is_ip_literal(text):
        return True
    return (
        len(text.rstrip(".")) <= HOSTNAME_MAX_LENGTH
        and re.fullmatch(HOSTNAME_PATTERN, text) is not None
        and re.search(NUMERIC_NAME_PATTERN, text) is None
    )


IPAddress = typing.Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = typing.Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
ALL_PORTS = (TCP_PORT_RANGE,)
# The characters that IDNA 2003 maps to others (ß to ss) and IDNA 2008 keeps: a name holding one
# stands for two domains, so only its xn-- form says which (UTS #46's deviations).
IDNA_DEVIATIONS = frozenset("\u00df\u1e9e\u03c2\u200c\u200d")
# IPv6 ranges whose addresses carry an IPv4 address in their last 32 bits, and lead to it: mapped
# IPv4, and NAT64's well-known prefix (RFC 6052), which a parent with DNS64 resolves every name into.
IPV4_CARRIERS = (ipaddress.IPv6Network("::ffff:0:0/96"), ipaddress.IPv6Network("64:ff9b::/96"))


def canonical_name(text: str) -> str:
    """A DNS name as the egress rules compare it: its IDNA (A-label) form, lower case, without
    a final dot.  ValueError when text is no name: an address is none, in any of the forms the
    resolver reads as one ("0x7f.1", "127.1"), which only address rules may judge."""
    name = text[:-1] if text.endswith(".") else text
    if not name.isascii():  # only then the codec, which costs a half 0.4 MB (unicodedata) once loaded
        if IDNA_DEVIATIONS.intersection(name):
            raise ValueError(f"{text!r}: IDNA 2003 (Python's) and IDNA 2008 (clients') make two names of it;"
                             " write the one meant in its xn-- form")
        try:
            name = name.encode("idna").decode("ascii")  # Python's codec: IDNA 2003
        except UnicodeError:
            raise ValueError(f"{text!r} is not a DNS name") from None
        except LookupError:  # an image without the codec (examples/build-rootfs.sh leaves it out)
            raise ValueError(f"{text!r}: a name that is not ASCII needs Python's idna codec, which this"
                             " Python lacks; write it in its xn-- form") from None
    name = name.lower()
    if is_ip_literal(name) or not is_hostname(name) or name.endswith("."):
        raise ValueError(f"{text!r} is not a DNS name")
    with contextlib.suppress(OSError):
        socket.inet_aton(name)  # what glibc's resolver takes for an address, as it does
        raise ValueError(f"{text!r} is an IPv4 address in a form of its own; write it as four decimal numbers")
    return name


def canonical_address(text: str) -> IPAddress:
    """An address as the egress rules compare it: one of IPV4_CARRIERS is the IPv4 address it carries."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and any(address in carrier for carrier in IPV4_CARRIERS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


class Rule(typing.NamedTuple):
    """One egress rule, as the file writes it (text) and as it matches: a name pattern (an exact
    name, "*.DOMAIN" for every name below DOMAIN, "*" for every name) or an address range, and
    the ports, as (first, last) ranges."""

    text: str
    name: str | None
    network: IPNetwork | None
    ports: tuple[tuple[int, int], ...]

    def matches(self, host: str, address: IPAddress | None, port: int) -> bool:
        """Whether the rule covers port of a destination: a canonical name, or an address."""
        if not any(first <= port <= last for first, last in self.ports):
            return False
        if self.network is not None:
            return address is not None and address in self.network
        if address is not None or self.name is None:
            return False
        return self.name == "*" or host == self.name or (self.name[0] == "*" and host.endswith(self.name[1:]))


def parse_rule(text: str) -> Rule:
    """A rule from its text: PATTERN or PATTERN:PORTS, an IPv6 pattern with ports in brackets.
    ValueError, saying what is wrong, when it is none."""
    if text.startswith("["):
        pattern, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("an IPv6 pattern in brackets is [ADDRESS]:PORTS or [RANGE]:PORTS")
        ports = rest[1:] if rest else None
        if not pattern or ":" not in pattern:
            raise ValueError(f"{pattern!r} in brackets is no IPv6 address or range")
    elif text.count(":") > 1:  # an IPv6 address or range, without ports
        pattern, ports = text, None
    else:
        pattern, colon, ports_text = text.partition(":")
        ports = ports_text if colon else None
    return Rule(text, *parse_pattern(pattern), parse_ports(ports))


def parse_pattern(pattern: str) -> tuple[str | None, IPNetwork | None]:
    if re.fullmatch(r"[0-9.]+(/[0-9]+)?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/[0-9]+)?", pattern):
        try:
            network = ipaddress.ip_network(pattern)
        except ValueError as error:  # "has host bits set", a prefix too long, no address at all
            raise ValueError(f"{pattern!r} is no address or range: {error}") from None
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and any(
                network.subnet_of(carrier) for carrier in IPV4_CARRIERS):
            # As canonical_address() sees the addresses it is matched with: IPv4 ones.
            network = ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
        return None, network
    if pattern == "*":
        return "*", None
    if pattern.startswith("*."):
        return "*." + canonical_name(pattern[2:]), None
    return canonical_name(pattern), None


def parse_ports(text: str | None) -> tuple[tuple[int, int], ...]:
    if text is None or text == "*":
        return ALL_PORTS
    ranges = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not re.fullmatch(r"[0-9]{1,5}", first) or (dash and not re.fullmatch(r"[0-9]{1,5}", last)):
            raise ValueError(f"{text!r} is not PORT, PORT-PORT, several of them joined by commas, or *")
        low, high = int(first), int(last if dash else first)
        if not TCP_PORT_RANGE[0] <= low <= high <= TCP_PORT_RANGE[1]:
            raise ValueError(f"ports {part!r}: a port is from 1 to 65535, a range's first not above its last")
        ranges.append((low, high))
    return tuple(ranges)


def rules_problem(value: list[typing.Any]) -> str | None:
    """What is wrong with each bad rule of a list, in one line; None when every one is a rule."""
    problems = []
    for number, text in enumerate(value, 1):
        if not isinstance(text, str):
            problems.append(f"rule {number} is {shown(text)}, not a string")
            continue
        try:
            parse_rule(text)
        except ValueError as error:
            problems.append(f"rule {number} ({shown(text)}): {error}")
    return "; ".join(problems) or None


class Kind(typing.NamedTuple):
    """What the values of a field may be: JSON Schema's type for them ("integer", "number",
    "boolean", "string" or "array"), README's words for them and an error's, whether a value of
    that type is one, and the range or the choices, which the JSON Schema gives too.  problem:
    for a value of the right type that does not fit, what is wrong with it, in more words."""

    type: str
    words: str
    expected: str
    fits: Callable[[typing.Any], bool]
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    problem: Callable[[typing.Any], str | None] | None = None


def integers(low: int, high: int) -> Kind:
    return Kind("integer", f"integer, {low} to {high}", f"an integer from {low} to {high}",
                lambda value: low <= value <= high, (low, high))


# Every kind of field, in one place: the validator, config_schema.py and tests/test_readme.py read them here.
KINDS = {
    "tcp_port": integers(*TCP_PORT_RANGE),
    "vsock_port": integers(*VSOCK_PORT_RANGE),
    "count": integers(*COUNT_RANGE),
    "mebibytes": integers(*MEBIBYTES_RANGE),
    "seconds": Kind("number", "number of seconds, {} to {}".format(*SECONDS_RANGE),
                    "a number of seconds from {} to {}".format(*SECONDS_RANGE),
                    lambda value: SECONDS_RANGE[0] <= value <= SECONDS_RANGE[1], SECONDS_RANGE),  # not NaN either
    "boolean": Kind("boolean", "boolean", "true or false", lambda value: True),
    "hostname": Kind("string", "string: DNS name or IP address", "a DNS name or an IP address", is_hostname),
    "ip_address": Kind("string", "string: IPv4 or IPv6 address", "an IPv4 or IPv6 address", is_ip_literal),
    "loopback_address": Kind("string", "string: IPv4 address in 127.0.0.0/8, or `auto`",
                             "an IPv4 address in 127.0.0.0/8 (127.0.0.1 to 127.255.255.254), or auto",
                             is_loopback_address),
    "proxy_protocol": Kind("string", "string: " + ", ".join(f"`{version}`" for version in PROXY_VERSIONS),
                           "one of " + ", ".join(PROXY_VERSIONS), lambda value: value in PROXY_VERSIONS,
                           choices=PROXY_VERSIONS),
    "log_level": Kind("string", "string: " + ", ".join(f"`{level}`" for level in LOG_LEVELS),
                      "one of " + ", ".join(LOG_LEVELS), lambda value: value in LOG_LEVELS, choices=LOG_LEVELS),
    "text": Kind("string", "string, not empty", "a non-empty string without NUL",
                 lambda value: bool(value) and "\0" not in value),
    "rules": Kind("array", "array of rules: `NAME`, `*.DOMAIN`, `*`, address or range, each with `:PORTS` or not",
                  "an array of egress rules", lambda value: rules_problem(value) is None, problem=rules_problem),
}
JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "integer": int, "number": (int, float), "boolean": bool, "string": str, "array": list,
}


def check_value(field: Field, value: object) -> str | None:
    """Why value does not fit field, or None when it does."""
    kind = KINDS[field.kind]
    # TOML's true is no number, though Python's bool is an int.
    typed = isinstance(value, JSON_TYPES[kind.type]) and (kind.type == "boolean") == isinstance(value, bool)
    if typed and kind.fits(value):
        return None
    if typed and kind.problem:
        return kind.problem(value)
    expected = kind.expected if typed or kind.type != "string" else "a string"
    return f"expected {expected}, found {shown(value)}"


def shown(value: object) -> str:
    """A short, printable account of a value found in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 50 else repr(value[:50]) + "..."
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def unknown_key(key: str, known: Iterator[str]) -> str:
    import difflib  # only a bad file needs it: the halves do not carry it

    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint}"


def check_table(where: str, fields: dict[str, Field], entry: object, problems: list[str]) -> dict[str, typing.Any]:
    """The entry's valid values, defaults filled in; what is wrong goes to problems (and its key is left out)."""
    if not isinstance(entry, dict):
        problems.append(f"{where}: expected a table, found {shown(entry)}")
        return {}
    values: dict[str, typing.Any] = {}
    for key in entry:
        if key not in fields:
            problems.append(f"{where}: {unknown_key(key, iter(fields))}")
    for key, field in fields.items():
        if key in entry:
            problem = check_value(field, entry[key])
            if problem:
                problems.append(f"{where}: {key}: {problem}")
            else:
                values[key] = entry[key]
        elif field.required:
            problems.append(f"{where}: {key}: missing (required)")
        elif not field.same_as:
            values[key] = field.default
        elif field.same_as in values:
            values[key] = values[field.same_as]
    return values


class Problem(typing.NamedTuple):
    """What is wrong at a line of the file; line 0 when no line can be named."""

    line: int
    text: str

    def at(self, path: str) -> str:
        """As compilers put it, so that editors can jump to it: PATH:LINE: text."""
        return f"{escaped(path)}:{self.line}: {self.text}" if self.line else f"{escaped(path)}: {self.text}"


# A line that looks like a table's header, [name] or [[name]], its name bare or quoted; and one that
# looks like a key, name = value or name.key = value.
TABLE_HEADER = re.compile(r"""[ \t]*\[\[?[ \t]*(["']?)([A-Za-z0-9_-]+)\1[ \t]*\]""")
KEY_LINE = re.compile(r"""[ \t]*(["']?)([A-Za-z0-9_-]+)\1[ \t]*[.=]""")


def entry_lines(text: str) -> dict[tuple[str, int], int]:
    """The line where each entry of the file begins, by (table name, entry number from 1); entry
    number 0 is where the table's name first appears, as a header or as a top-level key.

    tomllib keeps no lines.  So a copy of the text is parsed with a marker key
    naming its line (and a random number, so that no key of the file can pass
    for one) after each line that looks like a header, and before each that
    looks like a top-level key.  A header's marker that tomllib puts first in a
    table, or a key's that it puts at the top level right before that key, says
    where the table or the key is.  One next to a line that only looks like a
    header or a key (inside a multi-line string or array) lands in the string,
    or after other keys, and says nothing; a copy that does not parse gives no
    lines at all: none rather than a wrong one.
    """
    nonce = os.urandom(8).hex()
    marked, headers, keys, top_level = [], {}, {}, True
    for number, line in enumerate(text.split("\n"), 1):  # TOML's newline; splitlines() knows more
        key = KEY_LINE.match(line) if top_level else None
        mark = f"{nonce} {number}"
        if TABLE_HEADER.match(line):
            marked += [line, f'"{mark}" = true']
            headers[mark] = number
            top_level = False
        elif key:
            marked += [f'"{mark}" = true', line]
            keys[mark] = (number, key.group(2))
        else:
            marked.append(line)
    try:
        document = tomllib.loads("\n".join(marked))
    except (ValueError, RecursionError):  # one level deeper than the file itself: it may not fit
        return {}
    lines: dict[tuple[str, int], int] = {}
    names = list(document)
    for mark, after in zip(names, names[1:]):
        if mark in keys and keys[mark][1] == after:
            lines[(after, 0)] = keys[mark][0]
    for name, found in document.items():
        for entry, table in enumerate(found if isinstance(found, list) else [found], 1):
            first = next(iter(table), None) if isinstance(table, dict) else None
            if first in headers:
                lines[(name, entry)] = headers[first]
            elif (name, 0) in lines:  # an inline array's entries, or a table of dotted keys: where its key is
                lines[(name, entry)] = lines[(name, 0)]
        if (name, 1) in lines:
            lines.setdefault((name, 0), lines[(name, 1)])
    return lines


def entry_name(table: str, number: int) -> str:
    return f"[[{table}]] entry {number}" if TABLES[table].array else f"[{table}]"


def entry_at(lines: Mapping[tuple[str, int], int], table: str, number: int) -> str:
    """An entry named for a reader who looks for it: with its line, where it has one."""
    line = lines.get((table, number), 0)
    return entry_name(table, number) + (f" (line {line})" if line else "")


def check_document(document: dict[str, typing.Any], control_port: int,
                   lines: Mapping[tuple[str, int], int]) -> tuple[Config, list[Problem]]:
    """Turn a parsed TOML document into a Config; or, when it has any, every problem, in file order."""
    problems = [
        Problem(lines.get((key, 0), 0), unknown_key(key, iter(TABLES))) for key in document if key not in TABLES
    ]
    entries: dict[str, list[dict[str, typing.Any]]] = {}
    for name, table in TABLES.items():
        found = document.get(name, [])
        if table.array and not isinstance(found, list):
            problems.append(Problem(lines.get((name, 0), 0),
                                    f"{name}: expected an array of tables ([[{name}]]), found {shown(found)}"))
            found = []
        if not table.array:
            found = [found] if name in document else []
        entries[name] = []
        for number, entry in enumerate(found, 1):
            found_here: list[str] = []
            values = check_table(entry_name(name, number), table.fields, entry, found_here)
            problems += [Problem(lines.get((name, number), 0), problem) for problem in found_here]
            entries[name].append(values)  # the valid values of an entry with problems too: its ports are checked
    problems += cross_check(entries, control_port, lines)
    if problems:
        return Config(), sorted(problems, key=lambda problem: problem.line)
    config = Config(
        inbound=tuple(Inbound(**e) for e in entries["inbound_connections"]),
        outbound=tuple(Outbound(**e) for e in entries["outbound_connections"]),
        egress=next((Egress(**e) for e in entries["egress"]), None),
        log_location=next((LogLocation(**e) for e in entries["log_location"]), None),
        limits=next((Limits(**e) for e in entries["limits"]), DEFAULT_LIMITS),
        lines=lines,
    )
    return config, []


def cross_check(entries: dict[str, list[dict[str, typing.Any]]], control_port: int,
                lines: Mapping[tuple[str, int], int]) -> list[Problem]:
    """The rules that span entries: ports that must be unique."""
    problems = []

    def unique(label: str, uses: list[tuple[str, int, str]], reserved: dict[int, str]) -> None:
        seen = dict(reserved)
        for table, number, key in uses:
            port = entries[table][number - 1][key]
            if port in seen:
                text = f"{entry_name(table, number)}: {key}: {port} is already used by {seen[port]}"
                problems.append(Problem(lines.get((table, number), 0), f"{text}; every {label} must be unique"))
            else:
                seen[port] = f"the {key} of {entry_at(lines, table, number)}"

    def ports(table: str, key: str) -> list[tuple[str, int, str]]:
        return [(table, number, key) for number, entry in enumerate(entries[table], 1) if key in entry]

    unique(
        "vsock port",
        ports("inbound_connections", "vsock_port") + ports("outbound_connections", "vsock_port")
        + ports("egress", "vsock_port"),
        {control_port: "the control port"},
    )
    unique("host_port", ports("inbound_connections", "host_port"), {})  # even on two bind addresses: keep it simple
    problems += enclave_listeners_problems(entries, lines)
    # An error, not loop_warnings' warning: the proxy asks no credentials, as only the enclave reaches it.
    proxies = {entry.get("proxy_port") for entry in entries["egress"]}
    problems += [
        Problem(lines.get((table, number), 0), f"{entry_name(table, number)}: {key}: {entries[table][number - 1][key]}"
                f" is the [egress] proxy_port: clients of the parent would use the enclave's egress proxy")
        for table, number, key in ports("inbound_connections", "enclave_port")
        if entries[table][number - 1][key] in proxies
    ]
    return problems


def enclave_listeners_problems(entries: dict[str, list[dict[str, typing.Any]]],
                               lines: Mapping[tuple[str, int], int]) -> list[Problem]:
    """Where the enclave half listens: each address and port once, and each hostname at one address
    (one name resolves to one address, in the hosts file the enclave half may write)."""
    problems = []
    seen: dict[str, tuple[str, str, bool]] = {}  # ADDRESS:PORT -> the key and entry that listen there, and if auto
    addresses: dict[str, tuple[str, str]] = {}  # hostname -> its address, and the entry that gave it
    listening = []
    for number, entry in enumerate(entries["outbound_connections"], 1):
        written, name = entry.get("enclave_address"), entry.get("hostname")
        if written is None or name is None:
            continue  # its problem is reported already
        address = listen_address(name, written)
        listening.append(("outbound_connections", number, address, entry.get("enclave_port"), "enclave_port",
                          written == "auto"))
        if is_ip_literal(name):
            continue
        here = entry_at(lines, "outbound_connections", number)
        named, by = addresses.setdefault(name.lower().rstrip("."), (address, here))
        if named != address:
            problems.append(Problem(lines.get(("outbound_connections", number), 0),
                                    f"{entry_name('outbound_connections', number)}: enclave_address: {address}, but"
                                    f" {by} has {name} at {named}: a name resolves to one address"))
    listening += [("egress", number, "127.0.0.1", entry.get("proxy_port"), "proxy_port", False)
                  for number, entry in enumerate(entries["egress"], 1)]
    for table, number, address, port, key, auto in listening:
        if port is None:
            continue
        where = f"{address}:{port}"
        if where in seen:
            used_by, earlier, earlier_auto = seen[where]
            hint = "; auto chose it: set one enclave_address by hand" if auto or earlier_auto else ""
            problems.append(Problem(lines.get((table, number), 0),
                                    f"{entry_name(table, number)}: {key}: {port} is already used by the {used_by}"
                                    f" of {earlier}; both listen on {address}{hint}; every address and port the"
                                    " enclave half listens on must be unique"))
        else:
            seen[where] = (key, entry_at(lines, table, number), auto)
    return problems


def entry_problem(config: Config, table: str, number: int, text: str) -> Problem:
    """A problem of a checked config's entry, at its line in the file."""
    return Problem(config.lines.get((table, number), 0), f"{entry_name(table, number)}: {text}")


def loop_warnings(config: Config) -> list[Problem]:
    """Inbound entries aimed at a port where the enclave half itself listens for outbound traffic.

    A warning, not an error: the vendor's own reference file has one (443 both
    ways), and its files are accepted unchanged.
    """
    listening = {entry.enclave_port: number for number, entry in enumerate(config.outbound, 1)
                 if entry.listen_address == "127.0.0.1"}
    return [
        entry_problem(
            config, "inbound_connections", number,
            f"enclave_port: {entry.enclave_port} is where the enclave half listens for"
            f" {entry_at(config.lines, 'outbound_connections', listening[entry.enclave_port])}; inbound traffic"
            " to it goes back out of the enclave, and the service cannot listen there too",
        )
        for number, entry in enumerate(config.inbound, 1)
        if entry.enclave_port in listening
    ]


def trust_warnings(config: Config) -> list[Problem]:
    """Inbound entries that believe a PROXY header from whoever reaches them: any client of the parent."""
    return [
        entry_problem(config, "inbound_connections", number,
                      f"accept_proxy_protocol: true on bind_address {entry.bind_address}: every client that reaches"
                      f" host_port {entry.host_port} can name any address as its own; listen where only the load"
                      " balancer reaches")
        for number, entry in enumerate(config.inbound, 1)
        if entry.accept_proxy_protocol and is_wildcard(entry.bind_address)
    ]


def is_wildcard(address: str) -> bool:
    """An address a socket listens on every address of a family at: 0.0.0.0, ::, ::ffff:0.0.0.0."""
    parsed = ipaddress.ip_address(address)
    carried = parsed.ipv4_mapped if isinstance(parsed, ipaddress.IPv6Address) else None
    return parsed.is_unspecified or (carried is not None and carried.is_unspecified)


def load_configs(*paths: str, control_port: int) -> list[Config]:
    """Several files, each loaded as load_config does; ConfigError lists the problems of all of them."""
    configs, problems = [], []
    for path in paths:
        try:
            configs.append(load_config(path, control_port))
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(problems)
    return configs


def require_tomllib() -> None:
    if tomllib is None:
        raise StartError("reading a config file needs tomli on Python older than 3.11: pip install tomli, or"
                         " copy tomli's folder next to qproxy.py (README: Python 3.9 and 3.10)")


def toml_problem(message: str, text: str) -> Problem:
    """tomllib's complaint, at its line as every problem is: "Invalid statement (at line 3, column 1)"."""
    at = re.search(r" \(at line ([0-9]+), column ([0-9]+)\)$", message)
    detail = message[:at.start()] + f" (column {at.group(2)})" if at else message
    if text.startswith("\ufeff"):
        detail += "; the file begins with a byte-order mark, which TOML does not allow: save it as UTF-8 without one"
    return Problem(int(at.group(1)) if at else 0, f"invalid TOML: {detail}")


def load_config(path: str, control_port: int) -> Config:
    """Read and check a configuration file; raise ConfigError listing every problem."""
    require_tomllib()
    text = ""
    try:
        status = os.stat(path)  # before open(), which would wait for ever on a FIFO
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError([f"{path}: not a regular file; give the path of a configuration file"])
        if status.st_size > CONFIG_MAX_SIZE:
            raise ConfigError([f"{path}: {status.st_size} bytes, more than a configuration file has"
                               f" ({CONFIG_MAX_SIZE} at most)"])
        with open(path, "rb") as file:
            data = file.read(CONFIG_MAX_SIZE + 1)  # the bound again: a file may grow after stat()
        if len(data) > CONFIG_MAX_SIZE:
            raise ConfigError([f"{path}: more than a configuration file has ({CONFIG_MAX_SIZE} bytes at most)"])
        text = data.decode()
        document = tomllib.loads(text)
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror or error}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: invalid TOML: the file is not UTF-8"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid TOML: nested too deeply"]) from None
    except ValueError as error:  # tomllib.TOMLDecodeError
        raise ConfigError([toml_problem(str(error).partition("\n")[0], text).at(path)]) from None
    config, problems = check_document(document, control_port, entry_lines(text))
    if problems:
        raise ConfigError([problem.at(path) for problem in problems])
    return config


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------


def level_from_rust_log(value: str) -> str:
    """The level RUST_LOG asks of qproxy, read the way the vendor's EnvFilter reads it.

    Directives are comma-separated: a bare level, or target=level.  A directive
    for the qproxy target wins over a bare level.
    """
    chosen = None
    for directive in filter(None, (part.strip() for part in value.split(","))):
        target, equals, level = directive.rpartition("=")
        if not equals and (directive == "qproxy" or directive.startswith("qproxy::")):
            target, level = directive, "trace"  # a bare target enables every level for it
        level = level.lower()
        if level == "warning":
            level = "warn"
        if re.fullmatch(r"[0-9]+", level) and int(level) < len(LOG_LEVELS):
            level = LOG_LEVELS[int(level)]  # tracing's numbers: 0 off, 1 error ... 5 trace
        if level not in LOG_LEVELS:
            raise UsageError(f"RUST_LOG={value}: {directive!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
        ours = not target or target == "qproxy" or target.startswith("qproxy::")
        if ours and (target or chosen is None or not chosen[0]):
            chosen = (target, level)
    return chosen[1] if chosen else "warn"


def setup_logging(role: str, config: Config, environ: Mapping[str, str]) -> LogWriter:
    """Send records to the configured file, or to stderr when there is none or it cannot be written,
    through a bounded queue and one writer thread; the host half also writes the enclave's copy."""
    if environ.get("RUST_LOG", "").strip():
        level = level_from_rust_log(environ["RUST_LOG"])
    elif config.log_location:
        level = config.log_location.log_level
    else:
        level = "warn"
    logging.addLevelName(TRACE, "TRACE")
    logging.addLevelName(logging.WARNING, "WARN")
    # No line shows where, in which thread or process, a record was made: as the logging HOWTO's
    # "Optimization" says, so no record looks for it (a walk up the stack, os.getpid()).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    own = log_handler(log_path(config, role, role), config.log_location)
    own.setFormatter(UTCFormatter(f"%(asctime)s %(levelname)-5s qproxy::{role} %(message)s"))
    own.addFilter(lambda record: record.name == log.name)
    handlers = [own]
    if role == "host":  # the enclave half's records, sent over the control connection, land next to its own
        copy = log_handler(log_path(config, "host", "enclave"), config.log_location)
        copy.setFormatter(logging.Formatter("%(enclave_time)s %(levelname)-5s qproxy::enclave %(message)s"))
        copy.addFilter(logging.Filter(EnclaveLog.NAME))
        handlers.append(copy)
    source = LogQueue()
    writer = LogWriter(source, *handlers)
    writer.start()
    log.handlers[:] = [source]
    log.setLevel(LEVEL_NUMBERS[level])
    log.propagate = False
    return writer


def log_path(config: Config, folder_of: str, file_of: str) -> str | None:
    """The log file [log_location] names: in folder_of's folder ("host" or "enclave"), file_of's file name."""
    where = config.log_location
    if not where:
        return None
    folder = where.host_log_dir if folder_of == "host" else where.enclave_log_dir
    return os.path.join(folder, where.host_log if file_of == "host" else where.enclave_log)


def log_handler(path: str | None, where: LogLocation | None) -> logging.Handler:
    """A handler writing to the file at path, or to stderr when there is none or it cannot be written."""
    if path and where:
        try:
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            return LogFile(path, where.log_max_size * 1024 * 1024, where.log_backups)
        except OSError as error:
            print(f"qproxy: cannot write the log file {path} ({error.strerror}); logging to stderr", file=sys.stderr)
    return LogStream(sys.stderr)


class LogQueue(logging.handlers.QueueHandler):
    """Where every thread's records go: a bounded queue, which no thread ever waits on.

    When the writer cannot keep up (a pipe nobody reads, a frozen
    filesystem), records are dropped and counted; the writer reports the count
    once it writes again.  Formatting (the message, a traceback) is done here,
    in the thread that logs, as QueueHandler.prepare does.
    """

    lock: threading.Lock  # made by logging.Handler (an RLock), which holds it around emit()

    def __init__(self) -> None:
        self.records: queue.Queue[logging.LogRecord | str] = queue.Queue(LOG_QUEUE)
        super().__init__(self.records)
        self.dropped = 0
        self.queued = self.written = 0  # records put in the queue, and written (or failed and counted) of them

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """QueueHandler.prepare without its copy of the record: the handler after this one (the
        enclave half's LogOutbox) wants the message as formatted here, traceback and all, too."""
        record.msg = record.message = self.format(record)
        record.args = record.exc_info = record.exc_text = record.stack_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:  # logging holds self.lock here
        try:
            self.queue.put_nowait(record)
            self.queued += 1
        except queue.Full:
            self.dropped += 1

    def take_dropped(self) -> int:
        with self.lock:
            dropped, self.dropped = self.dropped, 0
        return dropped


class LogWriter(logging.handlers.QueueListener):
    """The one thread that writes log records, so that only it can wait on a write.

    It reports what the queue dropped before the next record it writes, and
    reopens the log files when asked (SIGHUP, after logrotate), between two
    records.  finish() lets it write what waits, for at most LOG_DRAIN.
    """

    def __init__(self, source: LogQueue, *handlers: logging.Handler):
        super().__init__(source.queue, *handlers, respect_handler_level=True)
        self.source = source
        self.reopening = False

    WAKE = "reopen"  # queued by reopen(), so that it happens even when nothing else is logged

    def dequeue(self, block: bool) -> logging.LogRecord | str:  # type: ignore[override]
        """The next record; when none waits, the first to come, once LOG_LINGER has let others gather."""
        with contextlib.suppress(queue.Empty):
            return self.source.records.get_nowait()
        record = self.source.records.get()
        time.sleep(LOG_LINGER)
        return record

    def handle(self, record: logging.LogRecord | str) -> None:
        if self.reopening:
            self.reopening = False
            for handler in self.handlers:
                if isinstance(handler, LogFile):
                    handler.reopen()
        if isinstance(record, str):  # WAKE
            return
        dropped = self.source.take_dropped()
        if dropped:
            super().handle(log.makeRecord(log.name, logging.WARNING, "", 0, "%d log records were dropped: the log"
                                          " could not be written as fast as they came", (dropped,), None))
        super().handle(record)
        self.source.written += 1

    def reopen(self) -> None:
        """Have the log files reopened before the next record is written (from any thread)."""
        self.reopening = True
        with contextlib.suppress(queue.Full):  # then the next record that fits does it
            self.queue.put_nowait(self.WAKE)
        log.info("SIGHUP: reopening the log files")

    def flush(self, timeout: float = LOG_DRAIN) -> bool:
        """Wait up to timeout for the writer to write what waits (from any thread); whether it did."""
        end = time.monotonic() + timeout
        while self.source.records.unfinished_tasks:
            if time.monotonic() >= end:
                return False
            time.sleep(LOG_DRAIN_POLL)
        return True

    def drain(self) -> bool:
        """flush(), and stop the writer when that worked; False when it did not."""
        if not self.flush():
            return False
        self.stop()
        return True

    def finish(self, code: int) -> int:
        """drain(), then return code; when the log blocks, exit with code at once, since the
        interpreter's own exit would wait on the log for ever."""
        if not self.drain():
            os._exit(code)
        return code


class ReportsFailures(logging.Handler):
    """For the log's handlers: a write that fails (a full disk, a closed stderr) costs one line on
    stderr every LOG_ERROR_REPORT, never a traceback a record; once writes go through again,
    the number of records lost meanwhile is written first."""

    lost = 0
    reported = -math.inf

    def emit(self, record: logging.LogRecord) -> None:
        lost = self.lost
        super().emit(record)
        if lost and self.lost == lost:  # this one went through, after some that did not
            self.lost = 0
            # Made from the record that went through, so that it has every field this handler's lines show
            # (the host half's copy of the enclave's log shows the enclave's time).
            super().emit(logging.makeLogRecord({
                **record.__dict__, "levelno": logging.WARNING, "levelname": logging.getLevelName(logging.WARNING),
                "msg": "%d log records were lost while the log could not be written", "args": (lost,),
                "exc_info": None, "exc_text": None, "stack_info": None}))

    def handleError(self, record: logging.LogRecord | None) -> None:
        self.lost += 1
        now = time.monotonic()
        if now - self.reported < LOG_ERROR_REPORT:
            return
        self.reported = now
        where = getattr(self, "baseFilename", "stderr")
        error = sys.exc_info()[1]
        try:
            why = explain(error) if error else "failed"
            sys.stderr.write(f"qproxy: cannot write the log to {where} ({why}); records are lost until it can be"
                             " written again\n")
            sys.stderr.flush()
        except Exception:
            pass  # stderr is what failed


class LogStream(ReportsFailures, logging.StreamHandler):  # type: ignore[type-arg]
    """Writes records to stderr."""


class LogFile(ReportsFailures, logging.handlers.RotatingFileHandler):
    """A log file (mode 0640) with a size ceiling: past max_size it is renamed name.1, the older
    ones shift up, and the one past backups is removed (backups 0: it is never rotated here).
    reopen() writes to whatever file the path names now, so that logrotate works too, renaming
    or truncating it."""

    lock: threading.Lock  # made by logging.Handler (an RLock)
    room: float  # bytes the file could still take when last looked at, less the most each line since can take
    AROUND = 64  # the most bytes of a line that are not its message: time, level, "qproxy::enclave ", newline

    def __init__(self, path: str, max_size: int, backups: int):
        super().__init__(path, maxBytes=max_size if backups else 0, backupCount=backups, encoding="utf-8")

    def _open(self) -> io.TextIOWrapper:  # logging's hook for opening the file, also after a rotation
        self.room = 0  # look at it before the first line
        # Not blocking to open: a FIFO nobody reads fails at once (ENXIO) instead of holding the half at
        # start.  Blocking to write: a reader that stalls holds only the writer, as any stalled log does.
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o640)
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "a", encoding=self.encoding)

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # logging's hook, before each line
        """Whether record's line would take the file past max_size, so that it is rotated first.

        The standard handler looks at the file for each line (two stat() calls
        and a seek) and formats the line twice; this one looks (fstat) only
        once the lines written since its last look could have filled it, each
        counted at the most bytes it can take.  The file's own size decides: a
        logrotate copytruncate may have emptied it meanwhile.
        """
        if not self.maxBytes:
            return False
        line = 4 * len(record.getMessage()) + self.AROUND  # UTF-8: at most 4 bytes a character
        if line <= self.room:
            self.room -= line
            return False
        if self.stream is None:
            self.stream = self._open()
        self.stream.flush()
        status = os.fstat(self.stream.fileno())
        if not stat.S_ISREG(status.st_mode):  # never rotate a device or a pipe, as the standard handler
            self.room = math.inf
            return False
        self.room = self.maxBytes - status.st_size - line
        return self.room < 0

    def reopen(self) -> None:
        with self.lock:
            try:
                if self.stream:
                    self.stream.close()
                self.stream = self._open()
            except OSError:
                self.stream = None  # type: ignore[assignment]  # logging's own "not open": opened at the next record
                self.handleError(None)


class UTCFormatter(logging.Formatter):
    second = (-1, "")  # the last second formatted, and how: one tuple, which threads replace whole

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        when, shown = self.second
        if int(record.created) != when:
            when = int(record.created)
            shown = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
            self.second = when, shown
        return f"{shown}.{int(record.msecs):03d}Z"


TIME_FORMATTER = UTCFormatter()  # a record's time as every log line shows it


# ---------------------------------------------------------------------------
# Transport: endpoints, vsock (real or emulated), dialing
# ---------------------------------------------------------------------------


class Endpoint(typing.NamedTuple):
    """Where a half listens or what it dials: TCP host:port, or vsock CID:port.

    kind is "tcp" or "vsock"; host is an address or hostname for tcp, a CID
    (as text) for vsock, where "" listens on any CID.
    """

    kind: str
    host: str
    port: int

    def __str__(self) -> str:
        if not self.port:  # the host half's egress target: each connection names its own
            return f"{self.kind} {self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind} {host}:{self.port}"


class Vsock:
    """The socket factory for vsock ports: AF_VSOCK, or Unix sockets in a folder.

    With emulation, listening on vsock port P creates the socket file DIR/P and
    dialing any CID on port P connects to it; a host half and an enclave half
    given the same DIR reach each other, and a person can too, with
    ``socat - UNIX-CONNECT:DIR/P``.  The listener holds a lock on DIR/P.lock
    while it lives, so a socket file without a locked twin is a dead process's
    and may be taken over.
    """

    def __init__(self, emulation_dir: str | None):
        self.emulation_dir = emulation_dir
        self.locks: dict[str, typing.TextIO] = {}  # socket file path -> its open lock file, held while it listens

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_UNIX if self.emulation_dir else socket.AF_VSOCK

    def __str__(self) -> str:
        return f"emulated vsock in {self.emulation_dir}" if self.emulation_dir else "AF_VSOCK"

    def check_available(self) -> None:
        if self.emulation_dir:
            try:
                os.makedirs(self.emulation_dir, mode=0o700, exist_ok=True)
            except OSError as error:
                raise StartError(
                    f"cannot use QPROXY_VSOCK_EMULATION={self.emulation_dir}: {error.strerror}"
                ) from None
            return
        try:
            socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
        except (AttributeError, OSError):
            raise StartError(
                "AF_VSOCK is not available here: is the vsock driver loaded? "
                "For a local run set QPROXY_VSOCK_EMULATION=DIR"
            ) from None

    def listen_address(self, port: int) -> Address:
        if not self.emulation_dir:
            return (socket.VMADDR_CID_ANY, port)
        path = os.path.join(self.emulation_dir, str(port))
        # A lock, not a trial connection: connecting to a live listener would
        # make it dial its target for nothing.
        try:
            lock = open(path + ".lock", "a")  # noqa: SIM115 -- held open, and locked, while the port listens
        except OSError as error:
            hint = "" if error.errno in (errno.EMFILE, errno.ENFILE) else (
                ": QPROXY_VSOCK_EMULATION must name a folder of its own that this user can write")
            raise StartError(f"cannot create {path}.lock for vsock port {port} ({error.strerror}){hint}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StartError(f"vsock port {port} is already in use (emulated at {path})") from None
        self.locks[path] = lock
        if os.path.exists(path):
            os.unlink(path)  # left by a process that died: its lock died with it
        return path

    def release(self, path: str) -> None:
        """An emulated port's listener closed: let another listener (a reload's, another half's) take it."""
        lock = self.locks.pop(path, None)
        if lock:
            lock.close()

    def client_socket(self) -> socket.socket:
        """A socket to dial a vsock port with."""
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        if self.emulation_dir:
            sock.bind("")  # an abstract name the kernel picks: both halves' logs name the connection by it
        return sock

    def address(self, cid: int, port: int) -> Address:
        return os.path.join(self.emulation_dir, str(port)) if self.emulation_dir else (cid, port)

    def connect(self, cid: int, port: int, timeout: float | None) -> socket.socket:
        sock = self.client_socket()
        try:
            sock.settimeout(timeout)
            sock.connect(self.address(cid, port))
        except BaseException:
            sock.close()
            raise
        return sock


class Dialer:
    """Opens the far side of a connection: vsock by CID, TCP by address, or by name resolved per connection.

    A far side with no name to resolve is dialed without blocking (``start``),
    and the reactor sees the connect through; a name may take DNS its time, so
    a worker dials it (``connect_tcp``).
    """

    def __init__(self, vsock: Vsock, timeout: float, family: int = socket.AF_UNSPEC):
        self.vsock = vsock
        self.timeout = timeout or None  # [limits] connect_timeout; 0 leaves it to the system
        self.family = family  # AF_INET or AF_INET6 when --ipv4 or --ipv6 was given

    @staticmethod
    def resolves(target: Endpoint) -> bool:
        """Whether dialing target needs a name resolved, which may block."""
        return target.kind == "tcp" and not is_ip_literal(target.host)

    def start(self, target: Endpoint) -> tuple[socket.socket, bool]:
        """Begin dialing a target that needs no name resolved, without blocking; return the socket
        and whether it is connected already (else the connect goes on: see Reactor.dialed)."""
        if target.kind == "vsock":
            sock = self.vsock.client_socket()
            address = self.vsock.address(int(target.host), target.port)
        else:
            family, kind, proto, _, address = socket.getaddrinfo(
                target.host, target.port, self.family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)[0]
            sock = socket.socket(family, kind, proto)
        try:
            if target.kind == "tcp":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            error = sock.connect_ex(address)
            if error not in (0, errno.EINPROGRESS):
                raise OSError(error, os.strerror(error))
        except BaseException:
            sock.close()
            raise
        return sock, error == 0

    def connect_tcp(self, host: str, port: int, conn_id: int) -> socket.socket:
        """Try every address the name has, in the resolver's order; literals skip DNS."""
        return self.connect_first(self.resolve(host, port, conn_id), conn_id)

    def resolve(self, host: str, port: int, conn_id: int, flags: int = 0) -> list[AddressInfo]:
        """The addresses of host, as getaddrinfo gives them (with flags), of the family asked for;
        logged at debug, named by conn_id.  socket.gaierror when there are none."""
        flags |= socket.AI_NUMERICHOST if is_ip_literal(host) else 0
        try:
            addresses = socket.getaddrinfo(host, port, self.family, socket.SOCK_STREAM, 0, flags)
        except socket.gaierror as error:
            if self.family == socket.AF_UNSPEC:
                raise
            # The name may well resolve, to the other family only: say what was asked for.
            asked = "IPv4 addresses (--ipv4)" if self.family == socket.AF_INET else "IPv6 addresses (--ipv6)"
            raise socket.gaierror(error.errno, f"{error.strerror}; only {asked} were asked for") from None
        if not flags & socket.AI_NUMERICHOST:
            log.debug("conn %d: %s resolves to %s", conn_id, host,
                      ", ".join(str(address[4][0]) for address in addresses))
        return addresses

    def connect_first(self, addresses: list[AddressInfo], conn_id: int) -> socket.socket:
        """The first of addresses that answers, tried in order; each failure logged at debug.  The
        error of the last when none does."""
        failure: OSError | None = None
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self.timeout)
                sock.connect(address)
            except OSError as error:
                sock.close()
                log.debug("conn %d: %s: %s", conn_id, peer_name(family, address), explain(error))
                failure = error
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise failure or OSError(errno.EHOSTUNREACH, "no address to try")


def peer_name(family: int, address: Address) -> str:
    """The other end of an accepted connection, as the logs name it: tcp HOST:PORT, vsock CID:PORT."""
    if isinstance(address, tuple):  # (host, port, ...) or (cid, port)
        kind = "tcp" if family in (socket.AF_INET, socket.AF_INET6) else "vsock"
        return str(Endpoint(kind, str(address[0]), address[1]))
    # A Unix socket: a qproxy half's connection has the name Vsock.connect gave it.
    # Any local process may pick that name: escaped, it can neither break a log line nor the decoding.
    if isinstance(address, bytes) and address:
        return f"vsock (emulated) @{escaped(address[1:].decode(errors='backslashreplace'))}"
    return "vsock (emulated)"


def dialed_name(far: socket.socket) -> str:
    """What a half dialed, as the far side's log names this connection: the address a TCP far side
    has, or the port (an emulated connection's name) a vsock one sees this half's end come from."""
    if far.family in (socket.AF_INET, socket.AF_INET6):
        return f"connected to {peer_name(far.family, far.getpeername())}"
    local = far.getsockname()
    return f"from @{local[1:].decode()}" if far.family == socket.AF_UNIX else f"from vsock port {local[1]}"


def reset(sock: socket.socket) -> None:
    """Close so that a TCP peer sees a reset (RST), not an orderly end."""
    resetting(sock)
    sock.close()


def resetting(sock: socket.socket) -> None:
    """Make sock's close, whoever does it, reset a TCP peer (SO_LINGER 0) rather than end in order."""
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # closed meanwhile


# ---------------------------------------------------------------------------
# Listeners and admission: what is accepted, what waits for room, what is set up
# ---------------------------------------------------------------------------


class Route(typing.NamedTuple):
    """A listener and where each connection it accepts goes; direction is "inbound", "outbound" or
    "egress", whose connections each ask for a destination, which policy judges.  proxy_protocol: the
    PROXY header ("v1", "v2") written to the far side ahead of the client's bytes, "off" for none;
    accept_proxy_protocol: whether each client begins with one of its own."""

    listen: Endpoint
    target: Endpoint
    direction: str
    policy: Policy | None = None
    proxy_protocol: str = "off"
    accept_proxy_protocol: bool = False

    def headers(self) -> str:
        """What its connections do with PROXY headers, in words for check-config and the log; "" for nothing."""
        words = ["a load balancer's PROXY header (v1 or v2) read first"] if self.accept_proxy_protocol else []
        if self.proxy_protocol != "off":
            words.append(f"the client's address sent ahead in a PROXY {self.proxy_protocol} header")
        return "".join(f"; {word}" for word in words)


DIRECTIONS = ("inbound", "outbound", "egress")


OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# accept() errors that concern one connection only, which went away or a firewall refused.
ACCEPT_SKIPPED = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN}


class Listener:
    """A non-blocking listening socket, and the route and limit of the connections it accepts.

    ``open`` and ``waiting`` count its connections being relayed (or set up)
    and those waiting for room; the Admission changes them under its lock.
    """

    def __init__(self, sock: socket.socket, route: Route | None, limit: int, peer_cid: int,
                 serve: Callable[[socket.socket, Address], None] | None = None):
        sock.setblocking(False)
        self.sock = sock
        self.route = route  # None: the control port, which bounds itself; serve(sock, address) takes each connection
        self.serve = serve
        self.limit = limit  # [limits] connections_per_listener; 0: none of its own
        self.peer_cid = peer_cid  # on AF_VSOCK, the one CID whose connections are accepted
        self.open = self.waiting = 0
        self.label = f"{route.listen} ([limits] connections_per_listener)" if route else "the control port"
        # An emulated vsock port's socket file, and which file it is: removed by hand and made anew by
        # another half meanwhile, the path is that half's, and its file must stay.
        self.path = sock.getsockname() if sock.family == socket.AF_UNIX else None
        self.file = file_identity(self.path) if self.path else None

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def full(self) -> bool:
        return 0 < self.limit <= self.open

    def accept(self) -> tuple[socket.socket, Address] | None:
        """The next connection from the listen queue, or None when there is none now.

        Raises OSError when the process or system is out of descriptors or memory."""
        try:
            return self.sock.accept()
        except OSError as error:
            if error.errno in ACCEPT_SKIPPED:
                return None
            raise

    def allows_peer(self, address: Address) -> bool:
        """On real vsock, only the other half's CID may connect: the host's vsock ports
        are reachable from every VM on the machine, the enclave's from its parent."""
        return self.sock.family != getattr(socket, "AF_VSOCK", None) or (isinstance(address, tuple)
                                                                         and address[0] == self.peer_cid)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):  # removed or replaced meanwhile: nothing of ours left to clean
            if self.path and file_identity(self.path) == self.file:
                os.unlink(self.path)


def file_identity(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def open_listener(endpoint: Endpoint, vsock: Vsock) -> socket.socket:
    """Bind and listen, turning the usual failures into a StartError that says what to do."""
    if endpoint.kind == "tcp":
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
        address: Address = (endpoint.host, endpoint.port)
        what = f"tcp port {endpoint.port}"
    else:
        family = vsock.family
        address = vsock.listen_address(endpoint.port)
        what = f"vsock port {endpoint.port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if endpoint.kind == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if endpoint.host == "::":  # every address of both families, whatever net.ipv6.bindv6only says
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise StartError(f"{what} is already in use: stop what holds it or choose another port") from None
        if error.errno == errno.EACCES:
            raise StartError(
                f"{what} needs privileges: run as root, or grant CAP_NET_BIND_SERVICE, or choose a port above 1023"
            ) from None
        if error.errno == errno.EADDRNOTAVAIL and endpoint.kind == "tcp":
            raise StartError(f"cannot listen on {endpoint}: the address is not on this machine") from None
        raise StartError(f"cannot listen on {endpoint}: {error.strerror or error}") from None
    return sock


class Gate:
    """One direction of a half (inbound or outbound): how many it relays at once (-t), and who waits."""

    def __init__(self, direction: str, limit: int):
        self.direction = direction
        self.limit = limit
        self.label = f"{direction} (-t/--threads)"  # names the limit in the log
        self.open = 0
        self.waiting: collections.deque[Connection] = collections.deque()  # in arrival order

    @property
    def full(self) -> bool:
        return self.open >= self.limit


class Admission:
    """Which accepted connections are set up now, and which wait for room.

    Every connection a listener accepts joins its direction's queue and is
    admitted in arrival order as soon as both its listener and its direction
    have room; inbound and outbound never share a budget, so a request that
    calls out cannot wait for a slot that only its own end would free.  A
    connection that waits longer than queue_timeout is reset.  While the half
    is out of descriptors or threads, nothing is accepted or admitted until a
    connection ends or SHORTAGE_RETRY passes; a connection whose setup found
    none waits again, first in line.

    Only the accept loop accepts and admits; any thread may end a connection
    (release), which wakes the loop when anything waits on that.  ``live``
    holds every connection from its accept to its end: what a stop waits for,
    and what an abort resets.
    """

    def __init__(self, limit: int, queue_timeout: float):
        self.share = math.inf  # descriptors one direction's connections may hold: two each, one while waiting
        self.lock = threading.Lock()
        self.gates = {direction: Gate(direction, limit) for direction in DIRECTIONS}
        self.queue_timeout = queue_timeout or math.inf
        self.live: set[Connection] = set()
        self.ids = itertools.count(1)
        self.short_of: str | None = None  # "descriptors" or "threads" while the half lacks them
        self.short_since = 0.0
        self.ends_wanted = False  # the accept loop waits for ends (a listener paused, a stop): each wakes it
        self.wakeup = Wakeup()

    def budget(self, descriptors: int, directions: int) -> int:
        """Let connections hold at most this many descriptors, an equal share for each of
        directions; return how many connections a share holds.

        Each holds two once its far side is dialed, and a waiting one keeps
        room for its second: accepting with the last descriptor would leave
        nothing to dial with, and the client would be reset for it.  Shared,
        one direction could take every descriptor while its connections wait
        on the other (a request that calls out through the same half), for ever.
        """
        self.share = descriptors // directions
        return max(self.share // 2, 0)

    def room_for_another(self, direction: str) -> bool:
        """Whether direction may accept one more connection, with a descriptor for its dial (from the accept loop)."""
        gate = self.gates[direction]
        return 2 * (gate.open + len(gate.waiting) + 1) <= self.share

    def arrive(self, listener: Listener, route: Route, client: socket.socket, address: Address) -> list[Connection]:
        """Queue a connection just accepted on listener, for route; return those admitted now (from the accept loop)."""
        connection = Connection(next(self.ids), listener, route, client, address)
        gate = self.gates[route.direction]
        with self.lock:
            self.live.add(connection)
            gate.waiting.append(connection)
            listener.waiting += 1
            admitted = self.admit(gate)
            full = None if connection.admitted or self.short_of else gate if gate.full else listener
        if not connection.admitted:
            log.debug("conn %d: waits for room: %s", connection.conn_id, connection.path)
        if full:
            throttled.warning(f"limit {full.label}", "%s: %d connections at once, the limit; more wait for room,"
                              " up to %s", full.label, full.limit, waiting_time(self.queue_timeout))
        return admitted

    def admit_waiting(self) -> list[Connection]:
        """Admit what now has room, in each direction (from the accept loop)."""
        with self.lock:
            return [connection for gate in self.gates.values() for connection in self.admit(gate)]

    def admit(self, gate: Gate) -> list[Connection]:
        """Take waiting connections in arrival order while there is room (under the lock)."""
        admitted: list[Connection] = []
        index = 0
        while index < len(gate.waiting) and not gate.full and self.short_of is None:
            connection = gate.waiting[index]
            listener = connection.listener
            if listener.full:
                index += 1  # a later one, of a listener with room, goes first
                continue
            del gate.waiting[index]
            listener.waiting -= 1
            listener.open += 1
            gate.open += 1
            connection.admitted = True
            admitted.append(connection)
        return admitted

    def release(self, connection: Connection) -> None:
        """A connection ended, or its setup failed (from any thread): its room is free again."""
        listener, gate = connection.listener, self.gates[connection.route.direction]
        freed = []
        with self.lock:
            self.live.discard(connection)
            self.short_of = None  # what it held is free again: try anew
            if connection.admitted:
                connection.admitted = False
                freed = [limit for limit, full in ((gate.label, gate.full), (listener.label, listener.full)) if full]
                listener.open -= 1
                gate.open -= 1
            wake = self.ends_wanted or any(gate.waiting for gate in self.gates.values())
        if wake:
            self.wakeup.wake()
        for limit in freed:
            log.info("%s: below the limit again", limit)

    def requeue(self, connection: Connection, missing: str) -> None:
        """Its setup found no descriptor or thread (from any thread): it waits again, first in line."""
        gate = self.gates[connection.route.direction]
        with self.lock:
            connection.admitted = False
            connection.listener.open -= 1
            gate.open -= 1
            gate.waiting.appendleft(connection)
            connection.listener.waiting += 1
            self.short_of, self.short_since = missing, time.monotonic()
        self.wakeup.wake()

    def lack(self, missing: str) -> None:
        """The half is out of something it needs to take more connections (from the accept loop)."""
        with self.lock:
            self.short_of, self.short_since = missing, time.monotonic()

    def expire(self, now: float) -> float:
        """Reset the connections that waited too long; return when the next one will have (from the accept loop)."""
        with self.lock:
            if self.short_of and now >= self.short_since + SHORTAGE_RETRY:
                self.short_of = None
            expired = self.take_waiting(lambda connection: now >= connection.accepted + self.queue_timeout)
            due = [gate.waiting[0].accepted + self.queue_timeout for gate in self.gates.values() if gate.waiting]
            if self.short_of:
                due.append(self.short_since + SHORTAGE_RETRY)
        for connection in expired:
            reset(connection.client)
            throttled.warning("queue", "conn %d: no room within %g s for %s; resetting the client",
                              connection.conn_id, self.queue_timeout, connection.path)
        return min(due, default=math.inf)

    def cut_waiting(self) -> None:
        """At the end of a stop's grace period: reset every connection still waiting for room."""
        with self.lock:
            cut = self.take_waiting(lambda connection: True)
        for connection in cut:
            reset(connection.client)
            log.info("conn %d cut at the end of the grace period, still waiting for room: %s", connection.conn_id,
                     connection.path)

    def take_waiting(self, due: Callable[[Connection], bool]) -> list[Connection]:
        """Remove the waiting connections that are due, oldest first in each direction (under the lock)."""
        taken = []
        for gate in self.gates.values():
            while gate.waiting and due(gate.waiting[0]):
                connection = gate.waiting.popleft()
                connection.listener.waiting -= 1
                self.live.discard(connection)
                taken.append(connection)
        return taken

    def abort(self) -> None:
        """Make the process's exit reset every live connection's TCP peers (from any thread, even a signal handler)."""
        for connection in list(self.live):  # one C call: no other thread changes the set meanwhile
            connection.abort()


def waiting_time(seconds: float) -> str:
    return "as long as it takes" if seconds == math.inf else f"{seconds:g} s ([limits] queue_timeout)"


class Workers:
    """The threads that set connections up, each kept for the next connection while one comes.

    Starting a thread costs more than the rest of a short connection's setup,
    and threading.Thread.start() would also hold the accept loop until the new
    thread runs.  A worker idle for SETUP_THREAD_IDLE ends, so a burst leaves no
    threads behind.  A job's own errors are its business (it logs them and
    cleans up); an error in the pool itself ends the half through ``fail``.
    """

    def __init__(self, fail: Callable[[str], None]):
        self.jobs: queue.SimpleQueue[tuple[Callable[..., object], tuple[object, ...]]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0  # workers waiting for a job that no queued job has claimed yet
        self.fail = fail

    def run(self, job: Callable[..., object], *args: object) -> None:
        """Run job(*args) in a worker.  RuntimeError when no thread can be started; nothing is queued then."""
        with self.lock:
            start = self.idle == 0
            if not start:
                self.idle -= 1
        if start:
            _thread.start_new_thread(self.guard, ())
        self.jobs.put((job, args))

    def guard(self) -> None:
        try:
            self.work()
        except BaseException:
            self.fail("a setup worker")

    def work(self) -> None:
        while True:
            try:
                job, args = self.jobs.get(timeout=SETUP_THREAD_IDLE)
            except queue.Empty:
                with self.lock:
                    if self.idle:  # no queued job counts on this worker: it may end
                        self.idle -= 1
                        return
                continue
            job(*args)
            with self.lock:
                self.idle += 1


# ---------------------------------------------------------------------------
# Routes and setup: what each half listens on, where it sends what it accepts, and the worker
# that dials the far side of each connection
# ---------------------------------------------------------------------------


def host_routes(config: Config, enclave_cid: str) -> list[Route]:
    routes = [
        Route(Endpoint("tcp", entry.bind_address, entry.host_port), Endpoint("vsock", enclave_cid, entry.vsock_port),
              "inbound", proxy_protocol=entry.proxy_protocol, accept_proxy_protocol=entry.accept_proxy_protocol)
        for entry in config.inbound
    ]
    routes += [
        Route(Endpoint("vsock", "", entry.vsock_port), Endpoint("tcp", entry.hostname, entry.tcp_port), "outbound")
        for entry in config.outbound
    ]
    if config.egress:
        asked = Endpoint("tcp", "any destination the rules allow", 0)
        routes.append(Route(Endpoint("vsock", "", config.egress.vsock_port), asked, "egress",
                            Policy.of(config.egress, "host")))
    return routes


def enclave_routes(config: Config, parent_cid: str) -> list[Route]:
    routes = [
        Route(Endpoint("vsock", "", entry.vsock_port), Endpoint("tcp", "127.0.0.1", entry.enclave_port), "inbound")
        for entry in config.inbound
    ]
    routes += [
        Route(Endpoint("tcp", entry.listen_address, entry.enclave_port),
              Endpoint("vsock", parent_cid, entry.vsock_port), "outbound")
        for entry in config.outbound
    ]
    if config.egress:
        routes.append(Route(Endpoint("tcp", "127.0.0.1", config.egress.proxy_port),
                            Endpoint("vsock", parent_cid, config.egress.vsock_port), "egress",
                            Policy.of(config.egress, "enclave")))
    return routes


# The PROXY protocol (HAProxy's; nginx, Envoy and many servers read it): a header ahead of a
# connection's bytes that says which address and port the client came from, and which it reached.
#
#     v1   PROXY TCP4 SOURCE DESTINATION SOURCE_PORT DESTINATION_PORT\r\n   (TCP6 for IPv6)
#     v2   the 12-byte signature, 0x21 (version 2, PROXY), 0x11 or 0x21 (TCP over IPv4 or IPv6),
#          the length of what follows, the two addresses, the two ports: all in network order
#
# The host half writes one for each inbound connection of an entry with proxy_protocol: only it
# knows the client.  The enclave half carries it like any byte.  With accept_proxy_protocol the host
# half first reads a load balancer's header, v1 or v2, and writes its addresses on.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V1_MAX = 107  # bytes of a v1 header with its CRLF, by the spec: "PROXY UNKNOWN" with two IPv6 addresses
# v2's TCP over IPv4 and over IPv6: the bytes of the two addresses and the two ports after the fixed part.
PROXY_V2_ADDRESSES = {0x11: 12, 0x21: 36}

# An address and a port, as a PROXY header carries each end of a connection.
SocketAddress = tuple[str, int]


def proxy_header(version: str, source: SocketAddress, destination: SocketAddress) -> bytes:
    """The PROXY header of version ("v1" or "v2") for a connection from source to destination.  An
    IPv4 client of a dual-stack listener has IPv4-mapped addresses there: it is written as IPv4."""
    ends = [ipaddress.ip_address(address.partition("%")[0]) for address, _ in (source, destination)]
    ends = [end.ipv4_mapped or end if isinstance(end, ipaddress.IPv6Address) else end for end in ends]
    if ends[0].version != ends[1].version:  # one end mapped, the other not: both as IPv6
        ends = [ipaddress.IPv6Address(f"::ffff:{end}") if end.version == 4 else end for end in ends]
    ports = (source[1], destination[1])
    if version == "v1":
        return f"PROXY TCP{ends[0].version} {ends[0]} {ends[1]} {ports[0]} {ports[1]}\r\n".encode()
    body = ends[0].packed + ends[1].packed + struct.pack("!HH", *ports)
    family = 0x11 if ends[0].version == 4 else 0x21
    return PROXY_V2_SIGNATURE + bytes((0x21, family)) + struct.pack("!H", len(body)) + body


def read_proxy_header(sock: socket.socket, deadline: float) -> tuple[SocketAddress, SocketAddress] | None:
    """Read a PROXY header, v1 or v2, from a blocking sock by deadline, and nothing after it: the
    source and destination it gives, or None when it gives none (a load balancer's own connection, a
    health check: v2 LOCAL, v1 UNKNOWN, or not TCP), and the connection's own addresses stand.

    ValueError when the bytes are no PROXY header or exceed PROXY_HEADER_MAX;
    EOFError and socket.timeout as read_exactly.
    """
    start = read_exactly(sock, 6, deadline)
    if start == b"PROXY ":
        return parse_proxy_v1(start + read_through(sock, b"\r\n", PROXY_V1_MAX - len(start), deadline))
    if start != PROXY_V2_SIGNATURE[:6]:
        raise ValueError("no PROXY header")
    fixed = start + read_exactly(sock, 10, deadline)
    length = struct.unpack("!H", fixed[14:])[0]
    if fixed[:12] != PROXY_V2_SIGNATURE or fixed[12] >> 4 != 2 or fixed[12] & 0xF > 1:
        raise ValueError("no PROXY header of version 1 or 2")
    if len(fixed) + length > PROXY_HEADER_MAX:
        raise ValueError(f"a PROXY header of {len(fixed) + length} bytes, over {PROXY_HEADER_MAX}")
    body = read_exactly(sock, length, deadline)
    if fixed[13] >> 4 > 3 or fixed[13] & 0xF > 2:
        raise ValueError(f"a PROXY v2 header of address family and protocol {fixed[13]:#04x}, which is none")
    size = PROXY_V2_ADDRESSES.get(fixed[13])
    if fixed[12] & 0xF == 0 or size is None:  # LOCAL, or UNSPEC, UDP or a Unix socket: no TCP client to name
        return None
    if length < size:
        raise ValueError(f"a PROXY header whose addresses take {length} bytes, not {size}")
    width = size // 2 - 2  # of one address
    source, destination = (str(ipaddress.ip_address(body[at:at + width])) for at in (0, width))
    source_port, destination_port = struct.unpack("!HH", body[size - 4:size])
    return (source, source_port), (destination, destination_port)


def parse_proxy_v1(line: bytes) -> tuple[SocketAddress, SocketAddress] | None:
    """A v1 header, its CRLF included: as read_proxy_header.  What follows UNKNOWN is ignored, as the
    specification says; an address is no more than the digits, dots and colons of its family."""
    if line.startswith(b"PROXY UNKNOWN ") or line == b"PROXY UNKNOWN\r\n":
        return None
    words = line[:-2].decode("ascii").split(" ")
    family = {"TCP4": ipaddress.IPv4Address, "TCP6": ipaddress.IPv6Address}.get(words[1])
    if (family is None or len(words) != 6 or not all(re.fullmatch("[0-9A-Fa-f.:]+", word) for word in words[2:4])
            or not all(re.fullmatch("0|[1-9][0-9]{0,4}", port) for port in words[4:])):
        raise ValueError("a PROXY v1 header that is not PROXY TCP4|TCP6 SOURCE DESTINATION PORT PORT")
    source, destination = (str(family(address)) for address in words[2:4])  # ValueError when not of family
    source_port, destination_port = (int(port) for port in words[4:])
    if max(source_port, destination_port) > TCP_PORT_RANGE[1]:
        raise ValueError("a PROXY v1 header with a port over 65535")
    return (source, source_port), (destination, destination_port)


class Connector:
    """Sets up each admitted connection: dial its far side, and once that answers hand both sockets
    to the reactor.  Whatever goes wrong ends this connection only: its client is reset, its room freed.

    A far side with no name to resolve (vsock, an IP literal) is dialed from the accept loop without
    blocking, and the reactor sees the connect through, so a short connection never waits for a
    thread; a hostname is dialed in a worker (``set_up``), as its resolution may block, and so is
    the far side of a client that must first send a PROXY header (``take_header``).
    """

    def __init__(self, dialer: Dialer, admission: Admission, limits: Limits):
        self.dialer = dialer
        self.admission = admission
        self.reactor = Reactor(limits.idle_timeout, limits.buffer_memory * 1024 * 1024, admission.release,
                               self.opened, self.failed)

    def start(self, connection: Connection) -> None:
        """Dial without blocking (from the accept loop): the reactor sees a connect in progress through."""
        try:
            self.prepare(connection)
            far, answered = self.dialer.start(connection.route.target)
            connection.dial(far, time.monotonic() + (self.dialer.timeout or math.inf))
            if answered:  # a Unix socket, at once
                self.opened(connection)
        except Exception as error:
            self.failed(connection, error)
            return
        self.reactor.hand_over(connection)

    def set_up(self, connection: Connection) -> None:
        """Resolve the target's name and dial it (in a worker: this may block)."""
        target = connection.route.target
        try:
            self.prepare(connection)
            connection.dial(self.dialer.connect_tcp(target.host, target.port, connection.conn_id), math.inf)
            self.opened(connection)
        except Exception as error:
            self.failed(connection, error)
            return
        self.reactor.hand_over(connection)

    def take_header(self, connection: Connection) -> None:
        """Read the PROXY header a load balancer sends ahead of its client's bytes (in a worker: they
        may come slowly), then dial as start() does; a client without a valid one is reset."""
        try:
            connection.proxied = read_proxy_header(connection.client, time.monotonic() + PROXY_HEADER_TIMEOUT)
        except (OSError, EOFError, ValueError) as error:
            why = ("the client ended first" if isinstance(error, EOFError)
                   else f"none within {PROXY_HEADER_TIMEOUT:g} s" if isinstance(error, socket.timeout)
                   else explain(error) if isinstance(error, OSError) else str(error))
            throttled.warning_or_info("proxy header", "conn %d: no PROXY header (accept_proxy_protocol): %s;"
                                      " resetting the client: %s", connection.conn_id, escaped(why), connection.path)
            reset(connection.client)
            self.admission.release(connection)
            return
        except Exception as error:  # a bug: this connection ends, the half goes on
            self.failed(connection, error)
            return
        connection.header_taken = True
        if connection.proxied:
            source = Endpoint("tcp", *connection.proxied[0])
            connection.path = f"{source} via {connection.path}"
        self.start(connection)

    @staticmethod
    def prepare(connection: Connection) -> None:
        log.debug("conn %d: dialing for %s", connection.conn_id, connection.path)
        if connection.client.family != socket.AF_UNIX and connection.route.listen.kind == "tcp":
            connection.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def opened(connection: Connection) -> None:
        """The far side answered: its PROXY header, if the route has one, goes first; the reactor
        moves the bytes from here on."""
        far = typing.cast(socket.socket, connection.far)
        version = connection.route.proxy_protocol
        if version != "off":
            ends = connection.proxied or (connection.address[:2], connection.client.getsockname()[:2])
            header = proxy_header(version, *ends)
            # The socket was just connected, its buffer empty: a few hundred bytes always fit.
            if far.send(header) != len(header):
                raise OSError(errno.EAGAIN, "the far side took only part of the PROXY header")
        dialed = dialed_name(far)
        connection.relay(far)
        log.info("conn %d opened: %s, %s", connection.conn_id, connection.path, dialed)

    def failed(self, connection: Connection, error: Exception) -> None:
        """Its setup failed (in any thread): this connection ends, or waits again for a descriptor."""
        if connection.far is not None:
            connection.far.close()
            connection.far = None
        target = connection.route.target
        if not isinstance(error, OSError):  # a bug: this connection ends, the half goes on
            log.error("conn %d: unexpected error while setting it up: %s", connection.conn_id, explain(error))
            log.debug("conn %d: traceback", connection.conn_id, exc_info=error)
        elif error.errno in OUT_OF_RESOURCES and connection.route.direction != "egress":
            # Not the target's fault: wait for a descriptor.  (An egress request was read already: it
            # cannot be asked again, and the client has its answer.)
            throttled.warning("short", "conn %d: cannot dial %s: %s; connections wait until one ends",
                              connection.conn_id, target, explain(error))
            self.admission.requeue(connection, "descriptors")
            return
        else:
            throttled.warning_or_info(f"reach {target}", "conn %d: cannot reach %s: %s; resetting the client",
                                      connection.conn_id, target, explain(error))
        reset(connection.client)
        self.admission.release(connection)


# ---------------------------------------------------------------------------
# Egress: a client's request on the proxy port, the rules of each half, and the one line
# each way between the halves before the bytes flow
# ---------------------------------------------------------------------------
# The enclave half takes an HTTP CONNECT or SOCKS5 request on its proxy port,
# judges the destination by its own rules, and asks the host half on the egress
# vsock port with one line; the host half judges it by its rules, resolves the
# name, drops every address the rules refuse, dials the rest in order and answers
# with one line; the enclave half judges the address the host half reached, and
# answers its client.  Then the two sockets go to the reactor, as any other
# connection's do.  Both run in a setup worker, each bounded in size and time.
#
#     enclave -> host   qproxy-egress 1 HOST PORT\n
#     host -> enclave   qproxy-egress 1 STATUS DETAIL\n
#
# HOST is a name in its IDNA form or an IP address; STATUS is an outcome below;
# DETAIL is "ADDRESS PORT NAME" for connected (the address reached, the name the resolver answered
# for), else the reason, in words.

EGRESS_PREFIX = "qproxy-egress 1 "

# Address ranges that are not the public internet (IANA's special-purpose registries, NAT64, 6to4):
# an address there is dialed only when an address rule within them allows it, so that no name
# leads a request to the parent's loopback, its private networks or a metadata service.
SPECIAL_RANGES = tuple(ipaddress.ip_network(text) for text in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4",
    "::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "2002::/16",
    "fc00::/7", "fe80::/10", "ff00::/8",
))

# What each outcome of a request is to a client: (HTTP status, SOCKS5 reply code, RFC 9209 Proxy-Status error).
EGRESS_OUTCOMES = {
    "connected": (200, 0x00, ""),
    "denied": (403, 0x02, "http_request_denied"),
    "no-such-host": (502, 0x04, "dns_error"),
    "refused": (502, 0x05, "connection_refused"),
    "host-unreachable": (502, 0x04, "destination_unavailable"),
    "network-unreachable": (502, 0x03, "destination_ip_unroutable"),
    "timed-out": (504, 0x06, "connection_timeout"),
    "failed": (502, 0x01, "proxy_internal_error"),
    # The enclave half's own, about the request itself.
    "bad-request": (400, 0x01, "http_request_error"),
    "bad-command": (501, 0x07, "http_request_error"),
    "bad-address-type": (400, 0x08, "http_request_error"),
    "too-large": (431, 0x01, "http_request_error"),
    "too-slow": (408, 0x01, "http_request_error"),
}
# What the host half may answer: the outcomes above the enclave half's own.
HOST_OUTCOMES = ("connected", "denied", "no-such-host", "refused", "host-unreachable", "network-unreachable",
                 "timed-out", "failed")
HTTP_REASONS = {200: "Connection established", 400: "Bad Request", 403: "Forbidden", 408: "Request Timeout",
                431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
                504: "Gateway Timeout"}
# A dial's error, as an outcome.
DIAL_OUTCOMES = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timed-out", errno.EHOSTUNREACH: "host-unreachable",
                 errno.ENETUNREACH: "network-unreachable"}


def special_range(address: IPAddress) -> IPNetwork | None:
    return next((network for network in SPECIAL_RANGES if address in network), None)


def within_special(network: IPNetwork) -> bool:
    """Whether network lies inside one of SPECIAL_RANGES: only such an allow rule lets an address there through."""
    return any(network.version == wider.version and network.subnet_of(wider)  # type: ignore[arg-type]
               for wider in SPECIAL_RANGES)


class Policy(typing.NamedTuple):
    """One half's egress rules: a deny rule that matches decides, then an allow rule; nothing else passes.

    A destination is judged as asked for (a name by the name rules, an address
    by the address rules), and then each address it is dialed at: no deny rule
    may match it, and an address in SPECIAL_RANGES needs an address rule of
    allow that lies within them too (10.0.0.0/8, not 0.0.0.0/0).
    """

    whose: str  # "the enclave half's" or "the host half's": which rules a reason names
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]

    @classmethod
    def of(cls, egress: Egress, role: str) -> Policy:
        return cls(f"the {role} half's", tuple(map(parse_rule, egress.allow)), tuple(map(parse_rule, egress.deny)))

    def __str__(self) -> str:
        return "; ".join(f"{what} " + (", ".join(rule.text for rule in rules) or "nothing")
                         for what, rules in (("allow", self.allow), ("deny", self.deny)))

    def judge(self, host: str, port: int) -> tuple[bool, str]:
        """Whether a destination (canonical: see destination()) may be asked for, and the rule that says so."""
        address = canonical_address(host) if is_ip_literal(host) else None
        denied = self.denies(host, port)
        if denied:
            return False, denied
        for rule in self.allow:
            if rule.matches(host, address, port):
                refused = self.refuses(address, port) if address else None
                return refused is None, refused or f"{self.whose} rule {quoted(rule.text)}"
        return False, f"no allow rule of {self.whose} matches"

    def denies(self, host: str, port: int) -> str | None:
        """The deny rule that matches a destination (canonical), in words; None when none does."""
        address = canonical_address(host) if is_ip_literal(host) else None
        rule = next((rule for rule in self.deny if rule.matches(host, address, port)), None)
        return f"{self.whose} deny rule {quoted(rule.text)}" if rule else None

    def refuses(self, address: IPAddress, port: int) -> str | None:
        """Why address may not be dialed for port, or None when it may."""
        denied = self.denies(str(address), port)
        if denied:
            return f"{address} is denied by {denied}"
        special = special_range(address)
        if special and not any(rule.network and within_special(rule.network) and rule.matches("", address, port)
                               for rule in self.allow):
            return f"{address} is in {special}, which only an address rule of {self.whose} within it allows"
        return None


def destination(host: str) -> str:
    """A destination's host as the rules and the header take it: an address in its usual
    form, or a name in its IDNA form.  ValueError when it is neither."""
    if is_ip_literal(host):
        return str(canonical_address(host))
    return canonical_name(host)


class RequestError(Exception):
    """A request that will not be served: its outcome (a key of EGRESS_OUTCOMES), why, in words, and
    the protocol its client speaks, which the answer must be in ("": none)."""

    def __init__(self, outcome: str, reason: str, protocol: str = "http"):
        super().__init__(reason)
        self.outcome = outcome
        self.protocol = protocol


def remaining(deadline: float) -> float:
    """Seconds left until deadline, for a socket's timeout; socket.timeout when there are none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    return left


def read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    """size bytes from a blocking sock by deadline.  EOFError when it ends first; socket.timeout at the deadline."""
    data = b""
    while len(data) < size:
        sock.settimeout(remaining(deadline))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_through(sock: socket.socket, end: bytes, limit: int, deadline: float) -> bytes:
    """The bytes from a blocking sock up to and including end, at most limit of them, by deadline.

    Only what comes before end is taken: the bytes after it (a client's first
    bytes for the tunnel, a server's greeting) stay in the socket for the reactor.
    ValueError when limit bytes come without end; EOFError, socket.timeout as read_exactly.
    """
    taken, peek = b"", int(socket.MSG_PEEK)
    while True:
        sock.settimeout(remaining(deadline))
        try:
            seen = taken + sock.recv(limit - len(taken) if peek else 1, peek)
        except OSError as error:
            if error.errno != errno.EOPNOTSUPP or not peek:
                raise
            peek = 0  # vsock before Linux 5.5 cannot peek: a byte at a time takes none too many
            continue
        if len(seen) == len(taken):
            raise EOFError
        found = seen.find(end, max(len(taken) - len(end) + 1, 0))
        if found >= 0:
            return taken + read_exactly(sock, found + len(end) - len(taken), deadline) if peek else seen
        if len(seen) >= limit:
            raise ValueError(f"no end within {limit} bytes")
        # None of them is end: take them (taken already, without peeking).
        taken = taken + read_exactly(sock, len(seen) - len(taken), deadline) if peek else seen


class ProxyRequest(typing.NamedTuple):
    """A client's request on the proxy port: its protocol ("http" or "socks5"), and the destination."""

    protocol: str
    host: str
    port: int

    @classmethod
    def read(cls, sock: socket.socket, deadline: float) -> ProxyRequest:
        """Read a request, told apart by its first byte.  RequestError when there is none to serve."""
        protocol = "http"
        try:
            sock.settimeout(remaining(deadline))
            first = sock.recv(1, socket.MSG_PEEK)
            if first == b"\x05":
                protocol = "socks5"
                return cls.socks5(sock, deadline)
            if first.isalpha():
                return cls.http(sock, deadline)
            protocol = ""  # no answer: there is none the client would understand
            hint = "; is the client told https:// for the proxy? It is http://" if first == b"\x16" else ""
            raise RequestError("bad-request", f"neither HTTP nor SOCKS5{hint}" if first else "no request")
        except RequestError as error:
            raise RequestError(error.outcome, str(error), protocol) from None
        except socket.timeout:
            raise RequestError("too-slow", f"no whole request within {EGRESS_REQUEST_TIMEOUT:g} s", protocol) from None
        except ValueError:
            raise RequestError("too-large", f"a request over {EGRESS_REQUEST_MAX} bytes", protocol) from None
        except EOFError:
            raise RequestError("bad-request", "the client ended its request unfinished", protocol) from None

    @classmethod
    def http(cls, sock: socket.socket, deadline: float) -> ProxyRequest:
        """CONNECT HOST:PORT HTTP/1.x and its header lines, which say nothing a tunnel needs."""
        head = read_through(sock, b"\r\n\r\n", EGRESS_REQUEST_MAX, deadline)
        try:
            line = head.partition(b"\r\n")[0].decode()  # a name in UTF-8 is the name SOCKS5 would send
        except UnicodeDecodeError:
            raise RequestError("bad-request", "the request line is neither ASCII nor UTF-8") from None
        request = re.fullmatch(r"(\S+) (\S+) HTTP/1\.[01]", line)
        if not request:
            raise RequestError("bad-request", "not an HTTP/1 request line")
        if request.group(1) != "CONNECT":
            raise RequestError("bad-command", f"{escaped(request.group(1))} requests are not proxied: this"
                               " proxy only tunnels (CONNECT); use https://, or an outbound entry")
        target = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([^\[\]:/@]+):([0-9]{1,5})", request.group(2))
        if not target:
            raise RequestError("bad-request", f"{quoted(request.group(2))} is not HOST:PORT")
        return cls.aimed("http", target.group(1) or target.group(3), int(target.group(2) or target.group(4)))

    @classmethod
    def socks5(cls, sock: socket.socket, deadline: float) -> ProxyRequest:
        """RFC 1928: the methods (only "no authentication" is offered), then CONNECT to an address or a name."""
        _, count = read_exactly(sock, 2, deadline)
        if 0 not in read_exactly(sock, count, deadline):
            sock.sendall(b"\x05\xff")
            raise RequestError("bad-request", "the client offers no method without authentication")
        sock.sendall(b"\x05\x00")
        version, command, _, kind = read_exactly(sock, 4, deadline)
        if version != 5:
            raise RequestError("bad-request", f"SOCKS version {version} in the request")
        if kind == 1:
            host = str(ipaddress.IPv4Address(read_exactly(sock, 4, deadline)))
        elif kind == 4:
            host = str(ipaddress.IPv6Address(read_exactly(sock, 16, deadline)))
        elif kind == 3:
            name = read_exactly(sock, read_exactly(sock, 1, deadline)[0], deadline)
            host = name.decode("utf-8", errors="replace")
        else:
            raise RequestError("bad-address-type", f"address type {kind}")
        port = int.from_bytes(read_exactly(sock, 2, deadline), "big")
        if command != 1:
            raise RequestError("bad-command", f"command {command}: only CONNECT (1) is served")
        return cls.aimed("socks5", host, port)

    @classmethod
    def aimed(cls, protocol: str, host: str, port: int) -> ProxyRequest:
        try:
            canonical = destination(host)
        except ValueError:
            raise RequestError("bad-request", f"{quoted(host)} is neither a DNS name nor an IP address") from None
        if not TCP_PORT_RANGE[0] <= port <= TCP_PORT_RANGE[1]:
            raise RequestError("bad-request", f"port {port}")
        return cls(protocol, canonical, port)


def answer_client(sock: socket.socket, protocol: str, outcome: str, reason: str) -> None:
    """Tell a client on the proxy port how its request ended, as its protocol says (best effort).
    A SOCKS5 client whose request could not be read gets no reply: there is none for that."""
    status, code, error = EGRESS_OUTCOMES[outcome]
    if protocol == "socks5" and outcome in ("bad-request", "too-slow", "too-large"):
        return
    if protocol == "socks5":
        message = bytes((5, code, 0, 1)) + bytes(6)  # bound to 0.0.0.0:0: nothing a client needs
    elif status == 200:
        message = b"HTTP/1.1 200 Connection established\r\n\r\n"
    else:
        details = escaped(reason).replace("\\", "\\\\").replace('"', '\\"')
        body = f"qproxy: {escaped(reason)}\n".encode()
        message = (f"HTTP/1.1 {status} {HTTP_REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                   f'Proxy-Status: qproxy; error={error}; details="{details}"\r\n\r\n').encode() + body
    with contextlib.suppress(OSError):
        sock.settimeout(EGRESS_REQUEST_TIMEOUT)
        sock.sendall(message)


def ask_line(host: str, port: int) -> bytes:
    return f"{EGRESS_PREFIX}{host} {port}\n".encode()


def answer_line(outcome: str, detail: str) -> bytes:
    return f"{EGRESS_PREFIX}{outcome} {escaped(detail)[:EGRESS_REASON_SHOWN]}\n".encode()


def parse_line(line: bytes) -> tuple[str, str]:
    """A header line's two words after the prefix: HOST PORT, or STATUS DETAIL.  ValueError when it is none."""
    text = line.decode("ascii")
    if not text.startswith(EGRESS_PREFIX) or not text.endswith("\n"):
        raise ValueError("no qproxy-egress line")
    first, _, rest = text[len(EGRESS_PREFIX):-1].partition(" ")
    return first, rest


def answered_name(host: str, addresses: list[AddressInfo]) -> str:
    """The name the resolver answered for when asked for host: the name itself, or the one it took
    in its place (a search domain appended, HOSTALIASES, the first name of an /etc/hosts line, a
    CNAME's target), as getaddrinfo's AI_CANONNAME gives it.  Deny rules judge it too."""
    given = addresses[0][3] if addresses else ""
    if not given or is_ip_literal(host):
        return host
    try:
        return canonical_name(given)
    except ValueError:  # what no rule can match: it is judged as the name it is
        return given.lower()


def shown_destination(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class EgressSetup:
    """Sets up the connections of the egress ports: in the enclave half (``ask_host``) a client's
    request, in the host half (``dial_asked``) the enclave half's.  Each runs in a setup worker;
    whatever goes wrong ends this connection only, with an answer that says why."""

    def __init__(self, connector: Connector, role: str):
        self.connector = connector
        self.handshake = self.ask_host if role == "enclave" else self.dial_asked

    def set_up(self, connection: Connection) -> None:
        """Set an egress connection up (in a setup worker); an unexpected error (a bug) ends it, not the half."""
        try:
            self.handshake(connection)
        except Exception as error:
            self.connector.failed(connection, error)

    def ask_host(self, connection: Connection) -> None:
        """Read the client's request, judge it by the enclave half's rules, ask the host half on the
        route's vsock port, judge the address it reached, and answer the client."""
        client, target = connection.client, connection.route.target
        policy = typing.cast(Policy, connection.route.policy)
        far: socket.socket | None = None
        self.connector.prepare(connection)
        try:
            request = ProxyRequest.read(client, time.monotonic() + EGRESS_REQUEST_TIMEOUT)
        except RequestError as error:
            self.refuse(connection, None, error.protocol, error)
            return
        except OSError as error:  # the client went away
            self.refuse(connection, None, "http", RequestError("failed", explain(error)))
            return
        try:
            asked = shown_destination(request.host, request.port)
            connection.aim(f"{asked} via {target}")
            self.judge(connection, policy, request.host, request.port)
            try:
                far = self.connector.dialer.vsock.connect(int(target.host), target.port, self.connector.dialer.timeout)
                far.sendall(ask_line(request.host, request.port))
                status, detail = parse_line(read_through(far, b"\n", EGRESS_HEADER_MAX,
                                                         time.monotonic() + EGRESS_ANSWER_TIMEOUT))
            except socket.timeout:
                raise RequestError("timed-out", f"the host half gave no answer for {asked} in time") from None
            except (OSError, EOFError, ValueError, UnicodeDecodeError) as error:
                why = explain(error) if isinstance(error, OSError) else "no answer (has its file an [egress] table?)"
                raise RequestError("failed", f"the host half, on {target}: {why}") from None
            if status != "connected":
                raise RequestError(status if status in HOST_OUTCOMES else "failed", detail)
            address, _, port_and_name = detail.partition(" ")  # ADDRESS PORT NAME
            answered = port_and_name.partition(" ")[2]
            try:
                refused = policy.refuses(canonical_address(address), request.port)
            except ValueError:
                raise RequestError("failed", f"the host half reached {quoted(address)}, which is no address") from None
            if refused:
                raise RequestError("denied", f"the host half reached {refused}")
            denied = policy.denies(answered, request.port) if answered else None
            if denied:
                raise RequestError("denied", f"{asked} is denied: the host half's resolver answered for"
                                   f" {quoted(answered)}, which {denied} denies")
        except RequestError as error:
            self.refuse(connection, far, request.protocol, error)
            return
        answer_client(client, request.protocol, "connected", "")
        connection.dial(far, math.inf)
        self.connector.opened(connection)
        self.connector.reactor.hand_over(connection)

    def dial_asked(self, connection: Connection) -> None:
        """Read what the enclave half asks for, judge it by the host half's rules, resolve it, dial
        the addresses the rules let through in the resolver's order, and answer with the outcome."""
        asker, dialer = connection.client, self.connector.dialer
        policy = typing.cast(Policy, connection.route.policy)
        try:
            host, port_text = parse_line(read_through(asker, b"\n", EGRESS_HEADER_MAX,
                                                      time.monotonic() + EGRESS_REQUEST_TIMEOUT))
            port = int(port_text) if re.fullmatch("[0-9]{1,5}", port_text) else 0
            if destination(host) != host or not TCP_PORT_RANGE[0] <= port <= TCP_PORT_RANGE[1]:
                raise ValueError
        except (OSError, EOFError, ValueError, UnicodeDecodeError):
            throttled.warning("egress header", "conn %d: the enclave half's request on %s is no qproxy-egress line;"
                              " closing it (is the other end a qproxy enclave half of this version?)",
                              connection.conn_id, connection.route.listen)
            asker.close()
            self.connector.admission.release(connection)
            return
        connection.aim(f"tcp {shown_destination(host, port)}")
        far = None
        try:
            self.connector.prepare(connection)
            self.judge(connection, policy, host, port)
            try:
                addresses = dialer.resolve(host, port, connection.conn_id, socket.AI_CANONNAME)
            except socket.gaierror as error:
                raise RequestError("no-such-host", f"{host}: {explain(error)}") from None
            answered = answered_name(host, addresses)
            denied = policy.denies(answered, port)
            if denied:  # a search domain, an alias or a CNAME took the name where a deny rule says no
                raise RequestError("denied", f"{shown_destination(host, port)} is denied: the resolver answered"
                                   f" for {answered}, which {denied} denies")
            refusals = [policy.refuses(canonical_address(address[4][0]), port) for address in addresses]
            for refused in filter(None, refusals):
                log.info("conn %d: not dialed: %s", connection.conn_id, refused)
            if all(refusals):  # which addresses the parent's resolver gave is the parent's business
                raise RequestError("denied", f"{host} resolves to no address that {policy.whose} rules allow")
            try:
                far = dialer.connect_first([a for a, refused in zip(addresses, refusals) if not refused],
                                           connection.conn_id)
            except OSError as error:
                timed_out = isinstance(error, socket.timeout)
                outcome = "timed-out" if timed_out else DIAL_OUTCOMES.get(error.errno or 0, "failed")
                raise RequestError(outcome, f"{shown_destination(host, port)}: {explain(error)}") from None
            reached = far.getpeername()
            asker.settimeout(EGRESS_REQUEST_TIMEOUT)
            asker.sendall(answer_line("connected", f"{reached[0]} {reached[1]} {answered}"))
        except (RequestError, OSError) as error:  # OSError: the enclave half or the far side went away
            failure = error if isinstance(error, RequestError) else RequestError("failed", explain(error))
            with contextlib.suppress(OSError):
                asker.settimeout(EGRESS_REQUEST_TIMEOUT)
                asker.sendall(answer_line(failure.outcome, str(failure)))
            self.refuse(connection, far, "", failure)
            return
        connection.dial(far, math.inf)
        self.connector.opened(connection)
        self.connector.reactor.hand_over(connection)

    @staticmethod
    def judge(connection: Connection, policy: Policy, host: str, port: int) -> None:
        """Log the rules' decision; RequestError when they deny the destination."""
        allowed, why = policy.judge(host, port)
        asked = shown_destination(host, port)
        if not allowed:
            raise RequestError("denied", f"{asked} is denied: {why}")
        log.info("conn %d: %s allowed by %s", connection.conn_id, asked, why)

    def refuse(self, connection: Connection, far: socket.socket | None, protocol: str, error: RequestError) -> None:
        """End a connection that will not be relayed; a client of the proxy port (protocol "http" or
        "socks5"; "" for the host half's, answered already) is told why, as its protocol can say it."""
        if protocol:
            answer_client(connection.client, protocol, error.outcome, str(error))
        if far is not None:
            far.close()
        connection.client.close()
        self.connector.admission.release(connection)
        throttled.warning_or_info(f"egress {error.outcome}", "conn %d %s: %s: %s", connection.conn_id,
                                  error.outcome, connection.path, error)


# ---------------------------------------------------------------------------
# The data path: one reactor thread moves the bytes of every connection
# ---------------------------------------------------------------------------

# epoll's events.  A hang-up or an error counts as readiness both ways, as selectors counts it: the
# next read or write then says what happened.
IN, OUT = select.EPOLLIN, select.EPOLLOUT
READABLE, WRITABLE = ~OUT, ~IN
SPLICE = hasattr(os, "splice")  # Python 3.10 and newer; 3.9 copies every byte
splice = typing.cast(Callable[..., int], getattr(os, "splice", None))
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
SPLICE_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}  # a kernel that cannot splice this socket


class Pipe:
    """A pipe through which a flow splices its bytes, so that they never enter Python."""

    __slots__ = ("reader", "writer")

    def __init__(self) -> None:
        self.reader, self.writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # above the user's pipe quota: the default size does too
            fcntl.fcntl(self.writer, fcntl.F_SETPIPE_SZ, BUFFER_SIZE)  # type: ignore[attr-defined]

    def close(self) -> None:
        os.close(self.reader)
        os.close(self.writer)


class Buffers:
    """The reactor's room for bytes that wait for a slow destination, within a budget.

    A flow reads into ``scratch`` and sends at once; only what its destination
    does not take is copied into a buffer of its own, given back once sent.  A
    bulk flow holds a pipe instead (see Flow.splice), which counts as one
    buffer.  So only lagging and bulk flows hold memory, and the budget, not
    the number of connections, bounds it.  Each buffer is an anonymous mmap:
    its pages go back to the system when it is dropped, which freed heap
    memory does not promise.  When the budget is spent, a flow moves its bytes
    through ``scratch`` without keeping any (see Flow.pump_in_place).
    """

    def __init__(self, budget: int):
        self.limit: float = max(budget // BUFFER_SIZE, 1)  # math.inf once unbounded
        self.lent = 0  # buffers and pipes in use
        self.spare: list[memoryview] = []
        self.scratch = memoryview(bytearray(BUFFER_SIZE))
        self.pipes = 0  # pipes open: two descriptors each, and one buffer's room
        self.pipe_limit = SPLICE_PIPES if SPLICE else 0  # see allow_pipes()

    def room(self) -> bool:
        return self.lent < self.limit

    def take(self) -> memoryview:
        """A buffer; only when room() said there is one."""
        self.lent += 1
        return self.spare.pop() if self.spare else memoryview(mmap.mmap(-1, BUFFER_SIZE))

    def give(self, buffer: memoryview) -> None:
        self.lent -= 1
        if len(self.spare) < SPARE_BUFFERS:
            self.spare.append(buffer)
        # else the last reference goes with the caller's, and the mapping with it

    def allow_pipes(self, descriptors: int) -> int:
        """Let pipes take at most a quarter of the descriptors that connections may hold, and
        SPLICE_PIPES; return the descriptors they may take (from the accept loop, at start)."""
        self.pipe_limit = min(self.pipe_limit, descriptors // 8)
        return 2 * self.pipe_limit

    def take_pipe(self) -> Pipe | None:
        """A pipe for a bulk flow, while the budget and the pipes' descriptors allow; it counts as a buffer."""
        if not self.room() or self.pipes >= self.pipe_limit:
            return None
        try:
            pipe = Pipe()
        except OSError:  # out of descriptors or pipe memory: this flow copies
            return None
        self.lent += 1
        self.pipes += 1
        return pipe

    def give_pipe(self, pipe: Pipe) -> None:
        """Closed, not kept: a half whose connections have ended holds no descriptor more than before them."""
        pipe.close()
        self.lent -= 1
        self.pipes -= 1

    def unbounded(self, error: OSError) -> None:
        """The kernel cannot peek at a socket (vsock before Linux 5.5): lend buffers beyond the budget."""
        if self.limit != math.inf:
            self.limit = math.inf
            log.warning("cannot peek at a socket here (%s; vsock needs Linux 5.5 or newer): buffer memory is no"
                        " longer bounded by [limits] buffer_memory", explain(error))


class Flow:
    """One direction of a connection: bytes read from src go to dst, at once where dst takes them.

    ``lagging`` while bytes wait for dst: in ``buffer`` (from ``start`` to
    ``end``), in ``pipe`` (``piped`` of them), or unread in src (``blocked``:
    the budget was spent).  Then the flow waits for dst to take more, and reads
    nothing meanwhile: backpressure is the sockets' own.
    """

    __slots__ = ("blocked", "buffer", "done", "dst", "end", "eof", "lagging", "pipe", "piped", "splices",
                 "src", "start", "total")

    def __init__(self, src: socket.socket, dst: socket.socket):
        self.src, self.dst = src, dst
        self.buffer: memoryview | None = None
        self.start = self.end = 0
        self.pipe: Pipe | None = None
        self.piped = 0
        self.splices = SPLICE  # until the kernel refuses to splice one of these sockets
        self.blocked = self.lagging = False
        self.eof = self.done = False
        self.total = 0  # bytes taken from src

    def pump(self, buffers: Buffers) -> None:
        """Move what can move without blocking.  EOF is only noted: the Connection decides how to pass it on."""
        if self.buffer is not None:
            self.send_held(buffers)
        elif self.pipe is not None:
            self.splice(buffers)
        elif buffers.room():
            self.copy(buffers)
        else:
            self.pump_in_place(buffers)
        self.lagging = self.buffer is not None or self.piped > 0 or self.blocked

    def copy(self, buffers: Buffers) -> None:
        """Read into scratch and send at once; keep only what dst did not take.  A read of bulk
        size makes the flow splice its next bytes, if it can."""
        self.blocked = False
        scratch = buffers.scratch
        try:
            received = self.src.recv_into(scratch)
        except BlockingIOError:
            return
        if received == 0:
            self.eof = True
            return
        self.total += received
        sent = self.send(scratch[:received])
        if sent < received:
            self.buffer, self.start, self.end = buffers.take(), 0, received - sent
            self.buffer[: self.end] = scratch[sent:received]
        if received >= SPLICE_FROM and self.splices:
            self.pipe = buffers.take_pipe()  # used once the buffer, if any, has gone

    def send(self, data: memoryview) -> int:
        try:
            return self.dst.send(data)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError) as error:
            raise DestinationClosed(error) from error

    def send_held(self, buffers: Buffers) -> None:
        buffer = typing.cast(memoryview, self.buffer)
        self.start += self.send(buffer[self.start : self.end])
        if self.start == self.end:
            buffers.give(buffer)
            self.buffer = None

    def splice(self, buffers: Buffers) -> None:
        """Move bytes through the pipe: src into it while it is empty, then out of it into dst.
        The pipe goes back once a fill falls short of bulk size and dst has taken it all.  A kernel
        that refuses to splice these sockets makes the flow copy, with what the pipe held."""
        pipe = typing.cast(Pipe, self.pipe)
        filled = 0
        if not self.piped:
            try:
                filled = splice(self.src.fileno(), pipe.writer, BUFFER_SIZE, flags=SPLICE_FLAGS)
            except BlockingIOError:
                filled = 0
            except OSError as error:
                if error.errno not in SPLICE_REFUSED:
                    raise
                self.refuse_splice(buffers, error)
                return
            if filled == 0:
                # Nothing though src is readable: an end, or TCP urgent data, at whose mark splice
                # stops for good where recv goes on.  A read says which, and moves past the mark.
                self.release_pipe(buffers)
                self.copy(buffers)
                return
            self.total += filled
            self.piped = filled
        try:
            self.piped -= splice(pipe.reader, self.dst.fileno(), self.piped, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError) as error:
            raise DestinationClosed(error) from error
        except OSError as error:
            if error.errno not in SPLICE_REFUSED:
                raise
            self.refuse_splice(buffers, error)
            return
        if not self.piped and 0 < filled < SPLICE_FROM:
            self.release_pipe(buffers)

    def refuse_splice(self, buffers: Buffers, error: OSError) -> None:
        """Copy from now on; bytes already in the pipe go first, through a buffer (the pipe's room)."""
        log.debug("cannot splice %s to %s (%s): copying", self.src.family.name, self.dst.family.name, explain(error))
        self.splices = False
        pipe = typing.cast(Pipe, self.pipe)
        if self.piped:
            held = os.read(pipe.reader, self.piped)
            self.buffer, self.start, self.end = buffers.take(), 0, len(held)
            self.buffer[: self.end] = held
            self.piped = 0
        self.release_pipe(buffers)

    def release_pipe(self, buffers: Buffers) -> None:
        if self.pipe is not None:
            buffers.give_pipe(self.pipe)
            self.pipe, self.piped = None, 0

    def release(self, buffers: Buffers) -> None:
        """Give back what the flow holds (its connection ended, or its destination went away)."""
        if self.buffer is not None:
            buffers.give(self.buffer)
            self.buffer = None
        self.release_pipe(buffers)
        self.blocked = self.lagging = False

    def pump_in_place(self, buffers: Buffers) -> None:
        """Move bytes while holding none: peek at src, send what dst takes, and only then take that much from src."""
        self.blocked = False
        try:
            received = self.src.recv_into(buffers.scratch, 0, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno != errno.EOPNOTSUPP:
                raise
            buffers.unbounded(error)
            return  # the next turn reads into a buffer
        if received == 0:
            self.eof = True
            return
        sent = self.send(buffers.scratch[:received])
        if sent:
            self.src.recv_into(buffers.scratch, sent)  # the bytes just sent, still first in src
            self.total += sent
        self.blocked = sent < received

    def pass_eof(self) -> None:
        """End dst's direction: the half-close that lets the other direction go on.  A dst that is
        gone already (a reset came) is no error yet: what it sent before may still wait to be read."""
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as error:
            if error.errno not in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
                raise


class DestinationClosed(ConnectionError):
    """A flow's destination would take no more bytes: it closed, or reset (error says which)."""

    def __init__(self, error: OSError):
        super().__init__(error.errno, error.strerror)
        self.error = error


class Sink:
    """Where a flow's bytes go once its destination, which had ended its own side, has closed:
    nowhere, as that peer's kernel would drop them, while the other direction still delivers."""

    @staticmethod
    def send(data: memoryview) -> int:
        return len(data)

    @staticmethod
    def shutdown(how: int) -> None:
        pass


SINK = typing.cast(socket.socket, Sink)  # a flow's destination from then on: it has what a flow calls on one


def stopped_reading(sock: socket.socket) -> bool:
    """Whether sock's peer, the other half, has closed, not only shut its sending side.  On vsock
    (and Unix sockets) a zero-length send says so at once (EPIPE), where poll() shows a closed vsock
    peer no differently from a half-closed one.  Never for TCP: there an end read is an end, and a
    peer's reset shows as an error of its own (ECONNRESET), after the bytes it sent before."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.send(b"")
    except (BrokenPipeError, ConnectionResetError):
        return True
    except BlockingIOError:
        pass
    return False


def unacknowledged(sock: socket.socket) -> int:
    """Bytes sent to sock's TCP peer that it has not acknowledged yet, which a reset would discard;
    0 for vsock, whose bytes are the peer's once sent."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0
    count: int = struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return count


def ended_unread(sock: socket.socket) -> bool:
    """Whether sock's peer has ended its sending side with nothing it sent left to read: its EOF
    waits, unread yet (the reactor turned to the other socket first)."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # nothing there yet (BlockingIOError), a reset, or no peeking here (old vsock)
        return False


class Closed(Exception):
    """A side closed, not only ended its sending side, while this half could still send to it: the
    connection is broken, as a reset would say on TCP.  refused: the far side closed before sending
    a byte, which is how the other half says that it could not reach its target."""

    def __init__(self, side: str, refused: bool):
        super().__init__(f"the {side} closed while the other way was open")
        self.refused = refused


class Cut(Exception):
    """The half ends the connection itself: idle too long, or still open when a stop's grace period ends."""


class Connection:
    """One accepted connection, from accept to its end: the client, the far side once dialed, a flow each way.

    In the reactor it is registered with epoll for what its flows wait for:
    ``masks`` holds the events each socket is registered for (0: not registered,
    as a hang-up nobody waits for would wake the reactor for ever).
    """

    def __init__(self, conn_id: int, listener: Listener, route: Route, client: socket.socket, address: Address):
        self.conn_id, self.listener, self.route, self.client = conn_id, listener, route, client
        self.address = address  # the client's, as accept() gave it: a reset client has no peer name any more
        self.path = f"{peer_name(client.family, address)} -> {route.listen} -> {route.target}"
        self.accepted = time.monotonic()
        self.admitted = False  # counted against its listener's and its direction's limits
        self.far: socket.socket | None = None  # once dialed
        self.deadline = math.inf  # while the reactor sees its connect through: when it times out
        self.up: Flow | None = None  # both flows, once the far side answered
        self.down: Flow | None = None
        self.fds = (client.fileno(), -1)  # client, far: what epoll knows them by, also once closed
        self.masks = [0, 0]
        self.proxied: tuple[SocketAddress, SocketAddress] | None = None  # the client, as a load balancer named it
        self.header_taken = False  # its client's PROXY header is read: a setup tried again must not read another

    def aim(self, target: str) -> None:
        """Name the destination an egress connection asked for, in place of its route's target."""
        self.path = f"{self.path.rpartition(' -> ')[0]} -> {target}"

    def dial(self, far: socket.socket, deadline: float) -> None:
        """The far side is being dialed: the reactor waits until it can write to it, or deadline."""
        self.far, self.deadline = far, deadline
        self.fds = (self.fds[0], far.fileno())

    def relay(self, far: socket.socket) -> None:
        """The far side answered: from here on the reactor moves the bytes."""
        self.far, self.deadline = far, math.inf
        self.fds = (self.fds[0], far.fileno())
        self.client.setblocking(False)
        far.setblocking(False)
        self.started = self.last_active = time.monotonic()  # last_active: when the reactor last moved something
        self.up, self.down = Flow(self.client, far), Flow(far, self.client)

    def wanted(self) -> tuple[int, int]:
        """The events each socket (client, far) waits for now."""
        if self.up is None or self.down is None:
            return 0, OUT  # dialing: the far side is writable once it answered
        client = far = 0
        up, down = self.up, self.down
        if up.lagging:
            far = OUT
        elif not up.eof:
            client = IN
        if down.lagging:
            client |= OUT
        elif not down.eof:
            far |= IN
        return client, far

    def step(self, fd: int, events: int, buffers: Buffers) -> bool:
        """Move what fd's readiness allows; True once both directions have ended.

        Raises OSError when either socket fails and Closed when a side closed
        while the other direction still goes to it; the reactor then resets the
        connection.  A side that only shut its sending side is a half-close:
        the other direction goes on.
        """
        up, down = typing.cast(Flow, self.up), typing.cast(Flow, self.down)
        reading, writing = (up, down) if fd == self.fds[0] else (down, up)  # the flows reading and writing fd
        if events & READABLE and not (reading.lagging or reading.eof):
            self.pump(reading, writing, buffers)
        if events & WRITABLE and writing.lagging:
            self.pump(writing, reading, buffers)
        for flow, back in ((up, down), (down, up)):
            if flow.dst is SINK and back.done and not flow.eof and not unacknowledged(flow.src):
                # What src still sends goes nowhere, and the other way has delivered all it had:
                # end as src's peer, which left, would have had its kernel answer, with a reset.
                raise Closed("client" if flow is down else "far side", refused=False)
            if flow.eof and not flow.done:
                # Before its EOF could pass for an orderly end; but the other way may have ended too,
                # its EOF there and only not read yet, and then both ends are orderly.
                if not back.done and stopped_reading(flow.src) and not ended_unread(back.src):
                    far = flow is down
                    raise Closed("far side" if far else "client", refused=far and not flow.total)
                flow.pass_eof()
        return up.done and down.done

    @staticmethod
    def pump(flow: Flow, back: Flow, buffers: Buffers) -> None:
        try:
            flow.pump(buffers)
        except DestinationClosed as error:
            if not (back.eof and back.total):
                raise error.error from None  # a reset mid-stream, or a refusal: the connection is broken
            # It had said all it had to say, and left: what still comes for it is lost (see step()).
            flow.release(buffers)
            flow.splices = False
            flow.dst = SINK

    def release(self, buffers: Buffers) -> None:
        for flow in (self.up, self.down):
            if flow is not None:
                flow.release(buffers)

    def close(self, error: BaseException | None = None) -> None:
        """Close both sockets (resetting a TCP client after an error) and log the outcome."""
        far = typing.cast(socket.socket, self.far)
        if self.up is None or self.down is None:  # cut while dialing
            reset(self.client)
            far.close()
            log.info("conn %d cut %s while dialing: %s", self.conn_id, error, self.path)
            return
        if isinstance(error, Closed) and error.refused:
            outcome = f"refused by {self.route.target} (the far side closed at once)"
            reset(self.client)
        elif error is not None:
            outcome = f"cut {error}" if isinstance(error, Cut) else f"reset ({explain(error)})"
            reset(self.client)
            reset(far)
        else:
            outcome = "closed"
        self.client.close()
        far.close()
        log.info(
            "conn %d %s: %s, %d bytes up, %d bytes down, %.3f s",
            self.conn_id, outcome, self.path, self.up.total, self.down.total, time.monotonic() - self.started,
        )

    def abort(self) -> None:
        """Make the process's exit reset this connection's TCP peers (from any thread, at any stage)."""
        for sock in (self.client, self.far):
            if sock is not None:
                resetting(sock)


class Reactor(threading.Thread):
    """The one thread that moves the bytes of every established connection of this process.

    It waits in epoll for every socket of its connections, registered for
    what each waits for and nothing else, and steps the connection a ready
    socket belongs to.  One thread polling every socket does no GIL hand-offs
    between connections, which is what made many small exchanges slow when
    each connection had threads of its own.  A connection arrives with its far
    side answered (a worker resolved and dialed it) or still being dialed; the
    reactor then waits until the far side is writable, or the connect times out.

    With an idle timeout the reactor also looks over its connections a few
    times per timeout and cuts those that moved nothing for that long.
    Any error outside one connection's own bytes ends the thread, and with it
    the half (see Half.fail): a half that accepts what it no longer relays
    would be the worst failure of all.
    """

    def __init__(self, idle_timeout: float, buffer_memory: int, ended: Callable[[Connection], None],
                 opened: Callable[[Connection], None], failed: Callable[[Connection, Exception], None]):
        super().__init__(name="reactor", daemon=True)
        self.epoll = select.epoll()
        self.buffers = Buffers(buffer_memory)
        self.ended = ended  # told of every connection that ended here
        self.opened = opened  # told of every connect seen through here that succeeded (see Connector)
        self.failed = failed  # and of every one that failed or timed out
        self.owners: dict[int, Connection] = {}  # descriptor -> the connection it belongs to
        self.dialing: dict[Connection, None] = {}  # connects seen through here, oldest first
        self.arrivals: collections.deque[Connection] = collections.deque()
        self.wakeup = Wakeup()
        self.epoll.register(self.wakeup.reader.fileno(), IN)
        self.idle_timeout = idle_timeout  # 0: never
        # A connection is cut between idle_timeout and idle_timeout + sweep_interval after its last byte.
        self.sweep_interval = min(max(idle_timeout / 4, IDLE_SWEEP[0]), IDLE_SWEEP[1]) if idle_timeout else math.inf
        self.cutting = False  # set once, when a stop's grace period ends: every connection is cut

    def hand_over(self, connection: Connection) -> None:
        """Take over a connection whose far side answered or is being dialed (from any thread)."""
        self.arrivals.append(connection)
        self.wakeup.wake()

    def cut_all(self) -> None:
        """Cut every connection, and those still to arrive (from any thread): TCP peers see a reset."""
        self.cutting = True
        self.wakeup.wake()

    def run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_interval
        while True:
            wake_at = min(next_sweep, next(iter(self.dialing)).deadline if self.dialing else math.inf)
            timeout = -1 if wake_at == math.inf else max(wake_at - time.monotonic(), 0)
            now = self.step_ready(self.epoll.poll(timeout))
            if self.dialing:
                self.time_out_dials(now)
            if now >= next_sweep:
                self.cut_idle(now)
                next_sweep = now + self.sweep_interval

    def step_ready(self, ready: list[tuple[int, int]]) -> float:
        """Step every connection that is ready; return the time.  Arrivals join after the round: a
        descriptor closed in it may be a new connection's already, and its events are the old one's."""
        now = time.monotonic()
        owners, buffers, arrived = self.owners, self.buffers, False
        for fd, events in ready:
            connection = owners.get(fd)
            if connection is None:
                arrived = arrived or fd == self.wakeup.reader.fileno()
                continue  # else closed earlier in this same round
            if connection.up is None:
                self.dialed(connection)
                continue
            connection.last_active = now
            try:
                if connection.step(fd, events, buffers):
                    self.finish(connection)
                else:
                    self.watch(connection)
            except Exception as error:  # OSError and Closed; anything else is a bug, logged
                if not isinstance(error, (OSError, Closed)):
                    log.error("conn %d: unexpected error: %s", connection.conn_id, explain(error))
                    log.debug("conn %d: traceback", connection.conn_id, exc_info=True)
                self.finish(connection, error)
        if arrived:
            self.take_arrivals()
        return now

    def take_arrivals(self) -> None:
        self.wakeup.clear()
        while self.arrivals:
            connection = self.arrivals.popleft()
            for fd in connection.fds:
                self.owners[fd] = connection
            if connection.up is None:
                self.dialing[connection] = None
            try:
                self.watch(connection)
            except Exception as error:  # a socket epoll refuses: end this connection, not the reactor
                self.finish(connection, error)
        if self.cutting:
            cut = Cut("at the end of the grace period")
            for connection in set(self.owners.values()):
                self.finish(connection, cut)

    def dialed(self, connection: Connection) -> None:
        """The far side of a connection being dialed is writable: it answered, or failed."""
        del self.dialing[connection]
        try:
            error = typing.cast(socket.socket, connection.far).getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
            self.opened(connection)
        except Exception as failure:
            self.forget(connection)  # before its far side closes
            self.failed(connection, failure)
            return
        self.watch(connection)

    def time_out_dials(self, now: float) -> None:
        while self.dialing:
            connection = next(iter(self.dialing))
            if connection.deadline > now:
                return
            self.forget(connection)
            self.failed(connection, socket.timeout(errno.ETIMEDOUT, "timed out"))

    def cut_idle(self, now: float) -> None:
        idle = Cut(f"after {self.idle_timeout:g} s idle")
        connections = {c for c in self.owners.values() if c.up is not None and now - c.last_active >= self.idle_timeout}
        for connection in connections:
            self.finish(connection, idle)

    def watch(self, connection: Connection) -> None:
        """Register the connection's sockets for what it now waits for, and only that."""
        masks = connection.masks
        for side, wanted in enumerate(connection.wanted()):
            if wanted != masks[side]:
                fd = connection.fds[side]
                if not wanted:
                    self.epoll.unregister(fd)
                elif masks[side]:
                    self.epoll.modify(fd, wanted)
                else:
                    self.epoll.register(fd, wanted)
                masks[side] = wanted

    def forget(self, connection: Connection) -> None:
        """Take the connection's sockets out of epoll and the reactor, before they close or are given back."""
        self.dialing.pop(connection, None)
        for side, fd in enumerate(connection.fds):
            if self.owners.get(fd) is connection:
                del self.owners[fd]
            if connection.masks[side]:
                self.epoll.unregister(fd)
                connection.masks[side] = 0

    def finish(self, connection: Connection, error: BaseException | None = None) -> None:
        self.forget(connection)
        connection.release(self.buffers)
        connection.close(error)
        self.ended(connection)


# ---------------------------------------------------------------------------
# Control channel: hello, heartbeats, the enclave's log records
# ---------------------------------------------------------------------------
# What a peer on the control link can cause, and no more: log lines, made safe by
# escaped() and cut, at most CONTROL_MESSAGE_RATE messages and CONTROL_BYTE_RATE
# bytes a second; the interval its heartbeats are expected at, within
# HEARTBEAT_RANGE; the host half's systemd status text, naming the enclave
# half's version; in the enclave half, the confirmation of log records the host
# half says it wrote.  No message opens, closes or changes a data connection, a
# listener or the configuration: the data path never reads this section.

CONTROL_PROTOCOL = 2


def encode_message(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def send_message(sock: socket.socket, message: Message) -> None:
    sock.sendall(encode_message(message))


class MessageReader:
    """Reads the control protocol's messages: JSON objects with a type, one a line, each bounded."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pending = b""

    def read(self, deadline: float) -> Message | None:
        """The next message, or None at EOF; ValueError for anything that is not one,
        socket.timeout when the deadline (a time.monotonic() value) passes first."""
        while b"\n" not in self.pending:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if not self.receive():
                return None
        return self.next_message()

    def receive(self) -> int:
        """Take what one recv() gives; how many bytes that was, 0 at EOF."""
        chunk = self.sock.recv(CONTROL_MAX_MESSAGE)
        if not chunk:
            if self.pending:
                raise ValueError("a message cut short")
            return 0
        self.pending += chunk
        if b"\n" not in self.pending and len(self.pending) > CONTROL_MAX_MESSAGE:
            raise ValueError(f"a message over {CONTROL_MAX_MESSAGE} bytes")
        return len(chunk)

    def messages(self) -> Iterator[Message]:
        """Every whole message received so far."""
        while b"\n" in self.pending:
            yield self.next_message()

    def next_message(self) -> Message:
        line, _, self.pending = self.pending.partition(b"\n")
        if len(line) > CONTROL_MAX_MESSAGE:
            raise ValueError(f"a message over {CONTROL_MAX_MESSAGE} bytes")
        try:
            message = json.loads(line)  # json.JSONDecodeError is a ValueError
        except RecursionError:
            raise ValueError("a message nested too deeply") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ValueError("a message without a type")
        return message


def log_arrival(again: bool, message: str, *args: object) -> None:
    """Log that the other half arrived: message's first %s is "" or " again".

    At info the first time, a warning after that: at the default level (warn)
    an operator who saw the other half leave must also see it return.
    """
    log.log(logging.WARNING if again else logging.INFO, message, " again" if again else "", *args)


def hello(role: str, **more: object) -> Message:
    return {"type": "hello", "protocol": CONTROL_PROTOCOL, "role": role, "version": __version__,
            "heartbeat": HEARTBEAT_INTERVAL, **more}


def announced_heartbeat(greeting: Message) -> float | None:
    """The interval the other half promised to speak at, or None (an older qproxy promises none)."""
    value = greeting.get("heartbeat")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return min(max(value, HEARTBEAT_RANGE[0]), HEARTBEAT_RANGE[1])
    return None


class ControlLink:
    """A greeted control connection, either side: heartbeats both ways, silence noticed.

    Every message received goes to on_message; with an outbox (the enclave
    half's log records) what it holds is sent as it comes.  run() returns when
    the other half closes and raises OSError or ValueError when the link fails.
    It takes at most CONTROL_MESSAGE_RATE messages and CONTROL_BYTE_RATE bytes
    a second: a flood waits in the socket and holds its sender back, instead
    of taking this half's CPU (and the GIL) from the data path.
    """

    def __init__(self, sock: socket.socket, reader: MessageReader, other: str, other_heartbeat: float | None,
                 on_message: Callable[[Message], None], outbox: LogOutbox | None = None,
                 written_by: LogQueue | None = None):
        """written_by: the host half's log queue, whose writer writes the log records taken; each is
        confirmed to the enclave half ("ack") once written, not before."""
        self.sock, self.reader = sock, reader
        self.other = other  # "host" or "enclave", for the log
        self.other_heartbeat = other_heartbeat
        self.on_message = on_message
        self.outbox = outbox
        self.written_by = written_by
        self.logs_taken = 0
        self.unwritten: collections.deque[tuple[int, int]] = collections.deque()  # (queue position, logs_taken)
        self.budget = Budget(CONTROL_MESSAGE_RATE, CONTROL_BYTE_RATE)
        self.heard = time.monotonic()  # when the other half last said something
        self.silent = False  # whether that is too long ago

    def run(self) -> None:
        try:
            self.follow()
        except (BrokenPipeError, ConnectionResetError):
            return  # the other half closed, seen by a send (an ack, a record) before its EOF was read

    def follow(self) -> None:
        # A send that the other half does not take in this long fails, as silence would.
        self.sock.settimeout(SILENT_AFTER * HEARTBEAT_INTERVAL)
        self.heard, self.silent = time.monotonic(), False
        next_beat = self.heard + HEARTBEAT_INTERVAL
        self.handle_messages()  # those that came in one recv() with the hello
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            if self.outbox:
                selector.register(self.outbox.wakeup.reader, selectors.EVENT_READ)
            # When the outbox's records go: at once those it holds, later LOG_LINGER after a wake-up.
            send_at = 0.0 if self.outbox else math.inf
            while True:
                if self.outbox and time.monotonic() >= send_at:
                    # More came while it sent: send them once the other half has been heard.
                    send_at = 0.0 if self.outbox.send(self.sock) else math.inf
                wait = max(min(next_beat, self.silent_at(), send_at) - time.monotonic(), 0)
                if self.unwritten and self.confirm_written():
                    wait = min(wait, ACK_POLL)  # some are still on their way to the file
                ready = selector.select(wait)
                now = time.monotonic()
                for key, _ in ready:
                    if key.fileobj is self.sock:
                        if not self.receive(now):
                            return
                        if self.outbox and self.outbox.records:  # an ack may have made room for them
                            send_at = min(send_at, now)
                    elif self.outbox:
                        self.outbox.wakeup.clear()
                        gathered = len(self.outbox.records) >= LOG_BACKLOG // 2
                        send_at = min(send_at, now if gathered else now + LOG_LINGER)
                if now >= next_beat:
                    send_message(self.sock, {"type": "heartbeat"})
                    next_beat = now + HEARTBEAT_INTERVAL
                if now >= self.silent_at():
                    self.silent = True
                    log.warning("control: the %s half has said nothing for %.1f s (it promised a heartbeat every %g s)",
                                self.other, now - self.heard, self.other_heartbeat)

    def silent_at(self) -> float:
        """When the other half will count as silent; never while it already does or promised no heartbeat."""
        if self.silent or not self.other_heartbeat:
            return math.inf
        return self.heard + SILENT_AFTER * self.other_heartbeat

    def receive(self, now: float) -> bool:
        """Take what the other half sent and handle its messages; False at its EOF."""
        received = self.reader.receive()
        if not received:
            return False
        self.budget.spend(0, received)
        self.heard = now
        if self.silent:
            self.silent = False
            log.warning("control: the %s half is heard from again", self.other)
        self.handle_messages()
        return True

    def handle_messages(self) -> None:
        taken = self.logs_taken
        for message in self.reader.messages():
            self.budget.spend(1, 0)
            self.on_message(message)
            self.logs_taken += message["type"] == "log"
        if self.written_by and self.logs_taken > taken:
            # One entry a position in the writer's queue: a peer that floods while the writer is stuck
            # (the queue full, its position still) adds nothing, so at most LOG_QUEUE + 1 entries.
            if self.unwritten and self.unwritten[-1][0] == self.written_by.queued:
                self.unwritten.pop()
            self.unwritten.append((self.written_by.queued, self.logs_taken))

    def confirm_written(self) -> bool:
        """Confirm the log records the writer has written; True while some taken are not written yet."""
        if not self.written_by:
            return False
        confirmed = None
        while self.unwritten and self.written_by.written >= self.unwritten[0][0]:
            confirmed = self.unwritten.popleft()[1]
        if confirmed is not None:
            send_message(self.sock, {"type": "ack", "log": confirmed})
        return bool(self.unwritten)


class Budget:
    """At most so many messages and bytes a second: spending more waits for the next second."""

    def __init__(self, messages: int, size: int):
        self.limits = (messages, size)
        self.second = 0  # the second of time.monotonic() being counted
        self.spent = [0, 0]

    def spend(self, messages: int, size: int) -> None:
        now = time.monotonic()
        if int(now) != self.second:
            self.second, self.spent = int(now), [0, 0]
        self.spent[0] += messages
        self.spent[1] += size
        if self.spent[0] > self.limits[0] or self.spent[1] > self.limits[1]:
            time.sleep(self.second + 1 - now)
            self.second, self.spent = self.second + 1, [messages, size]


# What the enclave half tells the host half about its configuration, and how the host compares it.

# The keys of each direction's entries that the halves compare: every key but the host-only
# bind_address and accept_proxy_protocol, and the egress rules, which are each half's own (a
# destination must pass both).
ENTRY_KEYS = {
    "inbound": ("vsock_port", "host_port", "enclave_port", "proxy_protocol"),
    "outbound": ("vsock_port", "hostname", "tcp_port", "enclave_port", "enclave_address"),
    "egress": ("vsock_port", "proxy_port"),
}
DIRECTION_TABLES = {"inbound": "inbound_connections", "outbound": "outbound_connections", "egress": "egress"}


def entries_of(config: Config) -> dict[str, list[dict[str, typing.Any]]]:
    """A config's connection entries, as the enclave half's hello carries them: [egress] as a direction
    of one entry, or none."""
    found = {"inbound": config.inbound, "outbound": config.outbound,
             "egress": (config.egress,) if config.egress else ()}
    return {
        direction: [{key: getattr(entry, key) for key in keys} for entry in found[direction]]
        for direction, keys in ENTRY_KEYS.items()
    }


def by_vsock_port(entries: object) -> dict[str, dict[int, dict[str, typing.Any]]]:
    """Entries as sent in a hello, checked as the config file's are, per direction and vsock port.

    ValueError when they are not entries; its text shows what was found as the
    config's errors do, escaped, fit for a log line.
    """
    if not isinstance(entries, dict):
        raise ValueError("entries is not an object")
    found: dict[str, dict[int, dict[str, typing.Any]]] = {}
    for direction in ENTRY_KEYS:
        listed = entries.get(direction, [] if direction == "egress" else None)  # a version before egress: none
        if not isinstance(listed, list):
            raise ValueError(f"entries.{direction} is not a list")
        fields = {key: field for key, field in TABLES[DIRECTION_TABLES[direction]].fields.items()
                  if key in ENTRY_KEYS[direction]}
        found[direction] = {}
        for entry in listed:
            # Keys a later version may add are not this one's business.
            known = {key: value for key, value in entry.items() if key in fields} if isinstance(entry, dict) else entry
            problems: list[str] = []
            values = check_table(f"entries.{direction}", fields, known, problems)
            if problems:
                raise ValueError(problems[0])
            if direction == "outbound":  # auto and the address it stands for are one listener
                values["enclave_address"] = Outbound(**values).listen_address
            found[direction][values["vsock_port"]] = values
    return found


# What each half does with an entry, in the words of the mismatch messages: (host half, enclave half).
ENTRY_USES: dict[str, tuple[Callable[[dict[str, typing.Any]], str], Callable[[dict[str, typing.Any]], str]]] = {
    "inbound": (
        lambda entry: f"forwards tcp port {entry['host_port']} to vsock port {entry['vsock_port']}",
        lambda entry: f"serves vsock port {entry['vsock_port']} (for 127.0.0.1:{entry['enclave_port']})",
    ),
    "outbound": (
        lambda entry: f"forwards vsock port {entry['vsock_port']} to {entry['hostname']}:{entry['tcp_port']}",
        lambda entry: f"forwards {Outbound(**entry).listen_address}:{entry['enclave_port']} to vsock port"
                      f" {entry['vsock_port']}",
    ),
    "egress": (
        lambda entry: f"dials the destinations asked for on vsock port {entry['vsock_port']}",
        lambda entry: f"asks for the destinations of proxy port 127.0.0.1:{entry['proxy_port']} on vsock port"
                      f" {entry['vsock_port']}",
    ),
}


def config_mismatches(host: object, enclave: object) -> list[str]:
    """Every way the enclave half's entries and the host half's disagree, in plain words.

    Both are as entries_of() gives them.  Entries meet by direction and vsock port;
    the data path depends only on the vsock ports, the other keys tell that
    the two files were written for each other.
    """
    ours_by_port, theirs_by_port = by_vsock_port(host), by_vsock_port(enclave)
    problems = []
    for direction, (host_use, enclave_use) in ENTRY_USES.items():
        ours, theirs = ours_by_port[direction], theirs_by_port[direction]
        for port in sorted(ours.keys() | theirs.keys()):
            if port not in theirs:
                problems.append(f"the host half {host_use(ours[port])}, but the enclave half has no {direction}"
                                f" entry for vsock port {port}")
            elif port not in ours:
                problems.append(f"the enclave half {quoted(enclave_use(theirs[port]))}, but the host half has no"
                                f" {direction} entry for vsock port {port}")
            else:
                problems += [
                    f"{direction} vsock port {port}: the host half's {key} is {ours[port][key]},"
                    f" the enclave half's {quoted(theirs[port][key])}"
                    for key in ENTRY_KEYS[direction]
                    if ours[port][key] != theirs[port][key]
                ]
    return problems


# ---------------------------------------------------------------------------
# Log forwarding: the enclave half's records, kept in the enclave while no host
# half listens, escaped, sent over the control link and written on the host
# ---------------------------------------------------------------------------


class LogOutbox(logging.Handler):
    """The enclave half's log records on their way to the host half.

    It holds the newest LOG_BACKLOG records while no host half listens, and
    counts those it drops: a host half that comes late gets the recent past
    and learns how much it missed.  A host half that confirms what it wrote
    (an "ack" message, protocol 2 with "log_acks" in its hello) leaves no
    record in doubt: those sent but not confirmed when a link ends are sent
    again on the next, so each is written, or counted as dropped, at least once.
    """

    lock: threading.Lock  # made by logging.Handler (an RLock), which holds it around emit()

    def __init__(self) -> None:
        super().__init__()
        self.records: collections.deque[Message] = collections.deque(maxlen=LOG_BACKLOG)
        self.confirming = False  # whether the host half on this link confirms what it writes
        self.unconfirmed: collections.deque[Message] = collections.deque()  # sent on this link, not yet confirmed
        self.confirmed = 0  # records the host half confirmed on this link
        self.lost = 0
        self.wakeup = Wakeup()
        self.emptied = threading.Condition(self.lock)

    def emit(self, record: logging.LogRecord) -> None:  # logging holds self.lock here
        try:
            entry = {"type": "log", "time": TIME_FORMATTER.formatTime(record), "level": record.levelname,
                     "message": self.format(record)[:LOG_MESSAGE_MAX]}
        except Exception:
            self.handleError(record)  # as logging's own handlers do: never into the thread that logs
            return
        if len(self.records) == LOG_BACKLOG:
            self.lost += 1
        elif len(self.records) in (0, LOG_BACKLOG // 2):  # the link sends them soon; at half the room, now
            self.wakeup.wake()
        self.records.append(entry)

    def send(self, sock: socket.socket) -> bool:
        """Send the records held when called; True if more have come since.  When the host half
        confirms what it writes, each sent record is kept until it does.

        A record that could not be sent goes back to be sent on the next link.
        """
        with self.lock:
            held = len(self.records)
            if self.confirming:  # no more than LOG_BACKLOG in doubt: a host that stops confirming holds this back
                held = min(held, LOG_BACKLOG - len(self.unconfirmed))
        for _ in range(held):
            with self.lock:
                record = self.records.popleft()
                if self.confirming:
                    self.unconfirmed.append(record)
            try:
                send_message(sock, record)
            except BaseException:
                if not self.confirming:
                    self.give_back([record])
                raise  # the link ends, and with it the unconfirmed go back: end_link()
        with self.lock:
            lost, self.lost = self.lost, 0
            if not (self.records or self.unconfirmed):
                self.emptied.notify_all()
            more = bool(self.records) and not (self.confirming and len(self.unconfirmed) >= LOG_BACKLOG)
        if lost:
            log.warning("control: %d log records were dropped while the host half was away or took them"
                        " too slowly (%d are kept)", lost, LOG_BACKLOG)
        return more

    def confirm(self, count: object) -> None:
        """The host half has written count records of this link (its "ack")."""
        if not isinstance(count, int) or isinstance(count, bool):
            return
        with self.lock:
            while self.confirmed < count and self.unconfirmed:
                self.unconfirmed.popleft()
                self.confirmed += 1
            if not (self.records or self.unconfirmed):
                self.emptied.notify_all()

    def start_link(self, confirming: bool) -> None:
        self.confirming = confirming

    def end_link(self) -> None:
        """The link ended: what was sent on it but not confirmed is sent again on the next, first."""
        with self.lock:
            unconfirmed, self.unconfirmed, self.confirmed = list(self.unconfirmed), collections.deque(), 0
            self.confirming = False
        self.give_back(unconfirmed)

    def give_back(self, records: list[Message]) -> None:
        with self.lock:
            for record in reversed(records):
                if len(self.records) == LOG_BACKLOG:
                    self.lost += 1  # appendleft drops the newest
                self.records.appendleft(record)

    def wait_sent(self, timeout: float) -> None:
        """Give a connected host half up to timeout seconds to receive (and confirm) what is held: the
        last records at a stop."""
        with self.emptied:
            self.emptied.wait_for(lambda: not (self.records or self.unconfirmed), timeout)


class EnclaveLog:
    """Where the host half writes the enclave half's records: host_log_dir/enclave_log, or its own stderr.

    Each line is as the enclave half writes it in its own log, with its time
    and level, escaped (escaped()) and cut to LOG_MESSAGE_MAX characters.
    The link takes at most CONTROL_BYTE_RATE bytes a second and no escape is
    more than 2.5 times as long as the bytes it came in ("\\U000e0001" for 4
    bytes of UTF-8), so whatever can dial the control port cannot write more
    than about 2.5 MiB a second to the parent's disk.
    """

    # A record's level as its line shows it (setup_logging names WARNING "WARN"); CRITICAL is a failing half's.
    LEVELS: typing.ClassVar[dict[str, int]] = {
        "CRITICAL": logging.CRITICAL,
        **{name.upper(): number for name, number in LEVEL_NUMBERS.items() if name != "off"},
    }
    TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")

    NAME = "qproxy.enclave"  # the logger name of its records, which setup_logging's handlers tell apart

    def __init__(self, handler: LogQueue):
        self.handler = handler

    def write(self, message: Message) -> bool:
        """Write one log message; False when it is not a well-formed one."""
        level, text, when = message.get("level"), message.get("message"), message.get("time")
        if not (isinstance(level, str) and level in self.LEVELS and isinstance(text, str)
                and isinstance(when, str) and self.TIME.fullmatch(when)):
            return False
        record = logging.LogRecord(self.NAME, self.LEVELS[level], "", 0, escaped(text[:LOG_MESSAGE_MAX]), None, None)
        record.enclave_time = when
        self.handler.handle(record)
        return True


# ---------------------------------------------------------------------------
# Control: the host half's end of the link, and the enclave half's
# ---------------------------------------------------------------------------


class ControlServer:
    """The host half's side of the control port: greets the enclave half and follows it.

    On hello it compares the enclave half's entries with its own config and
    logs every mismatch; then it writes the enclave's log records and notices
    when the enclave half goes silent or leaves.  One enclave half at a time:
    a new one that says hello replaces the one before (a restarted enclave
    half, or a stale connection).  Connections that have not said hello get
    CONTROL_HELLO_TIMEOUT in all and CONTROL_MAX_UNGREETED places, so garbage,
    trickles and floods cost little and never touch the data path.  A hello
    is answered at most every CONTROL_HELLO_INTERVAL, so an enclave half that
    redials in a loop adds its lines to the log at that pace.
    """

    def __init__(self, config: Config, enclave_log: EnclaveLog):
        self.entries = entries_of(config)
        self.greeting: Message | None = None  # the last enclave half's hello that had entries
        self.enclave_log = enclave_log
        self.ungreeted = threading.BoundedSemaphore(CONTROL_MAX_UNGREETED)
        self.lock = threading.Lock()
        self.enclave: socket.socket | None = None
        self.seen = False  # whether an enclave half has connected before
        self.reported: list[str] = []  # the mismatches logged last, not repeated for every hello
        self.pacing = threading.Lock()
        self.next_hello = 0.0  # the time.monotonic() before which no other hello is answered

    def serve(self, sock: socket.socket, address: Address) -> None:
        peer = peer_name(sock.family, address)
        with sock:
            if not self.ungreeted.acquire(blocking=False):
                throttled.warning("control-flood", "control: too many connections without a hello; closing %s", peer)
                return
            try:
                reader, greeting = self.greet(sock, peer)
                if greeting is not None:
                    self.pace()
            finally:
                self.ungreeted.release()
            if greeting is not None:
                self.follow(sock, peer, reader, greeting)

    def greet(self, sock: socket.socket, peer: str) -> tuple[MessageReader, Message | None]:
        reader = MessageReader(sock)
        try:
            greeting = reader.read(deadline=time.monotonic() + CONTROL_HELLO_TIMEOUT)
        except (OSError, ValueError) as error:
            throttled.warning("control-hello", "control: no valid hello from %s: %s", peer, explain(error))
            return reader, None
        if not greeting or greeting.get("type") != "hello" or greeting.get("role") != "enclave":
            throttled.warning("control-hello", "control: %s did not introduce itself as an enclave half", peer)
            return reader, None
        return reader, greeting

    def pace(self) -> None:
        """Hold a hello until CONTROL_HELLO_INTERVAL after the last one answered.  Those
        held keep their places among the CONTROL_MAX_UNGREETED, so few threads wait."""
        with self.pacing:
            time.sleep(max(self.next_hello - time.monotonic(), 0))
            self.next_hello = time.monotonic() + CONTROL_HELLO_INTERVAL

    def follow(self, sock: socket.socket, peer: str, reader: MessageReader, greeting: Message) -> None:
        """Answer the hello, then hold the connection until the enclave half leaves or is replaced."""
        with self.lock:
            previous, self.enclave = self.enclave, sock
            if previous is not None:
                # Under the lock: the previous link's thread takes it before that socket is
                # closed, so its descriptor cannot be reused by then.
                with contextlib.suppress(OSError):  # it ended on its own meanwhile
                    previous.shutdown(socket.SHUT_RDWR)
        if previous is not None:
            throttled.warning("control-replace", "control: a new enclave half replaces the one connected before")
        try:
            send_message(sock, hello("host", log_acks=True))
            log_arrival(self.seen, "control: enclave half connected%s from %s (qproxy %s)", peer,
                        quoted(greeting.get("version")))
            self.seen = True
            notify_systemd(f"STATUS=enclave half connected (qproxy {quoted(greeting.get('version'))})")
            self.compare(greeting)
            ControlLink(sock, reader, "enclave", announced_heartbeat(greeting), self.on_message,
                        written_by=self.enclave_log.handler).run()
        except (OSError, ValueError) as error:
            log.warning("control: the enclave half (%s) failed: %s", peer, explain(error))
        except Exception as error:  # a bug, not the peer's doing: end this link, keep the control port
            log.error("control: unexpected error on the enclave half's link (%s): %s", peer, explain(error))
            log.debug("control: traceback", exc_info=True)
        else:
            log.warning("control: the enclave half (%s) disconnected", peer)
        finally:
            with self.lock:
                if self.enclave is sock:
                    self.enclave = None
                    notify_systemd("STATUS=waiting for the enclave half")

    def compare(self, greeting: Message) -> None:
        """Log how the enclave half differs from this host half: protocol, version, entries."""
        if greeting.get("protocol") != CONTROL_PROTOCOL:
            log.warning("control: the enclave half speaks control protocol %s, this host half %d; upgrade the older",
                        quoted(greeting.get("protocol")), CONTROL_PROTOCOL)
        if greeting.get("version") != __version__:
            log.warning("control: the enclave half runs qproxy %s, this host half %s", quoted(greeting.get("version")),
                        __version__)
        if "entries" not in greeting:
            log.warning("control: the enclave half did not send its entries; cannot compare the configurations")
            return
        self.greeting = greeting
        self.compare_entries()

    def compare_entries(self) -> None:
        """Log how the last enclave half's entries differ from this host half's: at its hello, and
        after a reload (from the accept loop) changed this half's."""
        if self.greeting is None:
            return
        try:
            mismatches = config_mismatches(self.entries, self.greeting["entries"])
        except ValueError as error:
            log.warning("control: cannot compare the configurations: the enclave half sent %s", error)
            return
        if not mismatches:
            log.info("control: the enclave half's entries match this host half's")
        elif mismatches == self.reported:
            log.warning("control: the enclave half's entries still differ from this host half's, in the %d ways"
                        " logged before", len(mismatches))
        else:
            for mismatch in mismatches[:CONTROL_MISMATCHES_LOGGED]:
                log.error("control: config mismatch: %s", mismatch)
            if len(mismatches) > CONTROL_MISMATCHES_LOGGED:
                log.error("control: config mismatch: %d more; `qproxy check-config HOST_FILE --enclave-config"
                          " ENCLAVE_FILE` lists them all", len(mismatches) - CONTROL_MISMATCHES_LOGGED)
        self.reported = mismatches

    def on_message(self, message: Message) -> None:
        if message["type"] == "log" and not self.enclave_log.write(message):
            throttled.warning("control-log", "control: dropped a malformed log record from the enclave half")


class ControlClient(threading.Thread):
    """The enclave half's side: dial the host half, retrying with backoff; say hello, send the log."""

    def __init__(self, vsock: Vsock, parent_cid: int, port: int, config: Config, outbox: LogOutbox | None,
                 stopping: threading.Event):
        super().__init__(name="control", daemon=True)
        self.vsock, self.parent_cid, self.port = vsock, parent_cid, port
        self.greeting = hello("enclave", entries=entries_of(config))
        size = len(encode_message(self.greeting))
        if size > CONTROL_MAX_MESSAGE:  # hundreds of entries with long names
            log.warning("control: the connection entries take %d bytes, more than a control message holds (%d);"
                        " the host half will not compare them with its own", size, CONTROL_MAX_MESSAGE)
            self.greeting = hello("enclave")
        self.outbox = outbox
        self.stopping = stopping
        self.seen = False  # whether a host half has answered before
        self.linked = False  # whether a host half is listening now

    def run(self) -> None:
        delay = CONTROL_RETRY[0]
        while not self.stopping.is_set():
            try:
                sock = self.vsock.connect(self.parent_cid, self.port, CONTROL_HELLO_TIMEOUT)
            except OSError as error:
                log.debug("control: host half not reachable at vsock %d:%d (%s)", self.parent_cid, self.port,
                          explain(error))
            else:
                try:
                    if self.talk(sock):
                        delay = CONTROL_RETRY[0]  # back-off starts afresh only after a link that lasted
                except Exception as error:  # a bug, not the peer's doing: log it and dial again
                    log.error("control: unexpected error on the link to the host half: %s", explain(error))
                    log.debug("control: traceback", exc_info=True)
            # Wait even after a connection: one the host half closes at once must not become a busy loop.
            self.stopping.wait(delay)
            delay = min(delay * 2, CONTROL_RETRY[1])

    def on_message(self, message: Message) -> None:
        if message["type"] == "ack" and self.outbox:
            self.outbox.confirm(message.get("log"))

    def talk(self, sock: socket.socket) -> bool:
        """Say hello and follow the connection until it ends.

        True when the link lasted a heartbeat interval: a host half that answers
        and hangs up at once must meet the back-off, not a dial ten times a second.
        """
        linked_at = None
        with sock:
            try:
                send_message(sock, self.greeting)
                reader = MessageReader(sock)
                answer = reader.read(deadline=time.monotonic() + CONTROL_HELLO_TIMEOUT)
                if not answer or answer.get("type") != "hello":
                    throttled.warning(
                        "control-answer", "control: the host half at vsock %d:%d did not answer hello",
                        self.parent_cid, self.port,
                    )
                    return False
                linked_at = time.monotonic()
                log_arrival(self.seen, "control: connected%s to the host half (qproxy %s)",
                            quoted(answer.get("version")))
                self.seen = True
                self.linked = True
                if self.outbox:
                    self.outbox.start_link(confirming=answer.get("log_acks") is True)
                try:
                    ControlLink(sock, reader, "host", announced_heartbeat(answer), self.on_message, self.outbox).run()
                finally:
                    self.linked = False
                    if self.outbox:
                        self.outbox.end_link()
            except (OSError, ValueError) as error:
                throttled.warning("control-failed", "control: connection to the host half failed: %s", explain(error))
            else:
                log.warning("control: the host half went away; reconnecting")
        return linked_at is not None and time.monotonic() - linked_at >= HEARTBEAT_INTERVAL


# ---------------------------------------------------------------------------
# The enclave's loopback, down when an enclave starts, and the names of its outbound entries
# ---------------------------------------------------------------------------

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def ensure_loopback_up() -> None:
    """Bring lo up when it is down, as every enclave start script otherwise must."""
    if not sys.platform.startswith("linux"):
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        try:
            flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request)[:18])[1]
        except OSError:
            return  # no interface called lo: nothing this half can do or needs
        if flags & IFF_UP:
            return
        try:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))
        except OSError as error:
            raise StartError(
                f"the loopback interface lo is down and qproxy cannot bring it up ({error.strerror}): "
                "run 'ip link set lo up' as root before 'qproxy enclave', or run qproxy as root"
            ) from None
    log.info("brought the loopback interface lo up")


# The lines the enclave half writes into a hosts file (--hosts-file) stand between two marker lines
# that name its configuration file, so that two enclave halves with files of their own keep a block
# each; at each start a half writes its block anew, in place of its last one, and every other line
# stays as it is, byte for byte.


def hosts_markers(config_path: str | None) -> tuple[str, str]:
    whose = f" (--config {escaped(os.path.abspath(config_path))})" if config_path else ""
    return (f"# qproxy enclave half: begin{whose}; written at each start, the lines up to the end line are replaced",
            f"# qproxy enclave half: end{whose}")


def hosts_lines(config: Config) -> list[str]:
    """A hosts file's line for each name of an outbound entry, to the address the enclave half
    listens on for it: an app that dials the name reaches the entry.  IP literals get none."""
    named = {entry.hostname.lower().rstrip("."): entry.listen_address
             for entry in config.outbound if not is_ip_literal(entry.hostname)}
    return [f"{address} {name}" for name, address in named.items()]


def write_hosts_file(path: str, lines: list[str], markers: tuple[str, str]) -> None:
    """Put lines into the hosts file at path, between markers, in place of what an earlier start put
    there.  The file is locked meanwhile (flock), as other halves may write it too; it is replaced
    whole (a new file renamed over it) where that keeps what it is, else rewritten in place, its room
    taken first, so that a full disk leaves it as it was.  StartError when it cannot be written."""
    path = os.path.realpath(path)  # a symbolic link stays one
    try:
        with locked_file(path) as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise StartError(f"--hosts-file {escaped(path)} is not a regular file")
            kept = file.read().split(b"\n")
            if kept[-1] == b"":
                kept.pop()  # the end of the last line
            kept = drop_hosts_block(path, kept, markers)
            data = b"\n".join([*kept, *(line.encode() for line in (markers[0], *lines, markers[1])), b""])
            if not replace_file(path, data, os.fstat(file.fileno())):
                try:
                    os.posix_fallocate(file.fileno(), 0, len(data))
                except OSError as error:
                    if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
                        raise
                file.seek(0)
                file.write(data)
                file.truncate()
    except OSError as error:
        raise StartError(f"cannot write the hosts file {escaped(path)} (--hosts-file):"
                         f" {error.strerror or error}") from None
    ours = {line.split()[1].encode() for line in lines}
    for number, line in enumerate(kept, 1):
        names = {name.lower().rstrip(b".") for name in line.partition(b"#")[0].split()[1:]}
        for name in sorted(names & ours):
            log.warning("%s line %d maps %s too; a resolver may take that address, not qproxy's", escaped(path),
                        number, name.decode())


def locked_file(path: str) -> typing.BinaryIO:
    """The file at path, made if missing, opened to read and write and locked (flock): the one that is
    at path once the lock is held, as another writer may have renamed a new file over it meanwhile.
    StartError when another process holds the lock for HOSTS_LOCK_TIMEOUT."""
    deadline = time.monotonic() + HOSTS_LOCK_TIMEOUT
    while True:
        file = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")  # noqa: SIM115 -- returned
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            status = os.fstat(file.fileno())
            if file_identity(path) == (status.st_dev, status.st_ino):
                return file
        except BlockingIOError:
            if time.monotonic() >= deadline:
                file.close()
                raise StartError(f"the hosts file {escaped(path)} (--hosts-file) is locked by another process"
                                 f" (flock) for {HOSTS_LOCK_TIMEOUT:g} s: fuser -v {escaped(path)} names it") from None
            time.sleep(HOSTS_LOCK_POLL)
        except BaseException:
            file.close()
            raise
        file.close()


def drop_hosts_block(path: str, lines: list[bytes], markers: tuple[str, str]) -> list[bytes]:
    """lines without every block between markers (an earlier start's, a copy of it).  StartError for a
    begin line without an end line: what follows it may be anyone's, and none of it is dropped."""
    begin, end = (marker.encode() for marker in markers)
    kept: list[bytes] = []
    inside = 0  # the line a block began on, while in one
    for number, line in enumerate(lines, 1):
        if not inside and line.strip() == begin:
            inside = number
        elif inside:
            inside = 0 if line.strip() == end else inside
        else:
            kept.append(line)
    if inside:
        raise StartError(f"the hosts file {escaped(path)} (--hosts-file) has qproxy's begin line at line {inside}"
                         " but no end line after it: remove that line, or the block, by hand")
    return kept


def replace_file(path: str, data: bytes, status: os.stat_result) -> bool:
    """Write data to a new file next to path, with path's owner, mode and extended attributes (its
    SELinux label), and rename it over path, so that a resolver reads the old file or the new one,
    never half of one.  False, and nothing changed, where a rename would not keep what the file is:
    a mount point (a file bind-mounted into a container), other hard links, a folder this user
    cannot write, attributes that cannot be copied."""
    if status.st_nlink > 1:
        return False
    temporary = f"{path}.qproxy-{os.getpid()}"
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
            os.fchown(file.fileno(), status.st_uid, status.st_gid)
            os.fchmod(file.fileno(), stat.S_IMODE(status.st_mode))
            for name in os.listxattr(path):
                os.setxattr(file.fileno(), name, os.getxattr(path, name))
            file.write(data)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return False
    return True


# ---------------------------------------------------------------------------
# Running a half: start, wait for a signal, stop
# ---------------------------------------------------------------------------


def raise_fd_limit() -> None:
    """Each connection holds two descriptors: take the whole hard limit, not the soft default."""
    import resource  # Unix only, as fcntl is: here, not at the top, as only a half needs it

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Half:
    """One running half: its listeners, the accept loop, its connections, and how it stops or fails.

    The accept loop runs in the main thread and serves every listener: it
    accepts what the selector says is waiting (never blocking: the listening
    sockets are non-blocking), admits, expires, and sleeps in the selector
    until a listener, a freed slot, a deadline or a signal (through
    signal.set_wakeup_fd) needs it.  A listener that may not accept now is
    left out of the selector until it may again, so idle and paused listeners
    cost the loop nothing.
    """

    def __init__(self, role: str, vsock: Vsock, family: int, max_connections: int, limits: Limits, peer_cid: int,
                 logs: LogWriter):
        self.role = role
        self.logs = logs
        self.reload: Callable[[], None] | None = None  # what SIGHUP does besides reopening the logs
        self.reloading = False  # SIGHUP came: the accept loop reloads at its next turn
        self.vsock = vsock
        self.limits = limits
        self.peer_cid = peer_cid  # the only CID whose vsock connections this half accepts
        self.stopping = threading.Event()
        self.admission = Admission(max_connections, limits.queue_timeout)
        self.connector = Connector(Dialer(vsock, limits.connect_timeout, family), self.admission, limits)
        self.egress = EgressSetup(self.connector, role)
        self.workers = Workers(self.fail)
        self.listeners: list[Listener] = []
        self.paused: set[Listener] = set()  # listeners out of the selector until they may accept again
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.admission.wakeup.reader, selectors.EVENT_READ)
        # A thread the half cannot work without that dies takes the half with it, loudly.
        threading.excepthook = lambda hook: self.fail(f"the {hook.thread.name if hook.thread else 'a'} thread",
                                                      hook.exc_value)
        self.connector.reactor.start()
        # From here on a signal stops the half, even one that arrives while it is still starting;
        # none that a person or a tool is likely to send ends it without its grace period.
        self.signals: collections.deque[int] = collections.deque()  # received, not yet acted on
        for number in (*STOP_SIGNALS, signal.SIGHUP):
            signal.signal(number, self.on_signal)
        for number in IGNORED_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        signal.set_wakeup_fd(self.admission.wakeup.writer.fileno(), warn_on_full_buffer=False)

    def on_signal(self, number: int, frame: object) -> None:
        """Only note the signal: the accept loop, which set_wakeup_fd wakes, acts on it.  A handler
        that logged could wait for ever on a lock that the code it interrupted holds (the log queue's)."""
        self.signals.append(number)

    def handle_signals(self) -> None:
        """The first stop signal drains; a second one exits at once, resetting every connection left.
        SIGHUP reopens the log files (after logrotate), and reloads what can be (the host half's entries)."""
        while self.signals:
            number = self.signals.popleft()
            if number == signal.SIGHUP:
                self.logs.reopen()
                self.reloading = self.reload is not None
            elif self.stopping.is_set():
                log.warning("second signal: exiting now")
                self.admission.abort()
                self.logs.flush(ABORT_LOG_DRAIN)
                os._exit(EXIT_OK)
            else:
                log.info("%s: stopping", signal.Signals(number).name)
                self.stopping.set()

    def fail(self, what: str, exc_info: bool | BaseException | None = True) -> None:
        """An unexpected error where the half cannot go on without: say so, reset what is open, exit."""
        try:
            log.critical("internal error in %s; exiting with code %d so that a supervisor restarts this half",
                         what, EXIT_FAILED, exc_info=exc_info)
        finally:
            self.admission.abort()
            self.logs.flush()
            os._exit(EXIT_FAILED)

    def listen(self, endpoint: Endpoint, route: Route | None,
               serve: Callable[[socket.socket, Address], None] | None = None) -> None:
        """Open a listener: for route's connections, or (route None) one whose connections go to
        serve(sock, address)."""
        sock = open_listener(endpoint, self.vsock)
        listener = Listener(sock, route, self.limits.connections_per_listener if route else 0, self.peer_cid, serve)
        self.listeners.append(listener)
        self.selector.register(listener, selectors.EVENT_READ)

    def add_route(self, route: Route) -> None:
        self.listen(route.listen, route)
        log.info("listening on %s -> %s", route.listen, route.target)

    def start_listening(self, routes: list[Route], control: Endpoint | None = None,
                        serve: Callable[[socket.socket, Address], None] | None = None) -> None:
        """Listen for every route (and on control, whose connections go to serve), within the
        descriptors the half has: all or nothing, so that a StartError leaves no socket file behind."""
        try:
            for route in routes:
                self.add_route(route)
            if control:
                self.listen(control, None, serve)
            self.budget_descriptors()
        except StartError:
            self.close_listeners()
            raise

    def close_listeners(self) -> None:
        for listener in list(self.listeners):
            self.close_listener(listener)

    def close_listener(self, listener: Listener) -> None:
        """Stop listening; the connections it accepted go on."""
        self.listeners.remove(listener)
        if listener in self.paused:
            self.paused.discard(listener)
        else:
            self.selector.unregister(listener)
        listener.close()
        if listener.path:
            self.vsock.release(listener.path)

    def apply_routes(self, routes: list[Route]) -> str:
        """Listen for routes from now on (a reload): a new listener opens, one no longer wanted closes while
        the connections it accepted finish, and a changed target takes the connections accepted from now on.
        Returns what changed, in a few words."""
        current = {listener.route.listen: listener for listener in self.listeners if listener.route}
        wanted = {route.listen: route for route in routes}
        changes: collections.Counter[str] = collections.Counter()
        for listen, listener in current.items():
            if listen not in wanted:
                self.close_listener(listener)
                log.info("reload: no longer listening on %s", listen)
                changes["removed"] += 1
            elif wanted[listen] != listener.route:
                listener.route = wanted[listen]
                rules = f" ({listener.route.policy})" if listener.route.policy else ""
                log.info("reload: %s -> %s%s%s from now on", listen, listener.route.target, rules,
                         listener.route.headers())
                changes["changed"] += 1
        for listen, route in wanted.items():
            if listen not in current:
                try:
                    self.add_route(route)
                    changes["added"] += 1
                except StartError as error:
                    log.error("reload: %s", error)
                    changes["could not listen"] += 1
        return ", ".join(f"{count} {what}" for what, count in changes.items()) or "no entry changed"

    def run(self, status: str = "") -> int:
        """Accept on every listener until a stop signal (STOP_SIGNALS); then let every connection accepted so far
        finish within the grace period, and cut what is left.  status goes to systemd with READY=1."""
        log.info("%s half ready (qproxy %s, %s)", self.role, __version__, self.vsock)
        notify_systemd("READY=1" + (f"\nSTATUS={status}" if status else ""))
        try:
            self.accept_loop(until=self.stopping.is_set)
            notify_systemd("STOPPING=1")
            self.close_listeners()
            self.admission.ends_wanted = True
            end = time.monotonic() + GRACE_PERIOD
            self.accept_loop(until=lambda: not self.admission.live or time.monotonic() >= end, deadline=end)
            if self.admission.live:
                log.warning("grace period over: cutting %d open connections", len(self.admission.live))
                self.admission.cut_waiting()
                self.connector.reactor.cut_all()
                end = time.monotonic() + CUT_WAIT
                self.accept_loop(until=lambda: not self.admission.live or time.monotonic() >= end, deadline=end)
        except Exception:
            self.fail("the accept loop")
        self.admission.abort()  # those still dialing: the exit resets their clients
        log.info("%s half stopped", self.role)
        ignore_from_now_on(*STOP_SIGNALS, signal.SIGHUP)
        return EXIT_OK

    def budget_descriptors(self) -> None:
        """Give connections and the reactor's pipes the descriptors the open-files limit leaves, less
        what the half holds (its listeners open) and a reserve.  StartError when that is not even one
        connection."""
        import resource

        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            return
        with socket.socket() as probe:  # the lowest free descriptor: those below it are all taken
            held = probe.fileno()
        descriptors = limit - held - DESCRIPTOR_RESERVE
        descriptors -= self.connector.reactor.buffers.allow_pipes(descriptors)
        # The host half may gain inbound or outbound by a reload, whose share the other direction
        # could hold by then, with its connections waiting on it: it keeps one for each from the
        # start (and for egress when it has it: a reload cannot add it).  The enclave half never reloads.
        listened = {listener.route.direction for listener in self.listeners if listener.route}
        if self.role == "host":
            listened |= {"inbound", "outbound"}
        directions = [direction for direction in DIRECTIONS if direction in listened] or ["inbound", "outbound"]
        connections = self.admission.budget(descriptors, len(directions))
        if connections < 1:
            raise StartError(f"the open-files limit ({limit}) leaves no descriptors for a connection: this half"
                             f" holds {held} and keeps {DESCRIPTOR_RESERVE} in reserve; raise it (ulimit -n,"
                             " LimitNOFILE=)")
        each = (f"({directions[0]}, the only direction it listens for)" if len(directions) == 1
                else f"in each direction ({', '.join(directions)})")
        log.info("the open-files limit (%d) lets this half hold %d connections at once %s", limit, connections, each)

    def accept_loop(self, until: Callable[[], bool], deadline: float = math.inf) -> None:
        """The accept loop: accept, admit and expire until until() is true."""
        while True:
            self.handle_signals()
            if until():
                return
            if self.reloading and self.reload and not self.stopping.is_set():
                self.reloading = False
                self.reload()
            wake_at = min(self.admission.expire(time.monotonic()), deadline)
            self.set_up(self.admission.admit_waiting())
            self.resume_listeners()
            timeout = None if wake_at == math.inf else max(wake_at - time.monotonic(), 0)
            for key, _ in self.selector.select(timeout):
                if isinstance(key.fileobj, Listener):
                    self.accept(key.fileobj)
                else:
                    self.admission.wakeup.clear()

    def accept(self, listener: Listener) -> None:
        """Take what listener's queue holds, up to ACCEPTS_PER_TURN; pause it when it may take no more."""
        for _ in range(ACCEPTS_PER_TURN):
            if not self.may_accept(listener):
                self.pause(listener)
                return
            try:
                accepted = listener.accept()
            except OSError as error:
                if error.errno not in OUT_OF_RESOURCES:
                    raise
                throttled.warning("accept", "cannot accept on %s: %s; connections wait until one ends"
                                  " (raise the open-files limit?)", listener.sock.getsockname(), error.strerror)
                self.admission.lack("descriptors")
                self.pause(listener)
                return
            if accepted is None:
                return
            client, address = accepted
            if not listener.allows_peer(address):
                throttled.warning("peer", "refused a vsock connection to port %d from CID %d: only CID %d may connect",
                                  listener.sock.getsockname()[1], address[0], self.peer_cid)
                client.close()
            elif listener.serve:  # the control port, which serves its own connections
                self.start_job(listener.serve, client, address)
            elif listener.route:
                self.set_up(self.admission.arrive(listener, listener.route, client, address))

    def set_up(self, admitted: list[Connection]) -> None:
        """Dial for each admitted connection, in order: at once when its target has no name to
        resolve and its client sends no header first, else (and an egress request always) in a setup
        worker; those no thread can be had for wait again."""
        for index, connection in enumerate(admitted):
            if self.admission.short_of:  # the last dial found no descriptor: the rest wait again, in order
                for waiting in reversed(admitted[index:]):
                    self.admission.requeue(waiting, self.admission.short_of)
                return
            route = connection.route
            if route.direction == "egress":
                job = self.egress.set_up
            elif route.accept_proxy_protocol and not connection.header_taken:
                job = self.connector.take_header
            elif self.connector.dialer.resolves(route.target):
                job = self.connector.set_up
            else:
                self.connector.start(connection)
                continue
            try:
                self.workers.run(job, connection)
            except RuntimeError as error:  # no thread to be had: these wait again, in their order
                for waiting in reversed(admitted[index:]):
                    self.admission.requeue(waiting, "threads")
                throttled.warning("threads", "cannot start a thread (%s); connections wait until one ends", error)
                return

    def start_job(self, job: Callable[[socket.socket, Address], None], client: socket.socket,
                  address: Address) -> None:
        try:
            self.workers.run(job, client, address)
        except RuntimeError as error:
            throttled.warning("threads", "cannot start a thread (%s); closing a control connection", error)
            client.close()

    def pause(self, listener: Listener) -> None:
        if listener not in self.paused:
            self.selector.unregister(listener)
            self.paused.add(listener)
            self.admission.ends_wanted = True

    def may_accept(self, listener: Listener) -> bool:
        if self.admission.short_of:
            return False
        if listener.route is None:
            return True  # the control port bounds itself
        if listener.waiting >= WAITING_PER_LISTENER:
            return False
        if not self.admission.room_for_another(listener.route.direction):
            throttled.warning(f"descriptors {listener.route.direction}", "the open-files limit is reached for %s"
                              " connections (%d held in all); connections wait until one ends (raise the limit:"
                              " ulimit -n, LimitNOFILE=)", listener.route.direction, len(self.admission.live))
            return False
        return True

    def resume_listeners(self) -> None:
        for listener in [listener for listener in self.paused if self.may_accept(listener)]:
            self.paused.discard(listener)
            self.selector.register(listener, selectors.EVENT_READ)
        self.admission.ends_wanted = bool(self.paused) or self.stopping.is_set()


def run_host(args: argparse.Namespace, config: Config, vsock: Vsock, logs: LogWriter) -> int:
    family = socket.AF_INET if args.ipv4 else socket.AF_INET6 if args.ipv6 else socket.AF_UNSPEC
    check_literals_match_family(args.config, config, family)
    vsock.check_available()
    raise_fd_limit()
    half = Half("host", vsock, family, args.threads, config.limits, args.cid, logs)
    for warning in trust_warnings(config):
        log.warning("%s", warning.at(args.config))
    control = ControlServer(config, EnclaveLog(logs.source))
    half.start_listening(host_routes(config, str(args.cid)), Endpoint("vsock", "", args.control_port), control.serve)
    log.info("listening on vsock :%d for the enclave half's control connection", args.control_port)
    if args.config:
        half.reload = lambda: reload_host(half, control, config, args, family)
    return half.run(status="waiting for the enclave half")


def reload_host(half: Half, control: ControlServer, running: Config, args: argparse.Namespace, family: int) -> None:
    """SIGHUP: read the file again and apply its entries; a file with problems changes nothing.
    [limits] and [log_location] are read at start only."""
    notify_systemd(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        config = load_config(args.config, args.control_port)
        check_literals_match_family(args.config, config, family)
    except (ConfigError, UsageError, StartError) as error:
        for problem in getattr(error, "problems", [str(error)]):
            log.error("reload: %s", problem)
        log.error("reload: %s has problems; the running configuration stays", escaped(args.config))
        notify_systemd("READY=1\nSTATUS=reload failed: the running configuration stays")
        return
    for table in ("limits", "log_location"):
        if getattr(config, table) != getattr(running, table):
            log.warning("reload: [%s] changed; it is read at start only, so restart the host half to apply it", table)
    if config.egress and not running.egress:  # it would have no share of the descriptors (budget_descriptors)
        log.warning("reload: [egress] is new; restart the host half to serve it")
        config = config._replace(egress=None)
    for warning in trust_warnings(config):
        log.warning("reload: %s", warning.at(args.config))
    summary = half.apply_routes(host_routes(config, str(args.cid)))
    control.entries = entries_of(config)
    log.info("reload: %s: %s", escaped(args.config), summary)
    control.compare_entries()
    notify_systemd(f"READY=1\nSTATUS=reloaded: {summary}")


def check_literals_match_family(path: str, config: Config, family: int) -> None:
    """ConfigError for every outbound IP literal that --ipv4 or --ipv6 rules out."""
    if family == socket.AF_UNSPEC:
        return
    flag = "--ipv4" if family == socket.AF_INET else "--ipv6"
    problems = [
        entry_problem(config, "outbound_connections", number,
                      f"hostname {entry.hostname} cannot be reached with {flag}")
        for number, entry in enumerate(config.outbound, 1)
        if is_ip_literal(entry.hostname) and (socket.AF_INET6 if ":" in entry.hostname else socket.AF_INET) != family
    ]
    if problems:
        raise ConfigError([problem.at(path) for problem in problems])


def run_enclave(args: argparse.Namespace, config: Config, vsock: Vsock, logs: LogWriter,
                outbox: LogOutbox | None) -> int:
    """outbox: the records for the host half, or None when [log_location] forward_enclave_log is false.
    SIGHUP reopens the logs only: the enclave's file is part of its measured image, and changes with it."""
    ensure_loopback_up()
    vsock.check_available()
    raise_fd_limit()
    if args.hosts_file:  # before the half: a signal meanwhile ends the process, and no listener is left behind
        lines = hosts_lines(config)
        write_hosts_file(args.hosts_file, lines, hosts_markers(args.config))
        log.info("wrote %d name(s) of outbound entries to %s", len(lines), escaped(args.hosts_file))
    half = Half("enclave", vsock, socket.AF_UNSPEC, args.threads, config.limits, args.parent_cid, logs)
    for warning in loop_warnings(config):
        log.warning("%s", warning.at(args.config))
    half.start_listening(enclave_routes(config, str(args.parent_cid)))
    control = ControlClient(vsock, args.parent_cid, args.control_port, config, outbox, half.stopping)
    control.start()
    code = half.run()
    if outbox and control.linked:
        outbox.wait_sent(STOP_RECORDS_WAIT)  # the records of the stop itself, for the host half
    return code


# ---------------------------------------------------------------------------
# check-config: what each half will do with a file
# ---------------------------------------------------------------------------


def config_summary(path: str, config: Config, parent_cid: int, control_port: int,
                   enclave_path: str | None = None, enclave_config: Config | None = None) -> list[str]:
    """What each half does with config; the enclave half's lines from enclave_config when it has its own."""
    lines = [f"{path}: valid"]
    lines += [  # the enclave half's own: it is the one that listens
        f"warning: {warning.at(enclave_path or path)}" for warning in loop_warnings(enclave_config or config)
    ]
    lines += [f"warning: {warning.at(path)}" for warning in trust_warnings(config)]
    if not (config.inbound or config.outbound or config.egress):
        lines.append("no connections configured: the halves will only talk to each other")
    lines += [f"host: listen {route.listen} -> {route.target}{route.headers()}"
              for route in host_routes(config, "<enclave CID>")]
    lines.append(f"host: listen vsock :{control_port} for the enclave half's control connection")
    lines += [
        f"enclave: listen {route.listen} -> {route.target}"
        for route in enclave_routes(enclave_config or config, str(parent_cid))
    ]
    lines.append(f"enclave: dial vsock {parent_cid}:{control_port} for the control connection")
    lines += [f"enclave: --hosts-file maps {line.split()[1]} to {line.split()[0]}"
              for line in hosts_lines(enclave_config or config)]
    for role, egress in (("host", config.egress), ("enclave", (enclave_config or config).egress)):
        if egress:
            lines.append(f"{role}: egress rules: {Policy.of(egress, role)}")
    if config.egress or (enclave_config or config).egress:
        lines.append("egress: a destination must pass the rules of both halves; an address in a special-purpose"
                     " range (loopback, private, link-local, ...) also needs an address rule within such ranges")
    where = config.log_location
    if where:
        lines.append(
            f"log: host {log_path(config, 'host', 'host')}, "
            f"enclave {log_path(config, 'enclave', 'enclave')}, level {where.log_level}, "
            + (f"rotated at {where.log_max_size} MiB, {where.log_backups} kept" if where.log_backups
               else "never rotated by qproxy")
        )
    else:
        lines.append("log: both halves to stderr")
    limits = config.limits
    lines.append(
        "limits: "
        + (f"{limits.connections_per_listener} connections per listener" if limits.connections_per_listener
           else "no connection limit per listener")
        + ", connect timeout "
        + (f"{limits.connect_timeout:g} s" if limits.connect_timeout else "the system's")
        + ", idle timeout " + (f"{limits.idle_timeout:g} s" if limits.idle_timeout else "none")
        + ", queue timeout " + (f"{limits.queue_timeout:g} s" if limits.queue_timeout else "none")
        + f", buffer memory {limits.buffer_memory} MiB"
    )
    return lines


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def number_in(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        # ASCII digits only, as the vendor's parser: int() would also take "1_0", " 7" and other scripts' digits.
        value = int(text) if re.fullmatch(r"\+?[0-9]+", text) else None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be an integer from {low} to {high}, not {text!r}")
        return value

    return parse


parse_cid = number_in(*CID_RANGE, "a CID")
parse_port = number_in(*TCP_PORT_RANGE, "a port")
parse_threads = number_in(1, COUNT_RANGE[1], "the connection limit")


def from_environment(args: argparse.Namespace, name: str, variable: str, parse: Callable[[str], object],
                     default: object) -> None:
    """Fill an option the command line left out from its environment variable, then its default."""
    if not hasattr(args, name) or getattr(args, name) is not None:
        return
    text = os.environ.get(variable, "").strip()
    if not text:
        setattr(args, name, default)
        return
    try:
        setattr(args, name, parse(text))
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"{variable}={text}: {error}") from None


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line, as every error of qproxy's is, with a did-you-mean for a
    mistyped command; the subcommands' parsers are of this class too."""

    def error(self, message: str) -> typing.NoReturn:
        mistyped = re.match(r"argument <COMMAND>: invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if mistyped:
            import difflib  # only a mistyped command needs it: the halves do not carry it

            close = difflib.get_close_matches(mistyped.group(1), re.findall(r"[\w-]+", mistyped.group(2)), n=1)
            message = f"no command {mistyped.group(1)!r}" + (f"; did you mean {close[0]!r}?" if close else "")
        self.exit(EXIT_USAGE, f"qproxy: error: {message} (see: {self.prog} --help)\n")


ENVIRONMENT_HELP = """environment variables:
  RUST_LOG                log level: off, error, warn, info, debug, trace (default: warn)
  QPROXY_VSOCK_EMULATION  a folder: Unix sockets there stand in for AF_VSOCK (tests, one machine)
  QPROXY_LISTEN_CID, QPROXY_PARENT_CID, QPROXY_CONTROL_PORT, QPROXY_HOSTS_FILE, TOKIO_WORKER_THREADS
                          the options of the same meaning (see each command's --help)"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qproxy",
        description="Carry TCP across vsock between an enclave and its parent VM.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"qproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<COMMAND>")

    host = commands.add_parser(
        "host", help="The part of qproxy that runs outside the enclave",
        description="The part of qproxy that runs outside the enclave.",
    )
    host.add_argument("cid", nargs="?", type=parse_cid, metavar="CID",
                      help="The CID of the enclave [env: QPROXY_LISTEN_CID]")
    add_common_options(host)
    family = host.add_mutually_exclusive_group()
    family.add_argument("--ipv4", action="store_true", help="Only resolve IPv4 addresses")
    family.add_argument("--ipv6", action="store_true", help="Only resolve IPv6 addresses")

    enclave = commands.add_parser(
        "enclave", help="The part of qproxy that runs inside the enclave",
        description="The part of qproxy that runs inside the enclave.",
    )
    enclave.add_argument("--parent-cid", type=parse_cid, metavar="PARENT_CID",
                         help="The CID of the parent VM of this enclave [env: QPROXY_PARENT_CID]"
                              f" [default: {DEFAULT_PARENT_CID}]")
    enclave.add_argument("--hosts-file", metavar="PATH",
                         help="Map the hostname of each outbound entry to the address the enclave half listens on"
                              " for it, in this hosts file (/etc/hosts), so that apps dial the real names; the"
                              " file's other lines stay [env: QPROXY_HOSTS_FILE]")
    add_common_options(enclave)

    check = commands.add_parser(
        "check-config", help="Check the qproxy configuration file",
        description="Check a configuration file and print what each half will do with it.",
    )
    check.add_argument("path", nargs="?", metavar="PATH", help="Path to the configuration file")
    check.add_argument("--config", dest="config_option", metavar="CONFIG", help="Path to the configuration file")
    check.add_argument("--enclave-config", metavar="ENCLAVE_CONFIG",
                       help="The enclave half's configuration file, when it differs: every way it does not"
                            " match PATH, the host half's, is an error")
    check.add_argument("--parent-cid", type=parse_cid, metavar="PARENT_CID",
                       help="The parent CID the enclave half dials [env: QPROXY_PARENT_CID]"
                            f" [default: {DEFAULT_PARENT_CID}]")
    check.add_argument("--control-port", type=parse_port, metavar="CONTROL_PORT",
                       help=f"The control port [env: QPROXY_CONTROL_PORT] [default: {DEFAULT_CONTROL_PORT}]")

    commands.add_parser(
        "demo", help="Run both halves on this machine over emulated vsock and send a request each way",
        description="Run the vendor's walk-through on this machine, no enclave needed. As root the enclave half"
                    " gets a network namespace of its own, and each entry one port on both sides, as the vendor's"
                    " layout has.",
    )
    help_command = commands.add_parser("help", help="Print this message or the help of the given subcommand")
    help_command.add_argument("topic", nargs="?", metavar="COMMAND")
    return parser


def add_common_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", metavar="CONFIG", help="Path to the configuration file")
    command.add_argument("-t", "--threads", type=parse_threads, metavar="THREADS",
                         help="Most connections relayed at once in each direction; more wait for room "
                              f"[env: TOKIO_WORKER_THREADS] [default: {DEFAULT_MAX_CONNECTIONS}]")
    command.add_argument("--control-port", type=parse_port, metavar="CONTROL_PORT",
                         help="The vsock port of the control connection: the host half listens on it, the enclave"
                              " half dials it. Leave at default value unless you know what you are doing"
                              f" [env: QPROXY_CONTROL_PORT] [default: {DEFAULT_CONTROL_PORT}]")


def fill_from_environment(args: argparse.Namespace) -> None:
    from_environment(args, "control_port", "QPROXY_CONTROL_PORT", parse_port, DEFAULT_CONTROL_PORT)
    from_environment(args, "parent_cid", "QPROXY_PARENT_CID", parse_cid, DEFAULT_PARENT_CID)
    from_environment(args, "hosts_file", "QPROXY_HOSTS_FILE", str, None)
    if getattr(args, "hosts_file", None) == "":
        raise UsageError("--hosts-file needs the path of a hosts file, such as /etc/hosts")
    from_environment(args, "threads", "TOKIO_WORKER_THREADS", parse_threads, DEFAULT_MAX_CONNECTIONS)
    if args.command == "host":
        from_environment(args, "cid", "QPROXY_LISTEN_CID", parse_cid, None)
        if args.cid is None:
            raise UsageError("the enclave's CID is required: qproxy host CID (or set QPROXY_LISTEN_CID)")


def read_config(path: str | None, control_port: int) -> Config:
    return Config() if path is None else load_config(path, control_port)


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "help":
        if args.topic is None:
            parser.print_help()
            return EXIT_OK
        parser.parse_args([args.topic, "--help"])  # prints the help and exits 0, or exits 2 for no such command
    if args.command == "demo":
        return run_demo()
    fill_from_environment(args)
    if args.command == "check-config":
        if args.path and args.config_option and args.path != args.config_option:
            raise UsageError("give the configuration file once, as PATH or as --config")
        path = args.path or args.config_option
        if not path:
            raise UsageError("check-config needs a file: qproxy check-config PATH")
        if args.enclave_config:
            config, enclave_config = load_configs(path, args.enclave_config, control_port=args.control_port)
        else:
            config, enclave_config = load_config(path, args.control_port), None
        print("\n".join(config_summary(path, config, args.parent_cid, args.control_port,
                                         args.enclave_config, enclave_config)))
        if enclave_config:
            mismatches = config_mismatches(entries_of(config), entries_of(enclave_config))
            if mismatches:
                raise ConfigError([f"config mismatch: {mismatch}" for mismatch in mismatches])
            print(f"{args.enclave_config}: valid, and matches {path}")
        return EXIT_OK
    config = read_config(args.config, args.control_port)
    logs = setup_logging(args.command, config, os.environ)
    try:
        code = run_half(args, config, logs)
    except BaseException as error:
        if isinstance(error, StartError) and any(isinstance(handler, LogFile) for handler in logs.handlers):
            log.error("cannot start: %s", error)
        elif not isinstance(error, (UsageError, ConfigError, StartError)):
            log.debug("internal error", exc_info=True)  # main() says it in one line
        logs.drain()
        raise
    return logs.finish(code)


def run_half(args: argparse.Namespace, config: Config, logs: LogWriter) -> int:
    forward = config.log_location is None or config.log_location.forward_enclave_log
    outbox = LogOutbox() if args.command == "enclave" and forward else None
    if outbox:
        log.addHandler(outbox)  # the enclave half's records from the first on, for the host half
    vsock = Vsock(os.environ.get("QPROXY_VSOCK_EMULATION") or None)
    if not (config.inbound or config.outbound or config.egress):
        log.warning("no connections configured%s", "" if args.config else " (no --config given)")
    if args.command == "host":
        return run_host(args, config, vsock, logs)
    return run_enclave(args, config, vsock, logs, outbox)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(parser, args)
    except UsageError as error:
        print(f"qproxy: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as error:
        for problem in error.problems:
            print(f"qproxy: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except StartError as error:
        print(f"qproxy: error: {error}", file=sys.stderr)
        return EXIT_CANNOT_START
    except BrokenPipeError:  # the output's reader went away (| head): end quietly, as Python's documentation advises
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail too
        return EXIT_CANNOT_START
    except Exception as error:  # a bug: say so in one line, with the traceback only when asked for
        log.debug("internal error", exc_info=True)
        print(f"qproxy: internal error: {type(error).__name__}: {error} (RUST_LOG=debug shows a traceback)",
              file=sys.stderr)
        return EXIT_CANNOT_START


# ---------------------------------------------------------------------------
# demo: the vendor's walk-through on one machine, over emulated vsock
# ---------------------------------------------------------------------------


class CannedService(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A tiny HTTP service on 127.0.0.1:port (0: any) that answers every request with the same body."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, body: str, port: int = 0):
        self.body = body.encode()
        super().__init__(("127.0.0.1", port), CannedAnswer)


class CannedAnswer(socketserver.StreamRequestHandler):
    """One request to a CannedService: its head is read, its answer the service's body."""

    server: CannedService
    timeout = 5

    def handle(self) -> None:
        while self.rfile.readline().strip():
            pass  # the request head; the answer does not depend on it
        body = self.server.body
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
        self.wfile.write(head.encode() + body)


CLONE_NEWNET = 0x40000000


def unshare_network() -> None:
    """Give the calling thread a network namespace of its own, its loopback up, as an enclave half
    would bring it: sockets the thread makes and processes it starts are in it.  OSError or
    StartError without CAP_SYS_ADMIN and CAP_NET_ADMIN, which root has."""
    if sys.version_info >= (3, 12):
        os.unshare(os.CLONE_NEWNET)
    else:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    ensure_loopback_up()


Result = typing.TypeVar("Result")


class EnclaveSide(threading.Thread):
    """The demo's enclave: one thread that starts what the enclave runs (its half, its service, the
    app's request out), so that all of it shares the thread's network.  A daemon: an interrupted
    demo never waits for a request it sent."""

    def __init__(self) -> None:
        super().__init__(name="enclave side", daemon=True)
        self.jobs: queue.SimpleQueue[tuple[Callable[..., object], tuple[object, ...], queue.SimpleQueue[
            tuple[bool, typing.Any]]]] = queue.SimpleQueue()
        self.start()

    def run(self) -> None:
        while True:
            function, args, result = self.jobs.get()
            try:
                result.put((True, function(*args)))
            except BaseException as error:  # the caller's to handle, as if it had called function itself
                result.put((False, error))

    def call(self, function: Callable[..., Result], *args: object) -> Result:
        """function(*args), run on this thread: what it returns, or raises."""
        result: queue.SimpleQueue[tuple[bool, typing.Any]] = queue.SimpleQueue()
        self.jobs.put((function, args, result))
        while result.empty():  # not get() alone: a signal another thread took would not wake it to raise
            time.sleep(0.05)
        done, value = result.get()
        if not done:
            raise value
        return typing.cast(Result, value)


def free_ports(count: int) -> list[int]:
    """count loopback ports that nothing listens on, all different: bound at once, as one at a
    time the kernel may offer a port it just offered again."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def http_get(port: int, deadline: float, halves: dict[str, subprocess.Popen[bytes]]) -> str:
    """GET / through a port, retrying until the deadline while the halves (role: process) come up;
    StartError at once when one of them has exited."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                reply = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            if reply:
                return reply.decode(errors="replace").partition("\r\n\r\n")[2]
        except OSError:
            pass
        for role, process in halves.items():
            if process.poll() is not None:
                raise StartError(f"the {role} half exited with {process.returncode} (its log says why)")
        if time.monotonic() > deadline:
            raise StartError(f"no answer through 127.0.0.1:{port} within the deadline")
        time.sleep(0.1)


DEMO_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, a closed terminal


class DemoStop:
    """What DEMO_STOPS do to the demo: the first raises KeyboardInterrupt, at once or, while a
    half's process is being started, as soon as it is (else its handle, and the half, would be
    lost); later ones do nothing, so that they cannot cut short the stop the first asked for."""

    def __init__(self) -> None:
        self.seen = self.starting = False

    def install(self) -> None:
        for number in DEMO_STOPS:
            signal.signal(number, self.handle)

    def handle(self, number: int, frame: object) -> None:
        first, self.seen = not self.seen, True
        if first and not self.starting:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.starting = True
        try:
            yield
        finally:
            self.starting = False
        if self.seen:
            raise KeyboardInterrupt


def run_demo() -> int:
    """The walk-through, then a clean stop; its folder is kept, and named, when anything failed or
    a signal stopped it, and the halves are stopped whatever happened."""
    import shutil
    import subprocess
    import tempfile  # the demo's own needs, kept out of the halves' memory

    require_tomllib()  # the halves read a config file: say so now, not after waiting for them
    halves: dict[str, subprocess.Popen[bytes]] = {}
    services: list[CannedService] = []
    stop, folder = DemoStop(), ""
    try:
        stop.install()
        try:
            folder = tempfile.mkdtemp(prefix="qproxy-demo-")
        except OSError as error:
            raise StartError(f"cannot make a folder ({error.strerror or error}): set TMPDIR to one where it"
                             " can") from None
        walk_through(folder, stop, halves, services)
        shutil.rmtree(folder, ignore_errors=True)
        return EXIT_OK
    except BrokenPipeError:  # whoever read the output went away: nobody to tell where a folder is
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except (StartError, OSError, subprocess.TimeoutExpired, KeyboardInterrupt) as error:
        if isinstance(error, KeyboardInterrupt):
            print("demo interrupted", file=sys.stderr)
        else:
            print(f"demo failed: {error}", file=sys.stderr)
            for role in halves:
                with open(os.path.join(folder, f"{role}.log"), errors="replace") as written:
                    print(f"--- {role} half's log ({written.name}) ---\n{written.read()}", file=sys.stderr)
        if folder:
            print(f"demo: its folder, with both halves' logs and the config, is kept: {folder}", file=sys.stderr)
        return EXIT_CANNOT_START
    finally:
        stop.seen = True  # from here on a signal changes nothing: the stop is under way
        for process in halves.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for service in services:
            service.server_close()
        ignore_from_now_on(*DEMO_STOPS)


def walk_through(folder: str, stop: DemoStop, halves: dict[str, subprocess.Popen[bytes]],
                 services: list[CannedService]) -> None:
    """Both halves as processes, one request each way, then SIGTERM to both; the halves started
    and the services opened go to halves and services, for run_demo to stop whatever happens.

    The enclave side takes a network namespace of its own when it may (root):
    then the vendor's layout works as it is, one port on both sides of each
    entry.  Without one the enclave's ports differ from the parent's, which
    share this machine's network.
    """
    import subprocess

    enclave = EnclaveSide()
    try:
        enclave.call(unshare_network)
        why_not = ""
    except (OSError, AttributeError, StartError) as error:  # no right to, or no namespaces here
        enclave = EnclaveSide()  # the first may be in a namespace it cannot use
        why_not = getattr(error, "strerror", None) or ("not on Linux" if isinstance(error, AttributeError)
                                                       else "cannot bring its loopback up")
    host_port, outside_port, app_port = free_ports(3)
    if not why_not:
        app_port = outside_port  # the vendor's layout: each entry's port the same on both sides
    services.append(enclave.call(CannedService, "Hello world!", 0 if why_not else host_port))
    services.append(CannedService("Hello from outside!", outside_port))
    inside_port = services[0].server_address[1]
    for service in services:
        threading.Thread(target=service.serve_forever, daemon=True).start()
    config = os.path.join(folder, "config_qproxy.toml")
    with open(config, "w") as file:
        file.write(
            f'[[inbound_connections]]\nhost_port = {host_port}\nbind_address = "127.0.0.1"\n'
            f"enclave_port = {inside_port}\nvsock_port = 9995\n\n"
            f'[[outbound_connections]]\nhostname = "127.0.0.1"\nvsock_port = 7777\n'
            f"tcp_port = {outside_port}\nenclave_port = {app_port}\n"
        )
    environ = dict(os.environ, QPROXY_VSOCK_EMULATION=os.path.join(folder, "vsock"), RUST_LOG="info")
    print(f"demo: folder {folder}, vsock emulated with Unix sockets in {folder}/vsock")
    if not why_not:
        print("demo: the enclave half and its service run in a network namespace of their own, as in an"
              " enclave: the vendor's layout, each entry's port the same on both sides")
    else:
        print(f"demo: no network namespace for the enclave half ({why_not}; that takes CAP_SYS_ADMIN and"
              " CAP_NET_ADMIN, which root has), so it shares this machine's network and its ports differ"
              " from the parent's; as root the demo runs the vendor's layout, one port on both sides")
    print(f"demo: 'Hello world!' service (in the enclave) on 127.0.0.1:{inside_port}")
    print(f"demo: 'Hello from outside!' service (outside) on 127.0.0.1:{outside_port}")

    def start(command: list[str], output: typing.BinaryIO) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=environ, stdout=output, stderr=output)

    for role, extra in (("enclave", []), ("host", ["4"])):
        with open(os.path.join(folder, f"{role}.log"), "wb") as logfile, stop.deferred():
            command = [sys.executable, os.path.abspath(__file__), role, "--config", config, *extra]
            halves[role] = enclave.call(start, command, logfile) if role == "enclave" else start(command, logfile)
        print(f"demo: started the {role} half: {' '.join(command[1:])} (pid {halves[role].pid})")
    deadline = time.monotonic() + 15
    answer = http_get(host_port, deadline, halves)
    print(f"demo: inbound:  GET http://127.0.0.1:{host_port}/ -> host half -> vsock 9995 -> enclave half "
          f"-> 127.0.0.1:{inside_port}: {answer!r}")
    answer_out = enclave.call(http_get, app_port, deadline, halves)
    print(f"demo: outbound: GET http://127.0.0.1:{app_port}/ (the app) -> enclave half -> vsock 7777 -> host half "
          f"-> 127.0.0.1:{outside_port}: {answer_out!r}")
    if (answer, answer_out) != ("Hello world!", "Hello from outside!"):
        raise StartError("a reply was not what the service sent")
    for process in halves.values():
        process.send_signal(signal.SIGTERM)
    codes = [process.wait(timeout=15) for process in halves.values()]
    if codes != [0, 0]:
        raise StartError(f"the halves exited with {codes} after SIGTERM, expected [0, 0]")
    print("demo: both halves stopped cleanly on SIGTERM; all good")


if __name__ == "__main__":
    sys.exit(main())

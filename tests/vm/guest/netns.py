#!/usr/bin/env python3
"""Run a program inside a network namespace, optionally as another user.

    python3 netns.py /proc/PID/ns/net [--uid UID] PROG [ARGS...]

Like ``nsenter --net=FILE PROG``, but it keeps the process id (it execs,
never forks) and can drop root after entering, which the loopback check
needs.  ``setns`` is also what the checks use, from a thread, to create
sockets inside the enclave's namespace.
"""

from __future__ import annotations

import os
import sys

CLONE_NEWNET = 0x40000000


def setns(path: str) -> None:
    """Move the calling thread into the network namespace at path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, CLONE_NEWNET)
            return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number), path)
    finally:
        os.close(fd)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    path, rest = argv[0], argv[1:]
    uid = None
    if rest[0] == "--uid":
        uid, rest = int(rest[1]), rest[2:]
    setns(path)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.execvp(rest[0], rest)


if __name__ == "__main__":
    main(sys.argv[1:])

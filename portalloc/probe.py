"""Questions to the OS about ports: is this one bindable, does something listen, who holds
the ledger's lock. Process facts are psutil's, in host.py."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from portalloc.fs import UnsafeFile, read_text

if TYPE_CHECKING:
    import socket

# `socket` is imported inside the functions: `portalloc env` for an existing lease
# never probes, and start-up time is the budget that matters there.


@cache
def has_ipv6() -> bool:
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def prepare() -> None:
    """Import the socket module and learn whether the host has IPv6, before the lock."""
    has_ipv6()


def _addresses() -> list[tuple[int, str]]:
    import socket

    addrs: list[tuple[int, str]] = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0")]
    if has_ipv6():
        addrs += [(socket.AF_INET6, "::1"), (socket.AF_INET6, "::")]
    return addrs


def port_is_free(port: int) -> bool:
    """Whether a normal server could bind and listen on PORT on every local address.

    SO_REUSEADDR is set as servers set it, so TIME_WAIT leftovers do not count as busy,
    while on Linux a socket in LISTEN on the port still makes the bind fail.
    """
    import socket

    for family, host in _addresses():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Judge the IPv6 stack on its own; the IPv4 wildcard was tried above.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                if exc.errno == errno.EADDRNOTAVAIL:
                    continue
                raise
    return True


def is_listening(port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on PORT on the loopback addresses."""
    import socket

    hosts = ["127.0.0.1", "::1"] if has_ipv6() else ["127.0.0.1"]
    for host in hosts:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


# How long a fresh connection must stay open to count as answered. A forwarder with
# nothing behind it (docker-proxy before the service in the container listens, a
# rootless port driver, an SSH tunnel) accepts at once and then closes or resets the
# connection within milliseconds; a server keeps it open waiting for a request (HTTP,
# PostgreSQL, Redis) or speaks first (SSH, SMTP, MySQL).
SETTLE_SECONDS = 0.25


def answering(
    ports: Iterable[int], timeout: float = 0.2, settle: float = SETTLE_SECONDS
) -> dict[int, bool]:
    """Which of PORTS answer on the loopback addresses: a TCP connection is accepted and
    survives SETTLE seconds (or the server sends something first).

    A connection that is accepted and then closed or reset does not count: that is
    docker-proxy (or any forwarder) with no service behind it. All ports are waited
    for at once, so the whole call takes about SETTLE seconds when every port answers,
    less when none does.
    """
    import socket

    result = dict.fromkeys(ports, False)
    hosts = ["127.0.0.1", "::1"] if has_ipv6() else ["127.0.0.1"]
    for host in hosts:
        pending = [port for port, up in result.items() if not up]
        if not pending:
            break
        opened: dict[socket.socket, int] = {}
        try:
            for port in pending:
                try:
                    opened[socket.create_connection((host, port), timeout=timeout)] = port
                except OSError:
                    continue
            for sock in _survivors(list(opened), settle):
                result[opened[sock]] = True
        finally:
            for sock in opened:
                sock.close()
    return result


def _survivors(socks: list[socket.socket], settle: float) -> list[socket.socket]:
    """SOCKS that neither close nor reset within SETTLE seconds (or that sent data)."""
    import selectors
    import socket
    import time

    alive = list(socks)
    deadline = time.monotonic() + settle
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, sock)
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _events in selector.select(left):
                sock = key.data
                try:
                    data = sock.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    continue  # a spurious wake-up: still open
                except OSError:
                    data = b""  # reset: accepted, then refused behind the forwarder
                selector.unregister(sock)
                if not data:
                    alive.remove(sock)  # closed at once: nothing answers behind it
    return alive


def lock_holders(path: Path) -> list[int]:
    """PIDs holding a flock on PATH, from /proc/locks (Linux); [] where the OS does not tell."""
    try:
        st = path.stat()
        table = read_text("/proc/locks")
    except (OSError, UnsafeFile, UnicodeDecodeError):
        return []
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    exact: list[int] = []
    # btrfs subvolumes (and some overlays) report another device than /proc/locks
    # does: fall back to the inode alone when only one holder matches it.
    by_inode: set[int] = set()
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF"; blocked waiters have "->".
        fields = line.split()
        if len(fields) < 6 or "->" in fields or fields[1] != "FLOCK":
            continue
        if not fields[4].isdigit() or int(fields[4]) <= 0:
            continue
        pid = int(fields[4])
        if fields[5] == wanted and pid not in exact:
            exact.append(pid)
        elif fields[5].rsplit(":", 1)[-1] == str(st.st_ino):
            by_inode.add(pid)
    if exact:
        return exact
    return list(by_inode) if len(by_inode) == 1 else []

"""Questions to the OS: is this port bindable, is this process still the one we recorded."""

from __future__ import annotations

import errno
import os
from functools import cache
from pathlib import Path

from portalloc.models import Owner

# `socket` is imported inside the functions: `portalloc env` for an existing lease
# never probes, and start-up time is the budget that matters there.


@cache
def _has_ipv6() -> bool:
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _addresses() -> list[tuple[int, str]]:
    import socket

    addrs: list[tuple[int, str]] = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0")]
    if _has_ipv6():
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


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours
    return True


def owner_of(pid: int) -> Owner:
    return Owner(pid=pid, start_ticks=process_start_ticks(pid))


def owner_alive(owner: Owner) -> bool:
    """Alive means the PID exists and, where the OS tells, started when we recorded it."""
    if not pid_exists(owner.pid):
        return False
    if owner.start_ticks is None:
        return True
    current = process_start_ticks(owner.pid)
    if current is None:
        return True  # no /proc: the PID check is all we have
    if current != owner.start_ticks:
        return False
    # A zombie has exited; its parent just has not reaped it yet.
    try:
        state = Path(f"/proc/{owner.pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2 :][:1] != "Z"


def is_listening(port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on PORT on the loopback addresses."""
    import socket

    hosts = ["127.0.0.1", "::1"] if _has_ipv6() else ["127.0.0.1"]
    for host in hosts:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    return inodes


def listening_processes(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of processes with a LISTEN socket on PORT, where /proc tells."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    targets = {f"socket:[{inode}]" for inode in inodes}
    found: list[tuple[int, str]] = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            fds = list((proc_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if str(fd.readlink()) in targets:
                    pid = int(proc_dir.name)
                    found.append((pid, command_line(pid) or ""))
                    break
            except OSError:
                continue
    return found


def command_line(pid: int, limit: int = 120) -> str | None:
    """PID's command line on one printable line (control characters become spaces)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    text = raw.decode(errors="replace")
    # A `python -c` script or a hostile argument may hold newlines or escapes: the
    # line ends up in a one-line error message on someone's terminal.
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())[:limit]


def lock_holders(path: Path) -> list[int]:
    """PIDs holding a flock on PATH, from /proc/locks (Linux); [] where the OS does not tell."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
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

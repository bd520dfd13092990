"""The outside world behind one object: the clock, the port probe, process and path facts.

The core asks `Host` and nothing else, so a test can fake the whole world in one value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from portalloc import probe
from portalloc.models import Owner


class Listener(NamedTuple):
    """A process with a LISTEN socket on a port; fields are None where the OS does not tell."""

    pid: int | None
    command: str | None = None
    cwd: str | None = None

    def describe(self) -> str:
        if self.pid is None:
            return "a process the OS does not name"
        return f"pid {self.pid} ({self.command})" if self.command else f"pid {self.pid}"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def path_exists(path: str) -> bool:
    """Whether PATH exists; a path we may not inspect counts as existing.

    In a shared state dir another user's worktree may sit under a 0700 home: not
    being allowed to look is no proof that it is gone.
    """
    try:
        Path(path).stat()
    except PermissionError:
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return True  # an odd path (ELOOP, EIO, NUL byte): never reclaim on a guess
    return True


# Two readings of one process's start time differ by float rounding at most; a
# recycled PID started at least a clock tick (10 ms) later.
START_TOLERANCE = 0.005


def owner_of(pid: int) -> Owner:
    """PID with its start time, so a later process reusing the PID is not taken for it."""
    import psutil

    try:
        started: float | None = psutil.Process(pid).create_time()
    except (psutil.Error, OSError, ValueError, OverflowError):
        started = None
    return Owner(pid=pid, started=started)


def owner_alive(owner: Owner) -> bool:
    """The PID runs, started when recorded (where the OS tells), and is not a zombie."""
    import psutil

    try:
        process = psutil.Process(owner.pid)
        if owner.started is not None and abs(process.create_time() - owner.started) > (
            START_TOLERANCE
        ):
            return False
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:  # ZombieProcess is one too: exited, not yet reaped
        return False
    except (psutil.AccessDenied, OSError, ValueError, OverflowError):
        return True  # it exists; it is just not ours to inspect


def command_line(pid: int, limit: int = 120) -> str | None:
    """PID's command line on one printable line (control characters become spaces)."""
    import psutil

    try:
        text = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return None
    # A `python -c` script or a hostile argument may hold newlines or escapes: the
    # line ends up in a one-line message on someone's terminal.
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())[:limit]


def lock_holder(path: Path) -> str | None:
    """Who holds the flock on PATH now, as "pid N: command" (Linux; None elsewhere)."""
    pids = probe.lock_holders(path)
    if not pids:
        return None
    command = command_line(pids[0])
    return f"pid {pids[0]}: {command}" if command else f"pid {pids[0]}"


def listeners(port: int) -> list[Listener]:
    """Processes listening on TCP PORT, with their command line and working directory."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return []
    pids = {
        conn.pid
        for conn in connections
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
    }
    found: list[Listener] = []
    for pid in sorted(pids, key=lambda p: -1 if p is None else p):
        if pid is None:
            found.append(Listener(None))
            continue
        found.append(Listener(pid, command_line(pid), _cwd(pid)))
    return found


def _cwd(pid: int) -> str | None:
    import psutil

    try:
        return str(psutil.Process(pid).cwd())
    except (psutil.Error, OSError):
        return None


def is_descendant(pid: int, ancestor: Owner) -> bool:
    """Whether PID is ANCESTOR itself or runs below it in the process tree."""
    import psutil

    if not owner_alive(ancestor):
        return False
    try:
        process = psutil.Process(pid)
        lineage = [process, *process.parents()]
    except (psutil.Error, OSError):
        return False
    return any(p.pid == ancestor.pid for p in lineage)


def compose_publishes(project: str, port: int) -> bool:
    """Whether a running container of compose project PROJECT publishes PORT (asks docker).

    Docker's published ports are held by `docker-proxy`, a child of dockerd that
    runs nowhere near the worktree: the compose label is what ties it to a session.
    """
    import re
    import subprocess

    try:
        result = subprocess.run(
            [
                "docker",
                "ps",
                "--filter",
                f"label=com.docker.compose.project={project}",
                "--format",
                "{{.Ports}}",
            ],
            capture_output=True,
            text=True,
            # It runs under the ledger's lock, only when a docker-proxy sits on a home
            # port: a slow daemon must not hold everyone else up for long.
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    # "0.0.0.0:10001->3000/tcp, [::]:10001->3000/tcp"
    return result.returncode == 0 and re.search(rf":{port}->", result.stdout) is not None


def inside(path: str, directory: str) -> bool:
    """Whether PATH is DIRECTORY or lies below it (both absolute, compared as paths)."""
    path = os.path.normpath(path)
    directory = os.path.normpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def in_worktree(path: str, worktree: str) -> bool:
    """Whether PATH lies in WORKTREE itself, not in a worktree nested inside it (a
    directory below it holding its own `.git`, as `.claude/worktrees/x` does)."""
    if not inside(path, worktree):
        return False
    top = Path(os.path.normpath(worktree))
    here = Path(os.path.normpath(path))
    while here != top:
        try:
            if (here / ".git").exists():
                return False
        except OSError:
            return False
        here = here.parent
    return True


@dataclass
class Host:
    """Every fact the core takes from the world; replace any field to fake it."""

    now: Callable[[], datetime] = utcnow
    port_is_free: Callable[[int], bool] = probe.port_is_free
    listeners: Callable[[int], list[Listener]] = listeners
    owner_of: Callable[[int], Owner] = owner_of
    owner_alive: Callable[[Owner], bool] = owner_alive
    is_descendant: Callable[[int, Owner], bool] = is_descendant
    compose_publishes: Callable[[str, int], bool] = compose_publishes
    path_exists: Callable[[str], bool] = path_exists

"""The outside world behind one object: the clock, the port probe, process and path
facts, docker, who holds the lock.

The service takes every such fact from its `Host` (and hands the ledger the one it
needs), so a test can fake them in one value. Files go through fs.py; the read path
asks facts.py directly, without building a Host.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from portalloc import probe

# The facts a read needs, importable without this module (the read path's budget).
from portalloc.facts import START_TOLERANCE as START_TOLERANCE
from portalloc.facts import owner_alive as owner_alive
from portalloc.facts import path_exists as path_exists
from portalloc.facts import utcnow as utcnow
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


def owner_of(pid: int) -> Owner:
    """PID with its start time, so a later process reusing the PID is not taken for it."""
    import psutil

    try:
        started: float | None = psutil.Process(pid).create_time()
    except (psutil.Error, OSError, ValueError, OverflowError):
        started = None
    return Owner(pid=pid, started=started)


def command_line(pid: int, limit: int = 120) -> str | None:
    """PID's command line on one printable line (control characters become spaces).

    A line longer than LIMIT is cut after its last whole argument that fits and ends
    in " …": never in the middle of an option (dockerd's long lines ended in a bare
    `--`, read as "end of options").
    """
    import psutil

    try:
        text = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return None
    # A `python -c` script or a hostile argument may hold newlines or escapes: the
    # line ends up in a one-line message on someone's terminal.
    return shorten(" ".join("".join(ch if ch.isprintable() else " " for ch in text).split()), limit)


def shorten(line: str, limit: int) -> str:
    """LINE cut to at most LIMIT characters at a space, ending in " …" when cut."""
    if len(line) <= limit:
        return line
    cut = line[: max(limit - 2, 1)]
    if line[len(cut)] != " " and " " in cut:
        cut = cut.rsplit(" ", 1)[0]  # the last argument that fits whole
    return cut.rstrip() + " …"


def lock_holder(path: Path) -> str | None:
    """Who holds the flock on PATH now, as "pid N: command" (Linux; None elsewhere).

    Asked of the kernel, not of a pid file: a pid written by the last holder goes stale,
    and a process that is not portalloc (`flock leases.json.lock ...`) writes none."""
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


# Docker's own labels on every container `docker compose` makes.
PROJECT_LABEL = "com.docker.compose.project"
WORKDIR_LABEL = "com.docker.compose.project.working_dir"


def _docker(*args: str, timeout: float) -> str | None:
    """`docker ARGS`'s stdout, or None where docker is missing, fails or is slow."""
    import subprocess

    try:
        result = subprocess.run(
            ["docker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return result.stdout if result.returncode == 0 else None


def compose_publishes(project: str, port: int) -> bool:
    """Whether a running container of compose project PROJECT publishes host PORT.

    Docker's answer, not a process name: the socket is held by `docker-proxy`, by
    dockerd itself (`--userland-proxy=false`) or by a rootless port driver, none of
    them near the worktree; the compose label is what ties it to a session. Docker
    matches PORT inside published ranges (`21302-21303->21302-21303/tcp`) too.
    """
    # It runs under the ledger's lock, only when something listens on a home port:
    # a slow daemon must not hold everyone else up for long.
    found = _docker(
        "ps",
        "--quiet",
        "--filter",
        f"label={PROJECT_LABEL}={project}",
        "--filter",
        f"publish={port}",
        timeout=2,
    )
    if found is not None:
        return bool(found.strip())
    # A docker-compatible CLI without the publish filter (older podman): its own
    # record of the project's port bindings.
    return any(port in stack.ports for stack in compose_stacks(project))


class Stack(NamedTuple):
    """The running containers of one compose project, as docker records them."""

    project: str
    working_dir: str | None  # where `docker compose up` ran (None: docker does not say)
    ports: tuple[int, ...]  # host ports its containers publish, ascending
    containers: tuple[str, ...]


def compose_stacks(project: str | None = None, timeout: float = 5) -> list[Stack]:
    """Running compose projects (or only PROJECT), from `docker ps` and `docker inspect`.

    [] where docker is missing or its daemon does not answer.
    """
    import json

    label = PROJECT_LABEL if project is None else f"{PROJECT_LABEL}={project}"
    ids = _docker("ps", "--quiet", "--no-trunc", "--filter", f"label={label}", timeout=timeout)
    if not ids or not ids.split():
        return []
    raw = _docker("inspect", *ids.split(), timeout=timeout)
    try:
        records = json.loads(raw) if raw else []
    except ValueError:
        return []
    by_project: dict[str, tuple[str | None, set[int], list[str]]] = {}
    for record in records if isinstance(records, list) else []:
        try:
            labels = record["Config"]["Labels"] or {}
            name = str(labels[PROJECT_LABEL])
            workdir = labels.get(WORKDIR_LABEL)
            bindings = (record.get("NetworkSettings") or {}).get("Ports") or {}
            ports = {
                int(binding["HostPort"])
                for binding_list in bindings.values()
                for binding in binding_list or ()
                if str(binding.get("HostPort", "")).isdigit()
            }
            container = str(record.get("Name", "")).lstrip("/") or str(record.get("Id", ""))[:12]
        except (KeyError, TypeError, AttributeError, ValueError):
            continue
        entry = by_project.setdefault(name, (None if workdir is None else str(workdir), set(), []))
        entry[1].update(ports)
        entry[2].append(container)
    return [
        Stack(name, workdir, tuple(sorted(ports)), tuple(sorted(containers)))
        for name, (workdir, ports, containers) in sorted(by_project.items())
    ]


def orphan_stacks(
    span: range | None = None, exists: Callable[[str], bool] = path_exists
) -> list[Stack]:
    """Compose stacks still running after their working directory was removed (a
    worktree deleted while its stack was up): nothing but `docker compose -p NAME
    down` stops them, and their ports sit in what was the worktree's block.

    Only stacks that publish a port in SPAN (portalloc's blocks) when given, and whose
    directory's parent still exists: a stack on a remote daemon (a docker context)
    records a directory of another machine, which is no orphan of this one.
    """
    found = []
    for stack in compose_stacks():
        workdir = stack.working_dir
        if not workdir or not Path(workdir).is_absolute() or exists(workdir):
            continue
        if not exists(str(Path(workdir).parent)):
            continue
        if span is not None and not any(port in span for port in stack.ports):
            continue
        found.append(stack)
    return found


def compose_down(project: str, timeout: float = 120) -> str | None:
    """`docker compose -p PROJECT down`: docker's own way to stop a stack; None if it
    worked, else what went wrong (one line)."""
    import subprocess

    try:
        result = subprocess.run(
            ["docker", "compose", "-p", project, "down"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc) or type(exc).__name__
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return shorten(" ".join((lines[-1] if lines else f"exit {result.returncode}").split()), 200)


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
    # Who holds the ledger's lock (`pid N: command`), for a lock timeout's message.
    lock_holder: Callable[[Path], str | None] = lock_holder

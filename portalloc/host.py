"""The outside world behind one object: the clock, the port probe, process and path
facts, docker, who holds the lock.

The service takes every such fact from its `Host` (and hands the ledger the one it
needs), so a test can fake them in one value. Files go through fs.py; the read path
asks facts.py directly, without building a Host.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any, NamedTuple

from portalloc import probe
from portalloc.errors import printable

# The facts a read needs, importable without this module (the read path's budget).
from portalloc.facts import START_TOLERANCE as START_TOLERANCE
from portalloc.facts import owner_alive as owner_alive
from portalloc.facts import path_exists as path_exists
from portalloc.facts import utcnow as utcnow
from portalloc.models import Owner
from portalloc.rules import COMPOSE_NAME


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
# How long one operation waits for docker in all: the port check runs under the
# ledger's lock, and `status` should answer at once whatever the daemon does.
DOCKER_BUDGET = 2.0
# What holds a port docker publishes, where it is not dockerd itself: when docker
# does not answer, a listener of these (or one the OS does not name) may be the
# session's own stack.
FORWARDERS = frozenset(
    {
        "docker-proxy",
        "dockerd",
        "rootlesskit",
        "rootlessport",
        "slirp4netns",
        "pasta",
        "pasta.avx2",
        "conmon",
        "gvproxy",
        "vpnkit",
        "com.docker.backend",
    }
)


def forwarder(command: str | None) -> bool:
    """Whether COMMAND (a listener's command line) is a process docker, Podman or a
    rootless port driver publishes ports with."""
    program = (command or "").split(" ", 1)[0]
    return PurePath(program).name in FORWARDERS


class Reply(NamedTuple):
    """What one `docker` command said: its exit code (127: no docker), stdout, stderr."""

    code: int
    out: str
    err: str


class DockerCLI:
    """`docker` for one operation: all its calls share one time budget, and once docker
    has not answered it is not asked again (a hung daemon costs the budget once, not
    once per port). A call that runs out of time is killed with its whole process
    group, so nothing it started is left behind."""

    def __init__(self, budget: float = DOCKER_BUDGET) -> None:
        self.budget = budget
        self.answered = True  # False once a call ran out of time
        self._deadline: float | None = None

    def __call__(self, *args: str) -> Reply | None:
        """ARGS's reply, or None when docker did not answer in time (now or before)."""
        import time

        if not self.answered:
            return None
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.budget
        reply = run_docker(args, self._deadline - now)
        if reply is None:
            self.answered = False
        return reply


def run_docker(args: Sequence[str], timeout: float) -> Reply | None:
    """`docker ARGS` within TIMEOUT seconds; None if it did not end in time (then it and
    every process it started are killed)."""
    import signal
    import subprocess

    if timeout <= 0:
        return None
    try:
        process = subprocess.Popen(
            ["docker", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group, killed as one
        )
    except (OSError, ValueError) as exc:
        return Reply(127, "", str(exc))
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process, signal.SIGKILL)
        # A grandchild in a session of its own may still hold the pipes: do not wait
        # for them to close, only for docker itself.
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            process.wait(timeout=1)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return None
    return Reply(process.returncode, out, err)


def _kill_group(process: Any, signum: int) -> None:
    killpg = getattr(os, "killpg", None)
    try:
        if killpg is not None:
            killpg(process.pid, signum)
        else:  # pragma: no cover (Windows)
            process.kill()
    except OSError:
        pass


def _filter_unsupported(reply: Reply) -> bool:
    """Whether docker refused a `--filter` it does not know (an older podman's
    `publish is an invalid filter`), not a value or a daemon it cannot reach."""
    text = reply.err.lower()
    return reply.code not in (0, 127) and "invalid filter" in text


def compose_publishes(project: str, port: int, docker: DockerCLI | None = None) -> bool | None:
    """Whether a running container of compose project PROJECT publishes host PORT; None
    when docker did not answer within DOCKER's budget.

    Docker's answer, not a process name: the socket is held by `docker-proxy`, by
    dockerd itself (`--userland-proxy=false`) or by a rootless port driver, none of
    them near the worktree; the compose label is what ties it to a session. Docker
    matches PORT inside published ranges (`21302-21303->21302-21303/tcp`) too.
    """
    # It runs under the ledger's lock, only when something listens on a home port:
    # a slow daemon must not hold everyone else up for long (DockerCLI's budget).
    docker = docker or DockerCLI()
    reply = docker(
        "ps",
        "--quiet",
        "--filter",
        f"label={PROJECT_LABEL}={project}",
        "--filter",
        f"publish={port}",
    )
    if reply is None:
        return None
    if reply.code == 0:
        return bool(reply.out.strip())
    if not _filter_unsupported(reply):
        return False  # no docker, or no daemon to ask: no container publishes anything
    # A docker-compatible CLI without the publish filter (older podman): its own
    # record of the project's port bindings.
    stacks = compose_stacks(project, docker)
    return None if stacks is None else any(port in stack.ports for stack in stacks)


class Stack(NamedTuple):
    """The running containers of one compose project, as docker records them."""

    project: str
    working_dir: str | None  # where `docker compose up` ran (None: docker does not say)
    ports: tuple[int, ...]  # host ports its containers publish, ascending
    containers: tuple[str, ...]


def compose_stacks(
    project: str | None = None, docker: DockerCLI | None = None
) -> list[Stack] | None:
    """Running compose projects (or only PROJECT), from `docker ps` and `docker inspect`;
    [] where docker is missing or has no daemon, None where it did not answer in time.

    A project label that is no compose project name (`Victim`: compose would make it
    `victim`, and `docker compose -p Victim` acts on the project `victim`) is not one
    of compose's stacks: it is left out, never shown, named or stopped.
    """
    import json

    docker = docker or DockerCLI()
    label = PROJECT_LABEL if project is None else f"{PROJECT_LABEL}={project}"
    listed = docker("ps", "--quiet", "--no-trunc", "--filter", f"label={label}")
    if listed is None:
        return None
    ids = listed.out.split() if listed.code == 0 else []
    if not ids:
        return []
    raw = docker("inspect", *ids)
    if raw is None:
        return None
    try:
        records = json.loads(raw.out) if raw.code == 0 and raw.out else []
    except ValueError:
        return []
    by_project: dict[str, tuple[str | None, set[int], list[str]]] = {}
    for record in records if isinstance(records, list) else []:
        try:
            labels = record["Config"]["Labels"] or {}
            name = labels[PROJECT_LABEL]
            workdir = labels.get(WORKDIR_LABEL)
            if not isinstance(name, str) or not COMPOSE_NAME.fullmatch(name):
                continue
            if project is not None and name != project:
                continue
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
        shown_dir = workdir if isinstance(workdir, str) and workdir else None
        entry = by_project.setdefault(name, (shown_dir, set(), []))
        entry[1].update(ports)
        entry[2].append(container)
    return [
        Stack(name, workdir, tuple(sorted(ports)), tuple(sorted(containers)))
        for name, (workdir, ports, containers) in sorted(by_project.items())
    ]


def compose_down(project: str, timeout: float = 120) -> str | None:
    """`docker compose -p PROJECT down`: docker's own way to stop a stack; None if it
    worked, else what went wrong (one line)."""
    if not COMPOSE_NAME.fullmatch(project):
        # compose would act on the name lower-cased: another, maybe live, project
        return f"{printable(project)} is no compose project name"
    reply = run_docker(("compose", "-p", project, "down"), timeout)
    if reply is None:
        return f"`docker compose -p {project} down` did not end in {timeout:g} s"
    if reply.code == 0:
        return None
    lines = [line for line in reply.err.splitlines() if line.strip()]
    return printable(shorten(" ".join((lines[-1] if lines else f"exit {reply.code}").split()), 200))


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
    # Whether a container of the project publishes the port; None: docker did not
    # answer within the operation's budget (one DockerCLI per operation).
    compose_publishes: Callable[[str, int, DockerCLI], bool | None] = compose_publishes
    path_exists: Callable[[str], bool] = path_exists
    # Who holds the ledger's lock (`pid N: command`), for a lock timeout's message.
    lock_holder: Callable[[Path], str | None] = lock_holder

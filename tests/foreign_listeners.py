"""Foreign listeners: what a busy developer machine has on portalloc's default ports.

The suite must pass while other stacks listen on the ports portalloc hands out by
default (another worktree's compose stack, a docker-proxy on 0.0.0.0, a dev server
on ::1 alone). With PORTALLOC_TEST_FOREIGN_LISTENERS=1, tests/conftest.py starts

    python -m tests.foreign_listeners

as a process of its own (in `/`, its own session: no test's working directory,
process, process group or descendant of the run), waits for its `ready N` line,
and stops it by its PID when the run ends; CI (.ci/run) runs the suite that way. In
the pytest process itself they would count as the test's own (its PID, its working
directory) under a plain `pytest`. Alone, the command holds the listeners until
interrupted, to run anything else against them; with `--watch PID` it also ends
when that process does.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

from portalloc.probe import has_ipv6

ENV_VAR = "PORTALLOC_TEST_FOREIGN_LISTENERS"
PID_VAR = "PORTALLOC_TEST_FOREIGN_PID"  # the listeners' process, for the tests that ask
# The default blocks (base 10000: the first three) and the ports the probe tests once
# bound at fixed numbers.
RANGES = (range(10000, 10300), range(21000, 21204))
READY_TIMEOUT = 60.0


def enabled(environ: dict[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(ENV_VAR, "") not in ("", "0")


def addresses(port: int, ipv6: bool) -> list[str]:
    """Where PORT is held, as the machine's servers bind: 0.0.0.0 (docker-proxy), 127.0.0.1
    (a dev server), 127.0.0.1 and ::1 (a server on `localhost`), ::1 alone (Vite and
    Node's `localhost` on a host that resolves it to ::1 first). Without IPv6, 127.0.0.1."""
    kind = port % 4
    if kind == 0:
        return ["0.0.0.0"]
    if kind == 1 or not ipv6:
        return ["127.0.0.1"]
    return ["127.0.0.1", "::1"] if kind == 2 else ["::1"]


def _listen(host: str, port: int) -> socket.socket | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return None  # something foreign holds it already: as good as ours
        raise
    return sock


def start() -> list[socket.socket]:
    """Listen on every port of RANGES (see `addresses`). Ports already taken are skipped."""
    ipv6 = has_ipv6()
    socks: list[socket.socket] = []
    try:
        for ports in RANGES:
            for port in ports:
                for host in addresses(port, ipv6):
                    sock = _listen(host, port)
                    if sock is not None:
                        socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def describe(count: int) -> str:
    spans = ", ".join(f"{r.start}-{r.stop - 1}" for r in RANGES)
    family = "IPv4 and IPv6" if has_ipv6() else "IPv4"
    return f"foreign listeners on {spans} ({family}, a process of their own): {count} sockets"


# --- the test run's side -------------------------------------------------------------


class Listeners:
    """The listeners' process, started and stopped by the test run."""

    def __init__(self, pid: int, started: float, count: int) -> None:
        self.pid = pid
        self.started = started  # its start time: a PID reused later is not it
        self.count = count

    def stop(self) -> None:
        """SIGTERM to its PID, if that is still the process started (SIGKILL after 10 s)."""
        import psutil

        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.started) > 0.01:
                return
            process.terminate()
        except psutil.NoSuchProcess:
            return
        _gone, alive = psutil.wait_procs([process], timeout=10)
        for left in alive:
            left.kill()


def launch(root: Path) -> Listeners:
    """Start `python -m tests.foreign_listeners` and wait until it says it listens.

    Started through `sh -c '... &'`, which exits at once: the listeners are no child
    or descendant of the test run, so no test's "own process or its descendants" rule
    takes them for its own (a test that leases with `--pid` of pytest's PID would)."""
    import psutil

    command = [sys.executable, "-m", "tests.foreign_listeners", "--watch", str(os.getpid())]
    shell = subprocess.Popen(
        ["sh", "-c", '"$@" </dev/null & echo "pid $!"', "sh", *command],
        cwd="/",  # inside no test's worktree
        env={**os.environ, "PYTHONPATH": str(root)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,  # its own process group: ^C of the run does not reach it
    )
    assert shell.stdout is not None
    said: list[str] = []
    with shell.stdout:
        while not said or said[-1].split()[:1] != ["ready"]:
            ready, _, _ = select.select([shell.stdout], [], [], READY_TIMEOUT)
            line = shell.stdout.readline().decode(errors="replace").strip() if ready else ""
            if not line:
                break
            said.append(line)
    shell.wait()
    pid = next((int(line.split()[1]) for line in said if line.startswith("pid ")), None)
    started = psutil.Process(pid).create_time() if pid and psutil.pid_exists(pid) else 0.0
    if pid is None or not said or said[-1].split()[:1] != ["ready"]:
        if pid is not None:
            Listeners(pid, started, 0).stop()
        raise RuntimeError(f"the foreign listeners did not start (said {said!r})")
    return Listeners(pid, started, int(said[-1].split()[1]))


# --- the listeners' side --------------------------------------------------------------


def _gone(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) > 0.01
    except psutil.NoSuchProcess:
        return True


def main(argv: list[str]) -> int:
    import psutil

    # --watch PID: end when that process (the test run) is gone, so a run killed with
    # SIGKILL does not leave the ports held.
    watched = int(argv[argv.index("--watch") + 1]) if "--watch" in argv else None
    started = psutil.Process(watched).create_time() if watched else 0.0
    socks = start()
    print(f"ready {len(socks)}", flush=True)
    if sys.stdout.isatty():  # started by hand, not by a test run reading stdout
        print(describe(len(socks)), file=sys.stderr, flush=True)
    try:
        while signal.sigtimedwait({signal.SIGINT, signal.SIGTERM}, 1.0) is None:
            if watched is not None and _gone(watched, started):
                break
    finally:
        for sock in socks:
            sock.close()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main(sys.argv[1:]))

"""Foreign listeners: what a busy developer machine has on portalloc's default ports.

The suite must pass while other stacks listen on the ports portalloc hands out by
default (another worktree's compose stack, a docker-proxy on 0.0.0.0). With
PORTALLOC_TEST_FOREIGN_LISTENERS=1, tests/conftest.py opens these listeners in the
pytest process that runs (or, under pytest-xdist, controls) the session and keeps
them for the whole run; CI (.ci/run) runs the suite that way. Alone,

    python -m tests.foreign_listeners

holds the same listeners until interrupted, to run anything else against them.
"""

from __future__ import annotations

import errno
import signal
import socket
import sys

ENV_VAR = "PORTALLOC_TEST_FOREIGN_LISTENERS"
# The default blocks (base 10000: the first three) and the ports the probe tests once
# bound at fixed numbers.
RANGES = (range(10000, 10300), range(21000, 21204))


def enabled(environ: dict[str, str] | None = None) -> bool:
    import os

    return (os.environ if environ is None else environ).get(ENV_VAR, "") not in ("", "0")


def _listen(host: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return None  # something foreign holds it already: as good as ours
        raise
    return sock


def start() -> list[socket.socket]:
    """Listen on every port of RANGES: even ones on 0.0.0.0 (as docker-proxy binds),
    odd ones on 127.0.0.1 (as a dev server binds). Ports already taken are skipped."""
    socks: list[socket.socket] = []
    try:
        for ports in RANGES:
            for port in ports:
                sock = _listen("0.0.0.0" if port % 2 == 0 else "127.0.0.1", port)
                if sock is not None:
                    socks.append(sock)
    except BaseException:
        stop(socks)
        raise
    return socks


def stop(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()
    socks.clear()


def describe(count: int) -> str:
    spans = ", ".join(f"{r.start}-{r.stop - 1}" for r in RANGES)
    total = sum(len(r) for r in RANGES)
    return f"foreign listeners on {spans}: {count} of {total} ports (the rest were busy already)"


def main() -> int:
    socks = start()
    print(describe(len(socks)), file=sys.stderr, flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        stop(socks)
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())

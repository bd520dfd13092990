"""`portalloc run`: a child process living inside a lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from types import FrameType

from portalloc.service import PortAllocatorService


def _tty_delivers_sigint() -> bool:
    """Whether Ctrl-C at a terminal reaches the child by itself (same foreground group)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def run_with_lease(
    service: PortAllocatorService,
    session_id: str,
    command: list[str],
    *,
    keep: bool,
    ttl_minutes: int | None,
    warn: Callable[[str], None],
) -> int:
    """Run COMMAND with the lease's environment; return its exit code (128+N for signal N)."""
    # The lease is tied to this process: if `portalloc run` is killed outright,
    # the next operation sees its owner dead and reclaims the block. With --keep
    # the lease must outlive us, so only its TTL ends it.
    owner = None if keep else os.getpid()
    allocation = service.allocate(session_id, ttl_minutes=ttl_minutes, pid=owner)
    env = {**os.environ, **allocation.env}
    try:
        try:
            child = subprocess.Popen(command, env=env)
        except FileNotFoundError:
            warn(f"command not found: {command[0]}")
            return 127
        except PermissionError:
            warn(f"command not executable: {command[0]}")
            return 126
        except OSError as exc:  # e.g. ENOEXEC: an executable file with no #! line
            warn(f"cannot run {command[0]}: {exc.strerror or exc}")
            return 126

        def forward(signum: int, _frame: FrameType | None) -> None:
            if signum == signal.SIGINT and _tty_delivers_sigint():
                return  # the terminal already sent it to the child
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

        previous = {
            sig: signal.signal(sig, forward)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if not keep:
            service.release(session_id)
    return code if code >= 0 else 128 - code

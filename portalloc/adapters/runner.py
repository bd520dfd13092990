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


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec hook that has Linux signal the child when `portalloc run` dies, even
    by SIGKILL (PR_SET_PDEATHSIG); None where the OS offers nothing like it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        # SIGTERM rather than SIGKILL: a compose stack or dev server gets to clean up.
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            # The parent died between fork and prctl: the signal will never come.
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def run_with_lease(
    service: PortAllocatorService,
    session_id: str,
    command: list[str],
    *,
    keep: bool,
    ttl_minutes: int | None,
    error: Callable[[str], None],
) -> int:
    """Run COMMAND with the lease's environment; return its exit code (128+N for signal N)."""
    # A lease we make is tied to this process: if `portalloc run` is killed
    # outright, the next operation sees it dead and reclaims the block. A lease
    # the session already had is only joined: it stays while we run, and is left
    # as it was when we end. With --keep a lease we make outlives us.
    me = os.getpid()
    allocation = service.hold(session_id, pid=me, keep=keep, ttl_minutes=ttl_minutes).allocation
    env = {**os.environ, **allocation.env}
    try:
        try:
            child = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent(me))
        except FileNotFoundError:
            error(f"command not found: {command[0]}")
            return 127
        except PermissionError:
            error(f"command not executable: {command[0]}")
            return 126
        except OSError as exc:  # e.g. ENOEXEC: an executable file with no #! line
            error(f"cannot run {command[0]}: {exc.strerror or exc}")
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
        service.leave(session_id, me)
    return code if code >= 0 else 128 - code

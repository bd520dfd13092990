"""The facts a read asks of the outside world: the time, whether a path still exists,
whether a process still runs, which worktree a directory is in.

`host.Host` defaults to these. They live apart from host.py so that `portalloc env`
for a live lease reads them without importing what the rest of the host needs (the
port probe, dataclasses, pathlib, docker): start-up time is its budget.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from portalloc.fs import stat_or_none

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from portalloc.models import Owner


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def path_exists(path: str) -> bool:
    """Whether PATH exists; a path we may not inspect counts as existing.

    In a shared state dir another user's worktree may sit under a 0700 home: not
    being allowed to look is no proof that it is gone.
    """
    try:
        os.stat(path)  # noqa: PTH116 (no pathlib on the read path)
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


def worktree_top(start: Path) -> Path:
    """The directory holding `.git` (file or folder) above START, else START itself."""
    from pathlib import Path

    return Path(worktree_of(str(start)))


def worktree_of(start: str) -> str:
    """worktree_top() of an absolute path, as a string, without importing pathlib."""
    directory = start
    while True:
        if stat_or_none(os.path.join(directory, ".git")) is not None:  # noqa: PTH118
            return directory
        parent = os.path.dirname(directory)  # noqa: PTH120
        if parent == directory:
            return start
        directory = parent

"""Named URLs: `http://<port>.<slug>.localhost:<proxy port>` for every lease, served by
Caddy (`portalloc proxy start`), its routes following the ledger.

Everything of the proxy lives in `<state dir>/proxy-<uid>/`, a directory of the user's
own (0700): the admin socket, Caddy's configuration, log, storage and PID file. Only
this module is imported by a write that changed the ledger, and it costs two `lstat`s
when no proxy runs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from portalloc.models import Lease


def directory(state_dir: Path) -> Path:
    """The proxy's directory under STATE_DIR, one per user (a state dir may be shared)."""
    uid = os.geteuid() if hasattr(os, "geteuid") else 0
    return state_dir / f"proxy-{uid}"


def private(path: Path) -> bool:
    """Whether PATH is a directory (not a link) of this user's that nobody else may enter."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    owner = info.st_uid == os.geteuid() if hasattr(os, "geteuid") else True
    return stat.S_ISDIR(info.st_mode) and owner and not info.st_mode & 0o077


def notify(state_dir: Path, leases: Iterable[Lease], warn: Callable[[str], None]) -> None:
    """Hand the running proxy the routes of LEASES (after a write, under the ledger's
    lock, so route tables arrive in the order the ledger changed). No proxy, nothing
    done; a proxy that does not answer, one line on stderr: never a failed command."""
    where = directory(state_dir)
    if not private(where) or not (where / "admin.sock").exists():
        return
    from portalloc.proxy import caddy

    caddy.push_routes(where, leases, warn)

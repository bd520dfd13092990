"""Named URLs: `http://<port>.<slug>.localhost:<proxy port>` for every lease, served by
Caddy (`portalloc proxy start`), its routes following the ledger.

Everything of the proxy lives in `<state dir>/proxy-<uid>/`, a directory of the user's
own (0700): the admin socket, Caddy's configuration, log, storage and PID file, and the
route directory, `routes/<host>/<port>` (an empty file), which Caddy looks up on every
request. Its configuration never changes while it runs, so nothing is ever reloaded: a
lease change adds or removes a few files. Only this module is imported by a write that
changed the ledger, and it costs two `lstat`s when no proxy runs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from portalloc.config import LEDGER_NAME
from portalloc.errors import PortallocError
from portalloc.fs import read_bytes
from portalloc.models import Leases

ADMIN_SOCKET = "admin.sock"  # relative: Caddy runs in the proxy's directory
ROUTES_DIR = "routes"  # relative too: `routes/<host>/<port>`, one empty file per name
# The ledger file the route directory was last brought up to date with (its device,
# inode, size, mtime and ctime, as the ledger's own cache tells one file from another).
# A write that finds another file there (one that died between saving the ledger and
# its routes, one by another user of a shared state dir, who cannot reach this
# proxy) rebuilds every route: no name keeps pointing at a port its lease gave up.
STAMP = "routes.ledger"


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


def ledger_key(path: Path) -> bytes:
    """What tells the ledger file at PATH from any other (b"" when there is none)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return b""
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    return " ".join(map(str, key)).encode()


class Update:
    """One write's hand-over to the running proxy: begun before the ledger is saved,
    done after, both under the ledger's lock (so routes change in the order it does)."""

    __slots__ = ("before", "ledger", "warn", "where", "whole")

    def __init__(
        self, where: Path, ledger: Path, before: Leases, warn: Callable[[str], None], whole: bool
    ) -> None:
        self.where = where
        self.ledger = ledger
        self.before = before
        self.warn = warn
        self.whole = whole

    def done(self, after: Leases) -> None:
        """Bring the routes from the leases BEFORE to AFTER: only the changed leases'
        names (a few files), or all of them when asked or when the ledger is not the
        file they were last brought up to date with. A proxy that cannot take them: one
        line on stderr, never a failed command (and the next write rebuilds them)."""
        from portalloc.proxy import names

        names.follow(self.where, self.ledger, self.before, after, self.whole, self.warn)


def begin(
    state_dir: Path, before: Leases, warn: Callable[[str], None], *, whole: bool = False
) -> Update | None:
    """Before a write saves the ledger: None when no proxy runs (nothing else is done).
    WHOLE: rebuild every route, not only the changed leases' (a sync, or leases left out
    on load), as when the routes were not brought up to date with this ledger file."""
    where = directory(state_dir)
    if not private(where) or not (where / ADMIN_SOCKET).exists():
        return None
    ledger = state_dir / LEDGER_NAME
    if not whole:
        try:
            whole = read_bytes(where / STAMP, follow=False) != ledger_key(ledger)
        except (OSError, PortallocError):
            whole = True
    return Update(where, ledger, before, warn, whole)

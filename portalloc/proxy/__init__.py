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

from portalloc.models import Leases

ADMIN_SOCKET = "admin.sock"  # relative: Caddy runs in the proxy's directory
# Made before a write saves the ledger, removed once the routes follow it: one left behind
# (a write killed between the two, or one whose routes failed) has the next write
# rebuild the routes whole, so no name keeps pointing at a port its lease gave up.
STALE = "routes.stale"


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


class Update:
    """One write's hand-over to the running proxy: begun before the ledger is saved,
    done after, both under the ledger's lock (so routes change in the order it does)."""

    __slots__ = ("before", "warn", "where", "whole")

    def __init__(
        self, where: Path, before: Leases, warn: Callable[[str], None], whole: bool
    ) -> None:
        self.where = where
        self.before = before
        self.warn = warn
        self.whole = whole

    def done(self, after: Leases) -> None:
        """Bring the routes from the leases BEFORE to AFTER: only the changed leases'
        names (a few files), or all of them when asked or when the last write left them
        stale. A proxy that cannot take them: one line on stderr, never a failed command."""
        from portalloc.proxy import names

        names.follow(self.where, self.before, after, self.whole, self.warn)


def begin(
    state_dir: Path, before: Leases, warn: Callable[[str], None], *, whole: bool = False
) -> Update | None:
    """Before a write saves the ledger: None when no proxy runs (nothing else is done),
    else the routes marked stale until `done` brings them up to date. WHOLE: rebuild
    every route, not only the changed leases' (a sync, or leases left out on load)."""
    where = directory(state_dir)
    if not private(where) or not (where / ADMIN_SOCKET).exists():
        return None
    try:
        (where / STALE).mkdir(0o700)
    except FileExistsError:
        whole = True  # left by a write that did not finish: its changes are unknown
    except OSError as exc:
        warn(f"proxy at {where}: cannot mark its routes: {exc.strerror or exc}")
        return None
    return Update(where, before, warn, whole)

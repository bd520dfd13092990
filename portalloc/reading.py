"""The one read of the ledger: a session's lease, or every lease, read without the lock
and never written, and the one decision whether what was read stands as it is.

Where it does not (a lease to reclaim, refresh or move with its profile, a shared
ledger's variables to screen, a file save() did not write whole), the answer is None
and only the service's transaction can give one. The read path (adapters/entry.py,
`portalloc env` on every prompt), the service's `read` (`get`, `check`) and shell
completion all read here; a lease is only ever decided on by the rules the
transaction applies (Lease.fate, Lease.refreshed, allocator.grant).

Every module this one imports at the top is on the read path anyway: its import set
is pinned by tests/test_read_path_imports.py.
"""

from __future__ import annotations

import os

from portalloc.facts import owner_alive, path_exists, utcnow, worktree_of
from portalloc.ledger.store import read_every_lease, read_lease
from portalloc.rules import validate_session_id
from portalloc.trust import private_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from portalloc.config import PortAllocatorConfig
    from portalloc.models import Lease, Owner


def lease(
    config: PortAllocatorConfig,
    session_id: str,
    now: datetime,
    *,
    alive: Callable[[Owner], bool] = owner_alive,
    exists: Callable[[str], bool] = path_exists,
    grant: bool = False,
    worktree: str | None = None,
) -> Lease | None:
    """SESSION_ID's lease as the service's transaction at NOW would leave it, read
    without the lock; None when only that transaction can answer. GRANT (`env`, which
    grants): None also unless granting it again, for WORKTREE, leaves it as it is.

    ALIVE and EXISTS are the facts a reclaim asks (the host's, for the service)."""
    if not private_dir(os.path.dirname(config.ledger_file)):  # noqa: PTH120
        return None  # a shared ledger's variables are screened: the transaction does that
    validate_session_id(session_id)
    found = read_lease(config.ledger_file, session_id)
    if found is None:
        return None
    if found.due(now):
        # The allocator's reclaim asks each due lease the same question.
        kept, reason = found.fate(now, alive, exists)
        if reason is not None or kept is not found:
            return None  # to be reclaimed, or a `run` using it has died: a write
    if not grant:
        return found
    if config.profile_chosen:
        # Whether the lease follows the project file's profile: the allocator's
        # question, asked as the transaction's grant asks it.
        from portalloc import allocator
        from portalloc.models import LedgerState

        state = LedgerState({session_id: found})
        request = allocator.Request(session_id, config, worktree=worktree)
        if allocator.grant(state, request, now, None).state is not state:
            return None  # a refresh, a new anchor or a changed profile: a write
    elif not found.refreshed(now, config.ttl_minutes, None, worktree):
        return None  # a refresh is due, or the worktree anchor is new: a write
    return found


def env_lease(
    config: PortAllocatorConfig, session_id: str | None, now: datetime | None = None
) -> Lease | None:
    """The lease `env [SESSION]` prints, when reading answers it: none of the profile's
    files to keep current for the worktree's own lease, no [env] entry waiting for trust
    (the full command says so), and a lease a grant would leave as it is. Without
    SESSION_ID, the lease of the worktree the current directory is in."""
    if session_id is None and (config.profile.env_file or config.profile.manifest):
        return None  # the profile's files are to be kept current: the full command does that
    if config.profile.waiting:
        return None  # entries wait for trust: the full command says so
    worktree = None
    if session_id is None:
        worktree = session_id = worktree_of(os.getcwd())  # noqa: PTH109 (no pathlib here)
    return lease(config, session_id, now or utcnow(), grant=True, worktree=worktree)


def leases(config: PortAllocatorConfig) -> list[Lease] | None:
    """Every lease the file holds, as the store's own parse keeps them (migrated, each
    one held to the lease rules, the unusable left out), or None when there is no file
    it can read: for shell completion, which runs on Tab and must neither wait for
    the lock nor write (nor hang: a FIFO or symlink at the ledger's name is refused
    unread). Not decided on: an expired lease is still offered."""
    return read_every_lease(config.ledger_file)

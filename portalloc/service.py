"""Operations: each one is lock -> load -> reclaim -> decide -> save, under one lock."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from functools import cache
from pathlib import Path

from portalloc import allocator, probe
from portalloc.allocator import LedgerState, Reclaimed, Request
from portalloc.config import PortAllocatorConfig
from portalloc.errors import LeaseNotFound, UsageError
from portalloc.ledger import Ledger, utcnow
from portalloc.models import Lease, Owner, PortAllocation, validate_session_id


def _log_warning(message: str) -> None:
    import logging

    logging.getLogger("portalloc").warning("%s", message)


class PortAllocatorService:
    """Allocate, release and list leases in the shared ledger."""

    def __init__(
        self,
        config: PortAllocatorConfig | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        port_is_free: Callable[[int], bool] = probe.port_is_free,
        owner_alive: Callable[[Owner], bool] = probe.owner_alive,
        on_warning: Callable[[str], None] = _log_warning,
    ) -> None:
        self.config = config if config is not None else PortAllocatorConfig.from_env()
        self.clock = clock
        self.port_is_free = port_is_free
        self.owner_alive = owner_alive
        self.on_warning = on_warning
        self.ledger = Ledger(self.config.state_dir, self.config.lock_timeout, on_warning, clock)

    def _reclaim(self, state: LedgerState, now: datetime) -> tuple[LedgerState, list[Reclaimed]]:
        return allocator.reclaim(state, now, self.owner_alive, lambda path: Path(path).is_dir())

    def allocate(
        self,
        session_id: str,
        *,
        ttl_minutes: int | None = None,
        pid: int | None = None,
        worktree: str | Path | None = None,
    ) -> PortAllocation:
        """Return the session's lease with its TTL refreshed, or grant a new block."""
        validate_session_id(session_id)
        config = self.config.with_ttl(ttl_minutes)
        owner = probe.owner_of(pid) if pid is not None else None
        if owner is not None and not self.owner_alive(owner):
            # The lease would be reclaimed by the very next operation: say so now.
            raise UsageError(f"no running process with PID {pid} to own the lease")
        request = Request(
            session_id=session_id,
            config=config,
            owner=owner,
            worktree=None if worktree is None else os.fspath(worktree),
        )
        checker = None if config.skip_port_check else self.port_is_free
        with self.ledger.locked():
            now = self.clock()
            loaded = self.ledger.load()
            state, _reclaimed = self._reclaim(loaded, now)
            result = allocator.grant(state, request, now, checker)
            if result.state is not loaded:
                self.ledger.save(result.state)
        for skip in result.skipped:
            self.on_warning(
                f"skipped block {skip.block_start}: port {skip.port} ({skip.port_name}) is in use"
            )
        return PortAllocation.from_lease(result.lease, now)

    def release(self, session_id: str) -> bool:
        """Remove the session's lease; False if it had none."""
        validate_session_id(session_id)
        with self.ledger.locked():
            now = self.clock()
            loaded = self.ledger.load()
            state, _reclaimed = self._reclaim(loaded, now)
            state, removed = allocator.release(state, session_id)
            if state is not loaded:
                self.ledger.save(state)
        return removed

    def _read(self) -> tuple[LedgerState, datetime, list[Reclaimed]]:
        """Load and reclaim under the lock, saving only when something was reclaimed."""
        with self.ledger.locked():
            now = self.clock()
            loaded = self.ledger.load()
            state, reclaimed = self._reclaim(loaded, now)
            if state is not loaded:
                self.ledger.save(state)
        return state, now, reclaimed

    def status(self) -> list[PortAllocation]:
        """Active leases, lowest block first."""
        state, now, _reclaimed = self._read()
        leases = sorted(state.leases.values(), key=lambda lease: lease.start)
        return [PortAllocation.from_lease(lease, now) for lease in leases]

    def get(self, session_id: str) -> PortAllocation:
        """The session's active lease, unchanged; raise LeaseNotFound without one."""
        validate_session_id(session_id)
        state, now, _reclaimed = self._read()
        lease = state.leases.get(session_id)
        if lease is None:
            raise LeaseNotFound(session_id)
        return PortAllocation.from_lease(lease, now)

    def prune(self) -> list[Reclaimed]:
        """Reclaim expired and dead leases; return what was reclaimed."""
        return self._read()[2]

    def leases(self) -> list[Lease]:
        state = self._read()[0]
        return sorted(state.leases.values(), key=lambda lease: lease.start)


@cache
def get_port_allocator() -> PortAllocatorService:
    """The process-wide service, configured from the environment on first use."""
    return PortAllocatorService()

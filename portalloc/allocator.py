"""Pure decisions over the ledger state: what to reclaim, which block to grant."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal, NamedTuple

from portalloc.config import PortAllocatorConfig
from portalloc.errors import NoPortsAvailable
from portalloc.models import Lease, Owner, render_template

# Sticky blocks remembered for sessions without a lease; oldest forgotten first.
HISTORY_LIMIT = 10_000

ReclaimReason = Literal["expired", "owner_dead", "worktree_gone"]


class LedgerState:
    """Active leases by session, and the block each session held last (for stickiness).

    Treated as immutable: operations return a new state rather than changing one.
    """

    __slots__ = ("history", "leases")

    def __init__(
        self, leases: dict[str, Lease] | None = None, history: dict[str, int] | None = None
    ) -> None:
        self.leases: dict[str, Lease] = {} if leases is None else leases
        self.history: dict[str, int] = {} if history is None else history

    def with_leases(self, leases: dict[str, Lease]) -> LedgerState:
        return LedgerState(leases, self.history)


class Reclaimed(NamedTuple):
    lease: Lease
    reason: ReclaimReason


class Skip(NamedTuple):
    """A candidate block passed over because one of its ports was busy."""

    block_start: int
    port: int
    port_name: str


class Grant(NamedTuple):
    state: LedgerState
    lease: Lease
    created: bool
    skipped: tuple[Skip, ...] = ()


class Request(NamedTuple):
    session_id: str
    config: PortAllocatorConfig
    owner: Owner | None = None
    worktree: str | None = None


def reclaim(
    state: LedgerState,
    now: datetime,
    owner_alive: Callable[[Owner], bool],
    path_exists: Callable[[str], bool],
) -> tuple[LedgerState, list[Reclaimed]]:
    """Drop expired leases, leases whose owner died and leases whose worktree vanished."""
    kept: dict[str, Lease] = {}
    gone: list[Reclaimed] = []
    for session_id, lease in state.leases.items():
        reason: ReclaimReason | None = None
        if lease.expired(now):
            reason = "expired"
        elif lease.owner is not None and not owner_alive(lease.owner):
            reason = "owner_dead"
        elif lease.worktree is not None and not path_exists(lease.worktree):
            reason = "worktree_gone"
        if reason is None:
            kept[session_id] = lease
        else:
            gone.append(Reclaimed(lease, reason))
    if not gone:
        return state, []
    return state.with_leases(kept), gone


def release(state: LedgerState, session_id: str) -> tuple[LedgerState, bool]:
    if session_id not in state.leases:
        return state, False
    leases = dict(state.leases)
    del leases[session_id]
    return state.with_leases(leases), True


def compose_project_name(session_id: str, prefix: str, taken: set[str]) -> str:
    """`<prefix>-<sha256 hex>`, 8 hex chars unless a clash with `taken` needs more."""
    import hashlib  # only new leases need it

    digest = hashlib.sha256(session_id.encode("utf-8")).hexdigest()
    for length in range(8, len(digest) + 1):
        name = f"{prefix}-{digest[:length]}"
        if name not in taken:
            return name
    raise AssertionError("two distinct session ids share a full SHA-256")  # pragma: no cover


class _Occupancy:
    """Port spans of active leases, for O(log n) overlap checks."""

    def __init__(self, leases: list[Lease]) -> None:
        spans = sorted((lease.start, lease.end) for lease in leases)
        self._starts = [start for start, _ in spans]
        self._ends = [end for _, end in spans]

    def overlaps(self, start: int, end: int) -> bool:
        # Spans never overlap each other, so the last one starting at or before `end`
        # is the only one that can reach into [start, end].
        index = bisect_right(self._starts, end) - 1
        return index >= 0 and self._ends[index] >= start


def grant(
    state: LedgerState,
    request: Request,
    now: datetime,
    port_is_free: Callable[[int], bool] | None,
) -> Grant:
    """Return the session's lease (TTL refreshed) or a new one; raise NoPortsAvailable."""
    config = request.config
    expires_at = now + timedelta(minutes=config.ttl_minutes)
    existing = state.leases.get(request.session_id)
    if existing is not None:
        owner = request.owner or existing.owner
        worktree = request.worktree or existing.worktree
        if (
            abs(expires_at - existing.expires_at) < refresh_granularity(config.ttl_minutes)
            and config.ttl_minutes == existing.ttl_minutes
            and owner == existing.owner
            and worktree == existing.worktree
        ):
            # Refreshed a moment ago: leave the ledger alone. `eval "$(portalloc env)"`
            # in a prompt hook or direnv then reads without rewriting the file.
            return Grant(state, existing, created=False)
        refreshed = existing._replace(
            expires_at=expires_at,
            ttl_minutes=config.ttl_minutes,
            owner=owner,
            worktree=worktree,
        )
        leases = {**state.leases, request.session_id: refreshed}
        return Grant(state.with_leases(leases), refreshed, created=False)

    if len(state.leases) >= config.max_sessions:
        raise NoPortsAvailable(
            f"{len(state.leases)} active leases reach max sessions ({config.max_sessions})"
        )

    occupancy = _Occupancy(list(state.leases.values()))
    skipped: list[Skip] = []

    def usable(start: int) -> bool:
        if occupancy.overlaps(start, start + config.range - 1):
            return False
        if port_is_free is None:
            return True
        for name, offset in config.profile.ports:
            if not port_is_free(start + offset):
                skipped.append(Skip(start, start + offset, name))
                return False
        return True

    chosen: int | None = None
    previous = state.history.get(request.session_id)
    if previous is not None and _is_block(previous, config) and usable(previous):
        chosen = previous
    if chosen is None:
        for index in range(config.max_sessions):
            start = config.base + index * config.range
            if start != previous and usable(start):
                chosen = start
                break
    if chosen is None:
        raise NoPortsAvailable(f"every block in {config.base}-{config.span_end} is taken or busy")

    taken_names = {lease.compose_project_name for lease in state.leases.values()}
    lease = new_lease(request, chosen, now, expires_at, taken_names)
    leases = {**state.leases, request.session_id: lease}
    history = dict(state.history)
    history.pop(request.session_id, None)
    history[request.session_id] = chosen
    while len(history) > HISTORY_LIMIT:
        del history[next(iter(history))]
    return Grant(LedgerState(leases, history), lease, created=True, skipped=tuple(skipped))


def refresh_granularity(ttl_minutes: int) -> timedelta:
    """How close to "now + TTL" an expiry must be to count as already refreshed."""
    return timedelta(seconds=min(60.0, ttl_minutes * 60 / 100))


def _is_block(start: int, config: PortAllocatorConfig) -> bool:
    offset = start - config.base
    return (
        offset >= 0 and offset % config.range == 0 and offset // config.range < config.max_sessions
    )


def new_lease(
    request: Request, start: int, now: datetime, expires_at: datetime, taken_names: set[str]
) -> Lease:
    config = request.config
    profile = config.profile
    ports = tuple((name, start + offset) for name, offset in profile.ports)
    compose_name = compose_project_name(request.session_id, profile.compose_prefix, taken_names)
    fields = {f"{name}_port": str(port) for name, port in ports}
    fields["compose_project_name"] = compose_name
    fields["session_id"] = request.session_id
    env = tuple((name, render_template(template, fields)) for name, template in profile.env)
    return Lease(
        session_id=request.session_id,
        start=start,
        span=config.range,
        ports=ports,
        env=env,
        compose_project_name=compose_name,
        created_at=now,
        expires_at=expires_at,
        ttl_minutes=config.ttl_minutes,
        owner=request.owner,
        worktree=request.worktree,
    )

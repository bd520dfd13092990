"""The pure allocator on LedgerState alone: no files, no lock, no sockets, no clock.

A hypothesis state machine drives grants, releases, joins, leaves and reclaims under
several settings sharing one state, and checks the invariants after every step.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from portalloc import allocator
from portalloc.allocator import Request
from portalloc.config import PortAllocatorConfig
from portalloc.errors import NoPortsAvailable
from portalloc.models import LedgerState, Owner

START = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
SESSIONS = [f"s{i}" for i in range(8)]
# Settings that overlap in odd ways: other bases, other ranges, few sessions.
CONFIGS = [
    PortAllocatorConfig(state_dir=Path("/nonexistent"), base=10000, range=100, max_sessions=5),
    PortAllocatorConfig(state_dir=Path("/nonexistent"), base=10050, range=10, max_sessions=12),
    PortAllocatorConfig(state_dir=Path("/nonexistent"), base=10000, range=4, max_sessions=6),
    PortAllocatorConfig(state_dir=Path("/nonexistent"), base=10300, range=50, max_sessions=3),
]
OWNERS = [Owner(100 + i, 1) for i in range(3)]


def is_block(start: int, config: PortAllocatorConfig) -> bool:
    offset = start - config.base
    return (
        offset >= 0 and offset % config.range == 0 and offset // config.range < config.max_sessions
    )


class Allocations(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = LedgerState()
        self.now = START
        self.alive: set[Owner] = set(OWNERS)
        self.busy: set[int] = set()

    def check(self, port: int, _own: bool) -> str | None:
        return "someone" if port in self.busy else None

    @rule(
        session=st.sampled_from(SESSIONS),
        config=st.sampled_from(CONFIGS),
        ttl=st.integers(1, 300),
        owner=st.none() | st.sampled_from(OWNERS),
    )
    def grant(
        self, session: str, config: PortAllocatorConfig, ttl: int, owner: Owner | None
    ) -> None:
        config = config.with_ttl(ttl)
        before = self.state
        had = session in before.leases
        try:
            result = allocator.grant(
                before, Request(session, config, owner=owner), self.now, self.check
            )
        except NoPortsAvailable:
            assert self.state is before  # exhaustion changes nothing
            assert not had
            return
        self.state = result.state
        lease = result.lease
        assert result.created is not had
        if had:
            assert (lease.start, lease.span) == (
                before.leases[session].start,
                before.leases[session].span,
            )
        else:
            home = before.homes.get(session)
            if home is not None and not is_block(home, config):
                home = None  # remembered under other settings: the new block is home now
            assert self.state.homes[session] == (lease.start if home is None else home)
            for _name, port in lease.ports:
                assert port not in self.busy
            if home is not None and result.moved is None:
                assert lease.start == home  # home again whenever nothing holds it

    @rule(session=st.sampled_from(SESSIONS))
    def release(self, session: str) -> None:
        had = session in self.state.leases
        self.state, removed = allocator.release(self.state, session)
        assert removed is had
        again, removed_again = allocator.release(self.state, session)
        assert again is self.state and removed_again is False  # idempotent

    @rule(session=st.sampled_from(SESSIONS), user=st.sampled_from(OWNERS), keep=st.booleans())
    def join_and_leave(self, session: str, user: Owner, keep: bool) -> None:
        before = self.state.leases.get(session)
        try:
            result = allocator.grant(
                self.state, Request(session, CONFIGS[0], user=user, keep=keep), self.now, None
            )
        except NoPortsAvailable:
            return
        if before is not None:
            assert result.lease.owner == before.owner  # joined, never taken over
            assert user in result.lease.guests or user == before.owner or user in before.guests
        state, released = allocator.leave(result.state, session, user, lambda o: o in self.alive)
        if before is not None:
            assert not released or before.owner == user
            if not released:
                kept = state.leases[session]
                assert kept.owner == before.owner and kept.worktree == before.worktree
        self.state = state

    @rule(minutes=st.integers(0, 600))
    def time_passes(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)

    @precondition(lambda self: bool(self.alive))
    @rule(owner=st.sampled_from(OWNERS))
    def process_dies(self, owner: Owner) -> None:
        self.alive.discard(owner)

    @rule(port=st.integers(10000, 10400))
    def port_gets_busy(self, port: int) -> None:
        self.busy.add(port)

    @rule()
    def reclaim(self) -> None:
        state, gone = allocator.reclaim(
            self.state, self.now, lambda o: o in self.alive, lambda _path: True
        )
        for item in gone:
            lease = item.lease
            if lease.owner is not None:
                assert item.reason == "owner_dead" and lease.owner not in self.alive
            else:
                assert item.reason == "expired" and lease.expired(self.now)
        for lease in state.leases.values():
            if lease.guests:
                continue  # a live `run` keeps any lease
            if lease.owner is not None:
                assert lease.owner in self.alive  # anchored: outlives its TTL, not its owner
            else:
                assert not lease.expired(self.now)
        self.state = state

    @invariant()
    def spans_are_pairwise_disjoint(self) -> None:
        spans = sorted((lease.start, lease.end) for lease in self.state.leases.values())
        for (_s1, end), (start, _e2) in pairwise(spans):
            assert end < start

    @invariant()
    def ports_lie_in_their_block_and_names_are_unique(self) -> None:
        names = [lease.compose_project_name for lease in self.state.leases.values()]
        assert len(set(names)) == len(names)
        for session, lease in self.state.leases.items():
            assert lease.session_id == session
            assert all(lease.start <= port <= lease.end for _name, port in lease.ports)
            assert session in self.state.homes


TestAllocations = Allocations.TestCase
TestAllocations.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_exhaustion_raises_and_leaves_the_state_alone() -> None:
    config = CONFIGS[3]
    state = LedgerState()
    for session in ("a", "b", "c"):
        state = allocator.grant(state, Request(session, config), START, None).state
    with pytest.raises(NoPortsAvailable):
        allocator.grant(state, Request("d", config), START, None)


def test_newcomer_prefers_blocks_nobody_calls_home() -> None:
    config = CONFIGS[0]
    state = allocator.grant(LedgerState(), Request("a", config), START, None).state
    state, _ = allocator.release(state, "a")
    grant = allocator.grant(state, Request("b", config), START, None)
    assert grant.lease.start == 10100
    assert allocator.grant(grant.state, Request("a", config), START, None).lease.start == 10000

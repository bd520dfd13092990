"""Geometry, stickiness, TTL and capacity through the Python API, with an injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from portalloc import (
    NoPortsAvailable,
    PortAllocation,
    PortAllocatorConfig,
    PortAllocatorService,
    get_port_allocator,
)
from portalloc.errors import InvalidSessionId, LeaseNotFound
from portalloc.host import Host
from portalloc.render import render
from tests.helpers import FakeClock


def make_service(
    state_dir: Path, clock: FakeClock, *, free: bool = True, **settings: int
) -> PortAllocatorService:
    config = PortAllocatorConfig(state_dir=state_dir, **settings)  # type: ignore[arg-type]
    return PortAllocatorService(config, clock=clock, port_is_free=lambda _port: free)


def test_first_and_second_session_get_contract_ports(state_dir: Path, clock: FakeClock) -> None:
    svc = make_service(state_dir, clock)
    first = svc.allocate("worktree-1")
    second = svc.allocate("worktree-2")
    assert (first.db_port, first.rest_port, first.realtime_port, first.api_port) == (
        10000,
        10001,
        10002,
        10003,
    )
    assert (second.db_port, second.api_port) == (10100, 10103)


def test_allocation_object_has_contract_fields(state_dir: Path, clock: FakeClock) -> None:
    data = make_service(state_dir, clock).allocate("worktree-1").to_dict()
    assert data["session_id"] == "worktree-1"
    assert data["created_at"] == "2026-11-22T10:00:00Z"
    assert data["expires_at"] == "2026-11-22T12:00:00Z"
    assert data["ttl_remaining_minutes"] == 120.0
    assert (
        data["compose_project_name"]
        == "ac-" + __import__("hashlib").sha256(b"worktree-1").hexdigest()[:8]
    )
    for key in ("db_port", "rest_port", "realtime_port", "api_port"):
        assert isinstance(data[key], int)


def test_duplicate_allocate_returns_same_lease_and_refreshes_ttl(
    state_dir: Path, clock: FakeClock
) -> None:
    svc = make_service(state_dir, clock)
    first = svc.allocate("s")
    clock.advance(90)
    again = svc.allocate("s")
    assert again.ports == first.ports
    assert again.created_at == first.created_at
    assert again.ttl_remaining_minutes == 120.0
    clock.advance(100)  # 190 min after creation, 100 after the refresh
    assert [a.session_id for a in svc.status()] == ["s"]


def test_lease_expires_after_ttl_and_block_is_reused(state_dir: Path, clock: FakeClock) -> None:
    svc = make_service(state_dir, clock, max_sessions=1)
    svc.allocate("old", ttl_minutes=5)
    clock.advance(4.9)
    assert svc.status()[0].ttl_remaining_minutes == pytest.approx(0.1, abs=0.01)
    clock.advance(0.2)
    assert svc.status() == []
    # The only block is old's home; with nothing else free a newcomer takes it.
    assert svc.allocate("new").db_port == 10000


def test_released_session_gets_its_block_back(state_dir: Path, clock: FakeClock) -> None:
    svc = make_service(state_dir, clock)
    svc.allocate("a")
    svc.allocate("b")
    svc.allocate("c")
    assert svc.release("b") is True
    clock.advance(60 * 24 * 3)  # days later; a and c expired as well
    svc.allocate("z")  # a newcomer takes the lowest free block
    assert svc.allocate("b").db_port == 10100


def test_expired_session_gets_its_block_back(state_dir: Path, clock: FakeClock) -> None:
    svc = make_service(state_dir, clock)
    svc.allocate("a")
    svc.allocate("b")
    clock.advance(121)
    assert svc.allocate("b").db_port == 10100


def test_newcomer_avoids_a_released_sessions_home(state_dir: Path, clock: FakeClock) -> None:
    svc = make_service(state_dir, clock)
    svc.allocate("a")
    svc.release("a")
    assert svc.allocate("newcomer").db_port == 10100  # 10000 is a's home
    assert svc.allocate("a").db_port == 10000


def test_home_taken_by_someone_else_moves_loudly_then_comes_back(
    state_dir: Path, clock: FakeClock
) -> None:
    warnings: list[str] = []
    config = PortAllocatorConfig(state_dir=state_dir, max_sessions=2)
    svc = PortAllocatorService(
        config, clock=clock, port_is_free=lambda _port: True, on_warning=warnings.append
    )
    svc.allocate("a")
    svc.release("a")
    svc.allocate("b")  # 10100
    svc.release("b")
    svc.allocate("intruder")  # every block is someone's home: the lowest free one
    moved = svc.allocate("a")
    assert (moved.db_port, moved.home_block) == (10100, 10000)
    assert warnings == [
        "session 'a' MOVED from block 10000-10099 to 10100-10199: it is held by session 'intruder'"
    ]
    svc.release("a")
    svc.release("intruder")
    assert svc.allocate("a").db_port == 10000  # home again, the move forgotten


def test_release_unknown_session_is_false(state_dir: Path, clock: FakeClock) -> None:
    svc = make_service(state_dir, clock)
    assert svc.release("never-seen") is False


def test_max_sessions_enforced_and_nothing_changes(state_dir: Path, clock: FakeClock) -> None:
    svc = make_service(state_dir, clock, max_sessions=2)
    svc.allocate("a")
    svc.allocate("b")
    before = (state_dir / "leases.json").read_bytes()
    with pytest.raises(NoPortsAvailable):
        svc.allocate("c")
    assert (state_dir / "leases.json").read_bytes() == before
    # An existing session still gets its lease back when full.
    assert svc.allocate("a").db_port == 10000


def test_busy_ports_skip_block_and_full_probe_failure_exhausts(
    state_dir: Path, clock: FakeClock
) -> None:
    busy = {10001}
    warnings: list[str] = []
    config = PortAllocatorConfig(state_dir=state_dir, max_sessions=3)
    svc = PortAllocatorService(
        config,
        # The probe and who listens are both faked: the host's own listeners stay out.
        host=Host(listeners=lambda _port: []),
        clock=clock,
        port_is_free=lambda port: port not in busy,
        on_warning=warnings.append,
    )
    assert svc.allocate("a").db_port == 10100
    assert warnings == ["skipped block 10000: port 10001 (rest) is in use"]
    busy.update({10200, 10002})
    with pytest.raises(NoPortsAvailable):
        svc.allocate("b")


def test_leases_under_other_settings_never_overlap(state_dir: Path, clock: FakeClock) -> None:
    wide = make_service(state_dir, clock, base=10000, range=100)
    narrow = make_service(state_dir, clock, base=10050, range=10, max_sessions=20)
    wide.allocate("wide")  # 10000-10099
    lease = narrow.allocate("narrow")
    assert lease.block_start == 10100  # 10050..10090 overlap the wide lease
    spans = sorted((a.block_start, a.block_end) for a in wide.status())
    assert spans == [(10000, 10099), (10100, 10109)]
    assert wide.allocate("wide-2").block_start == 10200


def test_compose_project_name_clash_is_extended(state_dir: Path, clock: FakeClock) -> None:
    from portalloc.allocator import compose_project_name

    name = compose_project_name("x", "ac", set())
    longer = compose_project_name("x", "ac", {name})
    assert len(name) == len("ac-") + 8
    assert longer.startswith(name) and len(longer) == len(name) + 1


def test_session_ids_round_trip(state_dir: Path, clock: FakeClock) -> None:
    svc = make_service(state_dir, clock, max_sessions=10)
    ids = ["/home/me/my project", 'it\'s "quoted"', "$(touch /tmp/x)`id`", "ünïcødé 🚀", "a" * 4096]
    for session_id in ids:
        svc.allocate(session_id)
    assert sorted(a.session_id for a in svc.status()) == sorted(ids)
    assert svc.get("ünïcødé 🚀").session_id == "ünïcødé 🚀"


@pytest.mark.parametrize(
    "bad", ["", "   ", "a" * 4097, "a\nb", "a\x00b", "tab\there", "esc\x1b[31m", "cr\r", "\udcff"]
)
def test_invalid_session_ids_rejected_nothing_written(
    state_dir: Path, clock: FakeClock, bad: str
) -> None:
    svc = make_service(state_dir, clock)
    with pytest.raises(InvalidSessionId):
        svc.allocate(bad)
    assert not (state_dir / "leases.json").exists()


def test_get_is_read_only_and_raises_without_lease(state_dir: Path, clock: FakeClock) -> None:
    svc = make_service(state_dir, clock)
    with pytest.raises(LeaseNotFound):
        svc.get("nobody")
    svc.allocate("s")
    before = (state_dir / "leases.json").read_bytes()
    clock.advance(30)
    assert svc.get("s").ttl_remaining_minutes == 90.0
    assert (state_dir / "leases.json").read_bytes() == before


def test_prune_reports_expired_dead_owner_and_vanished_worktree(
    state_dir: Path, clock: FakeClock, tmp_path: Path
) -> None:
    alive = {"yes": True}
    tree = tmp_path / "wt"
    tree.mkdir()
    config = PortAllocatorConfig(state_dir=state_dir)
    svc = PortAllocatorService(
        config,
        clock=clock,
        port_is_free=lambda _p: True,
        owner_alive=lambda _owner: alive["yes"],
    )
    svc.allocate("short", ttl_minutes=1)
    svc.allocate("owned", pid=1)
    svc.allocate("tree", worktree=tree)
    svc.allocate("keeper")
    assert svc.prune() == []
    clock.advance(2)
    alive["yes"] = False
    tree.rmdir()
    reasons = {item.lease.session_id: item.reason for item in svc.prune()}
    assert reasons == {"short": "expired", "owned": "owner_dead", "tree": "worktree_gone"}
    assert [a.session_id for a in svc.status()] == ["keeper"]


def test_allocate_with_pid_records_owner(state_dir: Path, clock: FakeClock) -> None:
    import os

    svc = make_service(state_dir, clock)
    allocation = svc.allocate("me", pid=os.getpid())
    assert allocation.pid == os.getpid()
    import json

    (raw,) = json.loads((state_dir / "leases.json").read_text())["leases"]
    assert raw["owner"]["pid"] == os.getpid() and isinstance(raw["owner"]["started"], float)


def test_get_port_allocator_is_process_wide_and_reads_env(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORT_ALLOC_BASE", "20000")
    monkeypatch.setenv("PORTALLOC_SKIP_PORT_CHECK", "1")
    svc = get_port_allocator()
    assert svc is get_port_allocator()
    allocation = svc.allocate("api")
    assert isinstance(allocation, PortAllocation)
    assert allocation.rest_port == 20001
    assert "export AGENT_COORDINATOR_REST_PORT=20001\n" in render(allocation.env, "sh")
    assert (state_dir / "leases.json").exists()


def test_unknown_port_attribute_raises(state_dir: Path, clock: FakeClock) -> None:
    allocation = make_service(state_dir, clock).allocate("s")
    with pytest.raises(AttributeError):
        _ = allocation.web_port


def test_refresh_within_a_minute_does_not_rewrite_the_ledger(
    state_dir: Path, clock: FakeClock
) -> None:
    svc = make_service(state_dir, clock)
    svc.allocate("s")
    ledger = state_dir / "leases.json"
    written = ledger.stat().st_mtime_ns, ledger.read_bytes()
    clock.advance(0.5)
    assert svc.allocate("s").ttl_remaining_minutes == 119.5
    assert (ledger.stat().st_mtime_ns, ledger.read_bytes()) == written
    clock.advance(1)
    assert svc.allocate("s").ttl_remaining_minutes == 120.0
    assert ledger.read_bytes() != written[1]

"""The commands as plain functions: called with a service and a faked probe, as MCP,
HTTP or a test can, without the CLI, a terminal, docker or a real listener."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from portalloc import reading
from portalloc.commands import check, env, prune, status, why
from portalloc.config import PortAllocatorConfig
from portalloc.errors import LeaseNotFound, UsageError
from portalloc.host import Listener, Stack
from portalloc.service import PortAllocatorService, open_service
from tests.helpers import FakeClock


@pytest.fixture
def service(state_dir: Path, clock: FakeClock) -> PortAllocatorService:
    config = PortAllocatorConfig(state_dir=state_dir, skip_port_check=True)
    return PortAllocatorService(config, clock=clock, on_warning=lambda _message: None)


def test_check_asks_the_probe_again_until_every_port_answers(
    service: PortAllocatorService,
) -> None:
    allocation = check.chosen(service.allocate("s"), ["db", "api"])
    assert list(allocation.ports) == ["db", "api"]
    rounds: list[set[int]] = []
    now = [0.0]

    def answering(ports: object) -> dict[int, bool]:
        asked = set(ports)  # type: ignore[call-overload]
        rounds.append(asked)
        return {port: len(rounds) >= 3 or port == allocation.ports["db"] for port in asked}

    def sleep(seconds: float) -> None:
        now[0] += seconds

    state = check.check(allocation, 5, answering=answering, clock=lambda: now[0], sleep=sleep)
    assert state == {"db": True, "api": True}
    assert len(rounds) == 3 and rounds[0] == set(allocation.ports.values())
    # Without --wait: asked once, whatever it says.
    rounds.clear()
    once = check.check(allocation, answering=lambda ports: dict.fromkeys(ports, False))
    assert once == {"db": False, "api": False}


def test_check_names_the_unknown_ports(service: PortAllocatorService) -> None:
    with pytest.raises(UsageError, match="no port named 'nope'"):
        check.chosen(service.allocate("s"), ["db", "nope"])


def test_why_names_the_lease_the_listener_and_the_publishing_stack(
    service: PortAllocatorService,
) -> None:
    allocation = service.allocate("s")
    port = allocation.ports["api"]
    stack = Stack("elsewhere", "/", (port,), ("elsewhere-web-1",))
    found = why.why(
        service,
        port,
        listeners=lambda _port: [Listener(4242, "docker-proxy -host-port 10003")],
        is_listening=lambda _port: pytest.fail("a named listener is answer enough"),
        stacks=lambda: [stack, Stack("other", "/", (1,), ())],
    )
    assert found.holder == service.get("s")
    assert found.processes == [(4242, "docker-proxy -host-port 10003")]
    assert found.listening
    assert found.stacks == [(stack, False)]  # its working dir exists: no orphan
    # Nothing listens: docker is not asked at all.
    quiet = why.why(
        service,
        port,
        listeners=lambda _port: [],
        is_listening=lambda _port: False,
        stacks=lambda: pytest.fail("docker asked about a port nothing listens on"),
    )
    assert (quiet.listening, quiet.stacks) == (False, [])


def test_prune_reclaims_and_stops_only_orphans(
    service: PortAllocatorService, clock: FakeClock
) -> None:
    service.allocate("old", ttl_minutes=1)
    clock.advance(2)
    stopped: list[Stack] = []

    def stopper(stack: Stack) -> str | None:
        stopped.append(stack)
        return None

    pruned = prune.prune(service, stop=True, stacks=lambda: [], stopper=stopper)
    assert [item.lease.session_id for item in pruned.reclaimed] == ["old"]
    assert (pruned.orphans, pruned.failed, stopped) == ([], {}, [])
    silent = prune.prune(service, stop=True, stacks=lambda: None)
    assert silent.orphans is None  # docker did not answer: nothing found, nothing stopped


def test_leases_of_worktrees_outside_git_is_the_directory_itself(
    service: PortAllocatorService, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    service.allocate(str(tree))
    service.allocate("elsewhere")
    assert status.leases_of_worktrees(service, tree) == [str(tree)]


def test_env_renders_the_block_and_writes_the_files_asked_for(
    service: PortAllocatorService, tmp_path: Path
) -> None:
    manifest, dotenv = tmp_path / "out" / "ports.json", tmp_path / ".env"
    manifest.parent.mkdir()
    session, tree = env.target("s", None)
    assert (session, tree) == ("s", None)
    printed = env.env(service, session, tree, "dotenv", write=manifest, env_file=dotenv)
    assert f"API_PORT={printed.allocation.ports['api']}" in printed.text
    assert manifest.is_file() and "API_PORT" in dotenv.read_text()


def test_the_read_path_and_the_service_read_the_same_lease(
    service: PortAllocatorService, clock: FakeClock
) -> None:
    """service.read goes through portalloc.reading, as the fast entry does: the same
    lease, home_block aside, without the lock; and the transaction where it must."""
    got = service.get(service.allocate("s").session_id)
    read = service.read("s")
    assert replace(read, home_block=got.home_block) == got
    assert reading.lease(service.config, "s", clock()) is not None
    clock.advance(121)  # expired: the read path leaves it to the transaction
    assert reading.lease(service.config, "s", clock()) is None
    with pytest.raises(LeaseNotFound):
        service.read("s")


def test_open_service_reads_the_settings_of_the_moment(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORT_ALLOC_BASE", "20000")
    first = open_service()
    monkeypatch.setenv("PORT_ALLOC_BASE", "21000")
    assert (first.config.base, open_service().config.base) == (20000, 21000)
    assert first.config.state_dir == state_dir

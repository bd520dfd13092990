"""Every test gets its own state dir; the real user state dir fails loudly if touched."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import portalloc.config
from portalloc.config import PortAllocatorConfig
from portalloc.service import PortAllocatorService, get_port_allocator
from tests import foreign_listeners
from tests.helpers import FakeClock, FreeBlock

FOREIGN = pytest.StashKey[foreign_listeners.Listeners]()

ENV_VARS = (
    "PORT_ALLOC_BASE",
    "PORT_ALLOC_RANGE",
    "PORT_ALLOC_TTL_MINUTES",
    "PORT_ALLOC_MAX_SESSIONS",
    "PORTALLOC_STATE_DIR",
    "PORTALLOC_LOCK_TIMEOUT",
    "PORTALLOC_SKIP_PORT_CHECK",
    "PORTALLOC_API_KEY",
    "PORTALLOC_PROXY_PORT",
    "AGENT_COORDINATOR_DB_PORT",
    "AGENT_COORDINATOR_REST_PORT",
    "AGENT_COORDINATOR_REALTIME_PORT",
    "API_PORT",
    "COMPOSE_PROJECT_NAME",
)


# portalloc's own integration tests find their ports the way users' tests do.
pytest_plugins = ["portalloc.pytest_plugin", "tests.docker_env"]  # docker_env: a real dockerd


def pytest_configure(config: pytest.Config) -> None:
    """PORTALLOC_TEST_FOREIGN_LISTENERS=1: other stacks listen on the default ports for
    the whole run, in a process of their own (not this one: here they would be the
    test's own listeners), started once by the process that runs or controls the
    session (an xdist worker has `workerinput`) and stopped by its PID when it ends."""
    if foreign_listeners.enabled() and not hasattr(config, "workerinput"):
        listeners = foreign_listeners.launch(Path(__file__).resolve().parent.parent)
        config.stash[FOREIGN] = listeners
        os.environ[foreign_listeners.PID_VAR] = str(listeners.pid)  # workers inherit it


def pytest_unconfigure(config: pytest.Config) -> None:
    listeners = config.stash.get(FOREIGN, None)
    if listeners is not None:
        listeners.stop()
        os.environ.pop(foreign_listeners.PID_VAR, None)


def pytest_report_header(config: pytest.Config) -> str | None:
    listeners = config.stash.get(FOREIGN, None)
    if listeners is None:
        return None
    return f"{foreign_listeners.describe(listeners.count)}, pid {listeners.pid}"


@pytest.fixture(scope="session")
def portalloc_service(tmp_path_factory: pytest.TempPathFactory) -> PortAllocatorService:
    """The plugin leases from a test-only ledger, never the user's. It sits above the
    per-worker temp dirs, so pytest-xdist workers share it and get disjoint blocks."""
    state = tmp_path_factory.getbasetemp().parent / "portalloc-plugin-state"
    # The HTTP tests listen on these ports: other tests keep clear of 40000-41999.
    return PortAllocatorService(PortAllocatorConfig(state_dir=state, base=40000))


def _no_default_state_dir() -> Path:
    raise AssertionError("a test reached for the real user state dir")


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh state dir in PORTALLOC_STATE_DIR; the platformdirs default is forbidden."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "state"
    monkeypatch.setenv("PORTALLOC_STATE_DIR", str(state))
    # Bugs raise as they are: the last-resort guard would turn them into one line.
    monkeypatch.setenv("PORTALLOC_DEBUG", "1")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state-must-stay-unused"))
    monkeypatch.setattr(portalloc.config, "default_state_dir", _no_default_state_dir)
    # Project files in the checkout must not leak into tests that run from it.
    monkeypatch.chdir(tmp_path)
    get_port_allocator.cache_clear()
    yield state
    get_port_allocator.cache_clear()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# Every test either leases its ports or turns the bind probe off on purpose: the suite
# must pass while other stacks listen on portalloc's default ports (CI proves it with
# PORTALLOC_TEST_FOREIGN_LISTENERS=1, see tests/foreign_listeners.py).


@pytest.fixture
def exact_ports(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe off, on purpose, for a test that asserts portalloc's exact default
    numbers (block 10000, rest 10001, ...) in its private ledger. On a host where
    something listens there, the probe would rightly move the lease elsewhere; the
    test is about what the ledger hands out, and binds none of these ports."""
    monkeypatch.setenv("PORTALLOC_SKIP_PORT_CHECK", "1")


@pytest.fixture
def free_block(
    portalloc_service: PortAllocatorService, request: pytest.FixtureRequest
) -> Iterator[FreeBlock]:
    """100 ports at an exact place for a test that listens or probes there: a block of
    the plugin's test-only ledger (40000-41999, shared by xdist workers), every port of
    it free when leased, released when the test ends. A block where anything listens is
    held (so no one else gets it) and the next one tried, through all twenty: another
    test run on the machine (its own suite, its ephemeral ports) may hold several."""
    from portalloc.probe import port_is_free

    me = os.getpid()
    held: list[str] = []
    try:
        for attempt in range(20):
            session = f"free-block:{request.node.nodeid}#{attempt}"
            held.append(session)
            start = portalloc_service.hold(session, pid=me).allocation.block_start
            if all(port_is_free(port) for port in range(start, start + 100)):
                yield FreeBlock(start)
                return
        pytest.fail("no block of 100 free ports in 40000-41999")
    finally:
        for session in held:
            portalloc_service.leave(session, me)

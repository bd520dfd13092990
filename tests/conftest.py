"""Every test gets its own state dir; the real user state dir fails loudly if touched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import portalloc.config
from portalloc.config import PortAllocatorConfig
from portalloc.service import PortAllocatorService, get_port_allocator
from tests.helpers import FakeClock

ENV_VARS = (
    "PORT_ALLOC_BASE",
    "PORT_ALLOC_RANGE",
    "PORT_ALLOC_TTL_MINUTES",
    "PORT_ALLOC_MAX_SESSIONS",
    "PORTALLOC_STATE_DIR",
    "PORTALLOC_LOCK_TIMEOUT",
    "PORTALLOC_SKIP_PORT_CHECK",
    "PORTALLOC_API_KEY",
    "AGENT_COORDINATOR_DB_PORT",
    "AGENT_COORDINATOR_REST_PORT",
    "AGENT_COORDINATOR_REALTIME_PORT",
    "API_PORT",
    "COMPOSE_PROJECT_NAME",
)


# portalloc's own integration tests find their ports the way users' tests do.
pytest_plugins = ["portalloc.pytest_plugin"]


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

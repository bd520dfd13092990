"""Opt-in pytest plugin: `-p portalloc.pytest_plugin` gives integration tests their ports.

The session-scoped `portalloc_ports` fixture uses the port variables already in the
environment (a run inside `portalloc run`, a direnv shell or a compose stack), and
otherwise leases a block keyed by worktree and xdist worker, released at the end.
Under pytest-xdist every worker leases its own block even when the variables are
set: one set of ports shared by several workers would collide.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from portalloc.config import PortAllocatorConfig
from portalloc.facts import worktree_top
from portalloc.service import PortAllocatorService, open_service

_PORT_TEMPLATE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)_port\}$")


@dataclass(frozen=True)
class PortallocPorts:
    """Named ports for a test session, and where they came from."""

    ports: dict[str, int]
    env: dict[str, str]
    session_id: str | None = None
    from_environment: bool = False
    variables: dict[str, str] = field(default_factory=dict)  # port name -> variable

    def port(self, name: str, default: int | None = None) -> int:
        """The port named NAME; DEFAULT when it is not set (or raise KeyError)."""
        if name in self.ports:
            return self.ports[name]
        if default is not None:
            return default
        raise KeyError(f"no port named {name!r}; known: {', '.join(self.ports)}")

    def url(self, name: str, default: int | None = None, *, host: str = "localhost") -> str:
        return f"http://{host}:{self.port(name, default)}"


def port_variables(config: PortAllocatorConfig) -> dict[str, str]:
    """Port name -> the variable that carries it alone in the profile's env block."""
    names = {name for name, _ in config.profile.ports}
    found: dict[str, str] = {}
    for variable, template in config.profile.env:
        match = _PORT_TEMPLATE.match(template)
        if match and match.group(1) in names:
            found.setdefault(match.group(1), variable)
    return found


def ports_from_environment(
    config: PortAllocatorConfig, environ: Mapping[str, str]
) -> PortallocPorts | None:
    """Ports taken from variables already set, or None if none of them is set."""
    variables = port_variables(config)
    ports: dict[str, int] = {}
    for name, variable in variables.items():
        raw = environ.get(variable)
        if raw is None:
            continue
        try:
            ports[name] = int(raw)
        except ValueError:
            raise pytest.UsageError(f"{variable}={raw!r} is not a port number") from None
    if not ports:
        return None
    env = {variable: environ[variable] for variable, _ in config.profile.env if variable in environ}
    return PortallocPorts(ports, env, from_environment=True, variables=variables)


def session_key(root: Path, worker: str | None) -> str:
    return f"{root}#pytest-{worker or 'main'}"


def _xdist_worker(config: pytest.Config) -> str | None:
    # xdist's documented `config.workerinput`, not PYTEST_XDIST_WORKER: a pytest run
    # started from inside an xdist worker inherits that variable without being one.
    workerinput = getattr(config, "workerinput", None)
    if isinstance(workerinput, dict):
        worker = workerinput.get("workerid")
        return str(worker) if worker is not None else None
    return None


@pytest.fixture(scope="session")
def portalloc_service() -> PortAllocatorService:
    """The service the plugin leases from; override it to point at another ledger."""
    return open_service()


@pytest.fixture(scope="session")
def portalloc_ports(
    request: pytest.FixtureRequest, portalloc_service: PortAllocatorService
) -> Iterator[PortallocPorts]:
    """Ports for this test session: from the environment, or a lease released at the end."""
    config = portalloc_service.config
    worker = _xdist_worker(request.config)
    existing = None if worker else ports_from_environment(config, os.environ)
    if existing is not None:
        yield existing
        return
    root = worktree_top(Path(str(request.config.rootpath)))
    session_id = session_key(root, worker)
    # Tied to this process: a pytest killed outright leaves nothing behind for long.
    me = os.getpid()
    allocation = portalloc_service.hold(session_id, pid=me).allocation
    try:
        yield PortallocPorts(
            dict(allocation.ports),
            dict(allocation.env),
            session_id=session_id,
            variables=port_variables(config),
        )
    finally:
        portalloc_service.leave(session_id, me)

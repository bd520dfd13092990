"""Shell completion from the ledger: read-only, no lock, nothing written (it runs on Tab)."""

from __future__ import annotations

import re

from portalloc import reading
from portalloc.config import PortAllocatorConfig
from portalloc.models import Lease

# What a completion may offer: zsh and fish evaluate the candidates as code, so an id
# with quotes, `$`, backticks or the like from a shared ledger is left out.
_OFFERABLE = re.compile(r"[\w@%+=:,./~ -]+")


def _leases() -> tuple[PortAllocatorConfig | None, list[Lease]]:
    # Any trouble means no suggestions, never an error.
    try:
        config = PortAllocatorConfig.from_env()
    except Exception:
        return None, []
    found = reading.leases(config)
    if found is None:
        return None, []
    return config, [lease for lease in found if _OFFERABLE.fullmatch(lease.session_id)]


def sessions(incomplete: str) -> list[str]:
    """Session ids of the ledger's leases that start with INCOMPLETE."""
    _config, leases = _leases()
    return sorted(lease.session_id for lease in leases if lease.session_id.startswith(incomplete))


def keys(session: str | None, incomplete: str) -> list[str]:
    """What `get SESSION KEY` accepts for that session (its profile when it has no lease)."""
    config, leases = _leases()
    ports: list[str] = []
    variables: list[str] = []
    lease = next((item for item in leases if item.session_id == session), None)
    if lease is not None:
        ports = [name for name, _port in lease.ports]
        variables = [name for name, _value in lease.env]
    elif config is not None:
        ports = [name for name, _offset in config.profile.ports]
        variables = [name for name, _template in config.profile.env]
    candidates = [
        *ports,
        *(f"{name}_port" for name in ports),
        *variables,
        "compose_project_name",
        "session_id",
    ]
    return [
        key
        for key in dict.fromkeys(candidates)
        if key.startswith(incomplete) and key.isidentifier()
    ]

"""Shell completion from the ledger: read-only, no lock, nothing written (it runs on Tab)."""

from __future__ import annotations

import json
import re
from typing import Any

from portalloc.config import PortAllocatorConfig
from portalloc.fs import read_bytes

# What a completion may offer: zsh and fish evaluate the candidates as code, so an id
# with quotes, `$`, backticks or the like from a shared ledger is left out.
_OFFERABLE = re.compile(r"[\w@%+=:,./~ -]+")


def _leases() -> tuple[PortAllocatorConfig | None, list[dict[str, Any]]]:
    # The ledger is only ever replaced whole, so reading it without the lock sees
    # one complete version. Any trouble means no suggestions, never an error (nor a
    # hang: a FIFO or symlink at the ledger's name is refused unread).
    try:
        config = PortAllocatorConfig.from_env()
        document = json.loads(read_bytes(config.ledger_path, follow=False))
    except Exception:
        return None, []
    leases = document.get("leases") if isinstance(document, dict) else None
    if not isinstance(leases, list):
        return config, []
    return config, [
        lease
        for lease in leases
        if isinstance(lease, dict)
        and isinstance(lease.get("session_id"), str)
        and _OFFERABLE.fullmatch(lease["session_id"])
    ]


def sessions(incomplete: str) -> list[str]:
    """Session ids of the ledger's leases that start with INCOMPLETE."""
    _config, leases = _leases()
    return sorted(
        lease["session_id"] for lease in leases if lease["session_id"].startswith(incomplete)
    )


def keys(session: str | None, incomplete: str) -> list[str]:
    """What `get SESSION KEY` accepts for that session (its profile when it has no lease)."""
    config, leases = _leases()
    ports: list[str] = []
    variables: list[str] = []
    lease = next((item for item in leases if item["session_id"] == session), None)
    if lease is not None and isinstance(lease.get("ports"), dict):
        ports = [name for name in lease["ports"] if isinstance(name, str)]
        env = lease.get("env")
        variables = [name for name in env if isinstance(name, str)] if isinstance(env, dict) else []
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

"""portalloc: conflict-free blocks of TCP ports for parallel development environments."""

from __future__ import annotations

# Not `from typing import ...`: every `portalloc env` imports this package, and typing
# costs start-up time the read path does not have (bench/README.md).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "ConfigError",
    "InvalidSessionId",
    "LeaseNotFound",
    "LedgerError",
    "LockTimeout",
    "NoPortsAvailable",
    "PortAllocation",
    "PortAllocatorConfig",
    "PortAllocatorService",
    "PortallocError",
    "__version__",
    "get_port_allocator",
]

# The public names load on first use (PEP 562): `portalloc env` imports this package
# on every prompt and needs none of the service machinery on its read path.
_HOMES = {
    "PortAllocatorConfig": "portalloc.config",
    "PortAllocation": "portalloc.models",
    "PortAllocatorService": "portalloc.service",
    "get_port_allocator": "portalloc.service",
    **dict.fromkeys(
        (
            "ConfigError",
            "InvalidSessionId",
            "LeaseNotFound",
            "LedgerError",
            "LockTimeout",
            "NoPortsAvailable",
            "PortallocError",
        ),
        "portalloc.errors",
    ),
}

if TYPE_CHECKING:
    __version__: str
    from portalloc.config import PortAllocatorConfig
    from portalloc.errors import (
        ConfigError,
        InvalidSessionId,
        LeaseNotFound,
        LedgerError,
        LockTimeout,
        NoPortsAvailable,
        PortallocError,
    )
    from portalloc.models import PortAllocation
    from portalloc.service import PortAllocatorService, get_port_allocator


def __getattr__(name: str) -> Any:
    if name == "__version__":
        # From the installed package's metadata (pyproject.toml's version, once), and
        # only when asked: importlib.metadata costs every `portalloc env` milliseconds.
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("portalloc")
        except PackageNotFoundError:  # a source tree on sys.path, never installed
            found = "0+unknown"
        globals()["__version__"] = found
        return found
    if name in _HOMES:
        import importlib

        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'portalloc' has no attribute {name!r}")

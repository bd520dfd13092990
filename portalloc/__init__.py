"""portalloc: conflict-free blocks of TCP ports for parallel development environments."""

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

__version__ = "0.1.0"

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

"""`proxy start|stop|status`: the Caddy that serves every lease's named URLs."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from portalloc import proxy
from portalloc.errors import UsageError
from portalloc.proxy import caddy

if TYPE_CHECKING:
    from portalloc.config import PortAllocatorConfig
    from portalloc.service import PortAllocatorService


class Started(NamedTuple):
    status: caddy.Status
    started: bool  # False: it ran already
    crashed: bool  # it had stopped without `proxy stop`


def start(service: PortAllocatorService) -> Started:
    """Start Caddy on the configured proxy port with every lease's routes; a no-op when
    it runs. Refused when that port lies in a lease's block."""
    config = service.config
    config.check_proxy_port()
    port = config.proxy_port
    holder = next((a for a in service.status() if a.block_start <= port <= a.block_end), None)
    if holder is not None:
        raise UsageError(
            f"proxy port {port} lies in the block {holder.block_start}-{holder.block_end} "
            f"of session {holder.session_id!r}; set PORTALLOC_PROXY_PORT outside every block"
        )
    directory = proxy.directory(config.state_dir)
    crashed = caddy.status(directory).crashed
    _found, started = caddy.start(directory, port, [])
    service.sync_proxy()  # the routes, under the ledger's lock: none is missed
    return Started(caddy.status(directory), started, crashed)


def stop(config: PortAllocatorConfig) -> caddy.Process | None:
    """Stop the proxy's Caddy, by its PID file (never by name): what was stopped."""
    return caddy.stop(proxy.directory(config.state_dir))


def status(config: PortAllocatorConfig) -> caddy.Status:
    """Whether the proxy runs, where, and which names it answers."""
    return caddy.status(proxy.directory(config.state_dir))

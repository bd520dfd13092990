"""`why PORT`: which lease's block holds it, who listens on it, and which compose stack
publishes it (an orphan's, maybe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from portalloc import host, probe
from portalloc.commands import status

if TYPE_CHECKING:
    from portalloc.host import Listener, Stack
    from portalloc.models import PortAllocation
    from portalloc.service import PortAllocatorService


class Found(NamedTuple):
    """What holds PORT."""

    holder: PortAllocation | None  # the lease whose block it is in
    processes: list[tuple[int, str]]  # (pid, command line) of each listener the OS names
    listening: bool
    # The compose stacks docker says publish it, each with whether it is an orphan;
    # None when docker did not answer (it is asked only when something listens).
    stacks: list[tuple[Stack, bool]] | None


def why(
    service: PortAllocatorService,
    port: int,
    *,
    listeners: Callable[[int], list[Listener]] = host.listeners,
    is_listening: Callable[[int], bool] = probe.is_listening,
    stacks: Callable[[], list[Stack] | None] = status.stacks,
) -> Found:
    """Who holds PORT: the lease of SERVICE's ledger, the LISTENERS, and docker's word
    (STACKS) on who publishes it when something listens (IS_LISTENING)."""
    holder = next((a for a in service.status() if a.block_start <= port <= a.block_end), None)
    processes = [(item.pid, item.command or "") for item in listeners(port) if item.pid]
    listening = bool(processes) or is_listening(port)
    # Docker's word on who publishes it: the listener is docker-proxy or dockerd.
    running = stacks() if listening else []
    if running is None:
        return Found(holder, processes, listening, None)
    publishing = [stack for stack in running if port in stack.ports]
    orphaned = status.orphans(service, publishing)
    return Found(holder, processes, listening, [(s, s in orphaned) for s in publishing])

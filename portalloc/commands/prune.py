"""`prune`: reclaim what is dead; find, and on request stop, orphaned compose stacks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from portalloc.commands import status
from portalloc.errors import printable

if TYPE_CHECKING:
    from portalloc.allocator import Reclaimed
    from portalloc.host import Stack
    from portalloc.service import PortAllocatorService


class Pruned(NamedTuple):
    """What `prune` did: the leases it reclaimed, the orphans it found (None: docker
    did not answer), and why each one it was asked to stop is still there."""

    reclaimed: list[Reclaimed]
    orphans: list[Stack] | None
    failed: dict[str, str]  # project -> what is still there


def stop_stack(stack: Stack) -> str | None:
    """`docker compose -p NAME down`, then docker's and the OS's word that its
    containers and ports are gone: None, or what is still there."""
    from portalloc.host import DockerCLI, compose_down, compose_stacks
    from portalloc.probe import port_is_free

    problem = compose_down(stack.project)
    if problem is not None:
        return problem
    left = compose_stacks(stack.project, DockerCLI(10))
    if left is None:
        return "docker did not answer after `down`: its containers may still run"
    containers = sorted({name for item in left for name in item.containers})
    if containers:
        return (
            f"`docker compose -p {stack.project} down` left its containers running: "
            + ", ".join(map(printable, containers))
        )
    # docker-proxy lets go of a port as its container goes: a moment at most.
    deadline = time.monotonic() + 3
    while True:
        held = [port for port in stack.ports if not port_is_free(port)]
        if not held or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if held:
        return f"ports {', '.join(map(str, held))} are still in use after `down`"
    return None


def prune(
    service: PortAllocatorService,
    *,
    stop: bool = False,
    stacks: Callable[[], list[Stack] | None] = status.stacks,
    stopper: Callable[[Stack], str | None] = stop_stack,
) -> Pruned:
    """Reclaim expired and dead leases; name the orphaned compose stacks (STACKS: what
    docker runs) and, with STOP, stop each one with STOPPER."""
    reclaimed = service.prune()
    # A stack whose worktree was removed while it ran: its lease is reclaimed above,
    # its containers still hold the block's ports. Only docker's own command stops it.
    running = stacks()
    found = None if running is None else status.orphans(service, running)
    failed: dict[str, str] = {}
    for stack in (found or []) if stop else []:
        problem = stopper(stack)
        if problem is not None:
            failed[stack.project] = problem
    return Pruned(reclaimed, found, failed)

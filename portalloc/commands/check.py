"""`check`: which of a session's ports answer now, or once they all do."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from portalloc import probe
from portalloc.errors import UsageError

if TYPE_CHECKING:
    from portalloc.models import PortAllocation


def chosen(allocation: PortAllocation, names: list[str] | None) -> PortAllocation:
    """ALLOCATION with only the ports NAMES (all without), or a UsageError naming the
    unknown ones."""
    if not names:
        return allocation
    unknown = [name for name in names if name not in allocation.ports]
    if unknown:
        raise UsageError(
            f"no port named {', '.join(map(repr, unknown))}; known: {', '.join(allocation.ports)}"
        )
    ports = {name: allocation.ports[name] for name in dict.fromkeys(names)}
    return replace(allocation, ports=ports)


def check(
    allocation: PortAllocation,
    wait: float | None = None,
    *,
    answering: Callable[[Iterable[int]], dict[int, bool]] = probe.answering,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, bool]:
    """Whether each of ALLOCATION's ports answers (ANSWERING: the probe); with WAIT,
    asked again until all do or WAIT seconds have passed."""
    deadline = clock() + (wait or 0)
    while True:
        # A port counts only when its service answers: docker-proxy accepts at once and
        # closes again while nothing listens in the container (probe.answering).
        up = answering(set(allocation.ports.values()))
        state = {name: up[port] for name, port in allocation.ports.items()}
        if all(state.values()) or wait is None or clock() >= deadline:
            return state
        sleep(0.1)

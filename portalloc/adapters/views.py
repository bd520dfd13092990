"""Human and JSON views of what `status`, `check` and `why` found, for any terminal width."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from portalloc.models import PortAllocation

# Below this many columns the table cannot show block, ports, compose project and
# anchor uncut next to even a short session: each lease gets lines of its own.
TABLE_MIN_WIDTH = 100
ELLIPSIS = "…/"


def shorten_left(text: str, width: int) -> str:
    """TEXT cut from the left at a `/`, keeping whole last path components, to fit WIDTH.

    A text whose last component alone does not fit is kept whole: wrapped by the
    terminal, never cut in the middle of a name.
    """
    if len(text) <= width or "/" not in text:
        return text
    parts = text.split("/")
    for keep in range(len(parts) - 1, 0, -1):
        candidate = ELLIPSIS + "/".join(parts[-keep:])
        if len(candidate) <= width:
            return candidate
    return text


def held(allocation: PortAllocation) -> str:
    """What keeps the lease, instead of a countdown for anchored ones."""
    if allocation.held_while == "pid":
        text = f"pid {allocation.pid} runs"
    elif allocation.held_while == "worktree":
        text = "worktree exists"
    else:
        text = f"{allocation.ttl_remaining_minutes:.1f} min left"
    if allocation.guests:
        text += "\n+ run " + " ".join(f"pid {pid}" for pid in allocation.guests)
    return text


def _ports(allocation: PortAllocation) -> list[str]:
    return [f"{name} {port}" for name, port in allocation.ports.items()]


def _rows(allocation: PortAllocation, width: int) -> list[str]:
    """The ports as lines that fit WIDTH after the label, never splitting a name from its port."""
    rows: list[str] = []
    for item in _ports(allocation):
        if rows and len(rows[-1]) + 2 + len(item) <= width - 11:
            rows[-1] += "  " + item
        else:
            rows.append(item)
    return rows


def status_view(
    allocations: Sequence[PortAllocation], max_sessions: int, ledger: Path, width: int
) -> RenderableType:
    """The leases as a table from TABLE_MIN_WIDTH columns up, as blocks of lines below."""
    caption = Text(f"{len(allocations)} active / {max_sessions} max · ledger {ledger}")
    if width >= TABLE_MIN_WIDTH:
        return _table(allocations, caption, width)
    parts: list[RenderableType] = [Text("portalloc leases", style="bold")]
    for allocation in allocations:
        # The session on a line of its own: ids are usually long paths.
        lines = Text(shorten_left(allocation.session_id, width), style="bold")
        fields = [
            ("block", f"{allocation.block_start}-{allocation.block_end}"),
            *(("ports" if i == 0 else "", row) for i, row in enumerate(_rows(allocation, width))),
            ("compose", allocation.compose_project_name),
            ("held", held(allocation).replace("\n", "  ")),
        ]
        if allocation.worktree and allocation.worktree != allocation.session_id:
            fields.append(("worktree", allocation.worktree))
        for label, value in fields:
            lines.append(f"\n  {label:<9}{value}")
        parts.append(lines)
    parts.append(caption)
    return Group(*parts)


def _table(allocations: Sequence[PortAllocation], caption: Text, width: int) -> Table:
    table = Table(title="portalloc leases", caption=caption, expand=False)
    fixed = {
        "block": max([len("block"), *(len(f"{a.block_start}-{a.block_end}") for a in allocations)]),
        "ports": max([len("ports"), *(len(p) for a in allocations for p in _ports(a))]),
        "compose project": max(
            [len("compose project"), *(len(a.compose_project_name) for a in allocations)]
        ),
        "held while": max(
            [len("held while"), *(len(line) for a in allocations for line in held(a).split("\n"))]
        ),
    }
    # Each column costs its text plus 3 (two spaces of padding and a border).
    session_width = max(12, width - sum(fixed.values()) - 3 * (len(fixed) + 1) - 1)
    table.add_column("session", no_wrap=True, width=session_width)
    for name, needed in fixed.items():
        table.add_column(
            name,
            no_wrap=True,
            min_width=needed,
            justify="right" if name == "held while" else "left",
        )
    for allocation in allocations:
        # Text, not markup: a session id like "[bold]" must print as itself.
        session = Text(shorten_left(allocation.session_id, session_width))
        if allocation.pid:
            session.append(f"\nowner pid {allocation.pid}", style="dim")
        if allocation.worktree and allocation.worktree != allocation.session_id:
            session.append(
                "\nworktree " + shorten_left(allocation.worktree, session_width - 9), style="dim"
            )
        table.add_row(
            session,
            f"{allocation.block_start}-{allocation.block_end}",
            "\n".join(_ports(allocation)),
            allocation.compose_project_name,
            held(allocation),
        )
    return table


def check_json(allocation: PortAllocation, listening: Mapping[str, bool]) -> dict[str, Any]:
    return {
        "session_id": allocation.session_id,
        "all_listening": all(listening.values()),
        "ports": {
            name: {"port": allocation.ports[name], "listening": up}
            for name, up in listening.items()
        },
    }


def check_text(allocation: PortAllocation, listening: Mapping[str, bool]) -> str:
    return "".join(
        f"{name:<10} {allocation.ports[name]:>5}  {'listening' if up else 'closed'}\n"
        for name, up in listening.items()
    )


class Why(NamedTuple):
    """Which lease's block holds PORT, and who listens on it."""

    port: int
    holder: PortAllocation | None
    processes: list[tuple[int, str]]  # (pid, command line)
    listening: bool

    @property
    def port_name(self) -> str | None:
        if self.holder is None:
            return None
        return next((name for name, p in self.holder.ports.items() if p == self.port), None)

    def to_json(self) -> dict[str, Any]:
        holder = self.holder
        return {
            "port": self.port,
            "session_id": holder.session_id if holder else None,
            "block_start": holder.block_start if holder else None,
            "block_end": holder.block_end if holder else None,
            "port_name": self.port_name,
            "listening": self.listening,
            "processes": [{"pid": pid, "command": cmd} for pid, cmd in self.processes],
        }

    def text(self) -> str:
        holder = self.holder
        if holder is None:
            lines = [f"port {self.port}: no active lease holds it"]
        else:
            named = self.port_name
            role = f" as {named}" if named else " (unnamed port in the block)"
            lines = [
                f"port {self.port}: session {holder.session_id}{role}, "
                f"block {holder.block_start}-{holder.block_end}"
            ]
        if not self.listening:
            lines.append("  nothing listens on it now")
        elif self.processes:
            lines += [f"  listening: pid {pid} {cmd}" for pid, cmd in self.processes]
        else:
            lines.append("  something listens on it (the OS does not say which process)")
        return "\n".join(lines) + "\n"

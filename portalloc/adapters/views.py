"""Human and JSON views of what `status`, `check` and `why` found, for any terminal width."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from portalloc.errors import printable

if TYPE_CHECKING:
    from portalloc.host import Stack
    from portalloc.models import PortAllocation
    from portalloc.proxy.caddy import Status

# Below this many columns, or when the table cannot show every session, worktree and
# port whole, each lease gets lines of its own instead: the session line then has the
# whole width, so a wider terminal never shows less of a path than a narrower one.
TABLE_MIN_WIDTH = 100
ELLIPSIS = "…/"
INDENT = "  "  # a lease's worktree and ports, under its session in the table's first column
FIRST_HEADER = "session / ports"
# The table's 4 columns cost their text plus 3 cells each (padding and a border), plus 1.
TABLE_OVERHEAD = 3 * 4 + 1


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


def names_line(allocation: PortAllocation, short: bool = False) -> str | None:
    """The lease's names in one line, `http://<port>.feat-a.localhost:9999` (each port's
    name in place of `<port>`; SHORT: `*.feat-a.localhost:9999`), or None without any."""
    some = next(iter(allocation.urls.values()), None)
    if some is None or allocation.slug is None:
        return None
    where = f"{allocation.slug}.localhost:{some.rsplit(':', 1)[1]}"
    return f"*.{where}" if short else f"http://<port>.{where}"


def _pack(items: Sequence[str], width: int) -> list[str]:
    """ITEMS in order, two spaces apart, on as few lines of at most WIDTH as they go;
    an item is never split (one wider than WIDTH gets a line of its own)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += "  " + item
        else:
            lines.append(item)
    return lines


def _rows(allocation: PortAllocation, width: int) -> list[str]:
    """The ports as lines that fit WIDTH after the label, never splitting a name from its port."""
    return _pack(_ports(allocation), width - 11)


def status_view(
    allocations: Sequence[PortAllocation], max_sessions: int, ledger: Path, width: int
) -> RenderableType:
    """The leases as a table from TABLE_MIN_WIDTH columns up, as blocks of lines below."""
    caption = Text(f"{len(allocations)} active / {max_sessions} max · ledger {ledger}")
    if width >= TABLE_MIN_WIDTH:
        table = _table(allocations, caption, width)
        if table is not None:
            return table
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
        names = names_line(allocation)
        if names is not None:
            fields.insert(-2, ("urls", names))
        if allocation.worktree and allocation.worktree != allocation.session_id:
            fields.append(("worktree", allocation.worktree))
        for label, value in fields:
            lines.append(f"\n  {label:<9}{value}")
        parts.append(lines)
    parts.append(caption)
    return Group(*parts)


def _names(allocation: PortAllocation) -> list[tuple[str, str]]:
    """The session and, when it is another path, its worktree, each with its style."""
    lines = [(allocation.session_id, "")]
    if allocation.worktree and allocation.worktree != allocation.session_id:
        lines.append((f"{INDENT}worktree {allocation.worktree}", "dim"))
    return lines


def _first_column(allocation: PortAllocation, width: int) -> list[tuple[str, str]]:
    """A lease's lines in the table's first column: its names, then its ports on as few
    lines of at most WIDTH as they go."""
    ports = _pack(_ports(allocation), width - len(INDENT))
    names = names_line(allocation, short=True)
    urls = [] if names is None else [(INDENT + names, "dim")]
    return [*_names(allocation), *((INDENT + row, "") for row in ports), *urls]


def _table(allocations: Sequence[PortAllocation], caption: Text, width: int) -> Table | None:
    """The leases as a table no wider than WIDTH, or None when it would have to cut a
    session, a worktree or a port. No column is wider than its widest line."""
    fixed = {
        "block": max([len("block"), *(len(f"{a.block_start}-{a.block_end}") for a in allocations)]),
        "compose": max([len("compose"), *(len(a.compose_project_name) for a in allocations)]),
        "held while": max(
            [len("held while"), *(len(line) for a in allocations for line in held(a).split("\n"))]
        ),
    }
    room = width - TABLE_OVERHEAD - sum(fixed.values())
    needed = max(
        [
            len(FIRST_HEADER),
            *(len(line) for a in allocations for line, _ in _names(a)),
            *(len(INDENT + port) for a in allocations for port in _ports(a)),
            *(len(INDENT + (names_line(a, short=True) or "")) for a in allocations),
        ]
    )
    if needed > room:
        return None
    one_line = max([0, *(len(INDENT + "  ".join(_ports(a))) for a in allocations)])
    cells = [_first_column(a, min(room, max(needed, one_line))) for a in allocations]
    first = max([len(FIRST_HEADER), *(len(line) for lines in cells for line, _ in lines)])
    table = Table(title="portalloc leases", caption=caption, expand=False)
    table.add_column(FIRST_HEADER, no_wrap=True, width=first)
    for name, size in fixed.items():
        table.add_column(
            name,
            no_wrap=True,
            width=size,
            justify="right" if name == "held while" else "left",
        )
    for allocation, lines in zip(allocations, cells, strict=True):
        # Text, not markup: a session id like "[bold]" must print as itself.
        cell = Text()
        for number, (line, style) in enumerate(lines):
            cell.append(("\n" if number else "") + line, style=style)
        table.add_row(
            cell,
            f"{allocation.block_start}-{allocation.block_end}",
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
    stacks: Sequence[Published] = ()  # compose projects docker says publish PORT

    @property
    def port_name(self) -> str | None:
        if self.holder is None:
            return None
        return next((name for name, p in self.holder.ports.items() if p == self.port), None)

    @property
    def url(self) -> str | None:
        name = self.port_name
        return None if self.holder is None or name is None else self.holder.urls.get(name)

    def to_json(self) -> dict[str, Any]:
        holder = self.holder
        return {
            "port": self.port,
            "session_id": holder.session_id if holder else None,
            "block_start": holder.block_start if holder else None,
            "block_end": holder.block_end if holder else None,
            "port_name": self.port_name,
            "url": self.url,
            "listening": self.listening,
            "processes": [{"pid": pid, "command": cmd} for pid, cmd in self.processes],
            "compose_projects": [
                {"compose_project": item.stack.project, "working_dir": item.stack.working_dir}
                | ({"orphan": True} if item.orphan else {})
                for item in self.stacks
            ],
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
            if self.url is not None:
                lines.append(f"  url: {self.url}")
        if not self.listening:
            lines.append("  nothing listens on it now")
        elif self.processes:
            lines += [f"  listening: pid {pid} {cmd}" for pid, cmd in self.processes]
        else:
            lines.append("  something listens on it (the OS does not say which process)")
        for item in self.stacks:
            # Docker's labels are anyone's text: escaped before they reach a terminal.
            stack = item.stack
            line = f"  published by compose project {printable(stack.project)}"
            if item.orphan:
                line += (
                    f": an orphan, its worktree {printable(stack.working_dir)} is gone; "
                    "`portalloc prune --stop` stops it"
                )
            elif stack.working_dir:
                line += f" (started in {printable(stack.working_dir)})"
            lines.append(line)
        return "\n".join(lines) + "\n"


class Published(NamedTuple):
    """A compose stack docker says publishes a port, and whether it is an orphan of
    this ledger (portalloc.orphans)."""

    stack: Stack
    orphan: bool


def _ports_text(ports: Sequence[int]) -> str:
    return ", ".join(map(str, ports)) if ports else "no published ports"


def orphans_text(
    orphans: Sequence[Stack], stopped: bool = False, failed: Mapping[str, str] | None = None
) -> str:
    """One line per orphaned compose stack: its project, ports and gone worktree, and
    whether `prune --stop` stopped it."""
    lines = []
    for stack in orphans:
        # Docker's labels are anyone's text: escaped before they reach a terminal.
        project = printable(stack.project)
        where = f"worktree {printable(stack.working_dir)} is gone"
        if not stopped:
            lines.append(
                f"orphaned stack {project} ({where}): ports {_ports_text(stack.ports)}; "
                "stop it with `portalloc prune --stop`"
            )
        elif failed and stack.project in failed:
            lines.append(f"orphaned stack {project} ({where}): not stopped")
        else:
            lines.append(
                f"stopped orphaned stack {project} ({where}): "
                f"`docker compose -p {project} down` freed ports {_ports_text(stack.ports)}"
            )
    return "".join(line + "\n" for line in lines)


def orphans_json(
    orphans: Sequence[Stack], stopped: bool = False, failed: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    return [
        {
            "compose_project": stack.project,
            "working_dir": stack.working_dir,
            "ports": list(stack.ports),
            "containers": list(stack.containers),
            "stopped": stopped and not (failed and stack.project in failed),
        }
        for stack in orphans
    ]


def proxy_text(status: Status, state: str) -> str:
    """`proxy start` and `proxy status`: where Caddy listens and the names it answers."""
    files = status.to_json()
    if not status.running:
        crashed = " (its Caddy exited without `portalloc proxy stop`)" if status.crashed else ""
        return f"proxy {state}{crashed}; start it with `portalloc proxy start`\n"
    lines = [
        f"proxy {state}: caddy pid {files['pid']} on {' and '.join(files['listen'])}",
        f"  admin  {files['admin_socket']}",
        f"  log    {files['log']}",
    ]
    routes = files["routes"]
    if routes:
        width = max(len(route["host"]) for route in routes)
        lines.append(f"  {len(routes)} name{'s' if len(routes) != 1 else ''}:")
        lines += [
            f"    http://{route['host']}:{files['port']}".ljust(width + 20) + f"-> {route['port']}"
            for route in routes
        ]
    else:
        lines.append("  no names yet: every lease gets them when it is made")
    return "\n".join(lines) + "\n"

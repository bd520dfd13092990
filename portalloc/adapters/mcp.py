"""MCP tools over the same locked ledger as the CLI, served on stdio."""

from __future__ import annotations

import json
from typing import Annotated, NotRequired, TypedDict

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from portalloc import __version__
from portalloc.adapters.common import allocate_body, error_body, warn
from portalloc.adapters.schema import Allocation
from portalloc.config import PortAllocatorConfig
from portalloc.errors import NoPortsAvailable, PortallocError
from portalloc.service import PortAllocatorService, open_service

SERVER_NAME = "portalloc"

INSTRUCTIONS = """\
portalloc hands out conflict-free blocks of TCP ports on this host, shared with every \
other agent, worktree and shell through one locked ledger. Before starting servers, \
containers or tests that listen on ports, call allocate_ports with a stable session id \
(the absolute path of your worktree is a good one) and use the ports it returns instead \
of defaults like 3000, 5432 or 8000. Call release_ports with the same id when you are \
done. ports_status shows what is taken.\
"""

ALLOCATE_DESCRIPTION = """\
Reserve a block of TCP ports for a session, or return the session's existing block with \
its lease refreshed (calling it again with the same id is safe and gives the same ports).

Use a stable, unique session_id: the absolute path of your git worktree is a good choice. \
Any non-empty string without control characters works.

On success the result is {"success": true, "allocation": {...}, "env_snippet": "..."}. \
`allocation` holds the named ports (db_port, rest_port, realtime_port, api_port by \
default), compose_project_name and the lease times. `env_snippet` is a POSIX shell block \
of `export NAME=VALUE` lines, safely quoted: run `eval "$ENV_SNIPPET"` or prepend it to \
the shell command that starts your servers, docker compose stack or tests, or export the \
variables one by one, so every process uses these ports. Pass the ports to servers you \
start (e.g. --port <api_port>) instead of hard-coded defaults.

When every block is taken the result is {"success": false, "error": "no_ports_available"}: \
release sessions you no longer need (see ports_status) or ask the user. Leases expire \
after their TTL (120 minutes by default); call allocate_ports again to refresh. Call \
release_ports when you are done."""

RELEASE_DESCRIPTION = """\
Release a session's block of ports so others can use it. Call it when the servers, \
containers or tests using the ports have stopped. Idempotent: releasing an unknown or \
already released session also succeeds. The result is {"success": true}. The session gets \
the same block back on its next allocate_ports if it is still free."""

STATUS_DESCRIPTION = """\
List the active leases on this host, lowest block first: for each, session_id, its named \
ports (db_port, rest_port, ...), compose_project_name, expires_at and \
ttl_remaining_minutes. Read-only; use it to see which ports are taken or to find your own \
session's lease without refreshing it."""

SessionId = Annotated[
    str,
    Field(
        description=(
            "Stable id of the environment the ports are for, e.g. the absolute path of the "
            "git worktree. 1-4096 characters, no control characters."
        )
    ),
]


class AllocateResult(TypedDict):
    """The session's lease and its shell block, or why none could be granted."""

    success: bool
    allocation: NotRequired[Allocation]
    env_snippet: NotRequired[str]
    error: NotRequired[str]


class ReleaseResult(TypedDict):
    """Always a success: releasing an unknown session is not an error."""

    success: bool


# stdout carries the protocol: warnings go to stderr (common.warn), never there.
_warn = warn


def _service() -> PortAllocatorService:
    """A service per call: the settings and the project file read again, as each command
    line reads them (a session can run `portalloc init --write` or `trust` while the
    client keeps this server running); every lease is in the locked ledger anyway."""
    return open_service(on_warning=_warn)


def _internal(exc: Exception) -> Exception:
    """An unexpected exception as one line for the client (PORTALLOC_DEBUG=1: as is)."""
    from portalloc.adapters import guard

    if guard.debugging():
        return exc
    message = guard.report(exc)
    _warn(message)
    return ToolError(message)


def allocate_ports(session_id: SessionId) -> AllocateResult:
    try:
        allocation = _service().allocate(session_id)
    except NoPortsAvailable as exc:
        return error_body(exc)  # type: ignore[return-value]
    except PortallocError as exc:
        raise ToolError(exc.message) from None
    except Exception as exc:
        raise _internal(exc) from None
    return allocate_body(allocation)  # type: ignore[return-value]


def release_ports(session_id: SessionId) -> ReleaseResult:
    try:
        _service().release(session_id)
    except PortallocError as exc:
        raise ToolError(exc.message) from None
    except Exception as exc:
        raise _internal(exc) from None
    return {"success": True}


def ports_status() -> Annotated[CallToolResult, list[Allocation]]:
    try:
        allocations = [allocation.to_dict() for allocation in _service().status()]
    except PortallocError as exc:
        raise ToolError(exc.message) from None
    except Exception as exc:
        raise _internal(exc) from None
    # One JSON array as text (the SDK would split a list into one block per item,
    # and an empty list into no content at all), the same list as structured content.
    text = json.dumps(allocations, indent=2, ensure_ascii=False)
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content={"result": allocations},
    )


def build_server() -> MCPServer:
    """The MCP server with portalloc's three tools; it holds no state of its own."""
    server: MCPServer = MCPServer(
        SERVER_NAME,
        instructions=INSTRUCTIONS,
        version=__version__,
        log_level="WARNING",
    )
    server.add_tool(
        allocate_ports,
        description=ALLOCATE_DESCRIPTION,
        annotations=ToolAnnotations(
            title="Allocate ports",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    server.add_tool(
        release_ports,
        description=RELEASE_DESCRIPTION,
        annotations=ToolAnnotations(
            title="Release ports",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    server.add_tool(
        ports_status,
        description=STATUS_DESCRIPTION,
        annotations=ToolAnnotations(
            title="Port leases", read_only_hint=True, open_world_hint=False
        ),
    )
    return server


def run_stdio() -> None:
    """Serve on stdin/stdout until the client closes the connection."""
    # Bad settings fail here, with the CLI's one line and exit 2, not on the first call.
    PortAllocatorConfig.from_env()
    server = build_server()
    try:
        server.run("stdio")
    except KeyboardInterrupt:
        pass

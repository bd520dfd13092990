"""`portalloc mcp` end to end: the SDK's own stdio client against a real server process."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult, TextContent

from tests.helpers import Result, run_cli

SessionTest = Callable[[ClientSession], Awaitable[None]]


@asynccontextmanager
async def mcp_session(state_dir: Path, errlog: Path, **env: str) -> AsyncIterator[ClientSession]:
    """`python -m portalloc mcp` on the test's ledger, with an initialized client session."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "portalloc", "mcp"],
        # The SDK passes only a safe subset of the environment; the ledger must be explicit.
        env={"PORTALLOC_STATE_DIR": str(state_dir), **env},
        cwd=errlog.parent,
    )
    with errlog.open("a", encoding="utf-8") as log:
        async with (
            stdio_client(params, errlog=log) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


def run_session(state_dir: Path, errlog: Path, body: SessionTest, **env: str) -> None:
    async def main() -> None:
        with anyio.fail_after(60):
            async with mcp_session(state_dir, errlog, **env) as session:
                await body(session)

    anyio.run(main)


async def cli(*args: str, state_dir: Path) -> Result:
    """The CLI in a separate process, off the event loop so the session stays responsive."""

    def call() -> Result:
        return run_cli(*args, env={"PORTALLOC_STATE_DIR": str(state_dir)})

    return await anyio.to_thread.run_sync(call)


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    data = result.structured_content
    assert isinstance(data, dict)
    return data


def error_text(result: CallToolResult) -> str:
    assert result.is_error
    assert result.structured_content is None
    texts = [block.text for block in result.content if isinstance(block, TextContent)]
    assert texts
    return "\n".join(texts)


def only_text(result: CallToolResult) -> str:
    (block,) = result.content
    assert isinstance(block, TextContent)
    return block.text


@pytest.fixture
def errlog(tmp_path: Path) -> Path:
    return tmp_path / "mcp-stderr.log"


def test_lists_three_tools_with_guidance(state_dir: Path, errlog: Path) -> None:
    async def body(session: ClientSession) -> None:
        listed = await session.list_tools()
        tools = {tool.name: tool for tool in listed.tools}
        assert set(tools) == {"allocate_ports", "release_ports", "ports_status"}
        for name in ("allocate_ports", "release_ports"):
            schema = tools[name].input_schema
            assert schema["required"] == ["session_id"]
            assert schema["properties"]["session_id"]["type"] == "string"
        assert tools["ports_status"].input_schema.get("required", []) == []
        allocate_doc = tools["allocate_ports"].description or ""
        assert "env_snippet" in allocate_doc
        assert "eval" in allocate_doc
        assert "release_ports" in allocate_doc
        assert tools["ports_status"].annotations is not None
        assert tools["ports_status"].annotations.read_only_hint is True

    run_session(state_dir, errlog, body)


def test_allocate_is_shared_with_the_cli_and_release_frees_it(
    state_dir: Path, errlog: Path
) -> None:
    session_id = "/home/dev/my project/$HOME `id` 'q' ü"

    async def body(session: ClientSession) -> None:
        data = structured(await session.call_tool("allocate_ports", {"session_id": session_id}))
        assert data["success"] is True
        allocation = data["allocation"]
        assert allocation["session_id"] == session_id
        ports = [allocation[f"{name}_port"] for name in ("db", "rest", "realtime", "api")]
        assert ports == list(range(ports[0], ports[0] + 4))
        assert f"export API_PORT={allocation['api_port']}\n" in data["env_snippet"]
        assert f"COMPOSE_PROJECT_NAME={allocation['compose_project_name']}" in data["env_snippet"]

        # The CLI, a separate process, reads the same lease from the ledger.
        status = await cli("status", "--json", state_dir=state_dir)
        assert status.returncode == 0, status.stderr
        (listed,) = json.loads(status.stdout)
        assert listed["session_id"] == session_id
        assert listed["api_port"] == allocation["api_port"]

        # Asking again returns the same lease; ports_status agrees.
        again = structured(await session.call_tool("allocate_ports", {"session_id": session_id}))
        assert again["allocation"]["db_port"] == allocation["db_port"]
        status_result = await session.call_tool("ports_status", {})
        leases = structured(status_result)["result"]
        assert [lease["session_id"] for lease in leases] == [session_id]
        assert leases[0]["ttl_remaining_minutes"] > 0
        text = only_text(status_result)
        assert json.loads(text)[0]["db_port"] == allocation["db_port"]

        released = structured(await session.call_tool("release_ports", {"session_id": session_id}))
        assert released == {"success": True}
        after = await cli("status", "--json", state_dir=state_dir)
        assert json.loads(after.stdout) == []
        # Idempotent: an unknown session releases fine too.
        unknown = structured(await session.call_tool("release_ports", {"session_id": session_id}))
        assert unknown == {"success": True}

    run_session(state_dir, errlog, body)


def test_lease_made_by_the_cli_is_seen_and_released_over_mcp(state_dir: Path, errlog: Path) -> None:
    async def body(session: ClientSession) -> None:
        made = await cli("allocate", "from-cli", "--json", state_dir=state_dir)
        assert made.returncode == 0, made.stderr
        cli_allocation = json.loads(made.stdout)["allocation"]

        leases = structured(await session.call_tool("ports_status", {}))["result"]
        assert [(lease["session_id"], lease["rest_port"]) for lease in leases] == [
            ("from-cli", cli_allocation["rest_port"])
        ]
        released = structured(await session.call_tool("release_ports", {"session_id": "from-cli"}))
        assert released == {"success": True}
        status = await cli("status", "--json", state_dir=state_dir)
        assert json.loads(status.stdout) == []

    run_session(state_dir, errlog, body)


def test_exhaustion_is_a_result_not_an_error(state_dir: Path, errlog: Path) -> None:
    async def body(session: ClientSession) -> None:
        first = structured(await session.call_tool("allocate_ports", {"session_id": "one"}))
        assert first["success"] is True
        full = await session.call_tool("allocate_ports", {"session_id": "two"})
        assert structured(full) == {"success": False, "error": "no_ports_available"}
        # Nothing changed, and the holder can still refresh its lease.
        status = await cli("status", "--json", state_dir=state_dir)
        assert [lease["session_id"] for lease in json.loads(status.stdout)] == ["one"]
        refreshed = structured(await session.call_tool("allocate_ports", {"session_id": "one"}))
        assert refreshed["allocation"]["db_port"] == first["allocation"]["db_port"]

    # One slot, at 10000: the probe is off on purpose, or a stack listening there would
    # make the first call fail too (the server gets only the variables given here).
    run_session(state_dir, errlog, body, PORT_ALLOC_MAX_SESSIONS="1", PORTALLOC_SKIP_PORT_CHECK="1")


BAD_ARGUMENTS: list[tuple[dict[str, Any], str]] = [
    ({}, "session_id"),
    ({"session_id": ""}, "empty"),
    ({"session_id": "   "}, "whitespace"),
    ({"session_id": 42}, "string"),
    ({"session_id": None}, "string"),
    ({"session_id": ["a"]}, "string"),
    ({"session_id": {"a": 1}}, "string"),
    ({"session_id": "a\nb"}, "U+000A"),
    ({"session_id": "a\x00b"}, "U+0000"),
    ({"session_id": "\x1b[31mred"}, "U+001B"),
    ({"session_id": "x" * 4097}, "4096"),
]


def test_bad_arguments_are_tool_errors_and_the_server_keeps_serving(
    state_dir: Path, errlog: Path
) -> None:
    async def body(session: ClientSession) -> None:
        for tool in ("allocate_ports", "release_ports"):
            for arguments, expected in BAD_ARGUMENTS:
                message = error_text(await session.call_tool(tool, arguments))
                assert tool in message
                assert expected in message, (arguments, message)
        status = await cli("status", "--json", state_dir=state_dir)
        assert json.loads(status.stdout) == []
        # Still serving after all of that.
        data = structured(await session.call_tool("allocate_ports", {"session_id": "ok"}))
        assert data["success"] is True

    run_session(state_dir, errlog, body)
    assert "Traceback" not in errlog.read_text(encoding="utf-8")


def test_warnings_go_to_stderr_not_the_protocol(state_dir: Path, errlog: Path) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / "leases.json").write_text("{not json", encoding="utf-8")

    async def body(session: ClientSession) -> None:
        # A stray line on stdout would break the client's framing before this returned.
        data = structured(await session.call_tool("allocate_ports", {"session_id": "s"}))
        assert data["success"] is True

    run_session(state_dir, errlog, body)
    assert "corrupt" in errlog.read_text(encoding="utf-8")
    assert list(state_dir.glob("leases.json.corrupt-*"))


def test_bad_settings_stop_the_server_before_it_starts(state_dir: Path) -> None:
    result = run_cli("mcp", env={"PORT_ALLOC_BASE": "80"}, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "PORT_ALLOC_BASE=80" in result.stderr

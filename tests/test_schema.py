"""The allocation object has one definition, models.AllocationJSON: to_dict writes its
keys, and the HTTP API's and the MCP tools' schemas are built from it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from portalloc import PortAllocatorConfig, PortAllocatorService
from portalloc.models import HELD_WHILE, AllocationJSON

FIELDS = list(AllocationJSON.__annotations__)


def _described(properties: dict[str, Any]) -> None:
    assert list(properties) == FIELDS
    for name in FIELDS:
        said = AllocationJSON.__annotations__[name]  # `Annotated[type, "what it is"]`
        assert properties[name]["description"] in said, name
    assert properties["held_while"]["enum"] == list(HELD_WHILE)


def test_to_dict_writes_the_defined_keys_and_one_per_port(state_dir: Path) -> None:
    service = PortAllocatorService(
        PortAllocatorConfig(state_dir=state_dir), port_is_free=lambda _port: True
    )
    allocation = service.allocate("s")
    ports = [f"{name}_port" for name in allocation.ports]
    assert list(allocation.to_dict()) == [FIELDS[0], *ports, *FIELDS[1:]]


def test_the_http_schema_is_the_definition() -> None:
    from portalloc.adapters.http import create_app

    schemas = create_app(api_key="k").openapi()["components"]["schemas"]
    _described(schemas["Allocation"]["properties"])
    assert schemas["Allocation"]["additionalProperties"] is True  # the `<name>_port`s


def test_the_mcp_schemas_are_the_definition() -> None:
    from portalloc.adapters.mcp import build_server

    tools = {tool.name: tool for tool in asyncio.run(build_server().list_tools())}
    for name in ("allocate_ports", "ports_status"):
        schema = tools[name].output_schema
        assert schema is not None
        _described(schema["$defs"]["Allocation"]["properties"])

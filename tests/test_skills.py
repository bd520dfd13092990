"""Agent skills, their per-client copies, examples and MCP registration files."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ROOT / "skills"
CLIENT_COPIES = (".claude/skills", ".codex/skills", ".gemini/skills")
SKILL_NAMES = ("portalloc", "validate-feature")

# A port number written next to a local host, unless it sits in `${VAR:-default}` form
# (`localhost:${API_PORT:-8000}` never matches: no digit follows the colon).
HARDCODED_PORT = re.compile(
    r"(?:localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1?\]):\d+"
    r"|--port[= ]+\d+"
    r"|\bPORT=\d+"
)


def hardcoded_ports(text: str) -> list[str]:
    return [match.group(0) for match in HARDCODED_PORT.finditer(text)]


def files_under(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def scanned_files() -> list[Path]:
    """Everything a user or an agent copies commands and URLs from."""
    trees = [SKILLS, ROOT / "examples", *(ROOT / copy for copy in CLIENT_COPIES)]
    found = [path for tree in trees for path in sorted(tree.rglob("*")) if path.is_file()]
    return [*found, ROOT / "justfile"]


def frontmatter(path: Path) -> dict[str, str]:
    """The `key: value` lines between the opening and closing `---`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "---", f"{path}: no YAML frontmatter"
    end = lines.index("---", 1)
    fields: dict[str, str] = {}
    for line in lines[1:end]:
        key, sep, value = line.partition(": ")
        assert sep and re.fullmatch(r"[a-z-]+", key), f"{path}: unexpected line {line!r}"
        fields[key] = value
    return fields


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("curl http://localhost:3000/", ["localhost:3000"]),
        ("open 127.0.0.1:5173 now", ["127.0.0.1:5173"]),
        ("bind [::1]:8000", ["[::1]:8000"]),
        ("uvicorn app:app --port 8000", ["--port 8000"]),
        ("PORT=3000 npm start", ["PORT=3000"]),
        ('curl "http://localhost:${AGENT_COORDINATOR_REST_PORT:-3000}/"', []),
        ('uvicorn app:app --port "$API_PORT"', []),
        ('PORT="$API_PORT" npm start', []),
        ('- "${AGENT_COORDINATOR_DB_PORT:-54322}:5432"', []),
    ],
)
def test_hardcoded_port_detector(text: str, expected: list[str]) -> None:
    assert hardcoded_ports(text) == expected


def test_skill_set_is_complete() -> None:
    assert set(SKILL_NAMES) <= {p.name for p in SKILLS.iterdir() if p.is_dir()}
    for name in SKILL_NAMES:
        assert (SKILLS / name / "SKILL.md").is_file()


@pytest.mark.parametrize("copy", CLIENT_COPIES)
def test_client_copy_is_byte_identical(copy: str) -> None:
    source = files_under(SKILLS)
    assert source, "skills/ is empty"
    assert files_under(ROOT / copy) == source, (
        f"{copy} drifted from skills/: run `just sync-skills`"
    )


@pytest.mark.parametrize("name", sorted(p.name for p in SKILLS.iterdir() if p.is_dir()))
def test_frontmatter_has_name_and_description(name: str) -> None:
    fields = frontmatter(SKILLS / name / "SKILL.md")
    assert fields["name"] == name
    assert re.fullmatch(r"[a-z0-9-]{1,64}", fields["name"])
    description = fields["description"]
    assert 20 <= len(description) <= 1024
    # A plain YAML scalar: these would make a strict YAML parser read something else.
    assert ": " not in description
    assert " #" not in description
    assert description[0] not in "\"'&*!|>%@`[{"


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_hardcoded_localhost_port(path: Path) -> None:
    assert hardcoded_ports(path.read_text(encoding="utf-8")) == []


def test_portalloc_skill_teaches_the_workflow() -> None:
    text = (SKILLS / "portalloc" / "SKILL.md").read_text(encoding="utf-8")
    for needle in (
        'eval "$(portalloc env)"',
        "allocate_ports",
        "release_ports",
        "ports_status",
        '--port "$API_PORT"',
        'PORT="$API_PORT"',
        "${API_PORT:-8000}",
        "COMPOSE_PROJECT_NAME",
        "portalloc check --wait",
        "portalloc release",
        "AGENT_COORDINATOR_DB_PORT",
        "AGENT_COORDINATOR_REST_PORT",
        "AGENT_COORDINATOR_REALTIME_PORT",
        "SUPABASE_URL",
    ):
        assert needle in text, needle
    for port in ("3000", "5173", "8000", "54322"):
        assert port in text, f"the skill should name {port} as a port never to hardcode"


def test_validate_feature_skill_forwards_ports_and_cleans_up() -> None:
    text = (SKILLS / "validate-feature" / "SKILL.md").read_text(encoding="utf-8")
    for name in (
        "AGENT_COORDINATOR_DB_PORT",
        "AGENT_COORDINATOR_REST_PORT",
        "AGENT_COORDINATOR_REALTIME_PORT",
    ):
        assert f'{name}="${name}"' in text, f"{name} is not forwarded to docker compose"
    for needle in (
        'docker compose -p "$COMPOSE_PROJECT_NAME" up -d',
        "portalloc check --wait 60",
        "http://localhost:${AGENT_COORDINATOR_REST_PORT:-3000}/",
        'docker compose -p "$COMPOSE_PROJECT_NAME" down -v',
        "portalloc release",
    ):
        assert needle in text, needle


def test_examples() -> None:
    compose = (ROOT / "examples" / "compose.yaml").read_text(encoding="utf-8")
    assert "name: ${COMPOSE_PROJECT_NAME:-" in compose
    for name in (
        "AGENT_COORDINATOR_DB_PORT",
        "AGENT_COORDINATOR_REST_PORT",
        "AGENT_COORDINATOR_REALTIME_PORT",
        "API_PORT",
    ):
        assert re.search(rf'- "\${{{name}:-\d+}}:\d+"', compose), name
    # Every host port mapping goes through a variable.
    for mapping in re.findall(r'^\s*- "([^"]*:\d+)"\s*$', compose, re.MULTILINE):
        assert mapping.startswith("${"), mapping

    envrc = (ROOT / "examples" / ".envrc").read_text(encoding="utf-8")
    assert 'eval "$(portalloc env)"' in envrc

    script = ROOT / "examples" / "new-worktree.sh"
    assert script.stat().st_mode & 0o111, "new-worktree.sh is not executable"
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "git worktree add" in text
    assert "portalloc env --worktree" in text


def mcp_server(data: dict[str, Any], table: str) -> dict[str, Any]:
    servers = data[table]
    assert isinstance(servers, dict)
    server = servers["portalloc"]
    assert isinstance(server, dict)
    return server


@pytest.mark.parametrize(
    ("relpath", "table"),
    [
        (".mcp.json", "mcpServers"),
        (".gemini/settings.json", "mcpServers"),
        (".codex/config.toml", "mcp_servers"),
    ],
)
def test_mcp_registration(relpath: str, table: str) -> None:
    path = ROOT / relpath
    text = path.read_text(encoding="utf-8")
    data: dict[str, Any] = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    server = mcp_server(data, table)
    assert server["command"] == "portalloc"
    assert server["args"] == ["mcp"]

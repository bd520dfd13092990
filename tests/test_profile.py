"""Project profiles: portalloc.toml / [tool.portalloc], templates, precedence, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli, trust

# These tests read the exact numbers a profile's base and offsets give, from a private
# ledger, and bind none of them: the bind probe is off on purpose.
pytestmark = pytest.mark.usefixtures("exact_ports")

PYPROJECT = """\
[project]
name = "shop"

[tool.portalloc]
base = 20000
compose_prefix = "shop"

[tool.portalloc.ports]
web = 0
api = 1
db = 2

[tool.portalloc.env]
WEB_PORT = "{web_port}"
API_PORT = "{api_port}"
VITE_API_URL = "http://localhost:{api_port}"
"""


def env_json(cwd: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    result = run_cli("env", *args, "--format", "json", cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    data: dict[str, str] = json.loads(result.stdout)
    return data


def test_pyproject_profile_found_walking_up(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    trust(tmp_path / "pyproject.toml")
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    values = env_json(tmp_path / "src" / "pkg", "s")
    assert list(values) == ["WEB_PORT", "API_PORT", "VITE_API_URL"]
    assert values == {
        "WEB_PORT": "20000",
        "API_PORT": "20001",
        "VITE_API_URL": "http://localhost:20001",
    }
    allocation = json.loads(run_cli("allocate", "s", "--json", cwd=tmp_path).stdout)["allocation"]
    assert allocation["compose_project_name"].startswith("shop-")
    assert {"web_port", "api_port", "db_port"} <= set(allocation)


def test_portalloc_toml_top_level_keys_and_default_env(tmp_path: Path) -> None:
    (tmp_path / "portalloc.toml").write_text("range = 10\n[ports]\nweb = 0\nworker = 5\n")
    values = env_json(tmp_path, "s")
    assert values == {
        "WEB_PORT": "10000",
        "WORKER_PORT": "10005",
        "COMPOSE_PROJECT_NAME": values["COMPOSE_PROJECT_NAME"],
    }
    assert values["COMPOSE_PROJECT_NAME"].startswith("ac-")
    assert env_json(tmp_path, "t")["WEB_PORT"] == "10010"


def test_portalloc_toml_wins_over_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    trust(tmp_path / "pyproject.toml")
    (tmp_path / "portalloc.toml").write_text("base = 30000\n")
    values = env_json(tmp_path, "s")
    assert values["AGENT_COORDINATOR_DB_PORT"] == "30000"


def test_pyproject_without_table_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert env_json(tmp_path, "s")["API_PORT"] == "10003"


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    (tmp_path / "portalloc.toml").write_text("base = 30000\nttl_minutes = 7\n")
    assert env_json(tmp_path, "a")["API_PORT"] == "30003"
    assert env_json(tmp_path, "b", env={"PORT_ALLOC_BASE": "45000"})["API_PORT"] == "45003"
    [a, _b] = json.loads(run_cli("status", "--json", cwd=tmp_path).stdout)
    assert a["ttl_remaining_minutes"] <= 7
    run_cli("env", "c", "--ttl", "3", cwd=tmp_path, env={"PORT_ALLOC_TTL_MINUTES": "50"})
    listing = json.loads(run_cli("status", "--json", cwd=tmp_path).stdout)
    assert [x["ttl_remaining_minutes"] <= 3 for x in listing if x["session_id"] == "c"] == [True]


def test_lease_keeps_the_profile_it_was_made_with(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "portalloc.toml").write_text('[ports]\nweb = 0\n[env]\nWEB = "{web_port}"\n')
    trust(project / "portalloc.toml")
    run_cli("allocate", "s", cwd=project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert env_json(elsewhere, "s") == {"WEB": "10000"}
    assert run_cli("get", "s", "web", cwd=elsewhere).stdout == "10000\n"
    assert run_cli("get", "s", "WEB", cwd=elsewhere).stdout == "10000\n"


@pytest.mark.parametrize(
    ("content", "key", "fragment"),
    [
        ('[env]\nX = "{session_id.__class__}"\n', "env.X", "not a plain field name"),
        ('[env]\nX = "{session_id[0]}"\n', "env.X", "not a plain field name"),
        ('[env]\nX = "{nope_port}"\n', "env.X", "unknown field {nope_port}"),
        ('[env]\nX = "{api_port!r}"\n', "env.X", "not allowed"),
        ('[env]\n"1BAD" = "{api_port}"\n', "env.1BAD", "not a valid shell variable name"),
        ('[env]\nX = "{"\n', "env.X", "Single '{'"),
        ('[env]\nX = "a\\nb"\n', "env.X", "control characters"),
        ('[env]\nX = "\\u001b[31m"\n', "env.X", "control characters"),
        ("base = 80\n", "base", "must be an integer >= 1024"),
        ('base = "high"\n', "base", "must be an integer"),
        ("[ports]\na = 0\nb = 0\n", "ports", "share one offset"),
        ("[ports]\na = -1\n", "ports.a", "offset must be an integer >= 0"),
        ('compose_prefix = "Bad Name"\n', "compose_prefix", "lowercase"),
        ("colour = 1\n", "colour", "unknown key"),
        ("not toml = [\n", "(file)", "not valid TOML"),
        ("[ports]\nx = 200\n", "ports.x", "offset 200 does not fit in a block of 100 ports"),
        ("[ports]\nweb = 0\nWEB = 1\n", "ports", "differ only in case"),
    ],
)
def test_profile_errors_exit_2_naming_file_and_key(
    tmp_path: Path, state_dir: Path, content: str, key: str, fragment: str
) -> None:
    path = tmp_path / "portalloc.toml"
    path.write_text(content)
    result = run_cli("env", "s", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert str(path) in result.stderr
    assert key in result.stderr
    assert fragment in result.stderr
    assert not (state_dir / "leases.json").exists()


def test_template_values_are_inert_under_eval(tmp_path: Path) -> None:
    import shlex
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    (tmp_path / "portalloc.toml").write_text(
        f"[env]\nX = '$(touch {marker}) `touch {marker}` {{session_id}}'\n"
    )
    trust(tmp_path / "portalloc.toml")
    session = f"'; touch {marker}; echo '"
    script = (
        f'eval "$({shlex.quote(sys.executable)} -m portalloc env {shlex.quote(session)})"; '
        'printf %s "$X"'
    )
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout == f"$(touch {marker}) `touch {marker}` {session}"
    assert not marker.exists()

"""The opt-in pytest plugin, run the way users run it: a real pytest in a subprocess."""

from __future__ import annotations

import json
import os
from pathlib import Path

from portalloc.config import PortAllocatorConfig
from portalloc.pytest_plugin import PortallocPorts, ports_from_environment, session_key
from tests.helpers import inner_pytest, run_cli

INNER_TEST = """
import json, os, pathlib

def test_ports(portalloc_ports):
    out = {
        "rest_url": portalloc_ports.url("rest", 3000),
        "api": portalloc_ports.port("api", 8000),
        "session_id": portalloc_ports.session_id,
        "from_environment": portalloc_ports.from_environment,
    }
    pathlib.Path(os.environ["PLUGIN_OUT"]).write_text(json.dumps(out))
"""


def run_inner_pytest(tmp_path: Path, env: dict[str, str]) -> dict[str, object]:
    out = tmp_path / "out.json"
    proc = inner_pytest(tmp_path / "project", INNER_TEST, out, env)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    data: dict[str, object] = json.loads(out.read_text())
    return data


def test_plugin_leases_a_block_and_releases_it(tmp_path: Path) -> None:
    seen = run_inner_pytest(tmp_path, {})
    # A real lease, probed as users' tests get it: the first default block that is free.
    rest = int(str(seen["rest_url"]).removeprefix("http://localhost:"))
    assert seen["api"] == rest + 2 and rest >= 10001 and (rest - 10001) % 100 == 0
    assert seen["from_environment"] is False
    assert seen["session_id"] == session_key(tmp_path / "project", None)
    assert json.loads(run_cli("status", "--json").stdout) == []


def test_plugin_uses_ports_already_in_the_environment(tmp_path: Path) -> None:
    seen = run_inner_pytest(tmp_path, {"AGENT_COORDINATOR_REST_PORT": "13000"})
    assert seen["rest_url"] == "http://localhost:13000"
    assert seen["api"] == 8000  # unset: the caller's default
    assert seen["from_environment"] is True
    assert not (Path(os.environ["PORTALLOC_STATE_DIR"]) / "leases.json").exists()


def test_session_key_includes_xdist_worker(tmp_path: Path) -> None:
    assert session_key(tmp_path, "gw1") == f"{tmp_path}#pytest-gw1"
    assert session_key(tmp_path, None) != session_key(tmp_path, "gw0")


def test_ports_from_environment_maps_profile_variables(tmp_path: Path) -> None:
    config = PortAllocatorConfig(state_dir=tmp_path)
    assert ports_from_environment(config, {}) is None
    found = ports_from_environment(
        config,
        {"API_PORT": "18003", "AGENT_COORDINATOR_DB_PORT": "18000", "COMPOSE_PROJECT_NAME": "x"},
    )
    assert isinstance(found, PortallocPorts)
    assert found.ports == {"db": 18000, "api": 18003}
    # The profile's variables that are set, in the profile's order.
    assert found.env == {
        "AGENT_COORDINATOR_DB_PORT": "18000",
        "API_PORT": "18003",
        "COMPOSE_PROJECT_NAME": "x",
    }
    assert found.url("api") == "http://localhost:18003"
    assert found.url("rest", 3000) == "http://localhost:3000"


def test_own_integration_tests_get_ports_from_the_plugin(
    portalloc_ports: PortallocPorts,
) -> None:
    # portalloc's own suite opts in (tests/conftest.py) against a session-private ledger.
    assert set(portalloc_ports.ports) == {"db", "rest", "realtime", "api"}
    assert portalloc_ports.port("api") == portalloc_ports.port("db") + 3

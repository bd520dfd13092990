"""What a new user hits (issue 19, item 9): a subdirectory of a worktree means the
worktree, whichever way it is named; the set-up command leases nothing."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.helpers import invoke

SKIP = {"PORTALLOC_SKIP_PORT_CHECK": "1"}


def test_env_worktree_of_a_subdirectory_leases_the_worktree_top(tmp_path: Path) -> None:
    tree = tmp_path / "shop"
    sub = tree / "src" / "app"
    sub.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    by_flag = invoke("env", "--worktree", str(sub), "--format", "json", env=SKIP)
    inside = invoke("env", "--format", "json", cwd=sub, env=SKIP)
    assert by_flag.returncode == inside.returncode == 0
    assert json.loads(by_flag.stdout) == json.loads(inside.stdout)
    listing = json.loads(invoke("status", "--json").stdout)
    assert [item["session_id"] for item in listing] == [str(tree.resolve())]


def test_the_set_up_command_leases_nothing() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    setup = readme[readme.index("## Set-up") : readme.index("## Quick start")]
    first = re.findall(r"```sh\n(.*?)```", setup, flags=re.DOTALL)[0]
    assert "portalloc env" not in first and "allocate" not in first


def test_the_python_api_keeps_env_snippet(state_dir: Path) -> None:
    """The contract's Python API: `a.env_snippet` is the `sh` block of `a.env`."""
    from portalloc import PortAllocatorConfig, PortAllocatorService

    svc = PortAllocatorService(PortAllocatorConfig(state_dir=state_dir, skip_port_check=True))
    allocation = svc.allocate("api-user")
    assert allocation.env_snippet.startswith("export AGENT_COORDINATOR_DB_PORT=")
    assert f"export API_PORT={allocation.api_port}\n" in allocation.env_snippet
    assert "env_snippet" not in allocation.to_dict()
    assert svc.status()[0].env_snippet == allocation.env_snippet

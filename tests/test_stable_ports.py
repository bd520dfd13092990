"""Ports that never move: anchored leases, home blocks, own listeners, a `run` that never steals.

Real git worktrees, real listeners and real processes; time moves only through the
service's clock or by rewriting a lease's expiry in the ledger, never by sleeping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from portalloc import PortAllocatorConfig, PortAllocatorService
from portalloc.host import Host, Listener
from portalloc.models import Owner
from tests.helpers import FakeClock, FreeBlock, Result, inner_pytest, run_cli

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["git", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_worktree(tmp_path: Path, name: str) -> Path:
    """A real `git worktree add` beside a repository made on first use."""
    repo = tmp_path / "repo"
    if not repo.exists():
        repo.mkdir()
        git("init", "-q", "-b", "main", cwd=repo)
        git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q",
            "--allow-empty", "-m", "init", cwd=repo)  # fmt: skip
    tree = tmp_path / name
    git("worktree", "add", "-q", "-b", name, tree, cwd=repo)
    return tree


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.02)


@contextmanager
def http_server(port: int, cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m http.server PORT` started in CWD, as a developer starts a dev server."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def settings(base: int | FreeBlock) -> dict[str, str]:
    """A base for blocks of 100, or a leased FreeBlock for tests that listen at its ports."""
    return base.env if isinstance(base, FreeBlock) else {"PORT_ALLOC_BASE": str(base)}


def env_in(tree: Path, *args: str, base: int | FreeBlock) -> Result:
    return run_cli("env", "--format", "json", *args, cwd=tree, env=settings(base))


def ledger(state_dir: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((state_dir / "leases.json").read_text())
    return document


def expire_everything(state_dir: Path) -> None:
    """Rewrite every lease's expiry into the past, as hours of wall time would."""
    document = ledger(state_dir)
    for lease in document["leases"]:
        lease["expires_at"] = "2000-01-01T00:00:00Z"
    (state_dir / "leases.json").write_text(json.dumps(document))


def status(base: int | FreeBlock = 10000) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(run_cli("status", "--json", env=settings(base)).stdout)
    return out


# --- anchored leases -------------------------------------------------------------


def test_expiry_ends_only_unanchored_leases(state_dir: Path, tmp_path: Path) -> None:
    tree = make_worktree(tmp_path, "wt")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert env_in(tree, base=31000).returncode == 0
        run_cli("allocate", "by-pid", "--pid", str(sleeper.pid))
        run_cli("allocate", "agent")  # an MCP/HTTP-style session: TTL only
        held = {a["session_id"]: a["held_while"] for a in status()}
        assert held == {str(tree): "worktree", "by-pid": "pid", "agent": "ttl"}

        expire_everything(state_dir)
        reclaimed = json.loads(run_cli("prune", "--json").stdout)["reclaimed"]
        assert [(r["session_id"], r["reason"]) for r in reclaimed] == [("agent", "expired")]
        assert {a["session_id"] for a in status()} == {str(tree), "by-pid"}
        table = run_cli("status", env={"COLUMNS": "200"}).stdout
        assert "worktree exists" in table and f"pid {sleeper.pid} runs" in table
    finally:
        sleeper.kill()
        sleeper.wait()
    reclaimed = json.loads(run_cli("prune", "--json").stdout)["reclaimed"]
    assert [(r["session_id"], r["reason"]) for r in reclaimed] == [("by-pid", "owner_dead")]
    shutil.rmtree(tree)
    reclaimed = json.loads(run_cli("prune", "--json").stdout)["reclaimed"]
    assert [(r["session_id"], r["reason"]) for r in reclaimed] == [(str(tree), "worktree_gone")]


def test_injected_clock_days_later_anchored_leases_stay(
    state_dir: Path, clock: FakeClock, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    svc = PortAllocatorService(
        PortAllocatorConfig(state_dir=state_dir), clock=clock, port_is_free=lambda _p: True
    )
    svc.allocate("tree", worktree=tree, ttl_minutes=1)
    svc.allocate("pid", pid=os.getpid(), ttl_minutes=1)
    svc.allocate("ttl", ttl_minutes=1)
    clock.advance(60 * 24 * 3)
    assert [a.session_id for a in svc.status()] == ["tree", "pid"]
    assert [a.held_while for a in svc.status()] == ["worktree", "pid"]


# --- home blocks and own listeners --------------------------------------------------


# The servers here listen in a block leased for the test (free_block), never at fixed
# numbers another program may hold.


def test_own_server_keeps_the_home_block_across_release(
    state_dir: Path, tmp_path: Path, free_block: FreeBlock
) -> None:
    """The README's walkthrough, steps 3-4, with the worktree's server running."""
    tree = make_worktree(tmp_path, "feat-a")
    first = json.loads(env_in(tree, base=free_block).stdout)
    api = int(first["API_PORT"])
    assert api == free_block.start + 3
    with http_server(api, cwd=tree / "."):
        expire_everything(state_dir)  # lunch: the TTL ran out, the worktree is still here
        again = env_in(tree, base=free_block)
        assert json.loads(again.stdout) == first
        assert run_cli("release", str(tree)).returncode == 0
        back = env_in(tree, base=free_block)
        assert json.loads(back.stdout) == first
        assert "MOVED" not in back.stderr and "skipped" not in back.stderr


def test_foreign_listener_moves_loudly_rewrites_manifest_and_home_returns(
    state_dir: Path, tmp_path: Path, free_block: FreeBlock
) -> None:
    home_block, step = free_block.start, free_block.step
    api, moved_api = home_block + 3, home_block + step + 3
    tree = make_worktree(tmp_path, "feat-b")
    env_in(tree, "--write", str(tree), base=free_block)
    manifest = tree / ".worktree-ports.json"
    assert json.loads(manifest.read_text())["api_port"] == api
    run_cli("release", str(tree))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with http_server(api, cwd=elsewhere) as foreign:
        # No --write: the recorded manifest follows anyway.
        moved = env_in(tree, base=free_block)
        assert json.loads(moved.stdout)["API_PORT"] == str(moved_api)
        line = (
            f"portalloc: warning: session {str(tree)!r} MOVED from block "
            f"{home_block}-{home_block + step - 1} to {home_block + step}-"
            f"{home_block + 2 * step - 1}: port {api} (api) is in use by pid {foreign.pid} ("
        )
        assert line in moved.stderr
        assert f"rewrote {manifest} with the new ports" in moved.stderr
        assert json.loads(manifest.read_text())["api_port"] == moved_api
        assert status(free_block)[0]["home_block"] == home_block
    # The foreign server is gone: the next new lease is home again, manifest too.
    run_cli("release", str(tree))
    home = env_in(tree, base=free_block)
    assert json.loads(home.stdout)["API_PORT"] == str(api)
    assert "MOVED" not in home.stderr
    assert json.loads(manifest.read_text())["api_port"] == api


def test_descendant_of_pid_owner_is_own(state_dir: Path, clock: FakeClock) -> None:
    me = os.getpid()
    busy: set[int] = set()
    host = Host(
        now=clock,
        port_is_free=lambda port: port not in busy,
        listeners=lambda _port: [Listener(me + 1, "python -m http.server", "/")],
        is_descendant=lambda pid, owner: pid == me + 1 and owner.pid == me,
        compose_publishes=lambda _project, _port, _docker: False,
    )
    svc = PortAllocatorService(PortAllocatorConfig(state_dir=state_dir), host=host)
    assert svc.allocate("s", pid=me).db_port == 10000
    svc.release("s")
    busy.add(10003)
    assert svc.allocate("s", pid=me).db_port == 10000  # its own child holds api
    svc.release("s")
    assert svc.allocate("s").db_port == 10100  # without the owner it is a stranger


def test_docker_proxy_of_the_sessions_compose_project_is_own(
    state_dir: Path, clock: FakeClock, tmp_path: Path
) -> None:
    busy: set[int] = set()
    published: dict[str, set[int]] = {}
    host = Host(
        now=clock,
        port_is_free=lambda port: port not in busy,
        listeners=lambda port: [Listener(77, f"/usr/bin/docker-proxy -host-port {port}", "/")],
        compose_publishes=lambda project, port, _docker: port in published.get(project, set()),
    )
    tree = tmp_path / "tree"
    tree.mkdir()
    svc = PortAllocatorService(PortAllocatorConfig(state_dir=state_dir), host=host)
    first = svc.allocate(str(tree), worktree=tree)
    assert first.db_port == 10000
    svc.release(str(tree))
    busy.add(10001)  # `docker compose up`: dockerd's proxy listens, cwd "/"
    published[first.compose_project_name] = {10001}
    assert svc.allocate(str(tree), worktree=tree).db_port == 10000
    svc.release(str(tree))
    published.clear()  # the same proxy, for another project's container
    assert svc.allocate(str(tree), worktree=tree).db_port == 10100


# --- run never steals -------------------------------------------------------------


def test_run_uses_an_existing_lease_and_leaves_it(state_dir: Path) -> None:
    made = json.loads(run_cli("allocate", "shared", "--json").stdout)["allocation"]
    result = run_cli("run", "shared", "--", "sh", "-c", 'echo "$API_PORT"')
    assert result.returncode == 0 and result.stdout == f"{made['api_port']}\n"
    after = status()
    assert [a["session_id"] for a in after] == ["shared"]
    assert (after[0]["held_while"], after[0]["pid"], after[0]["guests"]) == ("ttl", None, [])


def _start_run(session: str, gate: Path, ready: Path) -> subprocess.Popen[bytes]:
    child = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(ready)!r}).write_text(os.environ['API_PORT'])\n"
        f"while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.02)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-m", "portalloc", "run", session, "--", sys.executable, "-c", child],
        stdin=subprocess.DEVNULL,
    )


def _wait_file(path: Path) -> str:
    deadline = time.monotonic() + 60
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def test_two_overlapping_runs_the_first_to_end_frees_nothing(tmp_path: Path) -> None:
    a = _start_run("job", tmp_path / "go-a", tmp_path / "ready-a")
    port_a = _wait_file(tmp_path / "ready-a")
    b = _start_run("job", tmp_path / "go-b", tmp_path / "ready-b")
    try:
        assert _wait_file(tmp_path / "ready-b") == port_a
        (lease,) = status()
        assert (lease["pid"], lease["guests"]) == (a.pid, [b.pid])
        (tmp_path / "go-a").write_text("x")
        assert a.wait(timeout=60) == 0
        (lease,) = status()  # b still runs in it: nothing was released
        assert lease["api_port"] == int(port_a) and lease["guests"] == [b.pid]
        other = json.loads(run_cli("allocate", "other", "--json").stdout)["allocation"]
        assert other["block_start"] != lease["block_start"]
    finally:
        (tmp_path / "go-a").write_text("x")
        (tmp_path / "go-b").write_text("x")
        assert b.wait(timeout=60) == 0
    assert [a["session_id"] for a in status()] == ["other"]


def _gone_or_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_run_takes_its_child_along_and_its_lease_is_reclaimed(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(ready)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "portalloc", "run", "doomed", "--", sys.executable, "-c", child]
    )
    child_pid = int(_wait_file(ready))
    run.send_signal(signal.SIGKILL)  # only `run` itself: its child is not in the blast
    run.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not _gone_or_zombie(child_pid):
        assert time.monotonic() < deadline, "the child outlived its killed `run`"
        time.sleep(0.02)
    reclaimed = json.loads(run_cli("prune", "--json").stdout)["reclaimed"]
    assert [(r["session_id"], r["reason"]) for r in reclaimed] == [("doomed", "owner_dead")]


# --- pytest plugin --------------------------------------------------------------------

WORKER_TEST = """
import json, os, pathlib

def test_ports(portalloc_ports):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    out = pathlib.Path(os.environ["PLUGIN_OUT"]) / worker
    out.write_text(json.dumps(portalloc_ports.ports))
    if os.environ.get("PLUGIN_HANG"):
        (out.parent / "hanging").write_text(str(os.getpid()))
        import time; time.sleep(120)
"""


def _inner_pytest(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return inner_pytest(tmp_path / "project", WORKER_TEST, out, env, *args)


def test_xdist_workers_get_disjoint_ports_with_variables_set(tmp_path: Path) -> None:
    already_set = {"API_PORT": "18003", "AGENT_COORDINATOR_DB_PORT": "18000"}
    proc = _inner_pytest(tmp_path, already_set, "-n", "2", "--dist", "each")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    seen = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out").iterdir()}
    assert set(seen) == {"gw0", "gw1"}
    assert not set(seen["gw0"].values()) & set(seen["gw1"].values())
    assert status() == []  # both leases released at the end


def test_sigkilled_pytest_leaves_a_lease_reclaimed_at_once(tmp_path: Path) -> None:
    proc = _inner_pytest(tmp_path, {"PLUGIN_HANG": "1"})
    try:
        _wait_file(tmp_path / "out" / "hanging")
        (lease,) = status()
        assert (lease["held_while"], lease["pid"]) == ("pid", proc.pid)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    reclaimed = json.loads(run_cli("prune", "--json").stdout)["reclaimed"]
    assert [r["reason"] for r in reclaimed] == ["owner_dead"]


# --- the ledger migration -------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


def test_version_1_ledger_is_migrated_and_history_becomes_home(
    state_dir: Path, clock: FakeClock
) -> None:
    state_dir.mkdir()
    (state_dir / "leases.json").write_bytes((FIXTURES / "ledger-v1.json").read_bytes())
    svc = PortAllocatorService(
        PortAllocatorConfig(state_dir=state_dir), clock=clock, port_is_free=lambda _p: True
    )
    (active,) = svc.status()
    assert (active.session_id, active.db_port, active.held_while) == ("/src/shop-a", 10000, "ttl")
    assert active.home_block == 10000
    # "old" held block 10200 under v1 and has no lease now: that is its home.
    assert svc.allocate("old").db_port == 10200
    written = ledger(state_dir)
    assert written["version"] == 4 and "history" not in written
    assert written["homes"] == {"gone": 10100, "/src/shop-a": 10000, "old": 10200}
    assert [lease["guests"] for lease in written["leases"]] == [[], []]


# --- found by a hostile review ----------------------------------------------------------


def test_listener_in_a_nested_worktree_is_not_own(
    state_dir: Path, tmp_path: Path, free_block: FreeBlock
) -> None:
    start = free_block.start
    tree = make_worktree(tmp_path, "outer")
    env_in(tree, base=free_block)
    run_cli("release", str(tree))
    nested = tree / ".claude" / "worktrees" / "x"
    nested.mkdir(parents=True)
    (nested / ".git").write_text("gitdir: /elsewhere\n")  # a worktree of its own
    with http_server(start + 1, cwd=nested):
        moved = env_in(tree, base=free_block)
    assert f"MOVED from block {start}-{start + free_block.step - 1}" in moved.stderr
    assert json.loads(moved.stdout)["AGENT_COORDINATOR_REST_PORT"] != str(start + 1)


def test_pid_1_as_owner_does_not_make_every_listener_own(state_dir: Path, clock: FakeClock) -> None:
    busy: set[int] = set()
    host = Host(
        now=clock,
        port_is_free=lambda port: port not in busy,
        listeners=lambda _port: [Listener(4242, "a stranger", "/")],
        owner_alive=lambda _owner: True,
        owner_of=lambda pid: Owner(pid, 0.0),
        is_descendant=lambda _pid, _owner: True,  # everything descends from PID 1
    )
    svc = PortAllocatorService(PortAllocatorConfig(state_dir=state_dir), host=host)
    assert svc.allocate("h", pid=1).db_port == 10000
    svc.release("h")
    busy.add(10000)
    assert svc.allocate("h", pid=1).db_port == 10100


def test_run_joining_a_lease_leaves_its_ttl_alone(state_dir: Path) -> None:
    run_cli("allocate", "long", "--ttl", "1440")
    assert run_cli("run", "long", "--", "true").returncode == 0
    (lease,) = status()
    assert lease["ttl_remaining_minutes"] == pytest.approx(1440, abs=1)

"""The contract's "Real containers" section, against a real Docker daemon and Compose v2.

tests/docker_env.py starts one dockerd for the run (and, for the tests that ask, a
second one with --userland-proxy=false); where none can start, these tests skip with
its one reason, and CI (which installs it all) fails instead. Every stack is a busybox
image built locally; its services are `busybox httpd`. Ports come from a private
ledger inside a block of the plugin's test-only range (the `free_block` fixture), and
each test's compose project is the one portalloc names for its worktree.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest

from portalloc.probe import port_is_free
from tests.docker_env import Docker, compose_up

PORTALLOC = str(Path(sys.executable).parent / "portalloc")


class Block(Protocol):
    """What the `free_block` fixture gives: 100 free ports from START on."""

    @property
    def start(self) -> int: ...

    @property
    def env(self) -> dict[str, str]: ...


# A web service that says which compose project it belongs to, and a second service.
# httpd runs as PID 1, which ignores SIGTERM: a short grace period keeps `down` quick.
STACK = """\
services:
  web:
    image: portalloc-test-busybox
    command: ["sh", "-c", "echo $$PROJECT > /www/index.html && exec httpd -f -p 80 -h /www"]
    environment:
      PROJECT: ${COMPOSE_PROJECT_NAME:-none}
    stop_grace_period: 1s
    ports:
      - "${WEB_PORT:-8080}:80"
  db:
    image: portalloc-test-busybox
    command: ["httpd", "-f", "-p", "5432", "-h", "/www"]
    stop_grace_period: 1s
    ports:
      - "${DB_PORT:-5432}:5432"
"""
PROFILE = "[ports]\nweb = 0\ndb = 1\n"


def repo(tmp_path: Path, compose: str = STACK, profile: str = PROFILE) -> Path:
    """A user's repository `shop` with its compose file and portalloc profile."""
    top = tmp_path / "shop"
    top.mkdir()
    (top / "compose.yaml").write_text(compose)
    (top / "portalloc.toml").write_text(profile)
    git = ["git", "-C", str(top), "-c", "user.email=me@example.com", "-c", "user.name=Me"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "initial"], check=True)
    return top


def worktree(top: Path, name: str) -> Path:
    tree = top.parent / f"shop-{name}"
    subprocess.run(
        ["git", "-C", str(top), "worktree", "add", "-q", "-b", name, str(tree)], check=True
    )
    return tree


def portalloc(
    *args: str, cwd: Path, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PORTALLOC, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, f"portalloc {' '.join(args)}: {result.stderr}"
    return result


def lease(tree: Path, env: dict[str, str]) -> tuple[dict[str, str], str]:
    """`portalloc env` in TREE: its variables, and what it said on stderr."""
    result = portalloc("env", "--format", "json", cwd=tree, env=env)
    variables: dict[str, str] = json.loads(result.stdout)
    return variables, result.stderr


def http_get(port: int, timeout: float = 5) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


def wait_busy(*ports: int, timeout: float = 30) -> None:
    """Until something holds each of PORTS (docker publishes as the container starts)."""
    deadline = time.monotonic() + timeout
    while any(port_is_free(port) for port in ports):
        assert time.monotonic() < deadline, f"nothing published {ports}"
        time.sleep(0.1)


@pytest.fixture
def base_env(free_block: Block, docker: Docker) -> dict[str, str]:
    """The environment of a user's shell: the private ledger's settings and the run's
    docker daemon (tests that need the other daemon override DOCKER_HOST)."""
    return docker.environ(**free_block.env)


@pytest.fixture(params=["docker-proxy", "no-userland-proxy"])
def daemon(request: pytest.FixtureRequest) -> Docker:
    """Each daemon in turn: docker-proxy holds the published ports, or dockerd itself."""
    name = "docker" if request.param == "docker-proxy" else "docker_noproxy"
    found: Docker = request.getfixturevalue(name)
    return found


# --- the walkthrough, three worktrees at once ----------------------------------------


def test_three_worktrees_run_their_stacks_at_once(
    tmp_path: Path, docker: Docker, base_env: dict[str, str]
) -> None:
    top = repo(tmp_path)
    trees = [worktree(top, name) for name in ("feat-a", "feat-b", "feat-c")]
    with ExitStack() as stacks:
        leased = []
        for tree in trees:
            variables, _ = lease(tree, base_env)
            env = {**base_env, **variables}
            up = stacks.enter_context(compose_up(docker, tree, env))
            assert up.returncode == 0, up.stderr
            leased.append(variables)
        for tree, variables in zip(trees, leased, strict=True):
            # README step 4: exit 0 once every named port answers.
            check = portalloc("check", "--wait", "60", cwd=tree, env=base_env, check=False)
            assert check.returncode == 0, check.stderr
            web, db = int(variables["WEB_PORT"]), int(variables["DB_PORT"])
            assert http_get(web).strip() == variables["COMPOSE_PROJECT_NAME"]
            assert "portalloc-test-busybox" in http_get(db)
            why = portalloc("why", str(web), cwd=top, env=base_env).stdout
            assert f"session {tree} as web" in why
            assert f"published by compose project {variables['COMPOSE_PROJECT_NAME']}" in why
        ports = [int(v[name]) for v in leased for name in ("WEB_PORT", "DB_PORT")]
        assert len(set(ports)) == 6
        assert len({v["COMPOSE_PROJECT_NAME"] for v in leased}) == 3
        # `status` lists the three leases and no orphan: every worktree exists.
        status = portalloc("status", cwd=top, env={**base_env, "COLUMNS": "200"}).stdout
        assert "orphaned" not in status


# --- release and env with the stack up: the block stays ------------------------------

# Each mapping kind as a compose `ports:` list, and the profile's named ports.
MAPPINGS = {
    # Host port equal to the container port, two neighbours: docker shows them as one
    # range, `0.0.0.0:P-Q->P-Q/tcp` (the ADMIN_9000_PORT case).
    "host-equals-container": (
        [
            '"${ADMIN_PORT:-9000}:${ADMIN_PORT:-9000}"',
            '"${ADMIN2_PORT:-9001}:${ADMIN2_PORT:-9001}"',
        ],
        "[ports]\nadmin = 0\nadmin2 = 1\n",
    ),
    "port-range": (
        ['"${FIRST_PORT:-7000}-${SECOND_PORT:-7001}:7000-7001"'],
        "[ports]\nfirst = 0\nsecond = 1\n",
    ),
    "ipv4-only": (['"127.0.0.1:${WEB_PORT:-8080}:80"'], "[ports]\nweb = 0\n"),
    "ipv6": (['"[::1]:${WEB_PORT:-8080}:80"'], "[ports]\nweb = 0\n"),
    "both-families": (['"${WEB_PORT:-8080}:80"'], "[ports]\nweb = 0\n"),
}


def mapping_stack(ports: list[str]) -> str:
    lines = "".join(f"      - {port}\n" for port in ports)
    return (
        "services:\n  app:\n    image: portalloc-test-busybox\n"
        '    command: ["httpd", "-f", "-p", "80", "-h", "/www"]\n'
        f"    ports:\n{lines}"
    )


@pytest.mark.parametrize("kind", list(MAPPINGS))
def test_release_and_env_with_the_stack_up_keep_the_block(
    kind: str, tmp_path: Path, daemon: Docker, free_block: Block
) -> None:
    if kind == "ipv6" and not daemon.userland_proxy:
        pytest.skip("without the userland proxy, dockerd 20.10 publishes no IPv6 address")
    if kind == "ipv6" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    ports, profile = MAPPINGS[kind]
    top = repo(tmp_path, mapping_stack(ports), profile)
    base_env = daemon.environ(**free_block.env)
    variables, _ = lease(top, base_env)
    numbers = sorted(int(value) for name, value in variables.items() if name.endswith("_PORT"))
    with compose_up(daemon, top, {**base_env, **variables}) as up:
        assert up.returncode == 0, up.stderr
        wait_busy(*numbers)
        portalloc("release", str(top), cwd=top, env=base_env)
        again, said = lease(top, base_env)
        assert "MOVED" not in said and "skipped" not in said, said
        assert again == variables


def test_another_projects_container_on_the_block_is_foreign(
    tmp_path: Path, daemon: Docker, free_block: Block
) -> None:
    top = repo(tmp_path)
    base_env = daemon.environ(**free_block.env)
    variables, _ = lease(top, base_env)
    web = int(variables["WEB_PORT"])
    portalloc("release", str(top), cwd=top, env=base_env)
    # Another project's stack (another checkout of the same files) on the web port.
    other = tmp_path / "other"
    other.mkdir()
    (other / "compose.yaml").write_text(STACK)
    intruder = {**base_env, **variables, "COMPOSE_PROJECT_NAME": "intruder", "DB_PORT": "0"}
    with compose_up(daemon, other, intruder) as up:
        assert up.returncode == 0, up.stderr
        wait_busy(web)
        moved, said = lease(top, base_env)
        assert int(moved["WEB_PORT"]) != web
        line = next(line for line in said.splitlines() if "MOVED" in line)
        holder = "docker-proxy" if daemon.userland_proxy else "dockerd"
        assert f"port {web} (web) is in use by pid " in line and f"/{holder} " in line
        # The holder's command line is cut at a whole argument, never after a bare `--`.
        pid, shown = re.findall(r"pid (\d+) \((.*?)\)(?:, |$)", line)[0]
        assert_whole_arguments(int(pid), shown)
        why = portalloc("why", str(web), cwd=top, env=base_env).stdout
        for pid, shown in re.findall(r"listening: pid (\d+) (.*)", why):
            assert_whole_arguments(int(pid), shown)
        assert "published by compose project intruder" in why


def assert_whole_arguments(pid: int, shown: str) -> None:
    """SHOWN is PID's command line, or its first whole arguments and " …"."""
    import psutil

    full = " ".join(psutil.Process(pid).cmdline())
    if shown != full:
        assert shown.endswith(" …"), shown
        assert full.startswith(shown[:-2]) and full[len(shown) - 2] == " ", shown


def test_a_long_command_line_is_cut_at_a_whole_argument() -> None:
    from portalloc.host import shorten

    line = "/usr/sbin/dockerd --data-root=/tmp/pa-docker-x/data --exec-root=/tmp/x --host=unix://y"
    for limit in range(10, len(line) + 1):
        cut = shorten(line, limit)
        assert len(cut) <= limit
        if cut != line:
            assert cut.endswith(" …") and line.startswith(cut[:-2])
            # A whole argument, then the mark (a first argument longer than LIMIT is cut).
            assert line[len(cut) - 2] == " " or " " not in cut[:-2]
    assert shorten(line, len(line)) == line


# --- check --wait: "the service answers" -----------------------------------------------

DELAYED = """\
services:
  web:
    image: portalloc-test-busybox
    command: ["sh", "-c", "sleep 4 && exec httpd -f -p 80 -h /www"]
    ports:
      - "${WEB_PORT:-8080}:80"
"""


def test_check_wait_waits_for_the_service_behind_the_proxy(
    tmp_path: Path, docker: Docker, base_env: dict[str, str]
) -> None:
    top = repo(tmp_path, DELAYED, "[ports]\nweb = 0\n")
    variables, _ = lease(top, base_env)
    web = int(variables["WEB_PORT"])
    with compose_up(docker, top, {**base_env, **variables}) as up:
        assert up.returncode == 0, up.stderr
        wait_busy(web)  # docker-proxy holds the port: a TCP connect succeeds ...
        with socket.create_connection(("127.0.0.1", web), timeout=2):
            pass
        now = portalloc("check", cwd=top, env=base_env)
        assert now.stdout.split() == ["web", str(web), "closed"]  # ... but nothing answers
        started = time.monotonic()
        waited = portalloc("check", "--wait", "60", "--port", "web", cwd=top, env=base_env)
        assert time.monotonic() - started > 1.5
        assert waited.stdout.split() == ["web", str(web), "listening"]
        assert "portalloc-test-busybox" in http_get(web, timeout=2)  # at once, no retry


@contextmanager
def server(behaviour: str) -> Iterator[int]:
    """A loopback server that accepts and then closes, stays silent, or speaks first."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if behaviour == "close":
                conn.close()
            elif behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                conn.close()
            else:
                if behaviour == "banner":
                    conn.sendall(b"220 ready\r\n")
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        # shutdown wakes the thread's accept (close alone would not), so every
        # connection it took is in HELD before they are closed.
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        thread.join(10)
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize(
    ("behaviour", "answers"),
    [("close", False), ("reset", False), ("silent", True), ("banner", True)],
)
def test_a_port_answers_only_when_the_connection_survives(behaviour: str, answers: bool) -> None:
    """No daemon needed: what docker-proxy does with nothing behind it (accept, then
    close or reset) is not an answer; a server waiting for a request, or greeting
    first, is."""
    from portalloc.probe import answering

    with server(behaviour) as port:
        assert answering([port]) == {port: answers}


# --- orphans: a worktree removed while its stack is up --------------------------------


def test_an_orphaned_stack_is_named_and_stopped_by_prune_stop(
    tmp_path: Path, docker: Docker, base_env: dict[str, str]
) -> None:
    top = repo(tmp_path)
    tree = worktree(top, "feat-a")
    variables, _ = lease(tree, base_env)
    project = variables["COMPOSE_PROJECT_NAME"]
    ports = f"{variables['WEB_PORT']}, {variables['DB_PORT']}"
    env = {**base_env, **variables}
    with compose_up(docker, tree, env) as up:
        assert up.returncode == 0, up.stderr
        wait_busy(int(variables["WEB_PORT"]), int(variables["DB_PORT"]))
        # The worktree goes while its stack runs (the README says: down first).
        subprocess.run(
            ["git", "-C", str(top), "worktree", "remove", "--force", str(tree)], check=True
        )
        status = portalloc("status", cwd=top, env={**base_env, "COLUMNS": "200"}).stdout
        assert f"orphaned stack {project} (worktree {tree} is gone): ports {ports}" in status
        pruned = portalloc("prune", cwd=top, env=base_env).stdout
        assert f"orphaned stack {project}" in pruned and "prune --stop" in pruned
        assert docker("ps", "-q", "--filter", f"label=com.docker.compose.project={project}").stdout
        listed: dict[str, Any] = json.loads(
            portalloc("prune", "--json", cwd=top, env=base_env).stdout
        )
        mine = [o for o in listed["orphans"] if o["compose_project"] == project]
        assert mine and mine[0]["ports"] == sorted(
            [int(variables["WEB_PORT"]), int(variables["DB_PORT"])]
        )
        assert mine[0]["stopped"] is False
        stopped = portalloc("prune", "--stop", cwd=top, env=base_env)
        assert (
            f"stopped orphaned stack {project} (worktree {tree} is gone): "
            f"`docker compose -p {project} down` freed ports {ports}"
        ) in stopped.stdout
        left = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}")
        assert left.stdout.strip() == ""
        assert port_is_free(int(variables["WEB_PORT"]))
        again = portalloc("prune", cwd=top, env=base_env).stdout
        assert project not in again


def test_prune_names_no_orphan_without_docker(tmp_path: Path) -> None:
    """No docker on PATH: status and prune work as before and name nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git",):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir)}
    pruned = portalloc("prune", cwd=tmp_path, env=env)
    assert pruned.stdout == "nothing to reclaim\n"
    assert json.loads(portalloc("prune", "--json", cwd=tmp_path, env=env).stdout)["orphans"] == []


# --- docker's CLI against another engine -------------------------------------------

# What `docker` answers against Podman 4.3's service (checked by hand here: the ports
# are held by conmon, `--filter publish=` is refused, and `docker ps` shows some
# published ports without their host side); inspect still has every binding.
FAKE_DOCKER = r"""#!/bin/sh
case "$*" in
*publish=*) echo "Error response from daemon: publish is an invalid filter" >&2; exit 1 ;;
"ps --quiet --no-trunc --filter label=com.docker.compose.project=shop-1") echo c1 ;;
"ps --quiet --no-trunc --filter label=com.docker.compose.project") echo c1 ;;
"ps --quiet --no-trunc --filter label=com.docker.compose.project="*) ;;
"inspect c1") cat "$(dirname "$0")/inspect.json" ;;
*) exit 1 ;;
esac
"""


def test_without_the_publish_filter_docker_inspect_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from portalloc.host import Stack, compose_publishes, compose_stacks

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    gone = tmp_path / "shop-feat-a"
    bindings = {
        "80/tcp": [{"HostIp": "", "HostPort": "21412"}],
        "21402/tcp": [{"HostIp": "", "HostPort": "21402"}, {"HostIp": "::", "HostPort": "21402"}],
        "21403/tcp": [{"HostIp": "127.0.0.1", "HostPort": "21403"}],
        "9000/tcp": None,  # exposed, not published
    }
    labels = {
        "com.docker.compose.project": "shop-1",
        "com.docker.compose.project.working_dir": str(gone),
    }
    record = {"Id": "c1", "Name": "/shop-1-web-1", "Config": {"Labels": labels}}
    record["NetworkSettings"] = {"Ports": bindings}
    (bin_dir / "inspect.json").write_text(json.dumps([record]))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert compose_publishes("shop-1", 21403) and compose_publishes("shop-1", 21412)
    assert not compose_publishes("shop-1", 9000) and not compose_publishes("other", 21403)
    assert compose_stacks() == [
        Stack("shop-1", str(gone), (21402, 21403, 21412), ("shop-1-web-1",))
    ]
    # A label compose would never write (`docker compose -p Shop-1` acts on `shop-1`)
    # is no compose project: left out.
    labels["com.docker.compose.project"] = "Shop-1"
    (bin_dir / "inspect.json").write_text(json.dumps([record]))
    assert compose_stacks() == []

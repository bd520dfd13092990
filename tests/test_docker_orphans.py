"""Which compose stacks are orphans `prune --stop` may stop, against a real Docker
daemon and Compose v2 (tests/docker_env.py), and the rule itself (portalloc.orphans).

Stopping a stack is for good: a stack is an orphan only when this ledger leased for
its worktree, portalloc named its project, the worktree is gone (not moved), and it
publishes on this machine. Docker's labels are anyone's text: a label compose would
never write is no project, and every label is escaped before it reaches a terminal.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from portalloc import orphans
from portalloc.host import Stack, compose_down
from tests.docker_env import Docker, compose_up
from tests.helpers import FreeBlock
from tests.test_docker import STACK, lease, portalloc, repo, wait_busy, worktree

NETWORK = "portalloc-test-labelled"
BUSYBOX_HTTPD = ("portalloc-test-busybox", "httpd", "-f", "-p", "80", "-h", "/www")


@pytest.fixture
def shell_env(free_block: FreeBlock, docker: Docker) -> dict[str, str]:
    """A user's shell: the private ledger's settings and the run's docker daemon."""
    return docker.environ(**free_block.env)


def running(docker: Docker, project: str) -> list[str]:
    """The running containers docker labels with compose project PROJECT."""
    listed = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={project}")
    return listed.stdout.split()


def labelled_container(docker: Docker, project: str, working_dir: str, port: int) -> str:
    """A container that only says it belongs to a compose project (`docker run` with
    compose's labels), publishing PORT: what anyone may start."""
    # The run's daemon has no default bridge: a network of its own to publish from.
    docker("network", "create", NETWORK, check=False)
    started = docker(
        "run",
        "-d",
        "--network",
        NETWORK,
        "--label",
        f"com.docker.compose.project={project}",
        "--label",
        f"com.docker.compose.project.working_dir={working_dir}",
        "-p",
        f"{port}:80",
        *BUSYBOX_HTTPD,
    )
    container = started.stdout.strip()
    wait_busy(port)
    return container


# --- F3: a label that is no compose project name ----------------------------------


def test_a_label_compose_would_never_write_is_not_stopped_and_spares_the_live_project(
    tmp_path: Path, docker: Docker, shell_env: dict[str, str], free_block: FreeBlock
) -> None:
    """Compose v2 lower-cases `-p`: `docker compose -p Victim down` took down the live
    project `victim`. A container labelled `Victim` is no compose project: never named
    an orphan, never stopped, and `victim` runs on."""
    live = tmp_path / "victim"
    live.mkdir()
    (live / "compose.yaml").write_text(STACK)
    env = {
        **shell_env,
        "COMPOSE_PROJECT_NAME": "victim",
        "WEB_PORT": str(free_block.start + 50),
        "DB_PORT": str(free_block.start + 51),
    }
    with compose_up(docker, live, env) as up:
        assert up.returncode == 0, up.stderr
        wait_busy(free_block.start + 50)
        fake = labelled_container(docker, "Victim", "/gone", free_block.start + 52)
        try:
            status = portalloc("status", cwd=tmp_path, env=shell_env).stdout
            assert "Victim" not in status and "orphan" not in status
            stopped = portalloc("prune", "--stop", cwd=tmp_path, env=shell_env)
            assert "Victim" not in stopped.stdout + stopped.stderr
            assert stopped.stdout == "nothing to reclaim\n"
            assert running(docker, "victim"), "the live project was taken down"
            assert fake[:12] in docker("ps", "-q").stdout
        finally:
            docker("rm", "-f", fake, check=False)
    # Never asked of docker, whoever calls: compose would act on `victim`.
    assert compose_down("Victim") == "Victim is no compose project name"


# --- F3: `down` said it worked, and the stack is still there ------------------------


def test_prune_stop_says_what_down_left_running_and_exits_1(
    tmp_path: Path, docker: Docker, shell_env: dict[str, str]
) -> None:
    """A container with the orphan's project label that compose does not take for one
    of its own (no service label): `docker compose -p NAME down` exits 0 and leaves it.
    prune --stop checks, says so and exits 1, instead of "stopped ... freed ports"."""
    top = repo(tmp_path)
    tree = worktree(top, "feat-a")
    variables, _ = lease(tree, shell_env)
    project, web = variables["COMPOSE_PROJECT_NAME"], int(variables["WEB_PORT"])
    container = labelled_container(docker, project, str(tree), web)
    try:
        subprocess.run(["git", "-C", str(top), "worktree", "remove", str(tree)], check=True)
        named = portalloc("prune", cwd=top, env=shell_env).stdout
        assert f"orphaned stack {project} (worktree {tree} is gone): ports {web}" in named
        stopped = portalloc("prune", "--stop", cwd=top, env=shell_env, check=False)
        assert stopped.returncode == 1
        assert "freed" not in stopped.stdout
        assert f"orphaned stack {project} (worktree {tree} is gone): not stopped" in stopped.stdout
        name = docker("inspect", "--format", "{{.Name}}", container).stdout.strip().lstrip("/")
        assert (
            f"could not stop {project}: `docker compose -p {project} down` left its "
            f"containers running: {name}"
        ) in stopped.stderr
        as_json = portalloc("prune", "--stop", "--json", cwd=top, env=shell_env, check=False)
        assert as_json.returncode == 1
        listed = json.loads(as_json.stdout)
        assert listed["success"] is False and listed["orphans"][0]["stopped"] is False
        assert running(docker, project)
    finally:
        docker("rm", "-f", container, check=False)


# --- F6: only a stack this ledger knows, of a worktree that is gone --------------------


@pytest.mark.parametrize("how", ["git worktree move", "mv"])
def test_a_moved_worktrees_stack_is_no_orphan(
    how: str, tmp_path: Path, docker: Docker, shell_env: dict[str, str]
) -> None:
    top = repo(tmp_path)
    tree = worktree(top, "feat-a")
    variables, _ = lease(tree, shell_env)
    project = variables["COMPOSE_PROJECT_NAME"]
    env = {**shell_env, **variables}
    with compose_up(docker, tree, env) as up:
        assert up.returncode == 0, up.stderr
        wait_busy(int(variables["WEB_PORT"]))
        moved = tmp_path / "shop-renamed"
        if how == "mv":
            tree.rename(moved)
        else:
            subprocess.run(
                ["git", "-C", str(top), "worktree", "move", str(tree), str(moved)], check=True
            )
        try:
            status = portalloc("status", cwd=top, env={**shell_env, "COLUMNS": "200"}).stdout
            assert "orphan" not in status
            stopped = portalloc("prune", "--stop", cwd=top, env=shell_env)
            assert project not in stopped.stdout
            assert running(docker, project), "a moved worktree's live stack was stopped"
            why = portalloc("why", variables["WEB_PORT"], cwd=top, env=shell_env).stdout
            assert f"published by compose project {project} (started in {tree})" in why
        finally:
            moved.rename(tree)  # for compose_up's `down` in it


def test_a_stack_portalloc_did_not_name_is_no_orphan(
    tmp_path: Path, docker: Docker, shell_env: dict[str, str]
) -> None:
    """The worktree had a lease, but its stack ran under compose's default name (the
    directory's): not a stack of portalloc's, never stopped by it."""
    top = repo(tmp_path)
    tree = worktree(top, "feat-a")
    variables, _ = lease(tree, shell_env)
    env = {**shell_env, **variables, "COMPOSE_PROJECT_NAME": "shop-feat-a"}
    with compose_up(docker, tree, env) as up:
        assert up.returncode == 0, up.stderr
        wait_busy(int(variables["WEB_PORT"]))
        subprocess.run(
            ["git", "-C", str(top), "worktree", "remove", "--force", str(tree)], check=True
        )
        assert "orphan" not in portalloc("status", cwd=top, env=shell_env).stdout
        stopped = portalloc("prune", "--stop", cwd=top, env=shell_env)
        assert "shop-feat-a" not in stopped.stdout
        assert running(docker, "shop-feat-a")


# --- F4: docker's labels reach no terminal raw ---------------------------------------

HOSTILE = "\x1b]0;owned\x07\x1b[2J\u202e"


def test_labels_are_escaped_in_status_prune_and_why(
    tmp_path: Path, docker: Docker, shell_env: dict[str, str], free_block: FreeBlock
) -> None:
    top = repo(tmp_path)
    tree = worktree(top, "feat-a")
    variables, _ = lease(tree, shell_env)
    project, web = variables["COMPOSE_PROJECT_NAME"], int(variables["WEB_PORT"])
    # Compose run in a directory below the worktree top, named with escapes.
    workdir = f"{tree}/{HOSTILE}"
    orphan = labelled_container(docker, project, workdir, web)
    stranger_port = free_block.start + 60
    stranger = labelled_container(docker, "stranger", f"/srv/{HOSTILE}", stranger_port)
    try:
        subprocess.run(["git", "-C", str(top), "worktree", "remove", str(tree)], check=True)
        shown = repr(HOSTILE)[1:-1]
        for command in (("status",), ("prune",), ("prune", "--stop"), ("why", str(web))):
            result = portalloc(*command, cwd=top, env={**shell_env, "COLUMNS": "300"}, check=False)
            assert "\x1b" not in result.stdout + result.stderr, command
            assert "\u202e" not in result.stdout + result.stderr, command
            assert f"{tree}/{shown}" in result.stdout, (command, result.stdout)
        why = portalloc("why", str(stranger_port), cwd=top, env=shell_env).stdout
        assert "\x1b" not in why
        assert f"published by compose project stranger (started in /srv/{shown})" in why
    finally:
        docker("rm", "-f", orphan, stranger, check=False)


# --- the rule, without docker ---------------------------------------------------------


def portalloc_name(session: str, prefix: str = "ac", length: int = 8) -> str:
    return f"{prefix}-{hashlib.sha256(session.encode()).hexdigest()[:length]}"


def test_the_orphan_rule(tmp_path: Path) -> None:
    gone = str(tmp_path / "shop-feat-a")
    stack = Stack(portalloc_name(gone), gone, (21402, 21403), ("web-1",))
    blocks = range(21400, 21500)
    known = frozenset({gone})

    def here(_port: int) -> bool:
        return True  # something holds the port on this machine

    assert orphans.find([stack], known, blocks, busy=here) == [stack]
    # Any prefix, a longer hash (a clash), compose run below the worktree top.
    longer = stack._replace(project=portalloc_name(gone, "shop", 12))
    below = stack._replace(working_dir=f"{gone}/deploy")
    assert orphans.find([longer, below], known, blocks, busy=here) == [longer, below]
    # Not portalloc's name for the session; a session the ledger never knew.
    for project in ("shop-feat-a", portalloc_name(gone + "x"), "ac-zzzzzzzz", "ac-1234567"):
        assert orphans.find([stack._replace(project=project)], known, blocks, busy=here) == []
    assert orphans.find([stack], frozenset({"other"}), blocks, busy=here) == []
    # Published on another machine (a docker context): nothing holds its ports here.
    assert orphans.find([stack], known, blocks, busy=lambda _port: False) == []
    # Only ports in portalloc's blocks count.
    assert orphans.find([stack._replace(ports=(30000,))], known, blocks, busy=here) == []
    # The worktree exists; a relative or missing working_dir.
    Path(gone).mkdir()
    assert orphans.find([stack], known, blocks, busy=here) == []
    Path(gone).rmdir()
    for workdir in (None, "shop-feat-a"):
        assert orphans.find([stack._replace(working_dir=workdir)], known, busy=here) == []


def test_git_that_still_lists_the_worktree_keeps_its_stack(tmp_path: Path) -> None:
    """Moved with `mv` (or deleted by hand): git still lists it; moved with `git
    worktree move`: git lists it elsewhere under the name it gave it. Removed with
    `git worktree remove`: an orphan."""
    top = repo(tmp_path, "services: {}\n")
    trees = {name: worktree(top, name) for name in ("by-mv", "by-git", "removed")}
    trees["by-mv"].rename(tmp_path / "far-away")
    git = ["git", "-C", str(top), "worktree"]
    subprocess.run([*git, "move", str(trees["by-git"]), str(tmp_path / "elsewhere")], check=True)
    subprocess.run([*git, "remove", str(trees["removed"])], check=True)
    stacks = [
        Stack(portalloc_name(str(tree)), str(tree), (21400 + i,), ())
        for i, tree in enumerate(trees.values())
    ]
    sessions = frozenset(str(tree) for tree in trees.values())
    found = orphans.find(stacks, sessions, busy=lambda _port: True)
    assert [stack.working_dir for stack in found] == [str(trees["removed"])]
    # Deleted by hand: `git worktree prune` lets git forget it, and it is an orphan.
    shutil.rmtree(tmp_path / "far-away")
    subprocess.run([*git, "prune"], check=True)
    found = orphans.find(stacks, sessions, busy=lambda _port: True)
    assert [stack.working_dir for stack in found] == [str(trees["by-mv"]), str(trees["removed"])]

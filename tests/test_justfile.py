"""The justfile's recipes, run with the real `just` in a throwaway git repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Result, run_process

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `just` (rust-just) and `portalloc`
JUST = BIN / "just"
PORT_VARS = (
    "AGENT_COORDINATOR_DB_PORT",
    "AGENT_COORDINATOR_REST_PORT",
    "AGENT_COORDINATOR_REALTIME_PORT",
    "API_PORT",
)
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "portalloc tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "portalloc tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
}


def tool_env(**extra: str) -> dict[str, str]:
    """The test's environment (its private PORTALLOC_STATE_DIR) with the venv's bin first."""
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return {**os.environ, **GIT_IDENTITY, "PATH": path, **extra}


def run(*args: str | Path, cwd: Path, env: dict[str, str], timeout: float = 60) -> Result:
    return run_process(list(args), env=env, cwd=cwd, timeout=timeout)


def ok(*args: str | Path, cwd: Path, env: dict[str, str]) -> str:
    result = run(*args, cwd=cwd, env=env)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def env() -> dict[str, str]:
    # The bind probe adds nothing here: the ledger is private, so the blocks are predictable.
    return tool_env(PORTALLOC_SKIP_PORT_CHECK="1")


def make_repo(parent: Path, env: dict[str, str], *extra_files: str) -> Path:
    """A fresh git repo holding a copy of the justfile (and EXTRA_FILES), committed."""
    repo = parent / "my repo"  # a space: the recipes must quote every path
    repo.mkdir()
    ok("git", "init", "-q", "-b", "main", cwd=repo, env=env)
    shutil.copy(ROOT / "justfile", repo / "justfile")
    shutil.copy(ROOT / "worktree.just", repo / "worktree.just")
    for name in extra_files:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name)
        else:
            shutil.copy(source, repo / name)
    ok("git", "add", "-A", cwd=repo, env=env)
    ok("git", "commit", "-q", "-m", "initial", cwd=repo, env=env)
    return repo.resolve()


@pytest.fixture
def repo(tmp_path: Path, env: dict[str, str]) -> Path:
    return make_repo(tmp_path, env)


def leases(cwd: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    data = json.loads(ok("portalloc", "status", "--json", cwd=cwd, env=env))
    assert isinstance(data, list)
    return {lease["session_id"]: lease for lease in data}


def ports(lease: dict[str, Any]) -> tuple[int, ...]:
    return tuple(lease[f"{name}_port"] for name in ("db", "rest", "realtime", "api"))


def env_block(text: str) -> dict[str, str]:
    pairs = (line.removeprefix("export ").split("=", 1) for line in text.splitlines())
    return {name: value for name, value in pairs}


def test_two_worktrees_get_their_own_stable_ports(repo: Path, env: dict[str, str]) -> None:
    out_a = ok(JUST, "worktree-new", "feat-a", cwd=repo, env=env)
    out_b = ok(JUST, "worktree-new", "feat-b", cwd=repo, env=env)
    tree_a = repo.parent / "my repo-feat-a"
    tree_b = repo.parent / "my repo-feat-b"
    assert tree_a.is_dir() and tree_b.is_dir()
    branches = ok("git", "branch", "--format=%(refname:short)", cwd=repo, env=env).split()
    assert {"feat-a", "feat-b"} <= set(branches)

    # The lease is keyed by the worktree path, the same session `portalloc env` uses inside it.
    active = leases(repo, env)
    lease_a, lease_b = active[str(tree_a)], active[str(tree_b)]
    assert lease_a["worktree"] == str(tree_a)
    assert not set(ports(lease_a)) & set(ports(lease_b))
    assert lease_a["compose_project_name"] != lease_b["compose_project_name"]

    # worktree-new prints the URLs of the worktree's ports.
    for out, lease in ((out_a, lease_a), (out_b, lease_b)):
        for port in ports(lease):
            assert f"http://localhost:{port}" in out

    # The manifest holds the allocation, and git ignores it.
    for tree, lease in ((tree_a, lease_a), (tree_b, lease_b)):
        manifest = json.loads((tree / ".worktree-ports.json").read_text(encoding="utf-8"))
        assert ports(manifest) == ports(lease)
        assert manifest["session_id"] == str(tree)
        assert ok("git", "status", "--porcelain", cwd=tree, env=env) == ""

    # worktree-env prints the worktree's variables; inside the worktree `portalloc env` agrees.
    block_a = env_block(ok(JUST, "worktree-env", "feat-a", cwd=repo, env=env))
    assert [block_a[name] for name in PORT_VARS] == [str(port) for port in ports(lease_a)]
    assert block_a["COMPOSE_PROJECT_NAME"] == lease_a["compose_project_name"]
    assert env_block(ok("portalloc", "env", cwd=tree_a, env=env)) == block_a
    as_json = json.loads(ok(JUST, "worktree-env", "feat-b", "--format", "json", cwd=repo, env=env))
    assert as_json["API_PORT"] == str(lease_b["api_port"])

    # Release both, re-allocate in the other order: each worktree gets its own block back.
    ok("portalloc", "release", tree_a, cwd=repo, env=env)
    ok("portalloc", "release", tree_b, cwd=repo, env=env)
    assert leases(repo, env) == {}
    ok(JUST, "worktree-new", "feat-b", cwd=repo, env=env)  # reuses the existing worktree
    ok(JUST, "worktree-new", "feat-a", cwd=repo, env=env)
    again = leases(repo, env)
    assert ports(again[str(tree_a)]) == ports(lease_a)
    assert ports(again[str(tree_b)]) == ports(lease_b)

    # worktree-remove releases the lease and removes the worktree; the other one stays.
    ok(JUST, "worktree-remove", "feat-a", cwd=repo, env=env)
    assert not tree_a.exists()
    assert set(leases(repo, env)) == {str(tree_b)}
    assert str(tree_a) not in ok("git", "worktree", "list", cwd=repo, env=env)
    assert tree_b.is_dir()


def test_worktree_remove_of_a_dirty_worktree_keeps_it_and_its_lease(
    repo: Path, env: dict[str, str]
) -> None:
    ok(JUST, "worktree-new", "feat-a", cwd=repo, env=env)
    tree = repo.parent / "my repo-feat-a"
    before = leases(repo, env)[str(tree)]
    (tree / "notes.txt").write_text("work in progress\n")  # untracked: git refuses
    refused = run(JUST, "worktree-remove", "feat-a", cwd=repo, env=env)
    assert refused.returncode != 0
    assert "released" not in refused.stdout + refused.stderr
    assert "its lease stays" in refused.stderr
    # Nothing changed: the worktree, its manifest and its lease are as they were.
    assert (tree / "notes.txt").exists() and (tree / ".worktree-ports.json").exists()
    after = leases(repo, env)[str(tree)]
    assert (ports(after), after["block_start"]) == (ports(before), before["block_start"])
    assert str(tree) in ok("git", "worktree", "list", cwd=repo, env=env)
    # --force goes to git; then (and only then) the lease is released.
    out = ok(JUST, "worktree-remove", "feat-a", "--force", cwd=repo, env=env)
    assert "released its ports" in out
    assert not tree.exists() and leases(repo, env) == {}


def test_worktree_remove_of_a_worktree_already_gone(repo: Path, env: dict[str, str]) -> None:
    ok(JUST, "worktree-new", "feat-a", cwd=repo, env=env)
    tree = repo.parent / "my repo-feat-a"
    shutil.rmtree(tree)
    out = ok(JUST, "worktree-remove", "feat-a", cwd=repo, env=env)
    assert "already gone" in out
    assert leases(repo, env) == {}
    assert str(tree) not in ok("git", "worktree", "list", cwd=repo, env=env)


def test_worktree_remove_of_a_worktree_that_never_was(repo: Path, env: dict[str, str]) -> None:
    result = run(JUST, "worktree-remove", "never-was", cwd=repo, env=env)
    assert result.returncode == 1
    tree = repo.parent / "my repo-never-was"
    assert f"there is no worktree {tree} (nothing to remove, no ports to release)" in result.stderr
    assert "released" not in result.stdout + result.stderr.replace("no ports to release", "")


def test_worktree_remove_quotes_the_branch_in_its_hint(repo: Path, env: dict[str, str]) -> None:
    name = "o'neil$x"
    ok(JUST, "worktree-new", name, cwd=repo, env=env)
    out = ok(JUST, "worktree-remove", name, cwd=repo, env=env)
    hint = out.split("git branch -d ", 1)[1].removesuffix(" deletes it)\n")
    assert hint == "o\\'neil\\$x"
    # The hint, pasted into a shell, deletes that branch and no other.
    ok("bash", "-c", f"git branch -d {hint}", cwd=repo, env=env)
    assert ok("git", "branch", "--list", name, cwd=repo, env=env) == ""


def test_branches_that_share_a_directory_are_refused(repo: Path, env: dict[str, str]) -> None:
    """`feat/x` and `feat-x` both map to ../<repo>-feat-x: the second is refused, and
    the first one's worktree, branch and lease stay as they were."""
    ok(JUST, "worktree-new", "feat/x", cwd=repo, env=env)
    tree = repo.parent / "my repo-feat-x"
    before = {session: ports(lease) for session, lease in leases(repo, env).items()}
    refused = run(JUST, "worktree-new", "feat-x", cwd=repo, env=env)
    assert refused.returncode == 1
    assert (
        f"worktree-new: {tree} holds branch feat/x, not branch feat-x (branch names that "
        "differ only in / and - share a directory); pick another NAME"
    ) in refused.stderr
    assert ok("git", "branch", "--list", "feat-x", cwd=repo, env=env) == ""
    assert {session: ports(lease) for session, lease in leases(repo, env).items()} == before
    # The branch it holds reuses it, as before.
    again = run(JUST, "worktree-new", "feat/x", cwd=repo, env=env)
    assert again.returncode == 0 and "reusing the existing worktree" in again.stderr
    # A detached HEAD is no branch of that name either.
    ok("git", "checkout", "-q", "--detach", cwd=tree, env=env)
    detached = run(JUST, "worktree-new", "feat/x", cwd=repo, env=env)
    assert (
        detached.returncode == 1 and "holds a detached HEAD, not branch feat/x" in detached.stderr
    )
    # examples/new-worktree.sh refuses the same way.
    shutil.copytree(ROOT / "examples", repo / "examples")
    script = run("bash", repo / "examples" / "new-worktree.sh", "feat-x", cwd=repo, env=env)
    assert script.returncode == 1 and "holds a detached HEAD, not branch feat-x" in script.stderr


def test_worktree_new_checks_out_an_existing_branch(repo: Path, env: dict[str, str]) -> None:
    ok("git", "branch", "already-there", cwd=repo, env=env)
    ok(JUST, "worktree-new", "already-there", cwd=repo, env=env)
    tree = repo.parent / "my repo-already-there"
    head = ok("git", "rev-parse", "--abbrev-ref", "HEAD", cwd=tree, env=env)
    assert head.strip() == "already-there"


def test_worktree_new_from_a_linked_worktree_lands_beside_the_main_one(
    repo: Path, env: dict[str, str]
) -> None:
    ok(JUST, "worktree-new", "feat-a", cwd=repo, env=env)
    ok(JUST, "worktree-new", "feat-c", cwd=repo.parent / "my repo-feat-a", env=env)
    assert (repo.parent / "my repo-feat-c").is_dir()


def test_worktree_new_rejects_a_bad_branch_name(repo: Path, env: dict[str, str]) -> None:
    result = run(JUST, "worktree-new", "bad..name", cwd=repo, env=env)
    assert result.returncode != 0
    assert "not a valid branch name" in result.stderr
    assert leases(repo, env) == {}


def test_worktree_env_of_a_missing_worktree_fails(repo: Path, env: dict[str, str]) -> None:
    result = run(JUST, "worktree-env", "nope", cwd=repo, env=env)
    assert result.returncode != 0
    assert "just worktree-new nope" in result.stderr
    assert leases(repo, env) == {}


def test_every_recipe_is_documented(env: dict[str, str]) -> None:
    recipes = ok(JUST, "--summary", cwd=ROOT, env=env).split()
    expected = {"test", "lint", "bench", "sync-skills", "worktree-new", "worktree-remove"}
    assert expected | {"worktree-env", "worktree-serve"} <= set(recipes)
    listing = ok(JUST, "--list", cwd=ROOT, env=env).splitlines()[1:]
    documented: dict[str, str] = {}
    for line in listing:
        match = re.fullmatch(r"\s+(\S+)[^#]*#\s*(\S.*)", line)
        assert match, f"recipe without a description: {line!r}"
        documented[match.group(1)] = match.group(2)
    assert set(documented) == set(recipes)


def test_sync_skills_reproduces_the_committed_copies(tmp_path: Path, env: dict[str, str]) -> None:
    repo = make_repo(tmp_path, env, "skills")
    stale = repo / ".claude" / "skills" / "retired" / "SKILL.md"
    stale.parent.mkdir(parents=True)
    stale.write_text("---\nname: retired\n---\n")

    ok(JUST, "sync-skills", cwd=repo, env=env)

    def tree(directory: Path) -> dict[str, bytes]:
        return {
            path.relative_to(directory).as_posix(): path.read_bytes()
            for path in directory.rglob("*")
            if path.is_file()
        }

    for client in (".claude", ".codex", ".gemini"):
        assert tree(repo / client / "skills") == tree(ROOT / client / "skills"), client
    assert not stale.exists()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], subprocess.Popen[str]]]:
    """`just worktree-serve` running in a repo whose profile has only the `api` port."""
    # A real listener needs a free port, so the bind probe stays on here.
    env = tool_env(PORTALLOC_API_KEY="test-key")
    repo = make_repo(tmp_path, env)
    (repo / "portalloc.toml").write_text("[ports]\napi = 0\n")
    # Lease before the recipe starts, so `check --wait` has a session to wait on; the recipe
    # reuses this lease.
    ok("portalloc", "env", "--worktree", repo, cwd=repo, env=env)
    proc = subprocess.Popen(
        [str(JUST), "worktree-serve"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # just, bash and the server form one group to stop together
    )
    try:
        yield repo, env, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)


def test_worktree_serve_listens_on_the_worktrees_api_port(
    served: tuple[Path, dict[str, str], subprocess.Popen[str]],
) -> None:
    repo, env, proc = served
    up = run("portalloc", "check", "--wait", "60", repo, cwd=repo, env=env)
    if up.returncode != 0:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        pytest.fail(f"worktree-serve did not come up:\n{up.stderr}\n{output}")
    port = int(ok("portalloc", "get", str(repo), "api", cwd=repo, env=env))
    response = httpx.get(f"http://127.0.0.1:{port}/ports/status", timeout=10)
    assert response.status_code == 200
    assert [lease["session_id"] for lease in response.json()] == [str(repo)]
    assert proc.poll() is None


def test_example_script_behaves_like_worktree_new(tmp_path: Path, env: dict[str, str]) -> None:
    repo = make_repo(tmp_path, env, "examples")
    script = repo / "examples" / "new-worktree.sh"
    ok("bash", script, "feat-a", cwd=repo, env=env)
    # From a linked worktree it still lands beside the main one, as the recipe does.
    out = ok("bash", script, "feat-b", cwd=repo.parent / "my repo-feat-a", env=env)
    assert (repo.parent / "my repo-feat-b").is_dir()
    assert "-f examples/compose.yaml" in out
    exclude = (repo / ".git" / "info" / "exclude").read_text()
    assert exclude.count(".worktree-ports.json") == 1
    assert ok("git", "status", "--porcelain", cwd=repo.parent / "my repo-feat-b", env=env) == ""
    held = leases(repo, env)
    assert set(held) == {str(repo.parent / "my repo-feat-a"), str(repo.parent / "my repo-feat-b")}


def test_worktree_recipes_alone_in_another_repository(tmp_path: Path, env: dict[str, str]) -> None:
    """What a user copies: worktree.just as their justfile, none of portalloc's own."""
    repo = tmp_path / "theirs"
    repo.mkdir()
    ok("git", "init", "-q", "-b", "main", cwd=repo, env=env)
    shutil.copy(ROOT / "worktree.just", repo / "justfile")
    ok("git", "add", "-A", cwd=repo, env=env)
    ok("git", "commit", "-q", "-m", "initial", cwd=repo, env=env)
    recipes = set(ok(JUST, "--summary", cwd=repo, env=env).split())
    assert recipes == {"worktree-new", "worktree-remove", "worktree-env", "worktree-serve"}
    ok(JUST, "worktree-new", "feat-x", cwd=repo, env=env)
    assert str(tmp_path / "theirs-feat-x") in leases(repo, env)

"""portalloc replaces only files that are its own (issue 18): `--write` replaces only a
portalloc manifest, an env file's block is rewritten only for the session it was last
written for, `hook install` never writes through a symlinked directory out of the
worktree, and `hook uninstall` removes only what `install` added."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from dotenv import dotenv_values

from portalloc.blocks import BEGIN as BLOCK_BEGIN
from portalloc.blocks import END as BLOCK_END
from portalloc.outputs import NOT_A_MANIFEST
from tests.helpers import run_cli

ENV = {"PORTALLOC_SKIP_PORT_CHECK": "1"}


def sessions() -> list[str]:
    return [a["session_id"] for a in json.loads(run_cli("status", "--json").stdout)]


def refused(result: object, text: str = "") -> bool:
    code, stderr = result.returncode, result.stderr  # type: ignore[attr-defined]
    return code == 2 and stderr.count("\n") == 1 and text in stderr


# --- 5. `--write FILE` replaces only a portalloc manifest ----------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"TOKEN=hunter2\n",  # a file of secrets
        b"root:x:0:0:root:/root:/bin/bash\n",  # /etc/passwd as root
        b'{"name": "app", "version": "1.0.0"}\n',  # someone's JSON
        b'{"session_id": "s", "api_port": 1}\n',  # manifest-like, but not one
        b"[]",
        b"",  # even an empty file is someone's (a lock, a flag, a placeholder)
        b"\xff\xfe",
    ],
)
def test_write_refuses_a_file_that_is_not_a_manifest(tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "target"
    target.write_bytes(content)
    result = run_cli("env", "s", "--write", str(target), env=ENV)
    assert refused(result, NOT_A_MANIFEST), result.stderr
    assert target.read_bytes() == content
    assert sessions() == []  # refused before anything was leased


def test_write_replaces_a_manifest_and_a_directory_gets_one(tmp_path: Path) -> None:
    target = tmp_path / "ports.json"
    assert run_cli("env", "a", "--write", str(target), env=ENV).returncode == 0
    assert json.loads(target.read_text())["session_id"] == "a"
    # A manifest portalloc wrote, for any session, is portalloc's to replace.
    assert run_cli("env", "b", "--write", str(target), env=ENV).returncode == 0
    assert json.loads(target.read_text())["session_id"] == "b"
    directory = tmp_path / "dir"
    directory.mkdir()
    assert run_cli("env", "a", "--write", str(directory), env=ENV).returncode == 0
    inside = directory / ".worktree-ports.json"
    assert json.loads(inside.read_text())["api_port"] == 10003
    inside.write_text("mine\n")  # the user's own file of that name
    result = run_cli("env", "a", "--write", str(directory), env=ENV)
    assert refused(result, NOT_A_MANIFEST) and inside.read_text() == "mine\n"


def test_a_file_that_appears_after_the_check_is_not_replaced(tmp_path: Path) -> None:
    from portalloc import PortAllocatorConfig, PortAllocatorService
    from portalloc.errors import UsageError
    from portalloc.outputs import write_manifest

    svc = PortAllocatorService(
        PortAllocatorConfig(state_dir=tmp_path / "state"), port_is_free=lambda _p: True
    )
    allocation = svc.allocate("s")
    target = tmp_path / "late"
    target.write_text("TOKEN=x\n")
    with pytest.raises(UsageError, match="not a portalloc manifest"):
        write_manifest(target, allocation)
    assert target.read_text() == "TOKEN=x\n"


# --- 6. an env file's block is rewritten only for the session that last wrote it ----------


def block(path: Path) -> str:
    return path.read_text().split(BLOCK_BEGIN + "\n", 1)[1].split(BLOCK_END, 1)[0]


def test_a_recreated_session_leaves_another_sessions_block_alone(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    assert run_cli("env", "feature-x", "--env-file", str(dotenv), env=ENV).returncode == 0
    assert dotenv_values(dotenv)["API_PORT"] == "10003"
    # The user points .env at feature-y explicitly: it wins, and says so.
    taken = run_cli("env", "feature-y", "--env-file", str(dotenv), env=ENV)
    assert taken.returncode == 0
    assert "written for another session" in taken.stderr and "feature-y" in taken.stderr
    theirs = dotenv.read_bytes()
    assert dotenv_values(dotenv)["API_PORT"] == "10103"
    # feature-x ends and is made again: its ledger record still names .env, but the
    # block there is feature-y's now.
    assert run_cli("release", "feature-x").returncode == 0
    again = run_cli("env", "feature-x", env=ENV)
    assert again.returncode == 0 and "rewrote" not in again.stderr
    assert dotenv.read_bytes() == theirs
    # A repeat of the owner's own write is silent and changes nothing.
    mine = run_cli("env", "feature-y", "--env-file", str(dotenv), env=ENV)
    assert mine.returncode == 0 and mine.stderr == "" and dotenv.read_bytes() == theirs


def test_a_ledger_record_never_takes_a_block_over(tmp_path: Path, state_dir: Path) -> None:
    """In a shared ledger another member can add a `files` record naming your .env."""
    from portalloc import PortAllocatorConfig, PortAllocatorService

    dotenv = tmp_path / ".env"
    dotenv.write_text("MINE=1\n")
    assert run_cli("env", "mine", "--env-file", str(dotenv), env=ENV).returncode == 0
    before = dotenv.read_bytes()
    busy: set[int] = set()
    svc = PortAllocatorService(
        PortAllocatorConfig(state_dir=state_dir), port_is_free=lambda p: p not in busy
    )
    svc.allocate("intruder", env_file=dotenv)  # the record, as any ledger writer makes it
    svc.release("intruder")
    busy.add(10103)  # and a move, so the refresh path runs for a moved lease too
    svc.allocate("intruder")
    assert dotenv.read_bytes() == before
    # The owner's own record still follows its moves.
    svc.release("mine")
    busy.add(10003)
    svc.allocate("mine")
    assert dotenv_values(dotenv)["API_PORT"] not in ("10003", None)
    assert dotenv.read_text().startswith("MINE=1\n")


def test_the_owner_mark_keeps_the_block_dotenv_valid(tmp_path: Path) -> None:
    from portalloc.outputs import owner_line

    dotenv = tmp_path / ".env"
    assert run_cli("env", "a b'$c", "--env-file", str(dotenv), env=ENV).returncode == 0
    lines = block(dotenv).splitlines()
    assert lines[0] == owner_line("a b'$c") and lines[0].startswith("# session sha256:")
    assert "a b" not in dotenv.read_text()  # the session id itself is not written
    values = dotenv_values(dotenv)
    assert list(values) == [
        "AGENT_COORDINATOR_DB_PORT", "AGENT_COORDINATOR_REST_PORT",
        "AGENT_COORDINATOR_REALTIME_PORT", "API_PORT", "COMPOSE_PROJECT_NAME", "SUPABASE_URL",
    ]  # fmt: skip


def test_a_block_an_older_portalloc_wrote(tmp_path: Path, state_dir: Path) -> None:
    """No owner line: refreshed only for the session whose compose project it names;
    an explicit --env-file marks it."""
    from portalloc import PortAllocatorConfig, PortAllocatorService

    busy: set[int] = set()
    svc = PortAllocatorService(
        PortAllocatorConfig(state_dir=state_dir), port_is_free=lambda p: p not in busy
    )
    own, other = tmp_path / "own.env", tmp_path / "other.env"
    first = svc.allocate("s", env_file=own)
    svc.allocate("t", env_file=other)
    legacy = "".join(f"{k}={v}\n" for k, v in first.env.items())
    own.write_text(f"{BLOCK_BEGIN}\n{legacy}{BLOCK_END}\n")
    other.write_text(f"{BLOCK_BEGIN}\n{legacy}{BLOCK_END}\n")  # names s's project
    for session in ("s", "t"):
        svc.release(session)
    busy.update({10003, 10103})
    svc.allocate("s")
    svc.allocate("t")
    assert dotenv_values(own)["API_PORT"] == "10203"
    assert dotenv_values(other)["API_PORT"] == "10003"  # untouched


# --- 7. hook install never writes through a symlinked directory out of the worktree -------

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(*args: str | Path, cwd: Path) -> str:
    return subprocess.run(
        ["git", *map(str, args)], cwd=cwd, check=True, capture_output=True, text=True,
        timeout=60,
    ).stdout  # fmt: skip


def make_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    return repo


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


LINKED = {
    # tool: (the committed symlink, the file install would write through it)
    "claude": (".claude", "settings.json"),
    "gemini": (".gemini", "settings.json"),
    "codex": (".codex", "environments/environment.toml"),
    "conductor": (".conductor", "settings.toml"),
    "worktrunk": (".config", "wt.toml"),
}


@needs_git
@pytest.mark.parametrize("tool", list(LINKED))
@pytest.mark.parametrize("existing", [False, True])
def test_install_refuses_a_symlinked_directory_out_of_the_worktree(
    tmp_path: Path, tool: str, existing: bool
) -> None:
    repo = make_repo(tmp_path)
    home = tmp_path / "home" / LINKED[tool][0]  # ~/.claude and friends
    home.mkdir(parents=True)
    if existing:
        target = home / LINKED[tool][1]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("{}\n" if target.suffix == ".json" else "# mine\n")
    (repo / LINKED[tool][0]).symlink_to(home)
    before = snapshot(tmp_path / "home")
    for command in ("install", "uninstall"):
        result = run_cli("hook", command, "--for", tool, cwd=repo)
        assert refused(result, "outside"), (command, result.stderr)
        assert snapshot(tmp_path / "home") == before


@needs_git
@pytest.mark.parametrize("tool, name", [("mise", "mise.toml"), ("direnv", ".envrc")])
def test_install_refuses_a_symlinked_file(tmp_path: Path, tool: str, name: str) -> None:
    repo = make_repo(tmp_path)
    outside = tmp_path / "global.toml"
    outside.write_text("# global\n")
    (repo / name).symlink_to(outside)
    for command in ("install", "uninstall"):
        assert refused(run_cli("hook", command, "--for", tool, cwd=repo))
    assert outside.read_text() == "# global\n"


@needs_git
def test_a_committed_hooks_path_that_leaves_the_worktree_is_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    elsewhere = tmp_path / "global-hooks"
    elsewhere.mkdir()
    (repo / ".githooks").symlink_to(elsewhere)  # committed, with a relative hooksPath
    git("config", "core.hooksPath", ".githooks", cwd=repo)
    result = run_cli("hook", "install", cwd=repo)
    assert refused(result, "outside"), result.stderr
    assert list(elsewhere.iterdir()) == []
    # An absolute hooksPath the user set in the repository's own config is theirs to pick.
    git("config", "core.hooksPath", str(elsewhere), cwd=repo)
    assert run_cli("hook", "install", cwd=repo).returncode == 0
    assert (elsewhere / "post-checkout").exists()
    assert run_cli("hook", "uninstall", cwd=repo).returncode == 0
    assert list(elsewhere.iterdir()) == []


@needs_git
def test_a_linked_worktree_installs_into_the_common_hooks_dir(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    git("-c", "user.email=t@e", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "i",
        cwd=repo)  # fmt: skip
    linked = tmp_path / "linked"
    git("worktree", "add", "-q", linked, cwd=repo)
    result = run_cli("hook", "install", cwd=linked)
    assert result.returncode == 0, result.stderr
    assert (repo / ".git" / "hooks" / "post-checkout").exists()
    assert run_cli("hook", "uninstall", cwd=linked).returncode == 0
    assert not (repo / ".git" / "hooks" / "post-checkout").exists()


# --- 8. hook uninstall removes only what install added ------------------------------------

PREEXISTING = {
    # tool: (file, what it held before install: exactly what uninstall used to take
    # for "nothing but portalloc's leftovers")
    "codex": (".codex/environments/environment.toml", "version = 1\n"),
    "git": (".git/hooks/post-checkout", "#!/bin/sh\n"),
    "direnv": (".envrc", ""),
    "mise": ("mise.toml", ""),
    "worktrunk": (".config/wt.toml", ""),
    "conductor": (".conductor/settings.toml", ""),
    "claude": (".claude/settings.json", "{}\n"),
    "gemini": (".gemini/settings.json", "{}"),
}


@needs_git
@pytest.mark.parametrize("tool", list(PREEXISTING))
def test_uninstall_keeps_a_file_that_existed_before(tmp_path: Path, tool: str) -> None:
    repo = make_repo(tmp_path)
    relative, content = PREEXISTING[tool]
    path = repo / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    assert run_cli("hook", "install", "--for", tool, cwd=repo).returncode == 0
    assert path.read_text() != content
    assert run_cli("hook", "uninstall", "--for", tool, cwd=repo).returncode == 0
    if path.suffix == ".json":
        assert json.loads(path.read_text()) == json.loads(content)
    else:
        assert path.read_text() == content  # byte for byte


@needs_git
@pytest.mark.parametrize("tool", list(PREEXISTING))
def test_uninstall_removes_what_install_created_and_only_that(tmp_path: Path, tool: str) -> None:
    repo = make_repo(tmp_path)
    relative = PREEXISTING[tool][0]
    if tool == "git":
        shutil.rmtree(repo / ".git" / "hooks")  # git may make none (a template without)
    before = snapshot(repo)
    assert run_cli("hook", "install", "--for", tool, cwd=repo).returncode == 0
    installed = (repo / relative).read_bytes()
    assert run_cli("hook", "install", "--for", tool, cwd=repo).returncode == 0
    assert (repo / relative).read_bytes() == installed  # the mark survives a repeat
    assert run_cli("hook", "uninstall", "--for", tool, cwd=repo).returncode == 0
    after = snapshot(repo)
    if tool == "git":  # git's own bookkeeping in .git may change; the hooks dir may not
        before = {k: v for k, v in before.items() if k.startswith(".git/hooks")}
        after = {k: v for k, v in after.items() if k.startswith(".git/hooks")}
    assert after == before  # file and the directories made for it are gone
    # A directory install made that the user has put something in since stays.
    assert run_cli("hook", "install", "--for", tool, cwd=repo).returncode == 0
    parent = (repo / relative).parent
    if parent != repo:
        (parent / "mine.txt").write_text("mine\n")
        assert run_cli("hook", "uninstall", "--for", tool, cwd=repo).returncode == 0
        assert (parent / "mine.txt").read_text() == "mine\n"
        assert not (repo / relative).exists()


@needs_git
def test_a_directory_that_existed_before_stays_when_empty(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / ".codex").mkdir()  # empty, but the user's
    assert run_cli("hook", "install", "--for", "codex", cwd=repo).returncode == 0
    assert run_cli("hook", "uninstall", "--for", "codex", cwd=repo).returncode == 0
    assert (repo / ".codex").is_dir() and list((repo / ".codex").iterdir()) == []


@needs_git
def test_a_created_file_the_user_added_to_stays(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    assert run_cli("hook", "install", "--for", "direnv", cwd=repo).returncode == 0
    envrc = repo / ".envrc"
    envrc.write_text(envrc.read_text() + "export MINE=1\n")
    assert run_cli("hook", "uninstall", "--for", "direnv", cwd=repo).returncode == 0
    assert envrc.read_text() == "export MINE=1\n"


def test_hook_install_with_a_missing_repo_is_one_clean_line(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    for command in ("install", "uninstall"):
        result = run_cli("hook", command, "--repo", str(missing))
        assert refused(result, str(missing)), result.stderr
        assert "PosixPath" not in result.stderr and "Errno" not in result.stderr


@pytest.fixture(autouse=True)
def _isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No global git config of the machine's (a global hooksPath, templates) leaks in."""
    home = tmp_path / "git-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_DIR", raising=False)

"""The managed .env block: merged, created, untouched on a repeat, kept current by the profile,
rewritten when ports move; and `check --port`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from dotenv import dotenv_values
from hypothesis import given, settings
from hypothesis import strategies as st

from portalloc.blocks import BEGIN as BLOCK_BEGIN
from portalloc.blocks import END as BLOCK_END
from portalloc.outputs import merge_block
from tests.helpers import run_cli

USER_CONTENT = (
    "# my settings\r\n"
    "DATABASE_URL=postgres://localhost/db  # keep me\n"
    "export SECRET='s p a c e'\n"
    "\n"
    "API_PORT=3000\n"
    "NO_TRAILING_NEWLINE=1"
)


def env_lines(path: Path) -> list[str]:
    text = path.read_text()
    return text.split(BLOCK_BEGIN + "\n", 1)[1].split(BLOCK_END, 1)[0].splitlines()


def test_block_is_merged_and_every_byte_outside_is_kept(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    target.write_bytes(USER_CONTENT.encode())
    result = run_cli("env", "s", "--env-file", str(target), env={"PORTALLOC_SKIP_PORT_CHECK": "1"})
    assert result.returncode == 0, result.stderr
    text = target.read_bytes().decode()
    assert text.startswith(USER_CONTENT + "\n" + BLOCK_BEGIN + "\n")
    assert text.endswith(BLOCK_END + "\n")
    assert "AGENT_COORDINATOR_DB_PORT=10000" in env_lines(target)
    # A key set both inside and outside is named.
    assert "also sets API_PORT outside portalloc's block" in result.stderr
    values = dotenv_values(target)
    assert values["AGENT_COORDINATOR_REST_PORT"] == "10001"
    assert values["DATABASE_URL"] == "postgres://localhost/db"


def test_missing_file_is_created_and_a_repeat_leaves_it_untouched(tmp_path: Path) -> None:
    target = tmp_path / "sub" / ".env"
    target.parent.mkdir()
    env = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    assert run_cli("env", "s", "--env-file", str(target), env=env).returncode == 0
    first = target.read_bytes(), target.stat().st_mtime_ns
    os.utime(target, ns=(1, 1))  # anything written now would change the mtime
    assert run_cli("env", "s", "--env-file", str(target), env=env).returncode == 0
    assert target.read_bytes() == first[0] and target.stat().st_mtime_ns == 1
    assert target.read_text().startswith(BLOCK_BEGIN)


def test_env_file_that_is_not_utf8_is_refused_untouched(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    target.write_bytes(b"A=\xff\n")
    result = run_cli("env", "s", "--env-file", str(target))
    assert result.returncode == 2 and "not UTF-8" in result.stderr
    assert target.read_bytes() == b"A=\xff\n"


def test_env_file_refuses_symlinks_and_the_ledger(tmp_path: Path, state_dir: Path) -> None:
    real = tmp_path / "real.env"
    real.write_text("A=1\n")
    link = tmp_path / "link.env"
    link.symlink_to(real)
    for target in (link, state_dir / "leases.json"):
        result = run_cli("env", "s", "--env-file", str(target))
        assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert real.read_text() == "A=1\n"


def test_docker_compose_style_reader_sees_the_block(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    run_cli("env", "s", "--env-file", str(target), env={"PORTALLOC_SKIP_PORT_CHECK": "1"})
    # What compose does with an env file: KEY=VALUE lines, `#` comments skipped.
    pairs = dict(
        line.split("=", 1)
        for line in target.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pairs["COMPOSE_PROJECT_NAME"].startswith("ac-")
    assert pairs["SUPABASE_URL"] == "http://localhost:10001"


@settings(max_examples=60, deadline=None)
@given(
    before=st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
    after=st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
)
def test_merge_keeps_everything_around_the_block(before: str, after: str) -> None:
    if BLOCK_BEGIN in before + after or BLOCK_END in before + after:
        return
    first = merge_block(before or None, "A=1\n")
    again = merge_block(first, "A=1\n")
    assert again == first  # idempotent
    changed = merge_block(first, "A=2\n")
    assert changed.replace("A=2\n", "A=1\n") == first  # only the block changes
    assert first.startswith(before)


def git(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["git", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_profile_keys_keep_both_files_current_for_a_worktree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "portalloc.toml").write_text('env_file = ".env"\nmanifest = ".worktree-ports.json"\n')
    env = {"PORTALLOC_SKIP_PORT_CHECK": "1", "PORT_ALLOC_BASE": "32000"}
    assert run_cli("env", cwd=repo, env=env).returncode == 0
    assert "API_PORT=32003" in env_lines(repo / ".env")
    manifest = json.loads((repo / ".worktree-ports.json").read_text())
    assert manifest["api_port"] == 32003 and manifest["session_id"] == str(repo)
    # An explicit session is not the worktree's lease: its files are left alone.
    (repo / ".env").unlink()
    run_cli("env", "other", cwd=repo, env=env)
    assert not (repo / ".env").exists()


@pytest.mark.parametrize(
    "value", ['"/etc/passwd"', '"../outside.env"', '"a/../../b"', "3", '""', '"~/x"']
)
def test_profile_file_keys_stay_inside_the_worktree(tmp_path: Path, value: str) -> None:
    (tmp_path / "portalloc.toml").write_text(f"env_file = {value}\n")
    result = run_cli("env", "s", cwd=tmp_path)
    assert result.returncode == 2 and "env_file" in result.stderr


def test_moved_ports_rewrite_the_env_file(tmp_path: Path, state_dir: Path) -> None:
    from portalloc import PortAllocatorConfig, PortAllocatorService

    target = tmp_path / ".env"
    busy: set[int] = set()
    svc = PortAllocatorService(
        PortAllocatorConfig(state_dir=state_dir), port_is_free=lambda p: p not in busy
    )
    first = svc.allocate("s", env_file=target)
    from portalloc.outputs import write_env_file

    write_env_file(target, first.env, lambda _m: None, session_id="s")
    target.write_text("MINE=1\n" + target.read_text())
    svc.release("s")
    busy.add(10003)
    svc.allocate("s")
    assert "API_PORT=10103" in env_lines(target)
    assert target.read_text().startswith("MINE=1\n")


def test_check_port_only_the_named_ones() -> None:
    env = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    run_cli("allocate", "s", env=env)
    result = run_cli("check", "s", "--port", "db", "--port", "api")
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["db", "api"]
    bad = run_cli("check", "s", "--port", "nope")
    assert bad.returncode == 2 and "known: db, rest, realtime, api" in bad.stderr


# --- found by a hostile review ------------------------------------------------------------


def test_a_begin_marker_of_the_users_own_swallows_nothing(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    mine = f"A=1\n{BLOCK_BEGIN}\nUSER_SECRET=keepme\nOTHER=2\n"
    target.write_text(mine)
    env = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    assert run_cli("env", "s", "--env-file", str(target), env=env).returncode == 0
    assert run_cli("env", "s", "--env-file", str(target), env=env).returncode == 0
    text = target.read_text()
    assert text.startswith(mine) and text.count(BLOCK_END) == 1


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("key_value", ['manifest = ".git/x.json"', 'env_file = "d/.env"'])
def test_profile_files_never_leave_the_worktree(tmp_path: Path, key_value: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    outside = tmp_path / "victim"
    outside.mkdir()
    (repo / "d").symlink_to(outside)  # a committed symlink pointing anywhere
    (repo / "portalloc.toml").write_text(key_value + "\n")
    result = run_cli("env", cwd=repo, env={"PORTALLOC_SKIP_PORT_CHECK": "1"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert list(outside.iterdir()) == []


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_project_file_above_the_worktree_writes_nothing_into_it(tmp_path: Path) -> None:
    (tmp_path / "portalloc.toml").write_text('manifest = "app.py"\n')
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "app.py").write_text("print('mine')\n")
    result = run_cli("env", cwd=repo, env={"PORTALLOC_SKIP_PORT_CHECK": "1"})
    assert result.returncode == 0 and "only from the worktree's own file" in result.stderr
    assert (repo / "app.py").read_text() == "print('mine')\n"

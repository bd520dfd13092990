"""A lease follows its project file: a profile edit is seen by the next `env`/`allocate`/
`run` of the session, in the same block when the new profile fits it, with one stderr
line; a move (loud, as for a busy home) only when it does not fit.

Worktrees are directories with a `.git` inside, leases come from block 26000 up (below
the kernel's ephemeral range, away from the ports other stacks hold by default), and
the port check is off where exact numbers are asserted.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portalloc import NoPortsAvailable, PortAllocatorConfig, PortAllocatorService
from portalloc.models import Profile
from tests.helpers import FakeClock, Result, run_cli, run_process

BASE = 26000
QUIET = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
PORTALLOC = Path(sys.executable).with_name("portalloc")


def worktree(tmp_path: Path, name: str = "wt") -> Path:
    tree = tmp_path / name
    (tree / ".git").mkdir(parents=True)
    return tree


def profile(tree: Path, ports: dict[str, int], *extra: str) -> None:
    """A project file with only port variables (safe without `portalloc trust`)."""
    lines = [f"base = {BASE}", *extra, "[ports]", *(f"{n} = {o}" for n, o in ports.items())]
    (tree / "portalloc.toml").write_text("\n".join(lines) + "\n")


def env(tree: Path, *args: str, extra: dict[str, str] | None = None) -> Result:
    return run_cli("env", "--format", "json", *args, cwd=tree, env={**QUIET, **(extra or {})})


def variables(result: Result) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    out: dict[str, str] = json.loads(result.stdout)
    return out


def lines(result: Result, word: str) -> list[str]:
    return [line for line in result.stderr.splitlines() if word in line]


def ledger_key(state_dir: Path) -> tuple[int, int]:
    info = (state_dir / "leases.json").stat()
    return info.st_ino, info.st_mtime_ns


def leases(state_dir: Path) -> dict[str, dict[str, Any]]:
    document = json.loads((state_dir / "leases.json").read_text())
    return {lease["session_id"]: lease for lease in document["leases"]}


# --- in place ----------------------------------------------------------------------


def test_added_port_and_its_variable_follow_in_the_same_block(
    state_dir: Path, tmp_path: Path
) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0, "api": 1})
    first = variables(env(tree))
    assert (first["DB_PORT"], first["API_PORT"]) == ("26000", "26001")
    profile(tree, {"db": 0, "api": 1, "cache": 3})
    result = env(tree)
    after = variables(result)
    assert after == {**first, "CACHE_PORT": "26003"}
    assert list(after) == ["DB_PORT", "API_PORT", "CACHE_PORT", "COMPOSE_PROJECT_NAME"]
    assert lines(result, "profile") == [
        f"portalloc: warning: session {str(tree)!r}: lease follows its profile "
        "(added cache 26003, CACHE_PORT)"
    ]
    assert not lines(result, "MOVED")
    lease = leases(state_dir)[str(tree)]
    assert (lease["start"], lease["ports"]["cache"]) == (26000, 26003)
    # Seen once: the next `env` is quiet and writes nothing.
    key = ledger_key(state_dir)
    again = env(tree)
    assert variables(again) == after and not lines(again, "profile")
    assert ledger_key(state_dir) == key


def test_removed_and_moved_ports_follow(state_dir: Path, tmp_path: Path) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0, "api": 1, "cache": 2})
    first = variables(env(tree))
    profile(tree, {"db": 0, "api": 7})
    result = env(tree)
    assert variables(result) == {
        "DB_PORT": "26000",
        "API_PORT": "26007",
        "COMPOSE_PROJECT_NAME": first["COMPOSE_PROJECT_NAME"],
    }
    [line] = lines(result, "profile")
    assert "removed cache, CACHE_PORT" in line
    assert "moved api 26001->26007" in line
    assert leases(state_dir)[str(tree)]["ports"] == {"db": 26000, "api": 26007}


def test_compose_prefix_change_renames_the_project_and_only_then(
    state_dir: Path, tmp_path: Path
) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0})
    digest = variables(env(tree))["COMPOSE_PROJECT_NAME"].removeprefix("ac-")
    profile(tree, {"db": 0}, 'compose_prefix = "shop"')
    result = env(tree)
    assert variables(result)["COMPOSE_PROJECT_NAME"] == f"shop-{digest}"
    assert f"compose project shop-{digest}" in lines(result, "profile")[0]
    # Another edit keeps the name the lease has.
    profile(tree, {"db": 0, "web": 1}, 'compose_prefix = "shop"')
    assert variables(env(tree))["COMPOSE_PROJECT_NAME"] == f"shop-{digest}"
    assert leases(state_dir)[str(tree)]["compose_project_name"] == f"shop-{digest}"


def test_range_that_still_fits_changes_the_span_in_place(state_dir: Path, tmp_path: Path) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0, "api": 1})
    env(tree)
    profile(tree, {"db": 0, "api": 150}, "range = 200")
    result = env(tree)
    assert variables(result)["API_PORT"] == "26150"
    assert not lines(result, "MOVED")
    assert "range 100->200" in lines(result, "profile")[0]
    lease = leases(state_dir)[str(tree)]
    assert (lease["start"], lease["span"]) == (26000, 200)


def test_recorded_manifest_and_env_file_are_rewritten(state_dir: Path, tmp_path: Path) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0, "api": 1})
    dotenv = tree / ".env"
    dotenv.write_text("MINE=1\n")
    assert env(tree, "--write", str(tree), "--env-file", str(dotenv)).returncode == 0
    manifest = tree / ".worktree-ports.json"
    profile(tree, {"db": 0, "api": 1, "cache": 3})
    result = env(tree)  # no flags: the files recorded for the session follow anyway
    assert variables(result)["CACHE_PORT"] == "26003"
    assert json.loads(manifest.read_text())["cache_port"] == 26003
    text = dotenv.read_text()
    assert text.startswith("MINE=1\n") and "CACHE_PORT=26003" in text
    [line] = lines(result, "profile")
    assert str(manifest) in line and str(dotenv) in line and "rewrote" in line


def test_profile_keys_for_files_keep_them_current(state_dir: Path, tmp_path: Path) -> None:
    tree = worktree(tmp_path)
    files = ['env_file = ".env"', 'manifest = "ports.json"']
    profile(tree, {"db": 0}, *files)
    env(tree)
    profile(tree, {"db": 0, "api": 4}, *files)
    assert variables(env(tree))["API_PORT"] == "26004"
    assert json.loads((tree / "ports.json").read_text())["api_port"] == 26004
    assert "API_PORT=26004" in (tree / ".env").read_text()


def test_a_changed_template_follows(state_dir: Path, clock: FakeClock) -> None:
    """Templates of [env] need a trusted file on the command line: the same through the
    API, where the profile is the caller's."""
    warnings: list[str] = []

    def service(template: str) -> PortAllocatorService:
        config = PortAllocatorConfig(
            state_dir=state_dir,
            base=BASE,
            skip_port_check=True,
            profile=Profile(
                ports=(("api", 0),),
                env=(("API_PORT", "{api_port}"), ("API_URL", template)),
            ),
        )
        return PortAllocatorService(config, clock=clock, on_warning=warnings.append)

    assert service("http://localhost:{api_port}").allocate("s").env["API_URL"] == (
        "http://localhost:26000"
    )
    again = service("http://127.0.0.1:{api_port}/v1").allocate("s")
    assert again.env == {"API_PORT": "26000", "API_URL": "http://127.0.0.1:26000/v1"}
    assert warnings == ["session 's': lease follows its profile (changed API_URL)"]


def test_trusting_the_file_later_gives_the_full_set(state_dir: Path, tmp_path: Path) -> None:
    tree = worktree(tmp_path)
    (tree / "portalloc.toml").write_text(
        f'base = {BASE}\n[ports]\napi = 0\n[env]\nAPI_PORT = "{{api_port}}"\n'
        'API_URL = "http://localhost:{api_port}"\n'
    )
    before = variables(env(tree))
    assert "API_URL" not in before and before["API_PORT"] == "26000"
    trusted = run_cli("trust", str(tree / "portalloc.toml"), cwd=tree, env=QUIET)
    assert trusted.returncode == 0, trusted.stderr
    result = env(tree)
    assert variables(result)["API_URL"] == "http://localhost:26000"
    assert "added API_URL" in lines(result, "profile")[0]


# --- no longer fits: one loud move ---------------------------------------------------


def test_a_range_that_no_longer_fits_moves_once_loudly(state_dir: Path, tmp_path: Path) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0, "api": 1})
    # Another session holds the first block: the worktree's lease is at 26100.
    assert run_cli("allocate", "other", env={**QUIET, "PORT_ALLOC_BASE": str(BASE)}).returncode == 0
    assert variables(env(tree))["DB_PORT"] == "26100"
    assert env(tree, "--write", str(tree / "ports.json")).returncode == 0
    profile(tree, {"db": 0, "api": 1}, "range = 200")
    result = env(tree)
    assert variables(result)["DB_PORT"] == "26200"
    assert lines(result, "MOVED") == [
        f"portalloc: warning: session {str(tree)!r} MOVED from block 26100-26199 to "
        "26200-26399: its profile changed (range 100->200) and base 26000, range 200 and "
        "max sessions 20 have no block at 26100"
    ]
    assert not lines(result, "lease follows")
    assert f"rewrote {tree / 'ports.json'} with the new ports" in result.stderr
    assert json.loads((tree / "ports.json").read_text())["db_port"] == 26200
    moved = leases(state_dir)[str(tree)]
    assert (moved["start"], moved["span"], moved["worktree"]) == (26200, 200, str(tree))
    again = env(tree)
    assert variables(again)["DB_PORT"] == "26200" and not lines(again, "MOVED")


def test_the_moved_line_names_the_ports_where_they_are_now(state_dir: Path, tmp_path: Path) -> None:
    """A profile change that moves the lease: the added and re-placed ports are named
    in the block the lease moved to, not where they would have been in the old one."""
    tree = worktree(tmp_path)
    profile(tree, {"db": 0, "api": 1})
    assert run_cli("allocate", "other", env={**QUIET, "PORT_ALLOC_BASE": str(BASE)}).returncode == 0
    assert variables(env(tree))["DB_PORT"] == "26100"
    profile(tree, {"db": 0, "api": 5, "cache": 7}, "range = 200")
    result = env(tree)
    after = variables(result)
    assert (after["DB_PORT"], after["API_PORT"], after["CACHE_PORT"]) == ("26200", "26205", "26207")
    [line] = lines(result, "MOVED")
    assert line == (
        f"portalloc: warning: session {str(tree)!r} MOVED from block 26100-26199 to "
        "26200-26399: its profile changed (added cache 26207, CACHE_PORT; moved api "
        "26101->26205; changed API_PORT; range 100->200) and base 26000, range 200 and "
        "max sessions 20 have no block at 26100"
    )


def test_a_block_grown_into_another_lease_moves(state_dir: Path, tmp_path: Path) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0})
    assert variables(env(tree))["DB_PORT"] == "26000"
    run_cli("allocate", "next-door", env={**QUIET, "PORT_ALLOC_BASE": str(BASE)})
    profile(tree, {"db": 0, "api": 120}, "range = 200")
    result = env(tree)
    after = variables(result)
    assert (after["DB_PORT"], after["API_PORT"]) == ("26200", "26320")
    [line] = lines(result, "MOVED")
    assert "from block 26000-26099 to 26200-26399" in line
    assert "meets session 'next-door'" in line


def test_a_new_port_held_by_a_foreign_listener_moves(state_dir: Path, tmp_path: Path) -> None:
    """The port check on: the new port is busy, the old ones are free (a real process)."""
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        busy = foreign.getsockname()[1]
        tree = worktree(tmp_path)
        base = busy - 2  # the lease's block starts here: db, api free; cache busy

        def write(ports: dict[str, int]) -> None:
            settings = [f"base = {base}", "max_sessions = 3", "[ports]"]
            ports_lines = [f"{name} = {offset}" for name, offset in ports.items()]
            (tree / "portalloc.toml").write_text("\n".join([*settings, *ports_lines]) + "\n")

        write({"db": 0, "api": 1})
        first = run_cli("env", "--format", "json", cwd=tree, process=True)
        if variables(first)["DB_PORT"] != str(base):
            pytest.skip(f"something else listens on {base} or {base + 1}")
        write({"db": 0, "api": 1, "cache": 2})
        result = run_cli("env", "--format", "json", cwd=tree, process=True)
        after = variables(result)
        assert str(busy) not in after.values()
        assert after["CACHE_PORT"] == str(int(after["DB_PORT"]) + 2) != str(busy)
        [line] = lines(result, "MOVED")
        assert f"MOVED from block {base}-{base + 99}" in line
        # The change names the port where it is now; the reason, the busy one it left.
        assert f"its profile changed (added cache {after['CACHE_PORT']}, CACHE_PORT)" in line
        assert f"port {busy} (cache) is in use by pid {os.getpid()}" in line


# --- `run` joins, never moves ----------------------------------------------------------


def test_run_follows_in_place_but_never_moves(state_dir: Path, tmp_path: Path) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0})
    made = run_cli("allocate", "shared", "--json", cwd=tree, env=QUIET)
    assert json.loads(made.stdout)["allocation"]["db_port"] == 26000
    profile(tree, {"db": 0, "api": 1})
    echo = 'echo "$DB_PORT $API_PORT"'
    ran = run_cli("run", "shared", "sh", "-c", echo, cwd=tree, env=QUIET)
    assert (ran.returncode, ran.stdout) == (0, "26000 26001\n")
    assert "lease follows its profile (added api 26001, API_PORT)" in ran.stderr
    # Settings with no block at 26000: `run` keeps the lease where it is, and says so.
    moved_base = {**QUIET, "PORT_ALLOC_BASE": "26050"}
    stays = run_cli("run", "shared", "sh", "-c", echo, cwd=tree, env=moved_base)
    assert (stays.returncode, stays.stdout) == (0, "26000 26001\n")
    assert lines(stays, "stays") == [
        "portalloc: warning: session 'shared': base 26050, range 100 and max sessions 20 "
        "have no block at 26000; the lease stays in block 26000-26099 as it was: a `run` "
        "never moves the lease it joins"
    ]
    assert not lines(stays, "MOVED")
    assert leases(state_dir)["shared"]["start"] == 26000
    # The owner's next call moves it.
    moved = run_cli("allocate", "shared", "--json", cwd=tree, env=moved_base)
    assert json.loads(moved.stdout)["allocation"]["block_start"] == 26050
    assert len(lines(moved, "MOVED")) == 1


# --- unchanged: no write; the read path hands a change to the full CLI ----------------


def test_unchanged_profile_leaves_the_ledger_alone(state_dir: Path, tmp_path: Path) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0, "api": 1})
    first = env(tree)
    key = ledger_key(state_dir)
    for _ in range(3):
        assert env(tree).stdout == first.stdout
        assert run_cli("allocate", str(tree), cwd=tree, env=QUIET).returncode == 0
    assert ledger_key(state_dir) == key


def test_the_real_binary_reads_fast_until_the_profile_changes(
    state_dir: Path, tmp_path: Path
) -> None:
    tree = worktree(tmp_path)
    profile(tree, {"db": 0, "api": 1})
    proc_env = {**os.environ, **QUIET}

    def binary() -> Result:
        return run_process([PORTALLOC, "env", "--format", "json"], env=proc_env, cwd=tree)

    first = binary()
    key = ledger_key(state_dir)
    again = binary()
    assert (again.stdout, ledger_key(state_dir)) == (first.stdout, key)
    profile(tree, {"db": 0, "api": 1, "cache": 2})
    changed = binary()
    # The read path never writes nor warns: the new variable, the ledger rewritten and
    # the line on stderr are the full CLI's.
    assert variables(changed)["CACHE_PORT"] == "26002"
    assert ledger_key(state_dir) != key
    assert lines(changed, "lease follows its profile (added cache 26002, CACHE_PORT)")
    key = ledger_key(state_dir)
    quiet = binary()
    assert (quiet.stdout, quiet.stderr, ledger_key(state_dir)) == (changed.stdout, "", key)


# --- any sequence of edits leaves leases the ledger loads ------------------------------

PORT_NAMES = ("db", "api", "web", "cache")
profiles = st.builds(
    lambda chosen, offsets, prefix, url: Profile(
        ports=tuple(zip(chosen, offsets, strict=False)),
        env=(
            *((f"{name.upper()}_PORT", f"{{{name}_port}}") for name in chosen),
            ("COMPOSE_PROJECT_NAME", "{compose_project_name}"),
            *((("URL", f"http://localhost:{{{chosen[0]}_port}}/{url}"),) if url else ()),
        ),
        compose_prefix=prefix,
    ),
    st.lists(st.sampled_from(PORT_NAMES), min_size=1, max_size=4, unique=True),
    st.lists(st.integers(0, 7), min_size=4, max_size=4, unique=True),
    st.sampled_from(["ac", "shop", "shop-2"]),
    st.sampled_from(["", "v1", "x"]),
)
edits = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    profiles,
    st.sampled_from([26000, 26004, 26050]),
    st.sampled_from([8, 10, 50, 100]),
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(edits, min_size=1, max_size=6))
def test_profile_edits_never_leave_a_lease_the_ledger_refuses(
    tmp_path: Path, steps: list[tuple[str, Profile, int, int]]
) -> None:
    state = tmp_path / f"state-{os.urandom(6).hex()}"
    clock = FakeClock()
    warnings: list[str] = []

    def service(profile: Profile, base: int, span: int) -> PortAllocatorService:
        config = PortAllocatorConfig(
            state_dir=state,
            base=base,
            range=span,
            max_sessions=6,
            skip_port_check=True,
            profile=profile,
        )
        return PortAllocatorService(config, clock=clock, on_warning=warnings.append)

    for session, edited, base, span in steps:
        writer = service(edited, base, span)
        seen = len(warnings)
        try:
            granted = writer.allocate(session)
        except NoPortsAvailable:
            granted = None  # a new session finds no block free: nothing was written
        if granted is not None and not any("stays" in w for w in warnings[seen:]):
            # Followed (in place or moved); else it stays as it was, said in one line.
            assert granted.ports == {name: granted.block_start + o for name, o in edited.ports}
            assert granted.block_end - granted.block_start + 1 == span
        clock.advance(1)
        # A fresh service on the same state dir loads every lease as it was written.
        reader_warnings: list[str] = []
        reader = PortAllocatorService(
            PortAllocatorConfig(state_dir=state, skip_port_check=True),
            clock=clock,
            on_warning=reader_warnings.append,
        )
        if granted is not None:
            assert reader.get(session) == writer.get(session)
        assert reader.status() == writer.status()
        assert reader_warnings == []
        spans = sorted((a.block_start, a.block_end) for a in reader.status())
        assert all(end < start for (_s, end), (start, _e) in pairwise(spans))
    assert not [w for w in warnings if "aside" in w or "corrupt" in w]


def test_a_package_below_the_worktree_top_does_not_pull_the_lease_back_and_forth(
    tmp_path: Path,
) -> None:
    """A monorepo: the top's portalloc.toml and web/portalloc.toml with other settings.
    `env` in web/ is the same worktree session; it must not move the worktree's lease
    (the review saw it move 31000 <-> 31050 at every call)."""
    import subprocess

    top = tmp_path / "mono"
    (top / "web").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(top)], check=True)
    (top / "portalloc.toml").write_text("base = 31000\n[ports]\nweb = 0\n")
    (top / "web" / "portalloc.toml").write_text("base = 31050\n[ports]\nworker = 0\n")
    skip = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    first = run_cli("env", "--format", "json", cwd=top, env=skip)
    assert first.returncode == 0, first.stderr
    for _ in range(2):
        below = run_cli("env", "--format", "json", cwd=top / "web", env=skip)
        again = run_cli("env", "--format", "json", cwd=top, env=skip)
        assert below.stdout == again.stdout == first.stdout
        assert "MOVED" not in below.stderr + again.stderr
        assert "follows its profile" not in below.stderr + again.stderr


def test_a_server_in_another_worktree_does_not_rewrite_this_worktrees_lease(
    tmp_path: Path, state_dir: Path
) -> None:
    """`portalloc serve` (or any command) run in worktree h2 allocating h1's session: h1's
    lease keeps its own profile and its env file is left alone."""
    import subprocess

    from portalloc import PortAllocatorConfig, PortAllocatorService

    h1, h2 = tmp_path / "h1", tmp_path / "h2"
    for tree in (h1, h2):
        tree.mkdir()
        subprocess.run(["git", "init", "-q", str(tree)], check=True)
    (h1 / "portalloc.toml").write_text('env_file = ".env"\n[ports]\nweb = 0\napi = 1\n')
    (h2 / "portalloc.toml").write_text("[ports]\nadmin = 0\n")
    skip = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    assert run_cli("env", cwd=h1, env=skip).returncode == 0
    env_file = (h1 / ".env").read_bytes()
    config = PortAllocatorConfig.from_env({"PORTALLOC_STATE_DIR": str(state_dir), **skip}, cwd=h2)
    warnings: list[str] = []
    allocation = PortAllocatorService(config, on_warning=warnings.append).allocate(
        str(h1.resolve())
    )
    assert set(allocation.ports) == {"web", "api"}
    assert (h1 / ".env").read_bytes() == env_file
    assert not [w for w in warnings if "follows" in w or "MOVED" in w]
    # In h1 itself a profile edit is still followed.
    (h1 / "portalloc.toml").write_text('env_file = ".env"\n[ports]\nweb = 0\napi = 1\ncache = 2\n')
    followed = run_cli("env", "--format", "json", cwd=h1, env=skip)
    assert "CACHE_PORT" in followed.stdout and "follows its profile" in followed.stderr

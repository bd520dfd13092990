"""The `portalloc` command as users run it: real processes, outputs and exit codes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from portalloc.errors import NoPortsAvailable
from tests.helpers import run_cli

# These tests read portalloc's output at its exact default numbers (block 10000, rest
# 10001, ...) from a private ledger, and bind none of those ports: the bind probe is
# off on purpose, or another stack listening there would move every lease.
pytestmark = pytest.mark.usefixtures("exact_ports")

DEFAULT_VARS = [
    "AGENT_COORDINATOR_DB_PORT",
    "AGENT_COORDINATOR_REST_PORT",
    "AGENT_COORDINATOR_REALTIME_PORT",
    "API_PORT",
    "COMPOSE_PROJECT_NAME",
    "SUPABASE_URL",
]


def test_allocate_json_shape_and_idempotence() -> None:
    first = run_cli("allocate", "worktree-1", "--json")
    assert first.returncode == 0
    body = json.loads(first.stdout)
    assert body["success"] is True
    allocation = body["allocation"]
    assert allocation["db_port"] == 10000 and allocation["api_port"] == 10003
    assert allocation["compose_project_name"].startswith("ac-")
    assert body["env_snippet"].startswith("export AGENT_COORDINATOR_DB_PORT=10000\n")
    again = json.loads(run_cli("allocate", "worktree-1", "--json").stdout)
    assert again["allocation"]["db_port"] == 10000
    assert again["allocation"]["created_at"] == allocation["created_at"]


def test_allocate_human_output() -> None:
    result = run_cli("allocate", "w")
    assert result.returncode == 0
    # Ports as `status` writes them: name, space, port.
    assert "  ports    db 10000  rest 10001  realtime 10002  api 10003\n" in result.stdout


def test_release_json_and_idempotent() -> None:
    run_cli("allocate", "s")
    assert json.loads(run_cli("release", "s", "--json").stdout) == {
        "success": True,
        "released": True,
    }
    again = run_cli("release", "s", "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout) == {"success": True, "released": False}


def test_status_json_and_table() -> None:
    run_cli("allocate", "a")
    run_cli("allocate", "b", "--ttl", "5")
    listing = json.loads(run_cli("status", "--json").stdout)
    assert [item["session_id"] for item in listing] == ["a", "b"]
    assert listing[1]["ttl_remaining_minutes"] <= 5.0
    table = run_cli("status", env={"COLUMNS": "200"})
    assert table.returncode == 0
    assert "2 active / 20 max" in table.stdout
    assert "10100-10199" in table.stdout


def test_env_formats_are_exact() -> None:
    sh = run_cli("env", "s").stdout
    assert [line.split("=")[0] for line in sh.splitlines()] == [f"export {v}" for v in DEFAULT_VARS]
    assert "export SUPABASE_URL=http://localhost:10001\n" in sh
    fish = run_cli("env", "s", "--format", "fish").stdout
    assert fish.splitlines()[0] == "set -gx AGENT_COORDINATOR_DB_PORT 10000"
    dotenv = run_cli("env", "s", "--format", "dotenv").stdout
    assert dotenv.splitlines()[3] == "API_PORT=10003"
    as_json = json.loads(run_cli("env", "s", "--format", "json").stdout)
    assert list(as_json) == DEFAULT_VARS
    assert all(isinstance(value, str) for value in as_json.values())
    bad = run_cli("env", "s", "--format", "xml")
    assert bad.returncode == 2 and "is not one of" in bad.stderr


def test_env_refreshes_ttl_and_reuses_lease() -> None:
    run_cli("allocate", "s", "--ttl", "1")
    run_cli("env", "s", "--ttl", "30")
    [lease] = json.loads(run_cli("status", "--json").stdout)
    assert lease["ttl_remaining_minutes"] > 29


def test_eval_env_in_bash(tmp_path: Path) -> None:
    portalloc = f"{shlex.quote(sys.executable)} -m portalloc"
    script = (
        f"cd {shlex.quote(str(tmp_path))} && "
        f'eval "$({portalloc} env)" && echo "$API_PORT $SUPABASE_URL"'
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "10003 http://localhost:10001\n"


def test_env_default_session_is_git_worktree_top(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "src" / "deep").mkdir(parents=True)
    (repo / ".git").mkdir()
    linked = tmp_path / "linked"
    (linked / "sub").mkdir(parents=True)
    (linked / ".git").write_text("gitdir: /elsewhere\n")  # a linked worktree has a .git file
    outside = tmp_path / "plain"
    outside.mkdir()
    run_cli("env", cwd=repo / "src" / "deep")
    run_cli("env", cwd=linked / "sub")
    run_cli("env", cwd=outside)
    sessions = {item["session_id"] for item in json.loads(run_cli("status", "--json").stdout)}
    assert sessions == {str(repo), str(linked), str(outside)}
    listing = json.loads(run_cli("status", "--json").stdout)
    assert {item["worktree"] for item in listing} == sessions


def test_env_for_worktree_is_reclaimed_when_directory_goes(tmp_path: Path) -> None:
    tree = tmp_path / "wt"
    tree.mkdir()
    run_cli("env", "--worktree", str(tree))
    tree.rmdir()
    result = run_cli("prune", "--json")
    assert json.loads(result.stdout)["reclaimed"][0]["reason"] == "worktree_gone"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("rest", "10001"),
        ("rest_port", "10001"),
        ("AGENT_COORDINATOR_REST_PORT", "10001"),
        ("SUPABASE_URL", "http://localhost:10001"),
    ],
)
def test_get_keys(key: str, expected: str) -> None:
    run_cli("allocate", "s")
    result = run_cli("get", "s", key)
    assert result.returncode == 0
    assert result.stdout == expected + "\n"


def test_get_compose_name_unknown_key_and_missing_session() -> None:
    allocation = json.loads(run_cli("allocate", "s", "--json").stdout)["allocation"]
    assert (
        run_cli("get", "s", "compose_project_name").stdout.strip()
        == (allocation["compose_project_name"])
    )
    unknown = run_cli("get", "s", "nope")
    assert unknown.returncode == 2 and "unknown key" in unknown.stderr
    missing = run_cli("get", "ghost", "rest")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr == "portalloc: no active lease for session 'ghost'\n"
    assert [i["session_id"] for i in json.loads(run_cli("status", "--json").stdout)] == ["s"]


def test_exhaustion_exit_3_and_json_body() -> None:
    env = {"PORT_ALLOC_MAX_SESSIONS": "1"}
    assert run_cli("allocate", "a", env=env).returncode == 0
    full = run_cli("allocate", "b", "--json", env=env)
    assert full.returncode == 3
    assert json.loads(full.stdout) == {"success": False, "error": "no_ports_available"}
    # One line: what is full, and what the user can change about it.
    assert full.stderr == (
        "portalloc: no ports available: 1 active lease reaches max_sessions (1); raise "
        "PORT_ALLOC_MAX_SESSIONS, or release a lease (`portalloc status` lists them)\n"
    )
    plain = run_cli("env", "b", env=env)
    assert plain.returncode == 3 and plain.stdout == ""


def test_exhaustion_names_the_setting_that_holds_max_sessions(tmp_path: Path) -> None:
    (tmp_path / "portalloc.toml").write_text("max_sessions = 1\n")
    assert run_cli("allocate", "a", "--ttl", "5", cwd=tmp_path).returncode == 0
    full = run_cli("allocate", "b", cwd=tmp_path)
    assert full.returncode == 3
    assert full.stderr == (
        "portalloc: no ports available: 1 active lease reaches max_sessions (1); raise "
        f"max_sessions in {tmp_path / 'portalloc.toml'}, or release a lease "
        "(`portalloc status` lists them)\n"
    )
    unset = NoPortsAvailable.limit_reached(3, 3, None).message
    assert unset.startswith("no ports available: 3 active leases reach max_sessions (3); ")
    assert "PORT_ALLOC_MAX_SESSIONS (or max_sessions in the project file)" in unset


@pytest.mark.parametrize(
    "args",
    [
        ["allocate", ""],
        ["allocate", "   "],
        ["allocate", "a\nb"],
        ["env", "x\x1by"],
        ["release", "tab\there"],
        ["get", "", "rest"],
        ["allocate", "a" * 4097],
    ],
)
def test_invalid_session_id_exit_2_nothing_written(state_dir: Path, args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("portalloc: invalid session id")
    assert result.stderr.count("\n") == 1
    assert not (state_dir / "leases.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["allocate"],
        ["allocate", "s", "--ttl", "0"],
        ["allocate", "s", "--ttl", "abc"],
        ["bogus"],
        ["why", "70000"],
        ["env", "--pid", "-3"],
    ],
)
def test_usage_errors_exit_2_with_one_line(state_dir: Path, args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("portalloc: ")
    assert result.stderr.count("\n") == 1
    assert not (state_dir / "leases.json").exists()


def test_missing_extra_exits_1_naming_it(tmp_path: Path) -> None:
    # Hide the mcp package as if the extra were not installed.
    code = (
        "import sys; sys.modules['mcp'] = None; "
        "from portalloc.adapters.cli import main; raise SystemExit(main(['mcp']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "pip install 'portalloc[mcp]'" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_hostile_session_ids_round_trip_and_stay_inert(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = [
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"'; touch {marker}; '",
        f'"; touch {marker}; "',
        "/home/me/my project/ünïcødé",
        "a" * 4096,
    ]
    for session in hostile:
        result = run_cli("allocate", session, "--json")
        assert result.returncode == 0
        assert json.loads(result.stdout)["allocation"]["session_id"] == session
        script = f'eval "$({shlex.quote(sys.executable)} -m portalloc env {shlex.quote(session)})"'
        subprocess.run(["bash", "-c", script], check=True)
    assert not marker.exists()
    listed = [item["session_id"] for item in json.loads(run_cli("status", "--json").stdout)]
    assert sorted(listed) == sorted(hostile)


def test_run_passes_env_releases_and_propagates_exit_code() -> None:
    result = run_cli("run", "job", "--", "sh", "-c", 'echo "$API_PORT"; exit 7')
    assert result.returncode == 7
    assert result.stdout == "10003\n"
    assert json.loads(run_cli("status", "--json").stdout) == []


def test_run_keep_and_missing_command() -> None:
    assert run_cli("run", "--keep", "job", "--", "true").returncode == 0
    assert [i["session_id"] for i in json.loads(run_cli("status", "--json").stdout)] == ["job"]
    missing = run_cli("run", "other", "--", "definitely-not-a-command-xyz")
    assert missing.returncode == 127
    assert "command not found" in missing.stderr


def test_run_leaves_the_commands_options_to_the_command_without_dashes() -> None:
    # Everything after SESSION is COMMAND's, as with env, sudo and uv run.
    echoed = run_cli("run", "tests", "echo", "--keep", "--ttl", "5")
    assert (echoed.returncode, echoed.stdout, echoed.stderr) == (0, "--keep --ttl 5\n", "")
    assert json.loads(run_cli("status", "--json").stdout) == []  # released, not kept
    helped = run_cli("run", "tests", "ls", "--help", env={"LC_ALL": "C"})
    assert helped.returncode == 0
    assert helped.stdout.startswith("Usage: ls ") and "portalloc" not in helped.stdout
    assert json.loads(run_cli("status", "--json").stdout) == []
    # An option COMMAND alone would read, not portalloc: `-h` is not our help either.
    short = run_cli("run", "tests", "sh", "-c", 'echo "$1"', "sh", "-h")
    assert (short.returncode, short.stdout) == (0, "-h\n")


def test_run_with_dashes_and_options_before_session() -> None:
    dashed = run_cli("run", "tests", "--", "echo", "--keep", "--")
    assert (dashed.returncode, dashed.stdout) == (0, "--keep --\n")
    assert json.loads(run_cli("status", "--json").stdout) == []
    kept = run_cli("run", "--keep", "--ttl", "5", "kept", "echo", "hi")
    assert (kept.returncode, kept.stdout) == (0, "hi\n")
    [lease] = json.loads(run_cli("status", "--json").stdout)
    assert lease["session_id"] == "kept"
    # `--` before SESSION ends portalloc's options: a session id may start with `-`.
    odd = run_cli("run", "--", "-odd", "--", "echo", "x")
    assert (odd.returncode, odd.stdout) == (0, "x\n")
    # portalloc's own options are checked where they belong; a bare `--` is no command.
    unknown = run_cli("run", "--bogus", "tests", "echo")
    assert unknown.returncode == 2 and "--bogus" in unknown.stderr and unknown.stdout == ""
    for argv in (("run", "tests"), ("run", "tests", "--")):
        empty = run_cli(*argv)
        assert empty.returncode == 2 and "COMMAND" in empty.stderr
        assert empty.stderr.count("\n") == 1
    assert [i["session_id"] for i in json.loads(run_cli("status", "--json").stdout)] == ["kept"]


def test_run_forwards_sigterm_and_releases(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = (
        "import signal, sys, pathlib, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
        f"pathlib.Path({str(ready)!r}).write_text('x')\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "portalloc", "run", "sig", "--", sys.executable, "-c", child],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "child never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 42
    assert json.loads(run_cli("status", "--json").stdout) == []


def test_run_killed_outright_leaves_lease_for_reclaim(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "portalloc",
            "run",
            "doomed",
            "--",
            "sh",
            "-c",
            f"touch {shlex.quote(str(ready))}; sleep 60",
        ],
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    result = json.loads(run_cli("prune", "--json").stdout)
    assert [(r["session_id"], r["reason"]) for r in result["reclaimed"]] == [
        ("doomed", "owner_dead")
    ]


def test_prune_human_output() -> None:
    assert run_cli("prune").stdout == "nothing to reclaim\n"


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("portalloc ")
    helptext = run_cli("--help").stdout
    for command in ("allocate", "release", "status", "env", "get", "run", "prune"):
        assert command in helptext


def test_console_script_matches_module() -> None:
    exe = Path(sys.executable).with_name("portalloc")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout == run_cli("--version").stdout


def test_deleted_current_directory_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    portalloc = shlex.join([sys.executable, "-m", "portalloc"])
    script = f"cd {shlex.quote(str(gone))} && rmdir ../gone && {portalloc} env; echo rc=$?"
    env_out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert env_out.stdout == "rc=2\n"
    assert env_out.stderr == "portalloc: the current directory no longer exists; pass SESSION\n"
    # With a session named, the command works: there is just no project file to find.
    gone.mkdir()
    script = f"cd {shlex.quote(str(gone))} && rmdir ../gone && {portalloc} env named >/dev/null"
    named = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert (named.returncode, named.stderr) == (0, "")


def test_unwritable_stdout_is_one_line_exit_1() -> None:
    with Path("/dev/full").open("w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "portalloc", "env", "s"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    assert proc.returncode == 1
    assert proc.stderr == "portalloc: cannot write (standard output): No space left on device\n"


def test_pid_of_no_running_process_is_refused(state_dir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    result = run_cli("allocate", "owned", "--pid", str(dead.pid))
    assert result.returncode == 2
    assert result.stderr == f"portalloc: no running process with PID {dead.pid} to own the lease\n"
    assert json.loads(run_cli("status", "--json").stdout) == []


def test_env_json_flag_is_the_json_format() -> None:
    flag = run_cli("env", "s", "--json")
    assert flag.returncode == 0
    assert json.loads(flag.stdout) == json.loads(run_cli("env", "s", "--format", "json").stdout)
    clash = run_cli("env", "s", "--json", "--format", "fish")
    assert clash.returncode == 2
    assert clash.stderr == "portalloc: --json and --format fish contradict each other\n"


def test_every_command_parses_alone_as_in_the_full_app() -> None:
    # main() builds only the named command (start-up time); its help must not change.
    from typer.testing import CliRunner

    from portalloc.adapters.cli import app
    from tests.helpers import invoke

    for name in ("allocate", "release", "status", "env", "get", "run", "prune", "check", "why"):
        alone = invoke(name, "--help", env={"COLUMNS": "80"})
        assert alone.returncode == 0, alone.stderr
        full = CliRunner(env={"COLUMNS": "80"}).invoke(app, [name, "--help"], prog_name="portalloc")
        # Same words; line breaks may differ (the runner's terminal width is its own).
        assert alone.stdout.split() == full.stdout.split()
        assert alone.stdout.startswith(f"Usage: portalloc {name} [OPTIONS]")


def test_run_of_an_empty_name_or_a_directory_is_126_as_documented(tmp_path: Path) -> None:
    """What a shell answers: 127 not found, 126 found but not runnable; the README says
    both (it once said only 127, and `run S ''` is 126)."""
    for command in ("", str(tmp_path)):
        result = run_cli("run", "s", "--", command)
        assert result.returncode == 126, (command, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert run_cli("run", "s", "--", "no-such-command-anywhere").returncode == 127
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert (
        "127 when the command is not found; 126 when it cannot be run: not executable, "
        "a directory, or an empty name as in `portalloc run S ''`"
    ) in readme


def test_run_of_a_file_that_cannot_be_executed_is_one_line(tmp_path: Path) -> None:
    script = tmp_path / "no-shebang"
    script.write_text("echo hi\n")
    script.chmod(0o755)
    result = run_cli("run", "s", "--", str(script))
    assert result.returncode == 126
    assert result.stderr == f"portalloc: cannot run {script}: Exec format error\n"
    assert json.loads(run_cli("status", "--json").stdout) == []  # released

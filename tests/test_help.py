"""What users see first: help text, shell completion, `status` at any width, `run` errors."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import typer

from portalloc import hooks
from portalloc.adapters import cli
from portalloc.adapters.views import shorten_left
from portalloc.render import FORMATS
from tests.helpers import invoke, needs_fish, run_cli

LONG_SESSION = "/home/someone/src/projects/shop-backend-feature-with-a-long-branch-name"
PORT_NAMES = ("db", "rest", "realtime", "api")  # the default profile's
HELP_SNAPSHOT = Path(__file__).parent / "data" / "help.txt"
# Typer's type labels: `<str>`, `<int range>`, `<list[Path]>`, `<path>`, `<float>`...
TYPE_NOISE = re.compile(r"<(?:str|int|float|bool|path|list|tuple|choice|datetime|uuid)\b[^>]*>")


def _command_paths(command: Any = None, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group of the CLI, `()` for portalloc itself: read from the app,
    so a command added later is covered without naming it here."""
    command = typer.main.get_command(cli.app) if command is None else command
    paths = [path]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        paths += _command_paths(sub, (*path, name))
    return paths


COMMAND_PATHS = _command_paths()


def _help(*path: str) -> str:
    result = invoke(*path, "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_command_is_covered() -> None:
    names = {" ".join(path) for path in COMMAND_PATHS}
    assert {"allocate", "why", "init", "trust", "untrust", "mcp", "serve"} <= names
    assert {"hook", "hook install", "hook uninstall"} <= names


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda path: " ".join(path) or "portalloc")
def test_help_has_no_type_noise_and_ends_with_examples(path: tuple[str, ...]) -> None:
    text = _help(*path)
    where = " ".join(("portalloc", *path))
    assert text.startswith(f"Usage: {where} "), text  # the usage line first, no blank lines
    assert not TYPE_NOISE.search(text), TYPE_NOISE.findall(text)
    assert "{" not in text.split("\n")[0]
    if path and path not in (("hook",), ("proxy",)):
        examples = text.split("Examples:\n", 1)[1]
        assert f"{where} " in examples or f"{where}\n" in examples, examples
    else:
        assert "\nCommands:\n" in text
    # An argument is listed as its metavar alone, as the usage line writes it.
    arguments = text.split("Arguments:\n", 1)[1].split("\n\n", 1)[0] if "Arguments:" in text else ""
    for row in re.findall(r"^  (\S.*?)(?:  |$)", arguments, re.M):
        assert row in text.split("\n")[0], (row, text)


def test_help_snapshots() -> None:
    """`portalloc … --help` at 80 columns for every command, as committed in
    tests/data/help.txt. After a deliberate change to a help text, rewrite the file
    with PORTALLOC_WRITE_HELP_SNAPSHOT=1 and review its diff."""
    shown = "".join(
        f"$ {' '.join(('portalloc', *path))} --help\n{_help(*path)}\n" for path in COMMAND_PATHS
    )
    if os.environ.get("PORTALLOC_WRITE_HELP_SNAPSHOT"):
        HELP_SNAPSHOT.write_text(shown)
    assert shown == HELP_SNAPSHOT.read_text(), (
        "a help text changed: if on purpose, PORTALLOC_WRITE_HELP_SNAPSHOT=1 pytest "
        "tests/test_help.py -k snapshots, and review `git diff tests/data/help.txt`"
    )


def test_hook_help_lists_the_tools_hooks_supports() -> None:
    for action, verb in (("install", "Wire"), ("uninstall", "Unwire")):
        text = " ".join(_help("hook", action).split())
        assert f"--for TOOL {verb} this tool: {', '.join(hooks.TOOLS)} (repeatable;" in text
    group = _help("hook")
    # Each subcommand's summary whole, not cut with "...".
    assert "install    Give every new worktree its ports, with no command typed.\n" in group
    assert "..." not in group.split("Commands:", 1)[1]


def test_a_group_alone_prints_its_help_like_portalloc_alone() -> None:
    for path in ((), ("hook",)):
        alone = run_cli(*path, process=True)
        assert alone.returncode == 2
        assert alone.stderr == ""
        assert alone.stdout.startswith(f"Usage: {' '.join(('portalloc', *path))} [OPTIONS]")


def test_a_missing_option_value_points_at_its_command_help() -> None:
    result = run_cli("hook", "install", "--for", process=True)
    assert result.returncode == 2
    assert result.stderr == (
        "portalloc: Option '--for' requires an argument. (see 'portalloc hook install --help')\n"
    )


def test_run_usage_line_and_format_choices() -> None:
    assert run_cli("run", "--help").stdout.startswith(
        "Usage: portalloc run [OPTIONS] SESSION [--] COMMAND [ARGS]...\n"
    )
    env_help = run_cli("env", "--help").stdout
    assert f"--format [{'|'.join(FORMATS)}]" in env_help
    assert env_help.startswith("Usage: portalloc env [OPTIONS] [SESSION]\n")
    bad = run_cli("env", "s", "--format", "xml")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "xml" in bad.stderr


def _help_on_a_terminal(env: dict[str, str]) -> bytes:
    """`portalloc --help` with its stdout on a pseudo-terminal, as a person sees it."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "portalloc", "env", "--help"],
        stdout=follower,
        stderr=follower,
        env={**os.environ, "TERM": "xterm-256color", **env},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=30)
    os.close(leader)
    return b"".join(chunks)


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {}])
def test_help_is_plain_text_even_on_a_terminal(env: dict[str, str]) -> None:
    shown = _help_on_a_terminal(env)
    assert b"Usage: portalloc env" in shown
    assert b"\x1b" not in shown  # no bold, italic or colour escapes


# --- completion through the shells' own machinery ----------------------------------------


@pytest.fixture
def ledger_with_sessions() -> dict[str, str]:
    env = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    for session in ("/src/shop-a", "/src/shop b", "/other", "x$(touch /tmp/pwn)"):
        assert run_cli("allocate", session, env=env).returncode == 0
    return env


def _bash_complete(line: str) -> list[str]:
    script = run_cli("--show-completion", env={"SHELL": "/bin/bash"}).stdout
    assert "_portalloc_completion" in script
    words = line.split(" ")
    program = (
        f"{script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_portalloc_completion portalloc\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    bin_dir = Path(sys.executable).parent
    out = subprocess.run(
        ["bash", "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        check=True,
    )
    return [line for line in out.stdout.split("\n") if line]


@pytest.mark.skipif(shutil.which("portalloc") is None, reason="needs the console script")
def test_bash_completion_offers_sessions_keys_and_formats(
    ledger_with_sessions: dict[str, str],
) -> None:
    assert _bash_complete("portalloc get /src/") == ["/src/shop b", "/src/shop-a"]
    assert _bash_complete("portalloc get /src/shop-a re") == [
        "rest",
        "realtime",
        "rest_port",
        "realtime_port",
    ]
    assert _bash_complete("portalloc env --format ") == list(FORMATS)
    assert "x$(touch /tmp/pwn)" not in _bash_complete("portalloc release ")
    assert not Path("/tmp/pwn").exists()


@pytest.mark.skipif(shutil.which("portalloc") is None, reason="needs the console script")
def test_bash_completion_offers_the_hook_tools_not_files() -> None:
    assert _bash_complete("portalloc hook install --for ") == list(hooks.TOOLS)
    assert _bash_complete("portalloc hook install --for c") == ["claude", "codex", "conductor"]
    assert _bash_complete("portalloc hook install --for git --for d") == ["direnv"]
    assert _bash_complete("portalloc hook uninstall --for wo") == ["worktrunk"]
    assert _bash_complete("portalloc hook install --for READ") == []  # no README.md


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_offers_sessions(ledger_with_sessions: dict[str, str]) -> None:
    # The zsh function evals what the program prints; _arguments is stubbed to show it.
    program = (
        '_arguments() { print -rl -- "$@" }\n'
        'eval $(env _TYPER_COMPLETE_ARGS="portalloc release /src/" '
        f"_PORTALLOC_COMPLETE=complete_zsh {sys.executable} -m portalloc)\n"
    )
    out = subprocess.run(
        ["zsh", "-f", "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert '"/src/shop b"' in out.stdout and '"/src/shop-a"' in out.stdout
    assert "/other" not in out.stdout


@needs_fish
def test_fish_completion_offers_formats() -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = subprocess.run(
        [sys.executable, "-m", "portalloc"],
        env={**env, "_PORTALLOC_COMPLETE": "source_fish"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    if shutil.which("portalloc", path=env["PATH"]) is None:
        pytest.skip("needs the console script")
    out = subprocess.run(
        ["fish", "--no-config", "-c", f"{script}\ncomplete -C 'portalloc env --format '"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    assert sorted(out.stdout.split()) == sorted(FORMATS)


# --- status at any width -----------------------------------------------------------------


@pytest.fixture
def three_kinds_of_lease() -> Iterator[list[dict[str, Any]]]:
    """A long TTL session, a short one held by this process, and a worktree's lease at a
    path of a known length (67 characters); the probe is off, on purpose: only the
    layout matters here. Yields the leases as `status --json` lists them."""
    base = Path(tempfile.mkdtemp(prefix="pa-", dir="/tmp"))
    worktree = base / "src" / "worktrees" / "shop-feature-with-a-long-branch-name"
    worktree.mkdir(parents=True)
    assert len(str(worktree)) == 67
    env = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    for args in (
        ("env", "--worktree", str(worktree)),
        ("allocate", "short", "--pid", str(os.getpid())),
        ("allocate", LONG_SESSION),
    ):
        assert run_cli(*args, env=env).returncode == 0
    yield json.loads(run_cli("status", "--json").stdout)
    shutil.rmtree(base)


def _table_columns(text: str) -> list[list[str]]:
    """The cells of a status table, column by column, header included."""
    rows = [re.split("[│┃]", line)[1:-1] for line in text.splitlines() if line[:1] in "│┃"]
    return [list(column) for column in zip(*rows, strict=True)]


@pytest.mark.parametrize("columns", [60, 80, 100, 120, 140, 200])
def test_status_uses_the_width(three_kinds_of_lease: list[dict[str, Any]], columns: int) -> None:
    text = run_cli("status", env={"COLUMNS": str(columns)}).stdout
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= columns
    is_table = "┃" in text
    # A table from 100 columns up when it holds every path whole (at 140 it does; at
    # 120 that depends on the width of `pid N runs`), lines per lease below.
    assert is_table if columns >= 140 else (columns >= 100 or not is_table), text
    for lease in three_kinds_of_lease:
        session = lease["session_id"]
        # The whole path when the width holds it; else the longest suffix that fits,
        # cut at a `/`: never less of it than a narrower terminal shows.
        shown = session if len(session) <= columns else shorten_left(session, columns)
        cells = {cell.strip() for line in lines for cell in re.split("[│┃]", line)}
        assert shown in cells, (shown, text)
        # Ports on one line, as they fit at every width here; blocks never cut.
        ports = "  ".join(f"{name} {lease[f'{name}_port']}" for name in PORT_NAMES)
        assert ports in text, (ports, text)
        assert f"{lease['block_start']}-{lease['block_end']}" in text
    # The owner is named once: what holds the lease says `pid N runs`.
    assert text.count(f"pid {os.getpid()}") == 1 and "owner" not in text, text
    if is_table:
        # No column wider than its widest cell (each cell is padded by one space a side).
        for column in _table_columns(text):
            assert any(len(cell.strip()) == len(cell) - 2 for cell in column), column


def test_status_wide_table_shows_the_issue_case_whole(
    three_kinds_of_lease: list[dict[str, Any]],
) -> None:
    """140 columns show the whole worktree path, each lease's ports on one line, its names
    on another, and no empty cells after the longest path (once: `…/worktrees/shop-feature-…`,
    4 rows of ports per lease and the owner twice)."""
    text = run_cli("status", env={"COLUMNS": "140"}).stdout
    worktree = three_kinds_of_lease[0]["session_id"]
    first = _table_columns(text)[0]
    assert worktree in [cell.strip() for cell in first]
    assert f" {LONG_SESSION} " in first  # the longest: it sets the column's width
    ports_rows = [cell for cell in first if cell.startswith("   db ")]
    assert len(ports_rows) == 3, text  # one line of ports per lease
    names = [cell for cell in first if cell.strip().startswith("*.")]
    assert len(names) == 3, text  # one line of names per lease: `*.<slug>.localhost:9999`
    assert len(first) == 1 + 3 * 3  # the header, then a session, its ports and names per lease


def test_status_table_packs_many_ports_into_the_width(tmp_path: Path) -> None:
    names = "abcdefghijkl"
    (tmp_path / "portalloc.toml").write_text(
        "[ports]\n" + "".join(f"{name} = {offset}\n" for offset, name in enumerate(names))
    )
    env = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    assert run_cli("allocate", "many", env=env, cwd=tmp_path).returncode == 0
    text = run_cli("status", env={"COLUMNS": "100"}, cwd=tmp_path).stdout
    assert "┃" in text
    first = _table_columns(text)[0]
    room = len(first[0]) - 2 - 2  # the column's text, less the ports' indent
    rows = [cell.strip() for cell in first[2:]]
    assert rows[-1] == "*.many.localhost:9999", text  # the names, under the ports
    rows = rows[:-1]
    items = [row.split("  ") for row in rows]
    # In order, a name always with its port, on as few lines as fit: the next port
    # would not have fit on any line but the last.
    assert [item.split(" ")[0] for row in items for item in row] == list(names)
    for row, following in pairwise(items):
        assert len("  ".join(row)) <= room < len("  ".join([*row, following[0]]))
    assert len(rows) == 3, text


def test_shorten_left_keeps_whole_components() -> None:
    assert shorten_left("/a/bb/ccc", 20) == "/a/bb/ccc"
    assert shorten_left("/a/bb/ccc", 8) == "…/bb/ccc"
    assert shorten_left("/a/bb/ccc", 6) == "…/ccc"
    assert shorten_left("/a/bb/ccccccccc", 6) == "/a/bb/ccccccccc"  # wrapped, never cut
    assert shorten_left("no-slashes-at-all", 5) == "no-slashes-at-all"


# --- run ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("exact_ports")  # stderr holds the error alone, no skipped block
def test_run_unknown_command_is_an_error_not_a_warning() -> None:
    result = run_cli("run", "s", "--", "no-such-command-xyz")
    assert result.returncode == 127
    assert result.stderr == "portalloc: command not found: no-such-command-xyz\n"
    assert json.loads(run_cli("status", "--json").stdout) == []


def test_readme_shows_the_real_run_help() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("$ portalloc run --help\n", 1)[1].split("\n    ...\n", 1)[0]
    assert run_cli("run", "--help").stdout.startswith(block + "\n")

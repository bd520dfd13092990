"""What users see first: help text, shell completion, `status` at any width, `run` errors."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from portalloc.adapters.views import shorten_left
from tests.helpers import needs_fish, run_cli

COMMANDS = ["allocate", "release", "status", "env", "get", "run", "prune", "check", "why"]
LONG_SESSION = "/home/someone/src/projects/shop-backend-feature-with-a-long-branch-name"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_type_noise_and_ends_with_examples(command: str) -> None:
    text = run_cli(command, "--help").stdout
    assert "<bool>" not in text and "{" not in text.split("\n")[0]
    assert "Examples:\n" in text
    examples = text.split("Examples:\n", 1)[1]
    assert f"portalloc {command}" in examples or (
        command == "status" and "portalloc status" in examples
    )


def test_run_usage_line_and_format_choices() -> None:
    assert run_cli("run", "--help").stdout.startswith(
        "Usage: portalloc run [OPTIONS] SESSION [--] COMMAND [ARGS]...\n"
    )
    env_help = run_cli("env", "--help").stdout
    assert "--format [sh|fish|dotenv|json]" in env_help
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
    assert _bash_complete("portalloc env --format ") == ["sh", "fish", "dotenv", "json"]
    assert "x$(touch /tmp/pwn)" not in _bash_complete("portalloc release ")
    assert not Path("/tmp/pwn").exists()


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
    assert sorted(out.stdout.split()) == ["dotenv", "fish", "json", "sh"]


# --- status at any width -----------------------------------------------------------------


@pytest.mark.parametrize("columns", [60, 80, 120, 200])
def test_status_keeps_sessions_ports_and_blocks_whole(columns: int) -> None:
    env = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    run_cli("allocate", LONG_SESSION, env=env)
    run_cli("allocate", "short", env=env)
    text = run_cli("status", env={"COLUMNS": str(columns)}).stdout
    assert max(len(line) for line in text.splitlines()) <= columns
    for needle in ("10000-10099", "10100-10199", "realtime 10002", "api 10103", "min left"):
        assert needle in text, (needle, text)
    flat = text.replace("\n", " ")
    # The session: whole, or shortened from the left at a `/`, never cut inside a name.
    parts = LONG_SESSION.split("/")
    shortened = ["…/" + "/".join(parts[-keep:]) for keep in range(1, len(parts))]
    assert LONG_SESSION in flat or any(form in flat for form in shortened), text
    assert "short" in text


def test_shorten_left_keeps_whole_components() -> None:
    assert shorten_left("/a/bb/ccc", 20) == "/a/bb/ccc"
    assert shorten_left("/a/bb/ccc", 8) == "…/bb/ccc"
    assert shorten_left("/a/bb/ccc", 6) == "…/ccc"
    assert shorten_left("/a/bb/ccccccccc", 6) == "/a/bb/ccccccccc"  # wrapped, never cut
    assert shorten_left("no-slashes-at-all", 5) == "no-slashes-at-all"


# --- run ---------------------------------------------------------------------------------


def test_run_unknown_command_is_an_error_not_a_warning() -> None:
    result = run_cli("run", "s", "--", "no-such-command-xyz")
    assert result.returncode == 127
    assert result.stderr == "portalloc: command not found: no-such-command-xyz\n"
    assert json.loads(run_cli("status", "--json").stdout) == []


def test_readme_shows_the_real_run_help() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("$ portalloc run --help\n", 1)[1].split("\n    ...\n", 1)[0]
    assert run_cli("run", "--help").stdout.startswith(block + "\n")

"""Hostile session ids and config values through every command and output format.

Each one is either rejected (exit 2, one line, ledger untouched) or round-trips
exactly and stays inert under `eval` in bash, `source` in fish and python-dotenv.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from portalloc.adapters.cli import app
from tests.helpers import HAVE_FISH, trust

MARK = "/tmp/portalloc-hostile-marker"

ACCEPTED = [
    f"$(touch {MARK})",
    f"`touch {MARK}`",
    f"'; touch {MARK}; '",
    f'"; touch {MARK}; "',
    "a b  c",
    "/home/me/my project/worktree",
    "x" * 4096,
    "שלום עולם",
    "\u202etxt.exe",  # right-to-left override
    "e\u0301\u0301",  # combining accents
    "🚀 rocket",
    "; rm -rf / #",
    "$HOME",
    "${PATH}",
    "\\back\\slash\\",
    "it's",
    'say "hi"',
    "--json",
    "*",
    "~",
    "a|b&c>d<e",
    "%s%n%x",
    "back`tick",
    "$'\\x41'",
    "!history",
    "{session_id}",
    "\u2028line separator",
    "-",
]
REJECTED = [
    "",
    "   ",
    "x" * 5000,
    "tab\there",
    "new\nline",
    "nul\x00byte",
    "esc\x1b[31m",
    "cr\rhere",
    "del\x7f",
    "nel\x85",
]


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(autouse=True)
def no_marker() -> None:
    """Start clean, so a marker left by an earlier failure cannot hide or fake a result."""
    Path(MARK).unlink(missing_ok=True)


def invoke(*args: str) -> Outcome:
    result = CliRunner().invoke(app, list(args))
    return Outcome(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose environment block carries the session id itself."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "portalloc.toml").write_text(
        "range = 4\nmax_sessions = 100\n[ports]\napi = 0\n"
        '[env]\nAPI_PORT = "{api_port}"\nSESSION = "{session_id}"\nLABEL = "id={session_id}"\n'
    )
    trust(project / "portalloc.toml")
    monkeypatch.chdir(project)
    monkeypatch.setenv("PORTALLOC_SKIP_PORT_CHECK", "1")
    return project


def test_table_is_big_enough() -> None:
    assert len(ACCEPTED) + len(REJECTED) >= 30


def test_accepted_ids_round_trip_through_every_command(profile: Path, tmp_path: Path) -> None:
    sh_files: list[Path] = []
    fish_files: list[Path] = []
    for index, session in enumerate(ACCEPTED):
        allocated = invoke("allocate", "--json", "--", session)
        assert allocated.code == 0, (session, allocated.stderr)
        assert json.loads(allocated.stdout)["allocation"]["session_id"] == session

        as_json = json.loads(invoke("env", "--format", "json", "--", session).stdout)
        assert as_json["SESSION"] == session
        assert as_json["LABEL"] == f"id={session}"

        assert invoke("get", "--", session, "session_id").stdout == session + "\n"
        assert invoke("get", "--", session, "SESSION").stdout == session + "\n"

        sh = tmp_path / f"env-{index}.sh"
        sh.write_text(invoke("env", "--", session).stdout)
        sh_files.append(sh)
        fish = tmp_path / f"env-{index}.fish"
        fish.write_text(invoke("env", "--format", "fish", "--", session).stdout)
        fish_files.append(fish)

        dotenv = invoke("env", "--format", "dotenv", "--", session)
        if "${" in session or ("$" in session and any(char in session for char in "'\\")):
            assert dotenv.code == 2  # no dotenv spelling both readers agree on
            assert dotenv.stderr.count("\n") == 1
        else:
            from dotenv import dotenv_values

            path = tmp_path / f"{index}.env"
            path.write_text(dotenv.stdout)
            assert dotenv_values(path)["SESSION"] == session

    listed = {item["session_id"] for item in json.loads(invoke("status", "--json").stdout)}
    assert listed == set(ACCEPTED)

    # One shell per format evaluates every block and prints the values NUL-separated.
    script = "".join(f'eval "$(cat {p})"; printf "%s\\0" "$SESSION";' for p in sh_files)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split("\0")[:-1] == ACCEPTED
    if HAVE_FISH:
        script = "".join(f'source {p}; printf "%s\\0" "$SESSION";' for p in fish_files)
        out = subprocess.run(["fish", "-c", script], capture_output=True, text=True, check=True)
        assert out.stdout.split("\0")[:-1] == ACCEPTED
    assert not Path(MARK).exists()

    for session in ACCEPTED:
        released = invoke("release", "--json", "--", session)
        assert json.loads(released.stdout) == {"success": True, "released": True}
    assert json.loads(invoke("status", "--json").stdout) == []


@pytest.mark.parametrize("session", REJECTED, ids=range(len(REJECTED)))
def test_rejected_ids_exit_2_everywhere(profile: Path, state_dir: Path, session: str) -> None:
    invoke("allocate", "--", "bystander")
    before = (state_dir / "leases.json").read_bytes()
    for args in (
        ["allocate", "--", session],
        ["env", "--", session],
        ["env", "--format", "fish", "--", session],
        ["env", "--format", "dotenv", "--", session],
        ["env", "--format", "json", "--", session],
        ["get", "--", session, "api"],
        ["release", "--", session],
        ["check", "--", session],
    ):
        outcome = invoke(*args)
        assert outcome.code == 2, (args, outcome)
        assert outcome.stdout == ""
        assert outcome.stderr.startswith("portalloc: invalid session id")
        assert outcome.stderr.count("\n") == 1
    assert (state_dir / "leases.json").read_bytes() == before


# Every template must use a field of the lease; the hostile part is around it.
_HOSTILE_TEXTS = [
    f"$(touch {MARK})",
    f"`touch {MARK}`",
    'it\'s a "quote" \\ party',
    "$HOME and $PATH",
    "unicode ✓ שלום",
    "semi; colon | pipe & amp",
    "http://localhost:{api_port}/?q='x'",
    "#not a comment",
]
HOSTILE_TEMPLATES = [t if "{api_port}" in t else t + " {api_port}" for t in _HOSTILE_TEXTS]


@pytest.mark.usefixtures("exact_ports")  # the values hold the default port numbers
def test_hostile_template_values_are_inert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "p"
    project.mkdir()
    lines = ["[ports]", "api = 0", "[env]"]
    for index, template in enumerate(HOSTILE_TEMPLATES):
        lines.append(f"V{index} = {json.dumps(template)}")
    (project / "portalloc.toml").write_text("\n".join(lines) + "\n")
    trust(project / "portalloc.toml")
    monkeypatch.chdir(project)
    expected = [t.replace("{api_port}", "10000") for t in HOSTILE_TEMPLATES]

    sh = invoke("env", "s").stdout
    printer = "".join(f'printf "%s\\0" "$V{i}";' for i in range(len(expected)))
    out = subprocess.run(
        ["bash", "-c", f"eval {shlex.quote(sh)}; {printer}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split("\0")[:-1] == expected
    if HAVE_FISH:
        fish_file = tmp_path / "env.fish"
        fish_file.write_text(invoke("env", "--format", "fish", "s").stdout)
        out = subprocess.run(
            ["fish", "-c", f"source {fish_file}; {printer}"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.split("\0")[:-1] == expected
    dotenv = invoke("env", "--format", "dotenv", "s")
    # V3 mixes "$" with nothing that needs escaping, V2 has quotes without "$": both fit.
    assert dotenv.code == 0, dotenv.stderr
    from dotenv import dotenv_values

    env_file = tmp_path / ".env"
    env_file.write_text(dotenv.stdout)
    assert list(dotenv_values(env_file, interpolate=True).values()) == expected
    assert not Path(MARK).exists()

"""Environment block formats: exact shapes, and values that stay inert in every shell."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portalloc.errors import UsageError
from portalloc.render import FORMATS, render, render_dotenv
from tests.helpers import needs_fish

ROOT = Path(__file__).resolve().parent.parent

ENV = {
    "AGENT_COORDINATOR_DB_PORT": "10000",
    "COMPOSE_PROJECT_NAME": "ac-1a2b3c4d",
    "SUPABASE_URL": "http://localhost:10001",
}
NASTY = [
    "$(touch /tmp/portalloc-pwned)",
    "`touch /tmp/portalloc-pwned`",
    "it's; rm -rf ~ #",
    'double "quoted" \\ back',
    "line\nbreak $HOME",
    "ünïcødé 🚀 ‮rtl",
    "spaces  and\ttabs",
    "*?[glob]",
    "%self",
    "~root",
    "{a,b}",
    "",
]


def test_sh_shape() -> None:
    assert render(ENV, "sh") == (
        "export AGENT_COORDINATOR_DB_PORT=10000\n"
        "export COMPOSE_PROJECT_NAME=ac-1a2b3c4d\n"
        "export SUPABASE_URL=http://localhost:10001\n"
    )


def test_fish_dotenv_json_shapes() -> None:
    assert render(ENV, "fish").splitlines()[0] == "set -gx AGENT_COORDINATOR_DB_PORT 10000"
    assert render(ENV, "dotenv").splitlines()[1] == "COMPOSE_PROJECT_NAME=ac-1a2b3c4d"
    assert json.loads(render(ENV, "json")) == ENV


def test_unknown_format() -> None:
    with pytest.raises(UsageError):
        render(ENV, "xml")


@pytest.mark.parametrize("value", NASTY)
def test_sh_values_are_shlex_quoted_and_inert_under_eval(value: str, tmp_path: Path) -> None:
    text = render({"V": value}, "sh")
    assert text == f"export V={shlex.quote(value)}\n"
    script = f'eval "$(cat {shlex.quote(str(tmp_path / "env.sh"))})"; printf %s "$V"'
    (tmp_path / "env.sh").write_text(text)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == value
    assert not Path("/tmp/portalloc-pwned").exists()


@needs_fish
@pytest.mark.parametrize("value", NASTY)
def test_fish_values_round_trip(value: str, tmp_path: Path) -> None:
    (tmp_path / "env.fish").write_text(render({"V": value}, "fish"))
    out = subprocess.run(
        ["fish", "-c", f'source {tmp_path / "env.fish"}; printf %s "$V"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == value


@pytest.mark.parametrize("value", [v for v in NASTY if "$" not in v or "'" not in v])
def test_dotenv_values_round_trip_through_python_dotenv(value: str, tmp_path: Path) -> None:
    from dotenv import dotenv_values

    if "$" in value and any(c in value for c in "'\\\n\r"):
        with pytest.raises(UsageError):
            render_dotenv({"V": value})
        return
    path = tmp_path / ".env"
    path.write_text(render({"V": value}, "dotenv"))
    assert dotenv_values(path) == {"V": value}


# --- PowerShell ----------------------------------------------------------------------

# Written from the PowerShell language specification (3.0, 2.3.5.2 "String literals"),
# not from portalloc's renderer:
#
#   verbatim-string-literal:
#       single-quote-character verbatim-string-characters~opt~ single-quote-character
#   single-quote-character: ' (U+0027), U+2018, U+2019, U+201A, U+201B
#   verbatim-string-part:
#       any Unicode character except single-quote-character
#       single-quote-character single-quote-character
SINGLE_QUOTE_CHARACTERS = "\u0027\u2018\u2019\u201a\u201b"
ASSIGNMENT = re.compile(r"\$env:([A-Za-z_][A-Za-z0-9_]*) = ")


def verbatim_string(text: str, start: int) -> tuple[str, int]:
    """The value of the verbatim-string-literal at TEXT[START], and where it ends."""
    assert text[start] in SINGLE_QUOTE_CHARACTERS, text[start:]
    position, value = start + 1, []
    while True:
        if position == len(text):
            raise AssertionError(f"unterminated string: {text[start:]!r}")
        char = text[position]
        if char in SINGLE_QUOTE_CHARACTERS:
            following = text[position + 1 : position + 2]
            if following and following in SINGLE_QUOTE_CHARACTERS:
                # A pair stands for one quote (the grammar does not say which of two
                # different ones; a pair of the same one is that one).
                value.append(following)
                position += 2
                continue
            return "".join(value), position + 1
        value.append(char)
        position += 1


def powershell_assignments(text: str) -> dict[str, str]:
    """`$env:NAME = '...'` statements, one a line, as PowerShell reads them."""
    found: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = ASSIGNMENT.match(text, position)
        assert match is not None, text[position:]
        value, position = verbatim_string(text, match.end())
        assert text[position] == "\n", text[position:]
        position += 1
        found[match.group(1)] = value
    return found


def test_powershell_shape() -> None:
    assert render({"API_PORT": "10003", "Q": "it's"}, "powershell") == (
        "$env:API_PORT = '10003'\n$env:Q = 'it''s'\n"
    )
    # The typographic single quotes end a PowerShell string too: each is doubled.
    assert render({"Q": "\u2018a\u2019 \u201ab\u201b"}, "powershell") == (
        "$env:Q = '\u2018\u2018a\u2019\u2019 \u201a\u201ab\u201b\u201b'\n"
    )


@pytest.mark.parametrize("value", NASTY)
def test_powershell_values_round_trip(value: str) -> None:
    assert powershell_assignments(render({"V": value}, "powershell")) == {"V": value}


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
values = st.text(
    st.one_of(st.sampled_from(SINGLE_QUOTE_CHARACTERS + '$`"\n\r\t @(){};#'), st.characters())
)


@given(st.dictionaries(names, values, max_size=5))
def test_powershell_reads_back_every_value(env: dict[str, str]) -> None:
    assert powershell_assignments(render(env, "powershell")) == env


# --- the registry ----------------------------------------------------------------------

# A format registered in render.FORMATS, then a command through the entry point.
REGISTER = """
import sys
from portalloc import render
render.FORMATS["upper"] = render.Format(
    "upper", "a test's", lambda env: "".join(f"{k}:{v.upper()}\\n" for k, v in env.items())
)
from portalloc.adapters.entry import main
code = main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.write(f"\\nfull CLI: {'portalloc.adapters.cli' in sys.modules}\\n")
raise SystemExit(code)
"""


def _with_upper(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    environ.update(PYTHONPATH=str(ROOT), PORTALLOC_SKIP_PORT_CHECK="1", **env)
    return subprocess.run(
        [sys.executable, "-c", REGISTER, *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_a_registered_format_is_in_the_help_the_completion_and_the_read_path() -> None:
    assert list(FORMATS)[:5] == ["sh", "fish", "dotenv", "json", "powershell"]
    assert _with_upper("allocate", "s").returncode == 0
    served = _with_upper("env", "s", "--format", "upper")
    assert "API_PORT:1" in served.stdout and "COMPOSE_PROJECT_NAME:AC-" in served.stdout
    assert served.stderr.endswith("full CLI: False\n")  # the read path rendered it
    shown = _with_upper("env", "--help").stdout
    assert f"--format [{'|'.join(FORMATS)}|upper]" in shown
    assert "upper (a test's)" in " ".join(shown.split())
    completed = _with_upper(
        _PORTALLOC_COMPLETE="complete_bash", COMP_WORDS="portalloc env --format ", COMP_CWORD="3"
    )
    assert completed.stdout.split() == [*FORMATS, "upper"]
    # The full CLI renders it too (a lease to refresh: no read path).
    full = _with_upper("env", "s", "--format", "upper", "--ttl", "5")
    assert "API_PORT:1" in full.stdout and full.stderr.endswith("full CLI: True\n")

"""Environment block formats: exact shapes, and values that stay inert in every shell."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from portalloc.errors import UsageError
from portalloc.render import render, render_dotenv
from tests.helpers import needs_fish

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

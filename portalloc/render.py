"""The environment block in each output format, quoted so no value can execute.

FORMATS, at the end, is the one list of them: `env --format`'s choices, its help and
completion, the read path and the tests all read it. A format is a function from the
variables to text, and one entry there.
"""

from __future__ import annotations

import json
import re
import shlex

from portalloc.errors import UsageError

# NamedTuple without importing typing: the read path (`portalloc env`) renders.
from portalloc.records import NamedTuple
from portalloc.rules import SHELL_NAME

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

_BARE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
# fish also expands a leading `%` (`%self` is its own PID in older releases).
_FISH_BARE = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def _checked(env: Mapping[str, str]) -> Mapping[str, str]:
    # The last line of defence: config and ledger loading already refuse such names.
    for name in env:
        if not SHELL_NAME.fullmatch(name):
            raise UsageError(f"refusing to print variable {name!r}: not a valid shell name")
    return env


def sh_quote(value: str) -> str:
    """shlex.quote, and quotes for a leading `=` or `~` and for `:=`/`:~`, which zsh
    expands in an assignment (`=ls` becomes /usr/bin/ls)."""
    quoted = shlex.quote(value)
    if quoted == value and value and (value[0] in "=~" or ":=" in value):
        return "'" + value + "'"  # shlex found nothing to escape: no quote inside
    return quoted


def render_sh(env: Mapping[str, str]) -> str:
    return "".join(f"export {name}={sh_quote(value)}\n" for name, value in _checked(env).items())


def fish_quote(value: str) -> str:
    if _FISH_BARE.fullmatch(value):
        return value
    # Inside fish single quotes only \\ and \' are escapes; nothing expands.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_fish(env: Mapping[str, str]) -> str:
    return "".join(f"set -gx {name} {fish_quote(value)}\n" for name, value in _checked(env).items())


def dotenv_quote(name: str, value: str) -> str:
    """Quote so docker compose and python-dotenv both read VALUE back unchanged."""
    if _BARE.fullmatch(value):
        return value
    if "${" in value:
        # python-dotenv expands ${NAME} inside any quotes and has no escape for it.
        raise UsageError(f"{name} cannot be written as dotenv: python-dotenv would expand '${{'")
    if not any(char in value for char in "'\\\n\r"):
        # Single quotes: neither reader expands or unescapes anything inside.
        return f"'{value}'"
    if "$" in value:
        # Inside double quotes both readers expand variables, and they disagree
        # on how to escape a dollar sign: no spelling is read back the same.
        raise UsageError(
            f"{name} cannot be written as dotenv: it holds '$' together with a single quote, "
            "a backslash or a line break"
        )
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def render_dotenv(env: Mapping[str, str]) -> str:
    return "".join(f"{name}={dotenv_quote(name, value)}\n" for name, value in _checked(env).items())


def render_json(env: Mapping[str, str]) -> str:
    return json.dumps(dict(env), indent=2) + "\n"


# What PowerShell takes for a single quote (its language specification, 2.3.5.2,
# single-quote-character): the apostrophe and the typographic U+2018 to U+201B.
POWERSHELL_QUOTES = "'\u2018\u2019\u201a\u201b"
_DOUBLED = {ord(quote): quote * 2 for quote in POWERSHELL_QUOTES}  # no regex to compile


def powershell_quote(value: str) -> str:
    """VALUE as a PowerShell verbatim (single-quoted) string: nothing inside expands,
    neither `$` nor a backtick; a quote character inside is written twice."""
    return "'" + value.translate(_DOUBLED) + "'"


def render_powershell(env: Mapping[str, str]) -> str:
    return "".join(
        f"$env:{name} = {powershell_quote(value)}\n" for name, value in _checked(env).items()
    )


class Format(NamedTuple):
    """An output format of `portalloc env --format`."""

    name: str
    note: str  # who reads it, for --help ("" when the name says it)
    render: Callable[[Mapping[str, str]], str]


FORMATS: dict[str, Format] = {
    entry.name: entry
    for entry in (
        Format("sh", "bash, zsh, dash", render_sh),
        Format("fish", "", render_fish),
        Format("dotenv", "docker compose, python-dotenv", render_dotenv),
        Format("json", "", render_json),
        Format("powershell", "$env:NAME = '...'", render_powershell),
    )
}


def render(env: Mapping[str, str], fmt: str) -> str:
    found = FORMATS.get(fmt)
    if found is None:
        raise UsageError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    return found.render(env)

"""What docker compose makes of a compose file's text, as far as `portalloc init` needs
it: variable interpolation (compose's own rules) and the syntax of published ports.

Interpolation follows compose-go: `$$` is a literal `$`; `$NAME` and `${NAME}` are
the variable or empty; `${NAME:-d}`/`${NAME-d}` default when unset or empty / unset;
`${NAME:?e}`/`${NAME?e}` fail when unset or empty / unset; `${NAME:+r}`/`${NAME+r}`
replace when set and non-empty / set. Defaults nest (`${A:-${B:-1}}`). Any other `$`
is an invalid template, which compose refuses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

NAME = re.compile(r"[_A-Za-z][_A-Za-z0-9]*")
_BRACED = re.compile(r"([_A-Za-z][_A-Za-z0-9]*)(?:(:?[-+?])(.*))?", re.DOTALL)
PORT = re.compile(r"[0-9]{1,5}")
PORT_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


class TemplateError(ValueError):
    """A `$` compose would refuse, or a required variable without a value."""


def _closing(text: str, start: int) -> int:
    """The index of the `}` closing the `${` at START, or -1."""
    depth = 0
    index = start
    while index < len(text):
        if text.startswith("${", index):
            depth += 1
            index += 2
            continue
        if text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return -1


def interpolate(text: str, env: Mapping[str, str], *, required: bool = True) -> str:
    """TEXT as compose reads it with the variables ENV. With REQUIRED false a missing
    `${X:?e}` reads as empty instead of failing: only the syntax is checked."""
    out: list[str] = []
    index = 0
    while True:
        dollar = text.find("$", index)
        if dollar < 0:
            out.append(text[index:])
            return "".join(out)
        out.append(text[index:dollar])
        following = text[dollar + 1 : dollar + 2]
        named = NAME.match(text, dollar + 1)
        if following == "$":
            out.append("$")
            index = dollar + 2
        elif named:
            out.append(env.get(named.group(), ""))
            index = named.end()
        elif following == "{":
            end = _closing(text, dollar)
            body = _BRACED.fullmatch(text, dollar + 2, end) if end > 0 else None
            if body is None:
                raise TemplateError(f"invalid interpolation in {text!r}")
            out.append(_substitute(body, env, required))
            index = end + 1
        else:
            raise TemplateError(f"invalid interpolation in {text!r} (write $$ for a literal $)")


def _substitute(body: re.Match[str], env: Mapping[str, str], required: bool) -> str:
    name, operator, argument = body.group(1), body.group(2), body.group(3)
    value = env.get(name)
    if operator is None:
        return value or ""
    # compose expands the default, message or replacement even when it is not used.
    expanded = interpolate(argument, env, required=required)
    is_set = value is not None if ":" not in operator else bool(value)
    kind = operator[-1]
    if kind == "-":
        return value if is_set and value is not None else expanded
    if kind == "+":
        return expanded if is_set else ""
    if not is_set and required:
        raise TemplateError(f"required variable {name} is missing a value: {expanded}")
    return value or ""


def split_colons(text: str) -> list[str]:
    """TEXT split at the colons that are not inside `${...}`."""
    parts: list[str] = []
    start = index = 0
    while index < len(text):
        if text.startswith("${", index):
            end = _closing(text, index)
            index = len(text) if end < 0 else end + 1
            continue
        if text[index] == ":":
            parts.append(text[start:index])
            start = index + 1
        index += 1
    parts.append(text[start:])
    return parts


@dataclass(frozen=True)
class Published:
    """Where the host port sits in a short-syntax port string, and what it is."""

    host: str  # the host port text: "8080", "8000-8002", "${WEB_PORT:-80}" or ""
    start: int  # its span in the string
    end: int
    container: str  # the container port text
    protocol: str  # "tcp", "udp", "sctp"


def parse_short(text: str) -> Published:
    """A short-syntax port: `[IP:][HOST:]CONTAINER[/PROTOCOL]`; IP may be an IPv6
    address, bracketed or not. Raise ValueError for anything else."""
    body, _, protocol = text.partition("/")
    if "/" in protocol or (protocol and not re.fullmatch(r"[a-z]+", protocol)):
        raise ValueError(f"unknown protocol in {text!r}")
    if body.startswith("["):
        close = body.find("]")
        if close < 0 or body[close + 1 : close + 2] != ":":
            raise ValueError(f"unclosed IPv6 address in {text!r}")
        offset = close + 2
        parts = split_colons(body[offset:])
        if len(parts) != 2:
            raise ValueError(f"expected [IP]:HOST:CONTAINER in {text!r}")
    else:
        offset = 0
        parts = split_colons(body)
        if len(parts) > 3:  # a bare IPv6 address: everything before the last two
            ip = ":".join(parts[:-2])
            offset = len(ip) + 1
            parts = parts[-2:]
        elif len(parts) == 3:
            offset = len(parts[0]) + 1
            parts = parts[1:]
    if len(parts) == 1:
        host, container = "", parts[0]
        start = end = offset
    else:
        host, container = parts
        start, end = offset, offset + len(host)
    if not container:
        raise ValueError(f"no container port in {text!r}")
    return Published(host, start, end, container, protocol or "tcp")


def fixed_range(text: str) -> tuple[int, int] | None:
    """(first, last) of a host port or range written as plain numbers, else None."""
    match = PORT_RANGE.fullmatch(text)
    if not match:
        return None
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else first
    if not 0 < first <= last <= 65535:
        return None
    return first, last

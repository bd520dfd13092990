"""What docker compose makes of a compose file, as far as `portalloc init` needs it:
the file read as YAML nodes (with their positions), merge keys, variable
interpolation (compose's own rules) and the syntax of published ports.

Interpolation follows compose-go: `$$` is a literal `$`; `$NAME` and `${NAME}` are
the variable or empty; `${NAME:-d}`/`${NAME-d}` default when unset or empty / unset;
`${NAME:?e}`/`${NAME?e}` fail when unset or empty / unset; `${NAME:+r}`/`${NAME+r}`
replace when set and non-empty / set. Defaults nest (`${A:-${B:-1}}`). Any other `$`
is an invalid template, which compose refuses.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portalloc.errors import AdoptError
from portalloc.fs import UnsafeFile, read_bytes
from portalloc.rules import has_unprintable

NAME = re.compile(r"[_A-Za-z][_A-Za-z0-9]*")
_BRACED = re.compile(r"([_A-Za-z][_A-Za-z0-9]*)(?:(:?[-+?])(.*))?", re.DOTALL)
MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_EXPANDED_NODES = 1_000_000
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


# --- reading compose files: PyYAML nodes, whose positions locate every edit ---


@dataclass
class ComposeFile:
    path: Path  # as given or found (shown in messages and diffs)
    shown: str  # the name in diffs: relative to the top when inside it
    data: bytes
    text: str
    root: Any  # yaml.MappingNode


def load_yaml(path: Path, text: str) -> Any:
    import yaml

    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        raise AdoptError(path, line, f"not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise AdoptError(path, 1, f"not valid YAML: {exc}") from None


def read_compose(path: Path, top: Path) -> ComposeFile:
    import yaml

    try:
        shown = str(Path(os.path.normpath(path.absolute())).relative_to(top.absolute()))
    except ValueError:
        raise AdoptError(path, 0, f"is outside the repository top {top}") from None
    where = Path(shown)  # messages name the file as the user knows it
    if has_unprintable(shown):
        raise AdoptError(where, 0, "has a control character in its name")
    try:
        data = read_bytes(path, follow=False)  # never blocks on a FIFO
    except UnsafeFile as exc:
        if exc.kind == "a symlink":
            raise AdoptError(where, 0, "is a symlink; name the file it points to") from None
        raise AdoptError(where, 0, f"not a regular file ({exc.kind})") from None
    except OSError as exc:
        raise AdoptError(where, 0, f"cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AdoptError(where, 1, "is not UTF-8 text") from None
    try:
        root = load_yaml(where, text)
        services = get(root, "services") if isinstance(root, yaml.MappingNode) else None
        if not isinstance(services, yaml.MappingNode):
            line = root.start_mark.line + 1 if root is not None else 1
            raise AdoptError(where, line, "not a compose file (no `services:` mapping)")
        _check_document(where, root)
    except RecursionError:
        raise AdoptError(where, 0, "nested too deeply") from None
    return ComposeFile(path, shown, data, text, root)


def scalars(node: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """Every value scalar under NODE (not mapping keys), each node once."""
    import yaml

    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        yield node
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from scalars(item, seen)
    elif isinstance(node, yaml.MappingNode):
        for _key, value in node.value:
            yield from scalars(value, seen)


def _check_cycles(path: Path, node: Any, ancestors: set[int], done: set[int]) -> None:
    """Refuse an alias to a node that contains it (`x: &a [*a]`): compose cannot read
    it, and nothing can be compared. Each node is looked into once (shared aliases
    would otherwise cost exponential time)."""
    import yaml

    if id(node) in ancestors:
        raise AdoptError(path, node.start_mark.line + 1, "an alias refers to its own anchor")
    if id(node) in done or isinstance(node, yaml.ScalarNode):
        return
    ancestors.add(id(node))
    for child in node.value:
        for part in child if isinstance(child, tuple) else (child,):
            _check_cycles(path, part, ancestors, done)
    ancestors.discard(id(node))
    done.add(id(node))


def _expanded_size(node: Any, sizes: dict[int, int]) -> int:
    """How many nodes NODE is with every alias expanded (memoised: linear time)."""
    import yaml

    if id(node) not in sizes:
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
        else:
            parts = [p for c in node.value for p in (c if isinstance(c, tuple) else (c,))]
            sizes[id(node)] = 1 + sum(_expanded_size(part, sizes) for part in parts)
    return sizes[id(node)]


def _check_document(path: Path, root: Any) -> None:
    """Refuse what compose refuses: a `$` that is no valid interpolation, and a key
    given twice in one mapping (PyYAML would keep the last one silently)."""
    import yaml

    _check_cycles(path, root, set(), set())
    if _expanded_size(root, {}) > MAX_EXPANDED_NODES:
        # Aliases of aliases: a few lines that expand to billions of values. Compose's
        # YAML decoder refuses these as "excessive aliasing" too.
        raise AdoptError(path, 0, "aliases expand to too many values")

    for node in scalars(root):
        if "$" in node.value:
            try:
                interpolate(node.value, {}, required=False)
            except TemplateError as exc:
                raise AdoptError(path, node.start_mark.line + 1, str(exc)) from None
    for mapping in _mappings(root, set()):
        keys: set[str] = set()
        for key, _value in mapping.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != MERGE_TAG:
                if key.value in keys:
                    raise AdoptError(path, key.start_mark.line + 1, f"key {key.value!r} twice")
                keys.add(key.value)


def _mappings(node: Any, seen: set[int]) -> Iterator[Any]:
    import yaml

    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        yield node
        for _key, value in node.value:
            yield from _mappings(value, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _mappings(item, seen)


def get(node: Any, key: str) -> Any:
    """The value of KEY in mapping NODE as compose sees it: an explicit key wins over
    merged ones (`<<: *a`, `<<: [*a, *b]`, earlier sources first)."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return None
    found = None
    for key_node, value in node.value:
        if key_node.tag != MERGE_TAG and key_node.value == key:
            found = value
    if found is not None:
        return found
    for key_node, value in node.value:
        if key_node.tag == MERGE_TAG:
            sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for source in sources:
                merged = get(source, key)
                if merged is not None:
                    return merged
    return None


def keys(node: Any) -> list[str]:
    """The keys of mapping NODE as compose sees them, merged ones included, in order."""
    import yaml

    names: dict[str, None] = {}
    for key_node, value in node.value:
        if key_node.tag == MERGE_TAG:
            sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for source in sources:
                if isinstance(source, yaml.MappingNode):
                    names.update(dict.fromkeys(keys(source)))
        else:
            names[str(key_node.value)] = None
    return list(names)


def model(node: Any, env: Mapping[str, str], *, required: bool = False) -> Any:
    """The document under NODE as compose reads it with variables ENV: merge keys
    applied, every value interpolated, every scalar as its text. A required variable
    without a value reads as empty unless REQUIRED."""
    import yaml

    if isinstance(node, yaml.ScalarNode):
        return interpolate(node.value, env, required=required)
    if isinstance(node, yaml.SequenceNode):
        return [model(item, env, required=required) for item in node.value]
    if isinstance(node, yaml.MappingNode):
        return {key: model(get(node, key), env, required=required) for key in keys(node)}
    return None


def services(compose: ComposeFile) -> Iterator[tuple[str, Any]]:
    import yaml

    services = get(compose.root, "services")
    for name in keys(services):
        service = get(services, name)
        if isinstance(service, yaml.MappingNode):
            yield name, service

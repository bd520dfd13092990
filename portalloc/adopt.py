"""`portalloc init`: make a repository's compose stack worktree-safe.

Every fixed published host port becomes `${<NAME>_PORT:-<original>}` and every fixed
`container_name: X` becomes `${<NAME>_CONTAINER_NAME:-X}`; a profile sets exactly
those variables from the lease. Edits are targeted: the files are parsed with PyYAML
only to find the scalars to change (their character offsets), and only those
characters are replaced, so comments, quoting, anchors, merge keys, indentation and
every other byte stay as they were. Before anything is shown or written, the result
is parsed again and checked: with no variable set it must mean exactly what the
original meant, value for value, after compose's interpolation.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portalloc import blocks
from portalloc.compose import (
    NAME,
    ComposeFile,
    Published,
    fixed_range,
    get,
    load_yaml,
    model,
    parse_short,
    read_compose,
    scalars,
    services,
)
from portalloc.config import DEFAULT_BASE, DEFAULT_MAX_SESSIONS, DEFAULT_RANGE
from portalloc.errors import AdoptError, printable
from portalloc.fs import UnsafeFile, atomic_write, check_within, read_bytes, read_text
from portalloc.rules import COMPOSE_NAME, SHELL_NAME, forbidden_variable

COMPOSE_PATTERNS = ("compose*.yml", "compose*.yaml", "docker-compose*.yml", "docker-compose*.yaml")
_REFERENCE = re.compile(r"\$\{?(" + NAME.pattern + ")")
_VARIABLE = re.compile(
    r"\$(?:\{(" + NAME.pattern + r")(?::?-([0-9]{1,5}))?\}|(" + NAME.pattern + "))"
)
# The range init writes: `${A:-8000}-${B:-8002}`.
_VARIABLE_RANGE = re.compile(
    r"\$\{(" + NAME.pattern + r"):?-([0-9]{1,5})\}-\$\{(" + NAME.pattern + r"):?-([0-9]{1,5})\}"
)
CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
# The container_name init writes: `${DB_CONTAINER_NAME:-db}`.
_CONTAINER_VARIABLE = re.compile(r"\$\{(" + NAME.pattern + r"):?-([^}]*)\}")
PROFILE_NAME = "portalloc.toml"
HEADER = "# Written by `portalloc init`: the host ports and container names of the compose files."


# --- what the files publish ------------------------------------------------------


@dataclass
class Use:
    """A host port or a container name: one to rewrite (`port`, `container_name`), or
    one already given by variables the profile may take over (`variable`)."""

    file: ComposeFile
    node: Any  # the scalar holding it
    service: str
    kind: str  # "port", "container_name" or "variable"
    key: tuple[Any, ...]  # equal keys are one port (the same mapping in two files)
    span: tuple[int, int] = (0, 0)  # the part of the scalar's value to replace
    first: int = 0
    last: int = 0
    texts: tuple[str, str] = ("", "")  # first and last as written (`08080` stays so)
    container: str = ""
    protocol: str = "tcp"
    variables: tuple[str, ...] = ()  # kind "variable": the variable(s) giving it

    @property
    def ranged(self) -> bool:
        return self.last != self.first or "-" in self.node.value[self.span[0] : self.span[1]]


@dataclass
class Plan:
    top: Path
    files: list[ComposeFile]
    changes: list[tuple[Path, str, bytes | None, bytes]] = field(default_factory=list)
    notes: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, text)
    # Host ports and names already given by variables: (file, line, text, variables),
    # reported once it is known which of those variables the profile sets.
    given: list[tuple[str, int, str, tuple[str, ...]]] = field(default_factory=list)
    ports: list[tuple[str, int]] = field(default_factory=list)
    env: list[tuple[str, str]] = field(default_factory=list)
    defaults: dict[str, str] = field(default_factory=dict)  # variable -> original value
    adopted: set[str] = field(default_factory=set)  # variables the files already used
    profile_changed: bool = False  # add_profile added or extended a project file

    def diff(self) -> str:
        out: list[str] = []
        for _path, shown, old, new in self.changes:
            before = "" if old is None else old.decode("utf-8")
            out.extend(
                difflib.unified_diff(
                    _lines(before),
                    _lines(new.decode("utf-8")),
                    "/dev/null" if old is None else f"a/{shown}",
                    f"b/{shown}",
                )
            )
        return "".join(
            line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
            for line in out
        )


def _lines(text: str) -> list[str]:
    """TEXT cut after each \\n only, as diff and patch count lines (not at a lone \\r)."""
    return re.findall(r"[^\n]*\n|[^\n]+", text)


def _note(plan: Plan, use_file: ComposeFile, node: Any, message: str) -> None:
    plan.notes.append((use_file.shown, node.start_mark.line + 1, message))


def _given(plan: Plan, use_file: ComposeFile, node: Any, what: str, text: str) -> None:
    variables = tuple(dict.fromkeys(m.group(1) for m in _REFERENCE.finditer(text)))
    plan.given.append((use_file.shown, node.start_mark.line + 1, what, variables))


def report(plan: Plan, profile_sets: set[str]) -> list[str]:
    """Every note, in file and line order; a value given by variables says whether
    portalloc's profile sets them."""
    notes = list(plan.notes)
    for shown, line, what, variables in plan.given:
        unset = [v for v in variables if v not in profile_sets]
        tail = f"{', '.join(unset)} not set by the profile" if unset else "set by the profile"
        notes.append(
            (shown, line, f"{what}: given by {', '.join(variables)}; left as it is ({tail})")
        )
    notes.sort(key=lambda note: (note[0], note[1]))
    return [f"{shown}:{line}: {text}" for shown, line, text in notes]


def _variable_use(compose: ComposeFile, node: Any, name: str, spec: Published) -> Use | None:
    """A host port written as one variable (`${V:-N}`, `$V`) or as the range init
    writes (`${A:-N}-${B:-M}`): one the profile can take over."""
    single = _VARIABLE.fullmatch(spec.host)
    span = (spec.start, spec.end)
    if single:
        var = single.group(1) or single.group(3)
        default = int(single.group(2) or 0)
        return Use(
            compose,
            node,
            name,
            "variable",
            ("$", var),
            span,
            default,
            default,
            container=spec.container,
            protocol=spec.protocol,
            variables=(var,),
        )
    pair = _VARIABLE_RANGE.fullmatch(spec.host)
    if pair and pair.group(1) == pair.group(3):  # `${P:-8000}-${P:-8000}`: one port
        first, last = int(pair.group(2)), int(pair.group(4))
        if first == last:
            return Use(
                compose,
                node,
                name,
                "variable",
                ("$", pair.group(1)),
                span,
                first,
                first,
                container=spec.container,
                protocol=spec.protocol,
                variables=(pair.group(1),),
            )
    elif pair:
        first, last = int(pair.group(2)), int(pair.group(4))
        if first <= last:
            variables = (pair.group(1), pair.group(3))
            return Use(
                compose,
                node,
                name,
                "variable",
                ("$", *variables),
                span,
                first,
                last,
                container=spec.container,
                protocol=spec.protocol,
                variables=variables,
            )
    return None


def _port_uses(plan: Plan, compose: ComposeFile, name: str, service: Any) -> Iterator[Use]:
    import yaml

    ports = get(service, "ports")
    if ports is None:
        return
    if not isinstance(ports, yaml.SequenceNode):
        raise AdoptError(
            Path(compose.shown), ports.start_mark.line + 1, f"{name}: ports must be a list"
        )
    for entry in ports.value:
        if isinstance(entry, yaml.ScalarNode):
            try:
                spec = parse_short(entry.value)
            except ValueError as exc:
                _note(plan, compose, entry, f"{name}: {exc}; left as it is")
                continue
            node: Any = entry
        elif isinstance(entry, yaml.MappingNode):
            node = get(entry, "published")
            target = get(entry, "target")
            protocol = get(entry, "protocol")
            container = str(target.value) if isinstance(target, yaml.ScalarNode) else "?"
            spec = Published(
                node.value if isinstance(node, yaml.ScalarNode) else "",
                0,
                len(node.value) if isinstance(node, yaml.ScalarNode) else 0,
                container,
                str(protocol.value) if isinstance(protocol, yaml.ScalarNode) else "tcp",
            )
            node = node if isinstance(node, yaml.ScalarNode) else entry
        else:
            raise AdoptError(
                Path(compose.shown), entry.start_mark.line + 1, f"{name}: bad port entry"
            )
        if spec.host in ("", "0"):
            _note(
                plan, compose, node, f"{name}: container port {spec.container} only; nothing to do"
            )
            continue
        if "$" in spec.host:
            use = _variable_use(compose, node, name, spec)
            if use is None:
                _given(plan, compose, node, f"{name}: {spec.host}", spec.host)
            else:
                yield use
            continue
        fixed = fixed_range(spec.host)
        if fixed is None:
            _note(
                plan, compose, node, f"{name}: host port {spec.host!r} not understood; left as is"
            )
            continue
        first, last = fixed
        texts = spec.host.split("-") if "-" in spec.host else [spec.host, spec.host]
        yield Use(
            compose,
            node,
            name,
            "port",
            (name, first, last, spec.container),  # tcp and udp of one port: one variable
            (spec.start, spec.end),
            first,
            last,
            (texts[0], texts[1]),
            spec.container,
            spec.protocol,
        )


def _container_use(plan: Plan, compose: ComposeFile, name: str, service: Any) -> Use | None:
    import yaml

    node = get(service, "container_name")
    if not isinstance(node, yaml.ScalarNode):
        return None
    if "$" in node.value:
        given = _CONTAINER_VARIABLE.fullmatch(node.value)
        if given and CONTAINER_NAME.fullmatch(given.group(2)):
            # The form init writes: the profile can take the variable over.
            return Use(
                compose,
                node,
                name,
                "variable",
                ("$", given.group(1)),
                container=given.group(2),
                variables=(given.group(1),),
            )
        _given(plan, compose, node, f"{name}: container_name {node.value}", node.value)
        return None
    if not CONTAINER_NAME.fullmatch(node.value):
        _note(plan, compose, node, f"{name}: container_name {node.value!r} is not a valid name")
        return None
    return Use(compose, node, name, "container_name", (name, node.value), (0, len(node.value)))


# --- names and offsets ---------------------------------------------------------


def _stem(service: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "_", service.lower()).strip("_") or "service"
    return "s_" + stem if stem[0] in "0123456789" else stem


def _usable(name: str, taken: set[str], suffix: str) -> bool:
    variable = (name + suffix).upper()
    return (
        name.lower() not in taken
        and variable not in taken
        and not forbidden_variable(variable)
        and SHELL_NAME.fullmatch(variable) is not None
    )


def _claim(name: str, taken: set[str], suffix: str = "_PORT") -> str:
    """NAME, or NAME_2, NAME_3...: the first that is free, case-insensitively, and
    whose variable a profile may set (`compose` would give the refused COMPOSE_PORT)."""
    name = re.sub(r"[^a-z0-9_]+", "_", name.lower())  # ASCII only: a variable name
    if not _usable(name, taken, suffix):
        name = "svc_" + name if forbidden_variable((name + suffix).upper()) else name
        candidate, number = name, 2
        while not _usable(candidate, taken, suffix):
            candidate, number = f"{name}_{number}", number + 1
        name = candidate
    taken.add(name.lower())
    taken.add((name + suffix).upper())
    return name


def _claim_name(name: str, taken: set[str]) -> str:
    """A port name for a variable the files already use: only the name must be free."""
    if not SHELL_NAME.fullmatch(name):
        name = "port_" + re.sub(r"[^a-z0-9_]", "_", name)
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name}_{number}", number + 1
    taken.add(candidate)
    return candidate


def _claim_variable(variable: str, taken: set[str]) -> str:
    candidate, number = variable, 2
    while candidate in taken or forbidden_variable(candidate):
        candidate, number = f"SVC_{variable}_{number}", number + 1
    taken.add(candidate)
    return candidate


def _name_ports(uses: list[Use], taken: set[str]) -> dict[tuple[Any, ...], str]:
    """One name per distinct port: the service's, or service_containerport when a
    service publishes several; stable for the same files."""
    by_service: dict[str, dict[tuple[Any, ...], Use]] = {}
    for use in uses:
        by_service.setdefault(use.service, {}).setdefault(use.key, use)
    names: dict[tuple[Any, ...], str] = {}
    for service, keyed in by_service.items():
        stem = _stem(service)
        for key, use in keyed.items():
            if key in names:
                continue
            if use.variables and use.variables[0].endswith("_PORT"):
                # A variable the files already use names its port (init's own output
                # gives back the names it had).
                names[key] = _claim_name(use.variables[0][: -len("_PORT")].lower(), taken)
                continue
            if len(keyed) == 1:
                wanted = stem
            else:
                number = use.container.split("-")[0]
                wanted = f"{stem}_{number if re.fullmatch('[0-9]+', number) else use.first}"
                if use.protocol != "tcp" and re.fullmatch("[a-z]+", use.protocol):
                    wanted += f"_{use.protocol}"
            names[key] = _claim(wanted, taken)
    return names


# --- the plan ----------------------------------------------------------------


def _locate(compose: ComposeFile, node: Any, value: str) -> tuple[int, str] | str:
    """Where the scalar's own text starts and the quote to write VALUE (its new value)
    in; or why init leaves it to the user. Only a scalar whose source is its value
    verbatim qualifies: one line, no escapes, no folding, no tag."""
    start, end = node.start_mark.index, node.end_mark.index
    source = compose.text[start:end]
    quote = {'"': '"', "'": "'", None: ""}.get(node.style)
    body = f"{quote}{node.value}{quote}"
    if (
        quote is None
        or "\n" in source
        or not source.endswith(body)
        or (quote == "'" and "'" in node.value)
        or (quote == '"' and ("\\" in node.value or '"' in node.value))
    ):
        return "is written with escapes or over several lines"
    if "!" in source[: len(source) - len(body)]:
        return "carries a YAML tag"
    if not quote:
        # `${` and `}` are safest quoted (flow lists); a backslash must not become an escape.
        quote = '"' if "\\" not in value and '"' not in value else "'"
        if quote == "'" and "'" in value:
            return "holds both kinds of quote"
    return end - len(body), quote


def _passthrough(files: list[ComposeFile]) -> set[str]:
    """Variables the files hand to containers or builds by bare name (`environment:
    [API_PORT]`, `API_PORT:` with no value, the same in `build.args`): setting them
    changes what a container sees, not only a port."""
    import yaml

    names: set[str] = set()
    for compose in files:
        for _name, service in services(compose):
            build = get(service, "build")
            for node in (get(service, "environment"), get(build, "args")):
                if isinstance(node, yaml.SequenceNode):
                    names.update(
                        item.value
                        for item in node.value
                        if isinstance(item, yaml.ScalarNode) and "=" not in item.value
                    )
                elif isinstance(node, yaml.MappingNode):
                    names.update(
                        key.value
                        for key, value in node.value
                        if isinstance(value, yaml.ScalarNode) and value.tag.endswith(":null")
                    )
    return names


def _adoptable(plan_: Plan, uses: list[Use], passthrough: set[str]) -> list[Use]:
    """USES without the variables the profile must not take over. A host port or
    container name already given by variables is adopted (the profile sets them)
    only when each variable appears nowhere else in the files (not in the container
    side of the same mapping, not passed to a container by name), every use of it
    means the same port or name, and a profile may set it."""
    references: dict[str, int] = {}
    mentions: dict[str, int] = {}
    meanings: dict[str, set[tuple[Any, ...]]] = {}
    for compose in plan_.files:
        for node in scalars(compose.root):
            for match in _REFERENCE.finditer(node.value):
                references[match.group(1)] = references.get(match.group(1), 0) + 1
    for use in uses:
        if use.kind == "variable":
            part = use.node.value[use.span[0] : use.span[1]] if use.span[1] else use.node.value
            for match in _REFERENCE.finditer(part):
                mentions[match.group(1)] = mentions.get(match.group(1), 0) + 1
            for var in use.variables:
                meanings.setdefault(var, set()).add(
                    (use.key, use.container if not use.span[1] else "")
                )
    kept: list[Use] = []
    for use in uses:
        if use.kind == "variable":
            label = use.node.value if use.span[1] else f"container_name {use.node.value}"
            text = "".join(f"${{{v}}}" for v in use.variables)
            _given(plan_, use.file, use.node, f"{use.service}: {label}", text)
            if any(
                forbidden_variable(var)
                or var == "COMPOSE_PROJECT_NAME"  # the profile sets it to the project's name
                or var in passthrough
                or references.get(var) != mentions.get(var)
                or len(meanings[var]) > 1
                for var in use.variables
            ):
                continue  # the user's to set
            plan_.adopted.update(use.variables)
        kept.append(use)
    return kept


def _dotenv_names(directories: Iterable[Path]) -> set[str]:
    """Variables the `.env` files in DIRECTORIES set outside portalloc's block. Compose
    reads the one in its project directory (the first file's) when it interpolates,
    so a variable init introduces must not be one of them: with no portalloc
    variable set, the file would read the `.env` value."""
    from portalloc.outputs import dotenv_key

    names: set[str] = set()
    for directory in dict.fromkeys(directories):
        path = directory / ".env"
        try:
            lines = read_bytes(path).decode("utf-8", "replace").splitlines()
        except (OSError, UnsafeFile):  # none, or a FIFO or directory: no names
            continue
        ours = blocks.inside(lines)
        for index, line in enumerate(lines):
            key = None if index in ours else dotenv_key(line)
            if key is not None:
                names.add(key.upper())
    return names


def _file_notes(plan_: Plan, compose: ComposeFile) -> None:
    """Notes for ports init cannot see from the files it was given."""
    include = get(compose.root, "include")
    if include is not None:
        _note(
            plan_,
            compose,
            include,
            "include: the included files are not rewritten; name them: portalloc init FILE...",
        )
    for name, service in services(compose):
        extends = get(service, "extends")
        if get(extends, "file") is not None:
            _note(
                plan_,
                compose,
                extends,
                f"{name}: extends a service of another file; "
                "name that file too: portalloc init FILE...",
            )


def _container_notes(plan_: Plan, renamed: dict[str, str]) -> None:
    """A `container:NAME` reference (network_mode, volumes_from, pid, ipc) to a
    container whose name now follows the lease."""
    for compose in plan_.files:
        for node in scalars(compose.root):
            match = re.fullmatch(r"container:(.+)", node.value)
            if match and match.group(1) in renamed:
                _note(
                    plan_,
                    compose,
                    node,
                    f"{node.value} names a container that is now "
                    f"${{{renamed[match.group(1)]}}}; write service:<service> instead",
                )


def plan(paths: Iterable[Path], top: Path) -> Plan:
    """Everything `init` would change, checked; nothing is written."""
    unique = {os.path.normpath(path.absolute()): path for path in paths}  # named twice: once
    files = [read_compose(path, top) for path in unique.values()]
    result = Plan(top, files)
    passthrough = _passthrough(files)
    taken: set[str] = {"compose_project_name", *(n.upper() for n in passthrough)}
    taken |= _dotenv_names([top, *(compose.path.absolute().parent for compose in files)])
    for compose in files:
        for node in scalars(compose.root):
            for match in _REFERENCE.finditer(node.value):
                taken.add(match.group(1).upper())
    found: list[Use] = []
    seen: set[int] = set()
    for compose in files:
        _file_notes(result, compose)
        for name, service in services(compose):
            container = _container_use(result, compose, name, service)
            for use in [*_port_uses(result, compose, name, service), container]:
                if use is not None and id(use.node) not in seen:
                    seen.add(id(use.node))
                    found.append(use)
    uses: list[Use] = []
    for use in _adoptable(result, found, passthrough):
        if use.kind != "variable":
            located = _locate(use.file, use.node, use.node.value)
            if isinstance(located, str):
                _note(
                    result,
                    use.file,
                    use.node,
                    f"{use.service}: {use.node.value!r} {located}; change it by hand",
                )
                continue
        uses.append(use)

    ports = [use for use in uses if use.kind == "port" or (use.kind == "variable" and use.span[1])]
    names = _name_ports(ports, taken)
    offsets: dict[tuple[Any, ...], int] = {}
    next_offset = 0
    last_names: dict[tuple[Any, ...], str] = {}
    edits: dict[int, dict[int, tuple[int, int, str]]] = {}
    for use in ports:
        name = names[use.key]
        if use.key not in offsets:
            offsets[use.key] = offset = next_offset
            next_offset += use.last - use.first + 1
            variable = use.variables[0] if use.variables else f"{name.upper()}_PORT"
            result.ports.append((name, offset))
            result.env.append((variable, "{" + name + "_port}"))
            if use.first:
                result.defaults[variable] = use.texts[0] or str(use.first)
            if use.last != use.first:
                # A range takes consecutive offsets; its two ends have a variable each.
                if use.variables:
                    last_variable = use.variables[1]
                    last = _claim_name(last_variable.removesuffix("_PORT").lower(), taken)
                else:
                    last = _claim(name + "_last", taken)
                    last_variable = f"{last.upper()}_PORT"
                result.ports.append((last, offset + use.last - use.first))
                result.env.append((last_variable, "{" + last + "_port}"))
                result.defaults[last_variable] = use.texts[1] or str(use.last)
                last_names[use.key] = last_variable
        if use.kind == "variable":
            continue
        variable = f"{name.upper()}_PORT"
        replacement = f"${{{variable}:-{use.texts[0]}}}"
        if use.ranged:  # `8000-8002`, and `8000-8000` too: a range stays a range
            replacement += f"-${{{last_names.get(use.key, variable)}:-{use.texts[1]}}}"
        _edit(use, replacement, edits)

    renamed: dict[str, str] = {}
    for use in uses:
        if use.kind == "container_name":
            if use.node.value not in renamed:
                variable = _claim_variable(f"{_stem(use.service).upper()}_CONTAINER_NAME", taken)
                renamed[use.node.value] = variable
                result.env.append((variable, "{compose_project_name}-" + use.node.value))
                result.defaults[variable] = use.node.value
            _edit(use, f"${{{renamed[use.node.value]}:-{use.node.value}}}", edits)
        elif use.kind == "variable" and not use.span[1] and use.container not in renamed:
            renamed[use.container] = use.variables[0]
            result.env.append((use.variables[0], "{compose_project_name}-" + use.container))
    _container_notes(result, renamed)
    if result.env:
        result.env.append(("COMPOSE_PROJECT_NAME", "{compose_project_name}"))

    for compose in files:
        queued = edits.get(id(compose), {})
        if not queued:
            continue
        text = compose.text
        for start, end, replacement in sorted(queued.values(), reverse=True):
            text = text[:start] + replacement + text[end:]
        _verify(compose, text)
        result.changes.append((compose.path, compose.shown, compose.data, text.encode("utf-8")))
    return result


def _edit(use: Use, replacement: str, edits: dict[int, dict[int, tuple[int, int, str]]]) -> None:
    """Queue the replacement of USE's part (its host port, its name) by REPLACEMENT."""
    value: str = use.node.value
    new_value = value[: use.span[0]] + replacement + value[use.span[1] :]
    located = _locate(use.file, use.node, new_value)
    if isinstance(located, str):  # checked before names were given out: cannot happen
        raise AdoptError(Path(use.file.shown), use.node.start_mark.line + 1, located)
    body_start, quote = located
    queued = edits.setdefault(id(use.file), {})
    queued[body_start] = (body_start, use.node.end_mark.index, quote + new_value + quote)


def _verify(compose: ComposeFile, text: str) -> None:
    """The rewritten text must parse and, with no variable set, mean what the original
    meant, value for value. Should it not, init stops and writes nothing."""
    rewritten = load_yaml(Path(compose.shown), text)
    if model(rewritten, {}) != model(compose.root, {}):
        raise AdoptError(
            Path(compose.shown),
            0,
            "init cannot rewrite this file without changing what it means; nothing written",
        )


# --- the profile ---------------------------------------------------------------


def span_settings(needed: int, values: Mapping[str, int], where: Path) -> list[tuple[str, int]]:
    """Settings a profile with VALUES (what its file sets) must add for NEEDED
    offsets per block: `range`, and `max_sessions` when the span would pass 65535."""
    if needed <= values.get("range", DEFAULT_RANGE):
        return []
    if "range" in values:
        raise AdoptError(
            where,
            0,
            f"set range = {needed} or more: the compose files publish "
            f"{needed} ports; nothing written",
        )
    settings = [("range", needed)]
    base = values.get("base", DEFAULT_BASE)
    fits = (65536 - base) // needed
    if fits < 1:
        raise AdoptError(
            where,
            0,
            f"the compose files publish {needed} ports: more than fit "
            f"above port {base}; nothing written",
        )
    if base + needed * values.get("max_sessions", DEFAULT_MAX_SESSIONS) - 1 > 65535:
        if "max_sessions" in values:
            raise AdoptError(
                where,
                0,
                f"set max_sessions = {fits} or less: blocks of "
                f"{needed} ports above {base}; nothing written",
            )
        settings.append(("max_sessions", fits))
    return settings


def compose_prefix(top: Path) -> str | None:
    """A compose_prefix from the repository's directory name, when one can be made."""
    prefix = re.sub(r"[^a-z0-9_-]+", "-", top.name.lower()).strip("-_")[:24]
    return prefix if prefix and COMPOSE_NAME.fullmatch(prefix) else None


def needed_range(plan_: Plan) -> int:
    return max((offset + 1 for _, offset in plan_.ports), default=0)


def profile_tables(plan_: Plan, table: str) -> str:
    """The `ports` and `env` tables, under TABLE ("" for portalloc.toml)."""
    prefix = f"{table}." if table else ""
    lines: list[str] = []
    if plan_.ports:  # container names alone need no port
        lines += [f"[{prefix}ports]", *(f"{name} = {offset}" for name, offset in plan_.ports), ""]
    lines += [f"[{prefix}env]"]
    lines += [f"{variable} = {json.dumps(template)}" for variable, template in plan_.env]
    return "\n".join(lines) + "\n"


def profile_text(plan_: Plan, table: str, *, settings: bool = True) -> str:
    """A whole profile: header, the table (pyproject.toml), settings, ports and env."""
    head = [HEADER]
    if table:
        head.append(f"[{table}]")
    if settings:
        prefix = compose_prefix(plan_.top)
        if prefix:
            head.append(f'compose_prefix = "{prefix}"')
        needed = needed_range(plan_)
        head += [f"{k} = {v}" for k, v in span_settings(needed, {}, Path(PROFILE_NAME))]
    return "\n".join(head) + "\n\n" + profile_tables(plan_, table)


def _table(path: Path, text: str) -> dict[str, Any] | None:
    """The portalloc table of PATH (whose content is TEXT), or None when it has none."""
    import tomllib

    data = tomllib.loads(text)
    if path.name == "portalloc.toml":
        return data
    table = data.get("tool", {}).get("portalloc")
    return table if isinstance(table, dict) else None


def add_profile(plan_: Plan) -> set[str]:
    """Add the profile to the plan; return the variables the profile will set.

    A new portalloc.toml; or [tool.portalloc] appended to a pyproject.toml without
    one; or, in a project file that has settings but no ports and no env, those two
    tables appended. A project file that already lists ports or env is the user's:
    init leaves it alone, and stops (naming what to add) when it lacks a variable a
    rewritten file needs. Whatever it would write is loaded as `portalloc env` would
    load it first."""
    from portalloc.profile import load_project_file

    toml = plan_.top / PROFILE_NAME
    pyproject = plan_.top / "pyproject.toml"
    existing = toml if toml.is_file() else pyproject if pyproject.is_file() else None
    wanted = {variable for variable, _template in plan_.env}
    if existing is None:
        if plan_.env:
            text = profile_text(plan_, "")
            _check_profile(toml, text)
            plan_.changes.append((toml, PROFILE_NAME, None, text.encode()))
            plan_.profile_changed = True
        return wanted
    project = load_project_file(existing)  # a broken project file: exit 2 naming the key
    try:
        data = read_bytes(existing)
    except OSError as exc:
        raise AdoptError(existing, 0, f"cannot be read: {exc.strerror or exc}") from None
    text = data.decode("utf-8")
    table = _table(existing, text)
    name = "tool.portalloc" if existing.name == "pyproject.toml" else ""
    if table is not None and ("ports" in table or "env" in table):
        have = dict(project.profile.env) if project.profile is not None else {}
        missing = [(v, t) for v, t in plan_.env if v not in have and v not in plan_.adopted]
        if missing:
            lines = ", ".join(f"{v} = {json.dumps(t)}" for v, t in missing)
            raise AdoptError(
                existing,
                0,
                "already lists ports and variables, and init does "
                f"not edit them; add {lines} (with their ports); nothing written",
            )
        return set(have)
    if not plan_.env:
        return set()
    if table is None:  # pyproject.toml without [tool.portalloc]
        added = profile_text(plan_, name)
    else:
        settings = span_settings(needed_range(plan_), project.values, existing)
        if settings and name:
            wanted_lines = ", ".join(f"{k} = {v}" for k, v in settings)
            raise AdoptError(
                existing,
                0,
                f"set {wanted_lines} in [tool.portalloc]: the compose "
                "files publish that many ports; nothing written",
            )
        added = "".join(f"{k} = {v}\n" for k, v in settings) + profile_tables(plan_, name)
    separator = "" if not text else "\n" if text.endswith("\n") else "\n\n"
    new = text + separator + added
    _check_profile(existing, new)
    plan_.changes.append((existing, existing.name, data, new.encode()))
    plan_.profile_changed = True
    return wanted


def _check_profile(path: Path, text: str) -> None:
    """Load TEXT as PATH the way `portalloc env` will; refuse to write what it would
    refuse (an inline [tool] table we cannot extend, a span that does not fit)."""
    import tempfile
    import tomllib

    from portalloc.config import PortAllocatorConfig
    from portalloc.errors import PortallocError

    try:
        tomllib.loads(text)
        with tempfile.TemporaryDirectory() as scratch:
            atomic_write(Path(scratch) / path.name, text.encode(), 0o644, durable=False)
            PortAllocatorConfig.from_env({"PORTALLOC_STATE_DIR": scratch}, cwd=Path(scratch))
    except tomllib.TOMLDecodeError as exc:
        raise AdoptError(
            path,
            0,
            f"adding the profile would make it invalid TOML ({exc}); "
            "add [tool.portalloc] by hand; nothing written",
        ) from None
    except PortallocError as exc:
        detail = exc.message.split(": ", 1)[-1]
        raise AdoptError(
            path, 0, f"the profile init would write is refused: {detail}; nothing written"
        ) from None


# --- writing -------------------------------------------------------------------


def write(plan_: Plan) -> None:
    """Replace every changed file atomically; all or none. A file that changed since it
    was read, is not a regular file, or lies outside the top through a symlinked
    directory stops everything before the first write; a write that fails puts the
    files written before it back as they were, and the error names the file that failed."""
    modes: list[int] = []
    for path, _shown, old, _new in plan_.changes:
        try:
            check_within(path, plan_.top)
        except UnsafeFile as exc:
            raise AdoptError(path, 0, f"{exc.reason}; nothing written") from None
        try:
            info = path.lstat()
        except FileNotFoundError:
            if old is not None:
                raise AdoptError(path, 0, "vanished while init ran; nothing written") from None
            modes.append(0o644)
            continue
        except OSError as exc:
            raise AdoptError(path, 0, f"cannot be read: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            raise AdoptError(path, 0, f"refusing to replace it, it is {kind}; nothing written")
        try:
            current = read_bytes(path, follow=False)
        except (OSError, UnsafeFile):
            current = None
        if old is None or current != old:
            raise AdoptError(path, 0, "changed while init ran; nothing written")
        modes.append(stat.S_IMODE(info.st_mode))
    done: list[tuple[Path, bytes | None, int]] = []
    for (path, _shown, old, new), mode in zip(plan_.changes, modes, strict=True):
        try:
            atomic_write(path, new, mode, within=plan_.top)
        except (OSError, UnsafeFile) as exc:
            reason = exc.reason if isinstance(exc, UnsafeFile) else exc.strerror or str(exc)
            stuck = _put_back(done, plan_.top)
            outcome = f"could not put back {', '.join(stuck)}" if stuck else "nothing changed"
            # PATH, the file that failed: not one of those put back before this line.
            raise AdoptError(path, 0, f"cannot be written: {reason}; {outcome}") from None
        done.append((path, old, mode))


def _put_back(done: list[tuple[Path, bytes | None, int]], top: Path) -> list[str]:
    """Undo the writes in DONE, last first; return the files that could not be."""
    stuck: list[str] = []
    for path, old, mode in reversed(done):
        try:
            if old is None:
                os.unlink(path)
            else:
                atomic_write(path, old, mode, within=top)
        except (OSError, UnsafeFile):
            stuck.append(printable(path))
    return stuck


# --- reports on other files ------------------------------------------------------

_SCRIPT_PORT = re.compile(
    r"(?:--port[= ]|--listen[= ]|(?<![\w-])-p ?|\bPORT=)(\d{2,5})\b"
    r"|\b(?:localhost|127\.0\.0\.1|0\.0\.0\.0):(\d{2,5})\b"
)
_ENV_PORT = re.compile(
    r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*['\"]?(\d{2,5})['\"]?\s*$"
    r"|\b(?:localhost|127\.0\.0\.1|0\.0\.0\.0):(\d{2,5})\b"
)
MAX_SCANNED_LINE = 4096  # longer lines are no port settings, and regexes on them cost


def _hint(port: str, plan_: Plan) -> str:
    for variable, default in plan_.defaults.items():
        if default == port and variable.endswith("_PORT"):
            return f" (the compose files now publish it as ${variable})"
    return ""


def hard_coded(plan_: Plan) -> list[str]:
    """Likely fixed local ports in package.json scripts and .env files at the top."""
    notes: list[str] = []
    package = plan_.top / "package.json"
    if package.is_file():
        try:
            scripts = json.loads(read_bytes(package)).get("scripts", {})
        except (OSError, UnsafeFile, ValueError, AttributeError, RecursionError):
            scripts = {}
        if isinstance(scripts, dict):
            for name, command in scripts.items():
                if isinstance(command, str) and len(command) <= MAX_SCANNED_LINE:
                    for match in _SCRIPT_PORT.finditer(command):
                        port = match.group(1) or match.group(2)
                        notes.append(
                            f"package.json: scripts.{printable(name)}: {printable(match.group(0))} "
                            f"is a fixed port{_hint(port, plan_)}"
                        )
    for path in sorted(plan_.top.glob(".env*")):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            lines = read_text(path, follow=False).splitlines()
        except (OSError, UnsafeFile, UnicodeDecodeError):
            continue
        ours = blocks.inside(lines)
        for number, line in enumerate(lines, 1):
            if number - 1 in ours or len(line) > MAX_SCANNED_LINE:
                continue
            for match in _ENV_PORT.finditer(line):
                if match.group(1) and "PORT" not in match.group(1).upper():
                    continue
                port = match.group(2) or match.group(3)
                notes.append(
                    f"{path.name}:{number}: {printable(match.group(0).strip())} is a fixed "
                    f"port{_hint(port, plan_)}"
                )
    return notes


def find_compose_files(top: Path) -> list[Path]:
    found: dict[Path, None] = {}
    for pattern in COMPOSE_PATTERNS:
        for path in sorted(top.glob(pattern)):
            if path.is_file():
                found[path] = None
    return sorted(
        found,
        key=lambda p: (
            not p.name.startswith(("compose.", "docker-compose.")),
            "override" in p.name,
            p.name,
        ),
    )

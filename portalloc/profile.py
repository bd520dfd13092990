"""The project file (portalloc.toml, or [tool.portalloc] in pyproject.toml), parsed into a
typed value: settings with the key each came from, and the profile it describes."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

# Where a project file is looked for: config.py, which imports this module only when
# one is found (the read path's budget); re-exported for the modules that ask here.
from portalloc.config import PROJECT_FILE_LIMIT
from portalloc.config import find_project_file as find_project_file
from portalloc.errors import ProfileError
from portalloc.fs import read_bytes
from portalloc.models import DEFAULT_PROFILE, Profile, template_fields
from portalloc.records import NamedTuple
from portalloc.rules import (
    COMPOSE_NAME,
    COMPOSE_PROJECT_VARIABLE,
    CONTAINER_VARIABLE,
    PORT_VARIABLE,
    SHELL_NAME,
    forbidden_variable,
    has_unprintable,
    port_label,
)

# Not imported at run time where a directory has no project file: the read path
# (`portalloc env`) looks for one on every call, and both cost start-up time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

SETTINGS = ("base", "range", "ttl_minutes", "max_sessions", "proxy_port")
FILE_KEYS = ("env_file", "manifest")


def _relative_file(path: Path, key: str, value: object) -> str:
    """A file inside the worktree, named relative to its top: `.env`, `config/ports.json`."""
    if not isinstance(value, str) or not value or has_unprintable(value):
        raise ProfileError(path, key, "must be a file name relative to the worktree top")
    from pathlib import Path

    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "~")) or ".." in parts or Path(value).is_absolute():
        raise ProfileError(path, key, "must stay inside the worktree (relative, no '..')")
    if ".git" in parts:
        raise ProfileError(path, key, "must not be inside .git")
    return value


class ProjectFile(NamedTuple):
    """What a project file sets. Values are checked against their rules by the config."""

    values: Mapping[str, int]  # base, range, ttl_minutes, max_sessions as written
    sources: Mapping[str, str]  # setting -> "<path>: <key>", for error messages
    profile: Profile | None  # None: the file names no ports, env or compose_prefix
    # [env] entries set in full only once the user trusts the file: (variable, template)
    waiting: tuple[tuple[str, str], ...] = ()
    trusted: bool = False  # the user trusted this content (`portalloc trust`)
    data: bytes = b""  # the file as read: what trust records are keyed by


# The [env] shapes an untrusted file may set, safe by construction: a variable named
# `*_PORT` holding one port field renders a number; COMPOSE_PROJECT_NAME holds the
# validated project name; `*_CONTAINER_NAME` holds the project name, `-`, and a literal
# container name (the lines `portalloc init` writes, so a teammate's fresh clone keeps
# container names disjoint). None of them can carry a command, a path or a URL.
_PORT_TEMPLATE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*_port)\}")
_CONTAINER_TEMPLATE = re.compile(r"\{compose_project_name\}-[a-zA-Z0-9_.-]{1,200}")


def safe_entry(variable: str, template: str, fields: set[str]) -> bool:
    """Whether VARIABLE = TEMPLATE is a shape an untrusted project file may set."""
    if PORT_VARIABLE.fullmatch(variable):
        match = _PORT_TEMPLATE.fullmatch(template)
        return match is not None and match.group(1) in fields
    if variable == COMPOSE_PROJECT_VARIABLE:
        return template == "{compose_project_name}"
    if CONTAINER_VARIABLE.fullmatch(variable):
        return _CONTAINER_TEMPLATE.fullmatch(template) is not None
    return False


def _default_env(
    path: Path, prefix: str, ports: tuple[tuple[str, int], ...]
) -> tuple[tuple[str, str], ...]:
    """The variables of a file with ports and no [env]: `<NAME>_PORT` and the project."""
    env = (
        *((f"{name.upper()}_PORT", "{" + name + "_port}") for name, _ in ports),
        ("COMPOSE_PROJECT_NAME", "{compose_project_name}"),
    )
    variables = [variable for variable, _ in env]
    if len(set(variables)) != len(variables):
        raise ProfileError(
            path,
            prefix + "ports",
            "two ports differ only in case, so they would export one variable "
            "(rename one, or list the variables in an env table)",
        )
    return env


def _url_keys(
    path: Path, prefix: str, table: Mapping[str, Any], ports: tuple[tuple[str, int], ...]
) -> tuple[bool, str | None]:
    """`urls` (whether each port gets `<NAME>_URL`) and `bare_name` (the port answering
    the bare `<slug>.localhost`), checked."""
    urls = table.get("urls", False)
    if not isinstance(urls, bool):
        raise ProfileError(path, prefix + "urls", "must be true or false")
    bare = table.get("bare_name")
    if bare is not None:
        names = [name for name, _ in ports if port_label(name)]
        if not isinstance(bare, str) or bare not in names:
            raise ProfileError(
                path, prefix + "bare_name", f"must name a port ({', '.join(names) or 'none'})"
            )
    return urls, bare


def _read_toml(path: Path) -> tuple[dict[str, Any], bytes]:
    import tomllib

    from portalloc.errors import PortallocError

    try:
        raw = read_bytes(path, limit=PROJECT_FILE_LIMIT)
        return tomllib.loads(raw.decode("utf-8")), raw
    except OSError as exc:
        raise ProfileError(path, "(file)", f"cannot be read: {exc.strerror}") from None
    except PortallocError as exc:  # a FIFO, a device: fs refuses it without blocking
        reason = getattr(exc, "reason", exc.message)
        raise ProfileError(path, "(file)", f"cannot be read: {reason}") from None
    except UnicodeDecodeError:
        raise ProfileError(path, "(file)", "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(path, "(file)", f"is not valid TOML: {exc}") from None
    except RecursionError:
        raise ProfileError(path, "(file)", "is nested too deeply") from None


def load_project_file(
    path: Path,
    trust_dir: Callable[[], Path | None] | None = None,
    *,
    trust_all: bool = False,
) -> ProjectFile:
    """The settings and profile PATH sets; raise ProfileError naming the key at fault.

    The [env] entries that are not safe by construction apply only when the file's
    content is trusted (a record in TRUST_DIR, asked only when such entries exist) or
    TRUST_ALL; until then they wait, and ProjectFile.waiting names them.
    """
    data, raw = _read_toml(path)
    if path.name == "pyproject.toml":
        tool = data.get("tool", {})
        if not isinstance(tool, dict):
            raise ProfileError(path, "tool", "must be a table")
        table = tool.get("portalloc")
        prefix = "tool.portalloc."
        if table is None:
            return ProjectFile({}, {}, None, data=raw)
        if not isinstance(table, dict):
            raise ProfileError(path, "tool.portalloc", "must be a table")
    else:
        table = data
        prefix = ""

    values: dict[str, int] = {}
    sources: dict[str, str] = {}
    known = {
        "base",
        "range",
        "ttl_minutes",
        "max_sessions",
        "compose_prefix",
        "ports",
        "env",
        "env_file",
        "manifest",
        "urls",
        "bare_name",
    }
    for key in table:
        if key not in known:
            raise ProfileError(
                path, prefix + key, f"unknown key (known: {', '.join(sorted(known))})"
            )
    for key in SETTINGS:
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProfileError(path, prefix + key, f"must be an integer, got {value!r}")
            values[key] = value
            sources[key] = f"{path}: {prefix}{key}"

    ports = DEFAULT_PROFILE.ports
    env: tuple[tuple[str, str], ...] | None = None
    compose_prefix = DEFAULT_PROFILE.compose_prefix
    custom = False

    if "compose_prefix" in table:
        compose_prefix = table["compose_prefix"]
        if not isinstance(compose_prefix, str) or not COMPOSE_NAME.fullmatch(compose_prefix):
            raise ProfileError(
                path,
                prefix + "compose_prefix",
                "must be lowercase letters, digits, '-' or '_', starting with a letter or digit",
            )
        custom = True

    if "ports" in table:
        raw_ports = table["ports"]
        if not isinstance(raw_ports, dict) or not raw_ports:
            raise ProfileError(path, prefix + "ports", "must be a table of name = offset")
        parsed: list[tuple[str, int]] = []
        for name, offset in raw_ports.items():
            if not isinstance(name, str) or not SHELL_NAME.fullmatch(name):
                raise ProfileError(path, f"{prefix}ports.{name}", "must be a plain identifier")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ProfileError(path, f"{prefix}ports.{name}", "offset must be an integer >= 0")
            parsed.append((name, offset))
        offsets = [offset for _, offset in parsed]
        if len(set(offsets)) != len(offsets):
            raise ProfileError(path, prefix + "ports", "two ports share one offset")
        ports = tuple(parsed)
        custom = True

    profile_fields = Profile(ports=ports, env=()).allowed_fields()
    urls, bare_name = _url_keys(path, prefix, table, ports)
    custom = custom or urls or bare_name is not None
    waiting: tuple[tuple[str, str], ...] = ()
    trusted = False
    if "env" in table or urls:
        raw_env = table.get("env", {})
        if not isinstance(raw_env, dict) or ("env" in table and not raw_env):
            raise ProfileError(path, prefix + "env", "must be a table of VARIABLE = template")
        parsed_env: list[tuple[str, str]] = []
        if "env" not in table:
            # `urls = true` alone: the variables a file without [env] gives, and the URLs.
            parsed_env = list(_default_env(path, prefix, ports) if "ports" in table else [])
        for variable, template in raw_env.items():
            key = f"{prefix}env.{variable}"
            if not SHELL_NAME.fullmatch(variable):
                raise ProfileError(path, key, "is not a valid shell variable name")
            if not isinstance(template, str):
                raise ProfileError(path, key, "template must be a string")
            if has_unprintable(template):
                # Newlines, ESC and friends have no business in a port variable, and
                # would reach terminals and env files raw.
                raise ProfileError(path, key, "template must not contain control characters")
            try:
                names = template_fields(template)
            except ValueError as exc:
                raise ProfileError(path, key, str(exc)) from None
            allowed = ", ".join("{" + f + "}" for f in sorted(profile_fields))
            for name in names:
                if name not in profile_fields:
                    raise ProfileError(path, key, f"unknown field {{{name}}} (allowed: {allowed})")
            if not names:
                # A fixed value is no port of the lease, and a fixed command is how a
                # hostile project file would plant one: every variable carries a field.
                raise ProfileError(path, key, f"template must use a field ({allowed})")
            parsed_env.append((variable, template))
        if urls:
            # `<NAME>_URL = "{<name>_url}"` for each port with a name, unless [env] sets
            # that variable itself. A URL is no safe shape: it waits for trust like any
            # entry of [env], and a name the second wall refuses is refused here too.
            named = {variable for variable, _template in parsed_env}
            parsed_env += [
                (f"{name.upper()}_URL", "{" + name + "_url}")
                for name, _offset in ports
                if port_label(name) and f"{name.upper()}_URL" not in named
            ]
        fields = profile_fields - {"session_id"}
        unsafe = [entry for entry in parsed_env if not safe_entry(*entry, fields)]
        if unsafe:
            from portalloc import trust

            directory = trust_dir() if trust_dir else None
            trusted = trust_all or trust.believed(directory, raw, path)
            if trusted:
                for variable, _template in unsafe:
                    if forbidden_variable(variable):
                        # The second wall: refused even from a file the user trusted.
                        raise ProfileError(
                            path,
                            f"{prefix}env.{variable}" if variable in raw_env else prefix + "urls",
                            "changes how shells, loaders or interpreters behave; a "
                            "project file may not set it, trusted or not",
                        )
            else:
                waiting = tuple(unsafe)
                parsed_env = [entry for entry in parsed_env if entry not in unsafe]
        env = tuple(parsed_env) if "env" in table or "ports" in table else None
        if env is None:
            # The default profile's variables with the URLs of its ports: only the URL
            # entries are this file's, and they may wait for trust.
            added = tuple(entry for entry in parsed_env if entry not in DEFAULT_PROFILE.env)
            env = (*DEFAULT_PROFILE.env, *added)
        custom = True
    elif "ports" in table:
        env = _default_env(path, prefix, ports)

    profile = None
    files = {
        key: _relative_file(path, prefix + key, table[key]) for key in FILE_KEYS if key in table
    }
    if custom or files:
        profile = Profile(
            ports=ports,
            env=env if env is not None else DEFAULT_PROFILE.env,
            compose_prefix=compose_prefix,
            source=path,
            env_file=files.get("env_file"),
            manifest=files.get("manifest"),
            waiting=len(waiting),
            urls=urls,
            bare_name=bare_name,
        )
    return ProjectFile(values, sources, profile, waiting, trusted, raw)

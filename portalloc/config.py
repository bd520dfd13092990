"""Settings from flags, environment, project file and defaults, validated once."""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from portalloc.errors import ConfigError, ProfileError
from portalloc.models import (
    COMPOSE_NAME,
    DEFAULT_PROFILE,
    MAX_TTL_MINUTES,
    SHELL_NAME,
    Profile,
    forbidden_variable,
    template_fields,
)

MAX_PORT = 65535
PROJECT_FILES = ("portalloc.toml", "pyproject.toml")

ENV_BASE = "PORT_ALLOC_BASE"
ENV_RANGE = "PORT_ALLOC_RANGE"
ENV_TTL = "PORT_ALLOC_TTL_MINUTES"
ENV_MAX = "PORT_ALLOC_MAX_SESSIONS"
ENV_STATE_DIR = "PORTALLOC_STATE_DIR"
ENV_LOCK_TIMEOUT = "PORTALLOC_LOCK_TIMEOUT"
ENV_SKIP_PORT_CHECK = "PORTALLOC_SKIP_PORT_CHECK"
# The smallest value each integer setting accepts (range also needs the profile's span).
MINIMUMS = {"base": 1024, "range": 4, "ttl_minutes": 1, "max_sessions": 1}


def default_state_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("portalloc", appauthor=False))


@dataclass(frozen=True)
class PortAllocatorConfig:
    """Validated settings. Build it with `from_env()`; direct construction validates too."""

    base: int = 10000
    range: int = 100
    ttl_minutes: int = 120
    max_sessions: int = 20
    state_dir: Path = field(default_factory=default_state_dir)
    lock_timeout: float = 10.0
    skip_port_check: bool = False
    profile: Profile = DEFAULT_PROFILE
    # Where each value came from ("PORT_ALLOC_BASE", "--ttl", "portalloc.toml: base"),
    # so an error names what the user has to change.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.state_dir, Path):
            # The Python API may pass a string; hold it to the rules of the variable.
            raw: object = self.state_dir
            if not isinstance(raw, str) or not raw.strip():
                raise ConfigError(ENV_STATE_DIR, repr(raw), "must be a directory path")
            object.__setattr__(self, "state_dir", _expand_dir(raw))

        def label(key: str, env_name: str) -> str:
            return self.sources.get(key, env_name)

        _check_int(label("base", ENV_BASE), self.base, MINIMUMS["base"], MAX_PORT)
        source = self.profile.source
        if self.range < self.profile.span_needed and "range" not in self.sources and source:
            # The default range is fine; the profile's offsets are what the user wrote.
            name, offset = max(self.profile.ports, key=lambda item: item[1])
            table = "tool.portalloc." if source.name == "pyproject.toml" else ""
            raise ProfileError(
                source,
                f"{table}ports.{name}",
                f"offset {offset} does not fit in a block of {self.range} ports "
                f"(set range >= {offset + 1})",
            )
        _check_int(label("range", ENV_RANGE), self.range, self.min_range, MAX_PORT)
        _check_int(
            label("ttl_minutes", ENV_TTL),
            self.ttl_minutes,
            MINIMUMS["ttl_minutes"],
            MAX_TTL_MINUTES,
            why_max="one year",
        )
        _check_int(
            label("max_sessions", ENV_MAX), self.max_sessions, MINIMUMS["max_sessions"], None
        )
        self._check_span(label)
        if not (self.lock_timeout > 0 and math.isfinite(self.lock_timeout)):
            raise ConfigError(
                label("lock_timeout", ENV_LOCK_TIMEOUT), self.lock_timeout, "must be a number > 0"
            )

    def _check_span(self, label: Callable[[str, str], str]) -> None:
        """base + range * max_sessions - 1 <= 65535, blaming a value the user set."""
        if self.base + self.range * self.max_sessions - 1 <= MAX_PORT:
            return
        why = "so that base + range * max_sessions - 1 <= 65535"
        min_base, min_sessions = MINIMUMS["base"], MINIMUMS["max_sessions"]
        max_fit = (MAX_PORT - self.base + 1) // self.range
        check_sessions = partial(
            _check_int, label("max_sessions", ENV_MAX), self.max_sessions, min_sessions, max_fit
        )
        if max_fit >= 1 and ("max_sessions" in self.sources or not self.sources):
            check_sessions(why_max=why)
        max_base = MAX_PORT + 1 - self.range * self.max_sessions
        if ("base" in self.sources or "range" not in self.sources) and max_base >= min_base:
            _check_int(label("base", ENV_BASE), self.base, min_base, max_base, why_max=why)
        min_range = self.min_range
        max_range = (MAX_PORT + 1 - self.base) // self.max_sessions
        if max_range >= min_range:
            _check_int(label("range", ENV_RANGE), self.range, min_range, max_range, why_max=why)
        if max_fit >= 1:
            check_sessions(why_max=why)
        # Not even one block of this range fits above base.
        why = "so that one block fits below 65536"
        if MAX_PORT + 1 - self.range >= min_base:
            _check_int(
                label("base", ENV_BASE), self.base, min_base, MAX_PORT + 1 - self.range, why_max=why
            )
        _check_int(
            label("range", ENV_RANGE), self.range, min_range, MAX_PORT + 1 - self.base, why_max=why
        )

    @property
    def min_range(self) -> int:
        return max(MINIMUMS["range"], self.profile.span_needed)

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "leases.json"

    @property
    def span_end(self) -> int:
        return self.base + self.range * self.max_sessions - 1

    def with_ttl(self, ttl_minutes: int | None, source: str = "--ttl") -> PortAllocatorConfig:
        if ttl_minutes is None:
            return self
        return replace(
            self, ttl_minutes=ttl_minutes, sources={**self.sources, "ttl_minutes": source}
        )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
        use_project_file: bool = True,
    ) -> PortAllocatorConfig:
        """Environment over project file over defaults; raises ConfigError/ProfileError."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if use_project_file:
            found = None
            try:
                found = find_project_file(cwd or Path.cwd())
            except FileNotFoundError:
                pass  # the current directory was deleted: no project file to find
            if found is not None:
                values, sources = load_project_file(found)

        for key, name in (
            ("base", ENV_BASE),
            ("range", ENV_RANGE),
            ("ttl_minutes", ENV_TTL),
            ("max_sessions", ENV_MAX),
        ):
            raw = env.get(name)
            if raw is not None:
                values[key] = _parse_int(name, raw, MINIMUMS[key])
                sources[key] = name

        raw_dir = env.get(ENV_STATE_DIR)
        if raw_dir is not None:
            if not raw_dir.strip():
                raise ConfigError(ENV_STATE_DIR, repr(raw_dir), "must be a directory path")
            values["state_dir"] = _expand_dir(raw_dir)

        raw_timeout = env.get(ENV_LOCK_TIMEOUT)
        if raw_timeout is not None:
            try:
                timeout = float(raw_timeout)
            except ValueError:
                timeout = math.nan
            if not (timeout > 0 and math.isfinite(timeout)):
                raise ConfigError(ENV_LOCK_TIMEOUT, raw_timeout, "must be a number > 0")
            values["lock_timeout"] = timeout

        raw_skip = env.get(ENV_SKIP_PORT_CHECK)
        if raw_skip is not None:
            lowered = raw_skip.strip().lower()
            if lowered in ("1", "true", "yes"):
                values["skip_port_check"] = True
            elif lowered in ("", "0", "false", "no"):
                values["skip_port_check"] = False
            else:
                raise ConfigError(ENV_SKIP_PORT_CHECK, raw_skip, "must be 1 or 0")

        return cls(**values, sources=sources)


def _expand_dir(raw: str) -> Path:
    try:
        return Path(raw).expanduser()
    except RuntimeError:  # `~nosuchuser/...`
        raise ConfigError(
            ENV_STATE_DIR, raw, "names a home directory that does not exist"
        ) from None


def _parse_int(name: str, raw: str, minimum: int) -> int:
    try:
        return int(raw.strip(), 10)
    except ValueError:
        raise ConfigError(name, raw, f"must be an integer >= {minimum}") from None


def _check_int(
    name: str, value: object, minimum: int, maximum: int | None, *, why_max: str = ""
) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, f"must be an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(name, value, f"must be an integer >= {minimum}")
    if maximum is not None and value > maximum:
        suffix = f" ({why_max})" if why_max else ""
        raise ConfigError(name, value, f"must be an integer <= {maximum}{suffix}")


def find_project_file(start: Path) -> Path | None:
    """The nearest portalloc.toml, or pyproject.toml with [tool.portalloc], walking up."""
    for directory in (start, *start.parents):
        try:
            candidate = directory / "portalloc.toml"
            if candidate.is_file():
                return candidate
            pyproject = directory / "pyproject.toml"
            if pyproject.is_file() and _has_tool_table(pyproject):
                return pyproject
        except OSError:
            # A directory we may not look into (another user's home, a 0700 parent)
            # holds no profile for us; keep walking up.
            continue
    return None


def _has_tool_table(pyproject: Path) -> bool:
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    # Cheap pre-check before paying for a TOML parse on the hot path.
    return "tool.portalloc" in text


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ProfileError(path, "(file)", f"cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(path, "(file)", f"is not valid TOML: {exc}") from None


def load_project_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings and profile from a project file, as constructor keyword arguments."""
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        tool = data.get("tool", {})
        if not isinstance(tool, dict):
            raise ProfileError(path, "tool", "must be a table")
        table = tool.get("portalloc")
        prefix = "tool.portalloc."
        if table is None:
            return {}, {}
        if not isinstance(table, dict):
            raise ProfileError(path, "tool.portalloc", "must be a table")
    else:
        table = data
        prefix = ""

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    known = {"base", "range", "ttl_minutes", "max_sessions", "compose_prefix", "ports", "env"}
    for key in table:
        if key not in known:
            raise ProfileError(
                path, prefix + key, f"unknown key (known: {', '.join(sorted(known))})"
            )
    for key in ("base", "range", "ttl_minutes", "max_sessions"):
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
    if "env" in table:
        raw_env = table["env"]
        if not isinstance(raw_env, dict) or not raw_env:
            raise ProfileError(path, prefix + "env", "must be a table of VARIABLE = template")
        parsed_env: list[tuple[str, str]] = []
        for variable, template in raw_env.items():
            key = f"{prefix}env.{variable}"
            if not SHELL_NAME.fullmatch(variable):
                raise ProfileError(path, key, "is not a valid shell variable name")
            if forbidden_variable(variable):
                raise ProfileError(
                    path,
                    key,
                    "changes how shells, loaders or interpreters behave; a project file "
                    "may not set it",
                )
            if not isinstance(template, str):
                raise ProfileError(path, key, "template must be a string")
            if any(unicodedata.category(char) == "Cc" for char in template):
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
        env = tuple(parsed_env)
        custom = True
    elif "ports" in table:
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

    if custom:
        values["profile"] = Profile(
            ports=ports,
            env=env if env is not None else DEFAULT_PROFILE.env,
            compose_prefix=compose_prefix,
            source=path,
        )
    return values, sources

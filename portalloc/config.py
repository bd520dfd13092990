"""Settings from flags, environment, project file and defaults, validated once."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from portalloc.errors import ConfigError, ProfileError
from portalloc.models import DEFAULT_PROFILE, Profile
from portalloc.profile import ProjectFile, find_project_file, load_project_file

# A frozen dataclass without importing dataclasses: `portalloc env` builds one.
from portalloc.records import dataclass, field, replace
from portalloc.rules import DEFAULT_PROXY_PORT, MAX_TTL_MINUTES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_PORT = 65535

ENV_BASE = "PORT_ALLOC_BASE"
ENV_RANGE = "PORT_ALLOC_RANGE"
ENV_TTL = "PORT_ALLOC_TTL_MINUTES"
ENV_MAX = "PORT_ALLOC_MAX_SESSIONS"
ENV_STATE_DIR = "PORTALLOC_STATE_DIR"
ENV_LOCK_TIMEOUT = "PORTALLOC_LOCK_TIMEOUT"
ENV_SKIP_PORT_CHECK = "PORTALLOC_SKIP_PORT_CHECK"
ENV_PROXY_PORT = "PORTALLOC_PROXY_PORT"
# The smallest value each integer setting accepts (range also needs the profile's span).
MINIMUMS = {"base": 1024, "range": 4, "ttl_minutes": 1, "max_sessions": 1, "proxy_port": 1}


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
    # The port of `portalloc proxy` (Caddy), in every named URL.
    proxy_port: int = DEFAULT_PROXY_PORT
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
        _check_int(label("proxy_port", ENV_PROXY_PORT), self.proxy_port, 1, MAX_PORT)
        if "proxy_port" in self.sources or self.profile.urls:
            # Chosen, or in URLs the profile asks for: it must not be a block's port.
            # (The default in someone's other span is refused by `proxy start` alone.)
            self.check_proxy_port()
        timeout = self.lock_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ConfigError(
                label("lock_timeout", ENV_LOCK_TIMEOUT), timeout, "must be a number > 0"
            )
        if not (timeout > 0 and math.isfinite(timeout)):
            # As written: 0 and -1, not 0.0 and -1.0.
            shown = f"{timeout:g}" if isinstance(timeout, float) else timeout
            raise ConfigError(
                label("lock_timeout", ENV_LOCK_TIMEOUT), shown, "must be a number > 0"
            )

    def _check_span(self, label: Callable[[str, str], str]) -> None:
        """base + range * max_sessions - 1 <= 65535, blaming a value the user set."""
        if self.span_end <= MAX_PORT:
            return
        top = MAX_PORT + 1
        # Each setting with the largest value that would fit, the others as they are.
        limits = {
            "max_sessions": (ENV_MAX, MINIMUMS["max_sessions"], (top - self.base) // self.range),
            "base": (ENV_BASE, MINIMUMS["base"], top - self.range * self.max_sessions),
            "range": (ENV_RANGE, self.min_range, (top - self.base) // self.max_sessions),
        }
        blamed = [key for key in limits if key in self.sources] or list(limits)
        for key in blamed:
            env_name, low, high = limits[key]
            if high >= low:
                _check_int(
                    label(key, env_name),
                    getattr(self, key),
                    low,
                    high,
                    why_max="so that base + range * max_sessions - 1 <= 65535",
                )
        # No value alone can fix it: not even one block of this range fits above base.
        why = "so that one block fits below 65536"
        if top - self.range >= MINIMUMS["base"]:
            _check_int(
                label("base", ENV_BASE), self.base, MINIMUMS["base"], top - self.range, why_max=why
            )
        _check_int(
            label("range", ENV_RANGE), self.range, self.min_range, top - self.base, why_max=why
        )

    def check_proxy_port(self) -> None:
        """Raise ConfigError when the proxy port lies in the span of blocks."""
        if self.base <= self.proxy_port <= self.span_end:
            raise ConfigError(
                self.sources.get("proxy_port", ENV_PROXY_PORT),
                self.proxy_port,
                f"lies inside the blocks' span {self.base}-{self.span_end}; "
                "choose a port outside it",
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
                project: ProjectFile = load_project_file(found, lambda: trust_dir_for(env))
                values, sources = dict(project.values), dict(project.sources)
                if project.profile is not None:
                    values["profile"] = project.profile

        for key, name in (
            ("base", ENV_BASE),
            ("range", ENV_RANGE),
            ("ttl_minutes", ENV_TTL),
            ("max_sessions", ENV_MAX),
            ("proxy_port", ENV_PROXY_PORT),
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
            # Only parsed here; the value is checked with every other in __post_init__.
            try:
                values["lock_timeout"] = float(raw_timeout)
            except ValueError:
                raise ConfigError(ENV_LOCK_TIMEOUT, raw_timeout, "must be a number > 0") from None
            sources["lock_timeout"] = ENV_LOCK_TIMEOUT

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


def state_dir_for(env: Mapping[str, str]) -> Path:
    """The state dir the environment names (PORTALLOC_STATE_DIR), else the default."""
    raw = env.get(ENV_STATE_DIR)
    if raw is not None and raw.strip():
        return _expand_dir(raw)
    return default_state_dir()


def trust_dir_for(env: Mapping[str, str]) -> Path | None:
    """Where this user's trust records live: under the state dir when it is private,
    else under the user's own default state dir (never in a shared one)."""
    from portalloc.trust import trust_dir

    state = state_dir_for(env)
    raw = env.get(ENV_STATE_DIR)
    if raw is not None and raw.strip():
        return trust_dir(state, None) or trust_dir(default_state_dir(), None)
    return trust_dir(state, None)


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

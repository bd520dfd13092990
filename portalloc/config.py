"""Settings from flags, environment, project file and defaults, validated once."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Mapping

from portalloc.errors import ConfigError, PortallocError, ProfileError
from portalloc.fs import read_bytes, stat_or_none
from portalloc.models import DEFAULT_PROFILE, Profile
from portalloc.rules import DEFAULT_PROXY_PORT, MAX_TTL_MINUTES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from portalloc.profile import ProjectFile

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
# What a setting nobody gave is (`portalloc init` plans with them too).
DEFAULT_BASE = 10000
DEFAULT_RANGE = 100
DEFAULT_TTL_MINUTES = 120
DEFAULT_MAX_SESSIONS = 20
# The files portalloc names: the ledger in the state dir (its lock and index beside it
# take its name), and the manifest `env --write DIR` writes in DIR.
LEDGER_NAME = "leases.json"
MANIFEST_NAME = ".worktree-ports.json"


def default_state_dir() -> Path:
    from pathlib import Path

    import platformdirs

    return Path(platformdirs.user_state_dir("portalloc", appauthor=False))


class PortAllocatorConfig:
    """Validated settings. Build it with `from_env()`; direct construction validates too.

    Frozen, compared and hashed by value as a frozen dataclass is, but written out: the
    read path (`portalloc env`) builds one on every call, and a state dir given as a
    string stays one until something asks for `state_dir`, so that neither
    `dataclasses` nor `pathlib` is imported for it (bench/README.md).
    """

    base: int
    range: int
    ttl_minutes: int
    max_sessions: int
    lock_timeout: float
    skip_port_check: bool
    profile: Profile
    # The port of `portalloc proxy` (Caddy), in every named URL.
    proxy_port: int
    # Where each value came from ("PORT_ALLOC_BASE", "--ttl", "portalloc.toml: base"),
    # so an error names what the user has to change.
    sources: Mapping[str, str]
    _FIELDS = (
        "base", "range", "ttl_minutes", "max_sessions", "state_dir", "lock_timeout",
        "skip_port_check", "profile", "proxy_port",
    )  # fmt: skip

    def __init__(
        self,
        base: int = DEFAULT_BASE,
        range: int = DEFAULT_RANGE,
        ttl_minutes: int = DEFAULT_TTL_MINUTES,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        state_dir: Path | str | None = None,  # None: default_state_dir()
        lock_timeout: float = 10.0,
        skip_port_check: bool = False,
        profile: Profile = DEFAULT_PROFILE,
        proxy_port: int = DEFAULT_PROXY_PORT,
        sources: Mapping[str, str] | None = None,
    ) -> None:
        if state_dir is None:
            state_dir = default_state_dir()
        elif not _is_path(state_dir):
            # The Python API may pass a string; hold it to the rules of the variable.
            raw: object = state_dir
            if not isinstance(raw, str) or not raw.strip():
                raise ConfigError(ENV_STATE_DIR, repr(raw), "must be a directory path")
            state_dir = _expand_dir(raw)
        values = {
            "base": base,
            "range": range,
            "ttl_minutes": ttl_minutes,
            "max_sessions": max_sessions,
            "_state_dir": state_dir,
            "lock_timeout": lock_timeout,
            "skip_port_check": skip_port_check,
            "profile": profile,
            "proxy_port": proxy_port,
            "sources": {} if sources is None else sources,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._check()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PortAllocatorConfig) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"{type(self).__name__}({shown})"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (*self._arguments(), self.sources))

    def _arguments(self) -> tuple[object, ...]:
        """What __init__ takes to make this config again, sources aside."""
        raw = self.__dict__["_state_dir"]
        return tuple(raw if name == "state_dir" else getattr(self, name) for name in self._FIELDS)

    @property
    def state_dir(self) -> Path:
        raw: Path | str = self.__dict__["_state_dir"]
        if isinstance(raw, str):
            from pathlib import Path

            raw = Path(raw)
            object.__setattr__(self, "_state_dir", raw)
        return raw

    def _check(self) -> None:
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
        if not 0 < timeout < float("inf"):  # not NaN, not infinite (math: a .so to load)
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
    def profile_chosen(self) -> bool:
        """Whether a project file gave this config its profile or settings: only then
        does a lease follow the request's profile (a file's settings are named
        "<path>: <key>"; settings from the environment alone leave a lease as it is)."""
        return self.profile is not DEFAULT_PROFILE or any(
            ": " in source for source in self.sources.values()
        )

    @property
    def project_file(self) -> str | None:
        """The project file this config's profile or settings came from, if any."""
        if self.profile.source is not None:
            return str(self.profile.source)
        for source in self.sources.values():
            if ": " in source:
                return source.rsplit(": ", 1)[0]
        return None

    @property
    def min_range(self) -> int:
        return max(MINIMUMS["range"], self.profile.span_needed)

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER_NAME

    @property
    def ledger_file(self) -> str:
        """The ledger's path as a string: what the read path opens, without pathlib."""
        return os.path.join(self.__dict__["_state_dir"], LEDGER_NAME)  # noqa: PTH118

    @property
    def span_end(self) -> int:
        return self.base + self.range * self.max_sessions - 1

    def with_ttl(self, ttl_minutes: int | None, source: str = "--ttl") -> PortAllocatorConfig:
        if ttl_minutes is None:
            return self
        values = dict(zip(self._FIELDS, self._arguments(), strict=True))
        values["ttl_minutes"] = ttl_minutes
        values["sources"] = {**self.sources, "ttl_minutes": source}
        return type(self)(**values)  # type: ignore[arg-type]

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
                found = find_project_file(cwd or os.getcwd())  # noqa: PTH109 (no pathlib)
            except FileNotFoundError:
                pass  # the current directory was deleted: no project file to find
            if found is not None:
                from portalloc.profile import load_project_file

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


# A project file is read at every prompt below it: one planted huge (in /tmp, say) must
# cost nothing. Real ones are a few KiB; pyproject.toml files a few dozen.
PROJECT_FILE_LIMIT = 1 << 20


def find_project_file(start: Path | str) -> Path | None:
    """The nearest portalloc.toml, or pyproject.toml with [tool.portalloc], walking up."""
    directory = os.fspath(start)
    while True:
        try:
            candidate = os.path.join(directory, "portalloc.toml")  # noqa: PTH118 (no pathlib)
            if _is_file(candidate):
                return _path(candidate)
            pyproject = os.path.join(directory, "pyproject.toml")  # noqa: PTH118
            if _is_file(pyproject) and _has_tool_table(pyproject):
                return _path(pyproject)
        except OSError:
            # A directory we may not look into (another user's home, a 0700 parent)
            # holds no profile for us; keep walking up.
            pass
        # "." last for a relative path, as Path.parents has it
        parent = os.path.dirname(directory) or "."  # noqa: PTH120
        if parent == directory:
            return None
        directory = parent


def _is_file(path: str) -> bool:
    """Path(PATH).is_file(), without importing pathlib."""
    info = stat_or_none(path)
    return info is not None and stat.S_ISREG(info.st_mode)


def _path(path: str) -> Path:
    from pathlib import Path

    return Path(path)


def _has_tool_table(pyproject: Path | str) -> bool:
    try:
        data = read_bytes(pyproject, limit=PROJECT_FILE_LIMIT)
    except (OSError, PortallocError):
        return False
    # Cheap pre-check before paying for a TOML parse on the hot path.
    return b"tool.portalloc" in data


def state_dir_for(env: Mapping[str, str]) -> Path:
    """The state dir the environment names (PORTALLOC_STATE_DIR), else the default."""
    from pathlib import Path

    raw = env.get(ENV_STATE_DIR)
    if raw is not None and raw.strip():
        return Path(_expand_dir(raw))
    return default_state_dir()


def trust_dir_for(env: Mapping[str, str]) -> Path | None:
    """Where this user's trust records live: under the state dir when it is private,
    else under the user's own default state dir (never in a shared one)."""
    from portalloc.trust import trust_dir

    state = state_dir_for(env)
    raw = env.get(ENV_STATE_DIR)
    if raw is not None and raw.strip():
        if not state.is_absolute():
            # Relative to wherever the command runs: in a cloned repository, a state dir
            # (trust records and all) that came with it. The user's own dir instead.
            return trust_dir(default_state_dir(), None)
        return trust_dir(state, None) or trust_dir(default_state_dir(), None)
    return trust_dir(state, None)


def _expand_dir(raw: str) -> str:
    """RAW with a leading `~` or `~user` expanded, as Path.expanduser() does it."""
    if not raw.startswith("~"):
        return raw
    first, slash, rest = raw.partition(os.sep)
    home = os.path.expanduser(first)  # noqa: PTH111 (no pathlib on the read path)
    if home.startswith("~"):  # `~nosuchuser/...`
        raise ConfigError(ENV_STATE_DIR, raw, "names a home directory that does not exist")
    return home + slash + rest


def _is_path(value: object) -> bool:
    """Whether VALUE is a pathlib.Path (none can be while nobody imported pathlib)."""
    pathlib = sys.modules.get("pathlib")
    return pathlib is not None and isinstance(value, pathlib.Path)


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

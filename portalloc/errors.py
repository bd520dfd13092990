"""Expected failures: each carries its data and the exit code the CLI maps it to.

A built-in base where one fits, as filelock's errors have: a lock timeout is a
TimeoutError, an unusable ledger an OSError, so code that knows only the built-ins
still catches them. Their message is theirs: errno, strerror and filename stay None."""

from __future__ import annotations

# Annotations only: both modules cost start-up time on the read path (bench/README.md).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any


def printable(text: object) -> str:
    """TEXT for a one-line message: control characters escaped, never raw."""
    shown = str(text)
    return shown if shown.isprintable() else shown.encode("unicode_escape").decode("ascii")


class PortallocError(Exception):
    """Base of every expected failure; adapters translate it once."""

    exit_code = 1
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take their data, not the message, as arguments: rebuild from the
        # attributes, so errors cross process boundaries (xdist, multiprocessing) whole.
        return (_rebuild, (type(self), dict(self.__dict__)))


def _rebuild(cls: type[PortallocError], state: dict[str, Any]) -> PortallocError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class ConfigError(PortallocError):
    """A setting (env variable, flag or project file key) has an invalid value."""

    exit_code = 2
    code = "invalid_config"

    def __init__(self, variable: str, value: object, rule: str) -> None:
        self.variable = variable
        self.value = value
        self.rule = rule
        super().__init__(f"{variable}={printable(value)} is invalid: {rule}")


class ProfileError(PortallocError):
    """The project file (portalloc.toml / pyproject.toml) is not usable."""

    exit_code = 2
    code = "invalid_profile"

    def __init__(self, path: Path, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        super().__init__(f"{printable(path)}: {printable(key)}: {reason}")


class InvalidSessionId(PortallocError):
    """The session id is empty, too long or holds control characters."""

    exit_code = 2
    code = "invalid_session_id"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid session id: {reason}")


class UsageError(PortallocError):
    """Bad input that is not a session id or a setting (an unknown key for `get`)."""

    exit_code = 2
    code = "usage"


class LeaseRefused(UsageError):
    """A lease the ledger would refuse to load (the rules in rules.lease_problem) is never
    written: it would be dropped at the next load and its ports handed out again."""

    code = "invalid_lease"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"refusing to write a lease the ledger would not load: {reason}")


class AdoptError(PortallocError):
    """`portalloc init` cannot adopt a file: not YAML, not compose, a bad template."""

    exit_code = 2
    code = "invalid_compose"

    def __init__(self, path: Path, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{printable(path)}:{line}" if line else printable(path)
        super().__init__(f"{where}: {reason}")


class NoPortsAvailable(PortallocError):
    """Every block is taken or max_sessions is reached; the ledger is unchanged."""

    exit_code = 3
    code = "no_ports_available"

    def __init__(self, reason: str, hint: str = "") -> None:
        self.reason = reason
        self.hint = hint
        super().__init__(f"no ports available: {reason}" + (f"; {hint}" if hint else ""))

    @classmethod
    def limit_reached(cls, active: int, limit: int, source: str | None) -> NoPortsAvailable:
        """ACTIVE leases reach max_sessions (LIMIT), set by SOURCE (a config source)."""
        leases = "1 active lease reaches" if active == 1 else f"{active} active leases reach"
        return cls(f"{leases} max_sessions ({limit})", _more_sessions(source))

    @classmethod
    def all_taken(cls, base: int, end: int, source: str | None) -> NoPortsAvailable:
        """Every block of BASE-END is leased or has a busy port."""
        return cls(f"every block in {base}-{end} is taken or busy", _more_sessions(source))


def _more_sessions(source: str | None) -> str:
    """What to change for more sessions: the setting that holds max_sessions (SOURCE is
    "PORT_ALLOC_MAX_SESSIONS" or "<project file>: <key>"), or a lease to release.
    `portalloc prune` would not help: every allocation reclaims dead leases first."""
    if source is None:
        setting = "PORT_ALLOC_MAX_SESSIONS (or max_sessions in the project file)"
    elif ": " in source:
        path, key = source.rsplit(": ", 1)
        setting = f"{key} in {path}"
    else:
        setting = source
    return f"raise {setting}, or release a lease (`portalloc status` lists them)"


class LeaseNotFound(PortallocError):
    """The session holds no active lease."""

    exit_code = 1
    code = "not_found"

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"no active lease for session {session_id!r}")


class LedgerError(PortallocError, OSError):
    """The ledger cannot be read or written."""

    exit_code = 1
    code = "ledger_error"

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"ledger {path}: {reason}")


class LockTimeout(PortallocError, TimeoutError):
    """Another process held the ledger lock past the timeout."""

    exit_code = 1
    code = "lock_timeout"

    def __init__(self, path: Path, timeout: float, holder: str | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.holder = holder
        held_by = f" (held by {holder})" if holder else ""
        super().__init__(f"could not lock {path} within {timeout:g}s{held_by}")


class MissingExtra(PortallocError):
    """An optional dependency group is not installed."""

    exit_code = 1
    code = "missing_extra"

    def __init__(self, extra: str, module: str) -> None:
        self.extra = extra
        self.module = module
        super().__init__(
            f"this command needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'portalloc[{extra}]'"
        )

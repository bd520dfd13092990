"""What every adapter says the same way: bodies, warnings, error -> exit code / HTTP status."""

from __future__ import annotations

import json
import sys

from portalloc.errors import (
    InvalidSessionId,
    LeaseNotFound,
    NoPortsAvailable,
    PortallocError,
    UsageError,
    printable,
)
from portalloc.fs import UnsafeFile, read_bytes, silence
from portalloc.render import render_sh

# typing and pathlib cost the read path (`portalloc env`) start-up time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from portalloc.config import PortAllocatorConfig
    from portalloc.models import PortAllocation
    from portalloc.service import PortAllocatorService

DEFAULT_HTTP_PORT = 7878

# Expected failure -> HTTP status; the exit code lives on each error class
# (`exit_code`). Anything not listed is 503: locked past the timeout, an unusable
# ledger, settings gone bad since start-up; nothing the client sent would change it.
HTTP_STATUS: dict[type[PortallocError], int] = {
    UnsafeFile: 503,  # a UsageError (exit 2), but a FIFO or symlinked ledger is the host's
    NoPortsAvailable: 409,
    InvalidSessionId: 422,
    UsageError: 400,
    LeaseNotFound: 404,
}


def http_status(error: PortallocError) -> int:
    for kind in type(error).__mro__:
        if kind in HTTP_STATUS:
            return HTTP_STATUS[kind]
    return 503


def allocate_body(allocation: PortAllocation) -> dict[str, Any]:
    """`allocate --json`, the MCP tool and the HTTP endpoint all answer this."""
    return {
        "success": True,
        "allocation": allocation.to_dict(),
        "env_snippet": render_sh(allocation.env),  # a value does not format itself
    }


def error_body(error: PortallocError) -> dict[str, Any]:
    """The failure body; exhaustion is exactly {"success": false, "error": ...}."""
    if isinstance(error, NoPortsAvailable):
        return {"success": False, "error": error.code}
    return {"success": False, "error": error.code, "message": error.message}


def say(message: str) -> None:
    """One line on stderr, prefixed like every portalloc message."""
    if sys.stderr is None:  # started with stderr closed (`2>&-`): nowhere to say it
        return
    try:
        sys.stderr.write(f"portalloc: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def warn(message: str) -> None:
    say(f"warning: {message}")


def warn_ephemeral_overlap(config: PortAllocatorConfig) -> None:
    """Warn when the configured span overlaps the kernel's ephemeral port range (Linux)."""
    try:
        low, high = map(int, read_bytes("/proc/sys/net/ipv4/ip_local_port_range").split())
    except (OSError, UnsafeFile, ValueError):
        return
    if config.base <= high and low <= config.span_end:
        warn(
            f"ports {config.base}-{config.span_end} overlap the kernel's ephemeral range "
            f"{low}-{high}; outgoing connections may take them"
        )


def lookup(allocation: PortAllocation, key: str) -> str:
    """The value `get SESSION KEY` prints: a port by name or field, a variable, or a name."""
    if key in allocation.ports:
        return str(allocation.ports[key])
    if key.endswith("_port") and key[: -len("_port")] in allocation.ports:
        return str(allocation.ports[key[: -len("_port")]])
    if key in allocation.env:
        return allocation.env[key]
    if key.endswith("_url") and key[: -len("_url")] in allocation.urls:
        return allocation.urls[key[: -len("_url")]]
    if key in ("compose_project_name", "session_id"):
        return str(getattr(allocation, key))
    if key == "slug" and allocation.slug is not None:
        return allocation.slug
    if key == "url" and allocation.url is not None:
        return allocation.url  # the bare name's
    known = [
        *allocation.ports,
        *(f"{n}_port" for n in allocation.ports),
        *(f"{n}_url" for n in allocation.urls),
        *allocation.env,
    ]
    raise UsageError(f"unknown key {key!r}; known: {', '.join(known)}, compose_project_name")


def json_text(data: Any) -> str:
    """JSON as every command prints it: indented, non-ASCII kept, one trailing newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def summary(allocation: PortAllocation) -> str:
    """`allocate` without --json; ports written as `status` writes them (`db 10000`)."""
    ports = "  ".join(f"{name} {port}" for name, port in allocation.ports.items())
    return (
        f"{allocation.session_id}\n"
        f"  ports    {ports}\n"
        f"  compose  {allocation.compose_project_name}\n"
        f"  expires  {allocation.expires_at:%Y-%m-%d %H:%M:%S}Z "
        f"({allocation.ttl_remaining_minutes:g} min)\n"
    )


def unexpected(exc: Exception) -> int:
    """An exception no command turned into a message of its own: one line, exit 1."""
    if isinstance(exc, PortallocError):
        # An expected failure, first: LedgerError and LockTimeout are OSErrors too.
        say(exc.message)
        return exc.exit_code
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.filename:
            say(f"{exc.filename}: {reason}")
            return 1
        # Stdout going away (`| head`, a full disk): one line, not a traceback, and
        # no second complaint when Python flushes stdout on its way out.
        _silence_stdout()
        if not isinstance(exc, BrokenPipeError):
            say(f"cannot write (standard output): {reason}")
        return 1
    from portalloc.adapters import guard

    if guard.debugging():
        raise exc
    say(guard.report(exc))
    return 1


def _silence_stdout() -> None:
    try:
        silence(sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def cli_service(*, prints_env: bool = False) -> PortAllocatorService:
    """The service a command line uses: settings from the environment (and project
    file), the ephemeral-range warning, warnings on stderr; for a command that hands
    out variables (PRINTS_ENV), the line saying which of the file's wait for trust."""
    from portalloc.config import PortAllocatorConfig
    from portalloc.service import open_service

    config = PortAllocatorConfig.from_env()
    warn_ephemeral_overlap(config)
    if prints_env:
        warn_untrusted(config)
    return open_service(config, on_warning=warn, command_line=True)


def warn_untrusted(config: PortAllocatorConfig) -> None:
    """One line when the project file has [env] entries that wait for `portalloc trust`."""
    profile = config.profile
    if profile.waiting and profile.source is not None:
        from shlex import quote

        where = printable(quote(str(profile.source)))  # no raw escapes at every prompt
        count = profile.waiting
        say(
            f"{printable(profile.source)}: {count} env "
            f"{'entry waits' if count == 1 else 'entries wait'} until you trust this file "
            f"(only port variables apply); review: portalloc trust --show {where}; "
            f"apply: portalloc trust {where}"
        )


def fail(error: PortallocError, json_output: bool) -> int:
    """An expected failure on a command line: the JSON body on stdout when asked for,
    one line on stderr; return its exit code."""
    if json_output:
        sys.stdout.write(json_text(error_body(error)))
        sys.stdout.flush()
    say(error.message)
    return error.exit_code

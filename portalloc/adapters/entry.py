"""The `portalloc` entry point: a read path at interpreter speed, the full CLI for the rest.

`eval "$(portalloc env)"` runs on every `cd` under direnv, in prompt hooks and in
recipes (`$(portalloc get S api)`). When the lease it needs exists, is live and needs
no refresh, the answer is in the ledger as last written: it is only ever replaced
whole, so it can be read without the lock, without Typer, pydantic or filelock.
portalloc.reading reads it and decides that, as it does for the service's `read`
(`get`, `check`) and for completion; this module only parses and prints. For
anything else (another command or flag, `--help`, a lease to make, refresh or
reclaim, any error) the full Typer CLI runs, and says what it says. A differential
test runs a matrix of invocations through both paths and compares every byte.

Two differences are by design: a read needs no lock, so `env` answers while another
process holds the lock for longer than the timeout (the full path's `env` grants, and
would time out; its `get` reads through portalloc.reading too);
and only a ledger save() wrote, unchanged since (its CRC-32 says so), is read this
way: a file edited by hand goes the full path, which checks the whole document. A
file forged to look like save()'s own, CRC and all, can be read differently by the
two, though both only ever print what passes the lease rules.
"""

from __future__ import annotations

import os
import sys

# Not typing's NamedTuple: each module this path imports is start-up time (bench/).
from portalloc.records import NamedTuple


class Read(NamedTuple):
    """An invocation the read path may serve."""

    command: str  # "env" or "get"
    session: str | None  # None: the current worktree (env only)
    value: str  # env: the format; get: the key


def parse(args: list[str]) -> Read | None:
    """`env [SESSION] [--format F|-f F|--format=F]`, `get SESSION KEY` or
    `allocate SESSION [--json]`, else None."""
    if args[:1] == ["allocate"]:
        plain = [arg for arg in args[1:] if arg != "--json"]
        if len(plain) == 1 and plain[0] and not plain[0].startswith("-"):
            return Read("allocate", plain[0], "json" if "--json" in args else "text")
        return None
    if not args or args[0] not in ("env", "get"):
        return None
    positional: list[str] = []
    fmt = "sh"
    rest = iter(args[1:])
    for arg in rest:
        if args[0] == "env" and arg in ("--format", "-f"):
            fmt = next(rest, "")
        elif args[0] == "env" and arg.startswith("--format="):
            fmt = arg[len("--format=") :]
        elif arg.startswith("-") or not arg:
            return None  # any other option, `--`, `-h`: the full CLI
        else:
            positional.append(arg)
    from portalloc.render import FORMATS  # the read path renders with it anyway

    if args[0] == "env" and fmt in FORMATS and len(positional) <= 1:
        return Read("env", positional[0] if positional else None, fmt)
    if args[0] == "get" and len(positional) == 2:
        return Read("get", positional[0], positional[1])
    return None


def serve(read: Read) -> str | None:
    """What the full CLI would print for READ, if the ledger answers it without a write
    (portalloc.reading decides; this only renders)."""
    from portalloc import reading
    from portalloc.adapters.common import lookup, warn_ephemeral_overlap
    from portalloc.config import PortAllocatorConfig
    from portalloc.facts import utcnow
    from portalloc.models import PortAllocation
    from portalloc.render import render

    config = PortAllocatorConfig.from_env()
    now = utcnow()
    if read.command == "get" and read.session is not None:
        lease = reading.lease(config, read.session, now)
    else:
        lease = reading.env_lease(config, read.session, now)
    if lease is None:
        return None
    allocation = PortAllocation.from_lease(lease, now, proxy_port=config.proxy_port)
    if read.command == "get":
        text = lookup(allocation, read.value) + "\n"
    else:
        text = render(allocation.env, read.value)
    warn_ephemeral_overlap(config)
    return text


def allocate(session: str, json_output: bool, *, process: bool = False) -> int:
    """`allocate SESSION [--json]` without Typer: the same service call, the same output,
    the same one-line errors. With 200 processes starting at once, what each one does
    not import is CPU the lock holder gets instead. PROCESS: as for main(); a grant
    printed ends the process at once (the table of 10,000 leases it read is not freed
    object by object: about 6 ms, bench/README.md)."""
    from portalloc.adapters.common import (
        allocate_body,
        cli_service,
        fail,
        json_text,
        summary,
        unexpected,
    )
    from portalloc.errors import PortallocError

    try:
        try:
            allocation = cli_service(prints_env=True).allocate(session)
        except PortallocError as exc:
            return fail(exc, json_output)
        sys.stdout.write(
            json_text(allocate_body(allocation)) if json_output else summary(allocation)
        )
        sys.stdout.flush()
    except Exception as exc:
        return unexpected(exc)
    if process:
        _answered()  # the ledger is saved (fsynced) and its lock released
    return 0


def run() -> None:
    """The console script and `python -m portalloc`: main() as the whole process."""
    import gc

    # No cycle collection for a read or a grant, a few milliseconds of the process
    # (bench/README.md): each allocates a bounded amount and ends the process at once
    # (_answered), and refcounting frees all but cycles. main() turns it back on
    # for the full CLI, whose commands may run for hours (serve, run, check --wait).
    gc.disable()
    raise SystemExit(main(process=True))


def main(argv: list[str] | None = None, *, process: bool = False) -> int:
    """The entry point; returns the exit code. PROCESS: this call is the whole process,
    and a read the ledger answered ends it at once (see _answered)."""
    args = sys.argv[1:] if argv is None else argv
    if sys.stdout is None or sys.stderr is None:
        # Started with stdout or stderr closed (`>&-`): write to nowhere, as intended.
        from portalloc.fs import null_stream

        sys.stdout = sys.stdout or null_stream(1)
        sys.stderr = sys.stderr or null_stream(2)
    # Shell completion drives the full CLI through the environment, whatever argv says.
    read = None if "_PORTALLOC_COMPLETE" in os.environ else parse(args)
    try:
        if read is not None and read.command == "allocate" and read.session is not None:
            return allocate(read.session, read.value == "json", process=process)
        if read is not None:
            try:
                text = serve(read)
            except Exception:
                text = None  # whatever it was, the full CLI reports it in its own words
            if text is not None:
                try:
                    sys.stdout.write(text)
                    sys.stdout.flush()
                except Exception as exc:  # a closed stdout, an encoding that cannot say it
                    from portalloc.adapters.common import unexpected

                    return unexpected(exc)
                if process:
                    _answered()
                return 0
        # Ctrl-C while the full CLI is imported (Typer, rich: the slow part of start-up)
        # is Ctrl-C too, not a traceback.
        import gc

        gc.enable()  # run() turned it off for the read path and the grant
        from portalloc.adapters.cli import main as full
    except KeyboardInterrupt:
        return 130  # as the full CLI: no traceback for Ctrl-C
    return full(args)


def _answered() -> None:
    """End the process, exit 0, without tearing the interpreter down: freeing every
    module and object at exit costs a read about a third of `python -c pass`
    (bench/README.md). Nothing a read or a grant leaves needs it: stdout is flushed,
    the lock released, a saved ledger fsynced; of the atexit handlers, logging's
    (filelock's logger has no handler) and weakref's (a ledger descriptor to close)
    have nothing the kernel does not do."""
    try:
        sys.stderr.flush()
    except Exception:  # a closed stderr: nothing to flush  # noqa: S110
        pass
    os._exit(0)

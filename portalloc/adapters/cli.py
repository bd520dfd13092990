"""The `portalloc` command: parse, call the commands (portalloc.commands) and the service,
render, map errors to exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from typer.core import TyperCommand

from portalloc.adapters.common import (
    DEFAULT_HTTP_PORT,
    allocate_body,
    cli_service,
    fail,
    json_text,
    lookup,
    say,
    summary,
    unexpected,
    warn,
    warn_ephemeral_overlap,
)
from portalloc.config import DEFAULT_TTL_MINUTES, MANIFEST_NAME, PortAllocatorConfig
from portalloc.errors import MissingExtra, PortallocError, UsageError, printable
from portalloc.hooks import TOOLS
from portalloc.render import FORMATS
from portalloc.rules import MAX_PID, MAX_TTL_MINUTES

if TYPE_CHECKING:
    from portalloc.host import Stack

app = typer.Typer(
    name="portalloc",
    help="Conflict-free blocks of TCP ports for parallel worktrees, agents and test runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help, as gh, uv and ruff print it: no boxes to cut at 60 columns, no
    # bold or italic escapes for NO_COLOR, a pager or a file.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _command(usage: str, examples: str) -> dict[str, Any]:
    """Keyword arguments for app.command(): the usage line as written, and examples.

    Typer writes required arguments as `{SESSION}`; the usage line here reads the
    way the README and the contract write it.
    """

    class Command(TyperCommand):
        def collect_usage_pieces(self, ctx: Any) -> list[str]:
            return [usage] if usage else []

        def format_options(self, ctx: Any, formatter: Any) -> None:
            # Typer lists an argument as its metavar and its type (`SESSION <str>`,
            # `PORT <int range>`, `COMMAND [ARGS]... <list[str]>`); the metavar and the
            # help say what to pass, so the rows name the metavar alone.
            arguments: list[tuple[str, str]] = []
            options: list[tuple[str, str]] = []
            for param in self.get_params(ctx):
                record = param.get_help_record(ctx)
                if record is None:
                    continue
                if param.param_type_name == "argument":
                    arguments.append((param.metavar or (param.name or "").upper(), record[1]))
                else:
                    options.append(record)
            for title, rows in (("Arguments", arguments), ("Options", options)):
                if rows:
                    with formatter.section(title):
                        formatter.write_dl(rows)

    # "\b" keeps click from re-wrapping the example lines into one paragraph.
    return {"cls": Command, "epilog": "\b\nExamples:\n" + examples.strip("\n")}


MAX_WAIT_SECONDS = 86_400  # `check --wait`: a day; `inf` would wait forever
MAX_COLUMNS = 500  # `status` lays out at most this wide, whatever COLUMNS says
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
TtlOpt = Annotated[
    int | None,
    typer.Option(
        "--ttl",
        help=f"Lease lifetime in minutes (default {DEFAULT_TTL_MINUTES}).",
        min=1,
        max=MAX_TTL_MINUTES,
        metavar="MINUTES",
    ),
]
PidOpt = Annotated[
    int | None,
    typer.Option(
        "--pid", help="End the lease when this process exits.", min=1, max=MAX_PID, metavar="PID"
    ),
]


def _complete_session(incomplete: str) -> list[str]:
    from portalloc.adapters.completion import sessions

    return sessions(incomplete)


def _complete_key(ctx: typer.Context, incomplete: str) -> list[str]:
    from portalloc.adapters.completion import keys

    return keys(ctx.params.get("session"), incomplete)


SessionArg = Annotated[
    str,
    typer.Argument(
        help="Session id: any non-empty string, e.g. a path.",
        metavar="SESSION",
        autocompletion=_complete_session,
    ),
]
OptionalSessionArg = Annotated[
    str | None,
    typer.Argument(
        help="Session id; default: the current git worktree's top directory.",
        metavar="[SESSION]",
        autocompletion=_complete_session,
    ),
]
if TYPE_CHECKING:
    Format = str
else:
    # render.FORMATS' names: Typer makes them the choices, their completion and the error
    # for any other; the help below lists them too. A format registered there is here.
    Format = Literal[tuple(FORMATS)]
FORMAT_HELP = "Output format: " + ", ".join(
    f"{entry.name} ({entry.note})" if entry.note else entry.name for entry in FORMATS.values()
)


_err = say
_warn = warn


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_json(data: Any) -> None:
    _out(json_text(data))


@contextmanager
def _errors(json_output: bool = False) -> Iterator[None]:
    """Turn expected failures into one line on stderr and the documented exit code."""
    try:
        yield
    except PortallocError as exc:
        raise typer.Exit(fail(exc, json_output)) from None


def _version(value: bool) -> None:
    if value:
        import portalloc  # its version comes from package metadata, read only when asked

        _out(f"portalloc {portalloc.__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Hand out conflict-free port blocks; leases live in one locked JSON ledger."""


@app.command(
    **_command(
        "[OPTIONS] SESSION",
        """
  portalloc allocate worktree-1
  portalloc allocate worktree-1 --json
  portalloc allocate ci-job --ttl 30 --pid $$
""",
    )
)
def allocate(
    session: SessionArg,
    ttl: TtlOpt = None,
    pid: PidOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Allocate a block for SESSION, or refresh its lease."""
    with _errors(json_output):
        allocation = cli_service(prints_env=True).allocate(session, ttl_minutes=ttl, pid=pid)
    if json_output:
        _print_json(allocate_body(allocation))
    else:
        _out(summary(allocation))


@app.command(
    **_command(
        "[OPTIONS] SESSION",
        """
  portalloc release worktree-1
  portalloc release "$PWD" --json
""",
    )
)
def release(session: SessionArg, json_output: JsonOpt = False) -> None:
    """Release SESSION's lease. Succeeds for an unknown session too."""
    with _errors(json_output):
        released = cli_service().release(session)
    if json_output:
        _print_json({"success": True, "released": released})
    elif released:
        _out(f"released {session}\n")
    else:
        _out(f"no lease for {session}\n")


@app.command(
    **_command(
        "[OPTIONS]",
        """
  portalloc status
  portalloc status --json | jq -r '.[] | "\\(.session_id) \\(.api_port)"'
""",
    )
)
def status(json_output: JsonOpt = False) -> None:
    """List active leases, what holds each, and the capacity in use."""
    with _errors(json_output):
        service = cli_service()
        allocations = service.status()
    if json_output:
        _print_json([allocation.to_dict() for allocation in allocations])
        return
    from rich.console import Console

    from portalloc.adapters.views import status_view

    console = Console(highlight=False)
    if console.width > MAX_COLUMNS:
        console = Console(highlight=False, width=MAX_COLUMNS)
    console.print(
        status_view(allocations, service.config.max_sessions, service.ledger.path, console.width)
    )
    from portalloc.adapters.views import orphans_text
    from portalloc.commands.status import orphans

    _out(orphans_text(orphans(service, _stacks() or [])))  # stacks whose worktree is gone


@app.command(
    **_command(
        "[OPTIONS] [SESSION]",
        """
  eval "$(portalloc env)"                             # this worktree's ports
  portalloc env worktree-1
  portalloc env worktree-1 --format fish | source
  portalloc env worktree-1 --format dotenv > .env.ports
  portalloc env worktree-1 -f powershell | Out-String | Invoke-Expression
  portalloc env --write .                             # also .worktree-ports.json
""",
    )
)
def env(
    session: OptionalSessionArg = None,
    fmt: Annotated[
        Format,
        typer.Option("--format", "-f", help=FORMAT_HELP, metavar=f"[{'|'.join(FORMATS)}]"),
    ] = "sh",
    ttl: TtlOpt = None,
    pid: PidOpt = None,
    worktree: Annotated[
        Path | None,
        typer.Option(
            "--worktree",
            help="Lease for this worktree; reclaimed once it is gone.",
            metavar="PATH",
        ),
    ] = None,
    write: Annotated[
        Path | None,
        typer.Option(
            "--write",
            help=f"Also write the allocation as JSON to FILE (a directory gets {MANIFEST_NAME}).",
            metavar="FILE",
        ),
    ] = None,
    env_file: Annotated[
        Path | None,
        typer.Option(
            "--env-file",
            help="Also keep the variables in a managed block of this dotenv file.",
            metavar="FILE",
        ),
    ] = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="--format json, and failures as a JSON body on stdout."),
    ] = False,
) -> None:
    """Print SESSION's environment block, allocating if needed."""
    from portalloc.commands.env import env as lease
    from portalloc.commands.env import target

    with _errors(json_output):
        if json_output:
            if fmt not in ("sh", "json"):
                raise UsageError(f"--json and --format {fmt} contradict each other")
            fmt = "json"
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
        session, tree = target(session, worktree)
        service = cli_service(prints_env=True)
        printed = lease(
            service, session, tree, fmt, ttl=ttl, pid=pid, write=write, env_file=env_file
        )
    _out(printed.text)


@app.command(
    **_command(
        "[OPTIONS] SESSION KEY",
        """
  portalloc get worktree-1 rest
  portalloc get "$(git rev-parse --show-toplevel)" API_PORT
  curl "http://localhost:$(portalloc get worktree-1 rest)/"
""",
    )
)
def get(
    session: SessionArg,
    key: Annotated[
        str,
        typer.Argument(
            help="A port name (rest), its field (rest_port), its variable (API_PORT) "
            "or compose_project_name.",
            metavar="KEY",
            autocompletion=_complete_key,
        ),
    ],
) -> None:
    """Print one value of SESSION's active lease (read-only)."""
    with _errors():
        allocation = cli_service().read(session)
        value = lookup(allocation, key)
    _out(value + "\n")


@app.command(
    # Options are parsed only up to SESSION: everything after it is COMMAND's own,
    # `--help` and `--keep` included, with or without `--` (as env, sudo, uv run).
    context_settings={"allow_interspersed_args": False},
    **_command(
        "[OPTIONS] SESSION [--] COMMAND [ARGS]...",
        """
  portalloc run tests pytest -x
  portalloc run --keep dev -- sh -c 'uvicorn app:app --port "$API_PORT"'
  portalloc run "$(git rev-parse --show-toplevel)" -- npm test
""",
    ),
)
def run(
    session: SessionArg,
    command: Annotated[
        list[str],
        typer.Argument(
            help="The command and its arguments: all after SESSION, options too.",
            metavar="COMMAND [ARGS]...",
        ),
    ],
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the lease after COMMAND ends.")
    ] = False,
    ttl: TtlOpt = None,
) -> None:
    """Run COMMAND with SESSION's ports in its environment.

    portalloc's options go before SESSION; everything after SESSION is COMMAND's.
    """
    from portalloc.adapters.runner import run_with_lease

    # The parser stops at SESSION, so a `--` after it reaches us: it only separates.
    if command[:1] == ["--"]:
        command = command[1:]
    with _errors():
        if not command:
            raise UsageError("missing COMMAND after '--' (see 'portalloc run --help')")
        service = cli_service(prints_env=True)
        code = run_with_lease(service, session, command, keep=keep, ttl_minutes=ttl, error=_err)
    raise typer.Exit(code)


@app.command(
    **_command(
        "[OPTIONS]",
        """
  portalloc prune
  portalloc prune --stop
  portalloc prune --json
""",
    )
)
def prune(
    stop: Annotated[
        bool,
        typer.Option(
            "--stop",
            help="Also stop orphaned compose stacks (docker compose -p NAME down).",
        ),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Reclaim expired and dead leases; name orphaned compose stacks.

    An orphan is a compose stack portalloc named for a session of this ledger, still
    running after its worktree was removed (not moved), publishing here. --stop
    stops each with `docker compose -p NAME down` and checks that it is gone.
    """
    from portalloc.adapters import views
    from portalloc.commands.prune import prune as pruning

    with _errors(json_output):
        pruned = pruning(cli_service(), stop=stop, stacks=_stacks)
    reclaimed, found, failed = pruned
    orphans = found or []
    if json_output:
        _print_json(
            {
                "success": not failed and not (stop and found is None),
                "reclaimed": [
                    {
                        "session_id": item.lease.session_id,
                        "reason": item.reason,
                        "block_start": item.lease.start,
                        "block_end": item.lease.end,
                    }
                    for item in reclaimed
                ],
                "orphans": views.orphans_json(orphans, stop, failed),
            }
        )
    else:
        if not reclaimed and not orphans:
            _out("nothing to reclaim\n")
        for item in reclaimed:
            _out(f"reclaimed {item.lease.session_id} ({item.reason}, block {item.lease.start})\n")
        _out(views.orphans_text(orphans, stop, failed))
    for project, why in failed.items():
        _err(f"could not stop {printable(project)}: {why}")
    if failed or (stop and found is None):  # asked to stop, and docker did not answer
        raise typer.Exit(1)


def _stacks() -> list[Stack] | None:
    """The running compose stacks (commands.status.stacks), or None, said on stderr,
    when docker did not answer in time: a hung daemon does not hang `status`."""
    from portalloc.commands.status import DOCKER_WAIT, stacks

    found = stacks()
    if found is None:
        _err(f"docker did not answer within {DOCKER_WAIT:g} s: compose stacks not looked at")
    return found


def _wait_seconds(value: str) -> float:
    """`check --wait`: a number of seconds from 0 to a day (not nan, inf or -1)."""
    import math

    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_WAIT_SECONDS:  # nan compares false
        raise typer.BadParameter(
            f"must be a number of seconds between 0 and {MAX_WAIT_SECONDS}, "
            f"not {printable(value)!r}"
        )
    return seconds


@app.command(
    **_command(
        "[OPTIONS] [SESSION]",
        """
  docker compose up -d && portalloc check --wait 60
  portalloc check --port db --port rest --wait 30
  portalloc check worktree-1 --json
""",
    )
)
def check(
    session: OptionalSessionArg = None,
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait",
            help="Wait up to SECONDS (0 to 86400, a day) until every port answers.",
            parser=_wait_seconds,
            metavar="SECONDS",
        ),
    ] = None,
    port_names: Annotated[
        list[str] | None,
        typer.Option("--port", help="Only this named port (repeatable).", metavar="NAME"),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Show which of the session's ports answer now, or wait for them.

    A port answers when a TCP connection to it on 127.0.0.1 (or ::1) is accepted and
    stays open for a moment, or the server speaks first. One accepted and then closed
    or reset is not an answer: docker-proxy does that while nothing listens inside the
    container yet.
    """
    from portalloc.adapters import views
    from portalloc.commands.check import check as probe
    from portalloc.commands.check import chosen
    from portalloc.commands.env import here

    with _errors(json_output):
        allocation = cli_service().read(session if session is not None else str(here()))
        allocation = chosen(allocation, port_names)
    state = probe(allocation, wait)
    closed = [f"{name} ({allocation.ports[name]})" for name, up in state.items() if not up]
    if json_output:
        _print_json(views.check_json(allocation, state))
    else:
        _out(views.check_text(allocation, state))
    if wait is not None and closed:
        _err(f"still closed after {wait:g}s: {', '.join(closed)}")
        raise typer.Exit(1)


@app.command(
    **_command(
        "[OPTIONS] PORT",
        """
  portalloc why 10001
  portalloc why 10001 --json
""",
    )
)
def why(
    port: Annotated[
        int, typer.Argument(help="A TCP port number.", min=1, max=65535, metavar="PORT")
    ],
    json_output: JsonOpt = False,
) -> None:
    """Tell which lease holds PORT and which process listens on it."""
    from portalloc.adapters import views
    from portalloc.commands.why import why as holding

    with _errors(json_output):
        found = holding(cli_service(), port, stacks=_stacks)
    stacks = [views.Published(stack, orphan) for stack, orphan in found.stacks or []]
    shown = views.Why(port, found.holder, found.processes, found.listening, stacks)
    if json_output:
        _print_json(shown.to_json())
    else:
        _out(shown.text())


@app.command(
    **_command(
        "[OPTIONS] [COMPOSE_FILE]...",
        """
  portalloc init                          # show the diffs and the profile; change nothing
  portalloc init --write                  # apply them
  portalloc init > adopt.patch            # stdout is a patch: git apply adopt.patch
  portalloc init docker-compose.yml docker-compose.override.yml --write
""",
    )
)
def init(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Compose files (default: compose*.y*ml and docker-compose*.y*ml at the "
            "repository top).",
            metavar="[COMPOSE_FILE]...",
            show_default=False,
        ),
    ] = None,
    write: Annotated[
        bool, typer.Option("--write", help="Replace the files (atomically); default: dry run.")
    ] = False,
) -> None:
    """Make the compose stack worktree-safe: every fixed host port and container_name
    becomes a variable with the old value as default, and a profile sets them."""
    from portalloc.commands.init import init as adopting
    from portalloc.commands.status import leases_of_worktrees

    with _errors():
        top, plan, notes = adopting(files, write=write, warn=_warn)
        if not write:
            _out(plan.diff())
    for note in notes:
        _err(f"note: {note}")
    changed = ", ".join(shown for _path, shown, _old, _new in plan.changes)
    if write and plan.profile_changed:
        # A lease follows its profile at its next env: say which ones will.
        try:
            followers = leases_of_worktrees(cli_service(), top)
        except PortallocError:
            followers = []  # only a note: no ledger to read is no lease to name
        for session in followers:
            _err(
                f"note: the lease of {session} was made with the old profile; the next "
                "`portalloc env` there follows the new one"
            )
    if not plan.changes:
        _err("nothing to change: no fixed host port or container_name left")
    elif write:
        _out(f"wrote {changed}\n")
        variables = " ".join(variable for variable, _template in plan.env)
        _out(f'variables: {variables}\nnext: eval "$(portalloc env)" in each worktree\n')
    else:
        _err(f"dry run: would change {changed}; run `portalloc init --write` to apply")


ProjectPathArg = Annotated[
    Path | None,
    typer.Argument(
        help="The project file, or a directory to look in (default: the current one).",
        metavar="[PATH]",
        show_default=False,
    ),
]


@app.command(
    **_command(
        "[OPTIONS] [PATH]",
        """
  portalloc trust --show                  # what this repository's project file would set
  portalloc trust                         # apply its [env] in full, in every worktree
  portalloc trust ../shop/portalloc.toml
""",
    )
)
def trust(
    path: ProjectPathArg = None,
    show: Annotated[
        bool, typer.Option("--show", help="Only print what the file would set.")
    ] = False,
) -> None:
    """Trust a project file's [env] table: until then only port variables apply."""
    from portalloc.commands import trust as trusting

    with _errors():
        reviewed = trusting.review(path)
        # Escaped, never raw: a value's bidi override or ESC must not disguise what
        # is being trusted.
        shown = printable(reviewed.path)
        _out(f"{shown} (sha256 {reviewed.digest[:16]}) sets:\n")
        _out("".join(f"  {printable(line)}\n" for line in reviewed.lines))
        if show:
            if trusting.trusted(reviewed):
                _out("trusted: it applies in full\n")
            else:
                _out(f"not trusted: only port variables apply; trust it: portalloc trust {shown}\n")
            return
        record = trusting.trust(reviewed)
    _out(f"trusted: this content applies in full wherever it is found (record {record})\n")


@app.command(
    **_command(
        "[OPTIONS] [PATH]",
        """
  portalloc untrust
  portalloc untrust ../shop/portalloc.toml
""",
    )
)
def untrust(
    path: ProjectPathArg = None,
) -> None:
    """Forget that a project file was trusted: only port variables apply again."""
    from portalloc.commands.trust import untrust as forgetting

    with _errors():
        found, removed = forgetting(path)
    _out(f"untrusted {found}\n" if removed else f"{found} was not trusted\n")


hook_app = typer.Typer(
    help=f"Wire portalloc into the tools that create worktrees: {', '.join(TOOLS)}.",
    short_help="Wire portalloc into git, direnv and the tools that make worktrees.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(hook_app, name="hook")


def _complete_tool(incomplete: str) -> list[str]:
    return [tool for tool in TOOLS if tool.startswith(incomplete)]


InstallToolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--for",
        help=f"Wire this tool: {', '.join(TOOLS)} (repeatable; default git).",
        metavar="TOOL",
        autocompletion=_complete_tool,
    ),
]
UninstallToolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--for",
        help=f"Unwire this tool: {', '.join(TOOLS)} (repeatable; default git).",
        metavar="TOOL",
        autocompletion=_complete_tool,
    ),
]
RepoOpt = Annotated[
    Path | None,
    typer.Option("--repo", help="The repository (default: the current one).", metavar="PATH"),
]


@hook_app.command(
    "install",
    short_help="Give every new worktree its ports, with no command typed.",
    help="Install portalloc's hook: a new worktree gets its ports with no command typed.\n\n"
    + "Each tool's file (from the worktree top) and when it runs: "
    + "; ".join(f"{tool.name}: {tool.file}, {tool.runs}" for tool in TOOLS.values())
    + ".",
    **_command(
        "[OPTIONS]",
        """
  portalloc hook install                 # git: every `git worktree add` gets its ports
  portalloc hook install --for git --for direnv
  portalloc hook install --repo ~/src/shop
""",
    ),
)
def hook_install(tools: InstallToolOpt = None, repo: RepoOpt = None) -> None:
    from portalloc.commands import hook

    with _errors():
        for tool, path in hook.install(tools, repo):
            _out(f"{tool.name}: {path} {tool.installed}\n")


@hook_app.command(
    "uninstall",
    **_command(
        "[OPTIONS]",
        """
  portalloc hook uninstall
""",
    ),
)
def hook_uninstall(tools: UninstallToolOpt = None, repo: RepoOpt = None) -> None:
    """Remove portalloc's part of the hooks, and nothing else."""
    from portalloc.commands import hook

    with _errors():
        for tool, path in hook.uninstall(tools, repo):
            _out(f"{tool.name}: {'removed from ' + str(path) if path else 'nothing to remove'}\n")


proxy_app = typer.Typer(
    help="Named URLs: Caddy answers http://<port>.<slug>.localhost:<proxy port> for every "
    "lease, its routes following the ledger.",
    short_help="Named URLs for every lease, through Caddy: start, stop, status.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(proxy_app, name="proxy")


@proxy_app.command(
    "start",
    **_command(
        "[OPTIONS]",
        """
  portalloc proxy start
  PORTALLOC_PROXY_PORT=8800 portalloc proxy start
""",
    ),
)
def proxy_start(json_output: JsonOpt = False) -> None:
    """Start Caddy with every lease's routes; a no-op when it runs."""
    from portalloc.adapters.views import proxy_text
    from portalloc.commands import proxy

    with _errors(json_output):
        service = cli_service()
        found, started, crashed = proxy.start(service)
    port = service.config.proxy_port
    if found.process is not None and found.process.port != port:
        warn(f"the proxy runs on port {found.process.port}, not {port}: stop it and start again")
    if json_output:
        _print_json({"success": True, "started": started, **found.to_json()})
        return
    if crashed and started:
        say("the proxy had stopped without `portalloc proxy stop`: started it again")
    _out(proxy_text(found, "started" if started else "already running"))


@proxy_app.command(
    "stop",
    **_command(
        "[OPTIONS]",
        """
  portalloc proxy stop
""",
    ),
)
def proxy_stop(json_output: JsonOpt = False) -> None:
    """Stop the proxy's Caddy, by its PID file (never by name)."""
    from portalloc.commands import proxy

    with _errors(json_output):
        stopped = proxy.stop(PortAllocatorConfig.from_env())
    if json_output:
        _print_json({"success": True, "stopped": stopped is not None})
    elif stopped is not None:
        _out(f"proxy stopped (caddy pid {stopped.pid}, port {stopped.port})\n")
    else:
        _out("proxy was not running\n")


@proxy_app.command(
    "status",
    **_command(
        "[OPTIONS]",
        """
  portalloc proxy status
  portalloc proxy status --json | jq -r '.routes[].host'
""",
    ),
)
def proxy_status(json_output: JsonOpt = False) -> None:
    """Say whether the proxy runs, where, and which names it answers."""
    from portalloc.adapters.views import proxy_text
    from portalloc.commands import proxy

    with _errors(json_output):
        found = proxy.status(PortAllocatorConfig.from_env())
    if json_output:
        _print_json(found.to_json())
    else:
        _out(proxy_text(found, "running" if found.running else "not running"))


def _import_adapter(module: str, extra: str, packages: tuple[str, ...]) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in packages:
            raise MissingExtra(extra, missing) from None
        raise


@app.command(
    **_command(
        "[OPTIONS]",
        """
  claude mcp add portalloc -- portalloc mcp
""",
    )
)
def mcp() -> None:
    """Serve the MCP tools (allocate_ports and friends) on stdio."""
    with _errors():
        adapter = _import_adapter("portalloc.adapters.mcp", "mcp", ("mcp",))
        warn_ephemeral_overlap(PortAllocatorConfig.from_env())
        adapter.run_stdio()


@app.command(
    **_command(
        "[OPTIONS]",
        """
  PORTALLOC_API_KEY=secret portalloc serve
  portalloc serve --host 0.0.0.0 --port 7878
""",
    )
)
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind.", metavar="HOST")] = (
        "127.0.0.1"
    ),
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on.", min=1, max=65535, metavar="PORT")
    ] = DEFAULT_HTTP_PORT,
) -> None:
    """Serve the HTTP API; needs PORTALLOC_API_KEY."""
    with _errors():
        adapter = _import_adapter(
            "portalloc.adapters.http", "http", ("fastapi", "uvicorn", "starlette", "pydantic")
        )
        warn_ephemeral_overlap(PortAllocatorConfig.from_env())
        adapter.serve(host=host, port=port)


def _app_for(args: list[str]) -> typer.Typer:
    """APP, or a copy holding only the command ARGS names: Typer inspects every
    command's signature before it parses, which costs `portalloc env` more start-up
    time than all of portalloc's own imports. The copy keeps the root callback, so
    it parses, helps and fails exactly like APP for that command."""
    if not args:
        return app
    for info in app.registered_commands:
        callback = info.callback
        name = info.name or (callback.__name__.replace("_", "-") if callback else None)
        if name == args[0]:
            only = typer.Typer()
            only.__dict__.update(app.__dict__)
            only.registered_commands = [info]
            return only
    return app


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    # Typer >= 0.29 vendors click; its exceptions are not re-exported publicly.
    args = sys.argv[1:] if argv is None else argv
    if not args and "_PORTALLOC_COMPLETE" not in os.environ:
        # `portalloc` alone: the help on stdout and the usage-error code, no error line.
        main(["--help"])
        return 2
    try:
        code = _app_for(args)(args=args, prog_name="portalloc", standalone_mode=False)
    except typer.TyperException as exc:
        # Typer's public base of its usage errors. One line instead of click's usage
        # block: bad input is reported like any other expected failure.
        return _usage_error(exc, args)
    except typer.Abort:
        _err("aborted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        return unexpected(exc)
    return code if isinstance(code, int) else 0


def _usage_error(exc: typer.TyperException, args: list[str]) -> int:
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        # `portalloc hook` alone: its help on stdout and the usage-error code, as for
        # `portalloc` alone. (Typer does not export the class; its own help checks the
        # name the same way.)
        _out(ctx.get_help() + "\n")
        return 2
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    where = getattr(ctx, "command_path", None) or _command_path(args)
    if message:
        _err(f"{message} (see '{where} --help')")
    code = getattr(exc, "exit_code", 2)
    return code if isinstance(code, int) else 2


def _command_path(args: list[str]) -> str:
    """`portalloc hook install` for ARGS naming that command: where an error without a
    context (a missing option value) sends the user for help."""
    command: Any = typer.main.get_command(_app_for(args))
    path = ["portalloc"]
    for arg in args:
        commands = getattr(command, "commands", None)
        if not isinstance(commands, dict) or arg not in commands:
            break
        command = commands[arg]
        path.append(arg)
    return " ".join(path)

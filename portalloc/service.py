"""Operations: each one is one transaction, lock -> load -> reclaim -> decide -> save;
a read of a lease that needs none goes through portalloc.reading, without the lock.
open_service() is how every entry point builds its service."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from portalloc import allocator, outputs, probe, reading
from portalloc.allocator import Follow, Grant, PortCheck, Reclaimed, Request
from portalloc.config import PortAllocatorConfig
from portalloc.errors import LeaseNotFound, UsageError
from portalloc.host import DOCKER_BUDGET, DockerCLI, Host, Listener, forwarder, in_worktree
from portalloc.ledger.store import Ledger
from portalloc.models import Lease, LedgerState, Owner, PortAllocation
from portalloc.rules import MAX_PID, validate_session_id

T = TypeVar("T")


def _log_warning(message: str) -> None:
    import logging

    logging.getLogger("portalloc").warning("%s", message)


class Outcome(NamedTuple):
    """What one transaction decided, and the state and time it decided on."""

    value: Any
    state: LedgerState
    now: datetime
    reclaimed: list[Reclaimed]


class Held(NamedTuple):
    """A lease a process runs in (`run`, the pytest plugin), and whether it made it."""

    allocation: PortAllocation
    created: bool


class PortAllocatorService:
    """Allocate, release and list leases in the shared ledger."""

    def __init__(
        self,
        config: PortAllocatorConfig | None = None,
        *,
        host: Host | None = None,
        clock: Callable[[], datetime] | None = None,
        port_is_free: Callable[[int], bool] | None = None,
        owner_alive: Callable[[Owner], bool] | None = None,
        on_warning: Callable[[str], None] = _log_warning,
        command_line: bool = False,
    ) -> None:
        """COMMAND_LINE: this service is a command-line process's, one command on its
        main thread, which may wait for the ledger's lock in the kernel (Ledger)."""
        self.config = config if config is not None else PortAllocatorConfig.from_env()
        from portalloc.trust import private_dir

        # A state dir others may write (group- or world-writable, or not ours): what a
        # lease in it says is screened before it reaches a shell (allocator.screened_env).
        self._shared_ledger = not private_dir(self.config.state_dir)
        # clock/port_is_free/owner_alive replace one fact of HOST each (tests, embedders).
        overrides: dict[str, Any] = {
            name: value
            for name, value in (
                ("now", clock),
                ("port_is_free", port_is_free),
                ("owner_alive", owner_alive),
            )
            if value is not None
        }
        self.host = replace(host or Host(), **overrides)
        self.on_warning = on_warning
        self.ledger = Ledger(
            self.config.state_dir,
            self.config.lock_timeout,
            on_warning,
            self.clock,
            self.host.lock_holder,
            alarm_wait=command_line,
        )

    def clock(self) -> datetime:
        return self.host.now()

    def _transact(
        self,
        decide: Callable[[LedgerState, datetime], tuple[LedgerState, T]],
        *,
        routes: bool = False,
        new: str | None = None,
    ) -> Outcome:
        """Every operation's one transaction: under the ledger's lock, load, reclaim what
        is dead, let DECIDE return the new state and a value, and save only if the state
        changed. (A read that needs no write, `read`, goes through portalloc.reading
        without the lock, as the read path and shell completion do.)

        A saved change hands the running proxy the names of the leases it changed (ROUTES:
        of every lease), still under the lock, so they reach it in the order the ledger
        changed. NEW: a session DECIDE grants a lease to, the file's leases written to the
        new file while it decides (Ledger.write_ahead) when the session has none and
        there is room for it."""
        self._ready()
        with self.ledger.locked():
            now = self.host.now()
            loaded = self.ledger.load()
            if (
                new is not None
                and new not in loaded.leases
                and len(loaded.leases) < self.config.max_sessions  # else refused, or reclaims
            ):
                self.ledger.write_ahead(loaded)
            try:
                state, reclaimed = allocator.reclaim(
                    loaded, now, self.host.owner_alive, self.host.path_exists
                )
                try:
                    state, value = decide(state, now)
                except BaseException:
                    if self.ledger.dirty:
                        # Unusable leases were left out and copied aside: write the file
                        # back without them even when this operation fails, or every
                        # later call would copy it aside again.
                        self._save(loaded, state, save=True, routes=False)
                    raise
                save = state is not loaded or self.ledger.dirty
                if save or routes:
                    self._save(loaded, state, save=save, routes=routes)
            finally:
                self.ledger.drop_ahead()
        return Outcome(value, state, now, reclaimed)

    def _ready(self) -> None:
        """Before the lock: import and build what a transaction needs under it. With many
        commands starting at once, the holder shares the CPU with all of them, and every
        millisecond of its work under the lock costs the waiters a round of the scheduler
        (bench/README.md)."""
        from portalloc import proxy  # noqa: F401  # _save's
        from portalloc.rules import dns_label

        dns_label("-")  # a new lease's slug: unicodedata and the pattern
        self.ledger.ready_to_write()

    def _save(self, loaded: LedgerState, state: LedgerState, *, save: bool, routes: bool) -> None:
        """SAVE the state DECIDE made of LOADED, and have the proxy's routes follow (ROUTES,
        or leases left out on load: all of them). They are marked stale before the file
        changes, so a write that dies in between leaves them to be rebuilt whole."""
        from portalloc import proxy

        whole = routes or self.ledger.dirty
        update = proxy.begin(self.config.state_dir, loaded.leases, self.on_warning, whole=whole)
        if save:
            self.ledger.save(state)
        if update is not None:
            update.done(state.leases)

    def _read(self) -> Outcome:
        return self._transact(lambda state, _now: (state, None))

    def _owner(self, pid: int | None) -> Owner | None:
        if pid is None:
            return None
        if isinstance(pid, bool) or not isinstance(pid, int) or not 1 <= pid <= MAX_PID:
            raise UsageError(f"--pid {pid} is invalid: must be an integer from 1 to {MAX_PID}")
        owner = self.host.owner_of(pid)
        if not self.host.owner_alive(owner):
            # The lease would be reclaimed by the very next operation: say so now.
            raise UsageError(f"no running process with PID {pid} to own the lease")
        return owner

    def allocate(
        self,
        session_id: str,
        *,
        ttl_minutes: int | None = None,
        pid: int | None = None,
        worktree: str | Path | None = None,
        manifest: str | Path | None = None,
        env_file: str | Path | None = None,
    ) -> PortAllocation:
        """Return the session's lease with its TTL refreshed, or grant a new block.

        MANIFEST and ENV_FILE are recorded for the session: when its ports move they
        are rewritten with the new ones.
        """
        validate_session_id(session_id)
        files = tuple(
            (kind, str(Path(path).absolute()))
            for kind, path in ((outputs.MANIFEST, manifest), (outputs.ENV_FILE, env_file))
            if path is not None
        )
        request = Request(
            session_id=session_id,
            config=self.config.with_ttl(ttl_minutes),
            owner=self._owner(pid),
            worktree=None if worktree is None else os.fspath(worktree),
            files=files,
        )
        return self._grant(request).allocation

    def hold(
        self,
        session_id: str,
        *,
        pid: int,
        keep: bool = False,
        ttl_minutes: int | None = None,
        worktree: str | Path | None = None,
    ) -> Held:
        """Use the session's lease while process PID runs, making one if there is none.

        An existing lease is used as it is (PID joins it and keeps it alive while it
        runs); a new one is tied to PID unless KEEP. End with `leave`.
        """
        validate_session_id(session_id)
        user = self._owner(pid)
        request = Request(
            session_id=session_id,
            config=self.config.with_ttl(ttl_minutes),
            worktree=None if worktree is None else os.fspath(worktree),
            user=user,
            keep=keep,
        )
        return self._grant(request)

    def leave(self, session_id: str, pid: int) -> bool:
        """Process PID stops using the lease; True if that released it (it made it)."""
        validate_session_id(session_id)
        user = self.host.owner_of(pid)
        outcome = self._transact(
            lambda state, _now: allocator.leave(state, session_id, user, self.host.owner_alive)
        )
        released: bool = outcome.value
        return released

    def _grant(self, request: Request) -> Held:
        unanswered: list[int] = []  # home ports kept while docker did not answer
        check = None if request.config.skip_port_check else self._port_check(request, unanswered)
        # Import and probe-set-up now, not under the lock: with 200 processes starting at
        # once the holder gets a sliver of the CPU, and every millisecond inside the
        # lock is multiplied by the number of runnable processes.
        import hashlib  # noqa: F401  (compose_project_name, for a new lease)

        if check is not None:
            probe.prepare()
        before: list[Lease | None] = []  # the session's lease when the grant began

        def decide(state: LedgerState, now: datetime) -> tuple[LedgerState, Grant]:
            before[:] = [state.leases.get(request.session_id)]
            return _with_value(allocator.grant(state, request, now, check))

        outcome = self._transact(decide, new=request.session_id)
        result: Grant = outcome.value
        allocation = self._allocation(result.lease, outcome.now, outcome.state)
        home = result.moved.home if result.moved else None
        for skip in result.skipped:
            if skip.block_start != home:
                self.on_warning(f"skipped block {skip.block_start}: {skip.reason}")
        moved = result.moved
        if moved is not None:
            end = moved.home + request.config.range - 1 if moved.end is None else moved.end
            reason = moved.reason
            old = before[0] if before else None
            if result.follow is not None and old is not None:
                reason = _moved_reason(old, result.follow, result.lease)
            self.on_warning(
                f"session {request.session_id!r} MOVED from block {moved.home}-{end} "
                f"to {allocation.block_start}-{allocation.block_end}: {reason}"
            )
        follow = result.follow
        rewritten: list[str] = []
        if result.created or (follow is not None and not follow.stays):
            # A new lease may sit elsewhere than the last one, a lease that follows its
            # profile holds other values: every file written for the session follows it
            # (home again after a move, too).
            for kind, path in outcome.state.files.get(request.session_id, ()):
                if outputs.refresh(kind, path, allocation):
                    rewritten.append(path)
                    if moved is not None:
                        self.on_warning(f"rewrote {path} with the new ports")
        if follow is not None and moved is None:
            self.on_warning(_follow_line(request.session_id, follow, allocation, rewritten))
        if unanswered and moved is None:
            kept = sorted(set(unanswered))
            ports = f"port {kept[0]} is" if len(kept) == 1 else f"ports {_joined(kept)} are"
            self.on_warning(
                f"docker did not answer within {DOCKER_BUDGET:g} s, so the block stays: "
                f"{ports} held by docker's port forwarder, taken for the session's own "
                f"compose stack (`portalloc why {kept[0]}` tells once docker answers)"
            )
        return Held(allocation, result.created)

    def _port_check(self, request: Request, unanswered: list[int]) -> PortCheck:
        host = self.host
        anchor = request.owner or request.user
        profile = request.config.profile
        project = allocator.compose_project_name(request.session_id, profile.compose_prefix, set())

        published: dict[int, bool | None] = {}
        # One budget for every docker question of this grant: it runs under the lock,
        # and a daemon that did not answer once is not asked again.
        docker = DockerCLI()

        def own(listener: Listener, port: int) -> bool:
            pid, cwd, worktree = listener.pid, listener.cwd, request.worktree
            if pid is not None and worktree and cwd and in_worktree(cwd, worktree):
                return True
            # PID 1 (or a container's init) is everyone's ancestor: not an owner whose
            # descendants can be told from anyone else's.
            ancestor = anchor if anchor is not None and anchor.pid > 1 else None
            if pid is not None and ancestor is not None and host.is_descendant(pid, ancestor):
                return True
            # The session's own compose stack: docker's answer that a container of the
            # session's project publishes PORT, whoever holds the socket (docker-proxy,
            # dockerd itself with --userland-proxy=false, a rootless port driver). Asked
            # once per port.
            if port not in published:
                published[port] = host.compose_publishes(project, port, docker)
            answer = published[port]
            if answer is not None:
                return answer
            # Docker did not answer: a port held by docker's own forwarder (or by a
            # process the OS does not name, as root's docker-proxy is to a user) may be
            # the session's stack. The block stays, and a warning says why; a move
            # on a slow daemon's account would outlast it.
            if pid is None or forwarder(listener.command):
                unanswered.append(port)
                return True
            return False

        def check(port: int, allow_own: bool) -> str | None:
            if host.port_is_free(port):
                return None
            found = host.listeners(port)
            if allow_own and found and all(own(listener, port) for listener in found):
                return None  # the session's own servers: its home block is still its own
            return ", ".join(listener.describe() for listener in found)

        return check

    def _allocation(self, lease: Lease, now: datetime, state: LedgerState | None) -> PortAllocation:
        if self._shared_ledger:
            # Another member of the group may have written this lease's variables.
            lease = lease._replace(env=allocator.screened_env(lease, self.config))
        from portalloc.render import render_sh

        return PortAllocation.from_lease(
            lease,
            now,
            None if state is None else state.home(lease.session_id),
            self.config.proxy_port,
            render_sh(dict(lease.env)),
        )

    def release(self, session_id: str) -> bool:
        """Remove the session's lease; False if it had none."""
        validate_session_id(session_id)
        released: bool = self._transact(
            lambda state, _now: allocator.release(state, session_id)
        ).value
        return released

    def status(self) -> list[PortAllocation]:
        """Active leases, lowest block first."""
        outcome = self._read()
        leases = sorted(outcome.state.leases.values(), key=lambda lease: lease.start)
        return [self._allocation(lease, outcome.now, outcome.state) for lease in leases]

    def remembered(self) -> frozenset[str]:
        """Every session the ledger knows: those with a lease and those that held a
        block (their home blocks), the only ones whose compose stacks can be orphans."""
        state = self._read().state
        return frozenset(state.homes).union(state.leases.keys())

    def get(self, session_id: str) -> PortAllocation:
        """The session's active lease, unchanged; raise LeaseNotFound without one."""
        validate_session_id(session_id)
        outcome = self._read()
        lease = outcome.state.leases.get(session_id)
        if lease is None:
            raise LeaseNotFound(session_id)
        return self._allocation(lease, outcome.now, outcome.state)

    def read(self, session_id: str) -> PortAllocation:
        """The session's active lease, unchanged, as `get` and `check` print it: read
        without the lock when the file answers it as it stands (portalloc.reading, the
        read the fast entry shares), else `get`. Read alone, a lease does not say its
        home block: `home_block` is then None."""
        now = self.host.now()
        found = reading.lease(
            self.config,
            session_id,
            now,
            alive=self.host.owner_alive,
            exists=self.host.path_exists,
        )
        if found is None:
            return self.get(session_id)
        return self._allocation(found, now, None)

    def prune(self) -> list[Reclaimed]:
        """Reclaim expired and dead leases; return what was reclaimed."""
        return self._read().reclaimed

    def sync_proxy(self) -> list[PortAllocation]:
        """Hand the running proxy the routes of the active leases (after `proxy start`);
        return them, lowest block first."""
        outcome = self._transact(lambda state, _now: (state, None), routes=True)
        leases = sorted(outcome.state.leases.values(), key=lambda lease: lease.start)
        return [self._allocation(lease, outcome.now, outcome.state) for lease in leases]


def _follow_line(
    session_id: str, follow: Follow, allocation: PortAllocation, rewritten: list[str]
) -> str:
    """The one line saying a lease followed its changed profile, or why it did not."""
    if follow.stays:
        changed = f"its profile changed ({follow.changes}), but " if follow.changes else ""
        return (
            f"session {session_id!r}: {changed}{follow.misfit}; the lease stays in block "
            f"{allocation.block_start}-{allocation.block_end} as it was: {follow.stays}"
        )
    files = f"; rewrote {', '.join(rewritten)}" if rewritten else ""
    return f"session {session_id!r}: lease follows its profile ({follow.changes}{files})"


def _moved_reason(old: Lease, follow: Follow, lease: Lease) -> str:
    """Why OLD, following its changed profile, moved to LEASE: what changed, its ports
    named where they are now (not where they would have been in the block it left),
    and why the new profile did not fit there (that names the old block's ports)."""
    # The variables as re-derived in the old block: what moved is said by the ports.
    changed = allocator.describe_changes(old, lease, env_of=follow.lease)
    if not changed:
        return follow.misfit
    return f"its profile changed ({changed}) and {follow.misfit}"


def _joined(ports: list[int]) -> str:
    return ", ".join(map(str, ports))


def _with_value(result: Grant) -> tuple[LedgerState, Grant]:
    return result.state, result


def open_service(
    config: PortAllocatorConfig | None = None,
    *,
    on_warning: Callable[[str], None] = _log_warning,
    command_line: bool = False,
) -> PortAllocatorService:
    """The service of an entry point (the CLI, MCP, HTTP, the pytest plugin,
    get_port_allocator): CONFIG, else the settings the environment and the project file
    give now; warnings to ON_WARNING (a terminal's stderr, else the `portalloc`
    logger). It keeps settings only, every lease lives in the ledger: one may serve a
    process's life or a single call alike. (A test or an embedder that fakes the host
    builds PortAllocatorService itself.) COMMAND_LINE: the CLI's, see
    PortAllocatorService."""
    return PortAllocatorService(config, on_warning=on_warning, command_line=command_line)


@cache
def get_port_allocator() -> PortAllocatorService:
    """The process-wide service, configured from the environment on first use."""
    return open_service()

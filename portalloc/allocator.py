"""Pure decisions over the ledger state: what to reclaim, which block to grant."""

from __future__ import annotations

from collections.abc import Callable, Container
from datetime import datetime, timedelta
from itertools import chain, filterfalse

from portalloc.config import PortAllocatorConfig
from portalloc.errors import NoPortsAvailable
from portalloc.models import (
    FileRecord,
    Lease,
    LedgerState,
    Owner,
    Profile,
    hosts,
    render_template,
    url,
)
from portalloc.records import NamedTuple  # typing's costs the read path start-up time
from portalloc.rules import slug_for

TYPE_CHECKING = False
if TYPE_CHECKING:
    from portalloc.models import ReclaimReason

# Home blocks remembered for sessions; the least recently granted forgotten first.
HISTORY_LIMIT = 10_000
# Files portalloc wrote for one session (manifests, env files), newest kept.
FILES_LIMIT = 8


class Reclaimed(NamedTuple):
    lease: Lease
    reason: ReclaimReason


class Skip(NamedTuple):
    """A candidate block passed over because one of its ports was busy."""

    block_start: int
    port: int
    port_name: str
    holder: str = ""  # who listens there, where the OS tells

    @property
    def reason(self) -> str:
        holder = f" by {self.holder}" if self.holder else ""
        return f"port {self.port} ({self.port_name}) is in use{holder}"


class Move(NamedTuple):
    """A session granted a block other than its home, and why."""

    home: int
    reason: str
    end: int | None = None  # the old block's last port, when not home + range - 1


class Follow(NamedTuple):
    """A lease re-derived from the request's profile, in its own block: what changed, and
    why the new profile no longer fits that block, if it does not (then it moves)."""

    changes: str
    lease: Lease
    misfit: str = ""
    stays: str = ""  # why a misfit lease stays where it is, as it was


class Grant(NamedTuple):
    state: LedgerState
    lease: Lease
    created: bool
    skipped: tuple[Skip, ...] = ()
    moved: Move | None = None
    # The profile changed since the lease was made: it follows it (in place, or moved).
    follow: Follow | None = None


class Request(NamedTuple):
    session_id: str
    config: PortAllocatorConfig
    owner: Owner | None = None
    worktree: str | None = None
    # A process that uses the lease while it runs without taking it over (`run`).
    user: Owner | None = None
    # With `user`: a new lease outlives the user (`run --keep`) instead of ending with it.
    keep: bool = False
    files: tuple[FileRecord, ...] = ()


# port, "may the session's own processes hold it" -> None if grantable, else the holder
# ("" when the OS does not say who).
PortCheck = Callable[[int, bool], "str | None"]


def reclaim(
    state: LedgerState,
    now: datetime,
    owner_alive: Callable[[Owner], bool],
    path_exists: Callable[[str], bool],
) -> tuple[LedgerState, list[Reclaimed]]:
    """Drop leases whose anchor is gone: a dead owner, a vanished worktree, or, for
    leases with neither, an expired TTL. A live `run` using a lease keeps it."""
    changes: dict[str, Lease | None] = {}
    gone: list[Reclaimed] = []
    # Only the leases that can be reclaimed at all: a ledger of ten thousand TTL leases
    # that have not run out needs no look at each one.
    for original in state.leases.due(now):
        lease, reason = original.fate(now, owner_alive, path_exists)
        if reason is None:
            if lease is not original:
                changes[lease.session_id] = lease
        else:
            gone.append(Reclaimed(lease, reason))
            changes[lease.session_id] = None
    if not changes:
        return state, []
    return _ended(state, changes, [reclaimed.lease for reclaimed in gone]), gone


def release(state: LedgerState, session_id: str) -> tuple[LedgerState, bool]:
    if session_id not in state.leases:
        return state, False
    return _ended(state, {session_id: None}, [state.leases[session_id]]), True


def _ended(state: LedgerState, changes: dict[str, Lease | None], ended: list[Lease]) -> LedgerState:
    """STATE with CHANGES made, remembering the slug of each lease ENDED for its session."""
    named = {lease.session_id: lease.slug for lease in ended if lease.slug is not None}
    slugs = {**state.slugs, **named} if named else state.slugs
    return LedgerState(state.leases.updated(changes), state.homes_table, state.files, slugs)


def leave(
    state: LedgerState, session_id: str, user: Owner, owner_alive: Callable[[Owner], bool]
) -> tuple[LedgerState, bool]:
    """USER stops using the session's lease: a guest steps out; the owner releases it
    unless other users still run in it. True if the lease was released."""
    lease = state.leases.get(session_id)
    if lease is None:
        return state, False
    if user in lease.guests:
        guests = tuple(guest for guest in lease.guests if guest != user)
        lease = lease._replace(guests=guests)
        state = state.with_leases(state.leases.updated({session_id: lease}))
    if lease.owner == user and not any(owner_alive(guest) for guest in lease.guests):
        return release(state, session_id)
    return state, False


def compose_project_name(session_id: str, prefix: str, taken: Container[str]) -> str:
    """`<prefix>-<sha256 hex>`, 8 hex chars unless a clash with `taken` needs more."""
    import hashlib  # only new leases need it

    digest = hashlib.sha256(session_id.encode("utf-8")).hexdigest()
    for length in range(8, len(digest) + 1):
        name = f"{prefix}-{digest[:length]}"
        if name not in taken:
            return name
    raise AssertionError("two distinct session ids share a full SHA-256")  # pragma: no cover


def grant(
    state: LedgerState,
    request: Request,
    now: datetime,
    port_check: PortCheck | None,
) -> Grant:
    """Return the session's lease (TTL refreshed, following its profile) or a new one;
    raise NoPortsAvailable."""
    config = request.config
    expires_at = now + timedelta(minutes=config.ttl_minutes)
    files = _merge_files(state.files, request)
    existing = state.leases.get(request.session_id)
    if existing is None:
        return _place(state, request, now, expires_at, files, port_check)
    follow = follow_profile(state, existing, request, port_check)
    if follow is None or not follow.misfit:
        return _refresh(state, existing, request, now, files, follow)
    if request.user is not None:
        # `run` uses the lease while it runs: it never moves it under its owner's feet.
        follow = follow._replace(stays="a `run` never moves the lease it joins")
        return _refresh(state, existing, request, now, files, follow)
    # The new profile no longer fits the block: the lease moves, as when a foreign
    # process holds its home, and keeps what it is (owner, anchor, compose project).
    rest = state.with_leases(state.leases.updated({request.session_id: None}))
    try:
        moved = _place(rest, request, now, expires_at, files, port_check, follow.lease)
    except NoPortsAvailable:
        follow = follow._replace(stays="no other block is free")
        return _refresh(state, existing, request, now, files, follow)
    reason = follow.misfit
    if follow.changes:
        reason = f"its profile changed ({follow.changes}) and {reason}"
    if moved.lease.start == existing.start:  # pragma: no cover (a misfit block is not granted)
        return moved._replace(follow=follow)
    return moved._replace(follow=follow, moved=Move(existing.start, reason, existing.end))


def _place(
    state: LedgerState,
    request: Request,
    now: datetime,
    expires_at: datetime,
    files: dict[str, tuple[FileRecord, ...]],
    port_check: PortCheck | None,
    previous: Lease | None = None,
) -> Grant:
    """A new block for the session (its home when it can), or PREVIOUS (its lease
    re-derived from a profile that no longer fits its block) moved to one."""
    config = request.config
    if len(state.leases) >= config.max_sessions:
        raise NoPortsAvailable.limit_reached(
            len(state.leases), config.max_sessions, config.sources.get("max_sessions")
        )

    leases = state.leases
    skipped: list[Skip] = []

    def busy_port(start: int, own: bool) -> Skip | None:
        if port_check is None:
            return None
        for name, offset in config.profile.ports:
            holder = port_check(start + offset, own)
            if holder is not None:
                return Skip(start, start + offset, name, holder)
        return None

    def usable(start: int) -> bool:
        if leases.occupied(start, start + config.range - 1):
            return False
        skip = busy_port(start, False)
        if skip is not None:
            skipped.append(skip)
        return skip is None

    chosen: int | None = None
    moved: Move | None = None
    home = state.home(request.session_id)
    if home is not None and not _is_block(home, config):
        home = None  # made under other settings: the first block granted now is home
    if home is not None:
        holders = leases.overlapping(home, home + config.range - 1)
        if holders:
            moved = Move(home, f"it is held by session {holders[0].session_id!r}")
        else:
            skip = busy_port(home, True)
            if skip is None:
                chosen = home
            else:
                moved = Move(home, skip.reason)
    if chosen is None:
        # Other sessions' homes last: a newcomer should not take a block someone
        # returns to tomorrow while a block nobody calls home is free.
        homes = state.home_blocks()
        blocks = range(config.base, config.span_end + 1, config.range)
        candidates = chain(
            filterfalse(homes.__contains__, blocks),  # in C: 10,000 homes at 10,000 leases
            (start for start in blocks if start in homes and start != home),
        )
        for start in candidates:
            if usable(start):
                chosen = start
                break
    if chosen is None:
        raise NoPortsAvailable.all_taken(
            config.base, config.span_end, config.sources.get("max_sessions")
        )

    if previous is None:
        slug = _slug(state, request)
        lease = new_lease(request, chosen, now, expires_at, leases.compose_names(), slug)
    else:
        ports = _ports(config.profile, chosen)
        lease = previous._replace(
            start=chosen,
            ports=ports,
            env=_env(
                config,
                ports,
                previous.compose_project_name,
                request.session_id,
                previous.slug,
                previous.bare,
            ),
            expires_at=expires_at,
            ttl_minutes=config.ttl_minutes,
            owner=request.owner or previous.owner,
            worktree=request.worktree or previous.worktree,
        )
    homes_after, forgotten_homes = state.moved_home(
        request.session_id, chosen if home is None else home, HISTORY_LIMIT
    )
    slugs = state.slugs  # the session's own slug is its lease's now
    if request.session_id in slugs:
        slugs = {key: value for key, value in slugs.items() if key != request.session_id}
    for forgotten in forgotten_homes:
        if forgotten in files:
            files = {key: value for key, value in files.items() if key != forgotten}
        if forgotten in slugs:
            slugs = {key: value for key, value in slugs.items() if key != forgotten}
    new_state = LedgerState(leases.updated({request.session_id: lease}), homes_after, files, slugs)
    return Grant(new_state, lease, created=previous is None, skipped=tuple(skipped), moved=moved)


def _merge_files(
    files: dict[str, tuple[FileRecord, ...]], request: Request
) -> dict[str, tuple[FileRecord, ...]]:
    """FILES with the request's files recorded for its session (same object if no change)."""
    known = files.get(request.session_id, ())
    new = tuple(record for record in dict.fromkeys(request.files) if record not in known)
    if not new:
        return files
    return {**files, request.session_id: (*known, *new)[-FILES_LIMIT:]}


def _refresh(
    state: LedgerState,
    existing: Lease,
    request: Request,
    now: datetime,
    files: dict[str, tuple[FileRecord, ...]],
    follow: Follow | None = None,
) -> Grant:
    config = request.config
    expires_at = now + timedelta(minutes=config.ttl_minutes)
    # The lease as its profile makes it now, in its own block; else as it is.
    current = existing if follow is None or follow.misfit else follow.lease
    if request.user is not None:
        # Used as it is: `run` joins the lease (its TTL, owner and anchor untouched);
        # it never takes it over.
        if request.user in current.guests:
            if current is existing:
                return Grant(state, existing, created=False, follow=follow)
            joined = current
        else:
            joined = current._replace(guests=(*current.guests, request.user))
        leases = state.leases.updated({request.session_id: joined})
        joined_state = LedgerState(leases, state.homes_table, files, state.slugs)
        return Grant(joined_state, joined, created=False, follow=follow)
    if current is existing and existing.refreshed(
        now, config.ttl_minutes, request.owner, request.worktree
    ):
        # Refreshed a moment ago: leave the leases alone.
        if files is state.files:
            return Grant(state, existing, created=False, follow=follow)
        state = LedgerState(state.leases, state.homes_table, files, state.slugs)
        return Grant(state, existing, created=False, follow=follow)
    refreshed = current._replace(
        expires_at=expires_at,
        ttl_minutes=config.ttl_minutes,
        owner=request.owner or existing.owner,
        worktree=request.worktree or existing.worktree,
    )
    leases = state.leases.updated({request.session_id: refreshed})
    refreshed_state = LedgerState(leases, state.homes_table, files, state.slugs)
    return Grant(refreshed_state, refreshed, created=False, follow=follow)


def follow_profile(
    state: LedgerState, existing: Lease, request: Request, port_check: PortCheck | None
) -> Follow | None:
    """EXISTING re-derived from the request's profile and settings in its own block, or
    None when that is what it already is (the common case: no hash, no write).

    The compose project name stays while the prefix stays. The result says why it no
    longer fits the block, if so: the settings have no block at its start, the grown
    block meets another lease, or a port it did not have is busy (PORT_CHECK)."""
    config = request.config
    profile = config.profile
    if not config.profile_chosen:
        # No project file where the request comes from (`portalloc env S` run in another
        # directory, an MCP client; settings from the environment alone): the lease
        # keeps the profile it has.
        return None
    if existing.worktree is not None and not _worktree_file(config.project_file, existing):
        # A worktree's lease follows the worktree's own project file only: not one in a
        # package below its top (a monorepo's web/portalloc.toml), nor the file of
        # whatever directory a server or another shell asks from.
        return None
    start = existing.start
    ports = _ports(profile, start)
    name = existing.compose_project_name
    prefix = profile.compose_prefix
    # `<prefix>-<hex>`: the part after the prefix never holds a '-'.
    if not name.startswith(prefix + "-") or "-" in name[len(prefix) + 1 :]:
        taken = state.leases.compose_names() - {name}
        name = compose_project_name(existing.session_id, prefix, taken)
    slug = existing.slug
    if slug is None:  # a lease made before names: it gets one now
        slug = slug_for(existing.session_id, existing.worktree, state.leases.slugs())
    named = existing._replace(slug=slug, bare=profile.bare_name)
    env = _env(config, ports, name, existing.session_id, slug, profile.bare_name)
    same = (
        ports == existing.ports
        and env == existing.env
        and name == existing.compose_project_name
        and config.range == existing.span
        and named == existing
    )
    in_geometry = _is_block(start, config)
    if same and in_geometry:
        return None
    lease = named._replace(span=config.range, ports=ports, env=env, compose_project_name=name)
    changes = "" if same else (describe_changes(existing, lease) or "reordered ports or variables")
    if not in_geometry:
        return Follow(
            changes,
            lease,
            f"base {config.base}, range {config.range} and max sessions "
            f"{config.max_sessions} have no block at {start}",
        )
    if lease.end > existing.end:
        for other in state.leases.overlapping(existing.end + 1, lease.end):
            if other.session_id != existing.session_id:
                return Follow(
                    changes,
                    lease,
                    f"its block grown to {start}-{lease.end} meets session {other.session_id!r}",
                )
    if port_check is not None:
        had = {port for _name, port in existing.ports}
        for port_name, port in ports:
            if port not in had:
                holder = port_check(port, True)
                if holder is not None:
                    return Follow(changes, lease, Skip(start, port, port_name, holder).reason)
    return Follow(changes, lease)


def describe_changes(old: Lease, new: Lease, env_of: Lease | None = None) -> str:
    """What re-deriving OLD into NEW changed, in a few words: `added cache 10004,
    CACHE_PORT`. Ports are named where NEW has them and compared by offset in their
    block; variables are compared as ENV_OF (default NEW) has them."""
    old_ports, new_ports = dict(old.ports), dict(new.ports)
    old_env, new_env = dict(old.env), dict((env_of or new).env)
    groups = {
        "added": [f"{name} {port}" for name, port in new_ports.items() if name not in old_ports]
        + [variable for variable in new_env if variable not in old_env],
        "removed": [name for name in old_ports if name not in new_ports]
        + [variable for variable in old_env if variable not in new_env],
        "moved": [
            f"{name} {old_ports[name]}->{port}"
            for name, port in new_ports.items()
            if name in old_ports and old_ports[name] - old.start != port - new.start
        ],
        "changed": [
            variable
            for variable, value in new_env.items()
            if variable in old_env and old_env[variable] != value
        ],
    }
    parts = [f"{verb} {_some(names)}" for verb, names in groups.items() if names]
    if new.compose_project_name != old.compose_project_name:
        parts.append(f"compose project {new.compose_project_name}")
    if new.span != old.span:
        parts.append(f"range {old.span}->{new.span}")
    if new.slug != old.slug:
        parts.append(f"name {new.slug}")
    if new.bare != old.bare:
        parts.append(f"bare name for {new.bare or 'no port'}")
    return "; ".join(parts)


def _some(names: list[str], limit: int = 4) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def _is_block(start: int, config: PortAllocatorConfig) -> bool:
    offset = start - config.base
    return (
        offset >= 0 and offset % config.range == 0 and offset // config.range < config.max_sessions
    )


def _slug(state: LedgerState, request: Request) -> str:
    """The name of the session's new lease: the one it had, unless an active lease took it
    meanwhile; else a new one, never an active lease's or one another session keeps."""
    active = state.leases.slugs()
    mine = state.slugs.get(request.session_id)
    if mine is not None and mine not in active:
        return mine
    kept = {slug for session, slug in state.slugs.items() if session != request.session_id}
    # Not `active | kept`: of an indexed table, `active` is searched, never made a set.
    return slug_for(request.session_id, request.worktree, _Either(active, kept))


class _Either:
    """A name either of two containers holds."""

    __slots__ = ("first", "second")

    def __init__(self, first: Container[str], second: Container[str]) -> None:
        self.first, self.second = first, second

    def __contains__(self, value: object) -> bool:
        return value in self.first or value in self.second


def new_lease(
    request: Request,
    start: int,
    now: datetime,
    expires_at: datetime,
    taken_names: Container[str],
    slug: str | None = None,
) -> Lease:
    config = request.config
    profile = config.profile
    ports = _ports(profile, start)
    compose_name = compose_project_name(request.session_id, profile.compose_prefix, taken_names)
    if slug is None:
        slug = slug_for(request.session_id, request.worktree, set())
    env = _env(config, ports, compose_name, request.session_id, slug, profile.bare_name)
    return Lease(
        session_id=request.session_id,
        start=start,
        span=config.range,
        ports=ports,
        env=env,
        compose_project_name=compose_name,
        created_at=now,
        expires_at=expires_at,
        ttl_minutes=config.ttl_minutes,
        owner=request.owner if request.user is None or request.keep else request.user,
        worktree=request.worktree,
        guests=(request.user,) if request.user is not None and request.keep else (),
        slug=slug,
        bare=profile.bare_name,
    )


def _worktree_file(project_file: str | None, lease: Lease) -> bool:
    """Whether PROJECT_FILE is one found walking up from LEASE's worktree top: in the top
    itself or a directory above it."""
    import os.path

    if project_file is None or lease.worktree is None:
        return False
    here = os.path.realpath(os.path.dirname(project_file))  # noqa: PTH120
    tree = os.path.realpath(lease.worktree)
    return tree == here or tree.startswith(here.rstrip(os.sep) + os.sep)


def _ports(profile: Profile, start: int) -> tuple[tuple[str, int], ...]:
    return tuple((name, start + offset) for name, offset in profile.ports)


def _env(
    config: PortAllocatorConfig,
    ports: tuple[tuple[str, int], ...],
    compose_name: str,
    session_id: str,
    slug: str | None,
    bare: str | None,
) -> tuple[tuple[str, str], ...]:
    """The profile's variables for a lease with PORTS, compose project, session, SLUG and
    BARE (the port its bare name answers for)."""
    fields = {f"{name}_port": str(port) for name, port in ports}
    for name, host in hosts(slug, ports, bare).items():
        if name:
            fields[f"{name}_url"] = url(host, config.proxy_port)
    fields["compose_project_name"] = compose_name
    fields["session_id"] = session_id
    return tuple((name, render_template(template, fields)) for name, template in config.profile.env)


def screened_env(lease: Lease, config: PortAllocatorConfig) -> tuple[tuple[str, str], ...]:
    """LEASE's variables as a caller may take them from a shared ledger, which any member
    of the group can write: those of a shape no shell or tool can turn into a command
    (rules.safe_value), and those that are exactly what the caller's own profile (its
    project file, as far as the caller trusts it) gives this lease. The rest, however
    harmless its name looks, is left out: no list of dangerous names is complete."""
    from portalloc.rules import safe_value

    try:
        mine = set(
            _env(
                config,
                lease.ports,
                lease.compose_project_name,
                lease.session_id,
                lease.slug,
                lease.bare,
            )
        )
    except KeyError:  # the caller's profile names a port this lease does not have
        mine = set()
    return tuple(
        (name, value)
        for name, value in lease.env
        if safe_value(name, value) or (name, value) in mine
    )

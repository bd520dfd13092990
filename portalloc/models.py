"""Domain values: the profile, the lease and the allocation handed to users."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    ValuesView,
)
from datetime import UTC, datetime, timedelta

# NamedTuple and a frozen dataclass without importing typing and dataclasses: the read
# path (`portalloc env`) imports this module.
from portalloc.records import NamedTuple, TypedDict, dataclass, field
from portalloc.rules import DEFAULT_PROXY_PORT, URL_DOMAIN, port_label

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from collections.abc import Set as AbstractSet
    from pathlib import Path
    from typing import Annotated, Any, Literal

    # HELD_WHILE's three, for a type checker (it cannot take a Literal from a tuple).
    HeldWhile = Literal["pid", "worktree", "ttl"]
    ReclaimReason = Literal["expired", "owner_dead", "worktree_gone"]


def isoformat(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    # fromisoformat is ~30x faster than strptime, which matters with 1,000 leases.
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone")
    return moment.astimezone(UTC)


def template_fields(template: str) -> list[str]:
    """Names a `{...}` template refers to; raises ValueError for anything but plain names."""
    import string  # only where a template is read: not on the read path

    names: list[str] = []
    for _literal, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if spec or conversion:
            raise ValueError(f"format specs and conversions are not allowed in {{{name}}}")
        if not name.isidentifier():
            raise ValueError(f"{{{name}}} is not a plain field name")
        names.append(name)
    return names


def render_template(template: str, fields: dict[str, str]) -> str:
    """Substitute plain `{name}` fields; the profile loader has already vetted the names."""
    import string

    out: list[str] = []
    for literal, name, _spec, _conversion in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(fields[name])
    return "".join(out)


# Internal records are NamedTuples rather than dataclasses: each frozen dataclass
# costs ~0.8 ms to create at import, and every `portalloc env` pays for imports.


class Profile(NamedTuple):
    """Named ports at fixed offsets in a block, and the variables that expose them."""

    ports: tuple[tuple[str, int], ...]
    env: tuple[tuple[str, str], ...]
    compose_prefix: str = "ac"
    source: Path | None = None
    # Files `portalloc env` keeps current for a worktree, relative to its top.
    env_file: str | None = None
    manifest: str | None = None
    # How many [env] entries of an untrusted project file wait for `portalloc trust`.
    waiting: int = 0
    # `urls = true`: each port also gets `<NAME>_URL`; `bare_name`: the port that
    # answers the session's bare name, `<slug>.localhost`.
    urls: bool = False
    bare_name: str | None = None

    @property
    def span_needed(self) -> int:
        return max(offset for _name, offset in self.ports) + 1

    def allowed_fields(self) -> set[str]:
        return (
            {f"{name}_port" for name, _ in self.ports}
            | {f"{name}_url" for name, _ in self.ports if port_label(name)}
            | {"compose_project_name", "session_id"}
        )


DEFAULT_PROFILE = Profile(
    ports=(("db", 0), ("rest", 1), ("realtime", 2), ("api", 3)),
    env=(
        ("AGENT_COORDINATOR_DB_PORT", "{db_port}"),
        ("AGENT_COORDINATOR_REST_PORT", "{rest_port}"),
        ("AGENT_COORDINATOR_REALTIME_PORT", "{realtime_port}"),
        ("API_PORT", "{api_port}"),
        ("COMPOSE_PROJECT_NAME", "{compose_project_name}"),
        ("SUPABASE_URL", "http://localhost:{rest_port}"),
    ),
)


class Owner(NamedTuple):
    """The process a lease lives with: PID plus its start time, so a reused PID is not it."""

    pid: int
    started: float | None  # seconds since the epoch, where the OS tells


class Lease(NamedTuple):
    """One session's block of ports, as recorded in the ledger."""

    session_id: str
    start: int
    span: int
    ports: tuple[tuple[str, int], ...]
    env: tuple[tuple[str, str], ...]
    compose_project_name: str
    created_at: datetime
    expires_at: datetime
    ttl_minutes: int
    owner: Owner | None = None
    worktree: str | None = None
    # `portalloc run` processes using a lease they did not make: while any of them
    # lives the lease stays, whatever its own anchor says.
    guests: tuple[Owner, ...] = ()
    # Its names: `<port>.<slug>.localhost`, and `<slug>.localhost` for the port BARE.
    slug: str | None = None
    bare: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.span - 1

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    @property
    def anchored(self) -> bool:
        """Whether something besides its TTL decides when it ends: an owner process, a
        worktree, or `run` processes using it."""
        return self.owner is not None or self.worktree is not None or bool(self.guests)

    def due(self, now: datetime) -> bool:
        """Whether a reclaim at NOW must look at it: its anchor may be gone, or its TTL
        has run out."""
        return self.anchored or self.expired(now)

    def fate(
        self,
        now: datetime,
        owner_alive: Callable[[Owner], bool],
        path_exists: Callable[[str], bool],
    ) -> tuple[Lease, ReclaimReason | None]:
        """What a reclaim at NOW makes of this lease (one that is due): the lease as it
        goes on (its dead `run` guests left out) and None, or the lease and why it ends:
        a dead owner, a vanished worktree, or, with neither, an expired TTL. A live
        `run` using it keeps it. The allocator's reclaim and the read path both ask."""
        lease = self
        if lease.guests:
            guests = tuple(guest for guest in lease.guests if owner_alive(guest))
            if guests != lease.guests:
                lease = lease._replace(guests=guests)
        reason: ReclaimReason | None = None
        if lease.owner is not None:
            if not owner_alive(lease.owner):
                reason = "owner_dead"
            elif lease.worktree is not None and not path_exists(lease.worktree):
                reason = "worktree_gone"
        elif lease.worktree is not None:
            if not path_exists(lease.worktree):
                reason = "worktree_gone"
        elif lease.expired(now):
            reason = "expired"
        return lease, None if lease.guests else reason

    def refreshed(
        self, now: datetime, ttl_minutes: int, owner: Owner | None, worktree: str | None
    ) -> bool:
        """Whether granting this lease again at NOW for TTL_MINUTES, to the OWNER and
        WORKTREE a request names (None: the lease's own), leaves it as it is: refreshed
        a moment ago, with that TTL, owner and anchor. `eval "$(portalloc env)"` in a
        prompt hook or direnv then reads without rewriting the file. The allocator's
        grant and the read path both ask."""
        expires_at = now + timedelta(minutes=ttl_minutes)
        return (
            abs(expires_at - self.expires_at) < refresh_granularity(ttl_minutes)
            and ttl_minutes == self.ttl_minutes
            and (owner or self.owner) == self.owner
            and (worktree or self.worktree) == self.worktree
        )

    @property
    def held_while(self) -> HeldWhile:
        """What keeps the lease: its owner process, its worktree, or only its TTL."""
        if self.owner is not None:
            return "pid"
        if self.worktree is not None:
            return "worktree"
        return "ttl"

    def hosts(self) -> dict[str, str]:
        """Port name -> its host name, `web.feat-a.localhost` (none without a slug); the
        bare name `feat-a.localhost` is filed under ''."""
        return hosts(self.slug, self.ports, self.bare)


def refresh_granularity(ttl_minutes: int) -> timedelta:
    """How close to "now + TTL" an expiry must be to count as already refreshed."""
    return timedelta(seconds=min(60.0, ttl_minutes * 60 / 100))


def hosts(slug: str | None, ports: Iterable[tuple[str, int]], bare: str | None) -> dict[str, str]:
    """Port name -> host name for a lease with SLUG: a port whose name is no DNS label,
    or shares its label with an earlier port, has none; BARE's port also answers at
    `<slug>.localhost`, filed under ''."""
    if slug is None:
        return {}
    found: dict[str, str] = {}
    seen: set[str] = set()
    for name, _port in ports:
        label = port_label(name)
        if label is not None and label not in seen:
            seen.add(label)
            found[name] = f"{label}.{slug}.{URL_DOMAIN}"
    if bare is not None and bare in found:
        found[""] = f"{slug}.{URL_DOMAIN}"
    return found


def url(host: str, proxy_port: int) -> str:
    return f"http://{host}:{proxy_port}"


@dataclass(frozen=True)
class PortAllocation:
    """A lease as users see it: ports, names, timestamps and the environment block."""

    session_id: str
    ports: dict[str, int]
    compose_project_name: str
    created_at: datetime
    expires_at: datetime
    ttl_remaining_minutes: float
    env: dict[str, str]
    block_start: int
    block_end: int
    pid: int | None = None
    worktree: str | None = None
    held_while: HeldWhile = "ttl"
    guests: tuple[int, ...] = ()
    home_block: int | None = None
    slug: str | None = None
    # Port name -> `http://<port>.<slug>.localhost:<proxy port>`, and the bare name's.
    urls: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    # The `sh` block of ENV (`export NAME=VALUE` lines), as the contract's Python API
    # promises; rendered by whoever builds the allocation (the service), not by the value.
    env_snippet: str = ""

    @classmethod
    def from_lease(
        cls,
        lease: Lease,
        now: datetime,
        home: int | None = None,
        proxy_port: int = DEFAULT_PROXY_PORT,
        env_snippet: str = "",
    ) -> PortAllocation:
        remaining = max(0.0, (lease.expires_at - now).total_seconds() / 60)
        names = lease.hosts()
        return cls(
            session_id=lease.session_id,
            ports=dict(lease.ports),
            compose_project_name=lease.compose_project_name,
            created_at=lease.created_at,
            expires_at=lease.expires_at,
            ttl_remaining_minutes=round(remaining, 2),
            env=dict(lease.env),
            block_start=lease.start,
            block_end=lease.end,
            pid=lease.owner.pid if lease.owner else None,
            worktree=lease.worktree,
            held_while=lease.held_while,
            guests=tuple(guest.pid for guest in lease.guests),
            home_block=home,
            slug=lease.slug,
            urls={name: url(host, proxy_port) for name, host in names.items() if name},
            url=url(names[""], proxy_port) if "" in names else None,
            env_snippet=env_snippet,
        )

    def __getattr__(self, name: str) -> Any:
        # `a.rest_port` and `a.rest_url` for whatever ports the profile names.
        if name.endswith("_port"):
            ports = self.__dict__.get("ports", {})
            if name[: -len("_port")] in ports:
                port: int = ports[name[: -len("_port")]]
                return port
        if name.endswith("_url"):
            urls = self.__dict__.get("urls", {})
            if name[: -len("_url")] in urls:
                found: str = urls[name[: -len("_url")]]
                return found
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """The allocation object: AllocationJSON's keys, and `<name>_port` for each port
        after session_id."""
        data: dict[str, Any] = {"session_id": self.session_id}
        for name, port in self.ports.items():
            data[f"{name}_port"] = port
        data.update(
            compose_project_name=self.compose_project_name,
            created_at=isoformat(self.created_at),
            expires_at=isoformat(self.expires_at),
            ttl_remaining_minutes=self.ttl_remaining_minutes,
            block_start=self.block_start,
            block_end=self.block_end,
            pid=self.pid,
            worktree=self.worktree,
            held_while=self.held_while,
            guests=list(self.guests),
            home_block=self.home_block,
            slug=self.slug,
            urls=self.urls,
            url=self.url,
            env=self.env,
        )
        return data


# What keeps a lease, as held_while says: its owner process, its worktree, only its TTL.
HELD_WHILE = ("pid", "worktree", "ttl")


class AllocationJSON(TypedDict):
    """The allocation object as JSON, as `allocate --json`, the manifest, the HTTP API and
    the MCP tools answer it: each field, its type and what it means. Each port of the
    profile adds a `<name>_port` field (db_port, ...), an int. The HTTP and MCP schemas
    are built from this class (adapters/schema.py)."""

    session_id: Annotated[str, "The session the lease is for: any string, e.g. a path."]
    compose_project_name: Annotated[str, "COMPOSE_PROJECT_NAME of the session's stack."]
    created_at: Annotated[str, "When the lease was made, UTC: 2026-11-22T10:00:00Z."]
    expires_at: Annotated[str, "When its TTL runs out, UTC; every refresh moves it."]
    ttl_remaining_minutes: Annotated[float, "Minutes until expires_at."]
    block_start: Annotated[int, "The first port of the session's block."]
    block_end: Annotated[int, "The last port of the block."]
    pid: Annotated[int | None, "The process the lease ends with (--pid), if any."]
    worktree: Annotated[str | None, "The worktree the lease ends with, if any."]
    held_while: Annotated[
        HeldWhile, "What keeps the lease: its owner process, its worktree, or its TTL."
    ]
    guests: Annotated[list[int], "PIDs of `portalloc run` processes using the lease."]
    home_block: Annotated[int | None, "The first block the session was granted."]
    slug: Annotated[str | None, "The lease's name: its ports answer at <port>.<slug>.localhost."]
    urls: Annotated[
        dict[str, str],
        "Port name -> http://<port>.<slug>.localhost:<proxy port> (portalloc proxy).",
    ]
    url: Annotated[
        str | None, "The URL of the bare name <slug>.localhost, if the profile sets one."
    ]
    env: Annotated[dict[str, str], "The environment block as NAME -> value."]


FileRecord = tuple[str, str]  # (kind, absolute path)


class Leases(Mapping[str, Lease]):
    """Active leases by session, in ledger order, with the questions the allocator asks
    of all of them at once (spans, compose names, what a reclaim must look at).

    Immutable: `updated` returns a new table. The ledger subclasses it to answer those
    questions from an index of the file, parsing only the leases asked for.
    """

    __slots__ = ("_by_id", "_spans")

    def __init__(self, leases: Mapping[str, Lease] | None = None) -> None:
        self._by_id: dict[str, Lease] = {} if leases is None else dict(leases)
        self._spans: tuple[list[int], list[int], list[str]] | None = None

    # The Mapping protocol, delegated to the dict (C speed for status and tests).
    def __getitem__(self, session_id: str) -> Lease:
        return self._by_id[session_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._by_id

    def keys(self) -> KeysView[str]:
        return self._by_id.keys()

    def values(self) -> ValuesView[Lease]:
        return self._by_id.values()

    def items(self) -> ItemsView[str, Lease]:
        return self._by_id.items()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.items())!r})"

    def sorted_spans(self) -> tuple[list[int], list[int], list[str]]:
        """Starts, ends and session ids of every lease, lowest start first."""
        if self._spans is None:
            spans = sorted((lease.start, lease.end, key) for key, lease in self._by_id.items())
            self._spans = (
                [start for start, _end, _key in spans],
                [end for _start, end, _key in spans],
                [key for _start, _end, key in spans],
            )
        return self._spans

    def _span_slots(self) -> tuple[list[int], list[int], Sequence[Any]]:
        """Starts and ends, lowest start first, and what _at() takes for each lease."""
        return self.sorted_spans()

    def _at(self, slot: Any) -> Lease:
        return self[slot]

    def occupied(self, start: int, end: int) -> bool:
        """Whether any lease's span meets START-END, in O(log n)."""
        starts, ends, _slots = self._span_slots()
        # Spans never overlap each other: only the last one starting at or before
        # `end` can reach into [start, end].
        index = bisect_right(starts, end) - 1
        return index >= 0 and ends[index] >= start

    def overlapping(self, start: int, end: int) -> list[Lease]:
        """Leases whose span meets START-END, lowest start first, in O(log n + hits)."""
        starts, ends, slots = self._span_slots()
        # Those meeting [start, end] are the run ending with the last one that starts
        # at or before `end` (spans never overlap each other).
        index = bisect_right(starts, end) - 1
        found: list[Any] = []
        while index >= 0 and ends[index] >= start:
            found.append(slots[index])
            index -= 1
        return [self._at(slot) for slot in reversed(found)]

    def compose_names(self) -> AbstractSet[str]:
        return {lease.compose_project_name for lease in self._by_id.values()}

    def slugs(self) -> AbstractSet[str]:
        """The names of the leases (a set, or a set-like view of an indexed table's)."""
        return {lease.slug for lease in self._by_id.values() if lease.slug is not None}

    def due(self, now: datetime) -> list[Lease]:
        """The leases a reclaim at NOW must look at: each one whose anchor may be gone
        (an owner, a worktree or guests) or whose TTL has run out. The others stay."""
        return [lease for lease in self._by_id.values() if lease.due(now)]

    def updated(self, changes: Mapping[str, Lease | None]) -> Leases:
        """This table with CHANGES made: a lease replaced in place or added at the end,
        None removing the session's lease."""
        by_id = dict(self._by_id)
        for key, lease in changes.items():
            if lease is None:
                by_id.pop(key, None)
            else:
                by_id[key] = lease
        return Leases(by_id)

    def changed_since(self, earlier: Leases) -> list[str] | None:
        """The sessions whose lease differs between EARLIER (the table this one was made
        from by `updated`) and this one: added, removed or replaced. None when that
        cannot be told without reading every lease."""
        if type(self) is not Leases or type(earlier) is not Leases:
            return None
        mine, theirs = self._by_id, earlier._by_id
        found = [key for key, lease in mine.items() if theirs.get(key) is not lease]
        return found + [key for key in theirs if key not in mine]


class Homes:
    """Each session's home block, oldest first, kept as the ledger's index holds them: a
    dict of them all is made only when asked for (the ledger subclasses it)."""

    __slots__ = ()

    def get(self, session_id: str) -> int | None:
        raise NotImplementedError

    def blocks(self) -> set[int]:
        """Every home block."""
        raise NotImplementedError

    def moved(self, session_id: str, block: int, limit: int) -> tuple[Homes, list[str]]:
        """These homes with SESSION_ID's (made) the newest, at BLOCK, and the oldest
        forgotten past LIMIT; and the sessions forgotten, oldest first."""
        raise NotImplementedError

    def as_dict(self) -> dict[str, int]:
        raise NotImplementedError


class LedgerState:
    """Active leases by session, each session's home block, and the files written for it.

    Treated as immutable: operations return a new state rather than changing one.
    """

    __slots__ = ("_homes", "files", "leases", "slugs")

    def __init__(
        self,
        leases: Mapping[str, Lease] | None = None,
        homes: dict[str, int] | Homes | None = None,
        files: dict[str, tuple[FileRecord, ...]] | None = None,
        slugs: dict[str, str] | None = None,
    ) -> None:
        self.leases: Leases = leases if isinstance(leases, Leases) else Leases(leases)
        self._homes: dict[str, int] | Homes = {} if homes is None else homes
        self.files: dict[str, tuple[FileRecord, ...]] = {} if files is None else files
        # The slug of each session whose lease ended, kept like its home block: it gets
        # the name back, and no other session takes it meanwhile.
        self.slugs: dict[str, str] = {} if slugs is None else slugs

    @property
    def homes(self) -> dict[str, int]:
        """Each session's home block, oldest first (a dict made of the index's columns
        when first asked for: `allocate` asks `home`, `home_blocks` and `moved_home`)."""
        if isinstance(self._homes, Homes):
            self._homes = self._homes.as_dict()
        return self._homes

    @property
    def homes_table(self) -> dict[str, int] | Homes:
        """The homes as they are kept, for a new state made of this one."""
        return self._homes

    def home(self, session_id: str) -> int | None:
        return self._homes.get(session_id)

    def home_blocks(self) -> set[int]:
        homes = self._homes
        return homes.blocks() if isinstance(homes, Homes) else set(homes.values())

    def moved_home(
        self, session_id: str, block: int, limit: int
    ) -> tuple[dict[str, int] | Homes, list[str]]:
        """The homes with SESSION_ID's (made) the newest, at BLOCK, the oldest forgotten
        past LIMIT; and the sessions forgotten, oldest first."""
        if isinstance(self._homes, Homes):
            return self._homes.moved(session_id, block, limit)
        homes = dict(self._homes)
        homes.pop(session_id, None)
        homes[session_id] = block
        forgotten: list[str] = []
        while len(homes) > limit:
            forgotten.append(next(iter(homes)))
            del homes[forgotten[-1]]
        return homes, forgotten

    def with_leases(self, leases: Mapping[str, Lease]) -> LedgerState:
        return LedgerState(leases, self._homes, self.files, self.slugs)

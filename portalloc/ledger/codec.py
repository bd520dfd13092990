"""The ledger's bytes and its state, each way, under one set of lease rules: a lease to
and from its raw form (format.py's shapes), a document to the state (parse_document),
the checks before a save (refuse_unloadable, validate), the bytes save() writes (dump:
compact JSON ending in a CRC-32; encoder.py writes the same in pieces).

Below index.py, encoder.py and store.py; with format.py and store.py (whose index and
encoder imports wait for a locked load or a save) all of the ledger the read path
(`portalloc env`) imports: every module it imports is start-up time (bench/README.md).
"""

from __future__ import annotations

import json
import zlib
from bisect import bisect_right

from portalloc.errors import InvalidSessionId, LeaseRefused
from portalloc.ledger.format import DOCUMENT_KEYS, LEASE_KEYS, LEDGER_VERSION, _Malformed, migrate
from portalloc.models import Lease, LedgerState, Owner, isoformat, parse_iso
from portalloc.rules import DNS_LABEL, has_unprintable, lease_problem, validate_session_id

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

    from portalloc.ledger.format import RawLease, RawLedger, RawOwner


def _owner_to_raw(owner: Owner) -> RawOwner:
    return {"pid": owner.pid, "started": owner.started}


def _owner_from_raw(raw: object) -> Owner:
    if type(raw) is dict and not raw.keys() <= {"pid", "started"}:
        raise _Malformed("an owner holds unknown keys")
    pid = raw.get("pid") if type(raw) is dict else None
    started = raw.get("started") if type(raw) is dict else None
    if type(pid) is not int or (started is not None and type(started) not in (int, float)):
        raise _Malformed("an owner must hold an integer pid and a start time")
    return Owner(pid=pid, started=None if started is None else float(started))


def lease_to_raw(lease: Lease) -> RawLease:
    return {
        "session_id": lease.session_id,
        "start": lease.start,
        "span": lease.span,
        "ports": dict(lease.ports),
        "env": dict(lease.env),
        "compose_project_name": lease.compose_project_name,
        "created_at": isoformat(lease.created_at),
        "expires_at": isoformat(lease.expires_at),
        "ttl_minutes": lease.ttl_minutes,
        "owner": None if lease.owner is None else _owner_to_raw(lease.owner),
        "worktree": lease.worktree,
        "guests": [_owner_to_raw(guest) for guest in lease.guests],
        "slug": lease.slug,
        "bare": lease.bare,
    }


def _all_typed(mapping: object, value_type: type) -> bool:
    # type() rather than isinstance(): bool is not an int here. Keys of a JSON object
    # are always strings; map() keeps the per-value check in C, which matters on a
    # ledger with a thousand leases.
    return type(mapping) is dict and (
        not mapping or set(map(type, mapping.values())) == {value_type}
    )


def lease_from_raw(raw: object) -> Lease:
    if type(raw) is not dict:
        raise _Malformed("a lease is not an object")
    if not raw.keys() <= LEASE_KEYS:
        # Nothing rides along: a key save() does not write is not carried back out
        # either (and could hide an object the read path would take for a lease).
        raise _Malformed(f"a lease holds unknown keys {sorted(raw.keys() - LEASE_KEYS)}")
    try:
        ports, env = raw["ports"], raw["env"]
        if not _all_typed(ports, int) or not _all_typed(env, str):
            raise _Malformed("'ports' must map names to integers and 'env' names to strings")
        start, span, ttl = raw["start"], raw["span"], raw["ttl_minutes"]
        if not (type(start) is int and type(span) is int and type(ttl) is int):
            raise _Malformed("'start', 'span' and 'ttl_minutes' must be integers")
        session_id, compose = raw["session_id"], raw["compose_project_name"]
        created, expires = raw["created_at"], raw["expires_at"]
        if not all(type(text) is str for text in (session_id, compose, created, expires)):
            raise _Malformed("ids, names and timestamps must be strings")
        worktree = raw.get("worktree")
        if worktree is not None and type(worktree) is not str:
            raise _Malformed("'worktree' must be a string")
        owner_raw = raw.get("owner")
        owner = None if owner_raw is None else _owner_from_raw(owner_raw)
        guests_raw = raw["guests"]
        if type(guests_raw) is not list:
            raise _Malformed("'guests' must be a list")
        guests = tuple(map(_owner_from_raw, guests_raw))
        slug, bare = raw.get("slug"), raw.get("bare")
        if not (slug is None or type(slug) is str) or not (bare is None or type(bare) is str):
            raise _Malformed("'slug' and 'bare' must be strings")
        # Positional: a thousand keyword constructions cost a few milliseconds more.
        lease = Lease(
            session_id,
            start,
            span,
            tuple(ports.items()),
            tuple(env.items()),
            compose,
            parse_iso(created),
            parse_iso(expires),
            ttl,
            owner,
            worktree,
            guests,
            slug,
            bare,
        )
    except KeyError as exc:
        raise _Malformed(f"a lease lacks {exc.args[0]!r}") from None
    except (ValueError, OverflowError, TypeError) as exc:
        # fromisoformat past year 9999 with its offset, and the like
        raise _Malformed(str(exc)) from None
    _check_rules(lease)
    return lease


def _check_rules(lease: Lease) -> None:
    """The lease rules (rules.lease_problem), before anything of a lease from the file is
    printed: in a shared state dir, other users can write this file."""
    problem = lease_problem(lease)
    if problem is not None:
        raise _Malformed(problem)


def validate(state: LedgerState) -> None:
    """Refuse to write a ledger that breaks an invariant (overlapping spans, bad ports),
    checking every lease (of an indexed file, save() checks only the changes since)."""
    starts, ends, keys = state.leases.sorted_spans()
    previous_end, previous_id = 0, ""
    named: set[str] = set()
    for start, end, session_id in zip(starts, ends, keys, strict=True):
        if start <= previous_end:
            raise AssertionError(f"leases {previous_id!r} and {session_id!r} overlap")
        lease = state.leases[session_id]
        _check_written(session_id, lease)
        if lease.slug is not None:
            if lease.slug in named:
                raise AssertionError(f"two leases are named {lease.slug!r}")
            named.add(lease.slug)
        previous_end, previous_id = end, session_id


def refuse_unloadable(leases: Iterable[Lease], known: Mapping[int, tuple[Lease, Any]]) -> None:
    """Raise LeaseRefused for a lease of LEASES made since the file was read that the load
    rules would refuse. Leases read from the file (KNOWN, by identity) passed them then:
    only the others are checked, so a write costs the same at ten thousand leases."""
    for lease in leases:
        loaded = known.get(id(lease))
        if loaded is None or loaded[0] is not lease:
            problem = lease_problem(lease)
            if problem is not None:
                raise LeaseRefused(problem)


def _check_written(session_id: str, lease: Lease) -> None:
    if not 1 <= lease.start <= lease.end <= 65535:
        raise AssertionError(f"lease {session_id!r} spans {lease.start}-{lease.end}")
    if lease.session_id != session_id:
        raise AssertionError(f"lease filed under {session_id!r} is for {lease.session_id!r}")
    for _name, port in lease.ports:
        if not lease.start <= port <= lease.end:
            raise AssertionError(f"lease {session_id!r} port {port} is outside its block")


class _Spans:
    """Leases kept so far, by start: an overlap check in O(log n) per lease."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._leases: list[Lease] = []

    def overlapping(self, lease: Lease) -> Lease | None:
        index = bisect_right(self._starts, lease.end)
        # Spans kept never overlap each other: only the last one starting at or
        # before this lease's end can reach into it.
        if index and self._leases[index - 1].end >= lease.start:
            return self._leases[index - 1]
        return None

    def add(self, lease: Lease) -> None:
        index = bisect_right(self._starts, lease.start)
        self._starts.insert(index, lease.start)
        self._leases.insert(index, lease)


class Parsed:
    """What parse_document() found in a document."""

    # A class with slots, as LedgerState is: making a NamedTuple would cost every read
    # (which imports this module and parses no document) 0.08 ms.
    __slots__ = ("dropped", "known", "state")

    def __init__(
        self, state: LedgerState, known: dict[int, tuple[Lease, Any]], dropped: list[str]
    ) -> None:
        self.state = state
        self.known = known  # id(lease) -> the lease and its raw form
        self.dropped = dropped  # why each unusable lease was left out


def parse_document(document: object) -> Parsed:
    """The state in DOCUMENT, each lease's raw form, and the leases left out as unusable."""
    document = migrate(document)
    if not document.keys() <= DOCUMENT_KEYS:
        raise _Malformed(f"unknown keys {sorted(document.keys() - DOCUMENT_KEYS)}")
    raw_leases = document.get("leases")
    raw_homes = document.get("homes")
    raw_files = document.get("files")
    if type(raw_leases) is not list or type(raw_homes) is not dict or type(raw_files) is not dict:
        raise _Malformed("'leases' is not a list, or 'homes' or 'files' is not an object")
    leases: dict[str, Lease] = {}
    known: dict[int, tuple[Lease, Any]] = {}
    dropped: list[str] = []
    spans = _Spans()
    named: dict[str, str] = {}  # slug -> the session whose name it is
    for raw in raw_leases:
        try:
            lease = lease_from_raw(raw)
        except _Malformed as exc:
            dropped.append(str(exc))
            continue
        if lease.session_id in leases:
            dropped.append(f"session {lease.session_id!r} appears twice")
            continue
        clash = spans.overlapping(lease)
        if clash is not None:
            # The first one in the file keeps the block; nothing else can be decided.
            dropped.append(f"lease {lease.session_id!r} overlaps {clash.session_id!r}")
            continue
        if lease.slug is not None and lease.slug in named:
            # A name is one lease's: two claiming it would have the proxy pick a port
            # for a worktree that may not be its own. The first keeps it, as a block.
            dropped.append(f"lease {lease.session_id!r} has {named[lease.slug]!r}'s name")
            continue
        if lease.slug is not None:
            named[lease.slug] = lease.session_id
        spans.add(lease)
        leases[lease.session_id] = lease
        known[id(lease)] = (lease, raw)
    if not _all_typed(raw_homes, int):
        raise _Malformed("'homes' must map session ids to integers")
    homes = {key: start for key, start in raw_homes.items() if _usable_id(key)}
    files = {key: records for key, records in _files_from_raw(raw_files).items() if _usable_id(key)}
    if len(homes) != len(raw_homes) or len(files) != len(raw_files):
        dropped.append("a home or file record names an unusable session id")
    raw_slugs = document.get("slugs", {})
    # A remembered slug is a lease's name to come back to: held to the lease rules.
    slugs = {
        key: slug
        for key, slug in _slugs_from_raw(raw_slugs).items()
        if _usable_id(key) and key not in leases
    }
    if len(slugs) != len(raw_slugs):
        dropped.append("a remembered slug names an unusable or active session")
    state = LedgerState(leases, homes, files, slugs)
    try:
        validate(state)
    except AssertionError as exc:
        raise _Malformed(str(exc)) from None
    return Parsed(state, known, dropped)


def _slugs_from_raw(raw: object) -> dict[str, str]:
    """The remembered slugs: an object of session ids to DNS labels, the others left out."""
    if type(raw) is not dict:
        raise _Malformed("'slugs' is not an object")
    return {
        key: slug for key, slug in raw.items() if type(slug) is str and DNS_LABEL.fullmatch(slug)
    }


def _usable_id(session_id: str) -> bool:
    try:
        validate_session_id(session_id)
    except InvalidSessionId:
        return False
    return True


def _files_from_raw(raw: dict[str, Any]) -> dict[str, tuple[tuple[str, str], ...]]:
    files: dict[str, tuple[tuple[str, str], ...]] = {}
    for session_id, records in raw.items():
        if type(records) is not list:
            raise _Malformed("'files' must map session ids to lists")
        parsed: list[tuple[str, str]] = []
        for record in records:
            if type(record) is dict and record.keys() != {"kind", "path"}:
                raise _Malformed("a file record must hold exactly a kind and a path")
            kind = record.get("kind") if type(record) is dict else None
            path = record.get("path") if type(record) is dict else None
            if type(kind) is not str or type(path) is not str:
                raise _Malformed("a file record must hold a string kind and path")
            if not has_unprintable(kind) and not has_unprintable(path):
                parsed.append((kind, path))
        files[session_id] = tuple(parsed)
    return files


# How save() starts the file, and each lease in it: the read path finds one lease by
# its first key without decoding the others.
_PREFIX = f'{{"version":{LEDGER_VERSION},"leases":['
_LEASE_START = '{"session_id":'
_NEXT_LEASE = b',{"session_id":'  # each lease after the first
_LEASE_WINDOW = 1 << 20
# save() ends the document with a CRC-32 of everything before it, so the read path can
# tell a file save() wrote, whole, from one edited by hand (which the locked path
# checks in full). The locked path ignores it.
_CRC_KEY = b',"crc32":"'


# One encoder for every piece: json.dumps() with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _json(value: object) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def _with_crc(body: bytes) -> bytes:
    return body[:-1] + _CRC_KEY + b"%08x" % zlib.crc32(body) + b'"}'


def dump(document: RawLedger) -> bytes:
    """The bytes save() writes: compact JSON, its CRC-32 as the last key."""
    return _with_crc(_json(document))

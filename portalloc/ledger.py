"""The JSON ledger on disk: lock, load, migrate, validate, atomic save, quarantine."""

from __future__ import annotations

import codecs
import json
import os
import stat
import time
import zlib
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

from portalloc.errors import InvalidSessionId, LedgerError, LockTimeout
from portalloc.models import Lease, LedgerState, Owner, isoformat, parse_iso
from portalloc.rules import (
    COMPOSE_NAME,
    MAX_PID,
    MAX_TTL_MINUTES,
    SHELL_NAME,
    forbidden_variable,
    has_unprintable,
    validate_session_id,
)

if TYPE_CHECKING:
    import filelock

LEDGER_VERSION = 2
# Short: under contention filelock's default 50 ms poll is mostly idle waiting.
LOCK_POLL_SECONDS = 0.002
# ... and then back off, with jitter, up to this.
LOCK_POLL_CAP_SECONDS = 0.1


class RawOwner(TypedDict):
    pid: int
    started: float | None


class RawLease(TypedDict):
    session_id: str
    start: int
    span: int
    ports: dict[str, int]
    env: dict[str, str]
    compose_project_name: str
    created_at: str
    expires_at: str
    ttl_minutes: int
    owner: RawOwner | None
    worktree: str | None
    guests: list[RawOwner]


class RawFile(TypedDict):
    kind: str
    path: str


class RawLedger(TypedDict):
    version: int
    leases: list[RawLease]
    homes: dict[str, int]
    files: dict[str, list[RawFile]]


class _Malformed(Exception):
    """The file parses but does not have the ledger's shape."""


class _TooNew(Exception):
    """The file was written by a newer portalloc; it must not be overwritten."""

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.version = version


def _v1_owner(raw: object) -> object:
    # v1 recorded a start time in clock ticks since boot (/proc/<pid>/stat); v2 in
    # seconds since the epoch, as psutil tells it on every OS: the same instant.
    if type(raw) is not dict or type(raw.get("start_ticks")) is not int:
        return raw if type(raw) is not dict else {"pid": raw.get("pid"), "started": None}
    import psutil

    if not hasattr(os, "sysconf"):
        return {"pid": raw.get("pid"), "started": None}
    started = raw["start_ticks"] / os.sysconf("SC_CLK_TCK") + psutil.boot_time()
    return {"pid": raw.get("pid"), "started": started}


def _v1_to_v2(document: dict[str, Any]) -> dict[str, Any]:
    # v1 remembered each session's last block ("history"); v2 remembers its home
    # block, and which `run` processes use a lease. The last block is the best
    # guess of home a v1 ledger holds.
    leases = document.get("leases")
    if isinstance(leases, list):
        leases = [
            {**raw, "owner": _v1_owner(raw.get("owner")), "guests": []}
            if type(raw) is dict
            else raw
            for raw in leases
        ]
    return {
        "version": 2,
        "leases": leases,
        "homes": document.get("history", {}),
        "files": {},
    }


# version -> function turning that version's document into the next version's.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(document: object) -> dict[str, Any]:
    """DOCUMENT brought to LEDGER_VERSION; raise _TooNew or _Malformed."""
    if type(document) is not dict:
        raise _Malformed("top level is not an object")
    version = document.get("version")
    if type(version) is not int:
        raise _Malformed("no integer 'version'")
    if version > LEDGER_VERSION:
        raise _TooNew(version)
    while version < LEDGER_VERSION:
        if version not in MIGRATIONS:
            raise _Malformed(f"version {version} is unknown")
        document = MIGRATIONS[version](document)
        version = document["version"]
    return document


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
    }


def _all_typed(mapping: object, value_type: type) -> bool:
    # type() rather than isinstance(): bool is not an int here. Keys of a JSON object
    # are always strings; map() keeps the per-value check in C, which matters on a
    # ledger with a thousand leases.
    return type(mapping) is dict and (
        not mapping or set(map(type, mapping.values())) == {value_type}
    )


LEASE_KEYS = frozenset(RawLease.__annotations__)
DOCUMENT_KEYS = frozenset({*RawLedger.__annotations__, "crc32"})


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
        )
    except KeyError as exc:
        raise _Malformed(f"a lease lacks {exc.args[0]!r}") from None
    except (ValueError, OverflowError, TypeError) as exc:
        # fromisoformat past year 9999 with its offset, and the like
        raise _Malformed(str(exc)) from None
    _check_rules(lease)
    return lease


def _check_rules(lease: Lease) -> None:
    """The rules every lease from the file must meet before anything of it is printed:
    in a shared state dir, other users can write this file."""
    try:
        validate_session_id(lease.session_id)
    except InvalidSessionId as exc:
        raise _Malformed(exc.message) from None
    if not 1 <= lease.ttl_minutes <= MAX_TTL_MINUTES or not 1 <= lease.span <= 65535:
        raise _Malformed(f"lease {lease.session_id!r} has an absurd TTL or span")
    if not 1 <= lease.start <= lease.end <= 65535:
        raise _Malformed(f"lease {lease.session_id!r} spans {lease.start}-{lease.end}")
    for name, port in lease.ports:
        if not SHELL_NAME.fullmatch(name) or not lease.start <= port <= lease.end:
            raise _Malformed(f"lease {lease.session_id!r} has a bad port {name!r}")
    # Control characters and lone surrogates (what undecodable bytes become, which no
    # UTF-8 write can carry: one would make every later save fail) in no string.
    for name, value in lease.env:
        if not SHELL_NAME.fullmatch(name) or forbidden_variable(name) or has_unprintable(value):
            raise _Malformed(f"lease {lease.session_id!r} sets variable {name!r}")
    if not COMPOSE_NAME.fullmatch(lease.compose_project_name):
        raise _Malformed(f"lease {lease.session_id!r} has a bad compose project name")
    if lease.worktree is not None and (not lease.worktree or has_unprintable(lease.worktree)):
        raise _Malformed(f"lease {lease.session_id!r} has a bad worktree path")
    for owner in (lease.owner, *lease.guests):
        if owner is not None and not (
            1 <= owner.pid <= MAX_PID and (owner.started is None or 0 <= owner.started < 2**40)
        ):
            raise _Malformed(f"lease {lease.session_id!r} has an impossible PID")


def validate(state: LedgerState) -> None:
    """Refuse to write a ledger that breaks an invariant (overlapping spans, bad ports)."""
    spans = sorted(
        (lease.start, lease.start + lease.span - 1, key) for key, lease in state.leases.items()
    )
    previous_end, previous_id = 0, ""
    for start, end, session_id in spans:
        if start <= previous_end:
            raise AssertionError(f"leases {previous_id!r} and {session_id!r} overlap")
        if not 1 <= start <= end <= 65535:
            raise AssertionError(f"lease {session_id!r} spans {start}-{end}")
        lease = state.leases[session_id]
        if lease.session_id != session_id:
            raise AssertionError(f"lease filed under {session_id!r} is for {lease.session_id!r}")
        for _name, port in lease.ports:
            if not start <= port <= end:
                raise AssertionError(f"lease {session_id!r} port {port} is outside its block")
        previous_end, previous_id = end, session_id


def state_to_raw(
    state: LedgerState, known: Mapping[int, tuple[Lease, Any]] | None = None
) -> RawLedger:
    """The document to write; KNOWN maps id(lease) to a lease and its raw form as loaded."""
    known = known or {}
    leases: list[RawLease] = []
    for lease in state.leases.values():
        cached = known.get(id(lease))
        # Leases are immutable: the same object serialises as it was read. With a
        # thousand leases this saves most of the cost of a write.
        leases.append(
            cached[1] if cached is not None and cached[0] is lease else lease_to_raw(lease)
        )
    files: dict[str, list[RawFile]] = {
        session_id: [{"kind": kind, "path": path} for kind, path in records]
        for session_id, records in state.files.items()
    }
    return {
        "version": LEDGER_VERSION,
        "leases": leases,
        "homes": dict(state.homes),
        "files": files,
    }


# How save() starts the file, and each lease in it: the read path finds one lease by
# its first key without decoding the others.
_PREFIX = f'{{"version":{LEDGER_VERSION},"leases":['
_LEASE_START = '{"session_id":'
_LEASE_WINDOW = 1 << 20
# save() ends the document with a CRC-32 of everything before it, so the read path can
# tell a file save() wrote, whole, from one edited by hand (which the locked path
# checks in full). The locked path ignores it.
_CRC_KEY = b',"crc32":"'


def dump(document: RawLedger) -> bytes:
    """The bytes save() writes: compact JSON, its CRC-32 as the last key."""
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return body[:-1] + _CRC_KEY + b"%08x" % zlib.crc32(body) + b'"}'


def _intact(data: bytes) -> bool:
    """Whether DATA is a document dump() wrote, unchanged since."""
    trailer = len(_CRC_KEY) + 10  # the key, 8 hex digits, `"}`
    if len(data) <= trailer or data[-trailer:-10] != _CRC_KEY or not data.endswith(b'"}'):
        return False
    try:
        expected = int(data[-10:-2], 16)
    except ValueError:
        return False
    # A memoryview: no copy of a ledger of thousands of leases just to check it.
    crc = zlib.crc32(b"}", zlib.crc32(memoryview(data)[:-trailer]))
    return crc == expected


def read_lease(path: Path, session_id: str) -> Lease | None:
    """The session's lease as last written, read without the lock (the file is only ever
    replaced whole), decoding that lease alone; None when unsure, for the locked path.

    Only a file save() wrote, unchanged since (its CRC-32 says so), qualifies. In such
    a file every lease holds only the keys save() writes, the others being objects of
    integers and strings, and inside JSON strings every `"` is escaped: so
    `{"session_id":<id>,` starts that session's lease in the leases list and nothing
    else. Anything else is left to the locked path, which checks the whole document.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not _intact(data) or not data.startswith(_PREFIX.encode()):
        return None
    needle = (_LEASE_START + json.dumps(session_id, ensure_ascii=False) + ",").encode("utf-8")
    start = data.find(needle)
    if start < 0 or data.find(needle, start + 1) >= 0:
        return None
    # Decode only from the lease on, as far as a lease can reach (a 4096-character id
    # and its variables fit many times over); a lease cut off there fails to parse and
    # goes the locked way.
    try:
        # final=False: a character cut at the window's end is left out, not an error;
        # a byte that is not UTF-8 anywhere else still is one.
        text, _used = codecs.utf_8_decode(data[start : start + _LEASE_WINDOW], "strict", False)
        raw, _end = json.JSONDecoder().raw_decode(text)
        lease = lease_from_raw(raw)
    except (ValueError, RecursionError, _Malformed):
        return None
    return lease if lease.session_id == session_id else None


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


class Parsed(NamedTuple):
    state: LedgerState
    known: dict[int, tuple[Lease, Any]]  # id(lease) -> the lease and its raw form
    dropped: list[str]  # why each unusable lease was left out


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
        spans.add(lease)
        leases[lease.session_id] = lease
        known[id(lease)] = (lease, raw)
    if not _all_typed(raw_homes, int):
        raise _Malformed("'homes' must map session ids to integers")
    homes = {key: start for key, start in raw_homes.items() if _usable_id(key)}
    files = {key: records for key, records in _files_from_raw(raw_files).items() if _usable_id(key)}
    if len(homes) != len(raw_homes) or len(files) != len(raw_files):
        dropped.append("a home or file record names an unusable session id")
    state = LedgerState(leases, homes, files)
    try:
        validate(state)
    except AssertionError as exc:
        raise _Malformed(str(exc)) from None
    return Parsed(state, known, dropped)


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


class Ledger:
    """leases.json and its lock file in one state directory."""

    def __init__(
        self,
        state_dir: Path,
        lock_timeout: float,
        on_warning: Callable[[str], None],
        clock: Callable[[], datetime],
    ) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "leases.json"
        self.lock_path = state_dir / "leases.json.lock"
        self.lock_timeout = lock_timeout
        self._warn = on_warning
        self._clock = clock
        self._known: dict[int, tuple[Lease, Any]] = {}
        # The last load left leases out: the next transaction writes the file back.
        self.dirty = False
        # The file as last loaded or saved (its stat key) and the state in it.
        self._cached: tuple[tuple[int, ...], LedgerState] | None = None
        self._file_lock: filelock.FileLock | None = None
        self._lock_pid = 0

    def _file_mode(self) -> int:
        # A state dir the user made group-writable is shared on purpose: keep the
        # files writable for the group, never for others.
        try:
            dir_mode = self.state_dir.stat().st_mode
        except OSError:
            return 0o600
        return 0o660 if dir_mode & stat.S_IWGRP else 0o600

    def _ensure_dir(self) -> None:
        try:
            if self.state_dir.is_dir():
                return
            self.state_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
            self.state_dir.chmod(0o700)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise LedgerError(self.path, f"cannot create state directory: {reason}") from None

    def _lock(self) -> filelock.FileLock:
        # One lock object per ledger, reused: building one costs more than taking it.
        # Its state is per thread, so threads of one process (the HTTP server) each
        # open their own descriptor and exclude each other like separate processes.

        import filelock

        if self._file_lock is None or self._lock_pid != os.getpid():
            # filelock refuses an instance inherited across fork: a child builds its own.
            self._lock_pid = os.getpid()
            self._file_lock = filelock.FileLock(
                self.lock_path,
                timeout=self.lock_timeout,
                mode=self._file_mode(),
                thread_local=True,
                poll_interval=LOCK_POLL_SECONDS,
                preserve_lock_file=True,
            )
        return self._file_lock

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's lock; raise LockTimeout past the configured timeout."""
        import filelock

        self._ensure_dir()
        lock = self._lock()
        try:
            self._acquire(lock)
        except filelock.Timeout:
            raise LockTimeout(self.lock_path, self.lock_timeout, self._holder()) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise LedgerError(self.lock_path, f"cannot lock: {reason}") from None
        try:
            yield
        finally:
            lock.release()

    def _acquire(self, lock: filelock.FileLock) -> None:
        """Try without blocking, then wait with jittered exponential backoff (public
        filelock API only): forty waiters polling every 2 ms would burn both cores of
        a small machine and slow the holder down."""
        import filelock

        deadline = time.monotonic() + self.lock_timeout
        delay = LOCK_POLL_SECONDS
        while True:
            try:
                lock.acquire(blocking=False)
                return
            except filelock.Timeout:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
            # Jitter from the clock: `random` would cost start-up time for nothing.
            jitter = 0.5 + (time.perf_counter_ns() % 1000) / 2000
            time.sleep(min(left, delay * jitter))
            delay = min(delay * 2, LOCK_POLL_CAP_SECONDS)

    def _holder(self) -> str | None:
        # Asked of the kernel, not of a pid file: a pid written by the last holder goes
        # stale, and a process that is not portalloc (`flock leases.json.lock ...`) writes none.
        from portalloc.host import lock_holder

        return lock_holder(self.lock_path)

    def _file_key(self) -> tuple[int, ...] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerError(self.path, f"cannot read: {exc.strerror or exc}") from None
        # Every save replaces the file (a new inode); mtime, ctime and size on top.
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def load(self) -> LedgerState:
        """Read the ledger; quarantine a corrupt one. Call only while holding the lock.

        A process that lives for hours (`mcp`, `serve`) parses the file again only when
        it changed: the state it parsed or saved last is reused while the file is the
        same one, which is certain under the lock (every writer holds it).
        """
        key = self._file_key()
        if key is not None and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._cached = None
        state = self._load()
        if key is not None and not self.dirty and self._file_key() == key:
            self._cached = (key, state)
        return state

    def _load(self) -> LedgerState:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return LedgerState()
        except OSError as exc:
            raise LedgerError(self.path, f"cannot read: {exc.strerror or exc}") from None
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._quarantine(f"not JSON: {exc}")
        except RecursionError:
            return self._quarantine("not JSON a program can use: nested too deeply")
        try:
            state, self._known, dropped = parse_document(document)
        except _TooNew as exc:
            raise LedgerError(
                self.path,
                f"written by a newer portalloc (ledger version {exc.version}; this one "
                f"understands up to {LEDGER_VERSION}); upgrade portalloc",
            ) from None
        except _Malformed as exc:
            return self._quarantine(str(exc))
        except (RecursionError, OverflowError, TypeError, ValueError) as exc:
            return self._quarantine(f"unusable content ({type(exc).__name__})")
        self.dirty = bool(dropped)
        if dropped:
            target = self._copy_aside()
            self._warn(
                f"ledger {self.path}: left out {len(dropped)} unusable lease(s) "
                f"({dropped[0]}); copied the file to {target}; the other leases carry on"
            )
        return state

    def _corrupt_name(self) -> Path:
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        counter = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{counter}")
            counter += 1
        return target

    def _copy_aside(self) -> Path:
        target = self._corrupt_name()
        try:
            atomic_write(target, self.path.read_bytes(), self._file_mode())
        except OSError as exc:
            raise LedgerError(self.path, f"cannot copy unusable leases aside: {exc}") from None
        return target

    def _quarantine(self, reason: str) -> LedgerState:
        target = self._corrupt_name()
        try:
            os.replace(self.path, target)
        except OSError as exc:
            raise LedgerError(self.path, f"is corrupt and cannot be moved aside: {exc}") from None
        self._warn(f"ledger {self.path} is corrupt ({reason}); moved it to {target}")
        return LedgerState()

    def save(self, state: LedgerState) -> None:
        """Validate, then write atomically and durably. Call only while holding the lock."""
        validate(state)
        payload = dump(state_to_raw(state, self._known))
        self._remove_stale_temps()
        self._cached = None
        try:
            atomic_write(self.path, payload, self._file_mode())
        except OSError as exc:
            raise LedgerError(self.path, f"cannot write: {exc.strerror or exc}") from None
        self.dirty = False
        key = self._file_key()
        if key is not None:
            self._cached = (key, state)

    def _remove_stale_temps(self) -> None:
        # Every writer holds the lock while its temp file exists, so under the lock any
        # temp file found is the remains of a writer that was killed mid-write.
        try:
            with os.scandir(self.state_dir) as entries:
                stale = [entry.path for entry in entries if is_temp_name(entry.name, self.path)]
        except OSError:
            return
        for path in stale:
            try:
                os.unlink(path)
            except OSError:
                pass


_TMP_COUNTER = count()  # threads of one process (the HTTP server) never share a name


def temp_name(path: Path) -> str:
    """The name atomic_write gives its temp file next to PATH: unique per process,
    thread and call, without `tempfile` (whose imports cost start-up time)."""
    return f".{path.name}.{os.getpid()}.{next(_TMP_COUNTER)}.{time.monotonic_ns()}.tmp"


def is_temp_name(name: str, path: Path) -> bool:
    """Whether NAME is one temp_name(PATH) gives."""
    prefix, suffix = f".{path.name}.", ".tmp"
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return False
    parts = name[len(prefix) : -len(suffix)].split(".")
    return len(parts) == 3 and all(part.isdigit() for part in parts)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace PATH with DATA so a crash leaves the old or the new file, never a torn one."""
    tmp: str | None = None
    try:
        tmp = str(path.parent / temp_name(path))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if mode != 0o600:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass

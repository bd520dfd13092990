"""The JSON ledger on disk: lock, load, migrate, validate, atomic save, quarantine."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import count, pairwise
from pathlib import Path
from typing import Any, TypedDict

from portalloc.allocator import LedgerState
from portalloc.errors import LedgerError, LockTimeout
from portalloc.models import Lease, Owner, isoformat, parse_iso

LEDGER_VERSION = 1
# Short: under contention filelock's default 50 ms poll is mostly idle waiting.
LOCK_POLL_SECONDS = 0.002


class RawOwner(TypedDict):
    pid: int
    start_ticks: int | None


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


class RawLedger(TypedDict):
    version: int
    leases: list[RawLease]
    history: dict[str, int]


class _Malformed(Exception):
    """The file parses but does not have the ledger's shape."""


# version -> function turning that version's document into the next version's.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def lease_to_raw(lease: Lease) -> RawLease:
    owner: RawOwner | None = None
    if lease.owner is not None:
        owner = {"pid": lease.owner.pid, "start_ticks": lease.owner.start_ticks}
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
        "owner": owner,
        "worktree": lease.worktree,
    }


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Malformed(f"{what} is not an integer")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"{what} is not a string")
    return value


def lease_from_raw(raw: object) -> Lease:
    if not isinstance(raw, dict):
        raise _Malformed("a lease is not an object")
    try:
        session_id = _str(raw["session_id"], "session_id")
        ports = raw["ports"]
        env = raw["env"]
        if not isinstance(ports, dict) or not isinstance(env, dict):
            raise _Malformed("ports/env are not objects")
        owner_raw = raw.get("owner")
        owner: Owner | None = None
        if owner_raw is not None:
            if not isinstance(owner_raw, dict):
                raise _Malformed("owner is not an object")
            ticks = owner_raw.get("start_ticks")
            owner = Owner(
                pid=_int(owner_raw["pid"], "owner.pid"),
                start_ticks=None if ticks is None else _int(ticks, "owner.start_ticks"),
            )
        worktree = raw.get("worktree")
        lease = Lease(
            session_id=session_id,
            start=_int(raw["start"], "start"),
            span=_int(raw["span"], "span"),
            ports=tuple((_str(k, "port name"), _int(v, "port")) for k, v in ports.items()),
            env=tuple((_str(k, "variable"), _str(v, "value")) for k, v in env.items()),
            compose_project_name=_str(raw["compose_project_name"], "compose_project_name"),
            created_at=parse_iso(_str(raw["created_at"], "created_at")),
            expires_at=parse_iso(_str(raw["expires_at"], "expires_at")),
            ttl_minutes=_int(raw["ttl_minutes"], "ttl_minutes"),
            owner=owner,
            worktree=None if worktree is None else _str(worktree, "worktree"),
        )
    except KeyError as exc:
        raise _Malformed(f"a lease lacks {exc.args[0]!r}") from None
    except ValueError as exc:
        raise _Malformed(str(exc)) from None
    return lease


def validate(state: LedgerState) -> None:
    """Refuse to write a ledger that breaks an invariant (overlapping spans, bad ports)."""
    spans = sorted((lease.start, lease.end, lease.session_id) for lease in state.leases.values())
    for (_s1, end1, id1), (start2, _e2, id2) in pairwise(spans):
        if start2 <= end1:
            raise AssertionError(f"leases {id1!r} and {id2!r} overlap")
    for session_id, lease in state.leases.items():
        if session_id != lease.session_id:
            raise AssertionError(f"lease filed under {session_id!r} is for {lease.session_id!r}")
        if not (1 <= lease.start <= lease.end <= 65535):
            raise AssertionError(f"lease {session_id!r} spans {lease.start}-{lease.end}")
        for _name, port in lease.ports:
            if not lease.start <= port <= lease.end:
                raise AssertionError(f"lease {session_id!r} port {port} is outside its block")


def state_to_raw(state: LedgerState) -> RawLedger:
    return {
        "version": LEDGER_VERSION,
        "leases": [lease_to_raw(lease) for lease in state.leases.values()],
        "history": dict(state.history),
    }


def state_from_document(document: object) -> LedgerState:
    if not isinstance(document, dict):
        raise _Malformed("top level is not an object")
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Malformed("no integer 'version'")
    while version < LEDGER_VERSION:
        if version not in MIGRATIONS:
            raise _Malformed(f"version {version} is unknown")
        document = MIGRATIONS[version](document)
        version = document["version"]
    raw_leases = document.get("leases")
    raw_history = document.get("history", {})
    if not isinstance(raw_leases, list) or not isinstance(raw_history, dict):
        raise _Malformed("'leases' is not a list or 'history' is not an object")
    leases: dict[str, Lease] = {}
    for raw in raw_leases:
        lease = lease_from_raw(raw)
        if lease.session_id in leases:
            raise _Malformed(f"session {lease.session_id!r} appears twice")
        leases[lease.session_id] = lease
    history = {_str(k, "history key"): _int(v, "history block") for k, v in raw_history.items()}
    state = LedgerState(leases, history)
    try:
        validate(state)
    except AssertionError as exc:
        raise _Malformed(str(exc)) from None
    return state


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

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's lock; raise LockTimeout past the configured timeout."""
        import filelock

        self._ensure_dir()

        def record_holder(fd: int) -> None:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass  # naming the holder is a courtesy, not a requirement

        lock = filelock.FileLock(
            self.lock_path,
            timeout=self.lock_timeout,
            mode=self._file_mode(),
            thread_local=False,
            poll_interval=LOCK_POLL_SECONDS,
            preserve_lock_file=True,
            on_acquired=record_holder,
        )
        try:
            lock.acquire()
        except filelock.Timeout:
            raise LockTimeout(self.lock_path, self.lock_timeout, self._holder()) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise LedgerError(self.lock_path, f"cannot lock: {reason}") from None
        try:
            yield
        finally:
            lock.release()

    def _holder(self) -> str | None:
        try:
            text = self.lock_path.read_text().strip()
        except OSError:
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
        except OSError:
            return f"pid {pid}"
        return f"pid {pid}: {cmdline.decode(errors='replace')[:120]}"

    def load(self) -> LedgerState:
        """Read the ledger; quarantine a corrupt one. Call only while holding the lock."""
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
        if isinstance(document, dict):
            version = document.get("version")
            if isinstance(version, int) and version > LEDGER_VERSION:
                raise LedgerError(
                    self.path,
                    f"written by a newer portalloc (ledger version {version}; this one "
                    f"understands up to {LEDGER_VERSION}); upgrade portalloc",
                )
        try:
            return state_from_document(document)
        except _Malformed as exc:
            return self._quarantine(str(exc))

    def _quarantine(self, reason: str) -> LedgerState:
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        counter = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{counter}")
            counter += 1
        try:
            os.replace(self.path, target)
        except OSError as exc:
            raise LedgerError(self.path, f"is corrupt and cannot be moved aside: {exc}") from None
        self._warn(f"ledger {self.path} is corrupt ({reason}); moved it to {target}")
        return LedgerState()

    def save(self, state: LedgerState) -> None:
        """Validate, then write atomically and durably. Call only while holding the lock."""
        validate(state)
        payload = json.dumps(state_to_raw(state), ensure_ascii=False, separators=(",", ":"))
        try:
            atomic_write(self.path, payload.encode("utf-8"), self._file_mode())
        except OSError as exc:
            raise LedgerError(self.path, f"cannot write: {exc.strerror or exc}") from None


_TMP_COUNTER = count()  # threads of one process (the HTTP server) never share a name


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace PATH with DATA so a crash leaves the old or the new file, never a torn one."""
    tmp: str | None = None
    try:
        # A unique name without `tempfile` (whose imports cost start-up time).
        unique = f"{os.getpid()}.{next(_TMP_COUNTER)}.{time.monotonic_ns()}"
        tmp = str(path.parent / f".{path.name}.{unique}.tmp")
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


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)

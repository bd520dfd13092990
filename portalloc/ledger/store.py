"""The ledger's store: leases.json, its lock and its index file in the state directory.
The lock, load (in full by codec.py, or through the index), save (encoded by encoder.py,
written by fs.atomic_write), quarantine; and the reads without the lock (read_lease,
one lease, for the read path; read_every_lease, for completion). No other module opens
those files (tests/test_ledger_ownership.py). The read path imports this module: the
index, the encoder and contextlib are imported where a locked load or a save needs
them (tests/test_read_path_imports.py)."""

from __future__ import annotations

import codecs
import json
import os
import stat
import time
import zlib
from datetime import UTC, datetime

from portalloc.config import LEDGER_NAME
from portalloc.errors import LedgerError, LockTimeout
from portalloc.fs import (
    MAX_READ,
    Ahead,
    Chunk,
    FileRange,
    UnsafeFile,
    atomic_write,
    discard,
    file_key,
    is_temp_name,
    lstat_regular,
    open_lock,
    open_regular,
    read_bytes,
    read_open,
    read_with_stat,
)
from portalloc.ledger.codec import (
    _CRC_KEY,
    _LEASE_START,
    _LEASE_WINDOW,
    _PREFIX,
    _files_from_raw,
    _slugs_from_raw,
    lease_from_raw,
    parse_document,
    refuse_unloadable,
    validate,
)
from portalloc.ledger.format import LEDGER_VERSION, _Malformed, _TooNew
from portalloc.models import Lease, LedgerState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager
    from pathlib import Path
    from typing import Any

    import filelock

    from portalloc.ledger.index import _Index

# Short: under contention filelock's default 50 ms poll is mostly idle waiting.
LOCK_POLL_SECONDS = 0.002
# ... and then back off, with jitter, up to this.
LOCK_POLL_CAP_SECONDS = 0.1


def _failed(path: Path, action: str, exc: OSError) -> LedgerError:
    """The one line for an OSError while ACTION on PATH (`cannot lock: Permission denied`)."""
    return LedgerError(path, f"{action}: {exc.strerror or exc}")


def _alarm_is_free() -> bool:
    """Whether SIGALRM can bound a wait here: a POSIX system, the main thread, the
    default handler, no timer running and the signal not blocked."""
    import signal
    import sys

    # A process that never imported threading started no thread through it: it is on
    # its main thread, and the CLI's allocate need not import threading (1 ms) to know.
    threading = sys.modules.get("threading")
    return (
        hasattr(signal, "setitimer")
        and (threading is None or threading.current_thread() is threading.main_thread())
        and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        # Blocked (a mask inherited across exec): the alarm would never end the wait.
        and signal.SIGALRM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    )


_ALARM_MAX = 86400.0  # seconds: one alarm of a wait for the lock (_wait_in_kernel)


def _flock_until(fd: int, end: float) -> bool:
    """Take the flock of FD, waiting in the kernel until the monotonic time END at the
    latest, each wait ended by SIGALRM (whose handler raises _Deadline); whether it was
    taken."""
    import fcntl
    import signal

    while True:
        try:
            try:
                # Never 0, which would cancel the alarm; never more than a day, past
                # which setitimer overflows (the timeout may be any finite number of
                # seconds): the loop arms it again.
                left = min(max(end - time.monotonic(), 1e-6), _ALARM_MAX)
                signal.setitimer(signal.ITIMER_REAL, left)
                fcntl.flock(fd, fcntl.LOCK_EX)
                return True
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Deadline:
            # The alarm may have come just after flock(2) returned: then the lock is
            # held, and a second flock on the same descriptor says so at once.
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= end:
                    return False


class _Deadline(Exception):
    """SIGALRM ended a wait for the lock (Ledger._wait_in_kernel)."""


# Below this many leases a full parse costs less than keeping an index (under 1 ms
# either way): a server writing a small ledger hundreds of times a second keeps none.
INDEX_MIN_LEASES = 64
# From this many bytes of leases on, a grant has them written and synced to the new
# file while it decides (Ledger.write_ahead): about 2,000 leases.
AHEAD_MIN_BYTES = 1 << 20


class Ledger:
    """leases.json and its lock file in one state directory.

    State files are never followed through a symlink, and never opened when they are
    a FIFO, a device or a directory: the ledger or its lock as one of those is refused
    with UnsafeFile (exit 2, one line) before anything is read or replaced; an index
    as one of those is ignored (it is a cache).
    """

    def __init__(
        self,
        state_dir: Path,
        lock_timeout: float,
        on_warning: Callable[[str], None],
        clock: Callable[[], datetime],
        lock_holder: Callable[[Path], str | None] | None = None,
        *,
        alarm_wait: bool = False,
    ) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LEDGER_NAME
        self.lock_path = state_dir / f"{LEDGER_NAME}.lock"
        # Per user: only an index this user wrote, and nobody else can have, is believed.
        self.index_path = (
            state_dir / f"{LEDGER_NAME}.index-{os.geteuid()}" if hasattr(os, "geteuid") else None
        )
        self.lock_timeout = lock_timeout
        self._warn = on_warning
        self._clock = clock
        self._lock_holder = lock_holder  # the host's: the ledger asks nothing of the world
        self._known: dict[int, tuple[Lease, Any]] = {}
        # The last load left leases out: the next transaction writes the file back.
        self.dirty = False
        # The file as last loaded or saved (its stat key) and the state in it.
        self._cached: tuple[tuple[int, ...], LedgerState] | None = None
        self._file_lock: filelock.FileLock | None = None
        self._lock_pid = 0
        # A command-line process (one command, on its main thread): it waits for the
        # lock in the kernel, its wait bounded by SIGALRM (_hold_in_kernel).
        self.alarm_wait = alarm_wait
        self._kernel_holds = 0  # nested locked() in that process: held once, as filelock
        self._ahead: Ahead | None = None  # the next save's file, begun (write_ahead)

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
            raise _failed(self.path, "cannot create state directory", exc) from None

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

    def ready_to_write(self) -> None:
        """Import what a locked load and a save use (the index, the encoder), before the
        lock is taken; the read path, which never locks, imports neither."""
        import portalloc.ledger.encoder
        import portalloc.ledger.index  # noqa: F401

    def locked(self) -> AbstractContextManager[None]:
        """Hold the ledger's lock; raise LockTimeout past the configured timeout."""
        from contextlib import contextmanager  # not on the read path, which never locks

        return contextmanager(self._hold)()

    def _hold(self) -> Iterator[None]:
        self._ensure_dir()
        # filelock opens the lock file itself (O_NOFOLLOW | O_NONBLOCK from 4.x on) and
        # would lock a FIFO planted there: look first, and refuse anything not a file.
        lstat_regular(self.lock_path, "lock it")
        if self._kernel_holds or (self.alarm_wait and _alarm_is_free()):
            yield from self._hold_in_kernel()
            return
        import filelock

        lock = self._lock()
        try:
            self._acquire(lock)
        except filelock.Timeout:
            raise LockTimeout(self.lock_path, self.lock_timeout, self._holder()) from None
        except OSError as exc:
            raise _failed(self.lock_path, "cannot lock", exc) from None
        try:
            yield
        finally:
            lock.release()

    def _hold_in_kernel(self) -> Iterator[None]:
        """The lock as a command-line process takes it: the same flock(2) on the same
        file as filelock's FileLock (so each excludes the other), waited for in the
        kernel and bounded by SIGALRM instead of polled.

        With 200 commands starting at once on two cores, polling is what loses: each
        poll is CPU the holder does not get, the holder's few milliseconds of work
        stretch over many rounds of the scheduler, and the longest waiters, polling
        least often, pass the timeout (bench/README.md). A waiter asleep in flock(2)
        costs nothing and is woken by the release itself. Importing filelock, about
        25 ms of start-up that every one of the 200 pays, is not needed for it either.
        SIGALRM is free here: the CLI sets no timer of its own, and the previous
        handler is put back; where either is in use (an embedder's, pytest-timeout's),
        or off the main thread, filelock waits instead (_alarm_is_free)."""
        import fcntl

        if self._kernel_holds:  # already held by this process, one thread: held again
            self._kernel_holds += 1
            try:
                yield
            finally:
                self._kernel_holds -= 1
            return
        end = time.monotonic() + self.lock_timeout
        while True:
            try:
                fd = open_lock(self.lock_path, self._file_mode())
            except OSError as exc:
                raise _failed(self.lock_path, "cannot lock", exc) from None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._wait_in_kernel(fd, end)
                if self._lock_is_the_file(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            # The lock file was removed or replaced while this process waited for it:
            # its flock excludes nobody who opens the path now. As filelock does, open
            # the path again and take that.
            os.close(fd)
        self._kernel_holds = 1
        try:
            yield
        finally:
            self._kernel_holds = 0
            os.close(fd)  # closing the descriptor releases its flock

    def _lock_is_the_file(self, fd: int) -> bool:
        """Whether the file FD has locked is the one at the lock path now."""
        try:
            held, there = os.fstat(fd), os.lstat(self.lock_path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _failed(self.lock_path, "cannot lock", exc) from None
        return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)

    def _wait_in_kernel(self, fd: int, end: float) -> None:
        """Wait for the flock of FD until the monotonic time END; LockTimeout after."""
        import signal

        def deadline(_signum: int, _frame: object) -> None:
            raise _Deadline

        previous = signal.signal(signal.SIGALRM, deadline)
        try:
            locked = _flock_until(fd, end)
        except OSError as exc:
            raise _failed(self.lock_path, "cannot lock", exc) from None
        finally:
            signal.signal(signal.SIGALRM, previous)
        if not locked:
            raise LockTimeout(self.lock_path, self.lock_timeout, self._holder())

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
        return None if self._lock_holder is None else self._lock_holder(self.lock_path)

    def _file_key(self) -> tuple[int, ...] | None:
        try:
            st = os.lstat(self.path)  # a symlink has its own key; _load refuses it
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _failed(self.path, "cannot read", exc) from None
        from portalloc.ledger.index import _stat_key

        return _stat_key(st)

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
        # The index and the encoder are a write's (and a locked load's): the read path,
        # which imports this module for its reads without the lock, needs neither.
        from portalloc.ledger.index import _own

        fd: int | None = None
        try:
            fd, info = open_regular(self.path, follow=False)
            # This user's own file, named by its stat in its index: read only what is
            # needed, from the descriptor the state keeps (see _Written).
            if self.index_path is not None and _own(info):
                indexed = self._load_indexed(info, fd=fd)
                if indexed is not None:
                    fd = None  # the state's now
                    self._known = {}
                    self.dirty = False
                    return indexed
            data = read_open(fd, info, self.path)
        except UnsafeFile as exc:
            if exc.kind != "a symlink":
                raise
            raise UnsafeFile(
                self.path, f"{exc.reason} (set PORTALLOC_STATE_DIR to its target's directory)"
            ) from None
        except FileNotFoundError:
            return LedgerState()
        except OSError as exc:
            raise _failed(self.path, "cannot read", exc) from None
        finally:
            if fd is not None:
                os.close(fd)
        indexed = None if _own(info) else self._load_indexed(info, data=data)
        if indexed is not None:
            self._known = {}
            self.dirty = False
            return indexed
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._quarantine(f"not JSON: {exc}")
        except RecursionError:
            return self._quarantine("not JSON a program can use: nested too deeply")
        try:
            parsed = parse_document(document)
            state, self._known, dropped = parsed.state, parsed.known, parsed.dropped
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
            target = self._copy_aside(data)
            self._warn(
                f"ledger {self.path}: left out {len(dropped)} unusable lease(s) "
                f"({dropped[0]}); copied the file to {target}; the other leases carry on"
            )
        return state

    def _load_indexed(
        self, info: os.stat_result, *, data: bytes | None = None, fd: int | None = None
    ) -> LedgerState | None:
        """The state in the file (as INFO; its bytes DATA, or open as FD), parsing only the
        end of it, if it is exactly what save() last wrote here for this user (its index
        says so); else None. With FD, the state keeps it (closed with the state)."""
        from portalloc.ledger.index import _Homes, _IndexedLeases, _seal, _Written

        if self.index_path is None:
            return None
        index = self._read_index(_seal([] if data is None else [data], info))
        if index is None or not index.files_at < info.st_size:
            return None
        try:
            # `,"files":{...},"slugs":{...},"crc32":"..."}` at the end of the file.
            if data is not None:
                end = data[index.files_at + 1 :]
            elif fd is not None:
                end = FileRange(fd, index.files_at + 1, info.st_size - index.files_at - 1).read()
            else:
                return None
            tail = json.loads(b"{" + end)
            files = _files_from_raw(tail["files"])
            slugs = _slugs_from_raw(tail["slugs"])
        except (ValueError, KeyError, TypeError, RecursionError, OSError, _Malformed):
            return None
        key = None if data is not None else file_key(info)
        written = _Written(index, data=data, fd=fd, key=key, distrust=self._distrust)
        homes = _Homes(index.home_ids, index.home_starts)
        return LedgerState(_IndexedLeases(written), homes, files, slugs)

    def _distrust(self, reason: str) -> LedgerError:
        """The error for a file its index does not describe (changed in place since it was
        loaded, or an index made by hand): the index goes, the next command reads the
        file whole, and this one stops with nothing written."""
        if self.index_path is not None:
            discard(self.index_path)
        self._cached = None
        return LedgerError(self.path, f"{reason}; removed the index, run the command again")

    def _read_index(self, seal: bytes) -> _Index | None:
        if self.index_path is None:
            return None
        try:
            # A FIFO or symlink planted in a shared state dir: no index, never a hang.
            blob, info = read_with_stat(self.index_path, follow=False)
        except (OSError, UnsafeFile):
            return None
        from portalloc.ledger.index import _own, parse_index

        # Written by this user and writable by nobody else: in a shared state dir
        # another user could otherwise vouch for a ledger of theirs.
        if not _own(info):
            return None

        return parse_index(blob, seal)

    def _index_packed(self, index: _Index) -> list[bytes] | None:
        """Run while the ledger file syncs to disk (a disk's wait, not CPU): the old
        index goes, and the bytes of the new one but its seal are made; None when no
        index is kept."""
        if self.index_path is None:
            return None
        # The old index is removed first and the new one renamed to a free name: a
        # rename over a file has ext4 (auto_da_alloc) allocate and write out the new
        # one's blocks, 0.9 MiB of cache at 10,000 leases on every write, while an index
        # the next write replaces within seconds never has to reach the disk. A symlink
        # or FIFO at this user's index name goes too, never written through (a directory
        # stays, and there is no index). It goes before the ledger file is replaced: a
        # crash in between costs the next load a whole parse, nothing else.
        discard(self.index_path)
        if len(index.ids) < INDEX_MIN_LEASES:
            return None  # and one left from when the ledger was larger is gone
        from portalloc.ledger.index import pack_index

        try:
            return pack_index(index)
        except MemoryError:  # a cache: the ledger is written all the same, with no index
            return None

    def _write_index(self, payload: list[Chunk], packed: list[bytes] | None) -> None:
        """Vouch for PAYLOAD, just written, with its index, PACKED (a cache: on any
        failure the next load parses the whole file)."""
        if self.index_path is None or packed is None:
            return
        from portalloc.ledger.index import _seal, sealed_index

        try:
            content = sealed_index(packed, _seal(payload, self.path.stat()))
            atomic_write(self.index_path, content, 0o600, durable=False)
        except (OSError, UnsafeFile):
            discard(self.index_path)

    def _corrupt_name(self) -> Path:
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        counter = 1
        while os.path.lexists(target):  # a dangling symlink there is taken too
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{counter}")
            counter += 1
        return target

    def _copy_aside(self, data: bytes) -> Path:
        """Keep DATA, the file as read, beside it."""
        target = self._corrupt_name()
        try:
            atomic_write(target, data, self._file_mode())
        except (OSError, UnsafeFile) as exc:
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

    def write_ahead(self, state: LedgerState) -> None:
        """Under the lock, with a save of STATE plus a lease to come (a new session's):
        begin its file, the leases of the file as they are written and synced to a temp
        file on a thread while the caller decides (a large ledger's, read from the file
        and unchanged since; the next save finishes it if it keeps those leases, else,
        like drop_ahead(), removes it)."""
        from portalloc.ledger.index import _IndexedLeases

        if self._ahead is not None or not isinstance(state.leases, _IndexedLeases):
            return
        head = state.leases.head()
        if head is None or sum(map(len, head)) < AHEAD_MIN_BYTES:
            return
        try:
            self._ahead = Ahead(self.path, head, self._file_mode())
        except (OSError, UnsafeFile):
            return  # the save writes the whole file, and says what fails

    def drop_ahead(self) -> None:
        """Remove a file write_ahead() began that no save finished (before the lock is
        released: every temp file found under the lock is a dead writer's)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.drop()

    def save(self, state: LedgerState) -> None:
        """Validate, then write atomically and durably. Call only while holding the lock."""
        from portalloc.ledger.encoder import encode
        from portalloc.ledger.index import _IndexedLeases

        leases = state.leases
        if isinstance(leases, _IndexedLeases):
            # The leases save() wrote and indexed were checked then: only the changes now.
            refuse_unloadable(leases.fresh(), self._known)
            leases.validate_changes()
        else:
            refuse_unloadable(leases.values(), self._known)
            validate(state)
        payload, index = encode(state, self._known)
        ahead, self._ahead = self._ahead, None
        self._remove_stale_temps(None if ahead is None else ahead.name)
        self._cached = None
        packed: list[list[bytes] | None] = [None]

        def meanwhile() -> None:
            packed[0] = self._index_packed(index)

        try:
            atomic_write(self.path, payload, self._file_mode(), meanwhile=meanwhile, ahead=ahead)
        except OSError as exc:
            raise _failed(self.path, "cannot write", exc) from None
        self.dirty = False
        self._write_index(payload, packed[0])
        key = self._file_key()
        # A long-lived process goes on from the state it saved, unless it has drifted
        # far from the file it was read from: then from the new file, through its index.
        drifted = isinstance(state.leases, _IndexedLeases) and state.leases.changes() > 64
        if key is not None and not drifted:
            self._cached = (key, state)

    def _remove_stale_temps(self, mine: str | None = None) -> None:
        # Every writer holds the lock while its temp file exists, so under the lock any
        # temp file found (but the one named MINE, begun by write_ahead) is the remains
        # of a writer that was killed mid-write.
        try:
            with os.scandir(self.state_dir) as entries:
                stale = [
                    entry.path
                    for entry in entries
                    if entry.name != mine
                    and (
                        is_temp_name(entry.name, self.path)
                        or (
                            self.index_path is not None
                            and is_temp_name(entry.name, self.index_path)
                        )
                    )
                ]
        except OSError:
            return
        for path in stale:
            discard(path)


# --- the reads without the lock ---------------------------------------------------------
# The file is only ever replaced whole (fs.atomic_write), so a reader that takes no lock
# sees one version of it or the next, never a torn one.

_TRAILER = len(_CRC_KEY) + 10  # the key, 8 hex digits, `"}`
# The read path goes through the file in pieces of this size, one buffer reused: a
# fresh bytes object of a 5 MiB ledger costs more in page faults than the scan itself
# (bench/README.md, "env S at 10,000 leases").
_CHUNK = 1 << 16


def _expected_crc(trailer: bytes) -> int | None:
    """The CRC-32 a file save() wrote ends with (TRAILER: its last _TRAILER bytes)."""
    if len(trailer) != _TRAILER or not trailer.startswith(_CRC_KEY) or trailer[-2:] != b'"}':
        return None
    try:
        return int(trailer[-10:-2], 16)
    except ValueError:
        return None


def _find_once(fd: int, size: int, needle: bytes) -> int | None:
    """Where NEEDLE starts in the file FD (SIZE bytes), if the file is one save() wrote,
    unchanged since (its CRC-32 says so), and holds NEEDLE exactly once; else None."""
    body = size - _TRAILER  # everything the CRC covers, bar the `}` it ends with
    expected = _expected_crc(os.pread(fd, _TRAILER, body)) if body > 0 else None
    if expected is None or os.pread(fd, len(_PREFIX), 0) != _PREFIX.encode():
        return None
    # A needle may straddle two pieces: the last KEEP bytes of one are carried to the
    # front of the buffer, before the next is read in behind them.
    keep = len(needle) - 1
    buffer = bytearray(keep + _CHUNK)
    view = memoryview(buffer)
    crc, done, carried, found = 0, 0, 0, None
    while done < body:
        count = os.readv(fd, [view[keep : keep + min(_CHUNK, body - done)]])
        if count == 0:
            return None  # shorter than it said: cut since
        crc = zlib.crc32(view[keep : keep + count], crc)
        end = keep + count
        at = buffer.find(needle, keep - carried, end)
        while at >= 0:
            if found is not None:
                return None  # twice: the locked path decides
            found = done + at - keep
            at = buffer.find(needle, at + 1, end)
        carried = min(keep, carried + count)
        buffer[keep - carried : keep] = buffer[end - carried : end]
        done += count
    if zlib.crc32(b"}", crc) != expected:
        return None
    return found


def read_lease(path: Path | str, session_id: str) -> Lease | None:
    """The session's lease as last written, read without the lock (the file is only ever
    replaced whole), decoding that lease alone; None when unsure, for the locked path.

    Only a file save() wrote, unchanged since (its CRC-32 says so), qualifies. In such
    a file every lease holds only the keys save() writes, the others being objects of
    integers and strings, and inside JSON strings every `"` is escaped: so
    `{"session_id":<id>,` starts that session's lease in the leases list and nothing
    else. Anything else is left to the locked path, which checks the whole document
    (and refuses a ledger that is a symlink, a FIFO or a device).
    """
    needle = (_LEASE_START + json.dumps(session_id, ensure_ascii=False) + ",").encode("utf-8")
    try:
        fd, info = open_regular(path, follow=False)
    except (OSError, UnsafeFile):
        return None
    try:
        if info.st_size > MAX_READ:
            return None
        start = _find_once(fd, info.st_size, needle)
        if start is None:
            return None
        # From the same descriptor, so from the same file whatever replaced it since:
        # the lease on, as far as a lease can reach (a 4096-character id and its
        # variables fit many times over); a lease cut off there fails to parse and goes
        # the locked way.
        window = os.pread(fd, _LEASE_WINDOW, start)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        # final=False: a character cut at the window's end is left out, not an error;
        # a byte that is not UTF-8 anywhere else still is one.
        text, _used = codecs.utf_8_decode(window, "strict", False)
        raw, _end = json.JSONDecoder().raw_decode(text)
        lease = lease_from_raw(raw)
    except (ValueError, RecursionError, _Malformed):
        return None
    return lease if lease.session_id == session_id else None


def read_every_lease(path: Path | str) -> list[Lease] | None:
    """Every lease the file at PATH holds, as the locked load parses them (migrated, each
    held to the lease rules, the unusable left out), read without the lock; None when
    there is no file it can read (a FIFO or symlink at its name is refused unread)."""
    try:
        document = json.loads(read_bytes(path, follow=False))
        parsed = parse_document(document)
    except Exception:  # unreadable, not JSON, a newer version, not the ledger's shape
        return None
    return list(parsed.state.leases.values())

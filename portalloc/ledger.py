"""The ledger's store: the lock, load (migrations, validation, the per-user index of a
large file), save (encoded and written by fs.atomic_write), quarantine. The file's bytes
(raw shapes, lease rules, the CRC, the lock-free read) are codec.py's."""

from __future__ import annotations

import json
import marshal
import os
import stat
import sys
import time
import zlib
from array import array
from bisect import bisect_right
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableSequence,
    ValuesView,
)
from datetime import UTC, datetime
from itertools import chain, compress, islice
from operator import eq

# The ledger's bytes: codec.py, all the read path imports. dump and read_lease are
# re-exported for the modules and tests that ask ledger.py for them.
from portalloc.codec import (
    _CRC_KEY,
    _LEASE_ORDER,
    _NEXT_LEASE,
    _PREFIX,
    DOCUMENT_KEYS,
    RawFile,
    RawLease,
    _all_typed,
    _json,
    _Malformed,
    lease_from_raw,
    lease_to_raw,
)
from portalloc.codec import LEDGER_VERSION as LEDGER_VERSION
from portalloc.codec import dump as dump
from portalloc.codec import read_lease as read_lease
from portalloc.config import LEDGER_NAME
from portalloc.errors import InvalidSessionId, LeaseRefused, LedgerError, LockTimeout
from portalloc.fs import Chunk, UnsafeFile, lstat_regular, read_with_stat

# Re-exported until every module imports them from portalloc.fs.
from portalloc.fs import atomic_write as atomic_write
from portalloc.fs import is_temp_name as is_temp_name
from portalloc.fs import temp_name as temp_name
from portalloc.models import Lease, Leases, LedgerState

# Not typing's: `allocate` imports this module, and start-up is its budget too.
from portalloc.records import NamedTuple
from portalloc.rules import (
    DNS_LABEL,
    has_unprintable,
    lease_problem,
    slug_for,
    validate_session_id,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path
    from typing import Any

    import filelock

# Short: under contention filelock's default 50 ms poll is mostly idle waiting.
LOCK_POLL_SECONDS = 0.002
# ... and then back off, with jitter, up to this.
LOCK_POLL_CAP_SECONDS = 0.1


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


def _v2_to_v3(document: dict[str, Any]) -> dict[str, Any]:
    # v3 gives every lease a name (its slug, unique among the leases, in file order)
    # and no bare name. What is not a lease is left for the load to refuse.
    leases = document.get("leases")
    if isinstance(leases, list):
        taken: set[str] = set()
        named: list[object] = []
        for raw in leases:
            if type(raw) is dict and type(raw.get("session_id")) is str and "slug" not in raw:
                worktree = raw.get("worktree")
                slug = slug_for(
                    raw["session_id"], worktree if type(worktree) is str else None, taken
                )
                taken.add(slug)
                raw = {**raw, "slug": slug, "bare": None}
            named.append(raw)
        leases = named
    return {**document, "version": 3, "leases": leases}


def _v3_to_v4(document: dict[str, Any]) -> dict[str, Any]:
    # v4 remembers the slug of each session whose lease ended, as v2 its home block.
    return {**document, "version": 4, "slugs": {}}


# version -> function turning that version's document into the next version's.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
}


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


def validate(state: LedgerState) -> None:
    """Refuse to write a ledger that breaks an invariant (overlapping spans, bad ports)."""
    if isinstance(state.leases, _IndexedLeases):
        # The leases save() wrote and indexed were checked then: only the changes now.
        state.leases.validate_changes()
        return
    starts, ends, keys = state.leases.sorted_spans()
    previous_end, previous_id = 0, ""
    for start, end, session_id in zip(starts, ends, keys, strict=True):
        if start <= previous_end:
            raise AssertionError(f"leases {previous_id!r} and {session_id!r} overlap")
        _check_written(session_id, state.leases[session_id])
        previous_end, previous_id = end, session_id


def refuse_unloadable(state: LedgerState, known: Mapping[int, tuple[Lease, Any]]) -> None:
    """Raise LeaseRefused for a lease made since the file was read that the load rules
    would refuse. Leases read from the file (KNOWN, by identity) passed them then: only
    the others are checked, so a write costs the same at ten thousand leases."""
    leases = state.leases
    fresh = leases._fresh() if isinstance(leases, _IndexedLeases) else leases.values()
    for lease in fresh:
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


# The index: what save() knew of each lease of the file it wrote, kept beside the file
# for the user who wrote it. With it a write at ten thousand leases parses only the
# leases it touches and copies the others into the new file as the bytes they were.
_INDEX_MAGIC = b"portalloc-index 3 python %d.%d marshal %d %s\n" % (
    *sys.version_info[:2],
    marshal.version,
    sys.byteorder.encode(),  # the integer columns are machine words
)
_DIGEST_SIZE = 32  # SHA-256
# Below this many leases a full parse costs less than keeping an index (under 1 ms
# either way): a server writing a small ledger hundreds of times a second keeps none.
INDEX_MIN_LEASES = 64


class _Index(NamedTuple):
    """Each lease of a file save() wrote, in file order, as columns."""

    ids: list[str]
    # Integer columns: lists as save() builds them, arrays as read back (see _words).
    starts: MutableSequence[int]
    ends: MutableSequence[int]
    names: list[str]  # compose project names
    due: MutableSequence[int]  # a reclaim looks at the lease from this epoch second on (0: always)
    bounds: MutableSequence[int]  # lease i is file[bounds[2 * i] : bounds[2 * i + 1]]
    leases_end: int  # where the `]` closing the leases list sits
    homes: dict[str, int]  # as in the file, from leases_end + len(_HOMES) on
    files_at: int  # where `,"files":` starts
    slugs: list[str]  # each lease's slug, '' for none


# The index's columns as a few long strings rather than lists of ten thousand objects:
# marshal writes and reads those one object at a time, which cost a write at 10,000
# leases about 10 ms more (bench/README.md). Session ids, compose names and slugs never
# hold a NUL (the lease rules refuse control characters), so NUL separates them.
_SEP = "\0"


def _words(values: Iterable[int]) -> bytes:
    return array("q", values).tobytes()


def _from_words(data: bytes) -> array[int]:
    column = array("q")
    column.frombytes(data)  # not tolist(): 10,000 ints a column, 2 ms at 10,000 leases
    return column


def _joined(texts: Iterable[str]) -> str:
    return _SEP.join(texts)


def _split(text: str, count: int) -> list[str]:
    return text.split(_SEP) if count else []


def _pack_index(index: _Index) -> tuple[int | str | bytes, ...]:
    return (
        len(index.ids),
        _joined(index.ids),
        _words(index.starts),
        _words(index.ends),
        _joined(index.names),
        _words(index.due),
        _words(index.bounds),
        index.leases_end,
        len(index.homes),
        _joined(index.homes),
        _words(list(index.homes.values())),
        index.files_at,
        _joined(index.slugs),
    )


def _unpack_index(packed: object) -> _Index:
    """The index _pack_index() made; ValueError or TypeError for anything else."""
    if type(packed) is not tuple or len(packed) != 13:
        raise ValueError("not an index")
    count, ids, starts, ends, names, due, bounds, leases_end, homes_count, homes, home_starts = (
        packed[:11]
    )
    files_at, slugs = packed[11:]
    texts, words = (ids, names, homes, slugs), (starts, ends, due, bounds, home_starts)
    if not all(type(column) is str for column in texts) or not all(
        type(column) is bytes for column in words
    ):
        raise TypeError("columns")
    if not all(type(number) is int for number in (count, homes_count, leases_end, files_at)):
        raise TypeError("counts")
    home_ids = _split(homes, homes_count)
    home_blocks = _from_words(home_starts)
    if len(home_ids) != homes_count or len(home_blocks) != homes_count:
        raise ValueError("homes")
    return _Index(
        _split(ids, count),
        _from_words(starts),
        _from_words(ends),
        _split(names, count),
        _from_words(due),
        _from_words(bounds),
        leases_end,
        dict(zip(home_ids, home_blocks, strict=True)),
        files_at,
        _split(slugs, count),
    )


def _stat_key(info: os.stat_result) -> tuple[int, ...]:
    # Every save replaces the file (a new inode); mtime, ctime and size on top.
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _seal(data: Iterable[Chunk], info: os.stat_result) -> bytes:
    """What names the ledger file of the bytes DATA (as INFO) in the index that vouches
    for it.

    A file only this user can write changes only by a write of theirs, which gives it
    a new stat key (inode, size, mtime, ctime): the key names it. A file others may
    write (a shared state dir) is named by its SHA-256: whatever they write, and when,
    the index then vouches for nothing else than the bytes save() wrote.
    """
    import hashlib

    private = info.st_uid == os.geteuid() and not info.st_mode & 0o077
    if private:
        return hashlib.sha256(b"stat %d %d %d %d %d" % _stat_key(info)).digest()
    digest = hashlib.sha256()
    for part in data:
        digest.update(part)
    return digest.digest()


def _due_second(lease: Lease) -> int:
    # The expiry as the file holds it (whole seconds): what a later load compares.
    return 0 if lease.anchored else int(lease.expires_at.timestamp())


class _Written:
    """A ledger file save() wrote and its index; each lease parsed when first asked for."""

    __slots__ = ("_names", "_parsed", "_positions", "_spans", "data", "index")

    def __init__(self, data: bytes, index: _Index) -> None:
        self.data = data
        self.index = index
        self._positions: dict[str, int] | None = None
        self._parsed: dict[int, Lease] = {}
        self._spans: tuple[list[int], list[int], list[int]] | None = None
        self._names: set[str] | None = None

    def positions(self) -> dict[str, int]:
        if self._positions is None:
            self._positions = dict(zip(self.index.ids, range(len(self.index.ids)), strict=True))
        return self._positions

    def lease(self, position: int) -> Lease:
        lease = self._parsed.get(position)
        if lease is None:
            bounds = self.index.bounds
            text = self.data[bounds[2 * position] : bounds[2 * position + 1]]
            # Checked by the same rules as every lease read in full: it may be printed.
            lease = lease_from_raw(json.loads(text))
            if lease.session_id != self.index.ids[position]:
                raise AssertionError(f"the ledger index does not match lease {position}")
            self._parsed[position] = lease
        return lease

    def sorted_spans(self) -> tuple[list[int], list[int], list[int]]:
        """Starts, ends and positions of the file's leases, lowest start first."""
        if self._spans is None:
            starts = self.index.starts
            # map() and C-level getters: no Python-level step per lease.
            order = sorted(range(len(starts)), key=starts.__getitem__)
            self._spans = (
                list(map(starts.__getitem__, order)),
                list(map(self.index.ends.__getitem__, order)),
                order,
            )
        return self._spans

    def names(self) -> set[str]:
        if self._names is None:
            self._names = set(self.index.names)
        return self._names


class _IndexedLeases(Leases):
    """The leases of a file save() wrote, with the changes made since: the file's own
    are parsed only when asked for, and written back as the bytes they were."""

    __slots__ = ("_added", "_file", "_removed", "_replaced")

    def __init__(
        self,
        written: _Written,
        replaced: dict[str, Lease] | None = None,
        removed: set[str] | None = None,
        added: dict[str, Lease] | None = None,
    ) -> None:
        super().__init__()
        self._file = written
        self._replaced = replaced or {}  # leases of the file, changed in place
        self._removed = removed or set()  # leases of the file, gone
        self._added = added or {}  # the others, after the file's, in order

    def _in_file(self, session_id: object) -> bool:
        return session_id in self._file.positions() and session_id not in self._removed

    def __getitem__(self, session_id: str) -> Lease:
        lease = self._added.get(session_id) or self._replaced.get(session_id)
        if lease is not None:
            return lease
        if session_id in self._removed:
            raise KeyError(session_id)
        return self._file.lease(self._file.positions()[session_id])

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._added or self._in_file(session_id)

    def __iter__(self) -> Iterator[str]:
        ids: Iterable[str] = self._file.index.ids
        if self._removed:
            ids = (key for key in ids if key not in self._removed)
        return chain(ids, self._added)

    def __len__(self) -> int:
        return len(self._file.index.ids) - len(self._removed) + len(self._added)

    def keys(self) -> KeysView[str]:
        return KeysView(self)

    def values(self) -> ValuesView[Lease]:
        return ValuesView(self)

    def items(self) -> ItemsView[str, Lease]:
        return ItemsView(self)

    def _touched(self) -> set[int]:
        """Positions in the file of the leases changed or gone since."""
        if not (self._replaced or self._removed):
            return set()
        positions = self._file.positions()
        return {positions[key] for key in (*self._replaced, *self._removed)}

    def _fresh(self) -> list[Lease]:
        return [*self._replaced.values(), *self._added.values()]

    def sorted_spans(self) -> tuple[list[int], list[int], list[str]]:
        if self._spans is None:
            starts, ends, order = self._file.sorted_spans()
            keys = list(map(self._file.index.ids.__getitem__, order))
            touched = self._touched()
            if touched:
                kept = [position not in touched for position in order]
                starts, ends = list(compress(starts, kept)), list(compress(ends, kept))
                keys = list(compress(keys, kept))
            elif self._added:
                starts, ends = list(starts), list(ends)
            for lease in self._fresh():
                index = bisect_right(starts, lease.start)
                starts.insert(index, lease.start)
                ends.insert(index, lease.end)
                keys.insert(index, lease.session_id)
            self._spans = (starts, ends, keys)
        return self._spans

    def compose_names(self) -> set[str]:
        if not (self._replaced or self._removed or self._added):
            return set(self._file.names())
        names = self._file.index.names
        touched = self._touched()
        if touched:
            kept = {name for position, name in enumerate(names) if position not in touched}
        else:  # in C: an allocation at 10,000 leases touches none of the file's
            kept = set(self._file.names())
        return kept | {lease.compose_project_name for lease in self._fresh()}

    def slugs(self) -> set[str]:
        slugs = self._file.index.slugs
        touched = self._touched()
        if touched:
            kept = {slug for position, slug in enumerate(slugs) if slug and position not in touched}
        else:
            kept = set(slugs)
            kept.discard("")
        return kept | {lease.slug for lease in self._fresh() if lease.slug is not None}

    def due(self, now: datetime) -> list[Lease]:
        # The index says from when each lease of the file can be due: only those are
        # parsed (a second early, so a rounding never hides one), then asked exactly,
        # with every lease changed since, in table order.
        moment = now.timestamp() + 1
        due_at = self._file.index.due
        positions = set(self._touched())
        if min(due_at, default=0) <= moment:
            positions.update(at for at, second in enumerate(due_at) if second <= moment)
        ids = self._file.index.ids
        candidates = [
            self[ids[position]] for position in sorted(positions) if self._in_file(ids[position])
        ]
        candidates.extend(self._added.values())
        return [lease for lease in candidates if lease.due(now)]

    def changes(self) -> int:
        """How many leases differ from the file's."""
        return len(self._replaced) + len(self._removed) + len(self._added)

    def changed_since(self, earlier: Leases) -> list[str] | None:
        # Both made from one file: only the leases either changed since can differ.
        if not isinstance(earlier, _IndexedLeases) or earlier._file is not self._file:
            return None
        keys = {*self._replaced, *self._removed, *self._added}
        keys.update(earlier._replaced, earlier._removed, earlier._added)
        return [key for key in keys if earlier.get(key) is not self.get(key)]

    def updated(self, changes: Mapping[str, Lease | None]) -> Leases:
        replaced, removed, added = dict(self._replaced), set(self._removed), dict(self._added)
        for key, lease in changes.items():
            # As a dict does it: a lease of the file replaced stays in place; a lease
            # removed and made again goes to the end.
            if lease is None:
                if added.pop(key, None) is None and self._in_file(key):
                    removed.add(key)
                    replaced.pop(key, None)
            elif key in added or not self._in_file(key):
                added[key] = lease
            else:
                replaced[key] = lease
        return _IndexedLeases(self._file, replaced, removed, added)

    def validate_changes(self) -> None:
        """Refuse what validate() refuses, looking only at the leases changed or added
        since the file was written (it was checked whole then)."""
        starts, ends, order = self._file.sorted_spans()
        touched = self._touched()
        ids = self._file.index.ids
        fresh = sorted(self._fresh(), key=lambda lease: lease.start)
        previous: Lease | None = None
        for lease in fresh:
            _check_written(lease.session_id, lease)
            if previous is not None and lease.start <= previous.end:
                raise AssertionError(
                    f"leases {previous.session_id!r} and {lease.session_id!r} overlap"
                )
            index = bisect_right(starts, lease.end) - 1
            while index >= 0 and ends[index] >= lease.start:
                if order[index] not in touched:
                    raise AssertionError(
                        f"leases {ids[order[index]]!r} and {lease.session_id!r} overlap"
                    )
                index -= 1
            previous = lease

    def encode_into(self, out: _Encoder) -> _Written:
        """Add the leases to OUT, each run of unchanged ones as the bytes it was; return
        the file they come from."""
        previous = 0
        replaced_at = {self._file.positions()[key]: lease for key, lease in self._replaced.items()}
        for position in sorted(self._touched()):
            out.add_run(self._file, previous, position)
            if position in replaced_at:
                out.add(replaced_at[position])
            previous = position + 1
        out.add_run(self._file, previous, len(self._file.index.ids))
        for lease in self._added.values():
            out.add(lease)
        return self._file


class _Encoder:
    """The bytes save() writes, built lease by lease, with the index of them."""

    def __init__(self) -> None:
        # Views into the file read, not copies: at 5 MiB each copy shows in the bench.
        self.parts: list[bytes | memoryview] = [_PREFIX.encode()]
        self.offset = len(_PREFIX)
        self.index = _Index([], [], [], [], [], [], 0, {}, 0, [])

    def _place(self, text: bytes | memoryview) -> int:
        if len(self.parts) > 1:
            self.parts.append(b",")
            self.offset += 1
        start = self.offset
        self.parts.append(text)
        self.offset += len(text)
        return start

    def add(self, lease: Lease) -> None:
        text = _json(lease_to_raw(lease))
        start = self._place(text)
        index = self.index
        index.ids.append(lease.session_id)
        index.starts.append(lease.start)
        index.ends.append(lease.end)
        index.names.append(lease.compose_project_name)
        index.slugs.append(lease.slug or "")
        index.due.append(_due_second(lease))
        index.bounds.extend((start, start + len(text)))

    def add_all(self, leases: list[Lease], raws: list[RawLease]) -> None:
        """LEASES, each as its raw form RAWS (keys in save()'s order), encoded at once."""
        if not leases:
            return
        text = _json(raws)[1:-1]  # the list, without its brackets
        start = self._place(text)
        # Each lease is one `{"session_id":...}` object; its keys come in save()'s
        # order and the only objects inside a lease follow a `:` or are owners in a
        # `guests` list, so `,{"session_id":` marks where the next lease starts.
        bounds = self.index.bounds
        bounds.append(start)
        at = text.find(_NEXT_LEASE)
        while at >= 0:
            bounds.extend((start + at, start + at + 1))
            at = text.find(_NEXT_LEASE, at + 1)
        bounds.append(start + len(text))
        if len(bounds) != len(self.index.ids) * 2 + 2 * len(leases):
            raise AssertionError("leases are not where save() put them")
        index = self.index
        index.ids.extend([lease.session_id for lease in leases])
        index.starts.extend([lease.start for lease in leases])
        index.ends.extend([lease.end for lease in leases])
        index.names.extend([lease.compose_project_name for lease in leases])
        index.slugs.extend([lease.slug or "" for lease in leases])
        index.due.extend(map(_due_second, leases))

    def add_run(self, written: _Written, first: int, stop: int) -> None:
        """The file's leases at positions FIRST to STOP - 1, copied as they were."""
        if first >= stop:
            return
        source, bounds = written.index, written.index.bounds
        begin = bounds[2 * first]
        start = self._place(memoryview(written.data)[begin : bounds[2 * stop - 1]])
        shift = start - begin
        index = self.index
        index.ids.extend(source.ids[first:stop])
        index.starts.extend(source.starts[first:stop])
        index.ends.extend(source.ends[first:stop])
        index.names.extend(source.names[first:stop])
        index.slugs.extend(source.slugs[first:stop])
        index.due.extend(source.due[first:stop])
        if shift:
            index.bounds.extend([bound + shift for bound in bounds[2 * first : 2 * stop]])
        else:  # the leases before the run unchanged: they sit where they sat
            index.bounds.extend(bounds[2 * first : 2 * stop])

    def finish(self, state: LedgerState, written: _Written | None) -> tuple[list[Chunk], _Index]:
        files: dict[str, list[RawFile]] = {
            session_id: [{"kind": kind, "path": path} for kind, path in records]
            for session_id, records in state.files.items()
        }
        homes = _homes_text(state.homes, written)
        # Exactly what dump() makes of the whole document, a piece at a time, never
        # joined: five MiB copied once more shows in the bench.
        parts = self.parts
        parts += [_HOMES, homes, _FILES, _json(files), _SLUGS, _json(state.slugs)]
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        crc = zlib.crc32(b"}", crc)
        parts += [_CRC_KEY, b"%08x" % crc, b'"}']
        files_at = self.offset + len(_HOMES) + len(homes)
        return parts, self.index._replace(
            leases_end=self.offset, homes=state.homes, files_at=files_at
        )


_HOMES = b'],"homes":'
_SLUGS = b',"slugs":'
_FILES = b',"files":'


def _homes_text(homes: dict[str, int], written: _Written | None) -> bytes:
    """HOMES as JSON; as far as they are those of WRITTEN, the bytes it holds."""
    if written is None or not homes:
        return _json(homes)
    index = written.index
    text = written.data[index.leases_end + len(_HOMES) : index.files_at]
    old = index.homes
    if homes is old:
        return text
    # A grant forgets homes at the front (the least recent) and adds one at the end.
    first = next(iter(homes))
    dropped = next((at for at, key in enumerate(islice(old, 16)) if key == first), None)
    kept = len(old) - (dropped or 0)
    if dropped is None or kept > len(homes):
        return _json(homes)
    if not all(map(eq, islice(homes.items(), kept), islice(old.items(), dropped, None))):
        return _json(homes)
    if dropped:
        # `,"key":` is where that home starts: inside a JSON string `"` is escaped.
        text = b"{" + text[text.index(b"," + _json(first) + b":") + 1 :]
    added = dict(islice(homes.items(), kept, None))
    return text[:-1] + b"," + _json(added)[1:] if added else text


def encode(
    state: LedgerState, known: Mapping[int, tuple[Lease, Any]] | None = None
) -> tuple[list[Chunk], _Index]:
    """The bytes save() writes for STATE (what dump() makes of it), in pieces, and
    their index; KNOWN maps id(lease) to a lease and its raw form as loaded."""
    out = _Encoder()
    written: _Written | None = None
    if isinstance(state.leases, _IndexedLeases):
        written = state.leases.encode_into(out)
    else:
        known = known or {}
        leases = list(state.leases.values())
        raws: list[RawLease] = []
        for lease in leases:
            cached = known.get(id(lease))
            # Leases are immutable: the same object serialises as it was read, unless
            # it was read with its keys in another order than save() writes them.
            if cached is not None and cached[0] is lease and list(cached[1]) == _LEASE_ORDER:
                raws.append(cached[1])
            else:
                raws.append(lease_to_raw(lease))
        out.add_all(leases, raws)
    return out.finish(state, written)


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

    def locked(self) -> AbstractContextManager[None]:
        """Hold the ledger's lock; raise LockTimeout past the configured timeout."""
        # contextlib imported here: the read path imports this module and never locks.
        from contextlib import contextmanager

        return contextmanager(self._hold)()

    def _hold(self) -> Iterator[None]:
        import filelock

        self._ensure_dir()
        # filelock opens the lock file itself (O_NOFOLLOW | O_NONBLOCK from 4.x on) and
        # would lock a FIFO planted there: look first, and refuse anything not a file.
        lstat_regular(self.lock_path, "lock it")
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
        return None if self._lock_holder is None else self._lock_holder(self.lock_path)

    def _file_key(self) -> tuple[int, ...] | None:
        try:
            st = os.lstat(self.path)  # a symlink has its own key; _load refuses it
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerError(self.path, f"cannot read: {exc.strerror or exc}") from None
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
        try:
            data, info = read_with_stat(self.path, follow=False)
        except UnsafeFile as exc:
            if exc.kind != "a symlink":
                raise
            raise UnsafeFile(
                self.path, f"{exc.reason} (set PORTALLOC_STATE_DIR to its target's directory)"
            ) from None
        except FileNotFoundError:
            return LedgerState()
        except OSError as exc:
            raise LedgerError(self.path, f"cannot read: {exc.strerror or exc}") from None
        indexed = self._load_indexed(data, info)
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
            target = self._copy_aside(data)
            self._warn(
                f"ledger {self.path}: left out {len(dropped)} unusable lease(s) "
                f"({dropped[0]}); copied the file to {target}; the other leases carry on"
            )
        return state

    def _load_indexed(self, data: bytes, info: os.stat_result) -> LedgerState | None:
        """The state in DATA (the file, as INFO), parsing only the end of it, if it is
        exactly what save() last wrote here for this user (its index says so); else None."""
        if self.index_path is None:
            return None
        index = self._read_index(_seal([data], info))
        if index is None:
            return None
        try:
            # `,"files":{...},"slugs":{...},"crc32":"..."}` at the end of the file.
            tail = json.loads(b"{" + data[index.files_at + 1 :])
            files = _files_from_raw(tail["files"])
            slugs = _slugs_from_raw(tail["slugs"])
        except (ValueError, KeyError, TypeError, RecursionError, _Malformed):
            return None
        return LedgerState(_IndexedLeases(_Written(data, index)), index.homes, files, slugs)

    def _read_index(self, seal: bytes) -> _Index | None:
        if self.index_path is None:
            return None
        try:
            # A FIFO or symlink planted in a shared state dir: no index, never a hang.
            blob, info = read_with_stat(self.index_path, follow=False)
        except (OSError, UnsafeFile):
            return None
        # Written by this user and writable by nobody else: in a shared state dir
        # another user could otherwise vouch for a ledger of theirs.
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            return None
        import hashlib

        head = len(_INDEX_MAGIC)
        payload_digest = blob[head + _DIGEST_SIZE : head + 2 * _DIGEST_SIZE]  # of the index
        payload = blob[head + 2 * _DIGEST_SIZE :]
        if not blob.startswith(_INDEX_MAGIC) or blob[head : head + _DIGEST_SIZE] != seal:
            return None
        if hashlib.sha256(payload).digest() != payload_digest:
            return None
        try:
            # Bytes this user wrote (owner and mode checked above), whole (digest).
            index = _unpack_index(marshal.loads(payload))  # noqa: S302
        except (ValueError, TypeError, EOFError, UnicodeDecodeError):
            return None
        count = len(index.ids)
        columns = (*index[1:5], index.slugs)
        if not all(len(column) == count for column in columns) or len(index.bounds) != 2 * count:
            return None
        return index

    def _write_index(self, payload: list[Chunk], index: _Index) -> None:
        """Vouch for PAYLOAD, just written, with its index (a cache: on any failure the
        next load parses the whole file)."""
        if self.index_path is None:
            return
        if len(index.ids) < INDEX_MIN_LEASES:
            try:
                os.unlink(self.index_path)  # one left from when the ledger was larger
            except OSError:
                pass
            return
        import hashlib

        blob = marshal.dumps(_pack_index(index))
        try:
            content = b"".join(
                [
                    _INDEX_MAGIC,
                    _seal(payload, self.path.stat()),
                    hashlib.sha256(blob).digest(),
                    blob,
                ]
            )
            try:
                atomic_write(self.index_path, content, 0o600, durable=False)
            except UnsafeFile:
                # A symlink or FIFO at this user's index name: never written through,
                # removed (a directory stays, and there is no index).
                os.unlink(self.index_path)
                atomic_write(self.index_path, content, 0o600, durable=False)
        except (OSError, UnsafeFile):
            try:
                os.unlink(self.index_path)
            except OSError:
                pass

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

    def save(self, state: LedgerState) -> None:
        """Validate, then write atomically and durably. Call only while holding the lock."""
        refuse_unloadable(state, self._known)
        validate(state)
        payload, index = encode(state, self._known)
        self._remove_stale_temps()
        self._cached = None
        try:
            atomic_write(self.path, payload, self._file_mode())
        except OSError as exc:
            raise LedgerError(self.path, f"cannot write: {exc.strerror or exc}") from None
        self.dirty = False
        self._write_index(payload, index)
        key = self._file_key()
        # A long-lived process goes on from the state it saved, unless it has drifted
        # far from the file it was read from: then from the new file, through its index.
        drifted = isinstance(state.leases, _IndexedLeases) and state.leases.changes() > 64
        if key is not None and not drifted:
            self._cached = (key, state)

    def _remove_stale_temps(self) -> None:
        # Every writer holds the lock while its temp file exists, so under the lock any
        # temp file found is the remains of a writer that was killed mid-write.
        try:
            with os.scandir(self.state_dir) as entries:
                stale = [
                    entry.path
                    for entry in entries
                    if is_temp_name(entry.name, self.path)
                    or (self.index_path is not None and is_temp_name(entry.name, self.index_path))
                ]
        except OSError:
            return
        for path in stale:
            try:
                os.unlink(path)
            except OSError:
                pass

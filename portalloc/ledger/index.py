"""The per-user index of a large ledger: what save() knew of each lease of the file it
wrote, kept beside the file for the user who wrote it. With it a write at ten thousand
leases parses only the leases it touches (_IndexedLeases, the file's leases parsed
when asked for) and copies the others into the new file as the bytes they were
(encoder.py). The index file's bytes are made and checked here; store.py reads and
writes the file.
"""

from __future__ import annotations

import json
import marshal
import os
import sys
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
    ValuesView,
)
from collections.abc import Set as AbstractSet
from itertools import chain, compress

from portalloc.fs import Chunk, FileRange
from portalloc.ledger.codec import _PREFIX, _check_written, lease_from_raw
from portalloc.ledger.format import _Malformed
from portalloc.models import Homes, Lease, Leases

# Not typing's: `allocate` imports this module, and start-up is its budget too.
from portalloc.records import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from datetime import datetime
    from typing import TypeVar

    from portalloc.ledger.encoder import _Encoder

    _T = TypeVar("_T")

# An index file's first line: marshal's format and the columns' machine words differ
# between Pythons and machines, so only the kind that wrote an index reads it back.
_INDEX_MAGIC = b"portalloc-index 4 python %d.%d marshal %d %s\n" % (
    *sys.version_info[:2],
    marshal.version,
    sys.byteorder.encode(),  # the integer columns are machine words
)
_DIGEST_SIZE = 32  # SHA-256, of what names the ledger file (see _seal)
_CHECK_SIZE = 4  # a CRC-32 of the index's own bytes: a damaged cache is not believed
_PREFIX_CRC = zlib.crc32(_PREFIX.encode())


class _Index(NamedTuple):
    """Each lease of a file save() wrote, in file order, as columns."""

    ids: _Column
    # Integer columns: arrays, so a run of unchanged leases is copied by memcpy.
    starts: array[int]
    ends: array[int]
    names: _Column  # compose project names
    due: array[int]  # a reclaim looks at the lease from this epoch second on (0: always)
    bounds: array[int]  # lease i is file[bounds[2 * i] : bounds[2 * i + 1]]
    leases_end: int  # where the `]` closing the leases list sits
    # The homes as in the file (from leases_end + len(encoder._HOMES) on), in order.
    home_ids: _Column
    home_starts: array[int]
    files_at: int  # where `,"files":` starts
    slugs: _Column  # each lease's slug, '' for none
    prefix_crc: int  # the CRC-32 of the file up to leases_end: an append needs no more


# The index's columns as a few long strings rather than lists of ten thousand objects:
# marshal writes and reads those one object at a time, which cost a write at 10,000
# leases about 10 ms more (bench/README.md). Session ids, compose names and slugs never
# hold a NUL (the lease rules refuse control characters), so NUL separates them.
_SEP = "\0"


def _words(values: Iterable[int]) -> bytes:
    return (values if isinstance(values, array) else array("q", values)).tobytes()


def _from_words(data: bytes) -> array[int]:
    column = array("q")
    column.frombytes(data)  # not tolist(): 10,000 ints a column, 2 ms at 10,000 leases
    return column


def _joined(texts: Iterable[str]) -> str:
    return _SEP.join(texts)


def _split(text: str, count: int) -> list[str]:
    return text.split(_SEP) if count else []


class _Column:
    """A text column of the index (COUNT strings, NUL-separated in TEXT) as it was read
    or written: split into a list only when iterated or indexed. `positions` finds a
    value by searching the text in C, so a write at 10,000 leases that asks about a few
    of them splits none (a split of 10,000 strings a column showed in the bench)."""

    __slots__ = ("_items", "_padded", "count", "text")

    def __init__(self, text: str = "", count: int = 0) -> None:
        self.text = text
        self.count = count
        self._items: list[str] | None = None
        self._padded: str | None = None

    @classmethod
    def of(cls, items: list[str]) -> _Column:
        column = cls(_joined(items), len(items))
        column._items = items
        return column

    def items(self) -> list[str]:
        """The column as a list (split once; treat it as read-only)."""
        if self._items is None:
            self._items = _split(self.text, self.count)
        return self._items

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        return iter(self.items())

    def __getitem__(self, at: int) -> str:
        return self.items()[at]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Column):
            return NotImplemented
        return self.count == other.count and self.text == other.text

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"_Column({self.items()!r})"

    def positions(self, value: object) -> Iterator[int]:
        """Each position that holds VALUE, lowest first, found in the joined text."""
        if type(value) is not str or not self.count or _SEP in value:
            return
        if self._items is not None and self.count <= 8:
            yield from (at for at, item in enumerate(self._items) if item == value)
            return
        if self._padded is None:
            self._padded = _SEP + self.text + _SEP  # one copy: `find` needs no edge cases
        padded, needle = self._padded, _SEP + value + _SEP
        position, counted = 0, 0  # separators in padded[:counted] give the position
        at = padded.find(needle)
        while at >= 0:
            position += padded.count(_SEP, counted, at + 1)
            counted = at + 1
            yield position - 1  # the leading separator is not an item's end
            at = padded.find(needle, at + len(value) + 1)

    def find(self, value: object) -> int:
        """The first position that holds VALUE, or -1."""
        return next(self.positions(value), -1)

    def _start(self, position: int) -> int:
        """Where the item at POSITION (0 to count - 1) starts in the text."""
        if self._items is not None or position > 64:
            return sum(map(len, self.items()[:position])) + position
        at = -1
        for _ in range(position):  # a few, in C each
            at = self.text.index(_SEP, at + 1)
        return at + 1

    def item(self, position: int) -> str:
        """The item at POSITION (0 to count - 1), a small one not split out of them all."""
        if self._items is not None or not 0 <= position < self.count:
            return self.items()[position]
        start = self._start(position)
        end = self.text.find(_SEP, start)
        return self.text[start : end if end >= 0 else len(self.text)]

    def tail(self, first: int) -> _Column:
        """The column from position FIRST on."""
        if first <= 0:
            return self
        if first >= self.count:
            return _Column()
        return _Column(self.text[self._start(first) :], self.count - first)

    def holds(self, position: int, value: str) -> bool:
        """Whether the column holds VALUE at POSITION."""
        if self._items is not None:
            return 0 <= position < self.count and self._items[position] == value
        for at in self.positions(value):
            if at >= position:
                return at == position
        return False


class _ColumnBuilder:
    """A text column made for a new index: strings, and runs of an old column's, whose
    text it copies whole when the run is the whole column (no split, no join of each)."""

    __slots__ = ("count", "pieces")

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.count = 0

    def append(self, value: str) -> None:
        self.pieces.append(value)
        self.count += 1

    def extend(self, values: list[str]) -> None:
        self.pieces.extend(values)
        self.count += len(values)

    def extend_from(self, column: _Column, first: int, stop: int) -> None:
        if first == 0 and stop == column.count and column.count:
            self.pieces.append(column.text)
            self.count += column.count
        else:
            self.extend(column.items()[first:stop])

    def build(self) -> _Column:
        return _Column(_joined(self.pieces), self.count)


def _pack_index(index: _Index) -> tuple[int | str | bytes, ...]:
    return (
        len(index.ids),
        index.ids.text,
        _words(index.starts),
        _words(index.ends),
        index.names.text,
        _words(index.due),
        _words(index.bounds),
        index.leases_end,
        len(index.home_ids),
        index.home_ids.text,
        _words(index.home_starts),
        index.files_at,
        index.slugs.text,
        index.prefix_crc,
    )


def _unpack_index(packed: object) -> _Index:
    """The index _pack_index() made; ValueError or TypeError for anything else."""
    if type(packed) is not tuple or len(packed) != 14:
        raise ValueError("not an index")
    count, ids, starts, ends, names, due, bounds, leases_end, homes_count, homes, home_starts = (
        packed[:11]
    )
    files_at, slugs, prefix_crc = packed[11:]
    texts, words = (ids, names, homes, slugs), (starts, ends, due, bounds, home_starts)
    if not all(type(column) is str for column in texts) or not all(
        type(column) is bytes for column in words
    ):
        raise TypeError("columns")
    numbers = (count, homes_count, leases_end, files_at, prefix_crc)
    if not all(type(number) is int for number in numbers):
        raise TypeError("counts")
    for text, number in ((ids, count), (names, count), (slugs, count), (homes, homes_count)):
        # As many strings as leases (homes), as a split would give them: counted in C.
        if (text.count(_SEP) + 1 if number else len(text)) != number:
            raise ValueError("column")
    home_blocks = _from_words(home_starts)
    if len(home_blocks) != homes_count:
        raise ValueError("homes")
    return _Index(
        _Column(ids, count),
        _from_words(starts),
        _from_words(ends),
        _Column(names, count),
        _from_words(due),
        _from_words(bounds),
        leases_end,
        _Column(homes, homes_count),
        home_blocks,
        files_at,
        _Column(slugs, count),
        prefix_crc,
    )


def dump_index(index: _Index, seal: bytes) -> list[bytes]:
    """The bytes of an index file, in pieces: INDEX, vouching for the ledger file SEAL
    names."""
    return sealed_index(pack_index(index), seal)


def pack_index(index: _Index) -> list[bytes]:
    """The pieces of INDEX's file that follow the seal: what costs (about 2 ms at 10,000
    leases), made while the ledger file it vouches for is still syncing to disk."""
    blob = marshal.dumps(_pack_index(index))
    return [zlib.crc32(blob).to_bytes(_CHECK_SIZE, "big"), blob]


def sealed_index(packed: list[bytes], seal: bytes) -> list[bytes]:
    """The bytes of an index file, in pieces: PACKED (pack_index), vouching for the ledger
    file SEAL names."""
    return [_INDEX_MAGIC, seal, *packed]


def parse_index(blob: bytes, seal: bytes) -> _Index | None:
    """The index in BLOB, an index file's bytes, if it vouches for the ledger file SEAL
    names and is whole; else None."""
    head = len(_INDEX_MAGIC)
    check = blob[head + _DIGEST_SIZE : head + _DIGEST_SIZE + _CHECK_SIZE]
    payload = memoryview(blob)[head + _DIGEST_SIZE + _CHECK_SIZE :]  # not copied
    if not blob.startswith(_INDEX_MAGIC) or blob[head : head + _DIGEST_SIZE] != seal:
        return None
    if zlib.crc32(payload).to_bytes(_CHECK_SIZE, "big") != check:
        return None
    try:
        # Bytes this user wrote (the store checks owner and mode), whole (CRC-32).
        index = _unpack_index(marshal.loads(payload))  # noqa: S302
    except (ValueError, TypeError, EOFError, UnicodeDecodeError):
        return None
    count = len(index.ids)
    columns = (*index[1:5], index.slugs)
    if not all(len(column) == count for column in columns) or len(index.bounds) != 2 * count:
        return None
    return index


def _stat_key(info: os.stat_result) -> tuple[int, ...]:
    # Every save replaces the file (a new inode); mtime, ctime and size on top.
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _own(info: os.stat_result) -> bool:
    """Whether the file of INFO is this user's and nobody else may write it."""
    return info.st_uid == os.geteuid() and not info.st_mode & 0o077


def _seal(data: Iterable[Chunk], info: os.stat_result) -> bytes:
    """What names the ledger file of the bytes DATA (as INFO) in the index that vouches
    for it.

    A file only this user can write changes only by a write of theirs, which gives it
    a new stat key (inode, size, mtime, ctime): the key names it. A file others may
    write (a shared state dir) is named by its SHA-256: whatever they write, and when,
    the index then vouches for nothing else than the bytes save() wrote.
    """
    import hashlib

    if _own(info):
        return hashlib.sha256(b"stat %d %d %d %d %d" % _stat_key(info)).digest()
    digest = hashlib.sha256()
    for part in data:
        for piece in part.pieces() if isinstance(part, FileRange) else [part]:
            digest.update(piece)
    return digest.digest()


def _due_second(lease: Lease) -> int:
    # The expiry as the file holds it (whole seconds): what a later load compares.
    return 0 if lease.anchored else int(lease.expires_at.timestamp())


class _Written:
    """A ledger file save() wrote and its index; each lease parsed when first asked for.

    Its bytes are in memory (DATA) or, for this user's own file vouched for by its
    index, read where needed from the descriptor FD: a grant at 10,000 leases reads
    the few it parses and the end of the file, and its save has the kernel copy the
    rest (fs.FileRange)."""

    __slots__ = (
        "__weakref__",
        "_found",
        "_parsed",
        "_spans",
        "data",
        "distrust",
        "fd",
        "index",
        "key",
    )

    def __init__(
        self,
        index: _Index,
        data: bytes | None = None,
        fd: int | None = None,
        *,
        key: tuple[int, ...] | None = None,
        distrust: Callable[[str], Exception] | None = None,
    ) -> None:
        self.data = data
        self.fd = fd
        self.key = key  # the file's fs.file_key when it was loaded (FD only)
        # What a lease that does not match the index raises (the store removes the
        # index, so the next command reads the file whole).
        self.distrust = distrust
        if fd is not None:
            import weakref

            # Closed with the last state that holds it (a server caches one).
            weakref.finalize(self, os.close, fd)
        self.index = index
        self._found: dict[str, int] = {}
        self._parsed: dict[int, Lease] = {}
        self._spans: tuple[list[int], list[int], list[int]] | None = None

    def read(self, begin: int, end: int) -> bytes:
        """The file's bytes from BEGIN to END."""
        part = self.chunk(begin, end)
        return part.read() if isinstance(part, FileRange) else bytes(part)

    def chunk(self, begin: int, end: int) -> Chunk:
        """The file's bytes from BEGIN to END, for a write: not copied where avoidable."""
        if self.data is not None:
            return memoryview(self.data)[begin:end]
        if self.fd is None:
            raise AssertionError("a written ledger without its bytes")
        return FileRange(self.fd, begin, end - begin, expect=self.key)

    def crc(self, part: FileRange, crc: int) -> int:
        """The CRC-32 CRC continued over PART, a piece of this file."""
        if (
            crc == _PREFIX_CRC
            and part.offset == len(_PREFIX)
            and part.length == (self.index.leases_end - len(_PREFIX))
        ):
            return self.index.prefix_crc  # all of the file's leases, as its index says
        for piece in part.pieces():
            crc = zlib.crc32(piece, crc)
        return crc

    def position(self, session_id: object) -> int:
        """Where the file holds SESSION_ID's lease, or -1: a search of the ids' text in
        C, not a dict of them all (a write asks about the few leases it touches)."""
        if type(session_id) is not str:
            return -1
        position = self._found.get(session_id)
        if position is None:
            position = self._found[session_id] = self.index.ids.find(session_id)
        return position

    def lease(self, position: int) -> Lease:
        lease = self._parsed.get(position)
        if lease is None:
            bounds = self.index.bounds
            try:
                text = self.read(bounds[2 * position], bounds[2 * position + 1])
                # Checked by the same rules as every lease read in full: it may be printed.
                lease = lease_from_raw(json.loads(text))
            except (OSError, ValueError, RecursionError, _Malformed):
                lease = None
            if lease is None or not self.index.ids.holds(position, lease.session_id):
                # The file is not what its index says (changed in place since, or an
                # index made by hand): never guessed at.
                raise self.untrue(f"lease {position}")
            self._parsed[position] = lease
        return lease

    def untrue(self, what: str) -> Exception:
        """What to raise when the file's WHAT is not as its index says (an index made by
        hand, or a file changed in place since): the store's distrust, which removes the
        index, so the next command reads the file whole."""
        reason = f"its index does not describe {what} as it is in the file"
        return AssertionError(reason) if self.distrust is None else self.distrust(reason)

    def sorted_spans(self) -> tuple[list[int], list[int], list[int]]:
        """Starts, ends and positions of the file's leases, lowest start first."""
        if self._spans is None:
            starts = self.index.starts
            ascending = sorted(starts)  # in C; at once when already in order
            if ascending == starts.tolist():  # as a file of leases granted upwards is
                order = list(range(len(starts)))
                self._spans = (ascending, self.index.ends.tolist(), order)
            else:
                # map() and C-level getters: no Python-level step per lease.
                order = sorted(range(len(starts)), key=starts.__getitem__)
                self._spans = (
                    list(map(starts.__getitem__, order)),
                    list(map(self.index.ends.__getitem__, order)),
                    order,
                )
        return self._spans


class _Homes(Homes):
    """The homes of an index (its columns IDS and STARTS, oldest first), the DROPPED
    oldest forgotten since, those of REMOVED made newer again, and ADDED the newest, in
    order. `allocate` asks for a session's home and moves one: a search of the ids' text,
    with no dict of 10,000 homes made (`as_dict` makes it)."""

    __slots__ = ("added", "dropped", "ids", "removed", "starts")

    def __init__(
        self,
        ids: _Column,
        starts: array[int],
        dropped: int = 0,
        removed: frozenset[str] = frozenset(),
        added: dict[str, int] | None = None,
    ) -> None:
        self.ids, self.starts, self.dropped = ids, starts, dropped
        self.removed = removed  # of the index's homes kept, those in ADDED now
        self.added = added or {}

    def _kept(self, session_id: str) -> int:
        """The position of SESSION_ID's home in the index, if it is still kept there."""
        if session_id in self.removed:
            return -1
        return next((at for at in self.ids.positions(session_id) if at >= self.dropped), -1)

    def __len__(self) -> int:
        return len(self.ids) - self.dropped - len(self.removed) + len(self.added)

    def get(self, session_id: str) -> int | None:
        block = self.added.get(session_id)
        if block is None:
            at = self._kept(session_id)
            block = None if at < 0 else self.starts[at]
        return block

    def blocks(self) -> set[int]:
        if self.removed:
            return set(self.as_dict().values())
        return {*self.starts[self.dropped :], *self.added.values()}

    def moved(self, session_id: str, block: int, limit: int) -> tuple[Homes, list[str]]:
        added, removed, dropped = dict(self.added), set(self.removed), self.dropped
        if added.pop(session_id, None) is None and self._kept(session_id) >= 0:
            removed.add(session_id)
        added[session_id] = block
        count, forgotten = len(self.ids), []
        length = count - dropped - len(removed) + len(added)
        while length > limit:
            if dropped < count:
                key = self.ids.item(dropped)
                dropped += 1
                if key in removed:  # made newer: not held here any more
                    removed.discard(key)
                    continue
            else:
                key = next(iter(added))
                del added[key]
            forgotten.append(key)
            length -= 1
        return _Homes(self.ids, self.starts, dropped, frozenset(removed), added), forgotten

    def as_dict(self) -> dict[str, int]:
        first = self.dropped
        homes = dict(zip(self.ids.items()[first:], self.starts[first:].tolist(), strict=True))
        for key in self.removed:
            del homes[key]
        homes.update(self.added)
        return homes

    def __repr__(self) -> str:
        return f"_Homes({self.as_dict()!r})"


class _Taken(AbstractSet[str]):
    """The values COLUMN holds at the positions not in SKIP (but BLANK, which stands for
    none), and FRESH: a set read-only, asked by `in` without a set of ten thousand
    values made (the names of an allocation at 10,000 leases); iterated, it is one."""

    __slots__ = ("_blank", "_column", "_fresh", "_skip", "_values")

    def __init__(
        self, column: _Column, skip: set[int], fresh: set[str], blank: str | None = None
    ) -> None:
        self._column, self._skip, self._fresh, self._blank = column, skip, fresh, blank
        self._values: set[str] | None = None

    def __contains__(self, value: object) -> bool:
        if value in self._fresh:
            return True
        if value == self._blank:
            return False
        if self._values is not None:
            return value in self._values
        return any(at not in self._skip for at in self._column.positions(value))

    def _all(self) -> set[str]:
        if self._values is None:
            items, skip = self._column.items(), self._skip
            values = {v for at, v in enumerate(items) if at not in skip} if skip else set(items)
            if self._blank is not None:
                values.discard(self._blank)
            self._values = values | self._fresh
        return self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    @classmethod
    def _from_iterable(cls, values: Iterable[_T]) -> set[_T]:
        return set(values)  # what `-`, `|` and `&` make: a set of their own

    def __repr__(self) -> str:
        return f"_Taken({self._all()!r})"


class _IndexedLeases(Leases):
    """The leases of a file save() wrote, with the changes made since: the file's own
    are parsed only when asked for, and written back as the bytes they were."""

    __slots__ = ("_added", "_file", "_removed", "_replaced", "_sorted")

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
        self._sorted: tuple[list[int], list[int], list[int | str]] | None = None

    def _in_file(self, session_id: object) -> bool:
        return session_id not in self._removed and self._file.position(session_id) >= 0

    def __getitem__(self, session_id: str) -> Lease:
        lease = self._added.get(session_id) or self._replaced.get(session_id)
        if lease is not None:
            return lease
        position = -1 if session_id in self._removed else self._file.position(session_id)
        if position < 0:
            raise KeyError(session_id)
        return self._file.lease(position)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._added or self._in_file(session_id)

    def __iter__(self) -> Iterator[str]:
        ids: Iterable[str] = self._file.index.ids.items()
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
        return set(map(self._file.position, (*self._replaced, *self._removed)))

    def _replaced_at(self) -> dict[int, Lease]:
        """The leases of the file changed in place since, by position."""
        return {self._file.position(key): lease for key, lease in self._replaced.items()}

    def fresh(self) -> list[Lease]:
        """The leases changed or added since the file was written."""
        return [*self._replaced.values(), *self._added.values()]

    def _order(self) -> tuple[list[int], list[int], list[int | str]]:
        """Starts and ends of every lease, lowest start first, and where each lease is:
        its position in the file, or its session id (a lease changed or added since)."""
        if self._sorted is None:
            starts, ends, order = self._file.sorted_spans()
            slots: list[int | str]
            touched = self._touched()
            if touched:
                kept = [position not in touched for position in order]
                starts, ends = list(compress(starts, kept)), list(compress(ends, kept))
                slots = list(compress(order, kept))
            else:
                slots = list(order)
                if self._added:
                    starts, ends = list(starts), list(ends)
            for lease in self.fresh():
                index = bisect_right(starts, lease.start)
                starts.insert(index, lease.start)
                ends.insert(index, lease.end)
                slots.insert(index, lease.session_id)
            self._sorted = (starts, ends, slots)
        return self._sorted

    def sorted_spans(self) -> tuple[list[int], list[int], list[str]]:
        if self._spans is None:
            starts, ends, slots = self._order()
            ids = self._file.index.ids.items()
            keys = [slot if isinstance(slot, str) else ids[slot] for slot in slots]
            self._spans = (starts, ends, keys)
        return self._spans

    def _span_slots(self) -> tuple[list[int], list[int], list[int | str]]:
        return self._order()  # the session ids are not needed: file positions will do

    def _at(self, slot: int | str) -> Lease:
        # A position is an unchanged lease of the file: parsed, not looked up by id.
        return self[slot] if isinstance(slot, str) else self._file.lease(slot)

    def head(self) -> list[Chunk] | None:
        """The first pieces save() writes of this table while the file's leases stay as
        they are (an allocation of a new session): its start and those leases, as the
        bytes they are in the file; None if they are not read from a file, or one of
        them changed since (a long-lived process's table)."""
        written, count = self._file, len(self._file.index.ids)
        if written.fd is None or not count or self._replaced or self._removed:
            return None
        bounds = written.index.bounds
        return [_PREFIX.encode(), written.chunk(bounds[0], bounds[2 * count - 1])]

    def compose_names(self) -> AbstractSet[str]:
        # No set of ten thousand names: a name is searched for in the index's column.
        fresh = {lease.compose_project_name for lease in self.fresh()}
        return _Taken(self._file.index.names, self._touched(), fresh)

    def slugs(self) -> AbstractSet[str]:
        fresh = {lease.slug for lease in self.fresh() if lease.slug is not None}
        return _Taken(self._file.index.slugs, self._touched(), fresh, blank="")

    def due(self, now: datetime) -> list[Lease]:
        # The index says from when each lease of the file can be due: only those are
        # parsed (a second early, so a rounding never hides one), then asked exactly,
        # with every lease changed since, in table order.
        moment = now.timestamp() + 1
        due_at = self._file.index.due
        touched = self._touched()
        positions = set(touched)
        if min(due_at, default=0) <= moment:
            positions.update(at for at, second in enumerate(due_at) if second <= moment)
        # By position, not by id: the ids' column is not split for a few leases.
        replaced = self._replaced_at()
        candidates = [
            replaced[position] if position in replaced else self._file.lease(position)
            for position in sorted(positions)
            if position in replaced or position not in touched
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
        fresh = sorted(self.fresh(), key=lambda lease: lease.start)
        previous: Lease | None = None
        slugs, named = self._file.index.slugs, set()
        for lease in fresh:
            _check_written(lease.session_id, lease)
            if lease.slug is not None:
                # One lease per name, as validate() checks (a search of the text in C).
                held = any(at not in touched for at in slugs.positions(lease.slug))
                if lease.slug in named or held:
                    raise AssertionError(f"two leases are named {lease.slug!r}")
                named.add(lease.slug)
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
        replaced_at = self._replaced_at()
        for position in sorted(self._touched()):
            out.add_run(self._file, previous, position)
            if position in replaced_at:
                out.add(replaced_at[position])
            previous = position + 1
        out.add_run(self._file, previous, len(self._file.index.ids))
        for lease in self._added.values():
            out.add(lease)
        return self._file

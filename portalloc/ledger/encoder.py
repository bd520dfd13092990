"""The bytes save() writes, with their index: every lease of the state encoded, or, for
a state read through the index, the file's unchanged leases copied as the bytes they
were (fs.FileRange: file to file, by the kernel) and only the others encoded. What it
writes is exactly what codec.dump() makes of the whole document.
"""

from __future__ import annotations

import zlib
from array import array
from itertools import islice
from operator import eq

from portalloc.fs import Chunk, FileRange
from portalloc.ledger.codec import _CRC_KEY, _NEXT_LEASE, _PREFIX, _json, lease_to_raw
from portalloc.ledger.format import _LEASE_ORDER, RawFile, RawLease
from portalloc.ledger.index import (
    _Column,
    _ColumnBuilder,
    _due_second,
    _Homes,
    _Index,
    _IndexedLeases,
    _Written,
)
from portalloc.models import Homes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from portalloc.models import Lease, LedgerState


class _Encoder:
    """The bytes save() writes, built lease by lease, with the index of them."""

    def __init__(self) -> None:
        # Views into the file read, not copies: at 5 MiB each copy shows in the bench.
        self.parts: list[Chunk] = [_PREFIX.encode()]
        self.offset = len(_PREFIX)
        # Integer columns as arrays: a run of the file's leases extends them by memcpy;
        # text columns as pieces, a whole column of the file's as its one string.
        self.ids, self.names, self.slugs = _ColumnBuilder(), _ColumnBuilder(), _ColumnBuilder()
        self.index = _Index(
            _Column(),
            array("q"),
            array("q"),
            _Column(),
            array("q"),
            array("q"),
            0,
            _Column(),
            array("q"),
            0,
            _Column(),
            0,
        )

    def _place(self, text: Chunk) -> int:
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
        self.ids.append(lease.session_id)
        index.starts.append(lease.start)
        index.ends.append(lease.end)
        self.names.append(lease.compose_project_name)
        self.slugs.append(lease.slug or "")
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
        if len(bounds) != self.ids.count * 2 + 2 * len(leases):
            raise AssertionError("leases are not where save() put them")
        index = self.index
        self.ids.extend([lease.session_id for lease in leases])
        index.starts.extend([lease.start for lease in leases])
        index.ends.extend([lease.end for lease in leases])
        self.names.extend([lease.compose_project_name for lease in leases])
        self.slugs.extend([lease.slug or "" for lease in leases])
        index.due.extend(map(_due_second, leases))

    def add_run(self, written: _Written, first: int, stop: int) -> None:
        """The file's leases at positions FIRST to STOP - 1, copied as they were."""
        if first >= stop:
            return
        source, bounds = written.index, written.index.bounds
        begin = bounds[2 * first]
        start = self._place(written.chunk(begin, bounds[2 * stop - 1]))
        shift = start - begin
        index = self.index
        self.ids.extend_from(source.ids, first, stop)
        index.starts.extend(source.starts[first:stop])
        index.ends.extend(source.ends[first:stop])
        self.names.extend_from(source.names, first, stop)
        self.slugs.extend_from(source.slugs, first, stop)
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
        homes, home_ids, home_starts = _homes_out(state.homes_table, written)
        # Exactly what dump() makes of the whole document, a piece at a time, never
        # joined: five MiB copied once more shows in the bench.
        parts = self.parts
        crc = 0
        for part in parts:
            if isinstance(part, FileRange):
                if written is None:
                    raise AssertionError("a piece of a file from no file")
                crc = written.crc(part, crc)
            else:
                crc = zlib.crc32(part, crc)
        prefix_crc = crc
        rest = [_HOMES, homes, _FILES, _json(files), _SLUGS, _json(state.slugs)]
        for part in rest:
            crc = zlib.crc32(part, crc)
        parts += rest
        crc = zlib.crc32(b"}", crc)
        parts += [_CRC_KEY, b"%08x" % crc, b'"}']
        files_at = self.offset + len(_HOMES) + len(homes)
        return parts, self.index._replace(
            ids=self.ids.build(),
            names=self.names.build(),
            slugs=self.slugs.build(),
            leases_end=self.offset,
            home_ids=home_ids,
            home_starts=home_starts,
            files_at=files_at,
            prefix_crc=prefix_crc,
        )


_HOMES = b'],"homes":'
_SLUGS = b',"slugs":'
_FILES = b',"files":'


def _homes_out(
    homes: dict[str, int] | Homes, written: _Written | None
) -> tuple[bytes, _Column, array[int]]:
    """HOMES as JSON, and as the new index's columns; as far as they are those of
    WRITTEN, the bytes it holds and its columns (no dict of them all made again)."""
    if (
        isinstance(homes, _Homes)
        and written is not None
        and homes.ids is written.index.home_ids
        and not homes.removed
    ):
        # The file's homes, the oldest DROPPED forgotten, ADDED after them: cut and
        # joined, as dump() makes them.
        index, dropped, added = written.index, homes.dropped, homes.added
        text = b"{}"
        if dropped < len(homes.ids):
            text = written.read(index.leases_end + len(_HOMES), index.files_at)
            if dropped:
                text = _from_home(text, _json(homes.ids.item(dropped)), written)
        if added:
            more = _json(added)
            text = text[:-1] + b"," + more[1:] if text != b"{}" else more
        ids = _ColumnBuilder()
        ids.extend_from(homes.ids.tail(dropped), 0, len(homes.ids) - dropped)
        ids.extend(list(added))
        starts = homes.starts[dropped:]
        starts.extend(array("q", added.values()))
        return text, ids.build(), starts
    plain = homes.as_dict() if isinstance(homes, Homes) else homes
    return _homes_text(plain, written), _Column.of(list(plain)), array("q", plain.values())


def _from_home(text: bytes, key: bytes, written: _Written) -> bytes:
    """TEXT, the file's homes, from the home KEY (JSON) on, as a JSON object."""
    # `,"key":` is where that home starts: inside a JSON string `"` is escaped.
    at = text.find(b"," + key + b":")
    if at < 0:  # not where the index says it is
        raise written.untrue("the homes")
    return b"{" + text[at + 1 :]


def _homes_text(homes: dict[str, int], written: _Written | None) -> bytes:
    """HOMES as JSON; as far as they are those of WRITTEN, the bytes it holds."""
    if written is None or not homes:
        return _json(homes)
    index = written.index
    text = written.read(index.leases_end + len(_HOMES), index.files_at)
    old = _Homes(index.home_ids, index.home_starts).as_dict()
    # A grant forgets homes at the front (the least recent) and adds one at the end.
    first = next(iter(homes))
    dropped = next((at for at, key in enumerate(islice(old, 16)) if key == first), None)
    kept = len(old) - (dropped or 0)
    if dropped is None or kept > len(homes):
        return _json(homes)
    if not all(map(eq, islice(homes.items(), kept), islice(old.items(), dropped, None))):
        return _json(homes)
    if dropped:
        text = _from_home(text, _json(first), written)
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

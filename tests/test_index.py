"""The ledger's index: a write parses only the leases it touches and copies the others
as the bytes they were, yet decides and writes exactly what a full parse would."""

from __future__ import annotations

import json
import os
import zlib
from array import array
from collections.abc import Set as AbstractSet
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from portalloc import allocator
from portalloc.config import PortAllocatorConfig
from portalloc.errors import PortallocError
from portalloc.fs import Chunk, FileRange, atomic_write
from portalloc.host import Host
from portalloc.ledger import codec
from portalloc.ledger import store as ledger_module
from portalloc.ledger.codec import dump
from portalloc.ledger.encoder import encode
from portalloc.ledger.store import Ledger
from portalloc.models import Lease, Leases, LedgerState, Owner
from portalloc.service import PortAllocatorService
from tests.helpers import FakeClock
from tests.test_trust import HOSTILE_LEASES

# As tests/test_trust.py has them, the overlap moved to where "good" sits here.
TAMPERED = [hostile for hostile in HOSTILE_LEASES if hostile.get("start") != 20050]
TAMPERED.append({"start": 10050, "ports": {"api": 10050}})

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid"), reason="the index needs POSIX uids")


@pytest.fixture(autouse=True)
def index_small_ledgers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The index is kept from INDEX_MIN_LEASES leases on, and a grant writes the file's
    leases ahead from AHEAD_MIN_BYTES on; here both from the first."""
    monkeypatch.setattr(ledger_module, "INDEX_MIN_LEASES", 1)
    monkeypatch.setattr(ledger_module, "AHEAD_MIN_BYTES", 1)


def test_a_ledger_gets_an_index_from_index_min_leases_on(
    state_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "INDEX_MIN_LEASES", 3)
    index = state_dir / f"leases.json.index-{os.geteuid()}"
    svc = service(state_dir, clock)
    svc.allocate("a")
    svc.allocate("b")
    assert not index.exists()
    svc.allocate("c")
    assert index.stat().st_mode & 0o777 == 0o600
    svc.release("c")
    assert not index.exists()


def service(state_dir: Path, clock: FakeClock, **settings: Any) -> PortAllocatorService:
    config = PortAllocatorConfig(state_dir=state_dir, skip_port_check=True, **settings)
    return PortAllocatorService(config, clock=clock, on_warning=lambda _message: None)


def lease_text(data: bytes, session_id: str) -> bytes:
    """The exact bytes of SESSION_ID's lease in the ledger DATA."""
    start = data.index(b'{"session_id":' + json.dumps(session_id).encode() + b",")
    _raw, end = json.JSONDecoder().raw_decode(data[start:].decode())
    return data[start : start + len(data[start:].decode()[:end].encode())]


def full_parses(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A list that grows by one each time a ledger is parsed in full."""
    parses: list[object] = []
    real = codec.parse_document

    def counting(document: object) -> codec.Parsed:
        parses.append(document)
        return real(document)

    monkeypatch.setattr(ledger_module, "parse_document", counting)  # as the store calls it
    return parses


def forge(path: Path, edit: dict[str, Any], session_id: str) -> None:
    """Change SESSION_ID's lease and write the file back as save() would, CRC and all."""
    document = json.loads(path.read_bytes())
    del document["crc32"]
    for raw in document["leases"]:
        if raw["session_id"] == session_id:
            raw.update(edit)
    # As dump() does it, but carrying a lone surrogate too, as a forger can.
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    data = body.encode("utf-8", "surrogatepass")
    atomic_write(path, data[:-1] + b',"crc32":"%08x"}' % zlib.crc32(data))


def test_unchanged_leases_survive_a_write_byte_for_byte(
    state_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service(state_dir, clock)
    for session in ("a", "b", "c", "d"):
        svc.allocate(session)
    before = (state_dir / "leases.json").read_bytes()
    kept = {session: lease_text(before, session) for session in ("a", "c", "d")}
    parses = full_parses(monkeypatch)
    other = service(state_dir, clock)  # another process: nothing cached
    other.release("b")
    other.allocate("e")
    clock.advance(30)
    service(state_dir, clock).allocate("c")  # refreshed: its expiry changes
    after = (state_dir / "leases.json").read_bytes()
    assert parses == []  # every write went through the index
    assert lease_text(after, "a") == kept["a"] and lease_text(after, "d") == kept["d"]
    assert lease_text(after, "c") != kept["c"]
    # The whole file is what save() makes of the state: canonical JSON and its CRC.
    document = json.loads(after)
    del document["crc32"]
    assert after == dump(document)
    assert [raw["session_id"] for raw in document["leases"]] == ["a", "c", "d", "e"]


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
@pytest.mark.parametrize("hostile", TAMPERED, ids=lambda h: next(iter(h)))
def test_a_tampered_lease_in_an_otherwise_intact_file_is_caught(
    state_dir: Path, clock: FakeClock, hostile: dict[str, Any], shared: bool
) -> None:
    if shared:
        state_dir.mkdir(mode=0o700)
        state_dir.chmod(0o2770)  # group-writable ledger: its index names it by SHA-256
    svc = service(state_dir, clock)
    for session in ("good", "victim"):
        svc.allocate(session)
    path = state_dir / "leases.json"
    good = lease_text(path.read_bytes(), "good")
    forge(path, hostile, "victim")
    warnings: list[str] = []
    config = PortAllocatorConfig(state_dir=state_dir, skip_port_check=True)
    later = PortAllocatorService(config, clock=clock, on_warning=warnings.append)
    assert later.allocate("new").session_id == "new"
    assert "unusable lease" in warnings[0]
    assert len(list(state_dir.glob("leases.json.corrupt-*"))) == 1
    assert sorted(later.ledger.load().leases) == ["good", "new"]
    assert lease_text(path.read_bytes(), "good") == good


def test_a_file_edited_in_place_is_not_vouched_for(
    state_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service(state_dir, clock)
    svc.allocate("a")
    path = state_dir / "leases.json"
    data = path.read_bytes()
    forged = data.replace(b'"API_PORT":"10003"', b'"API_PORT":"10002"')
    assert len(forged) == len(data)
    with path.open("r+b") as stream:  # same inode, same size: only the times differ
        stream.write(forged)
    parses = full_parses(monkeypatch)
    service(state_dir, clock).allocate("b")
    assert len(parses) == 1


@pytest.mark.parametrize("how", ["group-writable", "symlink", "garbage", "other-ledger"])
def test_an_index_that_cannot_be_believed_is_ignored(
    state_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    svc = service(state_dir, clock)
    svc.allocate("a")
    index = state_dir / f"leases.json.index-{os.geteuid()}"
    if how == "group-writable":
        index.chmod(0o620)
    elif how == "symlink":
        real = index.with_name("elsewhere")
        index.rename(real)
        index.symlink_to(real)
    elif how == "garbage":
        index.write_bytes(index.read_bytes()[:-7] + b"garbage")
    else:  # the index of another ledger, the ledger unchanged
        other = state_dir.parent / "other"
        service(other, clock).allocate("x")
        index.write_bytes((other / index.name).read_bytes())
    parses = full_parses(monkeypatch)
    assert service(state_dir, clock).allocate("b").block_start == 10100
    assert len(parses) == 1
    assert sorted(service(state_dir, clock).ledger.load().leases) == ["a", "b"]
    assert (index.stat().st_mode & 0o777) == 0o600 and not index.is_symlink()


def _joined(parts: list[Chunk]) -> bytes:
    return b"".join(p.read() if isinstance(p, FileRange) else p for p in parts)


def _is_dump(data: bytes) -> None:
    document = json.loads(data)
    body = data[: -len(',"crc32":"00000000"}')] + b"}"
    assert document.pop("crc32") == f"{zlib.crc32(body):08x}"
    assert data == dump(document)


@pytest.mark.parametrize("change", ["none", "add", "remove-first", "replace-last", "remove-all"])
def test_encode_in_pieces_is_dump(state_dir: Path, clock: FakeClock, change: str) -> None:
    """What save() writes in pieces is what dump() makes of the whole document, whether
    the file's leases are copied file to file (their CRC-32 from the index) or read."""
    svc = service(state_dir, clock)
    for session in ("a/é\"'$x", "b", "c"):
        svc.allocate(session, pid=os.getpid())
    state = service(state_dir, clock).ledger.load()  # a new reader: through the index
    leases = state.leases
    if change == "add":
        leases = leases.updated({"d": leases["c"]._replace(session_id="d")})
    elif change == "remove-first":
        leases = leases.updated({"a/é\"'$x": None})
    elif change == "replace-last":
        later = leases["c"].expires_at + timedelta(minutes=5)
        leases = leases.updated({"c": leases["c"]._replace(expires_at=later)})
    elif change == "remove-all":
        leases = leases.updated(dict.fromkeys(leases))
    parts, _index = encode(state.with_leases(leases))
    copied = [part for part in parts if isinstance(part, FileRange)]
    assert bool(copied) == (change != "remove-all")
    _is_dump(_joined(parts))


def test_a_copy_the_kernel_refuses_is_read_and_written(
    state_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where copy_file_range cannot copy (another OS, another file system), save() reads
    and writes the pieces itself: the same bytes."""
    import errno

    svc = service(state_dir, clock)
    for session in ("a", "b"):
        svc.allocate(session)
    before = (state_dir / "leases.json").read_bytes()

    def refuse(*_args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    service(state_dir, clock).allocate("c")
    after = (state_dir / "leases.json").read_bytes()
    _is_dump(after)
    assert after.startswith(before[: before.index(b'],"homes":')])
    assert sorted(service(state_dir, clock).ledger.load().leases) == ["a", "b", "c"]


# --- the index path and the full path decide and write the same --------------------------

SESSIONS = [f"s{i}" for i in range(6)]
PIDS = [101, 102, 103]
SETTINGS = [
    {"base": 10000, "range": 4, "max_sessions": 8},
    {"base": 10002, "range": 10, "max_sessions": 5},
    {"base": 10000, "range": 4, "max_sessions": 12},
]


class IndexedVersusFull(RuleBasedStateMachine):
    """Every operation on two ledgers, one written and read through its index, the
    other parsed in full every time: same results, same bytes on disk."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="portalloc-index-"))
        # Few homes remembered: a grant forgets the oldest, as at 10,000 homes.
        self.history_limit = allocator.HISTORY_LIMIT
        allocator.HISTORY_LIMIT = 4
        self.index_min_leases = ledger_module.INDEX_MIN_LEASES
        ledger_module.INDEX_MIN_LEASES = 1
        self.ahead_min_bytes = ledger_module.AHEAD_MIN_BYTES
        ledger_module.AHEAD_MIN_BYTES = 1  # every grant writes the file's leases ahead
        self.clock = FakeClock()
        self.alive = set(PIDS)
        self.paths: set[str] = set()
        self.host = Host(
            owner_of=lambda pid: Owner(pid, 1.0),
            owner_alive=lambda owner: owner.pid in self.alive,
            path_exists=lambda path: path in self.paths,
        )

    def services(self, settings: dict[str, int]) -> tuple[PortAllocatorService, ...]:
        pair = []
        for name in ("indexed", "full"):
            config = PortAllocatorConfig(
                state_dir=self.root / name,
                skip_port_check=True,
                base=settings["base"],
                range=settings["range"],
                max_sessions=settings["max_sessions"],
            )
            svc = PortAllocatorService(
                config, host=self.host, clock=self.clock, on_warning=lambda _m: None
            )
            if name == "full":
                svc.ledger.index_path = None
            pair.append(svc)
        return tuple(pair)

    def same(self, settings: dict[str, int], call: Any) -> None:
        outcomes = []
        for svc in self.services(settings):
            try:
                outcomes.append(repr(call(svc)))
            except PortallocError as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
        assert outcomes[0] == outcomes[1]
        files = [(self.root / name / "leases.json") for name in ("indexed", "full")]
        contents = [path.read_bytes() if path.exists() else None for path in files]
        assert contents[0] == contents[1]
        # A file written ahead is finished or gone: no temp file outlives the lock.
        assert not [p.name for p in (self.root / "indexed").glob("*.tmp")]

    @rule(
        session=st.sampled_from(SESSIONS),
        settings=st.sampled_from(SETTINGS),
        ttl=st.sampled_from([1, 2, 120]),
        pid=st.none() | st.sampled_from(PIDS),
        worktree=st.none() | st.sampled_from(["/w/1", "/w/2"]),
    )
    def allocate(
        self,
        session: str,
        settings: dict[str, int],
        ttl: int,
        pid: int | None,
        worktree: str | None,
    ) -> None:
        if worktree is not None:
            self.paths.add(worktree)
        self.same(
            settings,
            lambda svc: svc.allocate(session, ttl_minutes=ttl, pid=pid, worktree=worktree),
        )

    @rule(session=st.sampled_from(SESSIONS), pid=st.sampled_from(PIDS), keep=st.booleans())
    def hold(self, session: str, pid: int, keep: bool) -> None:
        self.same(SETTINGS[0], lambda svc: svc.hold(session, pid=pid, keep=keep))

    @rule(session=st.sampled_from(SESSIONS), pid=st.sampled_from(PIDS))
    def leave(self, session: str, pid: int) -> None:
        self.same(SETTINGS[0], lambda svc: svc.leave(session, pid))

    @rule(session=st.sampled_from(SESSIONS))
    def release(self, session: str) -> None:
        self.same(SETTINGS[0], lambda svc: svc.release(session))

    @rule(seconds=st.sampled_from([1, 30, 59, 60, 61, 119, 7200]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds / 60)

    @rule(pid=st.sampled_from(PIDS))
    def kill(self, pid: int) -> None:
        self.alive.discard(pid)

    @rule(worktree=st.sampled_from(["/w/1", "/w/2"]))
    def remove_worktree(self, worktree: str) -> None:
        self.paths.discard(worktree)

    @rule()
    def status_and_prune(self) -> None:
        self.same(SETTINGS[0], lambda svc: (svc.status(), svc.prune()))

    @rule()
    def rewritten_elsewhere(self) -> None:
        # Another user's process writes the same bytes anew: the index no longer vouches.
        path = self.root / "indexed" / "leases.json"
        if path.exists():
            atomic_write(path, path.read_bytes())

    def teardown(self) -> None:
        import shutil

        allocator.HISTORY_LIMIT = self.history_limit
        ledger_module.INDEX_MIN_LEASES = self.index_min_leases
        ledger_module.AHEAD_MIN_BYTES = self.ahead_min_bytes
        shutil.rmtree(self.root, ignore_errors=True)


IndexedVersusFull.TestCase.settings = settings(
    max_examples=120, stateful_step_count=20, deadline=None
)
TestIndexedVersusFull = IndexedVersusFull.TestCase


def test_the_index_is_what_a_state_dir_of_one_user_reads(state_dir: Path, clock: FakeClock) -> None:
    svc = service(state_dir, clock)
    svc.allocate("a")
    state = Ledger(state_dir, 10, print, clock).load()
    assert type(state.leases).__name__ == "_IndexedLeases"
    assert isinstance(state, LedgerState) and list(state.leases) == ["a"]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([*SESSIONS, "a", "b", "c"]),
            st.none() | st.integers(0, 40),  # None: remove; else the block to move it to
            st.sampled_from(["ttl", "owner", "worktree"]),
        ),
        max_size=12,
    ),
    minutes=st.integers(0, 300),
)
def test_the_indexed_table_answers_as_a_plain_one(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[str, int | None, str]],
    minutes: int,
) -> None:
    state_dir = tmp_path_factory.mktemp("table")
    clock = FakeClock()
    svc = service(state_dir, clock, base=10000, range=4, max_sessions=50)
    for session, ttl in (("a", 30), ("b", 90), ("c", 200)):
        svc.allocate(session, ttl_minutes=ttl)
    indexed = Ledger(state_dir, 10, print, clock).load().leases
    assert type(indexed).__name__ == "_IndexedLeases"
    plain = Leases(dict(indexed.items()))
    template = plain["a"]
    for session, block, anchor in steps:
        change: dict[str, Lease | None] = {session: None}
        if block is not None:
            start = 10000 + 4 * block
            holders = plain.overlapping(start, start + template.span - 1)
            if any(lease.session_id != session for lease in holders):
                continue  # spans never overlap
            change[session] = template._replace(
                session_id=session,
                start=start,
                ports=(("api", start),),
                owner=Owner(7, None) if anchor == "owner" else None,
                worktree="/w" if anchor == "worktree" else None,
            )
        indexed, plain = indexed.updated(change), plain.updated(change)
        assert list(indexed.items()) == list(plain.items())
        assert len(indexed) == len(plain) and all(key in indexed for key in plain)
        assert indexed.sorted_spans() == plain.sorted_spans()
        assert indexed.compose_names() == plain.compose_names()
        # Asked by `in` (a search of the index's columns), as the allocator asks them.
        for key in ("a", "b", "c", "d"):
            name, slug = template.compose_project_name, key
            if key in plain:
                name, slug = plain[key].compose_project_name, plain[key].slug or key
            assert (name in indexed.compose_names()) == (name in plain.compose_names())
            assert (slug in indexed.slugs()) == (slug in plain.slugs())
        assert indexed.slugs() == plain.slugs() and "" not in indexed.slugs()
        now = clock.now + timedelta(minutes=minutes)
        assert indexed.due(now) == plain.due(now)
        assert indexed.overlapping(10000, 10100) == plain.overlapping(10000, 10100)


def test_a_long_lived_service_goes_on_from_what_it_saved(state_dir: Path, clock: FakeClock) -> None:
    # mcp and serve keep the state they saved: over many writes it drifts from the
    # file it was read from, and what they write must stay what a full parse reads.
    svc = service(state_dir, clock, base=10000, range=4, max_sessions=200)
    for step in range(150):
        svc.allocate(f"s{step % 90}")
        if step % 3 == 0:
            svc.release(f"s{(step * 7) % 90}")
        clock.advance(0.5)
        fresh = Ledger(state_dir, 10, print, clock)
        fresh.index_path = None
        assert list(svc.ledger.load().leases.items()) == list(fresh.load().leases.items())
    data = (state_dir / "leases.json").read_bytes()
    document = json.loads(data)
    del document["crc32"]
    assert data == dump(document)


def test_a_lease_the_load_rules_refuse_is_never_written(
    state_dir: Path, clock: FakeClock, tmp_path: Path
) -> None:
    """A worktree path with a control character breaks the lease rules: one set of them
    for writing and loading, so it is refused before anything is written (before, it
    passed the write, failed the load, and an index must not vouch for it)."""
    from portalloc.errors import LeaseRefused

    index = state_dir / f"leases.json.index-{os.geteuid()}"
    svc = service(state_dir, clock)
    for number in range(3):
        svc.allocate(f"s{number}")
    assert index.exists()
    before = (state_dir / "leases.json").read_bytes()
    odd = tmp_path / "wt\x01x"
    odd.mkdir()
    with pytest.raises(LeaseRefused, match="bad worktree path"):
        svc.allocate("odd", worktree=str(odd))
    assert (state_dir / "leases.json").read_bytes() == before
    later = service(state_dir, clock)  # a fresh process: every lease is there
    assert later.allocate("next").session_id == "next"
    assert {a.session_id for a in later.status()} == {"s0", "s1", "s2", "next"}


def test_a_fifo_in_place_of_the_index_does_not_hang(state_dir: Path, clock: FakeClock) -> None:
    svc = service(state_dir, clock)
    svc.allocate("a")
    index = state_dir / f"leases.json.index-{os.geteuid()}"
    index.unlink()
    os.mkfifo(index, 0o600)
    assert service(state_dir, clock).allocate("b").session_id == "b"


# --- what a hostile review found (2026-12-07) -------------------------------------------


@pytest.mark.parametrize("ahead", [False, True], ids=["at-save", "written-ahead"])
def test_a_ledger_rewritten_in_place_during_a_save_is_never_spliced(
    state_dir: Path, clock: FakeClock, ahead: bool
) -> None:
    """A save copies the leases it did not change from the file it loaded (kept open, not
    read): a program that rewrites the file in place meanwhile, taking no lock, makes
    the save fail in one line with nothing written, never a file spliced from both;
    also when the leases were copied to the new file before the edit (write_ahead)."""
    svc = service(state_dir, clock)
    for session in ("a", "b", "c"):
        svc.allocate(session)
    path = state_dir / "leases.json"
    ledger = service(state_dir, clock).ledger
    with ledger.locked():
        state = ledger.load()  # through the index: the file held open, not read
        if ahead:
            ledger.write_ahead(state)
            assert len([p for p in state_dir.iterdir() if p.name.endswith(".tmp")]) == 1
        edited = path.read_bytes().replace(b'"ttl_minutes":120', b'"ttl_minutes":999', 1)
        with path.open("r+b") as file:  # in place, same length, as an editor may
            file.write(edited)
        info = path.stat()  # at a later clock tick than the save that wrote it
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
        with pytest.raises(PortallocError, match="changed on disk while being saved"):
            # A new lease after the file's: every lease of the file kept as it was.
            request = allocator.Request(session_id="d", config=svc.config)
            ledger.save(allocator.grant(state, request, clock(), None).state)
    assert path.read_bytes() == edited  # the editor's file, whole; no temp file left
    assert sorted(p.name for p in state_dir.iterdir() if ".tmp" in p.name) == []
    assert sorted(service(state_dir, clock).ledger.load().leases) == ["a", "b", "c"]


def test_an_index_that_does_not_describe_its_file_is_removed_in_one_line(
    state_dir: Path, clock: FakeClock
) -> None:
    """An index whose seal matches but whose columns do not (made by hand): the lease it
    misplaces is never guessed at; one line, the index removed, and the next command
    reads the file whole."""
    from portalloc.ledger.index import _seal, dump_index, parse_index

    svc = service(state_dir, clock)
    for session in ("a", "b", "c"):
        svc.allocate(session)
    path, index_path = state_dir / "leases.json", next(state_dir.glob("leases.json.index-*"))
    seal = _seal([], path.stat())
    index = parse_index(index_path.read_bytes(), seal)
    assert index is not None
    index.bounds[2] += 5  # lease "b" starts five bytes late
    atomic_write(index_path, b"".join(dump_index(index, seal)))
    with pytest.raises(PortallocError, match="index does not describe lease 1"):
        service(state_dir, clock).release("b")
    assert not index_path.exists()
    service(state_dir, clock).release("b")
    assert sorted(service(state_dir, clock).ledger.load().leases) == ["a", "c"]


def test_an_index_whose_homes_are_not_the_files_is_removed_in_one_line(
    state_dir: Path, clock: FakeClock
) -> None:
    """An index made by hand that lists a home the file's homes text does not hold where
    it says (a hostile review's forged duplicate): one line and the index removed, no
    internal error; the next command reads the file whole and grants what it would."""
    from portalloc.ledger.index import _Column, _seal, dump_index, parse_index

    settings = {"base": 10000, "range": 4, "max_sessions": 200}
    svc = service(state_dir, clock, **settings)
    for number in range(70):
        svc.allocate(f"s{number}")
    svc.release("s1")
    path, index_path = state_dir / "leases.json", next(state_dir.glob("leases.json.index-*"))
    seal = _seal([], path.stat())
    index = parse_index(index_path.read_bytes(), seal)
    assert index is not None
    forged = index._replace(
        home_ids=_Column.of(["s1", *index.home_ids]),
        home_starts=array("q", [12000, *index.home_starts]),
    )
    atomic_write(index_path, b"".join(dump_index(forged, seal)))
    with pytest.raises(PortallocError, match="index does not describe the homes"):
        service(state_dir, clock, **settings).allocate("s1")
    assert not index_path.exists()
    again = service(state_dir, clock, **settings).allocate("s1")
    assert again.block_start == 10004  # its home, as the file says


def test_a_name_two_leases_claim_is_the_first_ones(state_dir: Path, clock: FakeClock) -> None:
    """A file another user of a shared state dir wrote may give a lease of theirs another
    lease's slug: the load rules leave the second claimant out (the proxy would route
    that name to a port outside its lease), and no save ever writes two."""
    svc = service(state_dir, clock)
    for session in ("alpha", "beta"):
        svc.allocate(session)
    path = state_dir / "leases.json"
    forge(path, {"slug": "alpha"}, "beta")
    warnings: list[str] = []
    config = PortAllocatorConfig(state_dir=state_dir, skip_port_check=True)
    other = PortAllocatorService(config, clock=clock, on_warning=warnings.append)
    assert sorted(other.ledger.load().leases) == ["alpha"]
    assert any("has 'alpha''s name" in warning for warning in warnings)
    other.allocate("gamma")
    state = other.ledger.load()
    twin = state.leases["gamma"]._replace(slug="alpha")
    with other.ledger.locked(), pytest.raises(AssertionError, match="two leases are named"):
        other.ledger.save(state.with_leases(state.leases.updated({"gamma": twin})))
    fresh = service(state_dir, clock).ledger  # through the index: only the change checked
    with fresh.locked():
        indexed = fresh.load()
        assert type(indexed.leases).__name__ == "_IndexedLeases"
        with pytest.raises(AssertionError, match="two leases are named"):
            fresh.save(indexed.with_leases(indexed.leases.updated({"gamma": twin})))


# --- the index's text columns: searched in their joined text as a split would answer ---

# Short texts from few letters (and '' for a lease with no slug), so that values are
# often prefixes, suffixes or pieces of each other ("a", "ab", "b-a").
_TEXTS = st.text(alphabet="ab-", max_size=3)


@given(items=st.lists(_TEXTS, max_size=12), probe=_TEXTS, split=st.booleans())
def test_a_column_finds_what_its_split_holds(items: list[str], probe: str, split: bool) -> None:
    from portalloc.ledger.index import _Column, _joined, _unpack_index

    column = _Column(_joined(items), len(items))
    if split:
        column.items()  # answered from the list where it was split already
    values = [*items, probe]
    for value in values:
        expected = [at for at, item in enumerate(items) if item == value]
        assert list(column.positions(value)) == expected
        assert column.find(value) == (expected[0] if expected else -1)
        for position in range(-1, len(items) + 1):
            assert column.holds(position, value) == (position in expected)
    assert column.find("a\0b") == -1 and column.find(3) == -1
    assert len(column) == len(items) and list(column) == items
    # The index keeps a column's text and count: one of another count is refused.
    packed = (len(items), column.text, b"", b"", column.text, b"", b"", 0, 0, "", b"", 0)
    if items:
        assert _unpack_index((*packed, column.text, 0)).ids == column
    with pytest.raises(ValueError, match="column"):
        _unpack_index((*packed, column.text + "\0", 0))


@given(
    parts=st.lists(
        st.tuples(st.lists(_TEXTS, max_size=5), st.integers(0, 5), st.integers(0, 5)),
        max_size=4,
    ),
    extra=st.lists(_TEXTS, max_size=3),
)
def test_a_built_column_is_the_join_of_its_items(
    parts: list[tuple[list[str], int, int]], extra: list[str]
) -> None:
    from portalloc.ledger.index import _Column, _ColumnBuilder

    built, expected = _ColumnBuilder(), []
    for items, first, stop in parts:
        old = _Column.of(items) if first % 2 else _Column("\0".join(items), len(items))
        built.extend_from(old, 0, len(items))  # the whole column: its text, not split
        built.extend_from(old, first, stop)
        expected += items + items[first:stop]
    built.extend(extra)
    expected += extra
    column = built.build()
    assert len(column) == len(expected) and column.items() == expected
    assert column.text.split("\0") == expected if expected else column.text == ""


@given(
    items=st.lists(_TEXTS, max_size=10),
    skip=st.sets(st.integers(0, 9)),
    fresh=st.sets(_TEXTS.filter(bool), max_size=3),
    probe=_TEXTS,
    blank=st.sampled_from([None, ""]),
)
def test_a_taken_view_is_the_set_it_stands_for(
    items: list[str], skip: set[int], fresh: set[str], probe: str, blank: str | None
) -> None:
    from portalloc.ledger.index import _Column, _joined, _Taken

    column = _Column(_joined(items), len(items))
    expected = {item for at, item in enumerate(items) if at not in skip} | fresh
    if blank is not None:
        expected.discard(blank)
    view: AbstractSet[str] = _Taken(column, skip, fresh, blank)
    for value in [*items, *fresh, probe]:
        assert (value in view) == (value in expected)
    assert view == expected and len(view) == len(expected)
    assert view - {probe} == expected - {probe} and view | {probe} == expected | {probe}
    assert all(value in view for value in view)  # after it was made a set, too


@given(
    old=st.lists(_TEXTS.filter(bool), max_size=8, unique=True),
    moves=st.lists(st.tuples(_TEXTS.filter(bool), st.integers(0, 50)), max_size=8),
    limit=st.integers(1, 8),
)
def test_homes_kept_as_columns_move_as_a_dict_does(
    old: list[str], moves: list[tuple[str, int]], limit: int
) -> None:
    """_Homes (the index's columns and the changes since) answers and moves homes as
    LedgerState's dict of them does, the oldest forgotten past the limit."""
    from array import array

    from portalloc.ledger.index import _Column, _Homes, _joined

    homes: dict[str, int] = {key: 4 * at for at, key in enumerate(old)}
    lazy = LedgerState(homes=_Homes(_Column(_joined(old), len(old)), array("q", homes.values())))
    plain = LedgerState(homes=dict(homes))
    for session, block in moves:
        (lazy_after, lazy_gone), (plain_after, plain_gone) = (
            state.moved_home(session, block, limit) for state in (lazy, plain)
        )
        lazy, plain = LedgerState(homes=lazy_after), LedgerState(homes=plain_after)
        assert lazy_gone == plain_gone
        for key in {*old, session}:
            assert lazy.home(key) == plain.home(key)
        assert lazy.home_blocks() == plain.home_blocks()
    assert lazy.homes == plain.homes and list(lazy.homes) == list(plain.homes)


def test_a_grant_that_fails_leaves_no_file_written_ahead(state_dir: Path, clock: FakeClock) -> None:
    """The file's leases written ahead for a grant that then finds no free block: the
    ledger stays as it was and the temp file goes before the lock is released."""
    svc = service(state_dir, clock, max_sessions=3)
    for session in ("a", "b", "c"):
        svc.allocate(session)
    path = state_dir / "leases.json"
    before = path.read_bytes()
    with pytest.raises(PortallocError, match="no ports available"):
        service(state_dir, clock, max_sessions=3).allocate("d")
    assert path.read_bytes() == before
    assert [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_sync_ahead_is_written_again(
    state_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync of the leases written ahead fails (EIO): the save writes the whole file
    anew, and when that succeeds the grant is saved as if nothing had happened."""
    import errno

    svc = service(state_dir, clock)
    for session in ("a", "b"):
        svc.allocate(session)
    real_sync, calls = os.fdatasync, []

    def first_fails(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", first_fails)
    service(state_dir, clock).allocate("c")
    monkeypatch.setattr(os, "fdatasync", real_sync)
    assert len(calls) == 2  # the one ahead, then the whole file's
    document = json.loads((state_dir / "leases.json").read_bytes())
    assert [raw["session_id"] for raw in document["leases"]] == ["a", "b", "c"]
    assert [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_a_state_dir_given_as_dot_keeps_its_file_written_ahead(
    state_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PORTALLOC_STATE_DIR=. : the save tells the temp file written ahead from a dead
    writer's by its name, however the directory is spelt (found by a hostile review:
    every other grant failed with ENOENT)."""
    service(state_dir, clock).allocate("a")
    monkeypatch.chdir(state_dir)
    for session in ("b", "c", "d"):
        assert service(Path(), clock).allocate(session).session_id == session  # "."
    document = json.loads((state_dir / "leases.json").read_bytes())
    assert [raw["session_id"] for raw in document["leases"]] == ["a", "b", "c", "d"]


def test_only_a_new_session_has_the_file_written_ahead(
    state_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allocate of a session that has a lease may change nothing: no 5 MiB written
    for it. A long-lived process whose table changed since it was read writes none
    either (its save would not begin with the file's leases)."""
    from portalloc import fs

    made: list[object] = []

    class Counted(fs.Ahead):
        def __init__(self, *args: Any) -> None:
            made.append(self)
            super().__init__(*args)

    monkeypatch.setattr(ledger_module, "Ahead", Counted)
    service(state_dir, clock).allocate("a")  # no file yet
    service(state_dir, clock).allocate("b")
    assert len(made) == 1
    service(state_dir, clock).allocate("b")  # has a lease
    service(state_dir, clock).allocate("a")
    assert len(made) == 1
    long_lived = service(state_dir, clock)
    long_lived.release("a")  # its table: a lease of the file gone
    long_lived.allocate("c")
    assert len(made) == 1
    service(state_dir, clock).allocate("d")
    assert len(made) == 2
    # A new session at max_sessions is refused: nothing written ahead for it (a script
    # retrying while the ledger is full would write the whole file each time).
    with pytest.raises(PortallocError, match="no ports available"):
        service(state_dir, clock, max_sessions=3).allocate("e")  # b, c and d hold it
    assert len(made) == 2

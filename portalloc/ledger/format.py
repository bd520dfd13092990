"""The ledger file's shape on disk: the raw JSON as TypedDicts, the version save()
writes, and the migrations that bring an older file to it (a newer one is refused).

Imported by the read path (through codec.py): every module it imports is start-up
time (bench/README.md).
"""

from __future__ import annotations

import os

from portalloc.records import TypedDict
from portalloc.rules import slug_for

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

LEDGER_VERSION = 4


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
    slug: str | None
    bare: str | None


class RawFile(TypedDict):
    kind: str
    path: str


class RawLedger(TypedDict):
    version: int
    leases: list[RawLease]
    homes: dict[str, int]
    files: dict[str, list[RawFile]]
    slugs: dict[str, str]  # the slugs of sessions whose lease ended (v4)


LEASE_KEYS = frozenset(RawLease.__annotations__)
_LEASE_ORDER = list(RawLease.__annotations__)  # as lease_to_raw() makes them
DOCUMENT_KEYS = frozenset({*RawLedger.__annotations__, "crc32"})


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

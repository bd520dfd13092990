"""The route directory Caddy looks a name up in on every request: `routes/<host>/<port>`,
one empty file per name, in the proxy's private directory.

A lease change writes or removes the files of the names of the leases it changed, and
nothing else: the cost of a write does not grow with the number of leases. `proxy
start` (and a write that finds the ledger is not the file the directory was last
brought up to date with) rebuilds it whole, in place: a name that is right is never
taken away meanwhile.

Only names made by `table` are written (DNS labels under `localhost`, checked
again here), each to a port inside its own lease's block; a name another lease holds
(a ledger edited by hand to give two leases one slug) is left to it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from portalloc.errors import PortallocError
from portalloc.fs import atomic_write
from portalloc.models import Lease, Leases
from portalloc.proxy import ADMIN_SOCKET, ROUTES_DIR, STAMP, ledger_key
from portalloc.rules import DNS_LABEL, URL_DOMAIN

PORT_NAME = re.compile(r"[1-9][0-9]{0,4}")

Blocks = tuple[tuple[int, int], ...]


class Route(NamedTuple):
    """One name the proxy answers, and the port of the lease it forwards to."""

    host: str
    port: int
    session_id: str


def table(leases: Iterable[Lease]) -> list[Route]:
    """Every host name of every lease, to that lease's own port, lowest block first.

    Only a port inside the lease's own block is routed to, only a name the proxy
    answers is made (checked again: it names a directory), and a name two leases claim
    (a hand-edited ledger) goes to the first one alone: no input makes a name forward
    to another lease's port."""
    routes: list[Route] = []
    seen: set[str] = set()
    for lease in sorted(leases, key=lambda lease: lease.start):
        if lease.slug is None or not DNS_LABEL.fullmatch(lease.slug):
            continue  # refused on load and on write: `a.b` would take b's port `a`
        ports = dict(lease.ports)
        for name, host in lease.hosts().items():
            port = ports.get(name or lease.bare or "")
            if port is None or not lease.start <= port <= lease.end or host in seen:
                continue
            if not valid_host(host):
                continue
            seen.add(host)
            routes.append(Route(host, port, lease.session_id))
    return routes


def valid_host(host: str) -> bool:
    """Whether HOST is a name the proxy answers: `<label>.<slug>.localhost` or
    `<slug>.localhost`, each part a DNS label (so it is a safe file name, too)."""
    labels = host.split(".")
    return (
        2 <= len(labels) <= 3
        and labels[-1] == URL_DOMAIN
        and all(DNS_LABEL.fullmatch(label) for label in labels[:-1])
    )


def follow(
    where: Path,
    ledger: Path,
    before: Leases,
    after: Leases,
    whole: bool,
    warn: Callable[[str], None],
) -> None:
    """Bring the route directory in WHERE from the leases BEFORE to AFTER (WHOLE: all of
    them), then stamp it with the LEDGER file it now follows; on failure remove the
    stamp (the next write rebuilds) and say so."""
    stamp = where / STAMP
    try:
        changed = None if whole else after.changed_since(before)
        root = where / ROUTES_DIR
        if changed is None:
            sync(root, after.values())
        else:
            _apply(root, before, after, changed)
        atomic_write(stamp, ledger_key(ledger), 0o600, durable=False)
    except (OSError, PortallocError) as exc:
        try:
            stamp.unlink(missing_ok=True)
        except OSError:
            pass
        if (where / ADMIN_SOCKET).exists():  # not stopped meanwhile (which clears them)
            warn(f"proxy at {where} did not take the new routes ({exc}); the next change retries")


def sync(root: Path, leases: Iterable[Lease]) -> None:
    """Make ROOT hold the names of LEASES and nothing else (a name two leases claim goes
    to the one with the lowest block), changing only what differs."""
    root.mkdir(0o700, exist_ok=True)
    wanted = {route.host: route.port for route in table(leases)}
    present = _scan(root, tidy=True)
    for host in present.keys() - wanted.keys():
        _release(root, host, present[host])
    for host, port in wanted.items():
        if present.get(host) != [port]:
            _put(root / host, port, present.get(host, []))


def _apply(root: Path, before: Leases, after: Leases, changed: Iterable[str]) -> None:
    """The names of the CHANGED sessions' leases: the names they gave up first, then the
    ones they took or moved (the new port's file before the old one goes: no gap)."""
    gone: list[tuple[str, int]] = []
    taken: list[tuple[str, int, Blocks]] = []
    for session_id in changed:
        old, new = before.get(session_id), after.get(session_id)
        old_routes = {route.host: route.port for route in table([old] if old else [])}
        new_routes = {route.host: route.port for route in table([new] if new else [])}
        if old_routes == new_routes:
            continue  # a refresh: the same names to the same ports
        own = tuple((lease.start, lease.end) for lease in (old, new) if lease is not None)
        gone += [(host, port) for host, port in old_routes.items() if host not in new_routes]
        taken += [
            (host, port, own) for host, port in new_routes.items() if old_routes.get(host) != port
        ]
    if not (gone or taken):
        return
    root.mkdir(0o700, exist_ok=True)
    for host, port in gone:
        _release(root, host, [port])
    for host, port, own in taken:
        present = _ports(root / host)
        if all(any(start <= other <= end for start, end in own) for other in present):
            _put(root / host, port, present)
        # else: another lease's port answers this name (two leases given one slug by
        # hand); it stays theirs, and this lease's port is never put beside it.


def _put(directory: Path, port: int, present: list[int]) -> None:
    """DIRECTORY (one name) answers PORT alone: its file made, then the others removed."""
    try:
        directory.mkdir(0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):  # nothing but ours belongs here
            _remove(directory)
            directory.mkdir(0o700)
    if port not in present:
        atomic_write(directory / str(port), b"", 0o600, durable=False)
    for other in present:
        if other != port:
            _unlink(directory / str(other))


def _release(root: Path, host: str, ports: list[int]) -> None:
    for port in ports:
        _unlink(root / host / str(port))
    try:
        (root / host).rmdir()
    except OSError:
        pass  # gone, or not empty: another lease's port answers it (see _apply)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove(path: Path) -> None:
    if stat.S_ISDIR(os.lstat(path).st_mode):
        import shutil  # not on every write: it imports bz2 and lzma

        shutil.rmtree(path)
    else:
        os.unlink(path)


def _ports(directory: Path) -> list[int]:
    """The ports DIRECTORY answers, lowest first; [] when there is none."""
    try:
        with os.scandir(directory) as entries:
            found = [entry.name for entry in entries]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(name) for name in found if _port_name(name))


def _port_name(name: str) -> bool:
    return PORT_NAME.fullmatch(name) is not None and int(name) <= 65535


def _scan(root: Path, tidy: bool) -> dict[str, list[int]]:
    """Each name in ROOT and its ports; TIDY: remove whatever else is there (a link, a
    file, a temp file of a write that was killed)."""
    found: dict[str, list[int]] = {}
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for entry in entries:
        path = Path(entry.path)
        if not (entry.is_dir(follow_symlinks=False) and valid_host(entry.name)):
            if tidy:
                _remove(path)
            continue
        ports: list[int] = []
        with os.scandir(path) as inside:
            for name in [item.name for item in inside]:
                if _port_name(name):
                    ports.append(int(name))
                elif tidy:
                    _remove(path / name)
        found[entry.name] = sorted(ports)
    return found


def served(where: Path) -> list[tuple[str, int]]:
    """(host, port) of each name the proxy in WHERE answers: by slug, the slug with the
    lowest port first, and within one the port names by port, then the bare name."""
    try:
        found = _scan(where / ROUTES_DIR, tidy=False)
    except OSError:
        return []
    routes = [(host, ports[0]) for host, ports in found.items() if ports]
    first: dict[str, int] = {}
    for host, port in routes:
        slug = _slug(host)
        first[slug] = min(port, first.get(slug, port))
    return sorted(
        routes,
        key=lambda route: (
            first[_slug(route[0])],
            _slug(route[0]),
            route[0].count(".") == 1,  # the bare name last
            route[1],
            route[0],
        ),
    )


def _slug(host: str) -> str:
    return host.rsplit(".", 2)[-2]


def clear(where: Path) -> None:
    """No route at all (before Caddy starts, after it stopped)."""
    import shutil

    shutil.rmtree(where / ROUTES_DIR, ignore_errors=True)
    (where / STAMP).unlink(missing_ok=True)

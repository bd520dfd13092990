"""Which running compose stacks are portalloc's orphans: stacks of a worktree that was
removed while they ran, which `portalloc prune --stop` may stop.

Stopping a stack is for good, so a stack is an orphan only when every one of these
holds (anything unsure is no orphan):

1. Portalloc made it: docker's `working_dir` label is a session the ledger remembers
   (an active lease or a block it held, `LedgerState.homes`) or lies inside one, and
   the project name is the one portalloc derives for that session
   (`<prefix>-<first 8 or more hex digits of SHA-256 of the session id>`). A stack
   named by hand or by compose's default (the directory's name) is never one.
2. The session's directory is gone from this machine.
3. It publishes a port in portalloc's blocks that something holds on this machine:
   a stack on another machine's daemon (a docker context whose paths look like
   this machine's) publishes there, not here.
4. Git does not say the worktree lives on: no repository found near it still lists
   it (a worktree moved with `mv`, or deleted by hand without `git worktree prune`),
   and none lists a worktree under git's name for it at another place (moved with
   `git worktree move`, which keeps the name git gave it from its directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path, PurePath

from portalloc.host import Stack, path_exists

DIGEST = re.compile(r"[0-9a-f]{8,64}")
MAX_SIBLINGS = 2000  # directory entries looked at beside a removed worktree
MAX_GIT_FILE = 4096


def _busy(port: int) -> bool:
    from portalloc.probe import port_is_free

    return not port_is_free(port)


def session_of(stack: Stack, sessions: Collection[str]) -> str | None:
    """The session STACK belongs to as portalloc names it, or None: its working
    directory is that session or lies inside it, and its project name is portalloc's
    name for it."""
    workdir = stack.working_dir
    prefix, _dash, digest = stack.project.rpartition("-")
    if not workdir or not PurePath(workdir).is_absolute():
        return None
    if not prefix or not DIGEST.fullmatch(digest):
        return None
    for path in dict.fromkeys((workdir, *_ancestors(os.path.normpath(workdir)))):
        if path in sessions:
            hashed = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()
            if hashed.startswith(digest):
                return path
    return None


def _ancestors(path: str) -> Iterator[str]:
    """PATH and every directory above it."""
    here = PurePath(path)
    yield str(here)
    yield from map(str, here.parents)


def find(
    stacks: Iterable[Stack],
    sessions: Collection[str],
    span: range | None = None,
    *,
    exists: Callable[[str], bool] = path_exists,
    busy: Callable[[int], bool] = _busy,
) -> list[Stack]:
    """The orphans among STACKS (see the module's rule); SESSIONS: what the ledger
    remembers; SPAN: portalloc's blocks (None: any port)."""
    found: list[Stack] = []
    repositories = _Repositories(sessions, exists)
    for stack in stacks:
        ports = [port for port in stack.ports if span is None or port in span]
        if not ports:
            continue
        session = session_of(stack, sessions)
        if session is None or exists(session):
            continue
        if stack.working_dir and exists(stack.working_dir):
            continue
        if not any(busy(port) for port in ports):
            continue  # published on another machine
        if repositories.keep(session):
            continue
        found.append(stack)
    return found


class _Repositories:
    """Git repositories near a removed worktree, asked whether they still list it."""

    def __init__(self, sessions: Collection[str], exists: Callable[[str], bool]) -> None:
        self.sessions = sessions
        self.exists = exists
        self._known: set[Path] | None = None  # common git dirs of the sessions that exist

    def keep(self, worktree: str) -> str | None:
        """Why git says WORKTREE lives on elsewhere (or may), or None."""
        top = Path(os.path.normpath(worktree))
        name = re.compile(re.escape(_loose(top.name)) + r"-?[0-9]*")
        for common in self._near(top):
            for admin, registered in _worktrees(common):
                if registered == top:
                    return f"git still lists it as a worktree of {common}"
                if name.fullmatch(_loose(admin.name)) and self.exists(str(registered)):
                    return f"git moved it to {registered}"
        return None

    def _near(self, worktree: Path) -> set[Path]:
        """The common git directories of the repositories that may hold WORKTREE: those
        of the directories above it, beside it, and of the sessions that still exist."""
        found: set[Path] = set()
        nearest = None
        for directory in worktree.parents:
            if not self.exists(str(directory)):
                continue
            nearest = nearest or directory
            found.update(filter(None, [_common_dir(directory)]))
        if nearest is not None:
            with contextlib.suppress(OSError):
                for count, entry in enumerate(nearest.iterdir()):
                    if count >= MAX_SIBLINGS:
                        break
                    found.update(filter(None, [_common_dir(entry)]))
        if self._known is None:
            self._known = set()
            for session in self.sessions:
                if PurePath(session).is_absolute() and self.exists(session):
                    self._known.update(filter(None, [_common_dir(Path(session))]))
        return found | self._known


def _loose(name: str) -> str:
    """NAME compared loosely: git names a worktree's admin directory
    (`.git/worktrees/<name>`) after its directory, characters a ref may not hold
    replaced and a number added on a clash; erring towards a match errs towards
    "lives on", never towards stopping a stack."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _read(path: Path) -> str | None:
    from portalloc.errors import PortallocError
    from portalloc.fs import read_bytes

    try:
        return read_bytes(path, limit=MAX_GIT_FILE).decode("utf-8", "surrogateescape").strip()
    except (OSError, PortallocError):
        return None


def _common_dir(directory: Path) -> Path | None:
    """The common git directory of the repository DIRECTORY is the top of, or None."""
    dot = directory / ".git"
    try:
        if dot.is_dir():
            return dot
        if not dot.is_file():
            return None
    except OSError:
        return None
    text = _read(dot)
    if text is None or not text.startswith("gitdir:"):
        return None
    admin = Path(os.path.normpath(directory / text[len("gitdir:") :].strip()))
    common = _read(admin / "commondir")
    return Path(os.path.normpath(admin / common)) if common else admin


def _worktrees(common: Path) -> Iterator[tuple[Path, Path]]:
    """(admin directory, worktree top) of each linked worktree COMMON lists."""
    try:
        admins = list((common / "worktrees").iterdir())
    except OSError:
        return
    for admin in admins:
        gitdir = _read(admin / "gitdir")
        if gitdir:
            yield admin, Path(os.path.normpath(admin / gitdir)).parent

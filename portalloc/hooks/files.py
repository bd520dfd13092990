"""What every tool's edit shares: where its file may be, portalloc's block in it, and
what install made, so that uninstall removes exactly that.

Each edit merges into the tool's file between marker lines, is idempotent, and is
removed by `uninstall` without touching anything else; another tool's hook is never
overwritten or disabled. The installed commands never fail the tool's operation.

Files are read and written through `portalloc.fs` only, and never through a symlinked
directory out of the worktree (a committed `.claude -> ~/.claude`): exit 2, one line.

What install created is written down in what it adds, so uninstall needs no state and
removes only that: a file portalloc made carries `# portalloc created: file` (plus how
many directories it made above it) inside its block, or, in JSON, at the end of
portalloc's hook command (a shell comment; also naming the `hooks` / `SessionStart`
containers it made). Uninstall deletes a file only when it carries that mark and holds
nothing else of anyone's, then the directories it made while they are empty; a file or
directory without the mark existed before, and stays.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path
from typing import NamedTuple

from portalloc import blocks, fs
from portalloc.blocks import BEGIN
from portalloc.errors import UsageError, printable
from portalloc.fs import read_bytes


def git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not repo.is_dir():
        raise UsageError(f"{printable(repo)}: not a directory")
    try:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UsageError(f"cannot run git in {printable(repo)}: {reason}") from None


def repo_top(repo: Path) -> Path:
    """The top of the worktree holding REPO."""
    result = git(repo, "rev-parse", "--show-toplevel")
    if result.returncode != 0:
        raise UsageError(f"{printable(repo)} is not inside a git repository")
    return Path(result.stdout.strip())


class Target(NamedTuple):
    """A file portalloc edits, and the directories that bound the edit."""

    path: Path
    # Writes stay inside this directory, symlinks resolved; None: a place git names
    # from its own config or directory (no commit can plant a link there).
    within: Path | None
    # Directories install made are removed on uninstall up to, never including, this.
    floor: Path


def in_worktree(repo: Path, relative: str) -> Target:
    """RELATIVE in REPO's worktree, refused (exit 2) if a symlinked directory on the way
    leads out of it."""
    top = repo_top(repo)
    target = Target(top / relative, top, top)
    fs.check_within(target.path, top)
    return target


# A file portalloc made says so inside its block (or at the end of its JSON command).
CREATED = "portalloc created:"
_CREATED_WORDS = re.compile(r"(\d+) director(?:y|ies)")


class Created(NamedTuple):
    """What install made for a file: the file itself, directories above it, and (JSON)
    containers inside it."""

    file: bool = False
    dirs: int = 0
    keys: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.file or bool(self.dirs) or bool(self.keys)

    def words(self) -> str:
        parts = ["file"] if self.file else []
        if self.dirs:
            parts.append(f"{self.dirs} director{'y' if self.dirs == 1 else 'ies'}")
        return f"{CREATED} " + ", ".join([*parts, *self.keys])

    @classmethod
    def parse(cls, text: str) -> Created:
        """The mark in TEXT (a marker line or a command); Created() if there is none."""
        _before, found, rest = text.partition(CREATED)
        if not found:
            return cls()
        file, dirs, keys = False, 0, []
        for word in rest.strip().split(", "):
            match = _CREATED_WORDS.fullmatch(word)
            if word == "file":
                file = True
            elif match:
                dirs = min(int(match.group(1)), 64)
            elif word in ("hooks", "SessionStart"):
                keys.append(word)
        return cls(file, dirs, tuple(keys))


def block_created(text: str) -> Created:
    """The created mark inside portalloc's blocks in TEXT."""
    lines = text.splitlines()
    for span in blocks.spans(lines):
        for index in span:
            line = lines[index].rstrip("\r\n")
            if line.startswith(f"# {CREATED}"):
                return Created.parse(line)
    return Created()


def marked(block: str, created: Created) -> str:
    """BLOCK (starting with BEGIN) with CREATED's marker line right after BEGIN."""
    if not created:
        return block
    return block.replace(f"{BEGIN}\n", f"{BEGIN}\n# {created.words()}\n", 1)


def existing(target: Target) -> tuple[str | None, int | None]:
    """TARGET's text and mode, (None, None) when there is no file: never through a
    symlink, a FIFO or out of the worktree."""
    if target.within is not None:
        fs.check_within(target.path, target.within)
    info = _check_regular(target.path)
    if info is None:
        return None, None
    return read(target.path), stat.S_IMODE(info.st_mode)


def make_parent(target: Target) -> int:
    """Create TARGET's missing directories; return how many were made."""
    directory = target.path.parent
    if target.within is not None:
        return len(fs.make_dirs(directory, target.within))
    made = 0
    missing = []
    while not os.path.lexists(directory) and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o755)
        made += 1
    return made


def write(target: Target, text: str, mode: int) -> None:
    fs.atomic_write(target.path, text.encode("utf-8"), mode=mode, within=target.within)


def delete(target: Target, created: Created) -> None:
    """Remove TARGET's file, then the directories install made above it while they are
    empty; never the floor or anything outside it."""
    target.path.unlink()
    floor = Path(os.path.normpath(target.floor))
    for directory in list(target.path.parents)[: created.dirs]:
        path = Path(os.path.normpath(directory))
        if floor not in path.parents:
            break
        try:
            path.rmdir()
        except OSError:
            break  # not empty (something of the user's), or gone


def kept_created(text: str | None, dirs: int) -> Created:
    """The mark for a file about to be written: the one already in TEXT, or, for a file
    that is not there yet, "created" with the DIRS made for it."""
    if text is None:
        return Created(file=True, dirs=dirs)
    return block_created(text)


def remove_block(target: Target, leftover: tuple[str, ...]) -> Path | None:
    """Take portalloc's block out of TARGET; delete the file when install made it and
    what is left is one of LEFTOVER (stripped). Return its path if anything changed."""
    text, mode = existing(target)
    if text is None or mode is None:
        return None
    kept = without(text)
    if kept == text:
        return None
    created = block_created(text)
    if created.file and kept.strip() in leftover:
        delete(target, created)
    else:
        write(target, kept, mode)
    return target.path


def without(text: str) -> str:
    """TEXT with portalloc's blocks (marker lines included) taken out; a begin marker
    without an end is left as it is, with everything after it."""
    lines = text.splitlines(keepends=True)
    ours = blocks.inside(lines)
    return "".join(line for index, line in enumerate(lines) if index not in ours)


def read(path: Path) -> str:
    """PATH's text exactly: bytes decoded without newline translation (CRLF stays CRLF)."""
    try:
        return read_bytes(path, follow=False).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{printable(path)} is not UTF-8 text; refusing to edit it") from None


def _check_regular(path: Path) -> os.stat_result | None:
    """PATH's lstat, None if nothing is there; refused unless a writable regular file."""
    info = fs.lstat_regular(path)
    if info is not None and not os.access(path, os.W_OK):
        raise UsageError(f"{printable(path)}: not writable")
    return info

"""Files portalloc writes for users (the manifest, the managed .env block), refused where
writing would be unsafe, and left untouched when nothing in them would change."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from portalloc.errors import PortallocError, UsageError
from portalloc.ledger import atomic_write

if TYPE_CHECKING:
    from portalloc.models import PortAllocation

MANIFEST_NAME = ".worktree-ports.json"
MANIFEST = "manifest"
ENV_FILE = "env_file"
BLOCK_BEGIN = "# >>> portalloc >>>"
BLOCK_END = "# <<< portalloc <<<"


def manifest_path(target: Path) -> Path:
    """TARGET itself, or the manifest inside it when TARGET is a directory."""
    target = target.absolute()
    return target / MANIFEST_NAME if target.is_dir() and not target.is_symlink() else target


def check_writable(path: Path, option: str, state_dir: Path) -> None:
    """Refuse anything but a regular file or nothing at PATH, and portalloc's own files."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror or exc}") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise UsageError(f"{option} {path}: refusing to write, it is {kind}")
    ledger = (state_dir / "leases.json").absolute()
    if path.parent.resolve() == ledger.parent.resolve() and path.name.startswith(ledger.name):
        raise UsageError(f"{option} {path}: refusing to overwrite portalloc's ledger")


def file_in_worktree(tree: Path, relative: str, key: str) -> Path:
    """TREE/RELATIVE for a profile key, refused unless it really lies in the worktree:
    no symlink on the way (a committed link could point anywhere), nothing in `.git`."""
    top = Path(os.path.realpath(tree))
    target = top / relative
    if ".git" in Path(relative).parts:
        raise UsageError(f"{key} = {relative!r}: refusing to write inside .git")
    if Path(os.path.realpath(target)) != Path(os.path.normpath(target)):
        raise UsageError(f"{key} = {relative!r}: a symlink on the way; refusing to follow it")
    return target


def manifest_bytes(allocation: PortAllocation) -> bytes:
    return (json.dumps(allocation.to_dict(), indent=2, ensure_ascii=False) + "\n").encode()


def write_manifest(path: Path, allocation: PortAllocation) -> None:
    """Write the allocation as JSON to PATH atomically, leaving an identical file alone."""
    data = manifest_bytes(allocation)
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write(path, data, mode=0o644)


def block_spans(lines: list[str], begin: str = BLOCK_BEGIN, end: str = BLOCK_END) -> list[range]:
    """The line ranges of portalloc's blocks: a begin marker with an end marker after it.

    Each end marker closes the nearest begin marker before it; a begin marker without
    an end is no block: the lines after it are someone's, and are never swallowed."""
    spans: list[range] = []
    opened: int | None = None
    for index, line in enumerate(lines):
        marker = line.rstrip("\r\n")
        if marker == begin:
            opened = index
        elif marker == end and opened is not None:
            spans.append(range(opened, index + 1))
            opened = None
    return spans


def merge_block(existing: str | None, block: str) -> str:
    """EXISTING with its managed block replaced by BLOCK (lines, each ending in a newline),
    or BLOCK appended, every byte outside the block kept as it was."""
    managed = f"{BLOCK_BEGIN}\n{block}{BLOCK_END}\n"
    if not existing:
        return managed
    lines = existing.splitlines(keepends=True)
    spans = block_spans(lines)
    if spans:
        first = spans[0]
        return "".join(lines[: first.start]) + managed + "".join(lines[first.stop :])
    separator = "" if existing.endswith("\n") else "\n"
    return existing + separator + managed


def keys_outside(text: str) -> set[str]:
    """Variables a dotenv file sets outside portalloc's managed block."""
    lines = text.splitlines()
    inside = {index for span in block_spans(lines) for index in span}
    keys: set[str] = set()
    for index, raw in enumerate(lines):
        line = raw.strip()
        if index not in inside and line and not line.startswith("#") and "=" in line:
            name = line.split("=", 1)[0].strip()
            keys.add(name.removeprefix("export ").strip())
    return keys


def write_env_file(path: Path, env: dict[str, str], warn: Callable[[str], None]) -> bool:
    """Merge the dotenv block for ENV into PATH; True if the file was written.

    A repeat with the same values leaves the file byte-identical and untouched (its
    mtime too), so tools watching it (docker compose, Vite, direnv) see no change.
    """
    from portalloc.render import render_dotenv

    try:
        # Bytes, decoded without newline translation: a CRLF line stays CRLF.
        existing: str | None = path.read_bytes().decode("utf-8")
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        existing, mode = None, 0o644
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; refusing to rewrite it") from None
    clash = sorted(keys_outside(existing or "") & set(env))
    if clash:
        warn(
            f"{path} also sets {', '.join(clash)} outside portalloc's block; "
            "whichever a tool reads last wins"
        )
    merged = merge_block(existing, render_dotenv(env))
    if merged == existing:
        return False
    atomic_write(path, merged.encode("utf-8"), mode=mode)
    return True


def refresh(kind: str, path: str, allocation: PortAllocation) -> bool:
    """Rewrite a file recorded for the allocation's session after its ports moved.

    The record comes from the ledger, which other users may write in a shared state
    dir: only a regular file of ours that already is this session's file is touched.
    """
    target = Path(path)
    if kind not in (MANIFEST, ENV_FILE) or not target.is_absolute():
        return False
    try:
        info = target.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return False
        if kind == ENV_FILE:
            # Only a file that already holds portalloc's block is portalloc's to rewrite.
            if not block_spans(target.read_bytes().decode("utf-8").splitlines()):
                return False
            return write_env_file(target, allocation.env, lambda _message: None) or True
        current = json.loads(target.read_bytes())
    except (OSError, ValueError, RecursionError, PortallocError):
        return False
    if type(current) is not dict or current.get("session_id") != allocation.session_id:
        return False
    try:
        write_manifest(target, allocation)
    except OSError:
        return False
    return True

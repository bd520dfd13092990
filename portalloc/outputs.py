"""Files portalloc writes for users (the manifest), refused where writing would be unsafe."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from portalloc.errors import UsageError
from portalloc.ledger import atomic_write

if TYPE_CHECKING:
    from portalloc.models import PortAllocation

MANIFEST_NAME = ".worktree-ports.json"
MANIFEST = "manifest"


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


def refresh(kind: str, path: str, allocation: PortAllocation) -> bool:
    """Rewrite a file recorded for the allocation's session after its ports moved.

    The record comes from the ledger, which other users may write in a shared state
    dir: only a regular file of ours that already is this session's file is touched.
    """
    target = Path(path)
    if kind != MANIFEST or not target.is_absolute():
        return False
    try:
        info = target.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return False
        current = json.loads(target.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    if type(current) is not dict or current.get("session_id") != allocation.session_id:
        return False
    try:
        write_manifest(target, allocation)
    except OSError:
        return False
    return True

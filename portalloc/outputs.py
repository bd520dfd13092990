"""Files portalloc writes for users (the manifest, the managed .env block), refused where
writing would be unsafe, and left untouched when nothing in them would change.

portalloc replaces only what is its own:

- A manifest (`--write FILE`, profile `manifest`) replaces an existing file only when
  that file is a portalloc manifest: at most MANIFEST_MAX_BYTES, a JSON object whose
  `session_id`, `compose_project_name`, `created_at` and `expires_at` are strings and
  which has at least one integer `<name>_port` (the allocation object every portalloc
  version wrote). Anything else is refused with exit 2 and left as it is.
- An env file's managed block names the session it was written for, on a comment line
  inside it (`# session sha256:<32 hex of the session id's SHA-256>`; dotenv readers skip
  comments). A ports-moved refresh from a ledger record rewrites only a block that names
  the same session; an explicit `env --env-file` takes another session's block over,
  and says so on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portalloc import blocks, fs
from portalloc.config import LEDGER_NAME, MANIFEST_NAME
from portalloc.errors import PortallocError, UsageError, printable
from portalloc.fs import read_bytes

if TYPE_CHECKING:
    from portalloc.models import PortAllocation

MANIFEST = "manifest"
ENV_FILE = "env_file"
OWNER_PREFIX = "# session sha256:"
_OWNER_LINE = re.compile(r"# session sha256:([0-9a-f]{32})")
MANIFEST_MAX_BYTES = 1 << 20
MANIFEST_STRINGS = ("session_id", "compose_project_name", "created_at", "expires_at")
NOT_A_MANIFEST = "not a portalloc manifest; remove it or choose another path"


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
    ledger = (state_dir / LEDGER_NAME).absolute()
    if path.parent.resolve() == ledger.parent.resolve() and path.name.startswith(ledger.name):
        raise UsageError(f"{option} {path}: refusing to overwrite portalloc's ledger")
    if option == "--write" and info is not None:
        # Checked before anything is leased, and again when the manifest is written.
        try:
            data = read_bytes(path, follow=False) if info.st_size <= MANIFEST_MAX_BYTES else b""
        except OSError as exc:
            raise UsageError(f"{option} {printable(path)}: {exc.strerror or exc}") from None
        if parse_manifest(data) is None:
            raise UsageError(f"{option} {printable(path)}: {NOT_A_MANIFEST}")


def parse_manifest(data: bytes) -> dict[str, Any] | None:
    """DATA as a portalloc manifest (the allocation object), or None if it is not one."""
    if len(data) > MANIFEST_MAX_BYTES:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if type(value) is not dict:
        return None
    if not all(type(value.get(key)) is str for key in MANIFEST_STRINGS):
        return None
    ports = [k for k, v in value.items() if k.endswith("_port") and type(v) is int]
    return value if ports else None


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
    """Write the allocation as JSON to PATH atomically, leaving an identical file alone.
    An existing file is replaced only when it is a portalloc manifest (UsageError)."""
    data = manifest_bytes(allocation)
    try:
        current: bytes | None = read_bytes(path, follow=False)
    except FileNotFoundError:
        current = None
    if current == data:
        return
    if current is not None and parse_manifest(current) is None:
        raise UsageError(f"--write {printable(path)}: {NOT_A_MANIFEST}")
    fs.atomic_write(path, data, mode=0o644)


def owner_line(session_id: str) -> str:
    """The comment line that marks a managed block as SESSION_ID's (no newline)."""
    digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()
    return OWNER_PREFIX + digest[:32]


def block_owner(text: str) -> str | None:
    """The owner line of TEXT's (first) managed block; "" for a block without one (an
    older portalloc's); None when TEXT holds no block."""
    lines = text.splitlines()
    spans = blocks.spans(lines)
    if not spans:
        return None
    for index in spans[0]:
        line = lines[index].rstrip("\r\n")
        if _OWNER_LINE.fullmatch(line):
            return line
    return ""


def _block_value(text: str, name: str) -> str | None:
    """NAME's value as written inside TEXT's first managed block (None if absent)."""
    lines = text.splitlines()
    spans = blocks.spans(lines)
    for index in spans[0] if spans else ():
        key, sep, value = lines[index].partition("=")
        if sep and key.strip() == name:
            return value.strip().strip("'\"")
    return None


def merge_block(existing: str | None, block: str) -> str:
    """EXISTING with its managed block replaced by BLOCK (lines, each ending in a newline),
    or BLOCK appended, every byte outside the block kept as it was."""
    managed = f"{blocks.BEGIN}\n{block}{blocks.END}\n"
    if not existing:
        return managed
    lines = existing.splitlines(keepends=True)
    spans = blocks.spans(lines)
    if spans:
        first = spans[0]
        return "".join(lines[: first.start]) + managed + "".join(lines[first.stop :])
    separator = "" if existing.endswith("\n") else "\n"
    return existing + separator + managed


# A dotenv line that sets a variable, as docker compose and python-dotenv read one:
# `NAME=...` or `export NAME = ...`; comments and anything else set nothing.
_DOTENV_KEY = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")


def dotenv_key(line: str) -> str | None:
    """The variable a dotenv LINE sets, or None."""
    match = _DOTENV_KEY.match(line)
    return match.group(1) if match else None


def keys_outside(text: str) -> set[str]:
    """Variables a dotenv file sets outside portalloc's managed block."""
    lines = text.splitlines()
    ours = blocks.inside(lines)
    found = (dotenv_key(line) for index, line in enumerate(lines) if index not in ours)
    return {key for key in found if key is not None}


def write_env_file(
    path: Path,
    env: dict[str, str],
    warn: Callable[[str], None],
    *,
    session_id: str,
    take_over: bool = True,
) -> bool:
    """Merge the dotenv block for ENV, marked as SESSION_ID's, into PATH; True if the
    file was written.

    A block that names another session is taken over only with TAKE_OVER (an explicit
    `--env-file`; WARN says so), else left as it is. A repeat with the same values
    leaves the file byte-identical and untouched (its mtime too), so tools watching it
    (docker compose, Vite, direnv) see no change.
    """
    from portalloc.render import render_dotenv

    try:
        # Bytes, decoded without newline translation: a CRLF line stays CRLF.
        data, info = fs.read_with_stat(path, follow=False)
        existing: str | None = data.decode("utf-8")
        mode = stat.S_IMODE(info.st_mode)
    except FileNotFoundError:
        existing, mode = None, 0o644
    except UnicodeDecodeError:
        raise UsageError(f"{printable(path)} is not UTF-8 text; refusing to rewrite it") from None
    mine = owner_line(session_id)
    owner = block_owner(existing or "")
    if owner and owner != mine:
        if not take_over:
            return False
        warn(
            f"{printable(path)}: portalloc's block there was written for another session; "
            f"it now holds {printable(session_id)}'s ports"
        )
    clash = sorted(keys_outside(existing or "") & set(env))
    if clash:
        warn(
            f"{printable(path)} also sets {', '.join(clash)} outside portalloc's block; "
            "whichever a tool reads last wins"
        )
    merged = merge_block(existing, f"{mine}\n{render_dotenv(env)}")
    if merged == existing:
        return False
    fs.atomic_write(path, merged.encode("utf-8"), mode=mode)
    return True


def refresh(kind: str, path: str, allocation: PortAllocation) -> bool:
    """Rewrite a file recorded for the allocation's session after its ports moved.

    The record comes from the ledger, which other users may write in a shared state
    dir: only a regular file of ours that already is this session's file is touched: a
    manifest of this session, or an env file whose block was last written for it. A
    block of another session is never taken over from here.
    """
    target = Path(path)
    if kind not in (MANIFEST, ENV_FILE) or not target.is_absolute():
        return False
    try:
        data, info = fs.read_with_stat(target, follow=False)
        if info.st_uid != os.getuid():
            return False
        if kind == ENV_FILE:
            text = data.decode("utf-8")
            owner = block_owner(text)
            if owner is None:
                return False  # no block: not portalloc's to write into
            # A block an older portalloc wrote names no session: it is this session's
            # when it holds this session's compose project name (a hash of its id).
            if owner != owner_line(allocation.session_id) and not (
                owner == ""
                and _block_value(text, "COMPOSE_PROJECT_NAME") == allocation.compose_project_name
            ):
                return False
            write_env_file(
                target,
                allocation.env,
                lambda _message: None,
                session_id=allocation.session_id,
                take_over=False,
            )
            return True
        current = parse_manifest(data)
    except (OSError, ValueError, RecursionError, PortallocError):
        return False
    if current is None or current.get("session_id") != allocation.session_id:
        return False
    try:
        write_manifest(target, allocation)
    except OSError:
        return False
    return True

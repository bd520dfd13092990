"""Keys in a tool's TOML file in the worktree: merged as portalloc's block, verified by
parsing (every key of the user's reads back the same), never replacing another hook."""

from __future__ import annotations

import json
import tomllib
from typing import TYPE_CHECKING, Any

from portalloc.blocks import BEGIN, END
from portalloc.errors import UsageError
from portalloc.hooks import TomlHook
from portalloc.hooks.files import (
    Created,
    existing,
    in_worktree,
    kept_created,
    make_parent,
    marked,
    remove_block,
    without,
    write,
)

if TYPE_CHECKING:
    from pathlib import Path

    from portalloc.hooks import Tool


def _spec(tool: Tool) -> TomlHook:
    if not isinstance(tool.spec, TomlHook):
        raise TypeError(f"{tool.name}: not a TOML hook")
    return tool.spec


def _string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _parse(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML ({exc}); refusing to edit it") from None


def _blocks(spec: TomlHook, new_file: bool, created: Created) -> tuple[str, str]:
    """(block to put at the top of the file, block to append at its end); the first
    of them carries the CREATED mark. Top-level keys (and a new file's preamble) go at
    the top, where no table header has begun; tables at the end."""
    top = [f"{key} = {value}" for key, value in spec.preamble] if new_file else []
    top += [f"{key} = {_string(command)}" for key, command in spec.tables.get("", {}).items()]
    tables = [
        f"[{table}]\n" + "\n".join(f"{key} = {_string(command)}" for key, command in keys.items())
        for table, keys in spec.tables.items()
        if table
    ]
    first = marked(f"{BEGIN}\n" + "\n".join(top) + f"\n{END}\n", created) if top else ""
    end = "\n".join(tables)
    last = marked(f"{BEGIN}\n{end}\n{END}\n", Created() if top else created) if tables else ""
    return first, last


def _theirs(spec: TomlHook, data: dict[str, Any], drop_preamble: bool) -> dict[str, Any]:
    """DATA without the keys portalloc adds (a table left empty goes too), and without
    the preamble where DROP_PREAMBLE."""
    result = dict(data)
    for table, keys in spec.tables.items():
        if not table:
            for key in keys:
                result.pop(key, None)
        elif isinstance(result.get(table), dict):
            entries = {k: v for k, v in result[table].items() if k not in keys}
            if entries:
                result[table] = entries
            else:
                result.pop(table)
    for key, value in spec.preamble if drop_preamble else ():
        if result.get(key) == value:
            result.pop(key)
    return result


def install(repo: Path, tool: Tool) -> Path:
    """Add portalloc's keys to TOOL's TOML file: merged, marked, verified by parsing."""
    spec = _spec(tool)
    target = in_worktree(repo, tool.file)
    path, top_dir = target.path, target.floor
    if spec.displaces and (top_dir / spec.displaces).exists():
        raise UsageError(
            f"{top_dir / spec.displaces} exists, and {tool.title} stops reading it once "
            f"{tool.file} exists; move its scripts there first"
        )
    found, mode = existing(target)
    text_before = found or ""
    base = without(text_before)
    before = _parse(path, base)
    # A table portalloc would add must not be there at all: TOML allows a table once.
    ours = [*spec.tables.get("", {}), *(table for table in spec.tables if table)]
    clash = [name for name in ours if name in before]
    if clash:
        raise UsageError(
            f"{path} already sets {', '.join(clash)}: portalloc never replaces another "
            f"tool's hook; add its command there yourself"
        )
    new_file = not base.strip()
    # A file that is not there yet is made with its directories; the count is known
    # only once they are made, after every check: the blocks are built again then.
    created = kept_created(found, 0)
    top, end = _blocks(spec, new_file=new_file, created=created)
    text = top + base
    if end:
        text += ("" if not text or text.endswith("\n") else "\n") + end
    after = _theirs(spec, _parse(path, text), new_file)
    # Everything but portalloc's own keys reads the same as in the file as it was (not
    # only as it is without the block: a key of theirs after the block must not move).
    original = _theirs(spec, _parse(path, text_before), new_file)
    if after != original or after != _theirs(spec, before, new_file):
        raise UsageError(f"{path}: cannot add portalloc's keys without changing others")
    if found is None:
        created = Created(file=True, dirs=make_parent(target))
        top, end = _blocks(spec, new_file=new_file, created=created)
        text = top + end
    if text != found:
        write(target, text, 0o644 if mode is None else mode)
    return path


def uninstall(repo: Path, tool: Tool) -> Path | None:
    """Take portalloc's lines out of TOOL's TOML file; remove a file left empty. Refused
    when that would change how any key of the user's reads."""
    spec = _spec(tool)
    target = in_worktree(repo, tool.file)
    path = target.path
    found, _mode = existing(target)
    if found is not None:
        kept = _parse(path, without(found))
        if _theirs(spec, kept, True) != _theirs(spec, _parse(path, found), True):
            raise UsageError(
                f"{path}: keys of yours follow portalloc's block inside its table; "
                "taking the block out would move them: edit the file by hand"
            )
    return remove_block(target, leftover=("",))

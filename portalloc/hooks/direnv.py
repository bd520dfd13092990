"""direnv's `.envrc` at the worktree top: every `cd` into it exports the worktree's ports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from portalloc.blocks import BEGIN, END
from portalloc.hooks.files import (
    existing,
    in_worktree,
    kept_created,
    marked,
    remove_block,
    without,
    write,
)

if TYPE_CHECKING:
    from pathlib import Path

    from portalloc.hooks import Tool

# direnv evaluates .envrc with bash on every `cd` into the tree; `watch_file` reloads it
# when the profile changes. The env read path makes this cheap (see adapters/entry.py);
# a failing portalloc prints its one line and leaves nothing to eval, so the rest of
# the .envrc still loads.
BLOCK = f"""{BEGIN}
watch_file portalloc.toml pyproject.toml
eval "$(portalloc env)"
{END}
"""


def install(repo: Path, tool: Tool) -> Path:
    """Add portalloc's lines to the worktree's .envrc (then `direnv allow` it)."""
    target = in_worktree(repo, tool.file)
    found, mode = existing(target)
    created = kept_created(found, 0)
    text = without(found or "")
    text += ("" if not text or text.endswith("\n") else "\n") + marked(BLOCK, created)
    if text != found:
        write(target, text, 0o644 if mode is None else mode)
    return target.path


def uninstall(repo: Path, tool: Tool) -> Path | None:
    """Take portalloc's lines out of the worktree's .envrc; remove a file install made
    when nothing else is left in it."""
    return remove_block(in_worktree(repo, tool.file), leftover=("",))

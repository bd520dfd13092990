"""`hook install|uninstall`: the tools of hooks.TOOLS --for names, wired or unwired in
turn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from portalloc.errors import UsageError
from portalloc.hooks import TOOLS, Tool


def chosen(names: list[str] | None) -> list[Tool]:
    """The tools NAMES (default git), each once, or a UsageError naming the unknown."""
    picked = list(dict.fromkeys(names or ["git"]))
    unknown = [name for name in picked if name not in TOOLS]
    if unknown:
        raise UsageError(f"unknown tool {', '.join(unknown)} (supported: {', '.join(TOOLS)})")
    return [TOOLS[name] for name in picked]


def install(names: list[str] | None, repo: Path | None) -> Iterator[tuple[Tool, Path]]:
    """Wire each tool NAMES in REPO (default: the current one), yielding it and the file
    it edited as each is done."""
    where = (repo or Path.cwd()).absolute()
    for tool in chosen(names):
        yield tool, tool.install(where)


def uninstall(names: list[str] | None, repo: Path | None) -> Iterator[tuple[Tool, Path | None]]:
    """Take portalloc's part out of each tool's file, yielding it and the file (None:
    nothing to remove) as each is done."""
    where = (repo or Path.cwd()).absolute()
    for tool in chosen(names):
        yield tool, tool.uninstall(where)

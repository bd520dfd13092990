"""git's post-checkout hook: every `git worktree add` leases the new worktree's ports.

The hook goes where git looks for it; that may lie outside the worktree, in git's own
directory or at a `core.hooksPath` of the repository's config, which no commit can
set. A hooks path inside the worktree (a relative `core.hooksPath`) is held to it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from portalloc import fs
from portalloc.blocks import BEGIN, END
from portalloc.errors import UsageError, printable
from portalloc.hooks.files import (
    Created,
    Target,
    block_created,
    existing,
    git,
    make_parent,
    marked,
    remove_block,
    without,
    write,
)

if TYPE_CHECKING:
    from portalloc.hooks import Tool

SHELLS = ("sh", "bash", "dash", "zsh", "ksh")

# git runs post-checkout in the new worktree's top with `<old> <new> <flag>`; a new
# worktree has old = all zeros (40 hex digits, or 64 in a SHA-256 repository) and
# flag 1. Whatever portalloc says, the checkout has happened: never fail it.
BLOCK = f"""{BEGIN}
# Added by `portalloc hook install`; `portalloc hook uninstall` removes it.
case "$1" in
  0000000000000000000000000000000000000000|0000000000000000000000000000000000000000000000000000000000000000)
    if [ "$3" = 1 ] && command -v portalloc >/dev/null 2>&1; then
      portalloc env --worktree "$(pwd -P)" >/dev/null ||
        echo "portalloc: no ports leased for $(pwd -P) (see above); the worktree is fine" >&2
    fi
    ;;
esac
{END}
"""


def hooks_dir(repo: Path) -> Path:
    """Where git looks for hooks in REPO: `git rev-parse --git-path hooks`, so a
    `core.hooksPath` is honoured."""

    hooks_path = git(repo, "config", "--get", "core.hooksPath")
    if hooks_path.returncode == 0 and not hooks_path.stdout.strip():
        raise UsageError(
            f"core.hooksPath is set to an empty value in {repo}: git runs no hooks there"
        )
    if (
        hooks_path.returncode == 0
        and git(repo, "config", "--local", "--get", "core.hooksPath").returncode != 0
    ):
        # A global or system hooksPath: a hook there runs for every repository, and
        # `git clone` everywhere would lease ports. Not this repository's to change.
        raise UsageError(
            f"core.hooksPath ({hooks_path.stdout.strip()}) is set globally, not for {repo}: "
            "a hook there would run for every repository; add portalloc's lines yourself "
            "if that is what you want"
        )
    result = git(repo, "rev-parse", "--path-format=absolute", "--git-path", "hooks")
    if result.returncode != 0:
        raise UsageError(f"{printable(repo)} is not inside a git repository")
    return Path(result.stdout.strip())


def hook(repo: Path) -> Target:
    """REPO's post-checkout hook and where writing it may go.

    In git's own directory (the default `.git/hooks`, shared by linked worktrees) or at
    an absolute `core.hooksPath` of the repository's config, git's word is taken: no
    commit can plant a link there, and the config is the user's. A relative
    `core.hooksPath` (`.githooks`, `.husky/_`) names a directory in the worktree, which
    a commit may have made a link: the hook must stay inside the worktree.
    """
    hooks = hooks_dir(repo)
    configured = git(repo, "config", "--get", "core.hooksPath")
    value = configured.stdout.rstrip("\n") if configured.returncode == 0 else ""
    shown = git(repo, "rev-parse", "--show-toplevel")  # none in a bare repository
    relative = value and not (value.startswith("~") or Path(value).is_absolute())
    if relative and shown.returncode == 0:
        top = Path(shown.stdout.strip())
        # Not the path git reports: it has resolved the links this check is about.
        path = Path(os.path.normpath(top / value)) / "post-checkout"
        fs.check_within(path, top)
        return Target(path, top, top)
    if value:
        return Target(hooks / "post-checkout", None, hooks.parent)
    common = git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir")
    floor = Path(common.stdout.strip()) if common.returncode == 0 else hooks.parent
    return Target(hooks / "post-checkout", None, floor)


def _shell_of(text: str) -> str | None:
    first = text.splitlines()[0] if text else ""
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if not words:
        return None
    program = Path(words[0]).name
    if program == "env" and len(words) > 1:
        program = words[1]
    return program


def merged(text: str | None, block: str) -> str:
    """TEXT with portalloc's block replaced or appended; a new script if none."""
    if not text:
        return "#!/bin/sh\n" + block
    shell = _shell_of(text)
    if shell not in SHELLS:
        raise UsageError(
            f"the existing hook is not a shell script ({shell or 'no #! line'}); "
            f"add portalloc's lines to it yourself:\n{block}"
        )
    # Right after the #! line: a hook that ends in `exit` (husky's do) would never reach
    # lines appended at its end, and the hook's own last command keeps its exit status.
    rest = without(text)
    first, newline, body = rest.partition("\n")
    return first + newline + ("" if newline else "\n") + block + body


def install(repo: Path, tool: Tool) -> Path:
    """Add portalloc's block to REPO's post-checkout hook; return the hook's path."""
    target = hook(repo)
    found, mode = existing(target)
    if found is None:
        dirs = make_parent(target)
        write(target, merged(None, marked(BLOCK, Created(file=True, dirs=dirs))), 0o755)
        return target.path
    text = merged(found, marked(BLOCK, block_created(found)))
    if text != found:
        write(target, text, (0o755 if mode is None else mode) | 0o111)
    return target.path


def uninstall(repo: Path, tool: Tool) -> Path | None:
    """Take portalloc's block out of REPO's post-checkout hook; remove a hook install
    made when nothing else is left in it. Return the hook's path if anything changed."""
    return remove_block(hook(repo), leftover=("", "#!/bin/sh"))

"""`env`: which lease (the session's, or the worktree's), its block in the format asked
for, the profile's files kept current with it, and the files asked for written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from portalloc import outputs
from portalloc.errors import PortallocError, UsageError, printable
from portalloc.facts import worktree_top
from portalloc.host import inside
from portalloc.render import render
from portalloc.rules import has_unprintable

if TYPE_CHECKING:
    from portalloc.models import PortAllocation
    from portalloc.service import PortAllocatorService


class Env(NamedTuple):
    allocation: PortAllocation
    text: str  # the block, rendered in the format asked for


def here() -> Path:
    """The top of the worktree the current directory is in (the session `env` and
    `check` default to)."""
    try:
        cwd = Path.cwd()
    except FileNotFoundError:
        raise UsageError("the current directory no longer exists; pass SESSION") from None
    return worktree_top(cwd)


def target(session: str | None, worktree: Path | None) -> tuple[str, Path | None]:
    """The session `env` leases for, and the worktree it is anchored to: --worktree's
    (a directory inside a worktree means that worktree), else, without SESSION, the
    current one."""
    tree: Path | None = None
    if worktree is not None:
        tree = worktree.resolve()
        if not tree.is_dir():
            raise UsageError(f"--worktree {worktree}: not a directory")
        # A directory inside a worktree means that worktree, as `env` run there does.
        tree = worktree_top(tree)
    elif session is None:
        tree = here()
    return (str(tree) if session is None else session), tree


def env(
    service: PortAllocatorService,
    session: str,
    tree: Path | None,
    fmt: str = "sh",
    *,
    ttl: int | None = None,
    pid: int | None = None,
    write: Path | None = None,
    env_file: Path | None = None,
) -> Env:
    """SESSION's lease (TREE: the worktree it is anchored to), allocated if needed, and
    its block in the format FMT; the manifest (WRITE) and the dotenv block (ENV_FILE)
    written with it (not when FMT cannot say the block), and recorded so they follow
    the lease. For a worktree's own lease the project file's `manifest`
    and `env_file` apply too, but only from a file inside that worktree."""
    profile = service.config.profile
    warn = service.on_warning
    # The profile's files are kept current for a worktree's own lease only, and only
    # from a project file inside that worktree: one in a parent directory (anyone's
    # /tmp/portalloc.toml) does not get to write into it.
    if tree is not None and (profile.manifest or profile.env_file):
        source = profile.source
        if source is None or not inside(os.path.realpath(source), os.path.realpath(tree)):
            warn(f"{source}: env_file and manifest are used only from the worktree's own file")
        else:
            if write is None and profile.manifest:
                write = outputs.file_in_worktree(tree, profile.manifest, "manifest")
            if env_file is None and profile.env_file:
                env_file = outputs.file_in_worktree(tree, profile.env_file, "env_file")
    manifest = None if write is None else outputs.manifest_path(write)
    dotenv = None if env_file is None else env_file.absolute()
    state_dir = service.config.state_dir
    for path, option in ((manifest, "--write"), (dotenv, "--env-file")):
        if path is not None:
            if has_unprintable(str(path)):
                # Undecodable bytes or control characters: the ledger records the
                # path as UTF-8 text, and a terminal would show it raw.
                raise UsageError(f"{option} {printable(path)}: not a printable UTF-8 path")
            outputs.check_writable(path, option, state_dir)
    allocation = service.allocate(
        session, ttl_minutes=ttl, pid=pid, worktree=tree, manifest=manifest, env_file=dotenv
    )
    text = render(allocation.env, fmt)
    if manifest is not None:
        try:
            outputs.write_manifest(manifest, allocation)
        except OSError as exc:
            raise PortallocError(f"--write {manifest}: {exc.strerror or exc}") from None
    if dotenv is not None:
        try:
            outputs.write_env_file(dotenv, allocation.env, warn, session_id=allocation.session_id)
        except OSError as exc:
            raise PortallocError(f"--env-file {dotenv}: {exc.strerror or exc}") from None
    return Env(allocation, text)

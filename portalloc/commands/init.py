"""`init`: make a repository's compose stack worktree-safe (adopt plans and writes),
and trust the profile it wrote."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from portalloc import adopt
from portalloc.errors import PortallocError, UsageError
from portalloc.facts import worktree_top


class Adopted(NamedTuple):
    """What `init` found to change (written, or to be shown as a diff) and its notes."""

    top: Path  # the repository's top
    plan: adopt.Plan
    notes: list[str]


def init(files: list[Path] | None, *, write: bool, warn: Callable[[str], None]) -> Adopted:
    """The plan for FILES (default: the compose files at the top of the repository the
    current directory is in) and the profile that sets its variables; with WRITE,
    written, and a profile it wrote trusted (WARN: why not, if it could not be)."""
    top = worktree_top(Path.cwd())
    paths = list(files) if files else adopt.find_compose_files(top)
    if not paths:
        raise UsageError(
            f"no compose file at {top} (compose*.y*ml, docker-compose*.y*ml); name one"
        )
    plan = adopt.plan(paths, top)
    profile_sets = adopt.add_profile(plan)
    notes = adopt.report(plan, profile_sets) + adopt.hard_coded(plan)
    if write:
        adopt.write(plan)
        if plan.profile_changed:
            trust_written(top, warn)
    return Adopted(top, plan, notes)


def trust_written(top: Path, warn: Callable[[str], None]) -> None:
    """`init --write` trusts the profile it wrote: every [env] entry in it is init's."""
    from portalloc import trust as trusting
    from portalloc.config import trust_dir_for
    from portalloc.profile import find_project_file

    found = find_project_file(top)
    if found is None:
        return
    try:
        _lines, data = trusting.review(found)
        trusting.record(trust_dir_for(os.environ), data, found)
    except PortallocError as exc:
        warn(f"{found}: not trusted ({exc.message})")

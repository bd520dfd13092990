"""`trust` and `untrust`: what a project file's [env] would set, and the user's word
that it may (trust on first use: portalloc.trust)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from portalloc import trust as trusting
from portalloc.config import trust_dir_for
from portalloc.errors import PortallocError
from portalloc.fs import read_bytes


class Review(NamedTuple):
    """A project file and what its [env] would set."""

    path: Path
    lines: list[str]  # the entries, as the file writes them
    data: bytes  # the content a trust record is for
    digest: str


def review(path: Path | None) -> Review:
    """The project file at PATH (a file, or a directory to look in; default: the
    current one), and what it would set."""
    found = trusting.project_file_at(path or Path.cwd())
    lines, data = trusting.review(found)
    return Review(found, lines, data, trusting.digest(data))


def trusted(reviewed: Review) -> bool:
    """Whether the user trusts the content REVIEWED shows, by a record of their own."""
    return trusting.believed(trust_dir_for(os.environ), reviewed.data, reviewed.path)


def trust(reviewed: Review) -> Path:
    """Trust the content REVIEWED shows, wherever it is found; return the record."""
    return trusting.record(trust_dir_for(os.environ), reviewed.data, reviewed.path)


def untrust(path: Path | None) -> tuple[Path, bool]:
    """Forget that the project file at PATH was trusted: the file, and whether it was."""
    found = trusting.project_file_at(path or Path.cwd())
    try:
        data: bytes | None = read_bytes(found)
    except (OSError, PortallocError):
        data = None
    return found, bool(trusting.forget(trust_dir_for(os.environ), data, found))

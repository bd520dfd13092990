"""Which project files the user trusted: one record per file content, by SHA-256, in the
user's own state (never in the repository, never in a shared state dir), as direnv's
allow list and mise's trusted-configs are kept.

A record is a file `<trust dir>/<sha256 hex>` holding the path it was trusted at (for
`untrust` and for people reading the directory). It is believed only when the directory
and the record are the user's own and writable by nobody else.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path  # annotations only: the read path asks private_dir()

TRUST_DIR_NAME = "trusted"


def digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def private_dir(directory: Path | str) -> bool:
    """Whether DIRECTORY is the user's own and nobody else may write into it (a missing
    one counts: portalloc creates it 0700)."""
    try:
        info = os.stat(directory)  # noqa: PTH116 (a str on the read path: no pathlib there)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def trust_dir(state_dir: Path, default_state_dir: Path | None) -> Path | None:
    """Where the user's trust records live: under the state dir when it is private,
    else under the user's default state dir; None when neither is private."""
    for candidate in (state_dir, default_state_dir):
        if candidate is not None and private_dir(candidate):
            return candidate / TRUST_DIR_NAME
    return None


def _owned(info: os.stat_result) -> bool:
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


def is_trusted(directory: Path | None, data: bytes) -> bool:
    """Whether the file content DATA was trusted by this user."""
    if directory is None:
        return False
    try:
        dir_info = os.lstat(directory)
        record = os.lstat(directory / digest(data))
    except OSError:
        return False
    return (
        stat.S_ISDIR(dir_info.st_mode)
        and _owned(dir_info)
        and stat.S_ISREG(record.st_mode)
        and _owned(record)
    )


def inside_repository(directory: Path | None, project_file: Path) -> bool:
    """Whether the trust records in DIRECTORY lie inside the repository (or directory)
    that holds PROJECT_FILE: a state dir there (`PORTALLOC_STATE_DIR=.state`, or
    `$PWD/.portalloc` in an .envrc) could come with the clone, records and all."""
    if directory is None:
        return False
    here = project_file.absolute().parent
    top = next((c for c in (here, *here.parents) if (c / ".git").exists()), None)
    if top is None:
        return False
    real_top = os.path.realpath(top)
    real = os.path.realpath(directory)
    return real == real_top or real.startswith(real_top.rstrip(os.sep) + os.sep)


def believed(directory: Path | None, data: bytes, project_file: Path) -> bool:
    """Whether the user trusted DATA, read from PROJECT_FILE, by a record that did not
    come with the repository."""
    return is_trusted(directory, data) and not inside_repository(directory, project_file)


def _ensure(directory: Path) -> None:
    from portalloc.errors import UsageError

    try:
        directory.mkdir(parents=True, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as exc:
        raise UsageError(f"cannot create {directory}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode) or not _owned(info):
        raise UsageError(f"{directory}: not a directory of yours that only you can write")


def record(directory: Path | None, data: bytes, path: Path) -> Path:
    """Trust the content DATA, read from PATH; return the record written."""
    from portalloc.errors import UsageError

    if directory is None:
        raise UsageError(
            "no private state directory to keep trust records in (the state dir is shared); "
            "set XDG_STATE_HOME to a directory of yours"
        )
    from portalloc.fs import atomic_write

    _ensure(directory)
    target = directory / digest(data)
    atomic_write(target, (str(path) + "\n").encode("utf-8", "surrogateescape"), 0o600)
    return target


def forget(directory: Path | None, data: bytes | None, path: Path) -> list[Path]:
    """Remove the record of DATA and every record made for PATH; return those removed."""
    from portalloc.errors import UsageError
    from portalloc.fs import read_text

    if directory is None or not directory.is_dir():
        return []
    names = {digest(data)} if data is not None else set()
    wanted = str(path)
    removed: list[Path] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    for target in entries:
        if target.name not in names:
            try:
                if read_text(target, follow=False).rstrip("\n") != wanted:
                    continue
            except (OSError, ValueError, UsageError):
                continue
        try:
            target.unlink()
            removed.append(target)
        except FileNotFoundError:
            pass
    return removed


def project_file_at(where: Path) -> Path:
    """The project file WHERE names: the file itself, or the one found walking up from a
    directory; UsageError when there is none."""
    from portalloc.errors import UsageError
    from portalloc.profile import find_project_file

    where = where.absolute()
    if where.is_dir():
        found = find_project_file(where)
        if found is None:
            raise UsageError(
                f"no portalloc.toml or pyproject.toml with [tool.portalloc] at or above {where}"
            )
        return found
    if not where.exists():
        raise UsageError(f"{where}: no such file")
    return where


def review(path: Path) -> tuple[list[str], bytes]:
    """What PATH sets once trusted, a line each, and the content it was read as; raises
    ProfileError for anything refused even when trusted."""
    from portalloc.models import DEFAULT_PROFILE
    from portalloc.profile import load_project_file, safe_entry

    project = load_project_file(path, trust_all=True)
    lines = [f"{key} = {value}" for key, value in project.values.items()]
    profile = project.profile
    if profile is None:
        # Settings only: the built-in default variables apply, trusted or not.
        lines.extend(f"{variable}={template}" for variable, template in DEFAULT_PROFILE.env)
        return lines, project.data
    lines.append(f"compose_prefix = {profile.compose_prefix}")
    lines.extend(f"port {name} = +{offset}" for name, offset in profile.ports)
    for key in ("env_file", "manifest"):
        value = getattr(profile, key)
        if value:
            lines.append(f"{key} = {value}")
    fields = {f"{name}_port" for name, _offset in profile.ports} | {"compose_project_name"}
    lines.extend(
        f"{variable}={template}"
        + ("" if safe_entry(variable, template, fields) else "   (only once trusted)")
        for variable, template in profile.env
    )
    return lines, project.data

"""A SessionStart hook in a tool's settings.json (Claude Code's layout, which Gemini CLI
shares): other settings and hooks are kept as they are."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from portalloc.errors import UsageError, printable
from portalloc.hooks import MARK, JsonHook
from portalloc.hooks.files import Created, Target, delete, existing, in_worktree, make_parent, write

if TYPE_CHECKING:
    from pathlib import Path

    from portalloc.hooks import Tool


def _settings(repo: Path, relative: str) -> tuple[Target, dict[str, object] | None, int]:
    """The settings file, its settings (None: no file) and its mode."""
    target = in_worktree(repo, relative)
    text, mode = existing(target)
    if text is None or mode is None:
        return target, None, 0o644
    try:
        settings = json.loads(text)
    except (ValueError, RecursionError):
        raise UsageError(
            f"{printable(target.path)} is not valid JSON; refusing to edit it"
        ) from None
    if not isinstance(settings, dict):
        raise UsageError(
            f"{printable(target.path)}: the settings are not a JSON object; refusing to edit them"
        )
    return target, settings, mode


def _write(target: Target, settings: dict[str, object], mode: int) -> None:
    try:
        # allow_nan=False: a 1e400 read as inf must not come back as invalid JSON.
        data = json.dumps(settings, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        data.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        raise UsageError(
            f"{printable(target.path)} holds values JSON cannot write back; refusing to edit it"
        ) from None
    write(target, data, mode)


def _ours(entry: object) -> bool:
    return isinstance(entry, dict) and MARK in str(entry.get("command", ""))


def _our_entries(groups: list[Any]) -> list[dict[str, Any]]:
    return [
        entry
        for group in groups
        if isinstance(group, dict) and isinstance(group.get("hooks"), list)
        for entry in group["hooks"]
        if _ours(entry)
    ]


def _command(tool: Tool) -> str:
    if not isinstance(tool.spec, JsonHook):
        raise TypeError(f"{tool.name}: not a settings.json hook")
    return tool.spec.command


def install(repo: Path, tool: Tool) -> Path:
    """Add a SessionStart hook to TOOL's settings.json. What it had to create (the file,
    its directory, the `hooks` object, the `SessionStart` list) the command's comment
    says."""
    command = _command(tool)
    target, found, mode = _settings(repo, tool.file)
    settings: dict[str, object] = {} if found is None else found
    keys = tuple(key for key, there in (("hooks", "hooks" in settings),) if not there)
    hooks = settings.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise UsageError(f"{printable(target.path)}: 'hooks' is not an object; refusing to edit it")
    if "SessionStart" not in hooks:
        keys += ("SessionStart",)
    groups = hooks.setdefault("SessionStart", [])
    if not isinstance(groups, list):
        raise UsageError(
            f"{printable(target.path)}: 'hooks.SessionStart' is not a list; refusing to edit it"
        )
    if _our_entries(groups):
        return target.path
    dirs = make_parent(target) if found is None else 0
    created = Created(file=found is None, dirs=dirs, keys=keys)
    if created:
        command = f"{command}; {created.words()}"
    groups.append({"hooks": [{"type": "command", "command": command}]})
    _write(target, settings, mode)
    return target.path


def uninstall(repo: Path, tool: Tool) -> Path | None:
    """Take portalloc's SessionStart hook out of TOOL's settings.json, and the
    containers, file and directories its install created, when they are left empty."""
    target, settings, mode = _settings(repo, tool.file)
    hooks = None if settings is None else settings.get("hooks")
    groups = hooks.get("SessionStart") if isinstance(hooks, dict) else None
    if settings is None or not isinstance(hooks, dict) or not isinstance(groups, list):
        return None
    ours = _our_entries(groups)
    if not ours:
        return None
    created = Created.parse(str(ours[0].get("command", "")))
    kept = []
    for group in groups:
        if isinstance(group, dict) and isinstance(group.get("hooks"), list):
            entries = [entry for entry in group["hooks"] if not _ours(entry)]
            if len(entries) != len(group["hooks"]):
                if not entries:
                    continue
                group = {**group, "hooks": entries}
        kept.append(group)
    if kept or "SessionStart" not in created.keys:
        hooks["SessionStart"] = kept
    else:
        del hooks["SessionStart"]
        if not hooks and "hooks" in created.keys:
            del settings["hooks"]
    if settings or not created.file:
        _write(target, settings, mode)
    else:
        delete(target, created)
    return target.path

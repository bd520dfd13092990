"""`portalloc hook install|uninstall`: wire portalloc into the tools that create worktrees.

Each edit merges into the tool's file between marker lines, is idempotent, and is
removed by `uninstall` without touching anything else; another tool's hook is never
overwritten or disabled. The installed commands never fail the tool's operation.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

from portalloc.errors import UsageError
from portalloc.ledger import atomic_write

BEGIN = "# >>> portalloc >>>"
END = "# <<< portalloc <<<"
TOOLS = ("git", "direnv", "claude", "gemini", "codex", "conductor", "worktrunk", "mise")
SHELLS = ("sh", "bash", "dash", "zsh", "ksh")

# git runs post-checkout in the new worktree's top with `<old> <new> <flag>`; a new
# worktree has old = all zeros (40 hex digits, or 64 in a SHA-256 repository) and
# flag 1. Whatever portalloc says, the checkout has happened: never fail it.
GIT_BLOCK = f"""{BEGIN}
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


# direnv evaluates .envrc with bash on every `cd` into the tree; `watch_file` reloads it
# when the profile changes. The env read path makes this cheap (see adapters/entry.py);
# a failing portalloc prints its one line and leaves nothing to eval, so the rest of
# the .envrc still loads.
DIRENV_BLOCK = f"""{BEGIN}
watch_file portalloc.toml pyproject.toml
eval "$(portalloc env)"
{END}
"""


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise UsageError(f"cannot run git in {repo}: {exc}") from None


def repo_top(repo: Path) -> Path:
    """The top of the worktree holding REPO."""
    result = _git(repo, "rev-parse", "--show-toplevel")
    if result.returncode != 0:
        raise UsageError(f"{repo} is not inside a git repository")
    return Path(result.stdout.strip())


def install_direnv(repo: Path) -> Path:
    """Add portalloc's lines to the worktree's .envrc (then `direnv allow` it)."""
    envrc = repo_top(repo) / ".envrc"
    _check_regular(envrc)
    existing = _read(envrc) if envrc.exists() else ""
    text = without(existing)
    text += ("" if not text or text.endswith("\n") else "\n") + DIRENV_BLOCK
    if text != existing:
        mode = stat.S_IMODE(envrc.stat().st_mode) if envrc.exists() else 0o644
        atomic_write(envrc, text.encode("utf-8"), mode=mode)
    return envrc


def uninstall_direnv(repo: Path) -> Path | None:
    """Take portalloc's lines out of the worktree's .envrc; remove a file left empty."""
    return _remove_block(repo_top(repo) / ".envrc", leftover=("",))


def _remove_block(path: Path, leftover: tuple[str, ...]) -> Path | None:
    """Take portalloc's block out of PATH; delete the file when what is left is one of
    LEFTOVER (stripped). Return PATH if anything changed."""
    if not path.exists():
        return None
    _check_regular(path)
    existing = _read(path)
    text = without(existing)
    if text == existing:
        return None
    if text.strip() in leftover:
        path.unlink()
    else:
        atomic_write(path, text.encode("utf-8"), mode=stat.S_IMODE(path.stat().st_mode))
    return path


def git_hooks_dir(repo: Path) -> Path:
    """Where git looks for hooks in REPO: `git rev-parse --git-path hooks`, so a
    `core.hooksPath` is honoured."""

    hooks_path = _git(repo, "config", "--get", "core.hooksPath")
    if hooks_path.returncode == 0 and not hooks_path.stdout.strip():
        raise UsageError(
            f"core.hooksPath is set to an empty value in {repo}: git runs no hooks there"
        )
    if (
        hooks_path.returncode == 0
        and _git(repo, "config", "--local", "--get", "core.hooksPath").returncode != 0
    ):
        # A global or system hooksPath: a hook there runs for every repository, and
        # `git clone` everywhere would lease ports. Not this repository's to change.
        raise UsageError(
            f"core.hooksPath ({hooks_path.stdout.strip()}) is set globally, not for {repo}: "
            "a hook there would run for every repository; add portalloc's lines yourself "
            "if that is what you want"
        )
    result = _git(repo, "rev-parse", "--path-format=absolute", "--git-path", "hooks")
    if result.returncode != 0:
        raise UsageError(f"{repo} is not inside a git repository")
    return Path(result.stdout.strip())


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


def merged(existing: str | None, block: str) -> str:
    """EXISTING with portalloc's block replaced or appended; a new script if none."""
    if not existing:
        return "#!/bin/sh\n" + block
    shell = _shell_of(existing)
    if shell not in SHELLS:
        raise UsageError(
            f"the existing hook is not a shell script ({shell or 'no #! line'}); "
            f"add portalloc's lines to it yourself:\n{block}"
        )
    # Right after the #! line: a hook that ends in `exit` (husky's do) would never reach
    # lines appended at its end, and the hook's own last command keeps its exit status.
    rest = without(existing)
    first, newline, body = rest.partition("\n")
    return first + newline + ("" if newline else "\n") + block + body


def without(text: str) -> str:
    """TEXT with portalloc's blocks (marker lines included) taken out; a begin marker
    without an end is left as it is, with everything after it."""
    from portalloc.outputs import block_spans

    lines = text.splitlines(keepends=True)
    ours = {index for span in block_spans(lines, BEGIN, END) for index in span}
    return "".join(line for index, line in enumerate(lines) if index not in ours)


def _read(path: Path) -> str:
    """PATH's text exactly: bytes decoded without newline translation (CRLF stays CRLF)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; refusing to edit it") from None


def install_git(repo: Path) -> Path:
    """Add portalloc's block to REPO's post-checkout hook; return the hook's path."""
    hooks = git_hooks_dir(repo)
    hook = hooks / "post-checkout"
    _check_regular(hook)
    existing = _read(hook) if hook.exists() else None
    text = merged(existing, GIT_BLOCK)
    if text != existing:
        hooks.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(hook.stat().st_mode) if existing is not None else 0o755
        atomic_write(hook, text.encode("utf-8"), mode=mode | 0o111)
    return hook


def uninstall_git(repo: Path) -> Path | None:
    """Take portalloc's block out of REPO's post-checkout hook; remove a hook it leaves
    empty. Return the hook's path if anything changed."""
    return _remove_block(git_hooks_dir(repo) / "post-checkout", leftover=("", "#!/bin/sh"))


def _check_regular(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{path}: refusing to edit it, it is not a regular file")
    if not os.access(path, os.W_OK):
        raise UsageError(f"{path}: not writable")


# JSON has no comments: the command's trailing shell comment marks it as portalloc's.
CLAUDE_MARK = "# added by portalloc hook install"
# Claude Code sources the `export` lines a SessionStart hook appends to
# $CLAUDE_ENV_FILE before every Bash call; $CLAUDE_PROJECT_DIR is the worktree.
CLAUDE_COMMAND = (
    'portalloc env --worktree "$CLAUDE_PROJECT_DIR" >> "$CLAUDE_ENV_FILE" || true  ' + CLAUDE_MARK
)
# Gemini CLI parses a hook's stdout as JSON and offers no env file: the hook makes or
# refreshes the lease (and the profile's .env block), says `{}`, and logs on stderr.
GEMINI_COMMAND = (
    'portalloc env --worktree "${GEMINI_PROJECT_DIR:-$PWD}" >/dev/null || true; '
    "echo '{}'  " + CLAUDE_MARK
)
JSON_HOOKS = {
    "claude": (".claude/settings.json", CLAUDE_COMMAND),
    "gemini": (".gemini/settings.json", GEMINI_COMMAND),
}


def _json_settings(repo: Path, relative: str) -> tuple[Path, dict[str, object]]:
    import json

    path = repo_top(repo) / relative
    _check_regular(path)
    if not path.exists():
        return path, {}
    try:
        settings = json.loads(_read(path))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UsageError(f"{path} is not valid JSON; refusing to edit it") from None
    if not isinstance(settings, dict):
        raise UsageError(f"{path}: the settings are not a JSON object; refusing to edit them")
    return path, settings


def _write_json(path: Path, settings: dict[str, object]) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    try:
        # allow_nan=False: a 1e400 read as inf must not come back as invalid JSON.
        data = (json.dumps(settings, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()
    except (ValueError, UnicodeEncodeError):
        raise UsageError(
            f"{path} holds values JSON cannot write back; refusing to edit it"
        ) from None
    atomic_write(path, data, mode=mode)


def _ours(entry: object) -> bool:
    return isinstance(entry, dict) and CLAUDE_MARK in str(entry.get("command", ""))


def install_json(repo: Path, tool: str) -> Path:
    """Add a SessionStart hook to TOOL's settings.json (Claude Code, Gemini CLI); other
    settings and hooks are kept as they are."""
    relative, command = JSON_HOOKS[tool]
    path, settings = _json_settings(repo, relative)
    hooks = settings.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise UsageError(f"{path}: 'hooks' is not an object; refusing to edit it")
    groups = hooks.setdefault("SessionStart", [])
    if not isinstance(groups, list):
        raise UsageError(f"{path}: 'hooks.SessionStart' is not a list; refusing to edit it")
    present = any(
        _ours(entry)
        for group in groups
        if isinstance(group, dict) and isinstance(group.get("hooks"), list)
        for entry in group["hooks"]
    )
    if not present:
        groups.append({"hooks": [{"type": "command", "command": command}]})
        _write_json(path, settings)
    return path


def uninstall_json(repo: Path, tool: str) -> Path | None:
    """Take portalloc's SessionStart hook out of TOOL's settings.json, and any container
    that leaves empty; remove a file left as `{}`."""
    path, settings = _json_settings(repo, JSON_HOOKS[tool][0])
    hooks = settings.get("hooks")
    groups = hooks.get("SessionStart") if isinstance(hooks, dict) else None
    if not isinstance(hooks, dict) or not isinstance(groups, list):
        return None
    kept = []
    for group in groups:
        if isinstance(group, dict) and isinstance(group.get("hooks"), list):
            entries = [entry for entry in group["hooks"] if not _ours(entry)]
            if len(entries) != len(group["hooks"]):
                if not entries:
                    continue
                group = {**group, "hooks": entries}
        kept.append(group)
    if kept == groups:
        return None
    if kept:
        hooks["SessionStart"] = kept
    else:
        del hooks["SessionStart"]
        if not hooks:
            del settings["hooks"]
    if settings:
        _write_json(path, settings)
    else:
        path.unlink()
    return path


class TomlHook(NamedTuple):
    """A tool that reads its hooks from a TOML file in the worktree."""

    file: str  # relative to the worktree top
    table: str | None  # None: top-level keys
    keys: dict[str, str]  # key -> shell command
    preamble: str = ""  # top-level lines a new file starts with


# The commands never fail the tool's operation: `|| true`, and output kept off the
# tool's own (Codex and Conductor show it; worktrunk templates arrive shell-escaped).
TOML_HOOKS = {
    "codex": TomlHook(
        ".codex/environments/environment.toml",
        None,
        {},
        preamble="version = 1",
    ),
    "conductor": TomlHook(
        ".conductor/settings.toml",
        "scripts",
        {
            "setup": 'portalloc env --worktree "$CONDUCTOR_WORKSPACE_PATH" >/dev/null || true',
            # Resolved as `env --worktree` resolves it: the lease is under the real path.
            "archive": 'portalloc release "$(cd "$CONDUCTOR_WORKSPACE_PATH" && pwd -P)" '
            ">/dev/null || true",
        },
    ),
    "worktrunk": TomlHook(
        ".config/wt.toml",
        None,
        {
            "pre-start": "portalloc env --worktree {{ worktree_path }} >/dev/null || true",
            "post-remove": "portalloc release {{ worktree_path }} >/dev/null || true",
        },
    ),
    "mise": TomlHook(
        "mise.toml",
        "hooks",
        {"enter": "portalloc env >/dev/null 2>&1 || true"},
    ),
}
# Codex's environment file holds two tables, [setup] and [cleanup], each a script.
CODEX_TABLES = {
    "setup": 'portalloc env --worktree "$PWD" >/dev/null || true',
    "cleanup": 'portalloc release "$(pwd -P)" >/dev/null || true',
}


def _toml_string(value: str) -> str:
    import json

    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _toml_parse(path: Path, text: str) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML ({exc}); refusing to edit it") from None


def _toml_block(tool: str, spec: TomlHook, new_file: bool) -> tuple[str, str]:
    """(block to put at the top of the file, block to append at its end)."""
    lines = [f"{k} = {_toml_string(v)}" for k, v in spec.keys.items()]
    if tool == "codex":
        top = [spec.preamble] if new_file else []
        tables = [f"[{t}]\nscript = {_toml_string(v)}" for t, v in CODEX_TABLES.items()]
        end = "\n".join(tables)
        return (f"{BEGIN}\n" + "\n".join(top) + f"\n{END}\n") if top else "", (
            f"{BEGIN}\n{end}\n{END}\n"
        )
    if spec.table is None:
        return f"{BEGIN}\n" + "\n".join(lines) + f"\n{END}\n", ""
    return "", f"{BEGIN}\n[{spec.table}]\n" + "\n".join(lines) + f"\n{END}\n"


def install_toml(repo: Path, tool: str) -> Path:
    """Add portalloc's keys to TOOL's TOML file: merged, marked, verified by parsing."""
    spec = TOML_HOOKS[tool]
    top_dir = repo_top(repo)
    path = top_dir / spec.file
    if tool == "conductor" and (top_dir / "conductor.json").exists():
        # Conductor ignores conductor.json once .conductor/settings.toml exists: making
        # that file would switch the user's scripts off.
        raise UsageError(
            f"{top_dir / 'conductor.json'} exists, and Conductor stops reading it once "
            f"{spec.file} exists; move its scripts there first"
        )
    _check_regular(path)
    existing = _read(path) if path.exists() else ""
    base = without(existing)
    before = _toml_parse(path, base)
    ours = (
        dict(CODEX_TABLES) if tool == "codex" else ({spec.table: None} if spec.table else spec.keys)
    )
    clash = [name for name in ours if name in before]
    if clash:
        raise UsageError(
            f"{path} already sets {', '.join(clash)}: portalloc never replaces another "
            f"tool's hook; add its command there yourself"
        )
    new_file = not base.strip()
    top, end = _toml_block(tool, spec, new_file=new_file)
    text = top + base
    if end:
        text += ("" if not text or text.endswith("\n") else "\n") + end
    after = _toml_parse(path, text)
    # Everything but portalloc's own keys reads the same as in the file as it was (not
    # only as it is without the block: a key of theirs after the block must not move).
    original = _toml_parse(path, existing)
    if _theirs(tool, after, new_file) != _theirs(tool, original, new_file) or _theirs(
        tool, after, new_file
    ) != _theirs(tool, before, new_file):
        raise UsageError(f"{path}: cannot add portalloc's keys without changing others")
    if text != existing:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
        atomic_write(path, text.encode("utf-8"), mode=mode)
    return path


def uninstall_toml(repo: Path, tool: str) -> Path | None:
    """Take portalloc's lines out of TOOL's TOML file; remove a file left empty. Refused
    when that would change how any key of the user's reads."""
    spec = TOML_HOOKS[tool]
    path = repo_top(repo) / spec.file
    if path.exists():
        _check_regular(path)
        existing = _read(path)
        remaining = without(existing)
        kept = _toml_parse(path, remaining)
        if _theirs(tool, kept, True) != _theirs(tool, _toml_parse(path, existing), True):
            raise UsageError(
                f"{path}: keys of yours follow portalloc's block inside its table; "
                "taking the block out would move them: edit the file by hand"
            )
    return _remove_block(path, leftover=("", spec.preamble))


def _theirs(tool: str, data: dict[str, Any], drop_version: bool) -> dict[str, Any]:
    """DATA without the keys portalloc adds for TOOL (a table left empty goes too)."""
    spec = TOML_HOOKS[tool]
    result = dict(data)
    if tool == "codex":
        for table in CODEX_TABLES:
            result.pop(table, None)
        if drop_version and result.get("version") == 1:
            result.pop("version")
    elif spec.table is None:
        for key in spec.keys:
            result.pop(key, None)
    elif isinstance(result.get(spec.table), dict):
        entries = {k: v for k, v in result[spec.table].items() if k not in spec.keys}
        if entries:
            result[spec.table] = entries
        else:
            result.pop(spec.table)
    return result

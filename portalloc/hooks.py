"""`portalloc hook install|uninstall`: wire portalloc into the tools that create worktrees.

Each edit merges into the tool's file between marker lines, is idempotent, and is
removed by `uninstall` without touching anything else; another tool's hook is never
overwritten or disabled. The installed commands never fail the tool's operation.

Files are read and written through `portalloc.fs` only, and never through a symlinked
directory out of the worktree (a committed `.claude -> ~/.claude`): exit 2, one line.
The git hook goes where git looks for it; that may lie outside the worktree, in git's
own directory or at a `core.hooksPath` of the repository's config, which no commit can
set. A hooks path inside the worktree (a relative `core.hooksPath`) is held to it.

What install created is written down in what it adds, so uninstall needs no state and
removes only that: a file portalloc made carries `# portalloc created: file` (plus how
many directories it made above it) inside its block, or, in JSON, at the end of
portalloc's hook command (a shell comment; also naming the `hooks` / `SessionStart`
containers it made). Uninstall deletes a file only when it carries that mark and holds
nothing else of anyone's, then the directories it made while they are empty; a file or
directory without the mark existed before, and stays.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

from portalloc import blocks, fs
from portalloc.blocks import BEGIN, END
from portalloc.errors import UsageError, printable
from portalloc.fs import read_bytes

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
    if not repo.is_dir():
        raise UsageError(f"{printable(repo)}: not a directory")
    try:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UsageError(f"cannot run git in {printable(repo)}: {reason}") from None


def repo_top(repo: Path) -> Path:
    """The top of the worktree holding REPO."""
    result = _git(repo, "rev-parse", "--show-toplevel")
    if result.returncode != 0:
        raise UsageError(f"{printable(repo)} is not inside a git repository")
    return Path(result.stdout.strip())


class Target(NamedTuple):
    """A file portalloc edits, and the directories that bound the edit."""

    path: Path
    # Writes stay inside this directory, symlinks resolved; None: a place git names
    # from its own config or directory (no commit can plant a link there).
    within: Path | None
    # Directories install made are removed on uninstall up to, never including, this.
    floor: Path


def in_worktree(repo: Path, relative: str) -> Target:
    """RELATIVE in REPO's worktree, refused (exit 2) if a symlinked directory on the way
    leads out of it."""
    top = repo_top(repo)
    target = Target(top / relative, top, top)
    fs.check_within(target.path, top)
    return target


# A file portalloc made says so inside its block (or at the end of its JSON command).
CREATED = "portalloc created:"
_CREATED_WORDS = re.compile(r"(\d+) director(?:y|ies)")


class Created(NamedTuple):
    """What install made for a file: the file itself, directories above it, and (JSON)
    containers inside it."""

    file: bool = False
    dirs: int = 0
    keys: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.file or bool(self.dirs) or bool(self.keys)

    def words(self) -> str:
        parts = ["file"] if self.file else []
        if self.dirs:
            parts.append(f"{self.dirs} director{'y' if self.dirs == 1 else 'ies'}")
        return f"{CREATED} " + ", ".join([*parts, *self.keys])

    @classmethod
    def parse(cls, text: str) -> Created:
        """The mark in TEXT (a marker line or a command); Created() if there is none."""
        _before, found, rest = text.partition(CREATED)
        if not found:
            return cls()
        file, dirs, keys = False, 0, []
        for word in rest.strip().split(", "):
            match = _CREATED_WORDS.fullmatch(word)
            if word == "file":
                file = True
            elif match:
                dirs = min(int(match.group(1)), 64)
            elif word in ("hooks", "SessionStart"):
                keys.append(word)
        return cls(file, dirs, tuple(keys))


def _block_created(text: str) -> Created:
    """The created mark inside portalloc's blocks in TEXT."""
    lines = text.splitlines()
    for span in blocks.spans(lines):
        for index in span:
            line = lines[index].rstrip("\r\n")
            if line.startswith(f"# {CREATED}"):
                return Created.parse(line)
    return Created()


def _marked(block: str, created: Created) -> str:
    """BLOCK (starting with BEGIN) with CREATED's marker line right after BEGIN."""
    if not created:
        return block
    return block.replace(f"{BEGIN}\n", f"{BEGIN}\n# {created.words()}\n", 1)


def _existing(target: Target) -> tuple[str | None, int | None]:
    """TARGET's text and mode, (None, None) when there is no file: never through a
    symlink, a FIFO or out of the worktree."""
    if target.within is not None:
        fs.check_within(target.path, target.within)
    info = _check_regular(target.path)
    if info is None:
        return None, None
    return _read(target.path), stat.S_IMODE(info.st_mode)


def _make_parent(target: Target) -> int:
    """Create TARGET's missing directories; return how many were made."""
    directory = target.path.parent
    if target.within is not None:
        return len(fs.make_dirs(directory, target.within))
    made = 0
    missing = []
    while not os.path.lexists(directory) and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o755)
        made += 1
    return made


def _write(target: Target, text: str, mode: int) -> None:
    fs.atomic_write(target.path, text.encode("utf-8"), mode=mode, within=target.within)


def _delete(target: Target, created: Created) -> None:
    """Remove TARGET's file, then the directories install made above it while they are
    empty; never the floor or anything outside it."""
    target.path.unlink()
    floor = Path(os.path.normpath(target.floor))
    for directory in list(target.path.parents)[: created.dirs]:
        path = Path(os.path.normpath(directory))
        if floor not in path.parents:
            break
        try:
            path.rmdir()
        except OSError:
            break  # not empty (something of the user's), or gone


def _kept_created(existing: str | None, dirs: int) -> Created:
    """The mark for a file about to be written: the one already in it, or, for a file
    that is not there yet, "created" with the DIRS made for it."""
    if existing is None:
        return Created(file=True, dirs=dirs)
    return _block_created(existing)


def install_direnv(repo: Path) -> Path:
    """Add portalloc's lines to the worktree's .envrc (then `direnv allow` it)."""
    target = in_worktree(repo, ".envrc")
    existing, mode = _existing(target)
    created = _kept_created(existing, 0)
    text = without(existing or "")
    text += ("" if not text or text.endswith("\n") else "\n") + _marked(DIRENV_BLOCK, created)
    if text != existing:
        _write(target, text, 0o644 if mode is None else mode)
    return target.path


def uninstall_direnv(repo: Path) -> Path | None:
    """Take portalloc's lines out of the worktree's .envrc; remove a file install made
    when nothing else is left in it."""
    return _remove_block(in_worktree(repo, ".envrc"), leftover=("",))


def _remove_block(target: Target, leftover: tuple[str, ...]) -> Path | None:
    """Take portalloc's block out of TARGET; delete the file when install made it and
    what is left is one of LEFTOVER (stripped). Return its path if anything changed."""
    existing, mode = _existing(target)
    if existing is None or mode is None:
        return None
    text = without(existing)
    if text == existing:
        return None
    created = _block_created(existing)
    if created.file and text.strip() in leftover:
        _delete(target, created)
    else:
        _write(target, text, mode)
    return target.path


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
        raise UsageError(f"{printable(repo)} is not inside a git repository")
    return Path(result.stdout.strip())


def git_hook(repo: Path) -> Target:
    """REPO's post-checkout hook and where writing it may go.

    In git's own directory (the default `.git/hooks`, shared by linked worktrees) or at
    an absolute `core.hooksPath` of the repository's config, git's word is taken: no
    commit can plant a link there, and the config is the user's. A relative
    `core.hooksPath` (`.githooks`, `.husky/_`) names a directory in the worktree, which
    a commit may have made a link: the hook must stay inside the worktree.
    """
    hooks = git_hooks_dir(repo)
    configured = _git(repo, "config", "--get", "core.hooksPath")
    value = configured.stdout.rstrip("\n") if configured.returncode == 0 else ""
    shown = _git(repo, "rev-parse", "--show-toplevel")  # none in a bare repository
    relative = value and not (value.startswith("~") or Path(value).is_absolute())
    if relative and shown.returncode == 0:
        top = Path(shown.stdout.strip())
        # Not the path git reports: it has resolved the links this check is about.
        hook = Path(os.path.normpath(top / value)) / "post-checkout"
        fs.check_within(hook, top)
        return Target(hook, top, top)
    if value:
        return Target(hooks / "post-checkout", None, hooks.parent)
    common = _git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir")
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
    lines = text.splitlines(keepends=True)
    ours = blocks.inside(lines)
    return "".join(line for index, line in enumerate(lines) if index not in ours)


def _read(path: Path) -> str:
    """PATH's text exactly: bytes decoded without newline translation (CRLF stays CRLF)."""
    try:
        return read_bytes(path, follow=False).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{printable(path)} is not UTF-8 text; refusing to edit it") from None


def install_git(repo: Path) -> Path:
    """Add portalloc's block to REPO's post-checkout hook; return the hook's path."""
    target = git_hook(repo)
    existing, mode = _existing(target)
    if existing is None:
        dirs = _make_parent(target)
        text = merged(None, _marked(GIT_BLOCK, Created(file=True, dirs=dirs)))
        _write(target, text, 0o755)
        return target.path
    text = merged(existing, _marked(GIT_BLOCK, _block_created(existing)))
    if text != existing:
        _write(target, text, (0o755 if mode is None else mode) | 0o111)
    return target.path


def uninstall_git(repo: Path) -> Path | None:
    """Take portalloc's block out of REPO's post-checkout hook; remove a hook install
    made when nothing else is left in it. Return the hook's path if anything changed."""
    return _remove_block(git_hook(repo), leftover=("", "#!/bin/sh"))


def _check_regular(path: Path) -> os.stat_result | None:
    """PATH's lstat, None if nothing is there; refused unless a writable regular file."""
    info = fs.lstat_regular(path)
    if info is not None and not os.access(path, os.W_OK):
        raise UsageError(f"{printable(path)}: not writable")
    return info


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


def _json_settings(repo: Path, relative: str) -> tuple[Target, dict[str, object] | None, int]:
    """TOOL's settings file, its settings (None: no file) and its mode."""
    import json

    target = in_worktree(repo, relative)
    text, mode = _existing(target)
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


def _write_json(target: Target, settings: dict[str, object], mode: int) -> None:
    import json

    try:
        # allow_nan=False: a 1e400 read as inf must not come back as invalid JSON.
        data = json.dumps(settings, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        data.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        raise UsageError(
            f"{printable(target.path)} holds values JSON cannot write back; refusing to edit it"
        ) from None
    _write(target, data, mode)


def _ours(entry: object) -> bool:
    return isinstance(entry, dict) and CLAUDE_MARK in str(entry.get("command", ""))


def _our_entries(groups: list[Any]) -> list[dict[str, Any]]:
    return [
        entry
        for group in groups
        if isinstance(group, dict) and isinstance(group.get("hooks"), list)
        for entry in group["hooks"]
        if _ours(entry)
    ]


def install_json(repo: Path, tool: str) -> Path:
    """Add a SessionStart hook to TOOL's settings.json (Claude Code, Gemini CLI); other
    settings and hooks are kept as they are. What it had to create (the file, its
    directory, the `hooks` object, the `SessionStart` list) the command's comment says."""
    relative, command = JSON_HOOKS[tool]
    target, found, mode = _json_settings(repo, relative)
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
    dirs = _make_parent(target) if found is None else 0
    created = Created(file=found is None, dirs=dirs, keys=keys)
    if created:
        command = f"{command}; {created.words()}"
    groups.append({"hooks": [{"type": "command", "command": command}]})
    _write_json(target, settings, mode)
    return target.path


def uninstall_json(repo: Path, tool: str) -> Path | None:
    """Take portalloc's SessionStart hook out of TOOL's settings.json, and the
    containers, file and directories its install created, when they are left empty."""
    target, settings, mode = _json_settings(repo, JSON_HOOKS[tool][0])
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
        _write_json(target, settings, mode)
    else:
        _delete(target, created)
    return target.path


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
            # No `archive` release: it runs before Conductor deletes the workspace, and
            # a deletion that then fails would leave it without its lease. The lease is
            # tied to the directory: the next portalloc command reclaims it once gone.
            "setup": 'portalloc env --worktree "$CONDUCTOR_WORKSPACE_PATH" >/dev/null || true',
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
# Codex's environment file holds tables such as [setup] and [cleanup], each a script.
# No [cleanup] release: it runs before the worktree is deleted (check first, release
# last); the lease is tied to the directory and reclaimed once it is gone.
CODEX_TABLES = {
    "setup": 'portalloc env --worktree "$PWD" >/dev/null || true',
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


def _toml_block(tool: str, spec: TomlHook, new_file: bool, created: Created) -> tuple[str, str]:
    """(block to put at the top of the file, block to append at its end); the first
    of them carries the CREATED mark."""
    lines = [f"{k} = {_toml_string(v)}" for k, v in spec.keys.items()]
    if tool == "codex":
        top = [spec.preamble] if new_file else []
        tables = [f"[{t}]\nscript = {_toml_string(v)}" for t, v in CODEX_TABLES.items()]
        end = "\n".join(tables)
        return (
            _marked(f"{BEGIN}\n" + "\n".join(top) + f"\n{END}\n", created) if top else "",
            _marked(f"{BEGIN}\n{end}\n{END}\n", Created() if top else created),
        )
    if spec.table is None:
        return _marked(f"{BEGIN}\n" + "\n".join(lines) + f"\n{END}\n", created), ""
    return "", _marked(f"{BEGIN}\n[{spec.table}]\n" + "\n".join(lines) + f"\n{END}\n", created)


def install_toml(repo: Path, tool: str) -> Path:
    """Add portalloc's keys to TOOL's TOML file: merged, marked, verified by parsing."""
    spec = TOML_HOOKS[tool]
    target = in_worktree(repo, spec.file)
    path, top_dir = target.path, target.floor
    if tool == "conductor" and (top_dir / "conductor.json").exists():
        # Conductor ignores conductor.json once .conductor/settings.toml exists: making
        # that file would switch the user's scripts off.
        raise UsageError(
            f"{top_dir / 'conductor.json'} exists, and Conductor stops reading it once "
            f"{spec.file} exists; move its scripts there first"
        )
    found, mode = _existing(target)
    existing = found or ""
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
    # A file that is not there yet is made with its directories; the count is known
    # only once they are made, after every check: the block is built again then.
    created = _kept_created(found, 0)
    top, end = _toml_block(tool, spec, new_file=new_file, created=created)
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
    if found is None:
        created = Created(file=True, dirs=_make_parent(target))
        top, end = _toml_block(tool, spec, new_file=new_file, created=created)
        text = top + end
    if text != existing:
        _write(target, text, 0o644 if mode is None else mode)
    return path


def uninstall_toml(repo: Path, tool: str) -> Path | None:
    """Take portalloc's lines out of TOOL's TOML file; remove a file left empty. Refused
    when that would change how any key of the user's reads."""
    spec = TOML_HOOKS[tool]
    target = in_worktree(repo, spec.file)
    path = target.path
    existing, _mode = _existing(target)
    if existing is not None:
        remaining = without(existing)
        kept = _toml_parse(path, remaining)
        if _theirs(tool, kept, True) != _theirs(tool, _toml_parse(path, existing), True):
            raise UsageError(
                f"{path}: keys of yours follow portalloc's block inside its table; "
                "taking the block out would move them: edit the file by hand"
            )
    return _remove_block(target, leftover=("",))


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

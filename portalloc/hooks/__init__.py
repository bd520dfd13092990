"""`portalloc hook install|uninstall`: the tools that make worktrees, one entry each.

TOOLS is the one list of them: `hook --for`'s choices, their completion and help, and
what install says, all read it. An entry names the file portalloc edits, when the tool
runs what portalloc adds, and the module that edits files of its kind (git.py,
direnv.py, json_settings.py, toml_settings.py; files.py holds what they share): a
tool of a kind already here is one entry. This module imports nothing else, so the
CLI reads it on every start; a kind's module is imported when a tool of it is wired.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path

# JSON has no comments: the command's trailing shell comment marks it as portalloc's.
MARK = "# added by portalloc hook install"


class JsonHook(NamedTuple):
    """A SessionStart hook in a settings.json laid out as Claude Code's."""

    command: str


class TomlHook(NamedTuple):
    """Keys in a TOML file."""

    # Table ("" for top-level keys) -> key -> shell command.
    tables: dict[str, dict[str, str]]
    # Top-level keys a new file starts with (`version = 1`).
    preamble: tuple[tuple[str, int], ...] = ()
    # A file the tool stops reading once portalloc's exists: install refuses then.
    displaces: str = ""


class Tool(NamedTuple):
    """A tool portalloc wires itself into."""

    name: str  # what --for takes
    title: str  # as its makers write it
    file: str  # the file install edits, from the worktree top
    runs: str  # when the tool runs what portalloc adds, for --help
    installed: str  # what install says after the file's path
    kind: str  # the module under portalloc.hooks that edits the file
    spec: JsonHook | TomlHook | None = None

    def install(self, repo: Path) -> Path:
        """Wire the tool in REPO's worktree; return the file's path."""
        return self._kind().install(repo, self)  # type: ignore[no-any-return]

    def uninstall(self, repo: Path) -> Path | None:
        """Take portalloc's part out again; the file's path if anything changed."""
        return self._kind().uninstall(repo, self)  # type: ignore[no-any-return]

    def _kind(self) -> Any:
        import importlib

        return importlib.import_module(f"portalloc.hooks.{self.kind}")


# The commands never fail the tool's operation: `|| true`, and output kept off the
# tool's own (Codex and Conductor show it; worktrunk templates arrive shell-escaped).
TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool(
            "git",
            "git",
            ".git/hooks/post-checkout",  # or where core.hooksPath says
            "git worktree add",
            "leases ports for every new worktree",
            "git",
        ),
        Tool(
            "direnv",
            "direnv",
            ".envrc",
            "every cd into the worktree",
            "exports the worktree's ports; run `direnv allow`",
            "direnv",
        ),
        Tool(
            "claude",
            "Claude Code",
            ".claude/settings.json",
            "a session starts",
            "leases the worktree's ports when a session starts",
            "json_settings",
            # Claude Code sources the `export` lines a SessionStart hook appends to
            # $CLAUDE_ENV_FILE before every Bash call; $CLAUDE_PROJECT_DIR is the worktree.
            JsonHook(
                'portalloc env --worktree "$CLAUDE_PROJECT_DIR" >> "$CLAUDE_ENV_FILE" || true  '
                + MARK
            ),
        ),
        Tool(
            "gemini",
            "Gemini CLI",
            ".gemini/settings.json",
            "a session starts",
            "leases the worktree's ports when a session starts",
            "json_settings",
            # Gemini CLI parses a hook's stdout as JSON and offers no env file: the hook
            # makes or refreshes the lease (and the profile's .env block), says `{}`, and
            # logs on stderr.
            JsonHook(
                'portalloc env --worktree "${GEMINI_PROJECT_DIR:-$PWD}" >/dev/null || true; '
                "echo '{}'  " + MARK
            ),
        ),
        Tool(
            "codex",
            "Codex",
            ".codex/environments/environment.toml",
            "the Codex app sets up a worktree",
            "leases ports when the Codex app sets up a worktree",
            "toml_settings",
            # Codex's environment file holds tables such as [setup] and [cleanup], each
            # a script. No [cleanup] release: it runs before the worktree is deleted
            # (check first, release last); the lease is tied to the directory and
            # reclaimed once it is gone.
            TomlHook(
                {"setup": {"script": 'portalloc env --worktree "$PWD" >/dev/null || true'}},
                preamble=(("version", 1),),
            ),
        ),
        Tool(
            "conductor",
            "Conductor",
            ".conductor/settings.toml",
            "Conductor sets up a workspace",
            "leases ports when Conductor sets up a workspace",
            "toml_settings",
            # No `archive` release: it runs before Conductor deletes the workspace, and a
            # deletion that then fails would leave it without its lease. The lease is
            # tied to the directory: the next portalloc command reclaims it once gone.
            TomlHook(
                {
                    "scripts": {
                        "setup": 'portalloc env --worktree "$CONDUCTOR_WORKSPACE_PATH" '
                        ">/dev/null || true"
                    }
                },
                # Conductor ignores conductor.json once .conductor/settings.toml exists:
                # making that file would switch the user's scripts off.
                displaces="conductor.json",
            ),
        ),
        Tool(
            "worktrunk",
            "worktrunk",
            ".config/wt.toml",
            "worktrunk makes or removes a worktree",
            "leases ports when worktrunk makes a worktree, releases them once it is removed",
            "toml_settings",
            TomlHook(
                {
                    "": {
                        "pre-start": "portalloc env --worktree {{ worktree_path }} >/dev/null "
                        "|| true",
                        "post-remove": "portalloc release {{ worktree_path }} >/dev/null || true",
                    }
                }
            ),
        ),
        Tool(
            "mise",
            "mise",
            "mise.toml",
            "every entry into the worktree",
            "refreshes the lease on every entry into the worktree",
            "toml_settings",
            TomlHook({"hooks": {"enter": "portalloc env >/dev/null 2>&1 || true"}}),
        ),
    )
}

"""`portalloc hook install|uninstall --for git` with real git: new worktrees get their ports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

ROOT = Path(__file__).parent.parent
OTHER_HOOK = "#!/usr/bin/env bash\n# another tool's hook\necho other-tool-ran >&2\n"


def git(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # The hook calls `portalloc` from PATH: this interpreter's console script.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **(env or {}),
    }
    return subprocess.run(
        ["git", *map(str, args)], cwd=cwd, check=True, capture_output=True, text=True,
        timeout=60, env=env,
    )  # fmt: skip


def make_repo(tmp_path: Path, *init: str) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", *init, cwd=repo)
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q",
        "--allow-empty", "-m", "init", cwd=repo)  # fmt: skip
    return repo


def sessions() -> list[str]:
    return [a["session_id"] for a in json.loads(run_cli("status", "--json").stdout)]


@pytest.fixture(autouse=True)
def no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTALLOC_SKIP_PORT_CHECK", "1")


@pytest.mark.skipif(
    shutil.which("portalloc") is None and not (Path(sys.executable).parent / "portalloc").exists(),
    reason="needs the console script",
)
def test_git_worktree_add_leases_ports_and_uninstall_restores(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text(OTHER_HOOK)
    hook.chmod(0o755)
    assert run_cli("hook", "install", cwd=repo).returncode == 0
    assert run_cli("hook", "install", cwd=repo).returncode == 0  # idempotent
    text = hook.read_text()
    # Right after the #! line, so a hook ending in `exit` still reaches it.
    shebang, rest = OTHER_HOOK.split("\n", 1)
    assert text.startswith(shebang + "\n# >>> portalloc >>>") and text.endswith(rest)
    assert text.count("# >>> portalloc >>>") == 1
    added = git("worktree", "add", "-q", tmp_path / "wt1", cwd=repo)
    assert "other-tool-ran" in added.stderr  # the other tool's hook still runs
    assert sessions() == [str((tmp_path / "wt1").resolve())]
    git("checkout", "-q", "-b", "other", cwd=repo)  # not a new worktree: nothing leased
    assert len(sessions()) == 1
    assert run_cli("hook", "uninstall", cwd=repo).returncode == 0
    assert hook.read_text() == OTHER_HOOK  # byte for byte
    git("worktree", "add", "-q", tmp_path / "wt2", cwd=repo)
    assert len(sessions()) == 1


@pytest.mark.skipif(
    shutil.which("portalloc") is None and not (Path(sys.executable).parent / "portalloc").exists(),
    reason="needs the console script",
)
def test_core_hooks_path_and_sha256_repositories(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, "--object-format=sha256")
    (repo / "my-hooks").mkdir()
    git("config", "core.hooksPath", "my-hooks", cwd=repo)
    result = run_cli("hook", "install", cwd=repo)
    assert result.returncode == 0 and "my-hooks/post-checkout" in result.stdout
    assert not (repo / ".git" / "hooks" / "post-checkout").exists()
    git("worktree", "add", "-q", tmp_path / "wt", cwd=repo)  # old ref: 64 zeros
    assert sessions() == [str((tmp_path / "wt").resolve())]
    git("worktree", "add", "-q", "--no-checkout", tmp_path / "bare", cwd=repo)
    assert len(sessions()) == 1  # git runs no post-checkout without a checkout


def test_empty_hooks_path_and_foreign_hooks_are_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    git("config", "core.hooksPath", "", cwd=repo)
    empty = run_cli("hook", "install", cwd=repo)
    assert empty.returncode == 2 and "runs no hooks" in empty.stderr
    git("config", "--unset", "core.hooksPath", cwd=repo)
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text("#!/usr/bin/env python3\nprint('mine')\n")
    python = run_cli("hook", "install", cwd=repo)
    assert python.returncode == 2 and "not a shell script" in python.stderr
    assert hook.read_text() == "#!/usr/bin/env python3\nprint('mine')\n"
    outside = run_cli("hook", "install", cwd=tmp_path)
    assert outside.returncode == 2 and "not inside a git repository" in outside.stderr
    unknown = run_cli("hook", "install", "--for", "nosuchtool", cwd=repo)
    assert unknown.returncode == 2 and "supported: git" in unknown.stderr


def test_a_failing_portalloc_never_fails_the_checkout(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    assert run_cli("hook", "install", cwd=repo).returncode == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PORT_ALLOC_BASE": "80"}  # fmt: skip
    added = subprocess.run(
        ["git", "worktree", "add", "-q", str(tmp_path / "wt")],
        cwd=repo, capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0
    assert (tmp_path / "wt" / ".git").exists()
    assert "PORT_ALLOC_BASE=80 is invalid" in added.stderr


def test_direnv_block_merges_into_envrc_and_uninstall_restores(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    envrc = repo / ".envrc"
    mine = "export MINE=1\nsource_env_if_exists .envrc.local"  # no trailing newline
    envrc.write_text(mine)
    for _ in range(2):  # idempotent
        assert run_cli("hook", "install", "--for", "direnv", cwd=repo).returncode == 0
    text = envrc.read_text()
    assert text.startswith(mine + "\n") and text.count("# >>> portalloc >>>") == 1
    # What direnv does with it: bash evaluates the file in the worktree.
    bin_dir = Path(sys.executable).parent
    out = subprocess.run(
        ["bash", "-c", 'watch_file() { :; }; source_env_if_exists() { :; }; . ./.envrc; '
         'printf "%s %s" "$MINE" "$API_PORT"'],
        cwd=repo, capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert out.stdout == "1 10003"
    assert run_cli("hook", "uninstall", "--for", "direnv", cwd=repo).returncode == 0
    assert envrc.read_text() == mine + "\n"


CLAUDE_SETTINGS: dict[str, Any] = {
    "permissions": {"allow": ["Bash(npm test)"]},
    "hooks": {
        "SessionStart": [
            {"matcher": "startup", "hooks": [{"type": "command", "command": "echo mine"}]}
        ],
        "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "x"}]}],
    },
    "env": {"FOO": "ünï"},
}


def test_claude_session_start_hook_merges_runs_and_uninstalls(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    settings = repo / ".claude" / "settings.json"
    settings.parent.mkdir()
    original = json.dumps(CLAUDE_SETTINGS, indent=2, ensure_ascii=False) + "\n"
    settings.write_text(original)
    for _ in range(2):  # idempotent
        assert run_cli("hook", "install", "--for", "claude", cwd=repo).returncode == 0
    data = json.loads(settings.read_text())
    groups = data["hooks"]["SessionStart"]
    assert groups[0] == CLAUDE_SETTINGS["hooks"]["SessionStart"][0]  # theirs first, kept
    (ours,) = [g["hooks"][0]["command"] for g in groups[1:]]
    assert data["permissions"] == CLAUDE_SETTINGS["permissions"] and data["env"] == {"FOO": "ünï"}
    # What Claude Code does: run the command with its variables, then source the file.
    env_file = tmp_path / "claude-env"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "CLAUDE_PROJECT_DIR": str(repo), "CLAUDE_ENV_FILE": str(env_file)}  # fmt: skip
    subprocess.run(["sh", "-c", ours], env=env, check=True, timeout=60)
    out = subprocess.run(
        ["bash", "-c", f'. {env_file}; printf %s "$API_PORT"'],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout == "10003"
    assert sessions() == [str(repo)]
    # Without portalloc on PATH the session still starts.
    subprocess.run(
        ["/bin/sh", "-c", ours], env={**env, "PATH": "/nonexistent"}, check=True, timeout=60
    )
    assert run_cli("hook", "uninstall", "--for", "claude", cwd=repo).returncode == 0
    assert settings.read_text() == original


def test_claude_hook_in_a_fresh_file_and_a_broken_one(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    settings = repo / ".claude" / "settings.json"
    assert run_cli("hook", "install", "--for", "claude", cwd=repo).returncode == 0
    assert list(json.loads(settings.read_text())) == ["hooks"]
    assert run_cli("hook", "uninstall", "--for", "claude", cwd=repo).returncode == 0
    assert not settings.exists()  # it held nothing but portalloc's hook
    assert not settings.parent.exists()  # and install made its directory
    settings.parent.mkdir()
    settings.write_text("{not json")
    broken = run_cli("hook", "install", "--for", "claude", cwd=repo)
    assert broken.returncode == 2 and "not valid JSON" in broken.stderr
    assert settings.read_text() == "{not json"


TOML_CASES = {
    # tool: (file, the user's own content, what a TOML reader sees of ours after install)
    "codex": (
        ".codex/environments/environment.toml",
        '# my env\nversion = 1\nname = "app"\n',
        lambda data: (data["setup"]["script"],),  # no [cleanup]: it runs before removal
    ),
    "conductor": (
        ".conductor/settings.toml",
        '[scripts]\nrun = "npm run dev"\n',  # a [scripts] of theirs: refused below
        None,
    ),
    "worktrunk": (
        ".config/wt.toml",
        '# worktrunk\n[list]\nfull = true\n\n[[aliases]]\nname = "x"\n',
        lambda data: (data["pre-start"], data["post-remove"]),
    ),
    "mise": (
        "mise.toml",
        '[tools]\nnode = "20"  # pinned\n',
        lambda data: (data["hooks"]["enter"],),
    ),
}


@pytest.mark.parametrize("tool", list(TOML_CASES))
def test_toml_tools_merge_verify_and_uninstall_byte_for_byte(tmp_path: Path, tool: str) -> None:
    import tomllib

    repo = make_repo(tmp_path)
    relative, mine, read = TOML_CASES[tool]
    path = repo / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(mine)
    installed = run_cli("hook", "install", "--for", tool, cwd=repo)
    if read is None:  # the user's file already has the table portalloc would add
        assert (
            installed.returncode == 2 and "never replaces another tool's hook" in installed.stderr
        )
        assert path.read_text() == mine
        path.write_text("")
        assert run_cli("hook", "install", "--for", tool, cwd=repo).returncode == 0
        assert "portalloc env" in tomllib.loads(path.read_text())["scripts"]["setup"]
        assert run_cli("hook", "uninstall", "--for", tool, cwd=repo).returncode == 0
        assert path.read_text() == ""  # it was there before install: it stays
        return
    assert installed.returncode == 0, installed.stderr
    assert run_cli("hook", "install", "--for", tool, cwd=repo).returncode == 0  # idempotent
    data = tomllib.loads(path.read_text())
    commands = read(data)
    assert all("portalloc" in command and "|| true" in command for command in commands)
    for key, value in tomllib.loads(mine).items():
        assert data[key] == value  # everything of theirs, as it was
    assert run_cli("hook", "uninstall", "--for", tool, cwd=repo).returncode == 0
    assert path.read_text() == mine  # byte for byte


def test_gemini_session_start_hook_prints_only_json(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    settings = repo / ".gemini" / "settings.json"
    settings.parent.mkdir()
    original = (ROOT / ".gemini" / "settings.json").read_text()  # this repository's own
    settings.write_text(original)
    assert run_cli("hook", "install", "--for", "gemini", cwd=repo).returncode == 0
    data = json.loads(settings.read_text())
    assert data["mcpServers"] == json.loads(original)["mcpServers"]
    (command,) = [g["hooks"][0]["command"] for g in data["hooks"]["SessionStart"]]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GEMINI_PROJECT_DIR": str(repo)}
    out = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert json.loads(out.stdout) == {}  # Gemini CLI parses stdout as JSON: nothing else
    assert sessions() == [str(repo)]
    assert run_cli("hook", "uninstall", "--for", "gemini", cwd=repo).returncode == 0
    assert json.loads(settings.read_text()) == json.loads(original)


def _json_command(tool: str) -> str:
    from portalloc.hooks import TOOLS, JsonHook

    spec = TOOLS[tool].spec
    assert isinstance(spec, JsonHook)
    return spec.command


def _toml_commands(tool: str) -> dict[str, str]:
    """TOOL's commands by `table.key` (`key` for a top-level one)."""
    from portalloc.hooks import TOOLS, TomlHook

    spec = TOOLS[tool].spec
    assert isinstance(spec, TomlHook)
    return {
        f"{table}.{key}".lstrip("."): command
        for table, keys in spec.tables.items()
        for key, command in keys.items()
    }


def test_readme_shows_the_commands_hook_install_writes() -> None:
    """The README's per-tool blocks cannot drift from the templates."""
    from portalloc import hooks
    from portalloc.hooks import direnv
    from portalloc.hooks import git as git_hook

    readme = (ROOT / "README.md").read_text()
    for text in (
        _json_command("claude"),
        _json_command("gemini"),
        *direnv.BLOCK.splitlines(),
        *(line.strip() for line in git_hook.BLOCK.splitlines() if "portalloc env" in line),
    ):
        assert text in readme, text
    for tool in hooks.TOOLS:
        assert f"--for {tool}" in readme or tool == "git", tool


@pytest.mark.skipif(
    shutil.which("mise") is None, reason="mise is not installed (npm install -g @jdxcode/mise)"
)
def test_the_real_mise_reads_the_hook(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "mise.toml").write_text('[tools]\nnode = "20"  # pinned\n')
    assert run_cli("hook", "install", "--for", "mise", cwd=repo).returncode == 0
    env = {**os.environ, "MISE_YES": "1"}
    subprocess.run(["mise", "trust", "mise.toml"], cwd=repo, env=env, check=True, timeout=60,
                   capture_output=True)  # fmt: skip

    def get(key: str) -> str:
        return subprocess.run(
            ["mise", "config", "get", "-f", "mise.toml", key], cwd=repo, env=env,
            check=True, timeout=60, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    assert get("hooks.enter") == _toml_commands("mise")["hooks.enter"]
    assert get("tools.node") == "20"


def test_readme_shows_every_toml_command() -> None:
    from portalloc.hooks import TOOLS

    readme = (ROOT / "README.md").read_text()
    tomls = [name for name, tool in TOOLS.items() if tool.kind == "toml_settings"]
    assert tomls == ["codex", "conductor", "worktrunk", "mise"]
    commands = [command for name in tomls for command in _toml_commands(name).values()]
    for command in commands:
        assert f"`{command}`" in readme, command


# --- found by a hostile review ------------------------------------------------------------


def test_unpaired_marker_and_crlf_survive_install_and_uninstall(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    envrc = repo / ".envrc"
    mine = b"export A=1\r\n# >>> portalloc >>>\r\nexport SECRET=keep\r\nuse nix\r\n"
    envrc.write_bytes(mine)
    assert run_cli("hook", "install", "--for", "direnv", cwd=repo).returncode == 0
    assert envrc.read_bytes().startswith(mine)
    assert run_cli("hook", "uninstall", "--for", "direnv", cwd=repo).returncode == 0
    assert envrc.read_bytes() == mine
    mise = repo / "mise.toml"
    mise.write_bytes(b'[tools]\r\nnode = "20"\r\n')
    assert run_cli("hook", "install", "--for", "mise", cwd=repo).returncode == 0
    assert run_cli("hook", "uninstall", "--for", "mise", cwd=repo).returncode == 0
    assert mise.read_bytes() == b'[tools]\r\nnode = "20"\r\n'


def test_a_key_of_theirs_after_the_block_is_never_moved(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    assert run_cli("hook", "install", "--for", "conductor", cwd=repo).returncode == 0
    settings = repo / ".conductor" / "settings.toml"
    settings.write_text(settings.read_text() + 'run = "pnpm dev"\n')  # scripts.run
    before = settings.read_text()
    for command in ("install", "uninstall"):
        result = run_cli("hook", command, "--for", "conductor", cwd=repo)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert settings.read_text() == before


def test_conductor_json_and_a_global_hooks_path_are_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "conductor.json").write_text('{"scripts": {"setup": "npm ci"}}')
    legacy = run_cli("hook", "install", "--for", "conductor", cwd=repo)
    assert legacy.returncode == 2 and "conductor.json" in legacy.stderr
    assert not (repo / ".conductor").exists()
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    git("config", "--global", "core.hooksPath", str(home / "hooks"), cwd=repo, env=env)
    shared = run_cli("hook", "install", cwd=repo, env=env)
    assert shared.returncode == 2 and "set globally" in shared.stderr
    assert not (home / "hooks").exists()


@pytest.mark.skipif(
    shutil.which("portalloc") is None and not (Path(sys.executable).parent / "portalloc").exists(),
    reason="needs the console script",
)
def test_a_hook_that_ends_in_exit_still_leases(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text("#!/bin/sh\necho user hook ran\nexit 0\n")
    hook.chmod(0o755)
    assert run_cli("hook", "install", cwd=repo).returncode == 0
    git("worktree", "add", "-q", tmp_path / "wt", cwd=repo)
    assert sessions() == [str((tmp_path / "wt").resolve())]


# A tool registered in portalloc.hooks.TOOLS, then a command through the entry point.
REGISTER = """
import sys
from portalloc import hooks
hooks.TOOLS["fake"] = hooks.Tool(
    "fake", "Fake", ".fake/settings.toml", "fake starts", "leases ports when fake starts",
    "toml_settings", hooks.TomlHook({"hooks": {"start": "portalloc env >/dev/null || true"}}),
)
from portalloc.adapters.entry import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_registered_tool_is_in_the_help_the_completion_and_install(tmp_path: Path) -> None:
    from portalloc.hooks import TOOLS

    repo = make_repo(tmp_path)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}

    def fake(*args: str, **env: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", REGISTER, *args],
            cwd=repo,
            env={**environ, "PYTHONPATH": str(ROOT), **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout

    names = ", ".join([*TOOLS, "fake"])
    assert f"create worktrees: {names}." in " ".join(fake("hook", "--help").split())
    shown = " ".join(fake("hook", "install", "--help").split())
    assert f"--for TOOL Wire this tool: {names} (repeatable;" in shown
    assert "fake: .fake/settings.toml, fake starts." in shown
    assert f"Unwire this tool: {names} (" in " ".join(fake("hook", "uninstall", "--help").split())
    words = "portalloc hook install --for f"
    completed = fake(_PORTALLOC_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD="4")
    assert completed.split() == ["fake"]
    settings = repo / ".fake" / "settings.toml"
    said = fake("hook", "install", "--for", "fake")
    assert said == f"fake: {settings} leases ports when fake starts\n"
    assert '[hooks]\nstart = "portalloc env >/dev/null || true"\n' in settings.read_text()
    assert fake("hook", "uninstall", "--for", "fake") == f"fake: removed from {settings}\n"
    assert not settings.parent.exists()  # install made the directory: uninstall removes it

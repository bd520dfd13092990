"""The README's worktree walkthrough, run as written in a user's own repository (not this
one): a scratch HOME holding ~/src/shop with nothing but its own compose file. The
```sh blocks of the "Worktree workflow" section are extracted and run in order in one
bash, so the README cannot drift from what works.

Stand-in, said plainly: where no Docker daemon answers, `docker compose up -d` and
`down` are a bash function that starts and stops real HTTP listeners on the worktree's
published ports (the compose file's own mappings, read from its variables). Where the run has a
daemon (tests/docker_env.py starts one; CI always has it), the real docker and Compose v2
run the image it builds, portalloc-test-busybox.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docker_env import optional_docker

README = Path(__file__).resolve().parent.parent / "README.md"

COMPOSE = """\
services:
  web:
    image: portalloc-test-busybox
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
    ports:
      - "8080:80"
  db:
    image: portalloc-test-busybox
    command: ["httpd", "-f", "-p", "5432", "-h", "/www"]
    ports:
      - "5432:5432"
"""

# Listeners on the published ports, for a machine with no Docker daemon (see above).
DOCKER_STAND_IN = r"""
docker() {
    case "$1 $2" in
    "compose up")
        for port in "$WEB_PORT" "$DB_PORT"; do
            python3 -m http.server --bind 127.0.0.1 "$port" >/dev/null 2>&1 &
            echo $! >> "$HOME/.stand-in-pids"
        done ;;
    "compose down")
        [ -f "$HOME/.stand-in-pids" ] && xargs kill < "$HOME/.stand-in-pids" 2>/dev/null
        rm -f "$HOME/.stand-in-pids" ;;
    *) echo "docker stand-in: $*" >&2; return 1 ;;
    esac
}
"""


def walkthrough_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Worktree workflow\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def test_the_walkthrough_blocks_are_the_ones_this_test_runs() -> None:
    blocks = walkthrough_blocks()
    assert len(blocks) == 6
    joined = "".join(blocks)
    # Nothing that exists only in portalloc's own repository.
    assert "examples/" not in joined and "just " not in joined


@pytest.mark.skipif(
    shutil.which("direnv") is None and not os.environ.get("CI"),
    reason="direnv is not installed (CI installs it: apt-get install direnv)",
)
def test_the_readme_walkthrough_works_in_a_users_own_repository(tmp_path: Path) -> None:
    home = tmp_path / "home"
    repo = home / "src" / "shop"
    repo.mkdir(parents=True)
    (repo / "compose.yaml").write_text(COMPOSE)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("GIT_DIR", None)
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True, env=env)
    for key, value in (("user.email", "me@example.com"), ("user.name", "Me")):
        subprocess.run(["git", "config", "--global", key, value], check=True, env=env)
    subprocess.run([*git, "add", "-A"], check=True, env=env)
    subprocess.run([*git, "commit", "-qm", "initial"], check=True, env=env)

    blocks = walkthrough_blocks()
    # The run's daemon and compose v2 (tests/docker_env.py) where there is one.
    docker = optional_docker()
    if docker is not None:
        env.update(docker.env)
    script = [
        "set -euo pipefail",
        # Which command of the README failed, and how, when one does.
        "trap 'echo \"walkthrough: exit $? from: $BASH_COMMAND\" >&2' ERR",
        "" if docker is not None else DOCKER_STAND_IN,
    ]
    for number, block in enumerate(blocks, start=1):
        script.append(f"echo '=== step {number}' >&2")
        script.append(block)
        if number == 3:
            # What direnv's shell hook does at the next prompt: load the allowed .envrc.
            script.append('eval "$(direnv export bash)"')
            script.append('test "$WEB_PORT" = "$(portalloc get "$PWD" web)"')
            script.append('echo "feat-a web=$WEB_PORT" >&2')
        if number == 4 and docker is not None:
            # The real stack: running containers, the web one answering curl above.
            # No `| grep -q .`: grep leaves at the first line, and under pipefail the
            # docker CLI's write to the closed pipe failed the step (exit 255) in CI.
            script.append('test -n "$(docker compose ps --status running --quiet)"')
        if number == 5:
            script.append('test "$WEB_PORT" = "$(portalloc get "$PWD" web)"')
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Step 2's hook leased both worktrees; step 6 reclaimed feat-a only.
    assert "reclaimed" in proc.stdout and "shop-feat-a" in proc.stdout
    status = subprocess.run(
        ["portalloc", "status", "--json"], env=env, capture_output=True, text=True, check=True
    )
    import json

    sessions = [item["session_id"] for item in json.loads(status.stdout)]
    assert sessions == [str(home / "src" / "shop-feat-b")]

"""A shared state dir with real second Unix users (issue 18): what one group member plants
there never hangs, redirects or vouches for another member. Needs root to switch users
(CI runs as root); elsewhere skipped with that reason."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing"),
]

ALICE, BOB, GROUP = 4101, 4102, 4242


@pytest.fixture
def shared() -> Iterator[Path]:
    # pytest's tmp_path sits under a 0700 directory other users cannot enter.
    base = Path(tempfile.mkdtemp(prefix="portalloc-shared-"))
    base.chmod(0o755)
    try:
        state = base / "shared"
        state.mkdir()
        os.chown(state, 0, GROUP)
        state.chmod(0o2770)  # group-writable, setgid: a directory set up to share
        for uid in (ALICE, BOB):
            home = base / f"home-{uid}"
            home.mkdir(mode=0o700)
            os.chown(home, uid, GROUP)
        yield state
    finally:
        shutil.rmtree(base)


def as_user(
    uid: int,
    state: Path,
    *args: str,
    cwd: Path | None = None,
    timeout: float = 30,
    home: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    home = home or state.parent / f"home-{uid}"
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={GROUP}", "--clear-groups",
         sys.executable, "-m", "portalloc", *args],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PORTALLOC_STATE_DIR": str(state),
            "HOME": str(home),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
            "PORTALLOC_SKIP_PORT_CHECK": "1",
        },
        cwd=cwd or home,
        timeout=timeout,
        check=False,
    )  # fmt: skip


def test_a_symlinked_ledger_planted_by_a_member_is_refused(shared: Path) -> None:
    """Bob links the group's leases.json to Alice's private ledger: Alice's commands
    refuse it in one line, and her private leases never land in the group dir."""
    alice_home = shared.parent / f"home-{ALICE}"
    alice_private = alice_home / "private-state"
    private = as_user(ALICE, alice_private, "allocate", "secret-worktree", home=alice_home)
    assert private.returncode == 0, private.stderr
    ledger = alice_private / "leases.json"
    before = ledger.read_bytes()
    (shared / "leases.json").symlink_to(ledger)
    os.lchown(shared / "leases.json", BOB, GROUP)
    for args in (["status"], ["env", "x"], ["allocate", "y"]):
        result = as_user(ALICE, shared, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "symlink" in result.stderr
    assert ledger.read_bytes() == before
    assert (shared / "leases.json").is_symlink()
    copies = [p for p in shared.iterdir() if p.is_file() and not p.is_symlink()]
    assert not any(b"secret-worktree" in p.read_bytes() for p in copies)


def test_a_fifo_planted_as_the_ledger_hangs_nobody(shared: Path) -> None:
    os.mkfifo(shared / "leases.json", 0o660)
    os.chown(shared / "leases.json", BOB, GROUP)
    started = time.monotonic()
    for args in (["env", "x"], ["get", "x", "db"], ["status"]):
        result = as_user(ALICE, shared, *args, timeout=20)
        assert result.returncode == 2 and "FIFO" in result.stderr, (args, result.stderr)
    assert time.monotonic() - started < 20


def test_a_trust_record_planted_in_the_shared_dir_is_not_believed(shared: Path) -> None:
    """Trust lives in each user's own state dir, never in the shared one: a record Bob
    puts where a private state dir would keep it vouches for nothing."""
    project = shared.parent / "repo"
    project.mkdir()
    content = b'[ports]\nweb = 0\n[env]\nAPP_URL = "http://localhost:{web_port}"\n'
    (project / "portalloc.toml").write_bytes(content)
    planted = shared / "trusted"
    planted.mkdir()
    (planted / hashlib.sha256(content).hexdigest()).write_text(f"{project}/portalloc.toml\n")
    for path in (planted, *planted.iterdir()):
        os.chown(path, BOB, GROUP)
    result = as_user(ALICE, shared, "env", "s", "--format", "json", cwd=project)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}
    assert "until you trust this file" in result.stderr
    # Alice trusting it herself records it in her own state, and then it applies.
    assert as_user(ALICE, shared, "trust", cwd=project).returncode == 0
    own = shared.parent / f"home-{ALICE}" / ".local" / "state" / "portalloc" / "trusted"
    assert len(list(own.iterdir())) == 1
    again = as_user(ALICE, shared, "env", "s", "--format", "json", cwd=project)
    assert json.loads(again.stdout) == {"APP_URL": "http://localhost:10000"}
    # Bob's own view of the same file is still untrusted: trust is per user.
    bobs = as_user(BOB, shared, "env", "t", "--format", "json", cwd=project)
    assert json.loads(bobs.stdout) == {}


def test_a_ledger_file_record_cannot_make_portalloc_rewrite_a_members_env_file(
    shared: Path,
) -> None:
    """Bob records Alice's .env as a file of his session's in the shared ledger; when his
    lease is rewritten, her file (her session's block) is left alone."""
    tree = shared.parent / f"home-{ALICE}" / "wt"
    made = as_user(ALICE, shared, "env", "alice", "--env-file", str(tree / ".env"))
    if made.returncode != 0:  # her home is 0700: make the worktree first as her
        subprocess.run(["setpriv", f"--reuid={ALICE}", f"--regid={GROUP}", "--clear-groups",
                        "mkdir", "-p", str(tree)], check=True)  # fmt: skip
        made = as_user(ALICE, shared, "env", "alice", "--env-file", str(tree / ".env"))
    assert made.returncode == 0, made.stderr
    env_file = tree / ".env"
    before = env_file.read_bytes()
    assert as_user(BOB, shared, "allocate", "bob").returncode == 0
    ledger = shared / "leases.json"
    document = json.loads(ledger.read_bytes())
    document.pop("crc32", None)
    document["files"]["bob"] = [["env_file", str(env_file)]]
    for lease in document["leases"]:
        if lease["session_id"] == "bob":
            lease["ports"] = {name: port + 1 for name, port in lease["ports"].items()}
    ledger.write_text(json.dumps(document))
    # Any write by Bob reconciles his lease; whatever it rewrites, not Alice's file.
    as_user(BOB, shared, "env", "bob")
    assert env_file.read_bytes() == before


def test_variables_a_member_plants_in_a_shared_ledger_never_reach_a_shell(shared: Path) -> None:
    """Mallory adds CMAKE_TOOLCHAIN_FILE (no denylist has every such name) to Alice's lease:
    what Alice's env, get and run hand out is only what cannot carry a command, or what
    her own profile gives the lease."""
    repo = shared.parent / f"home-{ALICE}" / "app"
    subprocess.run(["setpriv", f"--reuid={ALICE}", f"--regid={GROUP}", "--clear-groups",
                    "mkdir", "-p", str(repo / ".git")], check=True)  # fmt: skip
    made = as_user(ALICE, shared, "env", "--format", "json", cwd=repo)
    assert made.returncode == 0, made.stderr
    mine = json.loads(made.stdout)
    assert mine["SUPABASE_URL"].startswith("http://localhost:")
    ledger = shared / "leases.json"
    document = json.loads(ledger.read_bytes())
    document.pop("crc32", None)
    planted = {"CMAKE_TOOLCHAIN_FILE": "/tmp/evil.cmake", "STARSHIP_CONFIG": "/tmp/s.toml"}
    for lease in document["leases"]:
        lease["env"].update(planted)
        lease["env"]["SUPABASE_URL"] = "http://evil.example/"
    ledger.write_text(json.dumps(document))
    os.chown(ledger, BOB, GROUP)
    for args in (["env", "--format", "json"], ["env", str(repo), "--format", "json"]):
        shown = as_user(ALICE, shared, *args, cwd=repo)
        assert shown.returncode == 0, shown.stderr
        values = json.loads(shown.stdout)
        assert not set(planted) & set(values), args
        assert values.get("SUPABASE_URL") in (None, mine["SUPABASE_URL"]), args
    got = as_user(ALICE, shared, "get", str(repo), "CMAKE_TOOLCHAIN_FILE", cwd=repo)
    assert got.returncode != 0 and "/tmp/evil" not in got.stdout
    child = as_user(ALICE, shared, "run", str(repo), "env", cwd=repo)
    assert child.returncode == 0 and "/tmp/evil" not in child.stdout

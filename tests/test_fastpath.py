"""The read path (`env`/`get` served from the ledger without Typer or the lock) against the
full CLI: for every invocation and ledger below, stdout, stderr and exit code are equal."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portalloc.adapters import cli, entry
from portalloc.ledger.codec import dump
from portalloc.ledger.format import LEDGER_VERSION
from portalloc.models import isoformat
from portalloc.render import FORMATS
from portalloc.rules import slug_for

SESSIONS = ["s", "/home/me/my worktree", "=ls", "ünï 🚀", 'it\'s "q" $(x)']


def lease(session_id: str, start: int, **changes: object) -> dict[str, object]:
    now = datetime.now(UTC).replace(microsecond=0)
    raw: dict[str, object] = {
        "session_id": session_id,
        "start": start,
        "span": 100,
        "ports": {"db": start, "rest": start + 1, "realtime": start + 2, "api": start + 3},
        "env": {
            "AGENT_COORDINATOR_DB_PORT": str(start),
            "AGENT_COORDINATOR_REST_PORT": str(start + 1),
            "AGENT_COORDINATOR_REALTIME_PORT": str(start + 2),
            "API_PORT": str(start + 3),
            "COMPOSE_PROJECT_NAME": "ac-0123abcd",
            "SUPABASE_URL": f"http://localhost:{start + 1}",
        },
        "compose_project_name": "ac-0123abcd",
        "created_at": isoformat(now),
        "expires_at": isoformat(now + timedelta(minutes=120)),
        "ttl_minutes": 120,
        "owner": None,
        "worktree": None,
        "guests": [],
        "slug": slug_for(session_id, None, set()),
        "bare": None,
    }
    raw.update(changes)
    return raw


def save(state_dir: Path, *leases: dict[str, object]) -> None:
    """The ledger exactly as portalloc's save() writes it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "version": LEDGER_VERSION,
        "leases": list(leases),
        "homes": {str(x["session_id"]): x["start"] for x in leases},
        "files": {},
    }
    (state_dir / "leases.json").write_bytes(dump(document))  # type: ignore[arg-type]


def run(main: Callable[[list[str]], int], args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def both(state_dir: Path, args: list[str]) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """ARGS through the read path and through the full CLI, each on its own copy."""
    original = state_dir.with_name("original")
    shutil.copytree(state_dir, original)
    fast = run(entry.main, args)
    shutil.rmtree(state_dir)
    shutil.copytree(original, state_dir)
    full = run(cli.main, args)
    shutil.rmtree(original)
    return fast, full


def ledgers(worktree: Path) -> dict[str, list[dict[str, object]]]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "empty": [],
        "fresh": [lease(s, 10000 + 100 * i) for i, s in enumerate(SESSIONS)],
        "refresh-due": [lease("s", 10000, expires_at=isoformat(now + timedelta(minutes=30)))],
        "expired": [lease("s", 10000, expires_at=isoformat(now - timedelta(minutes=1)))],
        "worktree": [lease(str(worktree), 10000, worktree=str(worktree))],
        "worktree-unanchored": [lease(str(worktree), 10000)],
        "dead-owner": [lease("s", 10000, owner={"pid": 4194000, "started": 1.0})],
        "live-owner": [
            lease("s", 10000, owner={"pid": os.getpid(), "started": _started(os.getpid())})
        ],
        "dead-guest": [lease("s", 10000, guests=[{"pid": 4194000, "started": 1.0}])],
        "dotenv-unwritable": [lease("s", 10000, env={"X": "${HOME}"})],
        "other-ttl": [lease("s", 10000, ttl_minutes=30)],
    }


def _started(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).create_time())


INVOCATIONS = [
    *(["env", s] for s in SESSIONS),
    *(["env", "s", "--format", f] for f in FORMATS),
    ["env", "s", "-f", "fish"],
    ["env", "--format=json", "s"],
    ["env"],
    ["env", "--format", "fish"],
    ["env", "s", "--format", "xml"],
    ["get", "s", "api"],
    ["get", "s", "api_port"],
    ["get", "s", "API_PORT"],
    ["get", "s", "compose_project_name"],
    ["get", "s", "session_id"],
    ["get", "s", "api_url"],  # the named URL: the slug, and the proxy port of the settings
    ["get", "s", "slug"],
    ["get", "s", "url"],  # no bare name: an unknown key on both paths
    ["get", "s", "nope"],
    ["get", "=ls", "rest"],
    ["get", "missing", "api"],
]


@pytest.mark.parametrize("name", list(ledgers(Path("/x"))))
def test_read_path_and_full_cli_print_the_same(
    name: str, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worktree = tmp_path / "wt"
    worktree.mkdir()
    (worktree / ".git").mkdir()
    monkeypatch.chdir(worktree)
    monkeypatch.setenv("PORTALLOC_SKIP_PORT_CHECK", "1")
    served: list[list[str]] = []
    serve = entry.serve

    def counting(read: entry.Read) -> str | None:
        text = serve(read)
        if text is not None:
            served.append([read.command, str(read.session)])
        return text

    monkeypatch.setattr(entry, "serve", counting)
    for args in INVOCATIONS:
        save(state_dir, *ledgers(worktree)[name])
        fast, full = both(state_dir, args)
        assert fast == full, (name, args)
    # The read path really served where it can: a live lease that needs no write.
    if name in ("fresh", "live-owner"):
        assert ["env", "s"] in served and ["get", "s"] in served
    if name == "worktree":
        assert ["env", "None"] in served
    if name in ("empty", "refresh-due", "expired", "dead-owner", "dead-guest"):
        assert not [call for call in served if call[0] == "env"]


def test_read_path_serves_without_typer_and_without_the_lock(state_dir: Path) -> None:
    save(state_dir, lease("s", 10000))
    code = (
        "import sys; from portalloc.adapters.entry import main; rc = main(['get', 's', 'api']);"
        "print(sorted(m for m in ('typer', 'filelock', 'pydantic', 'rich') if m in sys.modules),"
        " file=sys.stderr); raise SystemExit(rc)"
    )
    # The lock file held by someone else does not matter to a read that needs no write.
    lock = state_dir / "leases.json.lock"
    holder = subprocess.Popen(
        ["flock", str(lock), "sleep", "30"] if shutil.which("flock") else ["sleep", "0"]
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=False
        )
    finally:
        holder.kill()
        holder.wait()
    assert (out.returncode, out.stdout, out.stderr) == (0, "10003\n", "[]\n")


def test_a_ledger_not_in_saves_shape_goes_the_locked_way(state_dir: Path) -> None:
    from portalloc.ledger.store import read_lease

    save(state_dir, lease("s", 10000))
    path = state_dir / "leases.json"
    assert read_lease(path, "s") is not None
    document = json.loads(path.read_text())
    path.write_text(json.dumps(document, indent=2))  # valid, but not as save() writes it
    assert read_lease(path, "s") is None
    twice = {**document, "leases": [lease("s", 10000), lease("s", 10100)]}
    path.write_text(json.dumps(twice, separators=(",", ":")))
    assert read_lease(path, "s") is None


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chunk=st.integers(min_value=1, max_value=700), flip=st.integers(min_value=0))
def test_the_read_path_scans_the_file_in_pieces_of_any_size(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, flip: int
) -> None:
    """The read path goes through the ledger in pieces, one buffer reused (a 5 MiB bytes
    object costs more in page faults than the scan): an id straddling two pieces, in the
    first or the last lease, is found; a second copy, a changed byte or a cut is not."""
    from portalloc.ledger import codec, store

    monkeypatch.setattr(store, "_CHUNK", chunk)
    leases = [lease(session, 10000 + 100 * i) for i, session in enumerate(SESSIONS)]
    save(state_dir, *leases)
    path = state_dir / "leases.json"
    data = path.read_bytes()
    for raw in leases:
        found = store.read_lease(path, str(raw["session_id"]))
        assert found is not None and codec.lease_to_raw(found) == raw
    assert store.read_lease(path, "nobody") is None
    # Any one byte changed: the CRC-32 no longer matches (or the shape is not save()'s).
    at = flip % len(data)
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1 :])
    changed = store.read_lease(path, "s")
    assert changed is None or at >= len(data) - 10  # in the CRC's digits, "a" is "A"
    path.write_bytes(data[: at or 1])
    assert store.read_lease(path, "s") is None
    # The same lease twice, CRC and all: the locked path decides.
    save(state_dir, *leases, lease("s", 20000))
    assert store.read_lease(path, "s") is None
    assert store.read_lease(path, SESSIONS[1]) is not None


ALLOCATE = [
    ["allocate", "s"],
    ["allocate", "s", "--json"],
    ["allocate", "--json", "new"],
    ["allocate", "new"],
    ["allocate", "bad\tid"],
    ["allocate", "bad\tid", "--json"],
    ["allocate", "=ls", "--json"],
]


def _timeless(text: str) -> str:
    """Timestamps and minutes left differ by the second between two runs (and so does
    the ledger's CRC, which covers them)."""
    import re

    text = re.sub(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\dZ?", "<time>", text)
    text = re.sub(r'"crc32":"[0-9a-f]{8}"', '"crc32":"<crc>"', text)
    return re.sub(
        r"\d+(\.\d+)? min", "<n> min", re.sub(r'"ttl_remaining_minutes": [\d.]+', "", text)
    )


@pytest.mark.parametrize("name", ["empty", "fresh", "refresh-due", "expired", "dead-owner"])
def test_lean_allocate_and_full_cli_agree_and_write_the_same(
    name: str, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORTALLOC_SKIP_PORT_CHECK", "1")
    for args in ALLOCATE:
        save(state_dir, *ledgers(tmp_path)[name])
        original = state_dir.with_name("original")
        shutil.copytree(state_dir, original)
        fast = run(entry.main, args)
        fast_ledger = _timeless((state_dir / "leases.json").read_text())
        shutil.rmtree(state_dir)
        shutil.copytree(original, state_dir)
        full = run(cli.main, args)
        full_ledger = _timeless((state_dir / "leases.json").read_text())
        shutil.rmtree(original)
        assert (fast[0], _timeless(fast[1]), fast[2]) == (full[0], _timeless(full[1]), full[2])
        assert fast_ledger == full_ledger, (name, args)


def test_full_ledger_error_is_the_same_one_line(state_dir: Path) -> None:
    save(state_dir, lease("s", 10000))
    env = {"PORT_ALLOC_MAX_SESSIONS": "1", "PORTALLOC_SKIP_PORT_CHECK": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        fast = run(entry.main, ["allocate", "other", "--json"])
        full = run(cli.main, ["allocate", "other", "--json"])
    assert fast == full
    assert fast[0] == 3 and json.loads(fast[1]) == {"success": False, "error": "no_ports_available"}


def _raw_document(*leases: dict[str, object], **extra: object) -> dict[str, object]:
    return {"version": LEDGER_VERSION, "leases": list(leases), "homes": {}, "files": {}, **extra}


def _hand_edited(tmp_path: Path) -> dict[str, bytes]:
    """Ledgers a person or a hostile group member wrote (found by a review). A file
    forged to pass as save()'s own, CRC recomputed, is out of reach of this promise:
    both paths then print ports its writer chose, each through the lease rules."""
    a, b = lease("a", 10300), lease("b", 10100)
    twice_keyed = json.dumps(_raw_document(b)).replace(
        '"session_id": "b"', '"session_id": "a", "session_id": "b"', 1
    )
    escaped = json.dumps(_raw_document(lease("a", 10500), a), separators=(",", ":")).replace(
        '"a"', '"\\u0061"', 1
    )
    return {
        "filed-under-another-id": twice_keyed.encode(),
        "nested-in-an-extra-key": _compact(_raw_document({**b, "x": a})),
        "inside-a-files-record": _compact(
            {**_raw_document(b), "files": {"b": [{**a, "kind": "manifest", "path": "/x"}]}}
        ),
        "overlapping": _compact(_raw_document(lease("b", 10200, span=200), lease("a", 10300))),
        "escaped-duplicate": escaped.encode(),
        "newer-version-key-later": json.dumps(_raw_document(a), separators=(",", ":"))
        .replace('"files":{}', f'"files":{{}},"version":{LEDGER_VERSION + 1}')
        .encode(),
        "broken-after-the-lease": json.dumps(_raw_document(a), separators=(",", ":")).encode()[:-1],
        "extra-top-level-key": _compact({**_raw_document(b), "zzz": a}),
        # save()'s own output, then one byte changed by hand: the CRC no longer matches.
        "edited-after-save": dump(_raw_document(a)).replace(b"10303", b"10304"),  # type: ignore[arg-type]
    }


def _compact(document: dict[str, object]) -> bytes:
    """As save() lays it out, but without the CRC save() adds: a file edited by hand."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("name", list(_hand_edited(Path("/x"))))
def test_hand_edited_ledgers_are_left_to_the_full_cli(
    name: str, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORTALLOC_SKIP_PORT_CHECK", "1")
    for args in (["get", "a", "api"], ["env", "a"], ["get", "b", "api"]):
        state_dir.mkdir(exist_ok=True)
        (state_dir / "leases.json").write_bytes(_hand_edited(tmp_path)[name])
        for leftover in state_dir.glob("leases.json.corrupt-*"):
            leftover.unlink()
        fast, full = both(state_dir, args)
        assert _stampless(fast) == _stampless(full), (name, args)


def _stampless(outcome: tuple[int, str, str]) -> tuple[int, str, str]:
    """The copy-aside name carries the second it was made."""
    import re

    code, out, err = outcome
    return code, out, re.sub(r"corrupt-\d{8}T\d{6}Z(-\d+)?", "corrupt-<stamp>", err)


def test_stdout_that_cannot_say_it_is_the_full_clis_one_line(state_dir: Path) -> None:
    save(state_dir, lease("ünï", 10000))
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PORTALLOC_DEBUG": ""}
    out = subprocess.run(
        [sys.executable, "-m", "portalloc", "get", "ünï", "session_id"],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "internal error (UnicodeEncodeError)" in out.stderr
    Path(out.stderr.rsplit("traceback written to ", 1)[1].strip()).unlink()

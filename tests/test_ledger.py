"""The ledger file: modes, versioning, quarantine of corrupt files, unwritable state dirs."""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import pytest

from portalloc.config import PortAllocatorConfig
from portalloc.ledger.format import LEDGER_VERSION
from portalloc.models import LedgerState
from portalloc.service import PortAllocatorService
from tests.helpers import run_cli


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_state_dir_and_files_are_private(state_dir: Path) -> None:
    assert run_cli("allocate", "s").returncode == 0
    assert mode(state_dir) == 0o700
    assert mode(state_dir / "leases.json") == 0o600
    assert mode(state_dir / "leases.json.lock") == 0o600
    assert sorted(p.name for p in state_dir.iterdir()) == ["leases.json", "leases.json.lock"]


def test_group_shared_state_dir_keeps_group_access(state_dir: Path) -> None:
    state_dir.mkdir()
    state_dir.chmod(0o2770)
    assert run_cli("allocate", "s").returncode == 0
    assert mode(state_dir) == 0o2770
    assert mode(state_dir / "leases.json") == 0o660
    assert mode(state_dir / "leases.json") & 0o007 == 0


def test_document_has_version_and_leases(state_dir: Path) -> None:
    run_cli("allocate", "s")
    document = json.loads((state_dir / "leases.json").read_text())
    assert document["version"] == LEDGER_VERSION
    assert [lease["session_id"] for lease in document["leases"]] == ["s"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"version": 1, "leases": "x"}', b"\xff\xfe", b""],
    ids=["garbage", "list", "wrong-shape", "binary", "empty"],
)
@pytest.mark.usefixtures("exact_ports")  # the fresh lease at the default block
def test_corrupt_ledger_is_moved_aside_with_warning(state_dir: Path, content: bytes) -> None:
    state_dir.mkdir(mode=0o700)
    (state_dir / "leases.json").write_bytes(content)
    result = run_cli("allocate", "s", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["allocation"]["db_port"] == 10000
    aside = list(state_dir.glob("leases.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == content
    assert str(state_dir / "leases.json") in result.stderr
    assert str(aside[0]) in result.stderr
    assert result.stderr.count("\n") == 1


def test_overlapping_leases_count_as_corrupt(state_dir: Path) -> None:
    run_cli("allocate", "a")
    run_cli("allocate", "b")
    path = state_dir / "leases.json"
    document = json.loads(path.read_text())
    document["leases"][1]["start"] = document["leases"][0]["start"]
    path.write_text(json.dumps(document))
    result = run_cli("status", "--json")
    assert result.returncode == 0
    assert "overlap" in result.stderr
    assert len(list(state_dir.glob("leases.json.corrupt-*"))) == 1


def test_newer_version_is_never_overwritten(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700)
    newer = json.dumps({"version": LEDGER_VERSION + 1, "leases": "future format"})
    (state_dir / "leases.json").write_text(newer)
    for command in (["allocate", "s"], ["release", "s"], ["status"], ["prune"]):
        result = run_cli(*command)
        assert result.returncode == 1
        assert "written by a newer portalloc" in result.stderr
        assert "Traceback" not in result.stderr
    assert (state_dir / "leases.json").read_text() == newer


@pytest.mark.parametrize("kind", ["file-in-the-way", "under-proc"])
def test_unusable_state_dir_exits_1_with_one_line(tmp_path: Path, kind: str) -> None:
    if kind == "file-in-the-way":
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        target = blocker / "state"
    else:
        target = Path("/proc/portalloc-cannot-live-here")
    result = run_cli("allocate", "s", env={"PORTALLOC_STATE_DIR": str(target)})
    assert result.returncode == 1
    assert result.stderr.startswith("portalloc: ledger ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_no_temp_files_left_after_writes(state_dir: Path) -> None:
    for name in ("a", "b", "c"):
        run_cli("allocate", name)
    run_cli("release", "b")
    assert not list(state_dir.glob(".leases.*"))


def test_service_keeps_working_in_a_forked_child(state_dir: Path) -> None:
    # filelock refuses a lock object inherited across fork; the child must build its own.
    svc = PortAllocatorService(PortAllocatorConfig(state_dir=state_dir, skip_port_check=True))
    svc.allocate("parent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            svc.allocate("child")
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert {allocation.session_id for allocation in svc.status()} == {"parent", "child"}


def test_next_write_removes_only_temp_files_of_killed_writers(state_dir: Path) -> None:
    svc = PortAllocatorService(PortAllocatorConfig(state_dir=state_dir, skip_port_check=True))
    svc.allocate("a")
    leftover = state_dir / ".leases.json.4242.0.123456789.tmp"  # as atomic_write names them
    leftover.write_text("{")
    unrelated = state_dir / ".leases.json.notes.tmp"
    unrelated.write_text("mine")
    svc.allocate("b")
    assert not leftover.exists()
    assert unrelated.read_text() == "mine"


def test_every_error_pickles_with_its_data_and_message() -> None:
    import pickle

    from portalloc import errors

    samples = [
        errors.PortallocError("plain"),
        errors.ConfigError("PORT_ALLOC_BASE", 80, "must be an integer >= 1024"),
        errors.ProfileError(Path("/p/portalloc.toml"), "env.X", "bad"),
        errors.InvalidSessionId("must not be empty"),
        errors.UsageError("bad key"),
        errors.NoPortsAvailable("full"),
        errors.LeaseNotFound("s"),
        errors.LedgerError(Path("/s/leases.json"), "cannot read"),
        errors.LockTimeout(Path("/s/leases.json.lock"), 10, "pid 1: x"),
        errors.MissingExtra("mcp", "mcp"),
    ]
    for error in samples:
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes, just made
        assert type(copy) is type(error)
        assert (copy.message, str(copy), copy.exit_code) == (
            error.message,
            str(error),
            error.exit_code,
        )
        assert copy.__dict__ == error.__dict__


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_ledger_version_migrates_to_the_same_state(version: int, tmp_path: Path) -> None:
    from portalloc.ledger.codec import parse_document
    from portalloc.ledger.format import LEDGER_VERSION, migrate

    fixture = Path(__file__).parent / "fixtures" / f"ledger-v{version}.json"
    document = migrate(json.loads(fixture.read_text()))
    assert document["version"] == LEDGER_VERSION
    state = parse_document(document).state
    assert list(state.leases) == ["/src/shop-a"]
    assert state.homes == {"gone": 10100, "/src/shop-a": 10000, "old": 10200}
    assert state.leases["/src/shop-a"].guests == ()
    assert state.leases["/src/shop-a"].slug == "shop-a"  # v3: every lease has a name
    assert state.slugs == {}  # v4: the names of ended leases, none yet


def test_v2_leases_get_distinct_names_in_file_order() -> None:
    """The v2 -> v3 migration names two worktrees of one directory name apart."""
    from portalloc.ledger.codec import parse_document
    from portalloc.ledger.format import migrate

    fixture = Path(__file__).parent / "fixtures" / "ledger-v2-same-names.json"
    state = parse_document(migrate(json.loads(fixture.read_text()))).state
    slugs = {session: lease.slug for session, lease in state.leases.items()}
    assert slugs["/src/a/feat"] == "feat"
    assert slugs["/src/b/feat"] is not None and slugs["/src/b/feat"].startswith("feat-")
    assert all(lease.bare is None for lease in state.leases.values())


def test_a_long_lived_service_parses_the_ledger_again_only_when_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from portalloc.config import PortAllocatorConfig
    from portalloc.ledger import store as ledger_module
    from portalloc.service import PortAllocatorService

    config = PortAllocatorConfig(state_dir=tmp_path / "state", skip_port_check=True)
    server, other = PortAllocatorService(config), PortAllocatorService(config)
    server.allocate("a")
    parses: list[object] = []
    real = ledger_module.Ledger._load

    def counting(ledger: ledger_module.Ledger) -> LedgerState:
        # Whether in full or through the index: the file is read again.
        parses.append(ledger)
        return real(ledger)

    monkeypatch.setattr(ledger_module.Ledger, "_load", counting)
    for _ in range(3):
        assert [a.session_id for a in server.status()] == ["a"]
    assert parses == []  # unchanged since its own save: nothing parsed again
    other.allocate("b")  # another process (here: another ledger object) reads and writes
    assert len(parses) == 1
    assert [a.session_id for a in server.status()] == ["a", "b"]
    assert len(parses) == 2  # the server saw the change and parsed once more

"""The one guarded open (portalloc/fs.py): no other module opens a file, and a FIFO,
device, directory or symlink where a file is expected costs one line, never a hang."""

from __future__ import annotations

import ast
import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from portalloc import adopt, fs
from portalloc.errors import AdoptError
from portalloc.fs import UnsafeFile
from portalloc.service import PortAllocatorService

PACKAGE = Path(__file__).resolve().parent.parent / "portalloc"
PORTALLOC = Path(sys.executable).parent / "portalloc"  # the console script, as users run it

# Modules that still open files themselves, each to be moved onto portalloc.fs by the
# developer who owns it; the test fails on a module listed here that opens nothing any
# more, so the list cannot go stale. outputs.py, hooks.py and profile.py were the last
# (migrated in 40b37b2, d7b6a7d and 912188a): keep it empty.
NOT_YET_MIGRATED: set[str] = set()

# Attribute calls that open a file, whatever they are called on (Path, os, io, a
# module imported under another name).
_OPENING_METHODS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "fdopen"}


def _fs_names(tree: ast.AST) -> set[str]:
    """The names portalloc.fs is bound to in TREE (`from portalloc import fs`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "portalloc":
            names |= {alias.asname or alias.name for alias in node.names if alias.name == "fs"}
        elif isinstance(node, ast.Import):  # `import portalloc.fs as X`
            names |= {a.asname for a in node.names if a.name == "portalloc.fs" and a.asname}
    return names


def _is_fs(node: ast.expr, fs_names: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in fs_names
    return (  # portalloc.fs.read_bytes(...)
        isinstance(node, ast.Attribute)
        and node.attr == "fs"
        and isinstance(node.value, ast.Name)
        and node.value.id == "portalloc"
    )


def _opening_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, call) for each call in TREE that opens a file, but through portalloc.fs."""
    fs_names = _fs_names(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "io", "builtins"):
            for alias in node.names:
                if alias.name in ("open", "fdopen"):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            found.append((node.lineno, "open("))
        elif (
            isinstance(func, ast.Attribute)
            and func.attr in _OPENING_METHODS
            and not _is_fs(func.value, fs_names)
        ):
            found.append((node.lineno, f".{func.attr}("))
        elif (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and isinstance(func.value, ast.Name)
            and func.value.id == "tomllib"
        ):
            found.append((node.lineno, "tomllib.load("))
    return sorted(found)


def test_no_module_but_fs_opens_a_file() -> None:
    sites: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE.parent).as_posix()
        if name == "portalloc/fs.py":
            continue
        calls = _opening_calls(ast.parse(path.read_text(encoding="utf-8"), name))
        if calls:
            sites[name] = calls
    listing = "\n".join(
        f"  {name}:{line}: {call}" for name, calls in sites.items() for line, call in calls
    )
    print(f"files opened outside portalloc/fs.py:\n{listing or '  none'}")
    unexpected = sorted(set(sites) - NOT_YET_MIGRATED)
    assert not unexpected, f"open files through portalloc.fs, not directly:\n{listing}"
    migrated = sorted(NOT_YET_MIGRATED - set(sites))
    assert not migrated, f"remove from NOT_YET_MIGRATED in tests/test_fs.py: {migrated}"


def test_the_scan_finds_every_spelling(tmp_path: Path) -> None:
    source = (
        "import io, os, tomllib\nfrom os import fdopen\n"
        "open('a')\nos.open('a', 0)\nio.open('a')\nPath('a').open()\n"
        "p.read_text()\np.read_bytes()\np.write_text('')\np.write_bytes(b'')\n"
        "tomllib.load(f)\nos.fdopen(3)\n"
        "tomllib.loads('')\nsubprocess.Popen([])\n"  # neither opens a file
        "from portalloc import fs\nimport portalloc.fs\n"
        "fs.read_bytes(p)\nportalloc.fs.read_text(p)\n"  # the guarded open itself
    )
    calls = [call for _line, call in _opening_calls(ast.parse(source))]
    assert calls == [
        "from os import fdopen",
        "open(",
        ".open(",
        ".open(",
        ".open(",
        ".read_text(",
        ".read_bytes(",
        ".write_text(",
        ".write_bytes(",
        "tomllib.load(",
        ".fdopen(",
    ]


# --- the guarded open itself ---------------------------------------------------------


def test_a_fifo_a_directory_and_a_device_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFile, match="is a FIFO, not a regular file") as caught:
        fs.read_bytes(fifo)
    assert caught.value.kind == "a FIFO" and caught.value.exit_code == 2
    with pytest.raises(UnsafeFile, match="is a directory"):
        fs.read_bytes(tmp_path)
    if Path("/dev/null").exists():
        with pytest.raises(UnsafeFile, match="is a device"):
            fs.read_bytes("/dev/null")


def test_a_symlink_is_followed_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert fs.read_bytes(link) == b"data"
    with pytest.raises(UnsafeFile, match="is a symlink; refusing to follow it"):
        fs.read_bytes(link, follow=False)
    fifo_link = tmp_path / "fifo-link"
    os.mkfifo(tmp_path / "fifo")
    fifo_link.symlink_to(tmp_path / "fifo")
    with pytest.raises(UnsafeFile, match="FIFO"):
        fs.read_bytes(fifo_link)
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(tmp_path / "missing", follow=False)


def test_only_names_temp_name_gives_are_temp_names(tmp_path: Path) -> None:
    ledger = tmp_path / "leases.json"
    assert fs.is_temp_name(fs.temp_name(ledger), ledger)
    for name in (
        ".leases.json.\u00b2.\u00b2.\u00b2.tmp",
        ".leases.json.\u0661.2.3.tmp",
        ".leases.json.1.2.tmp",
    ):
        assert not fs.is_temp_name(name, ledger), name


def test_a_lock_file_is_opened_only_when_it_is_a_regular_file(tmp_path: Path) -> None:
    # Each kind as the open itself meets it: what a look before it would miss when the
    # file is swapped in between.
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    for name, kind in [("dir", "a directory"), ("link", "a symlink"), ("fifo", "a FIFO")]:
        with pytest.raises(UnsafeFile, match=f"is {kind}") as caught:
            fs.open_lock(tmp_path / name)
        assert caught.value.exit_code == 2
    assert target.read_bytes() == b"keep"


def test_a_lock_file_is_made_with_its_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        fd = fs.open_lock(tmp_path / "made.lock", 0o660)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o660
        assert os.get_blocking(fd) is False and os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    # One that exists is opened as it is.
    (tmp_path / "kept.lock").write_bytes(b"")
    (tmp_path / "kept.lock").chmod(0o600)
    fd = fs.open_lock(tmp_path / "kept.lock", 0o660)
    os.close(fd)
    assert stat.S_IMODE((tmp_path / "kept.lock").stat().st_mode) == 0o600


def test_atomic_write_replaces_only_a_regular_file(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafeFile, match="is a symlink; refusing to replace it"):
        fs.atomic_write(link, b"new")
    assert target.read_bytes() == b"keep" and link.is_symlink()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafeFile, match="is a FIFO"):
        fs.atomic_write(tmp_path / "fifo", b"new")
    fs.atomic_write(target, b"new", 0o640)
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link", "target"]


def test_a_write_never_leaves_the_worktree_through_a_symlinked_directory(
    tmp_path: Path,
) -> None:
    top, outside = tmp_path / "top", tmp_path / "home"
    top.mkdir()
    outside.mkdir()
    (top / ".claude").symlink_to(outside)
    with pytest.raises(UnsafeFile, match=r"lies outside .* through a symlinked directory"):
        fs.atomic_write(top / ".claude" / "settings.json", b"{}", within=top)
    assert list(outside.iterdir()) == []
    fs.atomic_write(top / "inside", b"x", within=top)
    assert (top / "inside").read_bytes() == b"x"


def test_the_crash_report_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = Path(fs.write_report("portalloc-crash-", "Traceback é\n"))
    assert path.parent == tmp_path and path.read_text(encoding="utf-8") == "Traceback é\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- state files, through the real entry point -----------------------------------------


def portalloc(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`portalloc ARGS` as a process, from the venv's console script; a hang fails the test."""
    start = time.monotonic()
    proc = subprocess.run(
        [str(PORTALLOC), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PORTALLOC_SKIP_PORT_CHECK": "1", **(env or {})},
        timeout=30,
        check=False,
    )
    assert time.monotonic() - start < 20, f"portalloc {args} took too long"
    return proc.returncode, proc.stdout, proc.stderr


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    return stderr


needs_script = pytest.mark.skipif(not PORTALLOC.exists(), reason="needs the console script")


@needs_script
@pytest.mark.parametrize(
    "args", [["env"], ["env", "s"], ["get", "s", "api"], ["status"], ["allocate", "s"]]
)
def test_a_fifo_ledger_fails_at_once_in_one_line(
    state_dir: Path, tmp_path: Path, args: list[str]
) -> None:
    state_dir.mkdir()
    ledger = state_dir / "leases.json"
    os.mkfifo(ledger)
    code, out, err = portalloc(*args, cwd=tmp_path)
    assert code == 2 and out == ""
    assert one_line(err) == f"portalloc: {ledger}: is a FIFO, not a regular file\n"
    assert stat.S_ISFIFO(ledger.lstat().st_mode)  # never replaced


@needs_script
@pytest.mark.parametrize("kind", ["directory", "dangling symlink"])
def test_a_ledger_that_is_no_file_fails_in_one_line(
    state_dir: Path, tmp_path: Path, kind: str
) -> None:
    state_dir.mkdir()
    ledger = state_dir / "leases.json"
    if kind == "directory":
        ledger.mkdir()
    else:
        ledger.symlink_to(tmp_path / "nowhere")
    code, out, err = portalloc("allocate", "s", cwd=tmp_path)
    assert code == 2 and out == ""
    assert kind.split()[-1] in one_line(err)
    assert not (tmp_path / "nowhere").exists()


@needs_script
def test_a_symlinked_ledger_is_never_read_through_nor_replaced(
    state_dir: Path, tmp_path: Path
) -> None:
    # A real ledger elsewhere, with a lease the fast path would happily print.
    elsewhere = tmp_path / "elsewhere"
    assert (
        portalloc("allocate", "s", cwd=tmp_path, env={"PORTALLOC_STATE_DIR": str(elsewhere)})[0]
        == 0
    )
    target = elsewhere / "leases.json"
    before = target.read_bytes(), target.stat().st_mtime_ns
    state_dir.mkdir()
    ledger = state_dir / "leases.json"
    ledger.symlink_to(target)
    for args in (["get", "s", "api"], ["env", "s"], ["allocate", "t"], ["release", "s"]):
        code, out, err = portalloc(*args, cwd=tmp_path)
        assert code == 2 and out == "", args
        assert one_line(err).startswith(f"portalloc: {ledger}: is a symlink; refusing to follow")
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    assert ledger.is_symlink()
    assert sorted(p.name for p in state_dir.iterdir()) == ["leases.json", "leases.json.lock"]


@needs_script
@pytest.mark.parametrize("kind", ["FIFO", "symlink"])
def test_the_lock_file_is_guarded_too(state_dir: Path, tmp_path: Path, kind: str) -> None:
    state_dir.mkdir()
    lock = state_dir / "leases.json.lock"
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    if kind == "FIFO":
        os.mkfifo(lock)
    else:
        lock.symlink_to(target)
    code, out, err = portalloc("env", cwd=tmp_path)
    assert code == 2 and out == ""
    assert one_line(err).startswith(f"portalloc: {lock}: is a {kind}; refusing to lock it")
    assert target.read_bytes() == b"keep"
    assert not (state_dir / "leases.json").exists()


@needs_script
def _indexed_service(state_dir: Path) -> PortAllocatorService:
    """A service whose ledger is large enough to keep an index (its saves pack one)."""
    from portalloc.config import PortAllocatorConfig
    from portalloc.ledger.store import INDEX_MIN_LEASES

    config = PortAllocatorConfig(state_dir=state_dir, skip_port_check=True, max_sessions=100)
    service = PortAllocatorService(config)
    for number in range(INDEX_MIN_LEASES):
        service.allocate(f"s{number}")
    return service


def test_a_fifo_or_symlink_at_the_index_name_is_replaced_not_followed(
    state_dir: Path, tmp_path: Path
) -> None:
    many = {"PORT_ALLOC_MAX_SESSIONS": "100"}
    _indexed_service(state_dir)
    index = state_dir / f"leases.json.index-{os.geteuid()}"
    assert index.is_file()
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    for plant in (os.mkfifo, lambda path: path.symlink_to(target)):
        index.unlink()
        plant(index)
        assert portalloc("get", "s1", "api", cwd=tmp_path)[0] == 0
        assert portalloc("allocate", "new", cwd=tmp_path, env=many)[0] == 0
        assert portalloc("release", "new", cwd=tmp_path, env=many)[0] == 0
        assert index.is_file() and not index.is_symlink()
    assert target.read_bytes() == b"keep"


@needs_script
@pytest.mark.parametrize("plant", ["FIFO", "symlink", "fine"])
def test_completion_never_hangs_nor_reads_through(
    state_dir: Path, tmp_path: Path, plant: str
) -> None:
    elsewhere = tmp_path / "elsewhere"
    env = {"PORTALLOC_STATE_DIR": str(elsewhere if plant == "symlink" else state_dir)}
    assert portalloc("allocate", "mysession", cwd=tmp_path, env=env)[0] == 0
    ledger = state_dir / "leases.json"
    if plant == "FIFO":
        ledger.unlink()
        os.mkfifo(ledger)
    elif plant == "symlink":
        state_dir.mkdir()
        ledger.symlink_to(elsewhere / "leases.json")
    complete = {"_PORTALLOC_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "portalloc get my"}
    code, out, err = portalloc(cwd=tmp_path, env=complete)
    assert code == 0 and "Traceback" not in err
    assert ("mysession" in out) == (plant == "fine"), out


# --- init ---------------------------------------------------------------------------


def repository(tmp_path: Path) -> Path:
    top = tmp_path / "repo"
    (top / ".git").mkdir(parents=True)
    return top


COMPOSE = "services:\n  web:\n    image: nginx\n    ports:\n      - 8080:80\n"


@needs_script
def test_init_refuses_a_fifo_compose_file_at_once(tmp_path: Path) -> None:
    top = repository(tmp_path)
    os.mkfifo(top / "compose.yaml")
    code, out, err = portalloc("init", "compose.yaml", cwd=top)
    assert code == 2 and out == ""
    assert one_line(err) == "portalloc: compose.yaml: not a regular file (a FIFO)\n"
    # Not named: a FIFO is no compose file to find.
    code, _out, err = portalloc("init", cwd=top)
    assert code == 2 and one_line(err).startswith("portalloc: no compose file")


@needs_script
def test_init_is_not_stopped_by_fifos_beside_the_compose_file(tmp_path: Path) -> None:
    top = repository(tmp_path)
    (top / "compose.yaml").write_text(COMPOSE)
    for name in (".env", ".env.local", "package.json"):
        os.mkfifo(top / name)
    code, out, err = portalloc("init", cwd=top)
    assert code == 0 and "Traceback" not in err
    assert '+      - "${WEB_PORT:-8080}:80"' in out
    code, _out, err = portalloc("init", "--write", cwd=top)
    assert code == 0 and "Traceback" not in err
    assert '"${WEB_PORT:-8080}:80"' in (top / "compose.yaml").read_text()
    assert all(stat.S_ISFIFO((top / name).lstat().st_mode) for name in (".env", "package.json"))


def test_a_failed_init_write_names_the_file_that_failed_and_puts_back_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    top = repository(tmp_path)
    compose = top / "compose.yaml"
    compose.write_text(COMPOSE)
    plan = adopt.plan([compose], top)
    adopt.add_profile(plan)
    assert [shown for _path, shown, _old, _new in plan.changes] == [
        "compose.yaml",
        "portalloc.toml",
    ]
    real_write = fs.atomic_write

    def disk_full_for_the_profile(
        path: Path, data: bytes, mode: int, within: Path | None = None
    ) -> None:
        if path.name == "portalloc.toml":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data, mode, within=within)

    monkeypatch.setattr(adopt, "atomic_write", disk_full_for_the_profile)
    with pytest.raises(AdoptError) as caught:
        adopt.write(plan)
    # The file that failed, not compose.yaml (written, then put back).
    assert caught.value.path == top / "portalloc.toml"
    assert caught.value.message == (
        f"{top / 'portalloc.toml'}: cannot be written: No space left on device; nothing changed"
    )
    assert compose.read_text() == COMPOSE
    assert sorted(p.name for p in top.iterdir()) == [".git", "compose.yaml"]


def test_a_failed_put_back_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    top = repository(tmp_path)
    compose = top / "compose.yaml"
    compose.write_text(COMPOSE)
    plan = adopt.plan([compose], top)
    adopt.add_profile(plan)
    calls: list[Path] = []
    real_write = fs.atomic_write

    def fail_after_the_first(
        path: Path, data: bytes, mode: int, within: Path | None = None
    ) -> None:
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real_write(path, data, mode, within=within)

    monkeypatch.setattr(adopt, "atomic_write", fail_after_the_first)
    with pytest.raises(AdoptError) as caught:
        adopt.write(plan)
    assert caught.value.message == (
        f"{top / 'portalloc.toml'}: cannot be written: Input/output error; "
        f"could not put back {compose}"
    )


def test_the_new_index_is_made_while_the_ledger_syncs(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index of a large ledger is packed while the disk syncs the ledger, not after
    it (the sync waits for the disk and the packing is CPU: at 10,000 leases, about 2 ms
    of each `allocate`, bench/README.md)."""
    import threading

    from portalloc.ledger import index

    service = _indexed_service(state_dir)
    packed, seen = threading.Event(), []
    real_pack, real_sync = index.pack_index, os.fdatasync

    def pack(*args: object) -> list[bytes]:
        packed.set()
        return real_pack(*args)  # type: ignore[arg-type]

    def sync(fd: int) -> None:
        # Done one after the other, the packing would only start once this returned.
        seen.append(packed.wait(timeout=10))
        real_sync(fd)

    with monkeypatch.context() as patched:
        patched.setattr(index, "pack_index", pack)
        patched.setattr(os, "fdatasync", sync)
        service.allocate("new")
    assert seen == [True]
    # The index it wrote vouches for the new file: a fresh process reads through it.
    assert portalloc("get", "new", "api", cwd=state_dir.parent)[0] == 0
    assert (state_dir / f"leases.json.index-{os.geteuid()}").is_file()


def test_a_failed_sync_replaces_no_ledger(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from portalloc.errors import LedgerError

    service = _indexed_service(state_dir)
    ledger = state_dir / "leases.json"
    before = ledger.read_bytes()

    def sync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patched, pytest.raises(LedgerError, match="cannot write"):
        patched.setattr(os, "fdatasync", sync)
        service.allocate("new")
    assert ledger.read_bytes() == before
    assert not [path.name for path in state_dir.iterdir() if path.name.endswith(".tmp")]
    more = {"PORT_ALLOC_MAX_SESSIONS": "100"}
    code, _out, err = portalloc("allocate", "next", cwd=state_dir.parent, env=more)
    assert code == 0, err
    leases = json.loads(ledger.read_text())["leases"]
    assert [lease["session_id"] for lease in leases][-2:] == ["s63", "next"]


def test_without_a_thread_the_sync_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no thread can be started (a limit on processes), the write still happens:
    the sync, then the work."""
    import _thread

    order: list[str] = []
    real_sync = os.fdatasync

    def refuse(*args: object) -> None:
        raise RuntimeError("can't start new thread")

    def sync(fd: int) -> None:
        order.append("sync")
        real_sync(fd)

    monkeypatch.setattr(_thread, "start_new_thread", refuse)
    monkeypatch.setattr(os, "fdatasync", sync)
    target = tmp_path / "file"
    fs.atomic_write(target, b"data", meanwhile=lambda: order.append("work"))
    assert order == ["sync", "work"]
    assert target.read_bytes() == b"data"


def test_a_write_stopped_by_ctrl_c_never_syncs_another_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a write waits for its sync thread: the write gives up (the file is
    not replaced), its descriptor is closed, and the thread, started late, syncs the
    file it was given, not one opened since under the same number (a REPL goes on)."""
    import _thread
    import signal
    import threading

    go, synced = threading.Event(), []
    real_start, real_sync = _thread.start_new_thread, os.fdatasync
    main = threading.main_thread().ident
    assert main is not None

    def start_late(function: object, args: tuple[object, ...]) -> int:
        def late() -> None:
            signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C while the write waits
            go.wait(timeout=10)
            function(*args)  # type: ignore[operator]

        return real_start(late, ())

    def sync(fd: int) -> None:
        synced.append(str(Path(f"/proc/self/fd/{fd}").readlink()))
        real_sync(fd)

    monkeypatch.setattr(_thread, "start_new_thread", start_late)
    monkeypatch.setattr(os, "fdatasync", sync)
    target = tmp_path / "file"
    with pytest.raises(KeyboardInterrupt):
        fs.atomic_write(target, b"data", meanwhile=lambda: None)
    opened = [os.open(tmp_path / f"other-{n}", os.O_CREAT | os.O_WRONLY, 0o600) for n in range(4)]
    try:
        go.set()
        deadline = time.monotonic() + 10
        while not synced and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for fd in opened:
            os.close(fd)
    assert len(synced) == 1 and ".tmp" in synced[0] and "other-" not in synced[0]
    assert not target.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"other-{n}" for n in range(4)]


def test_an_index_that_cannot_be_packed_stops_no_write(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index is a cache: out of memory while packing it, the lease is still saved
    and the next load reads the whole file."""
    from portalloc.ledger import index

    service = _indexed_service(state_dir)

    def pack(*args: object) -> list[bytes]:
        raise MemoryError

    with monkeypatch.context() as patched:
        patched.setattr(index, "pack_index", pack)
        service.allocate("new")
    assert not (state_dir / f"leases.json.index-{os.geteuid()}").exists()
    code, out, err = portalloc("get", "new", "api", cwd=state_dir.parent)
    assert (code, err) == (0, "")
    assert out.strip() == str(service.get("new").ports["api"])

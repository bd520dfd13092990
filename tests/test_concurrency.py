"""Real OS processes racing for the ledger, crashing in the middle of a write, or
waiting on a lock that another process holds.

Racing workers import everything first, then block on a shared flock of a barrier
file that the test holds exclusively; releasing it wakes them all at the same moment,
so the ledger lock really is contended.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from portalloc.allocator import Request, grant
from portalloc.config import PortAllocatorConfig
from portalloc.models import LedgerState
from portalloc.service import PortAllocatorService
from tests.helpers import run_cli

RACE_WORKER = r"""
import contextlib, fcntl, io, json, os, sys, time

barrier, ready, mode, *args = sys.argv[1:]
if mode == "api":
    from portalloc import get_port_allocator

    service = get_port_allocator()
else:
    from portalloc.adapters.cli import main

    # Typer imports most of its machinery on its first call. Pay for that before the
    # barrier with an invalid session id, which is refused before any ledger is touched.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(["allocate", ""])
fd = os.open(barrier, os.O_RDONLY)
with open(ready, "w"):
    pass
fcntl.flock(fd, fcntl.LOCK_SH)  # blocks until the test lets go of its exclusive lock
started = time.time()
if mode == "api":
    print(json.dumps(service.allocate(args[0]).to_dict()))
    code = 0
else:
    code = main(args)
with open(ready, "w") as handle:
    handle.write(repr(started))
sys.exit(code)
"""


@dataclass
class Outcome:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    started: float  # wall-clock time the worker passed the barrier


def race(
    workdir: Path,
    argvs: Sequence[Sequence[str]],
    *,
    mode: str | Sequence[str],
    env: Mapping[str, str] | None = None,
) -> list[Outcome]:
    """Start one worker per argv, wait until all are ready, then release them at once.
    MODE: "api" or "cli", for all of them or one per argv."""
    modes = [mode] * len(argvs) if isinstance(mode, str) else list(mode)
    workdir.mkdir()
    barrier = workdir / "barrier"
    barrier.touch()
    ready = [workdir / f"ready-{index}" for index in range(len(argvs))]
    full_env = {**os.environ, **(env or {})}
    with barrier.open("rb") as hold:
        fcntl.flock(hold, fcntl.LOCK_EX)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RACE_WORKER, str(barrier), str(flag), kind, *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=full_env,
            )
            for flag, kind, argv in zip(ready, modes, argvs, strict=True)
        ]
        try:
            deadline = time.monotonic() + 60
            while not all(flag.exists() for flag in ready):
                early = [proc for proc in procs if proc.poll() is not None]
                assert not early, early[0].communicate()[1]
                assert time.monotonic() < deadline, "workers did not get ready in 60 s"
                time.sleep(0.01)
            fcntl.flock(hold, fcntl.LOCK_UN)
            results = [proc.communicate(timeout=60) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    return [
        Outcome(list(argv), proc.returncode, out, err, float(flag.read_text() or "nan"))
        for argv, proc, (out, err), flag in zip(argvs, procs, results, ready, strict=True)
    ]


def assert_raced(outcomes: Sequence[Outcome]) -> None:
    """The barrier worked: every worker got going within a moment of the others."""
    starts = [outcome.started for outcome in outcomes]
    assert max(starts) - min(starts) < 2.0, sorted(starts)


def load_ledger(state_dir: Path) -> dict[str, Any]:
    document = json.loads((state_dir / "leases.json").read_bytes())
    assert isinstance(document, dict)
    assert document["version"] == 4
    return document


def assert_disjoint(blocks: Sequence[tuple[int, int]], ports: Sequence[int]) -> None:
    assert len(ports) == len(set(ports)), "a port was handed out twice"
    ordered = sorted(blocks)
    assert all(a[1] < b[0] for a, b in pairwise(ordered)), ordered


def ledger_ports(document: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    return {lease["session_id"]: dict(lease["ports"]) for lease in document["leases"]}


def allocation_ports(allocation: Mapping[str, Any]) -> dict[str, int]:
    return {
        key[: -len("_port")]: value for key, value in allocation.items() if key.endswith("_port")
    }


# The lock is under test, not the bind probe: these count blocks from 10000 exactly.
@pytest.mark.usefixtures("exact_ports")
def test_forty_processes_distinct_sessions_get_disjoint_blocks(
    state_dir: Path, tmp_path: Path
) -> None:
    sessions = [f"wt-{index}" for index in range(40)]
    outcomes = race(
        tmp_path / "race",
        [[session] for session in sessions],
        mode="api",
        env={"PORT_ALLOC_MAX_SESSIONS": "40"},
    )
    assert [o.returncode for o in outcomes] == [0] * 40, [o.stderr for o in outcomes if o.stderr]
    assert_raced(outcomes)
    allocations = [json.loads(outcome.stdout) for outcome in outcomes]
    assert [a["session_id"] for a in allocations] == sessions
    assert_disjoint(
        [(a["block_start"], a["block_end"]) for a in allocations],
        [port for a in allocations for port in allocation_ports(a).values()],
    )
    for allocation in allocations:
        start = allocation["block_start"]
        assert 10000 <= start <= 13900 and (start - 10000) % 100 == 0, allocation
        assert allocation_ports(allocation) == {
            "db": start,
            "rest": start + 1,
            "realtime": start + 2,
            "api": start + 3,
        }
    assert len({a["compose_project_name"] for a in allocations}) == 40

    # What each process was told is what the ledger holds, and nothing else.
    document = load_ledger(state_dir)
    assert ledger_ports(document) == {a["session_id"]: allocation_ports(a) for a in allocations}
    status = run_cli("status", "--json", env={"PORT_ALLOC_MAX_SESSIONS": "40"})
    assert status.returncode == 0 and "corrupt" not in status.stderr
    assert sorted(item["session_id"] for item in json.loads(status.stdout)) == sorted(sessions)
    assert not [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")]


def test_forty_processes_same_session_share_one_lease(state_dir: Path, tmp_path: Path) -> None:
    outcomes = race(tmp_path / "race", [["shared"]] * 40, mode="api")
    assert [o.returncode for o in outcomes] == [0] * 40, [o.stderr for o in outcomes if o.stderr]
    assert_raced(outcomes)
    allocations = [json.loads(outcome.stdout) for outcome in outcomes]
    stable = ("session_id", "block_start", "block_end", "compose_project_name", "created_at")
    first = allocations[0]
    for allocation in allocations:
        assert allocation_ports(allocation) == allocation_ports(first)
        assert {key: allocation[key] for key in stable} == {key: first[key] for key in stable}
    document = load_ledger(state_dir)
    assert len(document["leases"]) == 1
    assert ledger_ports(document) == {"shared": allocation_ports(first)}


@pytest.mark.usefixtures("exact_ports")
def test_command_lines_waiting_in_the_kernel_and_api_callers_exclude_each_other(
    state_dir: Path, tmp_path: Path
) -> None:
    # The CLI waits for the lock in flock(2) itself, the Python API through filelock:
    # thirty of each at once, alternating, still get thirty disjoint blocks each. (The
    # probe off: every one of the span's 60 blocks must be grantable, whatever listens.)
    count = 60
    sessions = [f"mix-{index}" for index in range(count)]
    modes = ["cli" if index % 2 else "api" for index in range(count)]
    argvs = [
        ["allocate", s, "--json"] if m == "cli" else [s]
        for s, m in zip(sessions, modes, strict=True)
    ]
    outcomes = race(
        tmp_path / "race", argvs, mode=modes, env={"PORT_ALLOC_MAX_SESSIONS": str(count)}
    )
    assert [o.returncode for o in outcomes] == [0] * count, [o.stderr for o in outcomes]
    assert_raced(outcomes)
    allocations = [
        json.loads(o.stdout)["allocation"] if m == "cli" else json.loads(o.stdout)
        for o, m in zip(outcomes, modes, strict=True)
    ]
    assert [a["session_id"] for a in allocations] == sessions
    assert_disjoint(
        [(a["block_start"], a["block_end"]) for a in allocations],
        [port for a in allocations for port in allocation_ports(a).values()],
    )
    document = load_ledger(state_dir)
    assert ledger_ports(document) == {a["session_id"]: allocation_ports(a) for a in allocations}


@pytest.mark.usefixtures("exact_ports")
def test_twelve_processes_eight_slots_exactly_eight_win(state_dir: Path, tmp_path: Path) -> None:
    # Half of them ask for JSON, so both failure shapes of the contract are seen.
    argvs = [
        ["allocate", f"c{index}", "--json"] if index % 2 == 0 else ["allocate", f"c{index}"]
        for index in range(12)
    ]
    outcomes = race(tmp_path / "race", argvs, mode="cli", env={"PORT_ALLOC_MAX_SESSIONS": "8"})
    assert_raced(outcomes)
    assert all("Traceback" not in o.stderr for o in outcomes), [o.stderr for o in outcomes]
    winners = [o for o in outcomes if o.returncode == 0]
    losers = [o for o in outcomes if o.returncode != 0]
    assert len(winners) == 8, [(o.argv, o.returncode, o.stderr) for o in outcomes]
    assert [o.returncode for o in losers] == [3] * 4, [(o.argv, o.stderr) for o in losers]
    for loser in losers:
        if "--json" in loser.argv:
            assert json.loads(loser.stdout) == {"success": False, "error": "no_ports_available"}
        else:
            assert loser.stdout == ""
        assert loser.stderr.startswith("portalloc: no ports available"), loser.stderr
        assert loser.stderr.count("\n") == 1, loser.stderr
    for winner in winners:
        if "--json" in winner.argv:
            body = json.loads(winner.stdout)
            assert body["success"] is True
            assert body["allocation"]["session_id"] == winner.argv[1]

    document = load_ledger(state_dir)
    assert sorted(ledger_ports(document)) == sorted(o.argv[1] for o in winners)
    assert_disjoint(
        [(lease["start"], lease["start"] + lease["span"] - 1) for lease in document["leases"]],
        [port for lease in document["leases"] for port in lease["ports"].values()],
    )


CRASH_WORKER = r"""
import os, sys, time
from pathlib import Path

stage, session, state_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
ledger = state_dir / "leases.json"
from portalloc import get_port_allocator

service = get_port_allocator()
real_fsync, real_replace = getattr(os, "fdatasync", os.fsync), os.replace


def is_temp_file(fd):
    try:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return False
    return path.parent == state_dir and path.name not in ("leases.json", "leases.json.lock")


def pause():
    # The test SIGKILLs us here, in the middle of the ledger write.
    sys.stdout.write(stage + "\n")
    sys.stdout.flush()
    time.sleep(120)


def fsync(fd):
    if stage == "before-fsync" and is_temp_file(fd):
        pause()
    real_fsync(fd)


def replace(src, dst, *args, **kwargs):
    target = Path(dst) == ledger
    if stage == "before-replace" and target:
        pause()
    real_replace(src, dst, *args, **kwargs)
    if stage == "after-replace" and target:
        pause()


os.fdatasync, os.replace = fsync, replace  # the temp file's data is synced with fdatasync
service.allocate(session)
print("finished without reaching", stage, flush=True)
"""

BULK = {
    "PORT_ALLOC_BASE": "20000",
    "PORT_ALLOC_RANGE": "4",
    "PORT_ALLOC_MAX_SESSIONS": "600",
    "PORTALLOC_SKIP_PORT_CHECK": "1",  # the bind probe is not under test here
}


def fill_ledger(config: PortAllocatorConfig, count: int) -> None:
    """Write COUNT leases in one go (allocating them one by one would rewrite it COUNT times)."""
    service = PortAllocatorService(config)
    now = service.clock()
    state = LedgerState()
    for index in range(count):
        state = grant(state, Request(session_id=f"bulk-{index}", config=config), now, None).state
    with service.ledger.locked():
        service.ledger.save(state)


def kill_mid_write(stage: str, session: str, state_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_WORKER, stage, session, str(state_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        reached = proc.stdout.readline().strip()
        if reached == stage:
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert reached == stage, f"worker: {reached}{out}\n{err}"
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("stage", ["before-fsync", "before-replace", "after-replace"])
def test_sigkill_in_the_middle_of_a_write_leaves_old_or_new_ledger(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    for name, value in BULK.items():
        monkeypatch.setenv(name, value)
    config = PortAllocatorConfig.from_env()
    fill_ledger(config, 500)  # about 250 kB: a write that takes a moment
    ledger = state_dir / "leases.json"
    before = ledger.read_bytes()
    old = ledger_ports(json.loads(before))

    kill_mid_write(stage, "crashed", state_dir)

    document = load_ledger(state_dir)  # parses: never torn
    current = ledger_ports(document)
    if stage == "after-replace":
        assert current == {**old, "crashed": current["crashed"]}  # the new ledger, complete
    else:
        assert ledger.read_bytes() == before  # the previous ledger, byte for byte

    # The dead writer's lock is free again, and the ledger loads without being
    # quarantined; the next writer does its job.
    warnings: list[str] = []
    service = PortAllocatorService(
        PortAllocatorConfig.from_env(environ={**os.environ, "PORTALLOC_LOCK_TIMEOUT": "5"}),
        on_warning=warnings.append,
    )
    assert {a.session_id for a in service.status()} == set(current)
    service.allocate("next")
    assert warnings == []
    # The killed writer's temp file (a full copy of the ledger) went with that write.
    assert not [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")]
    assert not [p.name for p in state_dir.iterdir() if ".corrupt-" in p.name]
    status = run_cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert "corrupt" not in status.stderr
    assert {item["session_id"] for item in json.loads(status.stdout)} == {*current, "next"}


@contextmanager
def lock_holder(argv: list[str], *, executable: str | None = None) -> Iterator[int]:
    """Run ARGV, which takes the ledger lock, prints "held" and keeps it until its stdin
    closes; yield its pid while it holds the lock."""
    holder = subprocess.Popen(
        argv, executable=executable, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()


HOLDER = r"""
import sys
from portalloc import get_port_allocator

with get_port_allocator().ledger.locked():
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@contextmanager
def ledger_held(tmp_path: Path) -> Iterator[int]:
    """A lease `existing`, and another process holding the ledger's lock through the
    Python API (filelock) until the block ends; yield its pid."""
    assert run_cli("allocate", "existing").returncode == 0
    script = tmp_path / "hold_ledger_lock.py"
    script.write_text(HOLDER)
    with lock_holder([sys.executable, str(script)]) as holder_pid:
        yield holder_pid


def blocked_on_flock(pid: int) -> bool:
    """Whether PID waits in the kernel for a flock (a `->` line of /proc/locks)."""
    return any(
        line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid)
        for line in Path("/proc/locks").read_text().splitlines()
    )


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="no /proc/locks (not Linux)")
def test_a_command_line_waits_in_the_kernel_and_the_release_wakes_it(
    state_dir: Path, tmp_path: Path
) -> None:
    # A command waiting for the lock sleeps in flock(2), queued by the kernel, instead of
    # polling: it takes no CPU from the holder, and goes on as soon as it is released.
    # A timeout past what one alarm holds (setitimer overflows beyond time_t): waited
    # for in alarms of a day at most.
    env = {**os.environ, "PORTALLOC_LOCK_TIMEOUT": "1e12"}
    with ledger_held(tmp_path):
        waiter = subprocess.Popen(
            [sys.executable, "-m", "portalloc", "allocate", "newcomer", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        queued(waiter)
        released = time.monotonic()
    out, err = waiter.communicate(timeout=60)
    woken = time.monotonic() - released
    assert waiter.returncode == 0, err
    assert json.loads(out)["allocation"]["session_id"] == "newcomer"
    assert woken < 30, woken  # woken by the release


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="no /proc/locks (not Linux)")
def test_a_lock_file_removed_while_a_command_waits_never_makes_two_holders(
    state_dir: Path, tmp_path: Path
) -> None:
    # The waiter's flock is on the file it opened. Removed, and made again by the next
    # process to lock, that file excludes nobody: the waiter must queue on the new one.
    assert run_cli("allocate", "existing").returncode == 0
    script = tmp_path / "hold_ledger_lock.py"
    script.write_text(HOLDER)
    lock_file = state_dir / "leases.json.lock"
    with ExitStack() as first:
        first.enter_context(lock_holder([sys.executable, str(script)]))
        waiter = subprocess.Popen(
            [sys.executable, "-m", "portalloc", "allocate", "waiter", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PORTALLOC_LOCK_TIMEOUT": "60"},
        )
        queued(waiter)
        lock_file.unlink()
        with lock_holder([sys.executable, str(script)]):  # makes the file again, holds it
            first.close()  # the first holder lets go of the removed file
            queued(waiter)  # and the waiter, woken, queues behind the second
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert json.loads(out)["allocation"]["session_id"] == "waiter"
    assert sorted(ledger_ports(load_ledger(state_dir))) == ["existing", "waiter"]


def queued(waiter: subprocess.Popen[str]) -> None:
    """Wait until WAITER is queued in the kernel for a flock; fail if it ends first."""
    deadline = time.monotonic() + 30
    while not blocked_on_flock(waiter.pid):
        if waiter.poll() is not None or time.monotonic() > deadline:
            waiter.kill()
            raise AssertionError(f"not queued for the lock: {waiter.communicate()}")
        time.sleep(0.02)


ALARM_USER = r"""
import signal, sys
from portalloc.errors import LockTimeout
from portalloc.service import open_service

def mine(signum, frame):
    print("my alarm went off", flush=True)

if sys.argv[1] == "own-alarm":
    signal.signal(signal.SIGALRM, mine)
    signal.setitimer(signal.ITIMER_REAL, 50)
service = open_service(command_line=True)
try:
    with service.ledger.locked():
        print("locked", flush=True)
except LockTimeout as exc:
    print("timeout:", exc, flush=True)
expected = mine if sys.argv[1] == "own-alarm" else signal.SIG_DFL
print("handler kept:", signal.getsignal(signal.SIGALRM) is expected)
left = signal.getitimer(signal.ITIMER_REAL)[0]
print("timer:", "running" if left > 40 else "none" if left == 0 else left)
"""


@pytest.mark.parametrize("alarm", ["none", "own-alarm"])
def test_waiting_for_the_lock_leaves_the_processs_own_alarm_alone(
    state_dir: Path, tmp_path: Path, alarm: str
) -> None:
    # SIGALRM bounds the kernel wait only where nothing else uses it; where the process
    # has its own handler and timer (an embedder, pytest-timeout), filelock waits, and
    # the handler and the timer are the process's own afterwards either way.
    with ledger_held(tmp_path):
        waited = subprocess.run(
            [sys.executable, "-c", ALARM_USER, alarm],
            capture_output=True,
            text=True,
            env={**os.environ, "PORTALLOC_LOCK_TIMEOUT": "0.3"},
            timeout=60,
            check=False,
        )
    lines = waited.stdout.splitlines()
    assert waited.returncode == 0, waited.stderr
    assert lines[0].startswith("timeout: ") and "could not lock" in lines[0], lines
    assert lines[1:] == [
        "handler kept: True",
        "timer: running" if alarm == "own-alarm" else "timer: none",
    ]


BLOCKED_ALARM = r"""
import os, signal, sys

signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # inherited across exec
os.execv(sys.executable, [sys.executable, "-m", "portalloc", *sys.argv[1:]])
"""


def test_a_command_started_with_sigalrm_blocked_still_times_out(
    state_dir: Path, tmp_path: Path
) -> None:
    # A blocked alarm would never end a wait in the kernel: filelock waits instead.
    with ledger_held(tmp_path):
        done = subprocess.run(
            [sys.executable, "-c", BLOCKED_ALARM, "allocate", "newcomer"],
            capture_output=True,
            text=True,
            env={**os.environ, "PORTALLOC_LOCK_TIMEOUT": "0.5"},
            timeout=30,
            check=False,
        )
    lock_file = state_dir / "leases.json.lock"
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"portalloc: could not lock {lock_file} within 0.5s")


NESTED = r"""
from portalloc.service import open_service

ledger = open_service(command_line=True).ledger
with ledger.locked():
    with ledger.locked():  # as filelock's lock is: taken again by its holder at once
        print("nested", flush=True)
    with open(ledger.lock_path) as other:  # still held: another descriptor cannot take it
        import fcntl
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("still held", flush=True)
"""


def test_a_command_lines_lock_taken_again_by_its_holder_does_not_wait(
    state_dir: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NESTED],
        capture_output=True,
        text=True,
        env={**os.environ, "PORTALLOC_LOCK_TIMEOUT": "30"},
        timeout=20,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "nested\nstill held\n"), done.stderr


@pytest.mark.parametrize("process", [False, True], ids=["in-process", "process"])
def test_lock_held_past_timeout_exits_1_naming_lock_and_holder(
    state_dir: Path, tmp_path: Path, process: bool
) -> None:
    # In a process of its own the CLI waits in the kernel (SIGALRM ends the wait); in
    # this one, where pytest-timeout holds SIGALRM, it waits through filelock.
    ledger = state_dir / "leases.json"
    lock_file = state_dir / "leases.json.lock"
    env = {"PORTALLOC_LOCK_TIMEOUT": "0.3"}
    with ledger_held(tmp_path) as holder_pid:
        before = (ledger.read_bytes(), ledger.stat().st_mtime_ns)
        # (A process of its own answers `env` of a live lease without the lock.)
        second = ["release", "existing"] if process else ["env", "existing"]
        for args in (["allocate", "newcomer", "--json"], second):
            began = time.monotonic()
            result = run_cli(*args, env=env, process=process)
            elapsed = time.monotonic() - began
            assert result.returncode == 1, (args, result)
            assert elapsed >= 0.3
            lines = result.stderr.splitlines()
            assert len(lines) == 1, result.stderr
            assert lines[0].startswith(f"portalloc: could not lock {lock_file} within 0.3s")
            assert f"pid {holder_pid}" in lines[0]
            if "--json" in args:
                assert json.loads(result.stdout)["success"] is False
            else:
                assert result.stdout == ""
        if process:
            # A timeout too small for a timer still ends the wait, in the same words.
            tiny = run_cli(
                "allocate", "newcomer", env={"PORTALLOC_LOCK_TIMEOUT": "1e-9"}, process=True
            )
            assert tiny.returncode == 1, tiny
            assert tiny.stderr.startswith(f"portalloc: could not lock {lock_file} within 1e-09s")
        assert (ledger.read_bytes(), ledger.stat().st_mtime_ns) == before
    # Once the holder lets go, the same command goes through.
    after = run_cli("allocate", "newcomer", env=env)
    assert after.returncode == 0, after.stderr


FOREIGN_HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_lock_held_by_another_program_names_that_program_on_one_line(
    state_dir: Path, tmp_path: Path
) -> None:
    # The last portalloc process to take the lock has exited; the holder now is a
    # different program, with a newline and an escape in its command line.
    assert run_cli("allocate", "existing").returncode == 0
    lock_file = state_dir / "leases.json.lock"
    with lock_holder(
        ["two\nlines\x1b[31m", "-c", FOREIGN_HOLDER, str(lock_file)],
        executable=sys.executable,  # the hostile name is its argv[0], first in its cmdline
    ) as holder_pid:
        result = run_cli("release", "existing", env={"PORTALLOC_LOCK_TIMEOUT": "0.2"})
        assert result.returncode == 1
        (line,) = result.stderr.splitlines()
        assert str(lock_file) in line
        assert f"pid {holder_pid}" in line
        assert "two lines [31m" in line
        assert "\x1b" not in result.stderr

"""Torture: many real processes, random kills, several users. Bounded in time."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import pytest

from tests.helpers import run_cli

WORKER = """
import random, sys, time
from itertools import pairwise
from pathlib import Path
from portalloc import NoPortsAvailable, get_port_allocator
from portalloc.render import render

seed, seconds, start_file = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
min_ops = int(sys.argv[4])
svc = get_port_allocator()
rng = random.Random(seed)
while not start_file.exists():
    time.sleep(0.005)
deadline = time.monotonic() + seconds
ops = 0
# At least MIN_OPS operations however slow the machine, then until the deadline.
while ops < min_ops or time.monotonic() < deadline:
    name = f"s{rng.randrange(15)}"
    op = rng.choice(["allocate", "env", "release", "prune"])
    try:
        if op == "allocate":
            svc.allocate(name)
        elif op == "env":
            render(svc.allocate(name, ttl_minutes=rng.randint(1, 5)).env, "sh")
        elif op == "release":
            svc.release(name)
        else:
            svc.prune()
    except NoPortsAvailable:
        pass
    ops += 1
print(ops)
"""


def spans_disjoint(document: dict[str, object]) -> bool:
    leases = document["leases"]
    assert isinstance(leases, list)
    spans = sorted((lease["start"], lease["start"] + lease["span"] - 1) for lease in leases)
    ports = [port for lease in leases for port in lease["ports"].values()]
    no_shared_port = len(ports) == len(set(ports))
    return no_shared_port and all(a[1] < b[0] for a, b in pairwise(spans))


MIN_OPS = 15


@pytest.mark.usefixtures("exact_ports")  # the ledger is under test: all 20 slots count
def test_thirty_processes_random_mix_never_share_a_port(state_dir: Path, tmp_path: Path) -> None:
    start_file = tmp_path / "go"
    env = {**os.environ, "PORT_ALLOC_MAX_SESSIONS": "20"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(seed), "3", str(start_file), str(MIN_OPS)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(30)
    ]
    try:
        time.sleep(1.0)  # let the interpreters start; the file below releases them together
        start_file.write_text("go")
        reads = 0
        ledger = state_dir / "leases.json"
        while any(worker.poll() is None for worker in workers):
            if ledger.exists():
                document = json.loads(ledger.read_bytes())  # never torn: atomic replace
                assert spans_disjoint(document), document
                reads += 1
        ops = [int((worker.communicate(timeout=30)[0] or "0").strip()) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert all(worker.returncode == 0 for worker in workers)
    assert all(count >= MIN_OPS for count in ops), ops  # every worker really raced
    assert reads > 50
    final = run_cli("status", "--json")
    assert final.returncode == 0 and "corrupt" not in final.stderr
    assert spans_disjoint(json.loads(ledger.read_text()))


def test_sigkill_at_random_moments_never_loses_a_confirmed_lease(state_dir: Path) -> None:
    rng = random.Random(20261124)
    streams = 4
    per_stream = 50  # 200 operations in all
    names = [[f"k{stream}-{i}" for i in range(4)] for stream in range(streams)]
    # name -> (op, exit code or None when killed) of the last attempt on it
    last: dict[str, tuple[str, int | None]] = {}
    plans = [
        [
            (
                rng.choice(["allocate", "allocate", "release"]),
                rng.choice(names[s]),
                rng.uniform(0, 0.3),
            )
            for _ in range(per_stream)
        ]
        for s in range(streams)
    ]
    assert run_cli("allocate", "seed").returncode == 0  # the ledger exists from the start
    kills = 0
    for step in range(per_stream):
        running = []
        for plan in plans:
            op, name, delay = plan[step]
            proc = subprocess.Popen(
                [sys.executable, "-m", "portalloc", op, name],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            running.append((proc, op, name, time.monotonic() + delay))
        for proc, op, name, kill_at in running:
            try:
                proc.wait(timeout=max(0.0, kill_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
            proc.stderr.close()
            assert "corrupt" not in err and "Traceback" not in err, err
            last[name] = (op, proc.returncode if proc.returncode >= 0 else None)
        # After every round the ledger loads.
        document = json.loads((state_dir / "leases.json").read_bytes())
        assert document["version"] == 4
        assert spans_disjoint(document)
    assert kills >= 20  # the schedule really did interrupt commands
    present = {lease["session_id"] for lease in json.loads(run_cli("status", "--json").stdout)}
    for name, (op, code) in last.items():
        if op == "allocate" and code == 0:
            assert name in present, f"{name} was confirmed allocated but is gone"
        if op == "release" and code == 0:
            assert name not in present, f"{name} was confirmed released but is still there"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
@pytest.mark.usefixtures("exact_ports")  # bob gets the second default block, 10100
def test_shared_state_dir_for_two_users() -> None:
    # pytest's tmp_path sits under a 0700 directory other users cannot enter.
    base = Path(tempfile.mkdtemp(prefix="portalloc-shared-"))
    try:
        base.chmod(0o755)
        check_shared_dir(base)
    finally:
        shutil.rmtree(base)


def check_shared_dir(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    os.chown(shared, 0, 4242)
    shared.chmod(0o2770)  # group-writable, setgid: a directory the admin set up to share

    def as_user(uid: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                "--regid=4242",
                "--clear-groups",
                sys.executable,
                "-m",
                "portalloc",
                *args,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PORTALLOC_STATE_DIR": str(shared), "HOME": str(base)},
            cwd=base,
            timeout=60,
            check=False,
        )

    alice = as_user(4001, "allocate", "alice-wt", "--json")
    assert alice.returncode == 0, alice.stderr
    bob = as_user(4002, "allocate", "bob-wt", "--json")
    assert bob.returncode == 0, bob.stderr
    assert json.loads(bob.stdout)["allocation"]["db_port"] == 10100
    seen_by_alice = json.loads(as_user(4001, "status", "--json").stdout)
    assert [lease["session_id"] for lease in seen_by_alice] == ["alice-wt", "bob-wt"]
    assert as_user(4001, "release", "bob-wt").returncode == 0
    for path in (shared / "leases.json", shared / "leases.json.lock"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o060 == 0o060, oct(mode)  # the group can read and write
        assert mode & 0o007 == 0, oct(mode)  # others cannot
        assert path.stat().st_gid == 4242
    assert stat.S_IMODE(shared.stat().st_mode) == 0o2770

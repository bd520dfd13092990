"""Liveness: busy ports are never handed out, dead owners are reclaimed, PIDs are not trusted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from portalloc.host import listeners, owner_alive, owner_of
from portalloc.models import Owner
from portalloc.probe import has_ipv6, is_listening, port_is_free
from tests import foreign_listeners
from tests.helpers import FreeBlock, run_cli


def listener(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen()
    except BaseException:
        sock.close()  # not left to the garbage collector, to warn in some later test
        raise
    return sock


LISTENERS = [
    (socket.AF_INET, "0.0.0.0"),  # what docker-proxy binds for `docker run -p`
    (socket.AF_INET, "127.0.0.1"),
    pytest.param(
        socket.AF_INET6,
        "::1",
        marks=pytest.mark.skipif(not has_ipv6(), reason="host has no IPv6"),
    ),
    pytest.param(
        socket.AF_INET6,
        "::",
        marks=pytest.mark.skipif(not has_ipv6(), reason="host has no IPv6"),
    ),
]


# The tests that listen or probe at exact places do it in a block leased for them
# (free_block, tests/conftest.py): never at fixed numbers another program may hold.


@pytest.mark.parametrize(("family", "host"), LISTENERS)
def test_listening_port_is_busy_and_skipped(
    family: socket.AddressFamily, host: str, free_block: FreeBlock
) -> None:
    base, step = free_block.start, free_block.step
    with listener(family, host, base + 1):
        assert port_is_free(base + 1) is False
        result = run_cli("allocate", "s", "--json", env=free_block.env)
        assert result.returncode == 0
        allocation = json.loads(result.stdout)["allocation"]
        assert allocation["db_port"] == base + step
        assert f"skipped block {base}: port {base + 1} (rest) is in use" in result.stderr


def test_time_wait_leftovers_do_not_count_as_busy(free_block: FreeBlock) -> None:
    port = free_block.start
    with listener(socket.AF_INET, "127.0.0.1", port) as server:
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first and goes to TIME_WAIT
        client.close()
    assert port_is_free(port) is True


def test_skip_port_check_disables_probe(free_block: FreeBlock) -> None:
    base = free_block.start
    with listener(socket.AF_INET, "0.0.0.0", base + 1):
        result = run_cli(
            "allocate", "s", "--json", env={**free_block.env, "PORTALLOC_SKIP_PORT_CHECK": "1"}
        )
    assert json.loads(result.stdout)["allocation"]["db_port"] == base


def test_sticky_regrant_is_probed_too(free_block: FreeBlock) -> None:
    env = free_block.env
    a_home, b_home, step = free_block.start, free_block.start + 10, free_block.step
    run_cli("allocate", "a", env=env)
    run_cli("allocate", "b", env=env)
    run_cli("release", "a", env=env)
    run_cli("release", "b", env=env)
    with listener(socket.AF_INET, "127.0.0.1", b_home):
        result = run_cli("allocate", "b", "--json", env=env)
    got = json.loads(result.stdout)["allocation"]
    # b's home is busy; a's home is free but kept for a: a block nobody calls home
    # instead, and one loud line about the move.
    assert a_home + step == b_home
    assert got["db_port"] == b_home + step
    assert got["home_block"] == b_home
    moved = (
        f"'b' MOVED from block {b_home}-{b_home + step - 1} to "
        f"{b_home + step}-{b_home + 2 * step - 1}: port {b_home} (db) is in use by pid"
    )
    assert moved in result.stderr


@pytest.mark.usefixtures("exact_ports")  # about reclaiming, at the default numbers
def test_dead_pid_block_goes_to_next_session() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run_cli("allocate", "owned", "--pid", str(proc.pid))
    got = json.loads(run_cli("allocate", "next", "--json").stdout)["allocation"]
    assert got["db_port"] == 10000
    assert [a["session_id"] for a in json.loads(run_cli("status", "--json").stdout)] == ["next"]


@pytest.mark.usefixtures("exact_ports")  # about a live owner, at the default numbers
def test_live_pid_keeps_its_block() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_cli("allocate", "owned", "--pid", str(proc.pid))
        got = json.loads(run_cli("allocate", "next", "--json").stdout)["allocation"]
        assert got["db_port"] == 10100
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(run_cli("prune", "--json").stdout)["reclaimed"][0]["reason"] == "owner_dead"


def test_reused_pid_does_not_keep_the_lease() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = owner_of(proc.pid).started
        assert started is not None
        assert owner_alive(Owner(proc.pid, started)) is True
        # Same PID, different start time: a different process that got the number.
        assert owner_alive(Owner(proc.pid, started - 0.01)) is False
    finally:
        proc.kill()
        proc.wait()
    assert owner_alive(owner_of(proc.pid)) is False


def test_zombie_owner_is_dead() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = owner_of(proc.pid)
    # Not reaped yet: the process has exited but its PID and start time still exist.
    deadline = time.monotonic() + 30
    while owner_alive(owner):
        assert time.monotonic() < deadline, "child never exited"
        time.sleep(0.01)
    assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE  # not yet reaped
    proc.wait()


def test_is_listening_and_listening_processes(free_block: FreeBlock) -> None:
    port = free_block.start + 1
    with listener(socket.AF_INET, "127.0.0.1", port):
        assert is_listening(port) is True
        found = listeners(port)
        assert os.getpid() in [item.pid for item in found]
        assert all(item.cwd for item in found)
    assert is_listening(port) is False
    assert listeners(port) == []


def test_why_names_lease_port_and_process(free_block: FreeBlock) -> None:
    base, env = free_block.start, free_block.env
    run_cli("allocate", "holder", env=env)
    with listener(socket.AF_INET, "0.0.0.0", base + 3):
        result = json.loads(run_cli("why", str(base + 3), "--json", env=env).stdout)
    assert result["session_id"] == "holder"
    assert result["port_name"] == "api"
    assert result["listening"] is True
    assert os.getpid() in [p["pid"] for p in result["processes"]]
    free = json.loads(run_cli("why", str(base + 5), "--json", env=env).stdout)
    assert free["session_id"] == "holder" and free["port_name"] is None
    assert free["listening"] is False
    nobody = json.loads(run_cli("why", str(base + 50), "--json", env=env).stdout)
    assert nobody["session_id"] is None


def test_check_and_wait(free_block: FreeBlock) -> None:
    base, env = free_block.start, free_block.env
    run_cli("allocate", "svc", env=env)
    closed = run_cli("check", "svc", "--wait", "0.2", "--json", env=env)
    assert closed.returncode == 1
    assert "still closed" in closed.stderr
    assert json.loads(closed.stdout)["all_listening"] is False
    socks = [listener(socket.AF_INET, "127.0.0.1", base + i) for i in range(4)]
    try:
        ready = run_cli("check", "svc", "--wait", "5", "--json", env=env)
    finally:
        for sock in socks:
            sock.close()
    assert ready.returncode == 0
    assert json.loads(ready.stdout)["all_listening"] is True
    assert run_cli("check", "ghost").returncode == 1


@pytest.mark.usefixtures("exact_ports")  # about the warning; nothing listens here
def test_span_inside_ephemeral_range_warns() -> None:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    base = max(low, 1024)
    inside = run_cli(
        "allocate", "s", env={"PORT_ALLOC_BASE": str(base), "PORT_ALLOC_MAX_SESSIONS": "1"}
    )
    assert inside.returncode == 0
    assert f"overlap the kernel's ephemeral range {low}-{high}" in inside.stderr
    below = run_cli("allocate", "t", env={"PORT_ALLOC_BASE": "10000"})
    assert "ephemeral" not in below.stderr


@pytest.mark.skipif(
    not foreign_listeners.enabled(), reason="PORTALLOC_TEST_FOREIGN_LISTENERS unset"
)
def test_foreign_listeners_are_up_for_the_whole_run() -> None:
    # What the run with foreign listeners claims: every default port is taken.
    for ports in foreign_listeners.RANGES:
        assert not any(port_is_free(port) for port in ports)
    assert is_listening(10000) and is_listening(10001) and is_listening(21203)
    # ... by a process of their own, foreign to every test: not this one (its PID, its
    # working directory, its process group), alive for the whole run.
    holder = psutil.Process(int(os.environ[foreign_listeners.PID_VAR]))
    assert holder.pid != os.getpid() and holder.is_running()
    assert os.getpid() not in [parent.pid for parent in holder.parents()]  # no descendant
    assert holder.cwd() == "/" and os.getpgid(holder.pid) != os.getpgid(0)
    # Who listens there, as the OS tells it for the whole machine: never this process
    # nor one of its descendants.
    spans = foreign_listeners.RANGES
    listening: list[tuple[int | None, Any]] = [
        (c.pid, c.laddr) for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
    ]
    listening = [(pid, a) for pid, a in listening if a and any(a.port in span for span in spans)]
    mine = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
    assert listening and not {pid for pid, _a in listening} & mine
    held = [a for _pid, a in listening]
    if has_ipv6():
        # Servers on ::1 alone, and on both loopbacks, are there too.
        alone = [a.port for a in held if a.ip == "::1" and a.port % 4 == 3]
        both = [a.port for a in held if a.ip == "::1" and a.port % 4 == 2]
        assert alone and both
        assert not port_is_free(alone[0]) and is_listening(alone[0])

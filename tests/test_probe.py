"""Liveness: busy ports are never handed out, dead owners are reclaimed, PIDs are not trusted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from portalloc.host import listeners, owner_alive, owner_of
from portalloc.models import Owner
from portalloc.probe import is_listening, port_is_free
from tests.helpers import run_cli


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def listener(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen()
    return sock


LISTENERS = [
    (socket.AF_INET, "0.0.0.0"),  # what docker-proxy binds for `docker run -p`
    (socket.AF_INET, "127.0.0.1"),
    pytest.param(
        socket.AF_INET6,
        "::1",
        marks=pytest.mark.skipif(not ipv6_available(), reason="host has no IPv6"),
    ),
    pytest.param(
        socket.AF_INET6,
        "::",
        marks=pytest.mark.skipif(not ipv6_available(), reason="host has no IPv6"),
    ),
]


@pytest.mark.parametrize(("family", "host"), LISTENERS)
def test_listening_port_is_busy_and_skipped(
    family: socket.AddressFamily, host: str, state_dir: Path
) -> None:
    base = 20000
    with listener(family, host, base + 1):
        assert port_is_free(base + 1) is False
        result = run_cli("allocate", "s", "--json", env={"PORT_ALLOC_BASE": str(base)})
        assert result.returncode == 0
        allocation = json.loads(result.stdout)["allocation"]
        assert allocation["db_port"] == base + 100
        assert f"skipped block {base}: port {base + 1} (rest) is in use" in result.stderr


def test_time_wait_leftovers_do_not_count_as_busy() -> None:
    port = 20500
    with listener(socket.AF_INET, "127.0.0.1", port) as server:
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first and goes to TIME_WAIT
        client.close()
    assert port_is_free(port) is True


def test_skip_port_check_disables_probe() -> None:
    with listener(socket.AF_INET, "0.0.0.0", 20601):
        result = run_cli(
            "allocate",
            "s",
            "--json",
            env={"PORT_ALLOC_BASE": "20600", "PORTALLOC_SKIP_PORT_CHECK": "1"},
        )
    assert json.loads(result.stdout)["allocation"]["db_port"] == 20600


def test_sticky_regrant_is_probed_too() -> None:
    env = {"PORT_ALLOC_BASE": "20700"}
    run_cli("allocate", "a", env=env)
    run_cli("allocate", "b", env=env)
    run_cli("release", "a", env=env)
    run_cli("release", "b", env=env)
    with listener(socket.AF_INET, "127.0.0.1", 20800):
        result = run_cli("allocate", "b", "--json", env=env)
    got = json.loads(result.stdout)["allocation"]
    # b's home 20800 is busy; a's home 20700 is free but kept for a: a block nobody
    # calls home instead, and one loud line about the move.
    assert got["db_port"] == 20900
    assert got["home_block"] == 20800
    assert "'b' MOVED from block 20800-20899 to 20900-20999: port 20800 (db) is in use by pid" in (
        result.stderr
    )


def test_dead_pid_block_goes_to_next_session() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run_cli("allocate", "owned", "--pid", str(proc.pid))
    got = json.loads(run_cli("allocate", "next", "--json").stdout)["allocation"]
    assert got["db_port"] == 10000
    assert [a["session_id"] for a in json.loads(run_cli("status", "--json").stdout)] == ["next"]


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


def test_is_listening_and_listening_processes() -> None:
    with listener(socket.AF_INET, "127.0.0.1", 20901):
        assert is_listening(20901) is True
        found = listeners(20901)
        assert os.getpid() in [item.pid for item in found]
        assert all(item.cwd for item in found)
    assert is_listening(20901) is False
    assert listeners(20901) == []


def test_why_names_lease_port_and_process() -> None:
    run_cli("allocate", "holder", env={"PORT_ALLOC_BASE": "21000"})
    with listener(socket.AF_INET, "0.0.0.0", 21003):
        result = json.loads(run_cli("why", "21003", "--json").stdout)
    assert result["session_id"] == "holder"
    assert result["port_name"] == "api"
    assert result["listening"] is True
    assert os.getpid() in [p["pid"] for p in result["processes"]]
    free = json.loads(run_cli("why", "21050", "--json").stdout)
    assert free["session_id"] == "holder" and free["port_name"] is None
    assert free["listening"] is False
    nobody = json.loads(run_cli("why", "30000", "--json").stdout)
    assert nobody["session_id"] is None


def test_check_and_wait() -> None:
    run_cli("allocate", "svc", env={"PORT_ALLOC_BASE": "21100"})
    closed = run_cli("check", "svc", "--wait", "0.2", "--json")
    assert closed.returncode == 1
    assert "still closed" in closed.stderr
    assert json.loads(closed.stdout)["all_listening"] is False
    socks = [listener(socket.AF_INET, "127.0.0.1", 21100 + i) for i in range(4)]
    try:
        ready = run_cli("check", "svc", "--wait", "5", "--json")
    finally:
        for sock in socks:
            sock.close()
    assert ready.returncode == 0
    assert json.loads(ready.stdout)["all_listening"] is True
    assert run_cli("check", "ghost").returncode == 1


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

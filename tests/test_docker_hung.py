"""A Docker daemon that does not answer: every docker call hangs.

The one place a stand-in `docker` is right: a real hung daemon cannot be had on
demand. The stand-in starts a child and waits for it, as the CLI waits for a daemon
(and for the compose plugin it starts); the child notes the time until it is
killed, so how long each call was let run is measured by the stand-in itself, not
by a wall clock a busy machine stretches. portalloc must not hold the ledger's lock
for long on its account (one budget of about 2 s per operation, not 2 s + 5 s per
busy port), must not take its silence for "not the session's own stack" when
docker's own forwarder holds the port, must leave none of its processes behind, and
`status` and `prune` must say docker did not answer instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from portalloc.probe import port_is_free
from tests.helpers import FreeBlock

PORTALLOC = str(Path(sys.executable).parent / "portalloc")
HUNG_DOCKER = """#!/bin/sh
# Every call waits for a daemon that never answers, through a child of its own that
# notes the time every tenth of a second until it is killed.
here="$(dirname "$0")"
echo "$*" >> "$here/calls"
call="$(wc -l < "$here/calls")"
(while :; do date +%s.%N >> "$here/alive.$call"; sleep 0.1; done) &
echo $! >> "$here/children"
wait
"""
NO_DAEMON = """#!/bin/sh
echo "Cannot connect to the Docker daemon" >&2
exit 1
"""
# Wall time over what the same command takes when docker answers at once: generous,
# a busy machine stretches it. Before, a hung daemon cost 5 s in `status` and 2 s +
# 5 s per busy port in `env`, under the ledger's lock.
SLACK = 6.0


class Hung:
    """A shell whose `docker` hangs, and what that `docker` saw."""

    def __init__(self, bin_dir: Path, env: dict[str, str]) -> None:
        self.bin_dir = bin_dir
        self.env = env

    def calls(self) -> list[str]:
        listed = self.bin_dir / "calls"
        return listed.read_text().splitlines() if listed.exists() else []

    def lived(self) -> list[float]:
        """How long each call ran before it was killed (as its child saw it)."""
        spans = []
        for number in range(1, len(self.calls()) + 1):
            stamps = [float(t) for t in (self.bin_dir / f"alive.{number}").read_text().split()]
            spans.append(stamps[-1] - stamps[0] if stamps else 0.0)
        return spans

    def reset(self) -> None:
        for path in self.bin_dir.iterdir():
            if path.name != "docker" and path.name != "children":
                path.unlink()


def shell(tmp_path: Path, free_block: FreeBlock, docker: str, name: str) -> dict[str, str]:
    """The environment of a shell whose `docker` is DOCKER, with a private ledger."""
    bin_dir = tmp_path / name
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(docker)
    (bin_dir / "docker").chmod(0o755)
    return {**os.environ, **free_block.env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def answering(tmp_path: Path, free_block: FreeBlock) -> dict[str, str]:
    """A shell whose `docker` says at once that no daemon runs: the baseline."""
    return shell(tmp_path, free_block, NO_DAEMON, "answering")


@pytest.fixture
def hung(tmp_path: Path, free_block: FreeBlock) -> Iterator[Hung]:
    """A shell whose `docker` hangs; no process of it may outlive the test."""
    docker = Hung(tmp_path / "hung", shell(tmp_path, free_block, HUNG_DOCKER, "hung"))
    yield docker
    left = [pid for pid in children(docker.bin_dir) if alive(pid)]
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    assert not left, f"docker's children outlived it: {left}"


def children(bin_dir: Path) -> list[int]:
    listed = bin_dir / "children"
    return [int(line) for line in listed.read_text().split()] if listed.exists() else []


def alive(pid: int) -> bool:
    deadline = time.monotonic() + 2  # a killed child is gone at once; its reaping may lag
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.05)
    return True


def timed(
    *args: str, env: dict[str, str], cwd: Path
) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    result = subprocess.run(
        [PORTALLOC, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    return time.monotonic() - started, result


@contextmanager
def listening(port: int, program: str, cwd: Path) -> Iterator[None]:
    """A process named PROGRAM listening on PORT, from CWD (not the session's, not
    below any process of it)."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen()\n"
        "time.sleep(120)\n"
    )
    process = subprocess.Popen([program, "-c", code], cwd=cwd)
    try:
        deadline = time.monotonic() + 20
        while port_is_free(port):
            assert process.poll() is None and time.monotonic() < deadline, "no listener"
            time.sleep(0.05)
        yield
    finally:
        process.kill()
        process.wait()


def test_status_and_prune_say_docker_did_not_answer(
    hung: Hung, answering: dict[str, str], tmp_path: Path
) -> None:
    for command in (("status",), ("prune",), ("prune", "--json"), ("prune", "--stop")):
        hung.reset()
        baseline, _ = timed(*command, env=answering, cwd=tmp_path)
        elapsed, result = timed(*command, env=hung.env, cwd=tmp_path)
        assert "docker did not answer within 2.5 s: compose stacks not looked at" in result.stderr
        # Asked to stop stacks it could not even list: that is a failure.
        assert result.returncode == (1 if "--stop" in command else 0), (command, result.stderr)
        assert len(hung.calls()) == 1, hung.calls()
        assert sum(hung.lived()) < 2.5 + 0.5, (command, hung.lived())
        assert elapsed < baseline + SLACK, (command, elapsed, baseline)


def test_a_foreign_listener_costs_one_budget_not_seven_seconds_a_port(
    hung: Hung, answering: dict[str, str], tmp_path: Path, free_block: FreeBlock
) -> None:
    """A process of nobody's (not docker's forwarder) on the home block: docker is
    asked once, within the budget, never again for the fallback; its silence does not
    make the process the session's, and the lease moves, loudly."""
    subprocess.run([PORTALLOC, "env", "s"], env=hung.env, cwd=tmp_path, check=True)
    subprocess.run([PORTALLOC, "release", "s"], env=hung.env, cwd=tmp_path, check=True)
    assert hung.calls() == []  # nothing listened: docker was not asked
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with listening(free_block.start, sys.executable, elsewhere):
        elapsed, result = timed("env", "s", env=hung.env, cwd=tmp_path)
    baseline, _ = timed("env", "s", env=answering, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"MOVED from block {free_block.start}-" in result.stderr
    assert [call.split()[-1] for call in hung.calls()] == [f"publish={free_block.start}"]
    assert sum(hung.lived()) < 2 + 0.5, hung.lived()
    assert elapsed < baseline + SLACK, (elapsed, baseline)


def test_docker_s_forwarder_on_the_home_block_keeps_it_while_docker_is_silent(
    hung: Hung, answering: dict[str, str], tmp_path: Path, free_block: FreeBlock
) -> None:
    """Ports held by docker's own forwarder (docker-proxy), and docker does not say
    whose containers they are: the block stays (it may well be the session's own
    stack; a move would outlast a slow daemon), and a warning says so. Docker is
    asked once for both ports."""
    forwarder = tmp_path / "sbin" / "docker-proxy"
    forwarder.parent.mkdir()
    forwarder.symlink_to(sys.executable)
    subprocess.run([PORTALLOC, "env", "s"], env=hung.env, cwd=tmp_path, check=True)
    subprocess.run([PORTALLOC, "release", "s"], env=hung.env, cwd=tmp_path, check=True)
    rest, api = free_block.start + 1, free_block.start + 3
    with (
        listening(rest, str(forwarder), Path("/")),
        listening(api, str(forwarder), Path("/")),
    ):
        elapsed, result = timed("env", "s", "--format", "json", env=hung.env, cwd=tmp_path)
    baseline, _ = timed("env", "s", env=answering, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "MOVED" not in result.stderr
    assert json.loads(result.stdout)["AGENT_COORDINATOR_DB_PORT"] == str(free_block.start)
    assert (
        f"docker did not answer within 2 s, so the block stays: ports {rest}, {api} "
        "are held by docker's port forwarder"
    ) in result.stderr
    assert len(hung.calls()) == 1, hung.calls()
    assert sum(hung.lived()) < 2 + 0.5, hung.lived()
    assert elapsed < baseline + SLACK, (elapsed, baseline)


def test_a_timed_out_docker_call_leaves_no_process_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from portalloc.host import DockerCLI

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(HUNG_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    docker = DockerCLI(budget=0.5)
    assert docker("ps") is None
    assert docker("ps") is None  # not asked again: it did not answer
    assert Hung(bin_dir, {}).calls() == ["ps"]
    assert not any(alive(pid) for pid in children(bin_dir))

"""Shared test helpers: a controllable clock and a real-process CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

# fish is a test requirement where CI runs (.ci/run installs it, and CI=true makes a
# missing fish fail); elsewhere the fish tests are skipped with this reason.
HAVE_FISH = shutil.which("fish") is not None or bool(os.environ.get("CI"))
needs_fish = pytest.mark.skipif(
    not HAVE_FISH, reason="fish is not installed (CI installs it; apt-get install fish)"
)


@dataclass
class FakeClock:
    """A clock that only moves when a test moves it."""

    now: datetime = field(default_factory=lambda: datetime(2026, 11, 22, 10, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, minutes: float) -> None:
        self.now += timedelta(minutes=minutes)


@dataclass(frozen=True)
class FreeBlock:
    """STEP * 10 ports from START on, free when leased and this test's alone."""

    start: int
    step: int = 10

    @property
    def env(self) -> dict[str, str]:
        """Settings for a private ledger inside the block: 10 blocks of STEP ports."""
        return {
            "PORT_ALLOC_BASE": str(self.start),
            "PORT_ALLOC_RANGE": str(self.step),
            "PORT_ALLOC_MAX_SESSIONS": "10",
        }


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_process(
    argv: list[str | Path], *, env: dict[str, str], cwd: Path | None = None, timeout: float = 60
) -> Result:
    """Run ARGV as a real process with exactly ENV; capture its output as text."""
    proc = subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


# Commands whose every effect shows in stdout, stderr, the exit code and the ledger:
# tests run them in-process through main(argv), which is ~100x cheaper than a process.
IN_PROCESS = frozenset(
    {"allocate", "release", "status", "env", "get", "prune", "why", "init", "trust", "untrust"}
)


def probe(
    script: str,
    *args: str,
    cwd: Path,
    flags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[str, Any]:
    """SCRIPT with ARGS in a fresh interpreter (FLAGS: its options, `-S`) that imports
    this checkout's portalloc and no PYTHON* setting of ours, plus ENV: its stdout, and
    the Python literal it wrote as the last line of its stderr (what it found)."""
    import ast

    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    environ.update(PYTHONPATH=str(Path(__file__).resolve().parent.parent), **(env or {}))
    proc = run_process(
        [sys.executable, *flags, "-c", script, *args], env=environ, cwd=cwd, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, ast.literal_eval(proc.stderr.strip().splitlines()[-1])


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    process: bool = False,
) -> Result:
    """`portalloc ARGS` with the test's environment plus ENV, in CWD.

    In-process through main(argv) for the commands in IN_PROCESS; as a real
    `python -m portalloc` process for anything else, or when PROCESS is true (what
    only a process shows: signals, child processes, a closed stdout, the entry point).
    """
    if not process and args and args[0] in IN_PROCESS and "--help" not in args:
        return invoke(*args, env=env, cwd=cwd)
    return run_process(
        [sys.executable, "-m", "portalloc", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


def invoke(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """main(ARGS) in this process, with ENV set and CWD current for the call only."""
    import contextlib
    import io

    from portalloc.adapters.cli import main

    saved_env = dict(os.environ)
    saved_cwd = Path.cwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return Result(code, out.getvalue(), err.getvalue())


def inner_pytest(
    project: Path, source: str, out: Path, env: dict[str, str], *args: str
) -> subprocess.Popen[str]:
    """Start a real pytest with the portalloc plugin on PROJECT (a worktree top holding
    SOURCE as its one test file); PLUGIN_OUT tells the test where to write."""
    project.mkdir(exist_ok=True)
    (project / ".git").mkdir(exist_ok=True)
    (project / "test_inner.py").write_text(source)
    full_env = {**os.environ, "PLUGIN_OUT": str(out), **env}
    # Not the outer run's options or xdist identity.
    for name in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        full_env.pop(name, None)
    plugin = ["-p", "portalloc.pytest_plugin", "-q", "-p", "no:cacheprovider"]
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", *plugin, *args, str(project)],
        cwd=project,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def trust(path: Path) -> None:
    """The user trusts the project file at PATH (`portalloc trust PATH`): its [env] table
    then applies in full. Tests of what a trusted file does call this first."""
    result = invoke("trust", str(path))
    assert result.returncode == 0, result.stderr

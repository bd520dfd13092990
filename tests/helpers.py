"""Shared test helpers: a controllable clock and a real-process CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path


@dataclass
class FakeClock:
    """A clock that only moves when a test moves it."""

    now: datetime = field(default_factory=lambda: datetime(2026, 11, 22, 10, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, minutes: float) -> None:
        self.now += timedelta(minutes=minutes)


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


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> Result:
    """Run `python -m portalloc ARGS` as a real process with the test's environment."""
    return run_process(
        [sys.executable, "-m", "portalloc", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )

"""Errors as code that knows only the built-ins sees them, the crash file, the version."""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import portalloc
from portalloc.adapters import common, guard
from portalloc.errors import LedgerError, LockTimeout, PortallocError

ROOT = Path(__file__).resolve().parent.parent


def test_a_lock_timeout_is_a_timeout_error_and_a_ledger_error_an_os_error() -> None:
    timeout = LockTimeout(Path("/s/leases.json.lock"), 10, "pid 1: x")
    ledger = LedgerError(Path("/s/leases.json"), "cannot read")
    assert isinstance(timeout, TimeoutError) and isinstance(timeout, PortallocError)
    assert isinstance(ledger, OSError) and isinstance(ledger, PortallocError)
    for error in (timeout, ledger):
        # Their own message, not "[Errno ...]": errno and strerror stay unset.
        assert str(error) == error.message and error.args == (error.message,)
        assert (error.errno, error.strerror, error.filename) == (None, None, None)
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes, just made
        assert type(copy) is type(error) and copy.__dict__ == error.__dict__
        assert str(copy) == str(error)
    with pytest.raises(TimeoutError):
        raise timeout


def test_an_expected_failure_reaching_the_last_resort_is_said_as_itself(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An OSError by its base, a LedgerError is still not `cannot write (standard output)`."""
    code = common.unexpected(LedgerError(Path("/s/leases.json"), "cannot read: EIO"))
    assert code == 1
    assert capsys.readouterr().err == "portalloc: ledger /s/leases.json: cannot read: EIO\n"


def test_the_crash_file_names_the_version_and_the_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        line = guard.report(exc)
    (written,) = tmp_path.glob("portalloc-crash-*")
    assert str(written) in line
    first, *rest = written.read_text().splitlines()
    version = f"portalloc {portalloc.__version__}, Python {platform.python_version()}"
    assert first.startswith(version)
    assert platform.platform() in first
    assert rest[0].startswith("Traceback") and rest[-1] == "RuntimeError: boom"


def test_the_version_is_the_package_metadata_read_only_when_asked() -> None:
    assert portalloc.__version__ == importlib.metadata.version("portalloc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    probe = (
        "import sys, portalloc, portalloc.adapters.entry\n"
        "print('importlib.metadata' in sys.modules)\n"
        "portalloc.__version__\n"
        "print('importlib.metadata' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.split() == ["False", "True"]

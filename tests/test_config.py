"""Settings from the environment: defaults, validation messages, exit 2, ledger untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from portalloc.config import PortAllocatorConfig
from portalloc.errors import ConfigError
from tests.helpers import run_cli


def test_defaults(state_dir: Path) -> None:
    config = PortAllocatorConfig.from_env()
    assert (config.base, config.range, config.ttl_minutes, config.max_sessions) == (
        10000,
        100,
        120,
        20,
    )
    assert config.lock_timeout == 10.0
    assert config.skip_port_check is False
    assert config.ledger_path == state_dir / "leases.json"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT_ALLOC_BASE", "20000")
    monkeypatch.setenv("PORT_ALLOC_RANGE", "10")
    monkeypatch.setenv("PORT_ALLOC_TTL_MINUTES", "5")
    monkeypatch.setenv("PORT_ALLOC_MAX_SESSIONS", "3")
    monkeypatch.setenv("PORTALLOC_LOCK_TIMEOUT", "0.5")
    monkeypatch.setenv("PORTALLOC_SKIP_PORT_CHECK", "1")
    config = PortAllocatorConfig.from_env()
    assert (config.base, config.range, config.ttl_minutes, config.max_sessions) == (
        20000,
        10,
        5,
        3,
    )
    assert config.lock_timeout == 0.5
    assert config.skip_port_check is True


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PORT_ALLOC_BASE", "80", "PORT_ALLOC_BASE=80 is invalid: must be an integer >= 1024"),
        ("PORT_ALLOC_BASE", "abc", "PORT_ALLOC_BASE=abc is invalid: must be an integer >= 1024"),
        ("PORT_ALLOC_BASE", "1e4", "PORT_ALLOC_BASE=1e4 is invalid: must be an integer >= 1024"),
        (
            "PORT_ALLOC_BASE",
            "70000",
            "PORT_ALLOC_BASE=70000 is invalid: must be an integer <= 65535",
        ),
        ("PORT_ALLOC_RANGE", "3", "PORT_ALLOC_RANGE=3 is invalid: must be an integer >= 4"),
        (
            "PORT_ALLOC_TTL_MINUTES",
            "0",
            "PORT_ALLOC_TTL_MINUTES=0 is invalid: must be an integer >= 1",
        ),
        (
            "PORT_ALLOC_MAX_SESSIONS",
            "0",
            "PORT_ALLOC_MAX_SESSIONS=0 is invalid: must be an integer >= 1",
        ),
        (
            "PORT_ALLOC_MAX_SESSIONS",
            "1000",
            "PORT_ALLOC_MAX_SESSIONS=1000 is invalid: must be an integer <= 555 "
            "(so that base + range * max_sessions - 1 <= 65535)",
        ),
        (
            "PORTALLOC_LOCK_TIMEOUT",
            "0",
            "PORTALLOC_LOCK_TIMEOUT=0 is invalid: must be a number > 0",
        ),
        (
            "PORT_ALLOC_BASE",
            "65535",
            "PORT_ALLOC_BASE=65535 is invalid: must be an integer <= 63536 "
            "(so that base + range * max_sessions - 1 <= 65535)",
        ),
        (
            "PORT_ALLOC_RANGE",
            "5000",
            "PORT_ALLOC_RANGE=5000 is invalid: must be an integer <= 2776 "
            "(so that base + range * max_sessions - 1 <= 65535)",
        ),
        (
            "PORTALLOC_LOCK_TIMEOUT",
            "soon",
            "PORTALLOC_LOCK_TIMEOUT=soon is invalid: must be a number > 0",
        ),
        (
            "PORTALLOC_SKIP_PORT_CHECK",
            "maybe",
            "PORTALLOC_SKIP_PORT_CHECK=maybe is invalid: must be 1 or 0",
        ),
    ],
)
def test_invalid_values_name_variable_value_and_limit(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        PortAllocatorConfig.from_env()
    assert str(info.value) == message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("command", [["allocate", "s"], ["env", "s"], ["status"], ["release", "s"]])
def test_cli_invalid_env_exits_2_before_touching_ledger(
    state_dir: Path, command: list[str]
) -> None:
    assert run_cli("allocate", "existing").returncode == 0
    before = (state_dir / "leases.json").read_bytes()
    result = run_cli(*command, env={"PORT_ALLOC_BASE": "80"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "portalloc: PORT_ALLOC_BASE=80 is invalid: must be an integer >= 1024\n"
    assert (state_dir / "leases.json").read_bytes() == before


def test_range_must_fit_profile() -> None:
    with pytest.raises(ConfigError, match="PORT_ALLOC_RANGE=4"):
        from portalloc.models import Profile

        PortAllocatorConfig(
            range=4,
            profile=Profile(ports=(("a", 0), ("b", 5)), env=()),
            state_dir=Path("/nonexistent"),
        )

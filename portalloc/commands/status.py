"""What `status`, `prune`, `why` and `init` ask beside the leases: the compose stacks
docker runs, the orphans among them, the leases of a repository's worktrees."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from portalloc.config import PortAllocatorConfig
    from portalloc.host import Stack
    from portalloc.service import PortAllocatorService

DOCKER_WAIT = 2.5  # seconds `status`, `prune` and `why` wait for docker in all


def blocks(config: PortAllocatorConfig) -> range:
    """Every port of every block portalloc hands out with CONFIG."""
    return range(config.base, config.base + config.range * config.max_sessions)


def stacks() -> list[Stack] | None:
    """The running compose stacks, or None when docker did not answer within
    DOCKER_WAIT: a hung daemon does not hang `status`."""
    from portalloc.host import DockerCLI, compose_stacks

    return compose_stacks(None, DockerCLI(DOCKER_WAIT))


def orphans(service: PortAllocatorService, running: list[Stack]) -> list[Stack]:
    """The stacks among RUNNING that portalloc named for a session of SERVICE's ledger
    whose worktree was removed (portalloc.orphans)."""
    from portalloc import orphans as finding

    if not running:
        return []
    return finding.find(running, service.remembered(), blocks(service.config))


def leases_of_worktrees(service: PortAllocatorService, top: Path) -> list[str]:
    """Sessions of active leases held by TOP or another worktree of its repository."""
    trees = {str(top)}
    try:
        listing = subprocess.run(
            ["git", "worktree", "list", "--porcelain"],
            cwd=top,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
        trees |= {
            line[len("worktree ") :]
            for line in listing.splitlines()
            if line.startswith("worktree ")
        }
    except (OSError, subprocess.SubprocessError):
        pass
    return [a.session_id for a in service.status() if a.session_id in trees]

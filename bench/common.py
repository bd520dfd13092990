"""What both benchmarks need: where the scratch ledger lives, and how it is filled."""

from __future__ import annotations

from pathlib import Path


def filesystem_type(path: Path) -> str | None:
    """The mount's filesystem type (Linux), to flag a tmpfs where fsync costs nothing."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point, fs_type = fields[1], fields[2]
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) > best[0]):
            best = (len(mount_point), fs_type)
    return best[1] if best else None


# Run by the interpreter under test (`python -c`): SESSIONS written into a fresh
# ledger at once, as `allocate` would grant them (argv: state dir, base, range, max
# sessions, sessions...).
FILL_LEDGER = """
import sys
from portalloc.allocator import Request, grant
from portalloc.config import PortAllocatorConfig
from portalloc.models import LedgerState
from portalloc.service import PortAllocatorService

state_dir, base, span, most, *sessions = sys.argv[1:]
config = PortAllocatorConfig(
    base=int(base), range=int(span), max_sessions=int(most), state_dir=state_dir,
    skip_port_check=True,
)
service = PortAllocatorService(config)
now = service.clock()
state = LedgerState()
for session in sessions:
    state = grant(state, Request(session_id=session, config=config), now, None).state
with service.ledger.locked():
    service.ledger.save(state)
"""

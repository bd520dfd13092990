"""What both benchmarks need: where the scratch ledger lives."""

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

"""The last resort: an unexpected exception becomes one line naming where its traceback went."""

from __future__ import annotations

import os

DEBUG_VARIABLE = "PORTALLOC_DEBUG"


def debugging() -> bool:
    """With PORTALLOC_DEBUG=1 (the test suite sets it) bugs raise as they are."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def report(exc: BaseException) -> str:
    """Write EXC's traceback to a private temp file; return the one-line message."""
    import tempfile
    import traceback

    where = "nowhere (cannot write a temp file)"
    try:
        fd, path = tempfile.mkstemp(prefix="portalloc-crash-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            traceback.print_exception(exc, file=handle)
        where = path
    except OSError:
        pass
    kind = type(exc).__name__
    return f"internal error ({kind}); this is a bug in portalloc, traceback written to {where}"

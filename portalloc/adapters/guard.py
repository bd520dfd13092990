"""The last resort: an unexpected exception becomes one line naming where its traceback went."""

from __future__ import annotations

import os

DEBUG_VARIABLE = "PORTALLOC_DEBUG"


def debugging() -> bool:
    """With PORTALLOC_DEBUG=1 (the test suite sets it) bugs raise as they are."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def report(exc: BaseException) -> str:
    """Write EXC's traceback to a private temp file; return the one-line message."""
    import traceback

    from portalloc.fs import write_report

    where = "nowhere (cannot write a temp file)"
    try:
        where = write_report("portalloc-crash-", "".join(traceback.format_exception(exc)))
    except OSError:
        pass
    kind = type(exc).__name__
    return f"internal error ({kind}); this is a bug in portalloc, traceback written to {where}"

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
        text = about() + "".join(traceback.format_exception(exc))
        where = write_report("portalloc-crash-", text)
    except OSError:
        pass
    kind = type(exc).__name__
    return f"internal error ({kind}); this is a bug in portalloc, traceback written to {where}"


def about() -> str:
    """The first line of a crash file: what a bug report needs to reproduce it."""
    import platform

    import portalloc

    return (
        f"portalloc {portalloc.__version__}, Python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.platform()}\n"
    )

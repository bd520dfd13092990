"""portalloc's managed blocks: its own lines between two marker lines, in a file that is
someone else's (a dotenv file, a git hook, .envrc, a TOML settings file). One pair of
markers and one scanner, for every module that writes or reads them."""

from __future__ import annotations

BEGIN = "# >>> portalloc >>>"
END = "# <<< portalloc <<<"


def spans(lines: list[str]) -> list[range]:
    """The line ranges of portalloc's blocks in LINES (with or without line ends): a
    begin marker with an end marker after it, markers included.

    Each end marker closes the nearest begin marker before it; a begin marker without
    an end is no block: the lines after it are someone's, and are never swallowed."""
    found: list[range] = []
    opened: int | None = None
    for index, line in enumerate(lines):
        marker = line.rstrip("\r\n")
        if marker == BEGIN:
            opened = index
        elif marker == END and opened is not None:
            found.append(range(opened, index + 1))
            opened = None
    return found


def inside(lines: list[str]) -> set[int]:
    """The indexes of LINES that lie in portalloc's blocks."""
    return {index for span in spans(lines) for index in span}

"""The one guarded open and the one atomic write: every file portalloc reads or writes
goes through here (a test lists the modules that open files and fails on any other).

- Never blocks: opened with O_NONBLOCK, so a FIFO or a device planted where a file is
  expected costs nothing, then refused unless fstat says it is a regular file.
- Before the open, a stat: a device is never opened at all (opening some has effects).
- State files (the ledger, its lock and index, the trust records) are opened with
  O_NOFOLLOW: a symlink planted in a shared state dir is refused, never read through.
- Every refusal is UnsafeFile: a UsageError, exit 2, one line naming the path and
  what is there.
- A write for a worktree names the directory it must stay inside (`within`): a
  committed `.claude -> ~/.claude` link cannot carry it out of the worktree.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable
from itertools import count

from portalloc.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path  # at run time only where a write needs it: not on the read path
    from typing import TextIO


class FileRange:
    """LENGTH bytes of the file open as FD from OFFSET on: a piece of a write that the
    kernel copies file to file (a ledger of 10,000 leases rewritten for one new lease
    never passes through the process)."""

    __slots__ = ("expect", "fd", "length", "offset")

    def __init__(
        self, fd: int, offset: int, length: int, expect: tuple[int, ...] | None = None
    ) -> None:
        self.fd, self.offset, self.length = fd, offset, length
        # The file's key (file_key) when its bytes were vouched for: a write that copied
        # from a file changed since (in place, by a program that takes no lock) fails.
        self.expect = expect

    def check(self) -> None:
        """OSError if the file is no longer the one EXPECT names."""
        if self.expect is not None and file_key(os.fstat(self.fd)) != self.expect:
            raise OSError(
                errno.ESTALE,
                "it changed on disk while being saved, written by a program that takes "
                "no lock; nothing was saved, run the command again",
            )

    def __len__(self) -> int:
        return self.length

    def read(self) -> bytes:
        """The bytes, at once."""
        return b"".join(self.pieces())

    def pieces(self, size: int = 1 << 20) -> Iterable[bytes]:
        """The bytes, SIZE at a time; OSError if the file is shorter than it was."""
        done = 0
        while done < self.length:
            piece = os.pread(self.fd, min(size, self.length - done), self.offset + done)
            if not piece:
                raise OSError(errno.EIO, "the file being copied was cut short")
            done += len(piece)
            yield piece


Chunk = bytes | memoryview | FileRange

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | NOFOLLOW  # a temp file


class UnsafeFile(UsageError):
    """A path portalloc will not open: not a regular file, a symlink where none may be,
    or outside the directory it must stay in. Exit 2, one line."""

    def __init__(self, path: Path | str, reason: str, kind: str = "") -> None:
        from portalloc.errors import printable

        self.path = str(path)
        self.reason = reason
        self.kind = kind  # what is there: "a FIFO", "a symlink" ...; "" for other refusals
        super().__init__(f"{printable(path)}: {reason}")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse(path: Path | str, info: os.stat_result) -> UnsafeFile:
    kind = _kind(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        return UnsafeFile(path, "is a symlink; refusing to follow it", kind)
    return UnsafeFile(path, f"is {kind}, not a regular file", kind)


# What open() says about a symlink under O_NOFOLLOW (ELOOP; EMLINK on FreeBSD) or a
# socket (ENXIO, EOPNOTSUPP): the stat that follows names what is there.
_SPECIAL_ERRNOS = frozenset({errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EOPNOTSUPP})


def open_regular(path: Path | str, *, follow: bool = True) -> tuple[int, os.stat_result]:
    """A read-only descriptor of PATH and its fstat, refused unless it is a regular file.

    FileNotFoundError and other OSErrors propagate (callers decide what a missing file
    means); a FIFO, device, directory, socket or (with FOLLOW false) symlink raises
    UnsafeFile.
    """
    look = os.stat if follow else os.lstat
    try:
        info = look(path)
    except OSError:
        pass  # the open below reports it
    else:
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, info)
    try:
        fd = os.open(path, _READ_FLAGS | (0 if follow else NOFOLLOW))
    except OSError as exc:
        if exc.errno in _SPECIAL_ERRNOS:
            try:
                info = look(path)
            except OSError:
                raise exc from None
            if not stat.S_ISREG(info.st_mode):
                raise _refuse(path, info) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # swapped in since the stat above
            raise _refuse(path, info)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


# The most any read takes in: a project file, compose file or .env is a few KiB, and
# a ledger of 10,000 leases about 5 MiB. A file planted larger (a sparse 2 GiB
# pyproject.toml in /tmp, read at every prompt below it) is refused, not read.
MAX_READ = 64 << 20


def read_bytes(path: Path | str, *, follow: bool = True, limit: int = MAX_READ) -> bytes:
    """PATH's bytes through the guarded open."""
    data, _info = read_with_stat(path, follow=follow, limit=limit)
    return data


def read_with_stat(
    path: Path | str, *, follow: bool = True, limit: int = MAX_READ
) -> tuple[bytes, os.stat_result]:
    """PATH's bytes and the fstat of the file they were read from; UnsafeFile past LIMIT
    bytes, or when the file would block (a /proc file that has nothing to say yet)."""
    fd, info = open_regular(path, follow=follow)
    try:
        return read_open(fd, info, path, limit=limit), info
    finally:
        os.close(fd)


def read_open(fd: int, info: os.stat_result, path: Path | str, *, limit: int = MAX_READ) -> bytes:
    """The bytes of PATH, open as FD (fstat INFO, from open_regular), as read_with_stat."""
    if info.st_size > limit:
        raise UnsafeFile(path, f"is {info.st_size} bytes, more than portalloc reads")
    # In chunks: a /proc file says st_size 0, and one read of LIMIT bytes there
    # fails with ENOMEM.
    chunks: list[bytes] = []
    total = 0
    size = min(max(info.st_size + 1, 1 << 16), limit + 1)  # a regular file: one read
    while True:
        try:
            chunk = os.read(fd, size)
        except BlockingIOError:
            raise UnsafeFile(path, "has nothing to read without waiting") from None
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise UnsafeFile(path, "grows past what portalloc reads")
        chunks.append(chunk)
    return b"".join(chunks)


def read_text(path: Path | str, *, follow: bool = True) -> str:
    """PATH as UTF-8 text, bytes decoded without newline translation."""
    return read_bytes(path, follow=follow).decode("utf-8")


# What Path.exists() and Path.is_file() take for "nothing there"; other errors propagate.
_ABSENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def stat_or_none(path: Path | str) -> os.stat_result | None:
    """PATH's stat, None where Path.exists() says False; without importing pathlib,
    which costs the read path start-up time."""
    try:
        return os.stat(path)  # noqa: PTH116
    except OSError as exc:
        if exc.errno in _ABSENT_ERRNOS:
            return None
        raise
    except ValueError:  # a NUL byte
        return None


def lstat_regular(path: Path | str, action: str = "replace it") -> os.stat_result | None:
    """PATH's lstat if it is a regular file, None if nothing is there; else UnsafeFile
    (`PATH: is a FIFO; refusing to ACTION`)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        kind = _kind(info.st_mode)
        raise UnsafeFile(path, f"is {kind}; refusing to {action}", kind)
    return info


def check_within(path: Path | str, top: Path | str) -> None:
    """Refuse PATH unless its directory, symlinks resolved, lies inside TOP (resolved):
    a committed directory symlink must not carry a write out of the worktree."""
    from pathlib import Path

    real_top = os.path.realpath(top)
    parent = os.path.realpath(Path(path).absolute().parent)
    if parent != real_top and not parent.startswith(real_top.rstrip(os.sep) + os.sep):
        raise UnsafeFile(
            path, f"lies outside {real_top} through a symlinked directory; refusing to write"
        )


def make_dirs(directory: Path, top: Path, mode: int = 0o755) -> list[Path]:
    """Create DIRECTORY and its missing parents up to TOP, never through a symlink out of
    TOP; return the directories made, outermost first (so an uninstall can remove them)."""
    missing: list[Path] = []
    current = directory
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    check_within(current / "x", top)  # the nearest existing ancestor lies inside TOP
    made: list[Path] = []
    for path in reversed(missing):
        path.mkdir(mode=mode)
        made.append(path)
    check_within(directory / "x", top)
    return made


_TMP_COUNTER = count()  # threads of one process (the HTTP server) never share a name


def temp_name(path: Path) -> str:
    """The name atomic_write gives its temp file next to PATH: unique per process,
    thread and call, without `tempfile` (whose imports cost start-up time)."""
    return f".{path.name}.{os.getpid()}.{next(_TMP_COUNTER)}.{time.monotonic_ns()}.tmp"


def is_temp_name(name: str, path: Path) -> bool:
    """Whether NAME is one temp_name(PATH) gives."""
    prefix, suffix = f".{path.name}.", ".tmp"
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return False
    parts = name[len(prefix) : -len(suffix)].split(".")
    # ASCII digits: str.isdigit() also takes `²` and other scripts' digits.
    return len(parts) == 3 and all(part.isascii() and part.isdigit() for part in parts)


def atomic_write(
    path: Path,
    data: bytes | Iterable[Chunk],
    mode: int = 0o600,
    *,
    durable: bool = True,
    within: Path | None = None,
    meanwhile: Callable[[], None] | None = None,
    ahead: Ahead | None = None,
) -> None:
    """Replace PATH with DATA so a crash leaves the old or the new file, never a torn one.

    Only a regular file (or nothing) at PATH is replaced: a symlink, FIFO, device or
    directory there raises UnsafeFile. WITHIN: the directory PATH must lie in, symlinks
    resolved. Not DURABLE: without the fsyncs (a cache that is checked when read).
    MEANWHILE: work of the caller's, done while DATA syncs to disk, before the rename.
    AHEAD: the temp file to finish, if DATA (a list) begins with what it holds.
    """
    parts: Iterable[Chunk] = [data] if isinstance(data, bytes) else data
    taken = None
    try:
        lstat_regular(path)
        if within is not None:
            check_within(path, within)
        if ahead is not None and isinstance(parts, list):
            taken = ahead.take(parts)
    finally:
        if ahead is not None and taken is None:
            ahead.drop()
    tmp: str | None = None
    try:
        if taken is None:
            tmp, fd = _new_temp(path, temp_name(path), mode)
        else:
            tmp, fd, parts = taken
        try:
            _write_parts(fd, parts)
            if durable:
                # The data and the size it needs, not the times: the rename below and
                # the directory's fsync make it the file (fsync where there is no
                # fdatasync, as on macOS).
                _sync_while(getattr(os, "fdatasync", os.fsync), fd, meanwhile)
            elif meanwhile is not None:
                meanwhile()
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        if not durable:
            return
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp is not None:
            discard(tmp)


def _new_temp(path: Path, name: str, mode: int) -> tuple[str, int]:
    """A new temp file NAME (temp_name's) beside PATH, of MODE whatever the umask: its
    path and a descriptor open for writing."""
    tmp = str(path.parent / name)
    fd = os.open(tmp, _NEW_FILE, 0o600)
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        discard(tmp)
        raise
    return tmp, fd


def _behind(sync: Callable[[int], None], fd: int) -> Callable[[], BaseException | None] | None:
    """SYNC(FD) begun on a thread of its own, which waits for the disk with the GIL
    released: a wait() for it that gives its error; None where no thread can be had (a
    limit on processes). The thread syncs a duplicate of FD that it closes itself: a
    caller that a KeyboardInterrupt stops waiting closes FD, and the thread never syncs
    another file that number is given to next."""
    # _thread, not threading: it is loaded in every interpreter, and importing
    # threading would cost `allocate` more than the overlap saves.
    import _thread

    started, synced = _thread.allocate_lock(), _thread.allocate_lock()
    started.acquire()
    synced.acquire()
    failed: list[BaseException] = []
    own = os.dup(fd)

    def run() -> None:
        try:
            started.release()
            sync(own)
        except BaseException as exc:  # raised where the caller is, whatever it is
            failed.append(exc)
        finally:
            os.close(own)
            synced.release()

    try:
        _thread.start_new_thread(run, ())
    except RuntimeError:
        os.close(own)
        return None
    # Until the thread is in the sync it needs the GIL, which the caller's work would
    # keep for the interpreter's switch interval (5 ms): longer than the sync.
    started.acquire()

    def wait() -> BaseException | None:
        synced.acquire()
        synced.release()
        return failed[0] if failed else None

    return wait


def _sync_while(sync: Callable[[int], None], fd: int, work: Callable[[], None] | None) -> None:
    """SYNC(FD), and WORK at the same time (the sync behind, WORK here); an error of the
    sync is raised here, after WORK's."""
    if work is None:
        sync(fd)
        return
    wait = _behind(sync, fd)
    if wait is None:  # no thread to be had: one after the other
        sync(fd)
        work()
        return
    try:
        work()
    finally:
        error = wait()
    if error is not None:
        raise error


class Ahead:
    """A temp file beside PATH that already holds HEAD, the first pieces of the file to
    replace PATH, synced to disk on a thread while the caller works out the rest (a
    grant at 10,000 leases: the 5 MiB of leases it keeps as they were). atomic_write()
    finishes that file when its data begins with HEAD's pieces (the last, a FileRange,
    perhaps cut shorter); otherwise, and on drop(), the temp file goes."""

    def __init__(self, path: Path, head: list[Chunk], mode: int) -> None:
        lstat_regular(path)
        self.head = head
        self.name = temp_name(path)
        tmp, self.fd = _new_temp(path, self.name, mode)
        self.tmp: str | None = tmp
        self._wait: Callable[[], BaseException | None] | None = None
        try:
            _write_parts(self.fd, head)
            self._wait = _behind(getattr(os, "fdatasync", os.fsync), self.fd)
            if self._wait is None:
                raise OSError(errno.EAGAIN, "no thread to sync on")
        except BaseException:
            self.drop()
            raise

    def _rest(self, data: list[Chunk]) -> tuple[int | None, list[Chunk]] | None:
        """Where to cut the file and what DATA needs written after it; None if DATA does
        not begin with HEAD."""
        *whole, last = self.head
        if len(data) < len(self.head) or not all(map(_same, whole, data)):
            return None
        cut = data[len(whole)]
        if _same(last, cut):
            return None, data[len(self.head) :]
        if (
            isinstance(last, FileRange)
            and isinstance(cut, FileRange)
            and _where(cut) == _where(last)
            and cut.length < last.length
        ):
            return sum(map(len, whole)) + cut.length, data[len(self.head) :]
        return None

    def take(self, data: list[Chunk]) -> tuple[str, int, list[Chunk]] | None:
        """The temp file, its descriptor and what of DATA it still needs, if DATA begins
        with HEAD and HEAD is on disk; else None, and the temp file is gone. What is
        taken is the caller's to close and remove."""
        if self.tmp is None:
            return None
        for part in self.head:  # changed in place since it was copied: OSError, as _copy
            if isinstance(part, FileRange):
                part.check()
        rest = self._rest(data)
        if rest is None or self._wait is None or self._wait() is not None:
            self.drop()  # a failed sync: the write starts again, and says what fails
            return None
        cut, parts = rest
        if cut is not None:
            os.ftruncate(self.fd, cut)
            os.lseek(self.fd, cut, os.SEEK_SET)
        taken, self.tmp = self.tmp, None
        return taken, self.fd, parts

    def drop(self) -> None:
        """Remove the temp file (no-op once taken). Its sync is not waited for: the thread
        syncs and closes a descriptor of its own."""
        if self.tmp is None:
            return
        os.close(self.fd)
        discard(self.tmp)
        self.tmp = None


def _where(part: FileRange) -> tuple[object, ...]:
    """Where PART's bytes start: the file (as open, as vouched for) and the offset."""
    return (part.fd, part.expect, part.offset)


def _same(mine: Chunk, theirs: Chunk) -> bool:
    if isinstance(mine, FileRange) or isinstance(theirs, FileRange):
        return (
            isinstance(mine, FileRange)
            and isinstance(theirs, FileRange)
            and _where(mine) == _where(theirs)
            and mine.length == theirs.length
        )
    return bytes(mine) == bytes(theirs)


def _write_parts(fd: int, parts: Iterable[Chunk]) -> None:
    for part in parts:
        if isinstance(part, FileRange):
            _copy(part, fd)
        else:
            _write_all(fd, part)


def discard(path: Path | str) -> None:
    """Remove PATH (a symlink there itself, never what it points to) if it can be."""
    try:
        os.unlink(path)
    except OSError:
        pass


def file_key(info: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file's bytes from another: a write in place moves its
    size or mtime. Not the ctime, which a rename over the file (or a link) moves too: a
    long-lived process copies from the version it read even after it was replaced."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _copy(source: FileRange, fd: int) -> None:
    """SOURCE's bytes onto FD, kernel to kernel where the system can (Linux), else read
    and written a MiB at a time; OSError if SOURCE changed before the copy ended."""
    source.check()
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while copy is not None and done < source.length:
        try:
            count = copy(source.fd, fd, source.length - done, source.offset + done)
        except OSError as exc:
            if exc.errno not in _NO_COPY_ERRNOS:
                raise
            break  # not between these files (another file system, an old kernel)
        if count == 0:
            raise OSError(errno.EIO, "the file being copied was cut short")
        done += count
    rest = FileRange(source.fd, source.offset + done, source.length - done)
    for piece in rest.pieces():
        _write_all(fd, piece)
    source.check()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """All of DATA onto FD, however many writes that takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_NO_COPY_ERRNOS = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ETXTBSY, errno.EBADF}
)


def write_report(prefix: str, text: str) -> str:
    """TEXT in a new private temp file (mode 0600, created exclusively, so nothing
    planted under its name is written through); return its path."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".txt")
    try:
        _write_all(fd, text.encode("utf-8", "backslashreplace"))
    finally:
        os.close(fd)
    return path


def silence(fd: int) -> None:
    """Point descriptor FD (stdout gone away) at the null device."""
    devnull = os.open(os.devnull, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def null_stream(fd: int) -> TextIO:
    """A text stream on descriptor FD pointed at the null device: for a process started
    with stdout or stderr closed (`portalloc env >&-`), which then writes to nowhere
    instead of failing on a missing sys.stdout."""
    devnull = os.open(os.devnull, os.O_WRONLY)  # FD itself, when FD is the lowest free one
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)
    return open(fd, "w", encoding="utf-8", closefd=False)


def open_directory(path: Path | str) -> int:
    """A descriptor of the directory PATH (never through a symlink), to reach an entry of
    it by a short name (`/proc/self/fd/N/name`: an AF_UNIX path holds 108 bytes)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags | NOFOLLOW)


def open_append(path: Path | str, mode: int = 0o600) -> int:
    """A descriptor appending to the regular file PATH, made MODE when missing and never
    opened through a symlink: a child process's output (Caddy's)."""
    return _open_made(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)


def open_lock(path: Path | str, mode: int = 0o600) -> int:
    """A descriptor of the regular file PATH, opened to read and write, to flock(2): a
    lock file, opened as filelock opens one. Never through a symlink, never blocking on
    a FIFO; anything not a regular file is refused (UnsafeFile), also when swapped in
    between a look and the open. Made MODE when missing, the umask notwithstanding (so
    a shared directory's group can lock it too); one that exists is opened as it is
    (PermissionError when this user may not write it), never made again in between."""
    for _attempt in range(8):
        try:
            fd = _open_made(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            try:
                return _open_made(path, os.O_RDWR, mode)
            except FileNotFoundError:
                continue  # removed since: make it
        try:
            os.fchmod(fd, mode)
        except OSError:  # a file system without modes: as made
            pass
        return fd
    raise OSError(errno.EAGAIN, "it keeps being removed and made again")


def _open_made(path: Path | str, access: int, mode: int) -> int:
    flags = access | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno not in {*_SPECIAL_ERRNOS, errno.EISDIR}:
            raise
        try:
            info = os.lstat(path)  # what refused the open: a symlink, a socket, ...
        except OSError:
            raise exc from None
        if stat.S_ISREG(info.st_mode):
            raise
        raise _refuse(path, info) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, info)
    except BaseException:
        os.close(fd)
        raise
    return fd

"""The Caddy process portalloc runs: found, started in the background with a
configuration that never changes (its routes are files, `names`), asked through its admin
API on a unix socket whether it answers, and stopped by the PID it was started with
(never by name)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from portalloc.errors import PortallocError
from portalloc.fs import atomic_write, open_append, open_directory, read_bytes
from portalloc.models import Lease
from portalloc.probe import has_ipv6
from portalloc.proxy import ADMIN_SOCKET, ROUTES_DIR, names, private
from portalloc.proxy.routes import SERVER, document

ROUTES_PATH = f"/config/apps/http/servers/{SERVER}/routes"
START_TIMEOUT = 10.0  # seconds for Caddy to answer after it was started
STOP_TIMEOUT = 10.0  # seconds for it to exit after it was asked to
ADMIN_TIMEOUT = 5.0  # seconds for one admin request
# An AF_UNIX path holds at most 108 bytes on Linux, 104 on macOS.
MAX_SOCKET_PATH = 100


_CHILDREN: list[subprocess.Popen[bytes]] = []


class ProxyError(PortallocError):
    """The proxy cannot be started, reached or stopped."""

    exit_code = 1
    code = "proxy_error"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"proxy: {reason}")


class Files(NamedTuple):
    """The proxy's files, all in its own directory."""

    directory: Path

    @property
    def socket(self) -> Path:
        return self.directory / ADMIN_SOCKET

    @property
    def pid(self) -> Path:
        return self.directory / "caddy.pid"

    @property
    def config(self) -> Path:
        return self.directory / "caddy.json"

    @property
    def log(self) -> Path:
        return self.directory / "caddy.log"

    @property
    def output(self) -> Path:
        """What Caddy prints before its log is set up (a port in use, a panic)."""
        return self.directory / "caddy.out"


class Process(NamedTuple):
    """The Caddy portalloc started, as its PID file records it."""

    pid: int
    started: float  # the process's start time: a PID reused since is not it
    port: int
    binary: str


class Status(NamedTuple):
    running: bool
    directory: Path
    process: Process | None = None
    routes: tuple[tuple[str, int], ...] = ()
    crashed: bool = False  # a PID file of a Caddy that is gone

    def to_json(self) -> dict[str, Any]:
        process = self.process
        return {
            "running": self.running,
            "pid": process.pid if process and self.running else None,
            "port": process.port if process and self.running else None,
            "listen": _listen(process.port) if process and self.running else [],
            "admin_socket": str(Files(self.directory).socket),
            "log": str(Files(self.directory).log),
            "crashed": self.crashed,
            "routes": [{"host": host, "port": port} for host, port in self.routes],
        }


def _listen(port: int) -> list[str]:
    return [f"127.0.0.1:{port}", *([f"[::1]:{port}"] if has_ipv6() else [])]


def binary() -> str | None:
    """The caddy to run: the one the `proxy` extra installed beside this Python (pipx
    and uv keep it off PATH), else one on PATH."""
    name = "caddy.exe" if sys.platform == "win32" else "caddy"
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(scripts) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("caddy")


class _UnixConnection(http.client.HTTPConnection):
    """HTTP to Caddy's admin socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@contextmanager
def _socket_path(files: Files) -> Iterator[str]:
    """A path the socket can be reached by: a long state dir (pytest's, say) is reached
    through the directory's descriptor, on Linux, when the path is too long for AF_UNIX."""
    path = str(files.socket)
    if len(path.encode()) <= MAX_SOCKET_PATH or not Path("/proc/self/fd").is_dir():
        yield path
        return
    fd = open_directory(files.directory)
    try:
        yield f"/proc/self/fd/{fd}/{ADMIN_SOCKET}"
    finally:
        os.close(fd)


def admin(
    files: Files, method: str, path: str, body: object = None, timeout: float = ADMIN_TIMEOUT
) -> tuple[int, Any]:
    """One request to Caddy's admin API: the status and the JSON it answered (or None).
    Raises OSError when nobody answers on the socket."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    with _socket_path(files) as where:
        connection = _UnixConnection(where, timeout)
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except http.client.HTTPException as exc:
            raise OSError(f"admin API: {exc}") from None
        finally:
            connection.close()
    try:
        answer = json.loads(raw) if raw.strip() else None
    except ValueError:
        answer = raw.decode("utf-8", "replace").strip()
    return response.status, answer


def read_process(files: Files) -> Process | None:
    """The Caddy the PID file names, if it still runs (same PID, same start time, and its
    command line is ours: a PID file edited to name another process names none)."""
    try:
        raw = json.loads(read_bytes(files.pid, follow=False))
        process = Process(
            int(raw["pid"]), float(raw["started"]), int(raw["port"]), str(raw["binary"])
        )
    except (OSError, PortallocError, ValueError, KeyError, TypeError):
        return None
    import psutil

    try:
        found = psutil.Process(process.pid)
        alive = found.status() != psutil.STATUS_ZOMBIE
        same = abs(found.create_time() - process.started) < 1.0
        ours = str(files.config) in found.cmdline()
    except (psutil.Error, OSError):
        return None
    return process if alive and same and ours else None


def status(directory: Path) -> Status:
    """Whether the proxy runs, on which port, and the names it answers."""
    files = Files(directory)
    process = read_process(files)
    if process is None:
        return Status(False, directory, crashed=files.pid.exists())
    try:
        code, _answer = admin(files, "GET", ROUTES_PATH)
    except OSError:
        return Status(False, directory, process, crashed=True)
    routes = tuple(names.served(directory)) if code == 200 else ()
    return Status(True, directory, process, routes)


def start(directory: Path, port: int, leases: Iterable[Lease] = ()) -> tuple[Status, bool]:
    """Start Caddy on PORT unless it runs, answering the names of LEASES (the caller
    syncs them with the ledger once it answers: `service.sync_proxy`); return its status
    and whether it was started. A Caddy that crashed (its PID file names no running
    Caddy) is started anew."""
    files = Files(directory)
    _ensure(directory)
    with _locked(files):
        current = status(directory)
        if current.running:
            return current, False
        caddy = binary()
        if caddy is None:
            from portalloc.errors import MissingExtra

            raise MissingExtra("proxy", "caddy")
        _clean(files)
        ipv6 = has_ipv6()
        sockets = _bind(port, ipv6)
        try:
            # Whatever a Caddy before this one was left answering goes first.
            names.clear(directory)
            names.sync(directory / ROUTES_DIR, leases)
            listen = [f"fd/{sock.fileno()}" for sock in sockets]
            config = json.dumps(document(listen, ipv6, directory), indent=1).encode()
            atomic_write(files.config, config, 0o600)
            output = open_append(files.output)
            try:
                child = subprocess.Popen(
                    [caddy, "run", "--config", str(files.config)],
                    cwd=directory,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    pass_fds=[sock.fileno() for sock in sockets],
                    start_new_session=True,  # a Ctrl-C in the shell that started it stays there
                )
            finally:
                os.close(output)
        finally:
            for sock in sockets:
                sock.close()
        # Kept: a Popen dropped while its process runs warns, and this one outlives
        # the call (a long-lived process, such as a test run, reaps it at `stop`).
        _CHILDREN.append(child)
        import psutil

        try:
            started = psutil.Process(child.pid).create_time()
        except psutil.Error:
            started = time.time()
        record = {"pid": child.pid, "started": started, "port": port, "binary": caddy}
        atomic_write(files.pid, json.dumps(record).encode() + b"\n", 0o600)
        _wait_ready(files, child)
        return status(directory), True


def _bind(port: int, ipv6: bool) -> list[socket.socket]:
    """Listening sockets on 127.0.0.1 and ::1 at PORT, for Caddy to inherit.

    Caddy's own TCP listeners are new SO_REUSEPORT sockets at every configuration it
    loads, and closing the old one resets the connections queued on it: a request
    arriving while the routes change would fail. Inherited sockets (`fd/N`) are the same
    socket across every reload."""
    found: list[socket.socket] = []
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            if family == socket.AF_INET6 and not ipv6:
                continue
            sock = socket.socket(family, socket.SOCK_STREAM)
            found.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ProxyError(f"cannot listen on {host} port {port}: {exc.strerror}") from None
            sock.listen(1024)
    except BaseException:
        for sock in found:
            sock.close()
        raise
    return found


def _wait_ready(files: Files, child: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            _clean(files)
            raise ProxyError(f"caddy exited at start: {_last_error(files)}")
        try:
            code, _answer = admin(files, "GET", ROUTES_PATH, timeout=1.0)
            if code == 200:
                return
        except OSError:
            pass
        time.sleep(0.02)
    _terminate(child.pid)
    _clean(files)
    raise ProxyError(f"caddy did not answer within {START_TIMEOUT:g} s; see {files.output}")


def _last_error(files: Files) -> str:
    """The last thing Caddy said before it exited: `listen tcp ...: address already in use`."""
    try:
        lines = read_bytes(files.output).decode("utf-8", "replace").splitlines()
    except (OSError, PortallocError):
        return f"see {files.output}"
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            if line.strip():
                return line.strip()[-300:]
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            return str(entry.get("error") or entry.get("msg"))[-300:]
    return f"see {files.output}"


def stop(directory: Path) -> Process | None:
    """Stop the Caddy the PID file names; return it, or None when none was running."""
    files = Files(directory)
    if not private(directory):
        return None
    with _locked(files):
        process = read_process(files)
        if process is not None:
            try:
                admin(files, "POST", "/stop", timeout=2.0)
            except OSError:
                pass
            _terminate(process.pid, process.started)
        _clean(files)
        names.clear(directory)
        return process


def _terminate(pid: int, started: float | None = None) -> None:
    """End PID (the Caddy started here) if it still runs: SIGTERM, then SIGKILL."""
    import psutil

    try:
        target = psutil.Process(pid)
        if started is not None and abs(target.create_time() - started) >= 1.0:
            return
    except psutil.Error:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    try:
        target.wait(timeout=0.5)
        return
    except psutil.TimeoutExpired:
        pass
    except psutil.Error:
        return
    try:
        target.send_signal(signal.SIGTERM)
        target.wait(timeout=max(0.1, deadline - time.monotonic()))
    except psutil.TimeoutExpired:
        target.kill()
        try:
            target.wait(timeout=5)
        except psutil.Error:
            pass
    except psutil.Error:
        pass


def _clean(files: Files) -> None:
    for path in (files.pid, files.socket):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _ensure(directory: Path) -> None:
    """The proxy's directory: made 0700, and refused unless it is the user's own."""
    try:
        directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ProxyError(f"cannot create {directory}: {exc.strerror or exc}") from None
    if not private(directory):
        raise ProxyError(f"{directory}: not a directory of yours that only you can enter")


@contextmanager
def _locked(files: Files) -> Iterator[None]:
    """One start or stop at a time (two `proxy start` at once start one Caddy)."""
    import filelock

    lock = filelock.FileLock(files.directory / "proxy.lock", timeout=START_TIMEOUT + 5)
    try:
        with lock:
            yield
    except filelock.Timeout:
        raise ProxyError(f"{files.directory}: another start or stop takes too long") from None

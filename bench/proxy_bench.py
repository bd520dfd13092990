"""Named URLs: what the proxy costs. Starts a real `portalloc proxy` (Caddy) on a
throwaway ledger and measures, over loopback:

- latency per request through the proxy against the same server's port directly, each
  on one keep-alive connection (p50/p99 and their difference);
- time from a lease change to its route answering: a new lease's name answering 200,
  a released one answering 404 (the route is handed to Caddy inside the write, so the
  time is the write's own);
- `portalloc env S` and `portalloc get S rest` (the read path) with the proxy running
  against not running: the proxy must cost the read path nothing;
- at 10,000 leases (--leases): `portalloc allocate NEW` on a ledger whose proxy runs
  against the same on a ledger of as many leases with none (interleaved, as users run
  it, with bytecode cached, and the write alone in this process), a new lease's name
  answering, and what `proxy start` (which writes every name once) takes.

    python bench/proxy_bench.py [--requests 3000] [--changes 30] [--reads 40]
                                [--leases 10000] [--allocations 20] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common import FILL_LEDGER  # bench/common.py; bench/ is on sys.path when run


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle and delayed ACKs add
    # 40 ms to every direct request and the comparison measures nothing.
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")


def _free_port(below: int | None = None) -> int:
    """A port nothing listens on; BELOW: one under that number."""
    for port in range(below - 1, 1024, -1) if below else [0]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise SystemExit(f"no free port below {below}")


def _portalloc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "portalloc", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"portalloc {' '.join(args)}: exit {done.returncode}: {done.stderr}")
    return done


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The installed entry point, as users run it (the read path lives there)."""
    binary = Path(sys.executable).with_name("portalloc")
    return subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, check=True)


def _latencies(port: int, host: str | None, count: int) -> list[float]:
    """COUNT GETs on one keep-alive connection to 127.0.0.1:PORT, each in seconds."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host} if host else {}
    times: list[float] = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            connection.request("GET", "/", headers=headers)
            response = connection.getresponse()
            response.read()
            times.append(time.perf_counter() - began)
            assert response.status == 200, response.status
    finally:
        connection.close()
    return times


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _answer(port: int, host: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/", headers={"Host": host})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _reads(env: dict[str, str], count: int, timings: dict[str, list[float]]) -> None:
    """Wall times of `env S` and `get S rest` through the entry point, into TIMINGS."""
    for _ in range(count):
        for name, args in (("env", ("env", "bench")), ("get", ("get", "bench", "rest"))):
            began = time.perf_counter()
            _cli(env, *args)
            timings.setdefault(name, []).append(time.perf_counter() - began)


def _fill(state_dir: Path, leases: int, settings: dict[str, str]) -> None:
    """LEASES leases written into a fresh ledger at once, as `allocate` grants them (by
    the script bench/run.py fills its own with)."""
    limits = [settings[f"PORT_ALLOC_{name}"] for name in ("BASE", "RANGE", "MAX_SESSIONS")]
    sessions = [f"other-{number}" for number in range(leases)]
    argv = [sys.executable, "-c", FILL_LEDGER, str(state_dir), *limits, *sessions]
    subprocess.run(argv, check=True)


def _scale(options: argparse.Namespace, scratch: Path, results: dict[str, Any]) -> None:
    """`allocate NEW` at LEASES leases with the proxy running against not running."""
    from portalloc.config import PortAllocatorConfig
    from portalloc.service import PortAllocatorService

    leases = options.leases
    settings = {  # small blocks, so ten thousand of them fit below the top port
        "PORT_ALLOC_BASE": "10000",
        "PORT_ALLOC_RANGE": "4",
        "PORT_ALLOC_MAX_SESSIONS": str(leases + 1000),
        "PORTALLOC_SKIP_PORT_CHECK": "1",
    }
    proxy_port = _free_port(below=10000)  # outside the span of blocks
    envs = {}
    for name in ("proxy", "plain"):
        state_dir = scratch / f"big-{name}"
        _fill(state_dir, leases, settings)
        envs[name] = {
            **os.environ,
            **settings,
            "PORTALLOC_STATE_DIR": str(state_dir),
            "PORTALLOC_PROXY_PORT": str(proxy_port),
        }
        # As installed, with its bytecode cached: the proxy's modules are what a write
        # imports beyond the others, and compiling them each time is no user's cost.
        envs[name].pop("PYTHONDONTWRITEBYTECODE", None)
    began = time.perf_counter()
    _portalloc(envs["proxy"], "proxy", "start")
    results[f"proxy_start_{leases}_s"] = time.perf_counter() - began
    try:
        cli: dict[str, list[float]] = {"proxy": [], "plain": []}
        for name in ("proxy", "plain"):  # warm-up: writes the bytecode of both paths
            _cli(envs[name], "allocate", "warm-up")
        for number in range(options.allocations):
            for name in ("plain", "proxy") if number % 2 else ("proxy", "plain"):
                began = time.perf_counter()
                _cli(envs[name], "allocate", f"new-{number}")
                cli[name].append(time.perf_counter() - began)
        write: dict[str, list[float]] = {"proxy": [], "plain": []}
        services = {
            name: PortAllocatorService(PortAllocatorConfig.from_env(env))
            for name, env in envs.items()
        }
        to_route = []
        for number in range(options.allocations):
            for name in ("plain", "proxy") if number % 2 else ("proxy", "plain"):
                began = time.perf_counter()
                made = services[name].allocate(f"write-{number}")
                write[name].append(time.perf_counter() - began)
                if name == "proxy":
                    named = made
                    host = made.urls["db"].split("//", 1)[1].rsplit(":", 1)[0]
                    while _answer(proxy_port, host) == 404:
                        pass
                    to_route.append(time.perf_counter() - began)
        for name in ("proxy", "plain"):
            label = "with_proxy" if name == "proxy" else "without_proxy"
            results[f"allocate_{leases}_cli_{label}_p50_ms"] = statistics.median(cli[name]) * 1000
            results[f"allocate_{leases}_write_{label}_p50_ms"] = (
                statistics.median(write[name]) * 1000
            )
        results[f"allocate_{leases}_cli_ratio"] = statistics.median(
            cli["proxy"]
        ) / statistics.median(cli["plain"])
        results[f"allocate_{leases}_to_route_p50_ms"] = statistics.median(to_route) * 1000
        results[f"allocate_{leases}_to_route_max_ms"] = max(to_route) * 1000
        # A request by name among all those names, against the same server directly.
        port = named.ports["db"]
        server = ThreadingHTTPServer(("127.0.0.1", port), _Hello)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            _latencies(proxy_port, host, 200)  # warm-up
            direct, proxied = [], []
            for _ in range(5):
                direct += _latencies(port, None, options.requests // 10)
                proxied += _latencies(proxy_port, host, options.requests // 10)
            added = statistics.median(proxied) - statistics.median(direct)
            results[f"added_p50_ms_at_{leases}"] = added * 1000
        finally:
            server.shutdown()
            server.server_close()
    finally:
        _portalloc(envs["proxy"], "proxy", "stop")


def _run(options: argparse.Namespace, scratch: Path) -> int:
    proxy_port = _free_port(below=10000)  # outside the span of blocks (43000 up)
    env = {
        **os.environ,
        "PORTALLOC_STATE_DIR": str(scratch / "state"),
        "PORTALLOC_PROXY_PORT": str(proxy_port),
        "PORT_ALLOC_BASE": "43000",
        "PORTALLOC_SKIP_PORT_CHECK": "1",
    }
    results: dict[str, Any] = {}
    _portalloc(env, "allocate", "bench")
    from portalloc.config import PortAllocatorConfig
    from portalloc.service import PortAllocatorService

    service = PortAllocatorService(PortAllocatorConfig.from_env(env))
    # The same write with no proxy to tell: what a lease change costs without one.
    plain = []
    for number in range(options.changes):
        began = time.perf_counter()
        service.allocate(f"plain-{number}")
        plain.append(time.perf_counter() - began)
        service.release(f"plain-{number}")
    results["allocate_without_proxy_p50_ms"] = statistics.median(plain) * 1000
    # The read path with and without the proxy running, in alternating rounds.
    reads: dict[bool, dict[str, list[float]]] = {False: {}, True: {}}
    for _ in range(3):
        _reads(env, options.reads // 3, reads[False])
        _portalloc(env, "proxy", "start")
        _reads(env, options.reads // 3, reads[True])
        _portalloc(env, "proxy", "stop")
    _portalloc(env, "proxy", "start")
    try:
        # What the read path imports with the proxy running: none of the proxy's code.
        traced = subprocess.run(
            [sys.executable, "-X", "importtime", "-c",
             "from portalloc.adapters.entry import main; main(['get', 'bench', 'rest_url'])"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        results["read_path_proxy_modules"] = traced.stderr.count("portalloc.proxy")
        allocation = json.loads(_portalloc(env, "allocate", "bench", "--json").stdout)
        rest = allocation["allocation"]["rest_port"]
        host = allocation["allocation"]["urls"]["rest"].split("//", 1)[1]
        server = ThreadingHTTPServer(("127.0.0.1", rest), _Hello)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        _latencies(rest, None, 200)  # warm-up
        _latencies(proxy_port, host, 200)
        direct, proxied = [], []
        for _ in range(5):  # interleaved, so load hits both alike
            direct += _latencies(rest, None, options.requests // 5)
            proxied += _latencies(proxy_port, host, options.requests // 5)
        for name, values in (("direct", direct), ("proxy", proxied)):
            results[f"{name}_p50_ms"] = _percentile(values, 0.50) * 1000
            results[f"{name}_p99_ms"] = _percentile(values, 0.99) * 1000
        results["added_p50_ms"] = results["proxy_p50_ms"] - results["direct_p50_ms"]
        results["added_p99_ms"] = results["proxy_p99_ms"] - results["direct_p99_ms"]
        server.shutdown()
        server.server_close()

        # A lease change to its route answering: from the start of the write (allocate,
        # release through the service, as every adapter makes them) to the first answer
        # by name: 502 once routed (no server on that lease), 404 once released.
        to_answer, to_gone = [], []
        for number in range(options.changes):
            session = f"change-{number}"
            began = time.perf_counter()
            made = service.allocate(session)
            name = made.urls["db"].split("//", 1)[1]
            while _answer(proxy_port, name) == 404:
                pass
            to_answer.append(time.perf_counter() - began)
            began = time.perf_counter()
            service.release(session)
            while _answer(proxy_port, name) != 404:
                pass
            to_gone.append(time.perf_counter() - began)
        results["allocate_to_route_p50_ms"] = statistics.median(to_answer) * 1000
        results["allocate_to_route_max_ms"] = max(to_answer) * 1000
        results["release_to_404_p50_ms"] = statistics.median(to_gone) * 1000
        results["release_to_404_max_ms"] = max(to_gone) * 1000
    finally:
        _portalloc(env, "proxy", "stop")
    if options.leases:
        _scale(options, scratch, results)
    for name in ("env", "get"):
        without = statistics.median(reads[False][name])
        with_proxy = statistics.median(reads[True][name])
        results[f"{name}_without_proxy_ms"] = without * 1000
        results[f"{name}_with_proxy_ms"] = with_proxy * 1000
        results[f"{name}_ratio"] = with_proxy / without

    if options.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:42} {value:9.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--reads", type=int, default=40)
    parser.add_argument("--leases", type=int, default=10000, help="0: skip the scale run")
    parser.add_argument("--allocations", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="proxy-bench-", dir=Path.cwd()))
    try:
        return _run(options, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

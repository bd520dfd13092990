"""Allocate+release round trips per second through one `portalloc serve` over keep-alive.

The server is the real one (`python -m portalloc serve`), on its own throwaway ledger in
a directory on disk, with every ledger write fsynced as always. One client, one
keep-alive connection, one request at a time: the latency an agent or a script sees.

    python bench/http_bench.py [--rounds 2000] [--warmup 200] [--state-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from common import filesystem_type  # bench/common.py; bench/ is on sys.path when run

from portalloc.config import PortAllocatorConfig
from portalloc.service import PortAllocatorService

STARTUP_SECONDS = 30
# A few sessions in turn: each allocate re-grants its sticky block, as agents do all day.
SESSIONS = 8


def lease_server_port(scratch: Path) -> tuple[PortAllocatorService, str, int]:
    """A port for the server, from portalloc itself (bind-probed), in a scratch ledger."""
    service = PortAllocatorService(PortAllocatorConfig(state_dir=scratch, base=41000))
    session_id = "http-bench-server"
    return service, session_id, service.allocate(session_id).api_port


@contextmanager
def running_server(port: int, state_dir: Path, key: str) -> Iterator[str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PORT_ALLOC_", "PORTALLOC_"))
    }
    env.update(PORTALLOC_STATE_DIR=str(state_dir), PORTALLOC_API_KEY=key)
    process = subprocess.Popen(
        [sys.executable, "-m", "portalloc", "serve", "--port", str(port)],
        env=env,
        cwd=state_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # uvicorn's access log: written as usual, not kept
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                raise SystemExit(f"server exited with {process.returncode}: {stderr}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"server did not answer /healthz within {STARTUP_SECONDS}s")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def round_trips(http: httpx.Client, count: int) -> tuple[list[float], list[float]]:
    """COUNT allocate+release pairs; per pair and per request latencies in seconds."""
    pairs: list[float] = []
    requests: list[float] = []
    for index in range(count):
        body = {"session_id": f"bench-{index % SESSIONS}"}
        start = time.perf_counter()
        allocated = http.post("/ports/allocate", json=body)
        middle = time.perf_counter()
        released = http.post("/ports/release", json=body)
        end = time.perf_counter()
        if allocated.status_code != 200 or released.status_code != 200:
            raise SystemExit(
                f"unexpected answer: allocate {allocated.status_code} {allocated.text}, "
                f"release {released.status_code} {released.text}"
            )
        pairs.append(end - start)
        requests.extend((middle - start, end - middle))
    return pairs, requests


def run(rounds: int, warmup: int, state_dir: Path) -> dict[str, Any]:
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="portalloc-bench-port-") as scratch:
        port_service, port_session, port = lease_server_port(Path(scratch))
        try:
            with (
                running_server(port, state_dir, key) as url,
                httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as http,
            ):
                round_trips(http, warmup)
                started = time.perf_counter()
                pairs, requests = round_trips(http, rounds)
                elapsed = time.perf_counter() - started
        finally:
            port_service.release(port_session)
    pairs.sort()
    requests.sort()
    return {
        "rounds": rounds,
        "seconds": round(elapsed, 3),
        "ops_per_second": round(rounds / elapsed, 1),
        "requests_per_second": round(2 * rounds / elapsed, 1),
        "round_trip_ms": {
            "p50": round(percentile(pairs, 0.50) * 1000, 3),
            "p99": round(percentile(pairs, 0.99) * 1000, 3),
            "mean": round(statistics.fmean(pairs) * 1000, 3),
        },
        "request_ms": {
            "p50": round(percentile(requests, 0.50) * 1000, 3),
            "p99": round(percentile(requests, 0.99) * 1000, 3),
        },
        "ledger_dir": str(state_dir),
        "filesystem": filesystem_type(state_dir),
        "cpus": os.cpu_count(),
    }


def report(result: dict[str, Any]) -> str:
    pair, request = result["round_trip_ms"], result["request_ms"]
    lines = [
        f"portalloc HTTP: {result['rounds']} allocate+release round trips in "
        f"{result['seconds']:.2f}s over one keep-alive connection ({result['cpus']} CPUs)",
        f"  throughput  {result['ops_per_second']:.0f} round trips/s "
        f"({result['requests_per_second']:.0f} requests/s); a regression figure, no target",
        f"  round trip  p50 {pair['p50']:.2f} ms  p99 {pair['p99']:.2f} ms  "
        f"mean {pair['mean']:.2f} ms",
        f"  request     p50 {request['p50']:.2f} ms  p99 {request['p99']:.2f} ms",
        f"  ledger      {result['ledger_dir']} ({result['filesystem'] or 'unknown fs'}), "
        "every write fsynced",
    ]
    if result["filesystem"] in ("tmpfs", "ramfs"):
        lines.append("  note: the ledger is on tmpfs, where fsync is free; numbers are optimistic")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2000, help="measured round trips")
    parser.add_argument("--warmup", type=int, default=200, help="round trips before measuring")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the throwaway ledger goes (default: a temp dir under the current "
        "directory, so it is on the same disk as your work, not a tmpfs)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")

    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        result = run(args.rounds, args.warmup, args.state_dir)
    else:
        with tempfile.TemporaryDirectory(prefix=".portalloc-bench-", dir=Path.cwd()) as tmp:
            result = run(args.rounds, args.warmup, Path(tmp))
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""portalloc's start-up, contention and ledger-size costs, each against a baseline run
side by side (interleaved, medians) in the same run, measured as users install it.

    python bench/run.py [--reps 21] [--batch-reps 3] [--processes 200] [--leases 10000]
                        [--only startup|contention|ledger] [--json] [--rebuild]

Everything runs in a venv of the benchmark's own (bench/install.py): a wheel of the
working tree installed non-editable with its dependencies and portpicker, whose
interpreter is checked to start with no .pth file and no import hook.

1. Start-up of the read path: `portalloc env S` and `portalloc get S rest` for a live
   lease, and `portalloc env` inside a worktree that has one, each vs `python -c pass`
   of the same interpreter, and beside portpicker's CLI (`python -m portpicker`).
2. N processes running `portalloc allocate sI --json` at once vs N concurrent processes
   that only import what `allocate` imports: wall time of the whole batch, plus
   duplicated ports and failed processes (both must be 0).
3. With 10,000 active leases vs 1: `portalloc env S` for a live lease, and `portalloc
   allocate` of a new session.

Every measurement uses its own throwaway PORTALLOC_STATE_DIR; the user's real state
directory is never touched. The exit status is 0 even when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import install  # bench/install.py; bench/ is on sys.path when run
from common import FILL_LEDGER, filesystem_type  # bench/common.py

TARGET_STARTUP = 2.5
TARGET_CONTENTION = 1.5
TARGET_LEDGER_ENV = 1.2
TARGET_LEDGER_ALLOCATE = 1.3
SESSION = "bench-session"
SECTIONS = ("startup", "contention", "ledger")  # 1, 2 and 3 below

# The contention floor: a process that imports what `portalloc allocate` imports
# (Typer, filelock, platformdirs, rich, psutil) and does nothing with them.
BASELINE_IMPORTS = "import typer, filelock, platformdirs, rich, psutil"


@dataclass
class Row:
    measurement: str
    portalloc: str
    baseline: str  # the baseline's own time, beside the ratio
    ratio: float | None
    target: str
    passed: bool


@dataclass
class Batch:
    seconds: float
    returncodes: list[int]
    stdouts: list[str]
    stderrs: list[str]


class Bench:
    """A scratch directory, the commands under test, and a clean environment."""

    def __init__(self, scratch: Path, venv: install.Venv) -> None:
        self.scratch = scratch
        self.venv = venv
        python = str(venv.python)
        # The console script, as users run it.
        self.portalloc = [str(venv.portalloc)]
        self.interpreter = [python, "-c", "pass"]
        self.imports_only = [python, "-c", BASELINE_IMPORTS]
        self.portpicker = [python, "-m", "portpicker"] if venv.portpicker else None
        self.cwd = scratch / "cwd"  # no portalloc.toml or pyproject.toml up here
        self.cwd.mkdir()
        self._dirs = 0

    def state_dir(self, label: str) -> Path:
        self._dirs += 1
        path = self.scratch / f"state-{self._dirs:03d}-{label}"
        path.mkdir(mode=0o700)
        return path

    def env(self, state_dir: Path, **settings: str) -> dict[str, str]:
        env = clean_environment()
        env["PORTALLOC_STATE_DIR"] = str(state_dir)
        # Belt and braces: even a default state dir would land in the scratch dir.
        env["XDG_STATE_HOME"] = str(self.scratch / "xdg-state")
        env.update(settings)
        return env

    def run(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> float:
        """Seconds one command takes; it must succeed."""
        started = time.perf_counter()
        proc = subprocess.run(
            list(argv), env=dict(env), cwd=cwd or self.cwd, capture_output=True, check=False
        )
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(
                f"bench: {' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()}"
            )
        return elapsed

    def batch(self, argvs: Sequence[Sequence[str]], env: Mapping[str, str]) -> Batch:
        """Start every command at once; wall time until the last one has exited."""
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=self.cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for argv in argvs
        ]
        outputs = [proc.communicate() for proc in procs]
        elapsed = time.perf_counter() - started
        return Batch(
            seconds=elapsed,
            returncodes=[proc.returncode for proc in procs],
            stdouts=[out.decode() for out, _err in outputs],
            stderrs=[err.decode() for _out, err in outputs],
        )


def clean_environment() -> dict[str, str]:
    """This process's environment without portalloc's settings and without any PYTHON*
    variable (PYTHONPATH, PYTHONSTARTUP...), which would change what starts."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PORT_ALLOC_", "PORTALLOC_", "PYTHON"))
    }


def interleaved(
    reps: int, first: Callable[[], float], second: Callable[[], float], warmup: int = 2
) -> tuple[list[float], list[float]]:
    """REPS timings of each, alternating which goes first so drift hits both alike."""
    a, b = interleaved_all(reps, [first, second], warmup)
    return a, b


def interleaved_all(
    reps: int, commands: Sequence[Callable[[], float]], warmup: int = 2
) -> list[list[float]]:
    """REPS timings of each command, the order reversed every other round."""
    for _ in range(warmup):
        for command in commands:
            command()
    times: list[list[float]] = [[] for _ in commands]
    order = list(range(len(commands)))
    for rep in range(reps):
        for index in order if rep % 2 == 0 else order[::-1]:
            times[index].append(commands[index]())
    return times


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def ratio_row(
    measurement: str,
    ours: list[float],
    theirs: list[float],
    target: float | None,
    unit: str = "ms",
) -> Row:
    """Medians and their ratio; TARGET None: shown for comparison, no target of its own."""
    mine, base = statistics.median(ours), statistics.median(theirs)
    ratio = mine / base
    show = ms if unit == "ms" else (lambda s: f"{s:.2f} s")
    if target is None:
        return Row(measurement, show(mine), show(base), ratio, "-", True)
    return Row(measurement, show(mine), show(base), ratio, f"<= {target:.2f}x", ratio <= target)


def measure_startup(bench: Bench, reps: int) -> list[Row]:
    state = bench.state_dir("startup")
    env = bench.env(state)
    tree = bench.scratch / "worktree"
    (tree / ".git").mkdir(parents=True)
    bench.run([*bench.portalloc, "allocate", SESSION], env)  # the lease exists from now on
    bench.run([*bench.portalloc, "env"], env, cwd=tree)  # the worktree's lease too
    rows = []
    for label, argv, cwd in (
        ("env S, live lease", [*bench.portalloc, "env", SESSION], None),
        ("get S rest, live lease", [*bench.portalloc, "get", SESSION, "rest"], None),
        ("env in a worktree with a lease", [*bench.portalloc, "env"], tree),
    ):

        def command(argv: list[str] = argv, cwd: Path | None = cwd) -> float:
            return bench.run(argv, env, cwd=cwd)

        commands = [command, lambda: bench.run(bench.interpreter, env)]
        if bench.portpicker is not None:

            def portpicker(argv: list[str] = bench.portpicker) -> float:
                return bench.run(argv, env)

            commands.append(portpicker)
        ours, theirs, *picker = interleaved_all(reps, commands)
        row = ratio_row(f"{label} vs python -c pass", ours, theirs, TARGET_STARTUP)
        if picker:
            # Side by side in the same rounds: portalloc must also answer sooner.
            faster = statistics.median(ours) < statistics.median(picker[0])
            row.target += ", < portpicker"
            row.passed = row.passed and faster
            rows.append(row)
            rows.append(
                ratio_row(
                    "  python -m portpicker (same rounds) vs python -c pass",
                    picker[0],
                    theirs,
                    None,
                )
            )
        else:
            row.target += " (portpicker not installed)"
            rows.append(row)
    return rows


# The contention batches' blocks: 10 ports each from 12000, a span that holds no
# port the test suite's foreign listeners keep (10000-10299, 21000-21203) while a
# test run goes on beside the benchmark. A busy port costs an allocation the lookup
# of who holds it, under the lock (about 0.1 s): the batches would measure whatever
# else runs on the machine.
CONTENTION_BASE = 12000
CONTENTION_RANGE = 10


def busy_ports(start: int, end: int) -> list[int]:
    """Ports in START-END something listens on (127.0.0.1), as the batches find them."""
    import socket

    busy = []
    for port in range(start, end + 1):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def measure_contention(bench: Bench, reps: int, processes: int) -> list[Row]:
    most = processes + 10
    settings = {
        "PORT_ALLOC_MAX_SESSIONS": str(most),
        "PORT_ALLOC_BASE": str(CONTENTION_BASE),
        "PORT_ALLOC_RANGE": str(CONTENTION_RANGE),
    }
    end = CONTENTION_BASE + CONTENTION_RANGE * most - 1
    busy = busy_ports(CONTENTION_BASE, end)
    ours: list[float] = []
    theirs: list[float] = []
    duplicates = 0
    failures = 0
    granted = 0

    def portalloc_batch() -> float:
        nonlocal duplicates, failures, granted
        state = bench.state_dir("contention")
        argvs = [[*bench.portalloc, "allocate", f"s{i}", "--json"] for i in range(processes)]
        result = bench.batch(argvs, bench.env(state, **settings))
        ports: list[int] = []
        for code, out in zip(result.returncodes, result.stdouts, strict=True):
            if code != 0:
                failures += 1
                continue
            allocation = json.loads(out)["allocation"]
            ports.extend(v for k, v in allocation.items() if k.endswith("_port"))
            granted += 1
        duplicates += len(ports) - len(set(ports))
        return result.seconds

    def baseline_batch() -> float:
        state = bench.state_dir("contention-baseline")
        argvs = [bench.imports_only for _ in range(processes)]
        return bench.batch(argvs, bench.env(state, **settings)).seconds

    ours, theirs = interleaved(reps, portalloc_batch, baseline_batch, warmup=0)
    row = ratio_row(
        f"{processes} concurrent allocate vs {processes} processes importing the same",
        ours,
        theirs,
        TARGET_CONTENTION,
        unit="s",
    )
    held = f"; {len(busy)} ports of {CONTENTION_BASE}-{end} in use before" if busy else ""
    checks = Row(
        f"  duplicated ports / failed processes ({granted} leases granted{held})",
        f"{duplicates} / {failures}",
        "-",
        None,
        "0 / 0",
        duplicates == 0 and failures == 0,
    )
    return [row, checks]


def fill_ledger(
    bench: Bench, state_dir: Path, sessions: Sequence[str], settings: Mapping[str, str]
) -> None:
    """Write all SESSIONS into a fresh ledger at once, as `allocate` would grant them,
    with the portalloc the benchmark installed."""
    argv = [
        str(bench.venv.python),
        "-c",
        FILL_LEDGER,
        str(state_dir),
        settings["PORT_ALLOC_BASE"],
        settings["PORT_ALLOC_RANGE"],
        settings["PORT_ALLOC_MAX_SESSIONS"],
        *sessions,
    ]
    bench.run(argv, bench.env(state_dir))


def measure_ledger_size(bench: Bench, reps: int, leases: int) -> list[Row]:
    # Small blocks, so ten thousand of them fit below the top port.
    settings = {
        "PORT_ALLOC_BASE": "10000",
        "PORT_ALLOC_RANGE": "4",
        "PORT_ALLOC_MAX_SESSIONS": str(leases + 1000),
        "PORTALLOC_SKIP_PORT_CHECK": "1",
    }
    big, small = bench.state_dir("ledger-big"), bench.state_dir("ledger-small")
    # SESSION holds the highest block of the big ledger: no early exit helps it.
    fill_ledger(bench, big, [*(f"other-{i}" for i in range(leases - 1)), SESSION], settings)
    fill_ledger(bench, small, [SESSION], settings)
    big_env, small_env = bench.env(big, **settings), bench.env(small, **settings)
    size = (big / "leases.json").stat().st_size
    ours, theirs = interleaved(
        reps,
        lambda: bench.run([*bench.portalloc, "env", SESSION], big_env),
        lambda: bench.run([*bench.portalloc, "env", SESSION], small_env),
    )
    rows = [
        ratio_row(
            f"env S, {leases} leases ({size // 1024} KiB) vs 1 lease",
            ours,
            theirs,
            TARGET_LEDGER_ENV,
        )
    ]
    counter = iter(range(10**9))

    def allocate(env: Mapping[str, str]) -> float:
        return bench.run([*bench.portalloc, "allocate", f"new-{next(counter)}"], env)

    ours, theirs = interleaved(reps, lambda: allocate(big_env), lambda: allocate(small_env))
    rows.append(
        ratio_row(
            f"allocate new session, {leases} leases vs 1 lease",
            ours,
            theirs,
            TARGET_LEDGER_ALLOCATE,
        )
    )
    return rows


def table(rows: Sequence[Row]) -> str:
    header = ("measurement", "portalloc", "baseline", "ratio", "target", "result")
    cells = [
        (
            row.measurement,
            row.portalloc,
            row.baseline,
            "-" if row.ratio is None else f"{row.ratio:.2f}x",
            row.target,
            "PASS" if row.passed else "MISS",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (header, *cells)) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        first = line[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in cells)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--reps", type=int, default=21, help="timed runs of each side for 1 and 3 (default 21)"
    )
    parser.add_argument(
        "--batch-reps", type=int, default=3, help="timed batches of each side for 2 (default 3)"
    )
    parser.add_argument(
        "--processes", type=int, default=200, help="concurrent processes for 2 (default 200)"
    )
    parser.add_argument(
        "--leases", type=int, default=10000, help="active leases for 3 (default 10000)"
    )
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only this part (repeatable; default: all)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--rebuild", action="store_true", help="build the wheel and the venv even if cached"
    )
    args = parser.parse_args(argv)
    if min(args.reps, args.batch_reps, args.processes, args.leases) < 1:
        parser.error("every count must be >= 1")

    began = time.perf_counter()
    venv = install.prepare(clean_environment(), rebuild=args.rebuild)
    scratch = Path(tempfile.mkdtemp(prefix="portalloc-bench-"))
    try:
        bench = Bench(scratch, venv)
        header = (
            f"portalloc bench: Python {venv.facts['version']}, {os.cpu_count()} CPUs, "
            f"load {' '.join(f'{load:.2f}' for load in os.getloadavg())}, "
            f"scratch on {filesystem_type(scratch) or 'unknown'}\n"
            f"  installed: wheel of the working tree in {venv.path} (non-editable;"
            f" sys.meta_path {venv.facts['finders']}; no .pth file)\n"
            f"  portalloc: {' '.join(bench.portalloc)}\n"
            f"  baselines: python -c pass of that interpreter (1); "
            f"python -c {BASELINE_IMPORTS!r} (2); 1 lease (3)\n"
            f"  medians of {args.reps} interleaved runs (1, 3) and "
            f"{args.batch_reps} interleaved batches (2)"
        )
        if not args.json:
            print(header, flush=True)
        only = set(args.only or SECTIONS)
        rows: list[Row] = []
        if "startup" in only:
            rows += measure_startup(bench, args.reps)
        if "contention" in only:
            rows += measure_contention(bench, args.batch_reps, args.processes)
        if "ledger" in only:
            rows += measure_ledger_size(bench, args.reps, args.leases)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - began
    loads = " ".join(f"{load:.2f}" for load in os.getloadavg())
    if args.json:
        print(
            json.dumps(
                {"rows": [asdict(row) for row in rows], "seconds": elapsed, "load": loads},
                indent=2,
            )
        )
    else:
        print()
        print(table(rows))
        missed = [row.measurement.strip() for row in rows if not row.passed]
        verdict = "all targets met" if not missed else f"MISSED: {'; '.join(missed)}"
        print(f"\n{verdict} ({elapsed:.0f} s, load {loads} at the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

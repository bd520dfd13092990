"""What the read path imports: `portalloc env` and `get` for a live lease load only the
modules below, so its start-up cost (bench/README.md) cannot grow unnoticed.

Not a timing: each read runs in a fresh interpreter, which lists the modules it
imported between start-up and the answer; anything outside the lists fails the test.
A module added to the read path on purpose is added here, with what it costs
(`python -X importtime`) in bench/README.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import probe

ROOT = Path(__file__).resolve().parent.parent

# portalloc's own: the entry point, settings, the one read (reading: whether a lease
# stands as it is) and the ledger's shapes and bytes it reads without the lock
# (ledger/format.py, ledger/codec.py, ledger/store.py for read_lease, and the
# package's __init__.py, which imports nothing), the lease rules and values, the
# renderers, the facts a reclaim asks, whether the state dir is private (trust). Not
# the allocator (asked only where a project file's profile applies), not profile.py
# (only where a project file is found), not the ledger's index or encoder (a locked
# load, a save), the service, the host, the probe or any framework.
PORTALLOC = {
    "portalloc",
    "portalloc.adapters",
    "portalloc.adapters.common",
    "portalloc.adapters.entry",
    "portalloc.ledger",
    "portalloc.ledger.codec",
    "portalloc.ledger.format",
    "portalloc.ledger.store",
    "portalloc.config",
    "portalloc.errors",
    "portalloc.facts",
    "portalloc.fs",
    "portalloc.models",
    "portalloc.reading",
    "portalloc.records",
    "portalloc.render",
    "portalloc.rules",
    "portalloc.trust",
}
# The standard library's: json (and the re it needs), datetime, zlib for the CRC,
# shlex for sh quoting. Not typing, dataclasses (inspect, ast, dis), pathlib
# (urllib.parse, ipaddress), string, contextlib, unicodedata or math.
STDLIB = {
    "__future__",
    "bisect",
    "collections",
    "collections.abc",
    "copyreg",
    "datetime",
    "math",  # datetime's
    "enum",
    "errno",
    "functools",
    "itertools",
    "json",
    "json.decoder",
    "json.encoder",
    "json.scanner",
    "keyword",
    "operator",
    "re",
    "re._casefix",
    "re._compiler",
    "re._constants",
    "re._parser",
    "reprlib",
    "shlex",
    "types",
    "zlib",
}
# Their C halves (`_json`, `_datetime`, `_sre`...), whatever each build links in.
C_HALVES = {"_bisect", "_collections", "_datetime", "_functools", "_json", "_operator", "_sre"}
# What every interpreter's start-up imports anyway (site does, which the probe skips).
STARTUP = {"os", "os.path", "posixpath", "genericpath", "stat", "_stat", "_collections_abc"}

# Lists, after the answer, what the run imported (repr: no json of the probe's own).
PROBE = """
import sys
before = set(sys.modules)
from portalloc.adapters.entry import main
code = main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.write(repr(sorted(set(sys.modules) - before)) + "\\n")
raise SystemExit(code)
"""


def imported(args: list[str], cwd: Path, site: bool = False) -> tuple[str, set[str]]:
    """ARGS through the entry point in a fresh interpreter: stdout, and the modules the
    run imported. Without SITE, as `-S` starts it: an editable install's import hook
    (site-packages' .pth) imports pathlib and more at start-up, which would hide them."""
    out, modules = probe(PROBE, *args, cwd=cwd, flags=() if site else ("-S",))
    return out, set(modules)


def unexpected(modules: set[str]) -> set[str]:
    return {m for m in modules if m not in PORTALLOC | STDLIB | C_HALVES | STARTUP}


@pytest.fixture
def leased(state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A live TTL lease `s`, and a worktree (returned) with its own lease."""
    monkeypatch.setenv("PORTALLOC_SKIP_PORT_CHECK", "1")
    tree = tmp_path / "tree"
    (tree / ".git").mkdir(parents=True)
    for args, cwd in ((["allocate", "s"], tmp_path), (["env"], tree)):
        subprocess.run(
            [sys.executable, "-m", "portalloc", *args],
            cwd=cwd,
            capture_output=True,
            check=True,
            timeout=60,
        )
    return tree


@pytest.mark.parametrize(
    ("args", "in_tree", "expected"),
    [
        (["env", "s"], False, "export API_PORT="),
        (["env", "s", "--format", "json"], False, '"API_PORT"'),
        (["get", "s", "rest"], False, "10001"),
        (["env"], True, "export API_PORT="),
    ],
)
def test_a_read_imports_only_the_allowed_modules(
    leased: Path, tmp_path: Path, args: list[str], in_tree: bool, expected: str
) -> None:
    out, modules = imported(args, leased if in_tree else tmp_path)
    assert expected in out
    # Served by the read path, not the full CLI.
    assert "portalloc.adapters.cli" not in modules
    assert not unexpected(modules), (
        f"the read path imports {sorted(unexpected(modules))}: keep it lazy, or add it "
        "to the allowed lists with what bench/run.py measures it costs"
    )


def test_the_probe_sees_a_module_the_full_cli_imports(tmp_path: Path) -> None:
    """The check can fail: a command the read path does not serve imports Typer."""
    _out, modules = imported(["status"], tmp_path, site=True)
    assert "portalloc.adapters.cli" in modules
    assert {"typer", "typing"} <= {m.split(".")[0] for m in unexpected(modules)}


def test_the_read_path_modules_import_nothing_heavy_at_the_top() -> None:
    """typing, dataclasses and pathlib only under TYPE_CHECKING in the modules above:
    a top-level import there would put them back on every read."""
    heavy = {"typing", "dataclasses", "pathlib", "inspect", "string", "contextlib"}
    for name in sorted(PORTALLOC):
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; TYPE_CHECKING blocks are `if`s
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = {node.module.split(".")[0]}
            else:
                continue
            assert not names & heavy, f"{name} imports {sorted(names & heavy)} at the top"


GC_PROBE = r"""
import gc, sys
import portalloc.adapters.cli as cli
import portalloc.adapters.entry as entry

seen = {}
real_serve, real_allocate = entry.serve, entry.allocate


def serve(read):
    seen["read"] = gc.isenabled()
    return real_serve(read)


def allocate(*args, **kwargs):
    seen["grant"] = gc.isenabled()
    return real_allocate(*args, **kwargs)


def full(args):
    seen["full"] = gc.isenabled()
    return 0


def answered():
    raise SystemExit(0)  # not os._exit: this probe reports what it saw


entry.serve, entry.allocate, entry._answered, cli.main = serve, allocate, answered, full
sys.argv = ["portalloc", *sys.argv[1:]]
try:
    entry.run()
except SystemExit:
    pass
sys.stderr.write(repr(seen) + "\n")
"""


@pytest.mark.parametrize(
    ("argv", "seen"),
    [
        (["env", "S"], {"read": False}),
        (["allocate", "T"], {"grant": False}),
        (["status"], {"full": True}),
        (["env", "--help"], {"full": True}),
    ],
)
def test_a_read_and_a_grant_run_without_the_cycle_collector(
    state_dir: Path, argv: list[str], seen: dict[str, bool]
) -> None:
    """The read path and a grant end the process as soon as they answer, having made a
    bounded number of objects: the cycle collector's passes are time they do without
    (bench/README.md). The full CLI, whose commands may run for hours (`serve`, `run`,
    `check --wait`), has it back."""
    from portalloc import get_port_allocator

    get_port_allocator().allocate("S")
    env = {"PORTALLOC_STATE_DIR": str(state_dir)}
    assert probe(GC_PROBE, *argv, cwd=state_dir.parent, env=env)[1] == seen

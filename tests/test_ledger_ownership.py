"""Only the store opens the ledger's files: every open, replace or removal of
leases.json (and of its lock, index, temp and quarantined copies) in a run of the CLI's
reads and writes comes from portalloc.ledger.store, its reads without the lock
included (read_lease for the read path, read_every_lease for completion).

Not a scan of the source: a fresh interpreter runs the commands with an audit hook
(PEP 578) that sees every open of a file, through portalloc.fs or not, and names the
portalloc module whose code asked for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from portalloc.config import LEDGER_NAME
from tests.helpers import probe

STORE = "portalloc.ledger.store"

# The store's reads without the lock, of one lease (the read path, `get`, `check`) and
# of every lease (shell completion): the runs below must reach both.
LOCK_FREE_READ = {(STORE, "read_lease"), (STORE, "read_every_lease")}
# Readers still to be moved behind the ledger package, each by the developer who owns
# it; the test fails on one listed here that reads the ledger no more, so the list
# cannot go stale. Shell completion, which parsed the raw JSON itself, was the last
# (2c03230): keep it empty.
NOT_YET_MOVED: set[tuple[str, str]] = set()

# Runs the commands below with every file event on the ledger's files recorded as
# (event, file name, module, function): the innermost frame of portalloc's own code
# that is not the guarded open every module goes through (portalloc.fs), else the
# innermost frame. Printed, after the runs, as the last line of stderr.
PROBE = """
import os, sys

LEDGER = sys.argv[1]
EVENTS = {"open", "os.rename", "os.remove", "os.truncate", "os.link", "shutil.copyfile"}
seen = []
busy = False

def ledgers(args):
    for arg in args:
        if isinstance(arg, (str, bytes, os.PathLike)):
            name = os.path.basename(os.fsdecode(os.fspath(arg)))
            if name == LEDGER or name.startswith((LEDGER + ".", "." + LEDGER + ".")):
                yield name

def hook(event, args):
    global busy
    if busy or event not in EVENTS:
        return
    names = list(ledgers(args))
    if not names:
        return
    busy = True  # sys._getframe raises an audit event of its own
    try:
        frame = sys._getframe(1)
        found = frame
        while found is not None:
            module = found.f_globals.get("__name__", "")
            if module.startswith("portalloc") and module != "portalloc.fs":
                break
            found = found.f_back
        found = found or frame
        for name in names:
            seen.append((event, name, found.f_globals.get("__name__", ""), found.f_code.co_name))
    finally:
        busy = False

sys.addaudithook(hook)

import contextlib, io
from pathlib import Path

from portalloc.adapters import completion, entry
from portalloc.ledger import store

store.INDEX_MIN_LEASES = 1  # every save keeps an index: loads go through it as well
state = Path(os.environ["PORTALLOC_STATE_DIR"])

def portalloc(*args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        entry.main(list(args))

portalloc("allocate", "s")  # entry.allocate: the service without Typer
portalloc("allocate", "s", "--json")
portalloc("env", "s")  # the lock-free read
portalloc("env", "s", "--format", "json")
portalloc("get", "s", "rest")
portalloc("env", "t")  # no lease: the full CLI grants one
portalloc("allocate", "u", "--ttl", "30")
portalloc("status")
portalloc("status", "--json")
portalloc("run", "s", "--", sys.executable, "-c", "pass")
portalloc("release", "u")
completion.sessions("")
completion.keys("s", "")
if len(sys.argv) > 2:  # a module other than the store reads the ledger, as a test asks
    sneak = {"__name__": sys.argv[2]}
    exec(compile(sys.argv[3], "<sneak>", "exec"), sneak)
    sneak["sneak"](state / LEDGER)
busy = True
(state / LEDGER).write_bytes(b"not a ledger")  # the probe's own: not recorded
busy = False
portalloc("status")  # quarantined
portalloc("release", "s")
sys.stderr.write(repr(sorted(set(seen))) + "\\n")
"""


def file_events(state_dir: Path, *sneak: str) -> set[tuple[str, str, str, str]]:
    """(event, file name, module, function) of every touch of the ledger's files in a
    run of PROBE; SNEAK: a module name and the source of its `sneak(path)`."""
    skip = {"PORTALLOC_SKIP_PORT_CHECK": "1"}
    _out, events = probe(PROBE, LEDGER_NAME, *sneak, cwd=state_dir.parent, env=skip, timeout=120)
    return set(events)


def outside_the_store(events: set[tuple[str, str, str, str]]) -> set[tuple[str, str, str, str]]:
    return {
        (event, name, module, function)
        for event, name, module, function in events
        if module != STORE and (module, function) not in NOT_YET_MOVED
    }


def test_only_the_store_opens_the_ledger(state_dir: Path) -> None:
    events = file_events(state_dir)
    assert not outside_the_store(events), (
        f"the ledger's files are opened outside {STORE}: {sorted(outside_the_store(events))}"
    )
    # The runs did what they are for: the store read, replaced, locked, indexed and
    # quarantined the ledger; the read path read it; the listed readers still read it.
    touched = {(event, name) for event, name, module, _function in events if module == STORE}
    expected = {("open", LEDGER_NAME), ("os.rename", LEDGER_NAME), ("open", f"{LEDGER_NAME}.lock")}
    if hasattr(os, "geteuid"):  # an index per user: POSIX only
        expected.add(("open", f"{LEDGER_NAME}.index-{os.geteuid()}"))
    assert touched >= expected
    assert any(name.startswith(f"{LEDGER_NAME}.corrupt-") for _event, name in touched)
    readers = {(module, function) for _event, _name, module, function in events}
    assert readers >= LOCK_FREE_READ | NOT_YET_MOVED


@pytest.mark.parametrize(
    "source",
    [
        "def sneak(path):\n    from portalloc.fs import read_bytes\n    return read_bytes(path)\n",
        "def sneak(path):\n    with open(path, 'rb') as f:\n        return f.read()\n",
        "def sneak(path):\n    import os\n    os.replace(path, str(path) + '.mine')\n",
    ],
    ids=["guarded-open", "open", "replace"],
)
def test_the_check_sees_another_module_touch_the_ledger(state_dir: Path, source: str) -> None:
    """The check can fail: a read or replace of the ledger from the service's code, through
    the guarded open or not, is named with the module and function that asked."""
    sneaked = outside_the_store(file_events(state_dir, "portalloc.service", source))
    assert sneaked and {(m, f) for _e, _n, m, f in sneaked} == {("portalloc.service", "sneak")}

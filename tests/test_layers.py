"""Which module may import which: the edges the design rules out, read from the source
(imports inside functions count too), so a lazy import cannot hide one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "portalloc"
FRAMEWORKS = {"typer", "click", "rich", "mcp", "fastapi", "starlette", "uvicorn", "pydantic"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module PATH's code imports at run time, anywhere in it (`from portalloc
    import hooks` counts as portalloc.hooks); not what only a type checker sees."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, f"{path}: a relative import"
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {_module(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _imports_any(module: str, prefixes: set[str]) -> set[str]:
    return {
        name
        for name in MODULES[module]
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)
    }


LEDGER = "portalloc.ledger"
# The ledger package, each module above those it may import: format.py at the bottom,
# then codec.py, index.py, encoder.py, store.py; __init__.py imports none of them (the
# read path imports codec.py, never the store, the index or the encoder).
LEDGER_LAYERS: dict[str, set[str]] = {
    LEDGER: set(),
    f"{LEDGER}.format": set(),
    f"{LEDGER}.codec": {f"{LEDGER}.format"},
    f"{LEDGER}.index": {f"{LEDGER}.format", f"{LEDGER}.codec"},
    f"{LEDGER}.encoder": {f"{LEDGER}.format", f"{LEDGER}.codec", f"{LEDGER}.index"},
    f"{LEDGER}.store": {
        f"{LEDGER}.format",
        f"{LEDGER}.codec",
        f"{LEDGER}.index",
        f"{LEDGER}.encoder",
    },
}
# Outside it, the service is the store's one user and portalloc.reading reads through
# the store without the lock (read_lease, read_every_lease); nothing else reaches into
# the ledger.
LEDGER_USERS = {
    "portalloc.service": {f"{LEDGER}.store"},
    "portalloc.reading": {f"{LEDGER}.store"},
}


def _ledger_imports(module: str) -> set[str]:
    """The modules of the ledger package MODULE imports, but the package itself (any
    import of one of them runs its __init__.py, checked on its own) and MODULE."""
    found: set[str] = set()
    for name in _imports_any(module, {LEDGER}):
        while name not in MODULES:  # `from portalloc.ledger.codec import dump`
            name = name.rpartition(".")[0]
        found.add(name)
    return found - {LEDGER, module}


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("portalloc.models", {"portalloc.render"}),  # a value does not format itself
        *(  # the ledger is handed the facts, and decides nothing
            (module, {"portalloc.host", "portalloc.probe", "portalloc.allocator"})
            for module in LEDGER_LAYERS
        ),
        *((module, {"portalloc.service", "portalloc.adapters"}) for module in LEDGER_LAYERS),
        ("portalloc.pytest_plugin", {"portalloc.adapters"}),
        ("portalloc.service", {"portalloc.commands", "portalloc.adapters"}),
        ("portalloc.reading", {"portalloc.service", "portalloc.adapters"}),
        # The read path and completion read through portalloc.reading (and the service):
        # the ledger's bytes and the lease decisions are not theirs.
        ("portalloc.adapters.entry", {"portalloc.ledger", "portalloc.allocator"}),
        ("portalloc.adapters.completion", {"json", "portalloc.ledger"}),
        ("portalloc.rules", {"portalloc.models", "portalloc.config", "portalloc.render"}),
    ],
)
def test_a_layer_does_not_reach_up(module: str, forbidden: set[str]) -> None:
    assert not _imports_any(module, forbidden)


def test_the_ledger_package_is_the_modules_layered_here() -> None:
    assert {m for m in MODULES if m == LEDGER or m.startswith(LEDGER + ".")} == set(LEDGER_LAYERS)


@pytest.mark.parametrize(("module", "allowed"), LEDGER_LAYERS.items())
def test_a_ledger_module_imports_only_those_below_it(module: str, allowed: set[str]) -> None:
    assert _ledger_imports(module) <= allowed


def test_the_ledger_package_imports_nothing_itself() -> None:
    assert MODULES[LEDGER] == set()


def test_only_the_service_and_the_read_path_use_the_ledger() -> None:
    users = {
        module: _ledger_imports(module)
        for module in MODULES
        if module not in LEDGER_LAYERS and _ledger_imports(module)
    }
    assert users == LEDGER_USERS


def test_only_adapters_import_the_frameworks() -> None:
    outside = {
        module: sorted(_imports_any(module, FRAMEWORKS))
        for module in MODULES
        if not module.startswith("portalloc.adapters")
    }
    assert {module: names for module, names in outside.items() if names} == {}


def test_commands_use_no_adapter() -> None:
    """A command is a plain function the CLI, MCP and HTTP can all call: it imports no
    adapter (nor, by the test above, any framework)."""
    commands = [module for module in MODULES if module.startswith("portalloc.commands")]
    assert "portalloc.commands.env" in commands
    assert {m: sorted(_imports_any(m, {"portalloc.adapters"})) for m in commands} == {
        m: [] for m in commands
    }


def test_the_core_does_not_reach_up_into_the_commands() -> None:
    above = ("portalloc.commands", "portalloc.adapters")
    users = {
        module
        for module in MODULES
        if not module.startswith(above) and _imports_any(module, {"portalloc.commands"})
    }
    assert users == set()


def test_the_check_sees_an_import_inside_a_function() -> None:
    assert "portalloc.hooks.files" in MODULES["portalloc.hooks.git"]
    assert _imports_any("portalloc.adapters.cli", {"typer"})
    # The store imports the index and the encoder inside the functions that need them.
    assert {f"{LEDGER}.index", f"{LEDGER}.encoder"} <= _ledger_imports(f"{LEDGER}.store")

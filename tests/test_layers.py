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


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("portalloc.models", {"portalloc.render"}),  # a value does not format itself
        ("portalloc.ledger", {"portalloc.host", "portalloc.probe"}),  # handed the facts
        ("portalloc.codec", {"portalloc.host", "portalloc.probe"}),
        ("portalloc.pytest_plugin", {"portalloc.adapters"}),
        ("portalloc.service", {"portalloc.commands", "portalloc.adapters"}),
        ("portalloc.reading", {"portalloc.service", "portalloc.adapters"}),
        # The read path and completion read through portalloc.reading (and the service):
        # the ledger's bytes and the lease decisions are not theirs.
        (
            "portalloc.adapters.entry",
            {"portalloc.codec", "portalloc.ledger", "portalloc.allocator"},
        ),
        ("portalloc.adapters.completion", {"json", "portalloc.codec", "portalloc.ledger"}),
        ("portalloc.rules", {"portalloc.models", "portalloc.config", "portalloc.render"}),
    ],
)
def test_a_layer_does_not_reach_up(module: str, forbidden: set[str]) -> None:
    assert not _imports_any(module, forbidden)


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

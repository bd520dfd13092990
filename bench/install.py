"""portalloc as users install it: a wheel, installed non-editable into a fresh virtualenv.

An editable install puts an import hook (`__editable__*.pth` and a finder on
`sys.meta_path`) into site-packages, so every interpreter start in that venv pays for
it: `python -c pass` there takes twice as long, and every ratio against it looks
twice as good. The benchmark therefore never runs in the development venv. It builds
a wheel of the working tree (`pip wheel --no-deps`), installs it with its
dependencies and portpicker (the CLI it is compared with) into a venv of its own
made with `--without-pip` (nothing but what is installed), and checks that the
venv's interpreter starts with no `.pth` file and no import hook.

The venv is kept under `bench/.cache/<hash>`, the hash covering the sources, the
interpreter's version and this file: a rerun on unchanged sources starts at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
# What the wheel is built from (pyproject.toml names README.md as the readme).
SOURCES = ("pyproject.toml", "README.md", "portalloc")
EXTRAS = ("portpicker",)  # installed beside portalloc, measured side by side
# What `python -c pass` of a clean interpreter has on sys.meta_path.
STANDARD_FINDERS = ["BuiltinImporter", "FrozenImporter", "PathFinder"]

# Run by the venv's interpreter: what it imports at start-up and where portalloc is.
_PROBE = """
import sys
finders = [getattr(f, "__name__", type(f).__name__) for f in sys.meta_path]
import json, os, site
sp = [p for p in site.getsitepackages() if os.path.isdir(p)]
pth = sorted(n for p in sp for n in os.listdir(p) if n.endswith(".pth"))
import portalloc, importlib.util
print(json.dumps({
    "finders": finders,
    "pth": pth,
    "site_packages": sp,
    "portalloc": portalloc.__file__,
    "portpicker": importlib.util.find_spec("portpicker") is not None,
    "version": sys.version.split()[0],
}))
"""


class Venv(NamedTuple):
    path: Path
    python: Path
    portalloc: Path
    portpicker: bool
    key: str
    facts: dict[str, object]


def source_files() -> list[Path]:
    files: list[Path] = []
    for name in SOURCES:
        top = ROOT / name
        if top.is_file():
            files.append(top)
            continue
        files += sorted(
            path
            for path in top.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
        )
    return files


def source_key() -> str:
    digest = hashlib.sha256()
    digest.update(sys.version.encode())
    digest.update(Path(__file__).read_bytes())
    for path in source_files():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run(
    argv: list[str], what: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> str:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else dict(env),
        cwd=cwd,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench: {what} failed ({' '.join(argv)}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _build(where: Path) -> None:
    """The wheel of the working tree, installed with its dependencies into WHERE/venv."""
    src = where / "src"
    for path in source_files():
        target = src / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    # A copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "-q", "-w", str(where / "wheel"), str(src)], "pip wheel")
    wheels = sorted((where / "wheel").glob("portalloc-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"bench: expected one portalloc wheel, found {wheels}")
    _run([sys.executable, "-m", "venv", "--without-pip", str(where / "venv")], "venv")
    python = where / "venv" / "bin" / "python"
    # The development venv's pip installs into the new venv (`--python`): the new one
    # has no pip, no setuptools, no .pth file of theirs.
    _run(
        [*pip, "--python", str(python), "install", "-q", str(wheels[0]), *EXTRAS],
        "pip install",
    )
    shutil.rmtree(src)


def prepare(env: Mapping[str, str], cache: Path = CACHE, rebuild: bool = False) -> Venv:
    """The benchmark's venv for the current sources, built if missing, checked clean as
    its interpreter starts in ENV (the environment every measured command gets)."""
    key = source_key()
    where = cache / key
    done = where / "ready"
    if rebuild or not done.exists():
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        _build(where)
        done.write_text("ok\n")
        # Older builds of other sources are of no further use.
        for other in cache.iterdir():
            if other.is_dir() and other != where:
                shutil.rmtree(other, ignore_errors=True)
    python = where / "venv" / "bin" / "python"
    # From the cache directory: `python -c` puts the current one first on sys.path.
    probe = [str(python), "-c", _PROBE]
    facts = json.loads(_run(probe, "the venv's interpreter", env, cwd=where))
    problems = []
    if facts["finders"] != STANDARD_FINDERS:
        problems.append(f"sys.meta_path holds {facts['finders']}")
    if facts["pth"]:
        problems.append(f".pth files in site-packages: {facts['pth']}")
    if not str(facts["portalloc"]).startswith(str(where / "venv")):
        problems.append(f"portalloc imported from {facts['portalloc']}")
    if problems:
        raise SystemExit("bench: the venv is not a clean install: " + "; ".join(problems))
    return Venv(
        where / "venv",
        python,
        where / "venv" / "bin" / "portalloc",
        bool(facts["portpicker"]),
        key,
        facts,
    )

"""`portalloc init`: compose files made worktree-safe, byte for byte where untouched.

The compose files under tests/data/compose were written for these tests; each
reproduces what real projects' files do (IP-bound mappings, udp, ranges, long
syntax, anchors and merge keys in both spellings, override files, container_name,
ports already parameterised, comments in port lists, odd indentation, flow lists).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portalloc import adopt
from portalloc.compose import TemplateError, fixed_range, interpolate, model, parse_short
from portalloc.models import render_template
from tests.helpers import run_cli

DATA = Path(__file__).parent / "data" / "compose"
CASES = [*sorted(p.name for p in DATA.glob("*.yml")), "override"]
ENV = {"PORTALLOC_SKIP_PORT_CHECK": "1"}


def git(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["git", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def case_dir(name: str, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A repository top holding the case's compose file(s)."""
    top = tmp_path / "repo"
    top.mkdir(parents=True)
    (top / ".git").mkdir()
    source = DATA / name
    if source.is_dir():
        for path in sorted(source.iterdir()):
            shutil.copy(path, top / path.name)
    else:
        shutil.copy(source, top / "compose.yaml")
    return top, adopt.find_compose_files(top)


# --- what compose makes of the text ---------------------------------------------


def model_of(text: str, env: dict[str, str]) -> Any:
    return model(yaml.compose(text, Loader=yaml.SafeLoader), env)


def published(document: Any) -> list[tuple[str, int, str]]:
    """(service, host port, protocol) for every fixed host port the model publishes."""
    out: list[tuple[str, int, str]] = []
    for service, body in (document.get("services") or {}).items():
        for entry in (body or {}).get("ports") or []:
            if isinstance(entry, dict):
                host, protocol = entry.get("published") or "", entry.get("protocol") or "tcp"
            else:
                spec = parse_short(entry)
                host, protocol = spec.host, spec.protocol
            fixed = fixed_range(host)
            if fixed:
                out += [(service, port, protocol) for port in range(fixed[0], fixed[1] + 1)]
    return out


def lease_env(plan: adopt.Plan, start: int, project: str) -> dict[str, str]:
    """The variables the planned profile gives a lease whose block starts at START."""
    fields = {f"{name}_port": str(start + offset) for name, offset in plan.ports}
    fields["compose_project_name"] = project
    return {var: render_template(template, fields) for var, template in plan.env}


def container_names(document: Any) -> list[str]:
    return [
        body["container_name"]
        for body in (document.get("services") or {}).values()
        if isinstance(body, dict) and "container_name" in body
    ]


def _structure(line: str) -> list[str]:
    return re.findall(r"#|,|: |\n", re.sub(r"\$\{[^}]*\}", "", line))


def check_plan(plan: adopt.Plan) -> None:
    """Every promise init makes about the files it rewrites."""
    width = adopt.needed_range(plan)
    block = max(width, 100)
    for path, _shown, old, new in plan.changes:
        if path.name in ("portalloc.toml", "pyproject.toml"):
            continue
        assert old is not None
        before, after = old.decode(), new.decode()
        # 1. With no variable set, compose reads exactly what it read before.
        assert model_of(after, {}) == model_of(before, {})
        # 2. Only the lines holding a rewritten value change, and only inside them.
        old_lines, new_lines = before.splitlines(True), after.splitlines(True)
        assert len(old_lines) == len(new_lines)
        for a, b in zip(old_lines, new_lines, strict=True):
            # What changed is a value: the same comments, keys, list separators and line
            # ending, in the same order, around the `${VAR:-...}` init wrote. (Not a
            # character diff: difflib may align `1024:1024, "1024:1024"` across a comma.)
            assert _structure(a) == _structure(b), (a, b)
        # 3. With a lease's variables, every port that was fixed lies in its block,
        #    and two leases publish no port in common.
        fixed_before = {(s, p) for s, p, _ in published(model_of(before, {}))}
        leases = []
        for start, project in ((20000, "p-aaaaaaaa"), (20000 + block, "p-bbbbbbbb")):
            document = model_of(after, lease_env(plan, start, project))
            mine = {(s, p) for s, p, _ in published(document)}
            moved = mine - fixed_before
            assert all(start <= port < start + block for _, port in moved)
            leases.append({port for _, port in moved})
            names = container_names(document)
            assert all(
                name.startswith(project) for name in names if name in plan.defaults.values()
            ) or not any(v.endswith("_CONTAINER_NAME") for v in plan.defaults)
        assert not leases[0] & leases[1]
        # 4. Nothing that was fixed stays fixed, unless init said why.
        still = {(s, p) for s, p, _ in published(model_of(after, lease_env(plan, 20000, "x")))}
        assert not (still & fixed_before) or plan.notes or plan.given


@pytest.mark.parametrize("case", CASES)
def test_every_case_keeps_its_meaning_and_moves_into_the_block(case: str, tmp_path: Path) -> None:
    top, files = case_dir(case, tmp_path)
    plan = adopt.plan(files, top)
    assert plan.changes, "every case has something to rewrite"
    check_plan(plan)
    # Idempotent: write, plan again, nothing left to change.
    adopt.add_profile(plan)
    adopt.write(plan)
    again = adopt.plan(adopt.find_compose_files(top), top)
    adopt.add_profile(again)
    assert again.changes == []


def test_every_syntax_is_rewritten(tmp_path: Path) -> None:
    top, files = case_dir("udp-ranges.yml", tmp_path)
    plan = adopt.plan(files, top)
    text = plan.changes[0][3].decode()
    assert '"${DNS_PORT:-1053}:53/udp"' in text and '"${DNS_PORT:-1053}:53/tcp"' in text
    assert '"${MEDIA_40000_UDP_PORT:-40000}-${MEDIA_40000_UDP_LAST_PORT:-40005}:40000-' in text
    # A range takes consecutive offsets: 6 ports, 6 offsets, the last one named.
    offsets = dict(plan.ports)
    assert offsets["media_40000_udp_last"] - offsets["media_40000_udp"] == 5

    top2, files2 = case_dir("ip-bound.yml", tmp_path / "b")
    text2 = adopt.plan(files2, top2).changes[0][3].decode()
    assert '"127.0.0.1:${CACHE_PORT:-6379}:6379"' in text2
    assert "- '127.0.0.1:${SEARCH_9600_PORT:-9600}:9600'" in text2  # single quotes kept
    assert '"[::1]:${PROXY_80_PORT:-8080}:80"' in text2

    top3, files3 = case_dir("long-syntax.yml", tmp_path / "c")
    plan3 = adopt.plan(files3, top3)
    text3 = plan3.changes[0][3].decode()
    assert 'published: "${API_8000_PORT:-8000}"' in text3
    assert 'published: "${API_9090_PORT:-9091}"' in text3
    assert "container port 5005 only" in " ".join(n[2] for n in plan3.notes)


def test_anchors_and_both_merge_key_spellings(tmp_path: Path) -> None:
    top, files = case_dir("anchors.yml", tmp_path)
    plan = adopt.plan(files, top)
    old, new = plan.changes[0][2], plan.changes[0][3]
    assert old is not None
    diff = [
        line
        for line in difflib.unified_diff(old.decode().splitlines(), new.decode().splitlines())
        if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))
    ]
    # The anchored list is rewritten once, where it is written; aliases follow it.
    assert sorted(diff) == sorted(
        [
            '-    - "3000:3000"',
            '-  - "5432:5432"',
            '-      - "3001:3000"',
            '+    - "${WEB_PORT:-3000}:3000"',
            '+  - "${DB_PORT:-5432}:5432"',
            '+      - "${WEB_ADMIN_PORT:-3001}:3000"',
        ]
    )
    text = new.decode()
    assert (
        "    << : *web-defaults\n" in text and "    <<: [*web-defaults, *default-logging]" in text
    )


def test_override_files_share_names_for_the_same_mapping(tmp_path: Path) -> None:
    top, files = case_dir("override", tmp_path)
    assert [f.name for f in files] == ["docker-compose.yml", "docker-compose.override.yml"]
    plan = adopt.plan(files, top)
    base, override = (change[3].decode() for change in plan.changes)
    assert '"${WEB_8000_PORT:-8000}:8000"' in base and '"${WEB_8000_PORT:-8000}:8000"' in override
    # The same service and container port from another host port is another port.
    assert '"${DB_5432_PORT:-5432}:5432"' in base and "${DB_5432_2_PORT:-5433}:5432" in override


def test_container_name_equals_the_old_name_unless_a_lease_sets_it(tmp_path: Path) -> None:
    top, files = case_dir("container-name.yml", tmp_path)
    plan = adopt.plan(files, top)
    text = plan.changes[0][3].decode()
    assert 'container_name: "${POSTGRES_CONTAINER_NAME:-app_postgres}"' in text
    assert 'container_name: "${MAILPIT_CONTAINER_NAME:-app-mailpit}"' in text
    assert "container_name: ${MINIO_CONTAINER:-app-minio}" in text  # already a variable
    assert container_names(model_of(text, {})) == ["app_postgres", "app-mailpit", "app-minio"]
    a = container_names(model_of(text, lease_env(plan, 20000, "shop-aaaaaaaa")))
    b = container_names(model_of(text, lease_env(plan, 20100, "shop-bbbbbbbb")))
    assert a[:2] == ["shop-aaaaaaaa-app_postgres", "shop-aaaaaaaa-app-mailpit"]
    assert not set(a[:2]) & set(b[:2])


def test_ports_given_by_variables_are_left_and_adopted_when_safe(tmp_path: Path) -> None:
    top, files = case_dir("parameterised.yml", tmp_path)
    plan = adopt.plan(files, top)
    sets = adopt.add_profile(plan)
    notes = adopt.report(plan, sets)
    env = dict(plan.env)
    # DEBUG_PORT, ADMIN_PORT and STATS_PORT appear only as host ports: the profile sets them.
    assert {"DEBUG_PORT", "ADMIN_PORT", "STATS_PORT"} <= set(env)
    # APP_PORT also feeds the container's environment: the user's to decide.
    assert "APP_PORT" not in env
    assert any("APP_PORT not set by the profile" in note for note in notes)
    new = plan.changes[0][3].decode()
    assert '- "${APP_4000_PORT:-4000}:4000"' in new
    assert '"${APP_PORT:-8000}:8000"' in new and 'SECRET: "pa$$word"' in new


# --- hypothesis: generated compose files ---------------------------------------

SERVICE = st.from_regex(r"[a-z][a-z0-9]{0,6}([-_][a-z0-9]{1,4})?", fullmatch=True)
PORT = st.integers(1024, 60000)
QUOTES = st.sampled_from(["", '"', "'"])
COMMENT = st.sampled_from(["", "  # note", " # a: b", "    #x"])


@st.composite
def port_entry(draw: st.DrawFn, indent: str) -> str:
    kind = draw(st.sampled_from(["short", "ip", "udp", "range", "long", "long-str", "only", "var"]))
    host, container = draw(PORT), draw(PORT)
    q = draw(QUOTES)
    comment = draw(COMMENT)
    if kind == "short":
        return f"{indent}- {q}{host}:{container}{q}{comment}"
    if kind == "ip":
        ip = draw(st.sampled_from(["127.0.0.1", "0.0.0.0", "[::1]"]))
        q = q or '"'  # `[` cannot start a plain scalar
        return f"{indent}- {q}{ip}:{host}:{container}{q}{comment}"
    if kind == "udp":
        return f"{indent}- {q}{host}:{container}/udp{q}{comment}"
    if kind == "range":
        width = draw(st.integers(0, 4))
        return f"{indent}- {q}{host}-{host + width}:{container}-{container + width}{q}{comment}"
    if kind in ("long", "long-str"):
        value = f'"{host}"' if kind == "long-str" else str(host)
        return f"{indent}- target: {container}{comment}\n{indent}  published: {value}"
    if kind == "only":
        return f"{indent}- {q}{container}{q}{comment}"
    var = draw(st.from_regex(r"[A-Z][A-Z0-9]{0,5}_PORT", fullmatch=True))
    return f'{indent}- "${{{var}:-{host}}}:{container}"{comment}'


@st.composite
def compose_text(draw: st.DrawFn) -> str:
    names = draw(st.lists(SERVICE, min_size=1, max_size=4, unique=True))
    indent = draw(st.sampled_from(["  ", "    "]))
    lines = [draw(st.sampled_from(["", "# stack\n", "version: '3'\n"])) + "services:"]
    for name in names:
        lines.append(f"{indent}{name}:{draw(COMMENT)}")
        lines.append(f"{indent * 2}image: example/{name}")
        if draw(st.booleans()):
            lines.append(f"{indent * 2}container_name: {draw(QUOTES) or ''}{name}_1")
        entries = draw(
            st.lists(port_entry(indent * 2 + draw(st.sampled_from(["", "  "]))), max_size=4)
        )
        if entries:
            lines.append(f"{indent * 2}ports:")
            lines += entries
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + newline


def fix_quotes(text: str) -> str:
    # container_name: 'x_1 drawn with one quote: close it.
    out = []
    for line in text.splitlines(True):
        body = line.rstrip("\r\n")
        if body.strip().startswith("container_name:") and body.count('"') + body.count("'") == 1:
            quote = '"' if '"' in body else "'"
            line = body + quote + line[len(body) :]
        out.append(line)
    return "".join(out)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=compose_text())
def test_generated_compose_files(text: str, tmp_path: Path) -> None:
    text = fix_quotes(text)
    top = tmp_path / "h"
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir()
    path = top / "compose.yaml"
    path.write_bytes(text.encode())
    plan = adopt.plan([path], top)
    check_plan(plan)
    if plan.changes:
        new = plan.changes[0][3]
        path.write_bytes(new)
        assert adopt.plan([path], top).changes == []  # idempotent
        # Every published port that was a plain number is now a variable.
        assert all(
            "$" in (host := parse_short(e).host) or not fixed_range(host)
            for e in _short_entries(new.decode())
        )


def _short_entries(text: str) -> list[str]:
    document = model_of_raw(text)
    out = []
    for body in document["services"].values():
        for entry in body.get("ports") or []:
            if isinstance(entry, str):
                out.append(entry)
    return out


def model_of_raw(text: str) -> Any:
    """The document with every scalar as its text, before interpolation."""

    def raw(node: Any) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return node.value
        if isinstance(node, yaml.SequenceNode):
            return [raw(item) for item in node.value]
        return {k.value: raw(v) for k, v in node.value}

    return raw(yaml.compose(text, Loader=yaml.SafeLoader))


# --- compose's interpolation rules ---------------------------------------------


@pytest.mark.parametrize(
    ("template", "env", "expected"),
    [
        ("$$", {}, "$"),
        ("a$$b", {"b": "x"}, "a$b"),
        ("${VAR}", {"VAR": "v"}, "v"),
        ("${VAR}", {}, ""),
        ("$VAR:80", {"VAR": "1"}, "1:80"),
        ("${VAR:-d}", {}, "d"),
        ("${VAR:-d}", {"VAR": ""}, "d"),
        ("${VAR-d}", {"VAR": ""}, ""),
        ("${VAR-d}", {}, "d"),
        ("${VAR:+r}", {"VAR": "x"}, "r"),
        ("${VAR:+r}", {"VAR": ""}, ""),
        ("${VAR+r}", {"VAR": ""}, "r"),
        ("${VAR:?e}", {"VAR": "x"}, "x"),
        ("${A:-${B:-1}}:80", {}, "1:80"),
        ("${A:-${B:-1}}:80", {"B": "2"}, "2:80"),
        ("${WEB_PORT:-3000}-${WEB_LAST_PORT:-3002}:3000-3002", {}, "3000-3002:3000-3002"),
    ],
)
def test_interpolation_follows_compose(template: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(template, env) == expected


@pytest.mark.parametrize("template", ["$5", "cost $", "${}", "${1A}", "${A:x}", "${A", "$-"])
def test_invalid_templates_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        interpolate(template, {}, required=False)


def test_required_variables_fail_only_when_asked() -> None:
    with pytest.raises(TemplateError, match="required variable X"):
        interpolate("${X:?set X}", {})
    with pytest.raises(TemplateError):
        interpolate("${X?set X}", {})
    assert interpolate("${X:?set X}", {}, required=False) == ""


# --- the command ---------------------------------------------------------------


def repo_with(tmp_path: Path, case: str) -> Path:
    top = tmp_path / "shop"
    top.mkdir()
    git("init", "-q", "-b", "main", cwd=top)
    source = DATA / case
    for path in sorted(source.iterdir()) if source.is_dir() else [source]:
        shutil.copy(path, top / (path.name if source.is_dir() else "docker-compose.yml"))
    return top


def snapshot(top: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(top.iterdir()) if p.is_file()
    }


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dry_run_prints_a_patch_and_changes_nothing(tmp_path: Path) -> None:
    top = repo_with(tmp_path, "container-name.yml")
    before = snapshot(top)
    result = run_cli("init", cwd=top, env=ENV)
    assert result.returncode == 0, result.stderr
    assert snapshot(top) == before
    assert result.stdout.startswith("--- a/docker-compose.yml\n+++ b/docker-compose.yml\n")
    assert "+++ b/portalloc.toml" in result.stdout
    assert "dry run: would change docker-compose.yml, portalloc.toml" in result.stderr
    # stdout is a patch git applies, giving exactly what --write gives.
    patch = tmp_path / "adopt.patch"
    patch.write_text(result.stdout)
    git("apply", patch, cwd=top)
    applied = {name: data for name, (data, _) in snapshot(top).items()}
    (top / "portalloc.toml").unlink()
    (top / "docker-compose.yml").write_bytes(before["docker-compose.yml"][0])
    assert run_cli("init", "--write", cwd=top, env=ENV).returncode == 0
    assert {name: data for name, (data, _) in snapshot(top).items()} == applied


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_write_then_two_worktrees_publish_disjoint_ports(tmp_path: Path) -> None:
    top = repo_with(tmp_path, "override")
    (top / "package.json").write_text(json.dumps({"scripts": {"dev": "vite --port 5173"}}))
    (top / ".env").write_text("PORT=8000\n")
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "wrote docker-compose.yml, docker-compose.override.yml, portalloc.toml" in result.stdout
    assert "note: package.json: scripts.dev: --port 5173 is a fixed port" in result.stderr
    assert (
        "note: .env:1: PORT=8000 is a fixed port "
        "(the compose files now publish it as $WEB_8000_PORT)" in result.stderr
    )
    after = snapshot(top)
    # A second run changes nothing, not even a modification time.
    again = run_cli("init", "--write", cwd=top, env=ENV)
    assert again.returncode == 0 and "nothing to change" in again.stderr
    assert snapshot(top) == after

    git("add", "-A", cwd=top)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "adopt", cwd=top)
    trees = []
    for name in ("feat-a", "feat-b"):
        tree = tmp_path / f"shop-{name}"
        git("worktree", "add", "-q", "-b", name, tree, cwd=top)
        out = run_cli("env", "--json", cwd=tree, env={**ENV, "PORT_ALLOC_BASE": "33000"})
        assert out.returncode == 0, out.stderr
        trees.append((tree, json.loads(out.stdout)))
    leases = {a["session_id"]: a for a in json.loads(run_cli("status", "--json").stdout)}
    ports = []
    for tree, variables in trees:
        allocation = leases[str(tree)]
        base = model_of((tree / "docker-compose.yml").read_text(), variables)
        override = model_of((tree / "docker-compose.override.yml").read_text(), variables)
        mine = {port for _, port, _ in published(base) + published(override)}
        assert all(allocation["block_start"] <= p <= allocation["block_end"] for p in mine)
        ports.append(mine)
    assert ports[0] and not ports[0] & ports[1]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("not-yaml.yml", "docker-compose.yml:5: not valid YAML"),
        ("not-compose.yml", "docker-compose.yml:1: not a compose file"),
        ("bad-template.yml", "docker-compose.yml:5: invalid interpolation in 'costs $5'"),
    ],
)
def test_bad_files_exit_2_naming_file_and_line(name: str, message: str, tmp_path: Path) -> None:
    top = repo_with(tmp_path, f"bad/{name}")
    shutil.copy(DATA / "ip-bound.yml", top / "compose.yaml")  # a good file beside it
    before = snapshot(top)
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 2
    assert result.stderr.startswith(f"portalloc: {message}"), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert snapshot(top) == before  # all or nothing: the good file is untouched too


def test_a_symlinked_compose_file_is_not_replaced(tmp_path: Path) -> None:
    top = repo_with(tmp_path, "ip-bound.yml")
    real = tmp_path / "elsewhere.yml"
    (top / "docker-compose.yml").rename(real)
    (top / "docker-compose.yml").symlink_to(real)
    before = real.read_bytes()
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 2
    assert (
        result.stderr == "portalloc: docker-compose.yml: is a symlink; name the file it points to\n"
    )
    dry = run_cli("init", cwd=top, env=ENV)  # the dry run says so too, not a patch
    assert dry.returncode == 2 and dry.stdout == ""
    assert real.read_bytes() == before and not (top / "portalloc.toml").exists()


def test_no_compose_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    result = run_cli("init", cwd=tmp_path, env=ENV)
    assert result.returncode == 2 and "no compose file at" in result.stderr


def test_pyproject_gets_the_profile_appended_byte_for_byte(tmp_path: Path) -> None:
    top = repo_with(tmp_path, "ip-bound.yml")
    original = '[project]\nname = "shop"\n\n[tool.ruff]\nline-length = 100\n'
    (top / "pyproject.toml").write_text(original)
    assert run_cli("init", "--write", cwd=top, env=ENV).returncode == 0
    text = (top / "pyproject.toml").read_text()
    assert text.startswith(original + "\n# Written by `portalloc init`")
    assert "[tool.portalloc.ports]\ncache = 0\n" in text
    assert not (top / "portalloc.toml").exists()
    out = run_cli("get", "--help", cwd=top, env=ENV)  # the CLI still starts
    assert out.returncode == 0
    env = run_cli("env", "--format", "dotenv", cwd=top, env={**ENV, "PORT_ALLOC_BASE": "34000"})
    assert env.returncode == 0, env.stderr
    assert "CACHE_PORT=34000" in env.stdout and "PROXY_443_PORT=34004" in env.stdout


def test_an_existing_profile_is_never_edited(tmp_path: Path) -> None:
    top = repo_with(tmp_path, "ip-bound.yml")
    (top / "portalloc.toml").write_text('[ports]\nweb = 0\n\n[env]\nWEB_PORT = "{web_port}"\n')
    before = snapshot(top)
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 2
    assert "already lists ports and variables" in result.stderr
    assert 'CACHE_PORT = "{cache_port}"' in result.stderr
    assert snapshot(top) == before
    # A project file with settings only gets the two tables appended.
    (top / "portalloc.toml").write_text("base = 36000\n")
    assert run_cli("init", "--write", cwd=top, env=ENV).returncode == 0
    assert (top / "portalloc.toml").read_text().startswith("base = 36000\n\n[ports]\ncache = 0\n")


def test_crlf_files_keep_their_line_endings(tmp_path: Path) -> None:
    top = tmp_path / "crlf"
    top.mkdir()
    (top / ".git").mkdir()
    text = "services:\r\n  web:\r\n    ports:\r\n      - 8080:80\r\n"
    (top / "compose.yaml").write_bytes(text.encode())
    assert run_cli("init", "--write", cwd=top, env=ENV).returncode == 0
    assert (top / "compose.yaml").read_bytes() == (
        b'services:\r\n  web:\r\n    ports:\r\n      - "${WEB_PORT:-8080}:80"\r\n'
    )


def test_a_stack_wider_than_a_block_raises_range(tmp_path: Path) -> None:
    top = tmp_path / "wide"
    top.mkdir()
    (top / ".git").mkdir()
    (top / "compose.yaml").write_text(
        'services:\n  rtp:\n    ports:\n      - "30000-30149:30000-30149/udp"\n      - "8080:80"\n'
    )
    assert run_cli("init", "--write", cwd=top, env=ENV).returncode == 0
    profile = (top / "portalloc.toml").read_text()
    assert "\nrange = 151\n" in profile
    env = run_cli("env", "--format", "dotenv", cwd=top, env={**ENV, "PORT_ALLOC_BASE": "37000"})
    assert env.returncode == 0, env.stderr
    assert "RTP_30000_UDP_LAST_PORT=37149" in env.stdout and "RTP_80_PORT=37150" in env.stdout


@pytest.mark.parametrize("case", CASES)
def test_docker_compose_config_agrees(
    case: str, tmp_path: Path, compose_env: dict[str, str]
) -> None:
    """Real Docker Compose v2 (tests/docker_env.py; `config` needs no daemon) reads
    every fixture, and reads each rewritten file set exactly as it read the original."""
    top, files = case_dir(case, tmp_path)
    plan = adopt.plan(files, top)
    clean = {k: v for k, v in os.environ.items() if not k.endswith(("_PORT", "_CONTAINER_NAME"))}
    env = {**clean, **compose_env, "MUST_BE_SET": "x"}
    env.pop("COMPOSE_PROJECT_NAME", None)

    changes = [change for change in plan.changes if change[0] in files]
    assert changes

    def config(texts: list[bytes]) -> str:
        for change, data in zip(changes, texts, strict=True):
            change[0].write_bytes(data)
        # No -f: compose finds the files itself (the base and its override).
        result = subprocess.run(
            ["docker", "compose", "config"], cwd=top, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{case}: {result.stderr}"
        return result.stdout

    old = [change[2] for change in changes]
    assert all(text is not None for text in old)
    assert config([change[3] for change in changes]) == config([t or b"" for t in old])


# --- what a hostile review found ---------------------------------------------------


def bare_repo(tmp_path: Path, compose: str, **files: str) -> Path:
    top = tmp_path / "bare"
    top.mkdir()
    (top / ".git").mkdir()
    (top / "compose.yaml").write_text(compose)
    for name, text in files.items():
        (top / name.replace("_", ".")).write_text(text)
    return top


def test_container_names_alone_give_a_profile_env_accepts(tmp_path: Path) -> None:
    top = bare_repo(tmp_path, "services:\n  web:\n    image: x\n    container_name: mydb\n")
    assert run_cli("init", "--write", cwd=top, env=ENV).returncode == 0
    assert "[ports]" not in (top / "portalloc.toml").read_text()
    out = run_cli("env", "--format", "dotenv", cwd=top, env={**ENV, "PORT_ALLOC_BASE": "38000"})
    assert out.returncode == 0, out.stderr
    assert "WEB_CONTAINER_NAME=" in out.stdout and out.stdout.count("-mydb") == 1
    again = run_cli("init", "--write", cwd=top, env=ENV)
    assert again.returncode == 0 and "nothing to change" in again.stderr


def test_a_variable_dotenv_sets_is_never_introduced(tmp_path: Path) -> None:
    compose = "services:\n  db:\n    image: postgres\n    ports: ['5432:5432']\n"
    top = bare_repo(tmp_path, compose, _env="DB_PORT=6543\n")
    plan = adopt.plan(adopt.find_compose_files(top), top)
    new = plan.changes[0][3].decode()
    assert "DB_PORT:-" not in new and "${DB_2_PORT:-5432}:5432" in new
    # compose reads .env when it interpolates: the meaning is kept with it too.
    assert model_of(new, {"DB_PORT": "6543"}) == model_of(compose, {"DB_PORT": "6543"})


def test_an_inline_tool_table_is_not_broken(tmp_path: Path) -> None:
    pyproject = "[project]\nname = 'x'\n[tool]\nportalloc = { compose_prefix = 'abc' }\n"
    top = bare_repo(
        tmp_path, "services:\n  web:\n    ports: ['8080:80']\n", pyproject_toml=pyproject
    )
    before = snapshot(top)
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 2, result.stderr
    assert "pyproject.toml: adding the profile would make it invalid TOML" in result.stderr
    assert snapshot(top) == before


def test_init_recognises_its_own_output(tmp_path: Path) -> None:
    compose = (
        "services:\n  web:\n    container_name: web\n    ports:\n"
        '      - "8000-8002:8000-8002"\n      - "6379:6379"\n'
    )
    top = bare_repo(tmp_path, compose)
    assert run_cli("init", "--write", cwd=top, env=ENV).returncode == 0
    first = (top / "portalloc.toml").read_text()
    # The profile is lost (never committed on this branch): init writes the same again.
    (top / "portalloc.toml").unlink()
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 0, result.stderr
    assert (top / "portalloc.toml").read_text() == first
    assert "not set by the profile" not in result.stderr


def test_references_to_a_renamed_container_are_reported(tmp_path: Path) -> None:
    compose = (
        "services:\n  vpn:\n    image: x\n    container_name: vpn\n"
        "  app:\n    image: y\n    network_mode: 'container:vpn'\n"
    )
    top = bare_repo(tmp_path, compose)
    result = run_cli("init", cwd=top, env=ENV)
    assert (
        "compose.yaml:7: container:vpn names a container that is now ${VPN_CONTAINER_NAME}; "
        "write service:<service> instead"
    ) in result.stderr


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ("08080:80", '"${WEB_PORT:-08080}:80"'),  # the default as written
        ("8080:8\\t0", "'${WEB_PORT:-8080}:8\\t0'"),  # a backslash must not become an escape
    ],
)
def test_odd_but_valid_ports_keep_their_meaning(port: str, expected: str, tmp_path: Path) -> None:
    compose = f"services:\n  web:\n    ports:\n      - {port}\n"
    top = bare_repo(tmp_path, compose)
    plan = adopt.plan(adopt.find_compose_files(top), top)
    assert f"      - {expected}\n" in plan.changes[0][3].decode()
    check_plan(plan)


def test_long_syntax_published_keeps_its_text(tmp_path: Path) -> None:
    top = bare_repo(
        tmp_path, "services:\n  web:\n    ports:\n      - {target: 80, published: 010}\n"
    )
    plan = adopt.plan(adopt.find_compose_files(top), top)
    assert 'published: "${WEB_PORT:-010}"' in plan.changes[0][3].decode()


def test_what_init_cannot_rewrite_gets_no_variable(tmp_path: Path) -> None:
    compose = (
        'services:\n  web:\n    ports:\n      - &p\n        "8080:80"\n'
        "      - target: 81\n        published: !!int 9090\n      - 7000:70\n"
    )
    top = bare_repo(tmp_path, compose)
    plan = adopt.plan(adopt.find_compose_files(top), top)
    notes = adopt.report(plan, adopt.add_profile(plan))
    assert [name for name, _ in plan.ports] == ["web"]  # the only port it rewrites
    assert any("'8080:80' is written with escapes or over several lines" in n for n in notes)
    assert any("'9090' carries a YAML tag; change it by hand" in n for n in notes)


def test_include_and_extends_are_reported(tmp_path: Path) -> None:
    compose = (
        "include:\n  - other.yaml\nservices:\n  web:\n    ports: ['8080:80']\n"
        "    extends: {file: base.yml, service: b}\n"
    )
    top = bare_repo(tmp_path, compose)
    result = run_cli("init", cwd=top, env=ENV)
    assert "compose.yaml:2: include: the included files are not rewritten" in result.stderr
    assert "compose.yaml:6: web: extends a service of another file" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("services:\n  web:\n    image: a\n    image: b\n", "compose.yaml:4: key 'image' twice"),
        ("services:\n  web:\n    ports: '80:80'\n", "compose.yaml:3: web: ports must be a list"),
        ("services:\n  web: " + "[" * 5000 + "]" * 5000 + "\n", "compose.yaml: nested too deeply"),
    ],
)
def test_more_bad_files(content: str, message: str, tmp_path: Path) -> None:
    top = bare_repo(tmp_path, content)
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 2
    assert result.stderr == f"portalloc: {message}\n"


def test_a_fifo_is_refused_not_read(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    os.mkfifo(tmp_path / "compose.yaml")
    result = run_cli("init", "compose.yaml", cwd=tmp_path, env=ENV, timeout=20)
    assert result.returncode == 2 and "compose.yaml: not a regular file" in result.stderr


def test_odd_package_json_and_env_files_do_not_crash(tmp_path: Path) -> None:
    top = bare_repo(
        tmp_path,
        "services:\n  web:\n    ports: ['8080:80']\n",
        package_json="[" * 100000 + "]" * 100000,
        _env="PORT" * 8000 + "\nWEB_PORT=3000\n",
    )
    result = run_cli("init", cwd=top, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "note: .env:2: WEB_PORT=3000 is a fixed port" in result.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_cr_only_file_gives_a_patch_git_applies(tmp_path: Path) -> None:
    top = tmp_path / "cr"
    top.mkdir()
    git("init", "-q", cwd=top)
    (top / "compose.yaml").write_bytes(b"services:\r  web:\r    ports:\r      - 8080:80\r")
    result = run_cli("init", cwd=top, env=ENV)
    (tmp_path / "p.patch").write_text(result.stdout)
    git("apply", tmp_path / "p.patch", cwd=top)
    assert (top / "compose.yaml").read_bytes() == (
        b'services:\r  web:\r    ports:\r      - "${WEB_PORT:-8080}:80"\r'
    )


def test_a_wide_stack_respects_the_base_the_project_sets(tmp_path: Path) -> None:
    top = bare_repo(
        tmp_path,
        "services:\n  rtp:\n    ports: ['30000-30999:30000-30999/udp']\n",
        portalloc_toml="base = 50000\n",
    )
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 0, result.stderr
    assert (
        (top / "portalloc.toml")
        .read_text()
        .startswith("base = 50000\n\nrange = 1000\nmax_sessions = 15\n")
    )
    env = run_cli("env", "--format", "dotenv", cwd=top, env=ENV)
    assert env.returncode == 0 and "RTP_LAST_PORT=50999" in env.stdout


@st.composite
def flow_port(draw: st.DrawFn) -> str:
    host, container = draw(PORT), draw(PORT)
    q = draw(st.sampled_from(['"', "'"]))  # `${` in a flow list is written quoted
    return draw(
        st.sampled_from(
            [
                f"{q}{host}:{container}{q}",
                f"{host}:{container}",
                f"{q}127.0.0.1:{host}:{container}/udp{q}",
                f"{{target: {container}, published: {host}}}",
                f"{container}",
            ]
        )
    )


@st.composite
def anchored_compose(draw: st.DrawFn) -> str:
    """Ports shared through anchors, merge keys in both spellings, flow lists."""
    base_ports = draw(st.lists(flow_port(), min_size=1, max_size=3))
    lines = ["x-base: &base", "  image: example/base", f"  ports: [{', '.join(base_ports)}]"]
    lines += ["x-list: &list", *(f"  - {p}" for p in draw(st.lists(flow_port(), max_size=2)))]
    if lines[-1] == "x-list: &list":
        lines[-1] = "x-list: &list []"
    lines.append("services:")
    for index, kind in enumerate(draw(st.lists(st.sampled_from(["merge", "old", "alias", "own"]),
                                               min_size=1, max_size=4))):  # fmt: skip
        lines.append(f"  s{index}:")
        if kind == "merge":
            lines.append("    <<: *base")
        elif kind == "old":
            lines += ["    << : *base", f"    ports: [{', '.join(draw(st.lists(flow_port())))}]"]
        elif kind == "alias":
            lines += ["    image: x", "    ports: *list"]
        else:
            own = draw(st.lists(flow_port(), max_size=3))
            lines += ["    image: x", "    ports:", *(f"      - {p}" for p in own)]
            if lines[-1] == "    ports:":
                lines[-1] = "    ports: []"
    return "\n".join(lines) + "\n"


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=anchored_compose())
def test_generated_anchors_merge_keys_and_flow_lists(text: str, tmp_path: Path) -> None:
    top = tmp_path / "a"
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir()
    path = top / "compose.yaml"
    path.write_text(text)
    plan = adopt.plan([path], top)
    check_plan(plan)
    for _path, _shown, _old, new in plan.changes:
        path.write_bytes(new)
        again = adopt.plan([path], top)
        assert again.changes == []
        # Anchors, aliases and merge keys are where they were.
        for token in ("&base", "&list", "<<: *base", "<< : *base", "*list"):
            assert text.count(token) == new.decode().count(token)


# --- what a second review found ---------------------------------------------------


@pytest.mark.parametrize(
    "port", ['"8080:80/é"', '"8080:\uff18\uff10"', "{target: 80, published: 8080, protocol: u-d}"]
)
def test_odd_ports_never_hang(port: str, tmp_path: Path) -> None:
    top = bare_repo(tmp_path, f'services:\n  web:\n    ports: [{port}, "8081:81"]\n')
    result = run_cli("init", cwd=top, env=ENV, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "${WEB_" in result.stdout


@pytest.mark.parametrize(
    "environment", ["[API_PORT]", "{API_PORT: }", "{API_PORT: null}", "[DB_PORT]"]
)
def test_variables_handed_to_containers_are_neither_adopted_nor_introduced(
    environment: str, tmp_path: Path
) -> None:
    compose = (
        'services:\n  api:\n    ports: ["${API_PORT:-8080}:8080"]\n'
        f'  db:\n    ports: ["5432:5432"]\n    environment: {environment}\n'
    )
    top = bare_repo(tmp_path, compose)
    plan = adopt.plan(adopt.find_compose_files(top), top)
    variables = dict(plan.env)
    assert ("API_PORT" in variables) == ("API_PORT" not in environment)
    if "DB_PORT" in environment:  # the container reads DB_PORT: init names it DB_2_PORT
        assert "DB_PORT" not in variables
        assert "${DB_2_PORT:-5432}:5432" in plan.changes[0][3].decode()


def test_the_container_side_of_a_mapping_keeps_its_variable(tmp_path: Path) -> None:
    top = bare_repo(tmp_path, 'services:\n  web:\n    ports: ["${PORT:-3000}:${PORT:-3000}"]\n')
    plan = adopt.plan(adopt.find_compose_files(top), top)
    assert "PORT" not in dict(plan.env)
    assert any("PORT not set by the profile" in n for n in adopt.report(plan, set()))


def test_a_dotenv_beside_a_named_file_counts(tmp_path: Path) -> None:
    top = bare_repo(tmp_path, "services: {}\n")
    (top / "sub").mkdir()
    (top / "sub" / "docker-compose.yml").write_text('services:\n  db:\n    ports: ["5432:5432"]\n')
    (top / "sub" / ".env").write_text("DB_PORT=7777\n")
    plan = adopt.plan([top / "sub" / "docker-compose.yml"], top)
    assert "${DB_2_PORT:-5432}" in plan.changes[0][3].decode()
    assert plan.changes[0][1] == "sub/docker-compose.yml"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("services: &s\n  web:\n    x: *s\n", "compose.yaml:1: an alias refers to its own anchor"),
        ("x: &f [*f]\nservices: {}\n", "compose.yaml:1: an alias refers to its own anchor"),
        ("services:\n  web: &w {<<: *w}\n", "compose.yaml:2: an alias refers to its own anchor"),
        (
            "".join(f"x{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 40)).replace(
                "*a0, *a0", "1, 2"
            )
            + "services: {}\n",
            "compose.yaml: aliases expand to too many values",
        ),
    ],
)
def test_recursive_and_exploding_aliases_exit_2(content: str, message: str, tmp_path: Path) -> None:
    top = bare_repo(tmp_path, content)
    result = run_cli("init", cwd=top, env=ENV, timeout=30)
    assert result.returncode == 2
    assert result.stderr == f"portalloc: {message}\n"


@pytest.mark.parametrize(
    "compose",
    [
        'services:\n  a:\n    ports: ["${A_PORT:-8000}-${B_PORT:-8002}:8000-8002"]\n'
        '  b:\n    ports: ["${A_PORT:-8000}:80"]\n',
        'services:\n  a:\n    ports: ["${X:-8080}:80"]\n    container_name: ${X:-foo}\n',
        "services:\n  a:\n    container_name: ${N:-alpha}\n  b:\n    container_name: ${N:-beta}\n",
        "services:\n  a:\n    container_name: ${COMPOSE_PROJECT_NAME:-myapp}\n    ports: ['1:1']\n",
    ],
)
def test_a_variable_with_two_meanings_is_never_adopted(compose: str, tmp_path: Path) -> None:
    top = bare_repo(tmp_path, compose)
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 0, result.stderr
    # Left to the user, or (COMPOSE_PROJECT_NAME) already the project's own per lease.
    assert "not set by the profile" in result.stderr or "COMPOSE_PROJECT_NAME:-" in compose
    env = run_cli("env", "--format", "dotenv", cwd=top, env={**ENV, "PORT_ALLOC_BASE": "39000"})
    assert env.returncode == 0, env.stderr


def test_a_lost_profile_comes_back_for_single_port_ranges(tmp_path: Path) -> None:
    top = bare_repo(tmp_path, 'services:\n  web:\n    ports: ["8000-8000:80", "8000:80/udp"]\n')
    assert run_cli("init", "--write", cwd=top, env=ENV).returncode == 0
    first = (top / "portalloc.toml").read_text()
    (top / "portalloc.toml").unlink()
    assert run_cli("init", "--write", cwd=top, env=ENV).returncode == 0
    assert (top / "portalloc.toml").read_text() == first


def test_a_range_the_project_file_sets_too_small_is_named(tmp_path: Path) -> None:
    ports = ", ".join(f'"{8000 + i}:{80 + i}"' for i in range(5))
    top = bare_repo(
        tmp_path, f"services:\n  web:\n    ports: [{ports}]\n", portalloc_toml="range = 4\n"
    )
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 2
    assert "portalloc.toml: set range = 5 or more" in result.stderr


def test_files_named_twice_outside_or_oddly(tmp_path: Path) -> None:
    top = bare_repo(tmp_path, 'services:\n  web:\n    ports: ["8080:80"]\n')
    twice = run_cli("init", "compose.yaml", "./compose.yaml", cwd=top, env=ENV)
    assert twice.returncode == 0 and twice.stdout.count("+++ b/compose.yaml") == 1
    outside = tmp_path / "other.yml"
    outside.write_text('services:\n  web:\n    ports: ["8080:80"]\n')
    result = run_cli("init", str(outside), cwd=top, env=ENV)
    assert result.returncode == 2 and "is outside the repository top" in result.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_an_existing_lease_is_named_after_write(tmp_path: Path) -> None:
    top = repo_with(tmp_path, "ip-bound.yml")
    assert run_cli("env", cwd=top, env=ENV).returncode == 0  # e.g. the git hook made it
    result = run_cli("init", "--write", cwd=top, env=ENV)
    assert result.returncode == 0
    assert f"note: the lease of {top} was made with the old profile" in result.stderr
    assert run_cli("release", str(top), cwd=top, env=ENV).returncode == 0
    env = run_cli("env", "--format", "dotenv", cwd=top, env=ENV)
    assert "CACHE_PORT=" in env.stdout

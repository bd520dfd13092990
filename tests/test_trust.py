"""Hostile input never executes: names, bounds, ledger content, written files and HTTP.

Every source (argument, environment, portalloc.toml, pyproject.toml, ledger file, HTTP
body, MCP argument) against every output (sh under real bash/zsh/dash/ksh, fish, dotenv,
JSON): what is accepted round-trips and stays inert; what is not is one line, exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portalloc import PortAllocatorConfig, PortAllocatorService
from portalloc.errors import InvalidSessionId
from portalloc.pytest_plugin import PortallocPorts
from portalloc.render import render_sh
from portalloc.rules import validate_session_id
from tests.helpers import FakeClock, run_cli, trust
from tests.test_http import API_KEY, start_server, stop_server

MARK = Path("/tmp/portalloc-trust-marker")
SH_SHELLS = [name for name in ("bash", "zsh", "dash", "ksh") if shutil.which(name)]


@pytest.fixture(autouse=True)
def no_marker() -> Iterator[None]:
    MARK.unlink(missing_ok=True)
    yield
    assert not MARK.exists(), "something executed hostile input"


def one_line_exit_2(result: Any) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def eval_in(shell: str, script: str, variable: str) -> str:
    """Eval SCRIPT in SHELL and return VARIABLE's value exactly (NUL-terminated)."""
    out = subprocess.run(
        [shell, "-c", f'eval "$1"; printf "%s\\0" "${variable}"', shell, script],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return out.stdout.decode().removesuffix("\0")


# --- names: project files --------------------------------------------------------------


@pytest.mark.parametrize(
    "toml",
    [
        '[env]\n"NAME\\n" = "{api_port}"\n',  # trailing newline: ^...$ with .match let it through
        '[env]\n"A;touch /tmp/portalloc-trust-marker;B" = "1"\n',
        '[env]\nNOT_A_PORT = ":!touch /tmp/portalloc-trust-marker"\n',  # no field: refused
        '[ports]\n"web\\n" = 0\n',
        'compose_prefix = "shop\\n"\n',
        'compose_prefix = "Shop"\n',
        "ttl_minutes = 525601\n",
        "ttl_minutes = 99999999999999999999\n",
    ],
)
def test_project_file_names_and_bounds_are_refused(tmp_path: Path, toml: str) -> None:
    (tmp_path / "portalloc.toml").write_text(toml)
    result = run_cli("env", "s", cwd=tmp_path)
    one_line_exit_2(result)
    assert "portalloc.toml" in result.stderr
    assert not (tmp_path / "state" / "leases.json").exists()


@pytest.mark.parametrize(
    "variable",
    ["PATH", "LD_PRELOAD", "PROMPT_COMMAND", "BASH_ENV", "ENV", "IFS", "PS1", "path",
     "DYLD_INSERT_LIBRARIES", "PYTHONSTARTUP", "NODE_OPTIONS", "PERL5OPT", "RUBYOPT",
     "GIT_SSH_COMMAND", "ZDOTDIR", "HOME", "SHELL", "CDPATH", "SHELLOPTS",
     # found by a hostile review: each runs a command in some shell or tool
     "VIMINIT", "EXINIT", "PROMPT2", "PROMPT4", "SPROMPT", "NULLCMD", "READNULLCMD",
     "OPENSSL_CONF", "GLIBC_TUNABLES", "LUA_INIT", "KUBECONFIG", "AWS_CONFIG_FILE",
     "GOFLAGS", "RUSTC_WRAPPER", "CLASSPATH", "PIP_INDEX_URL", "http_proxy",
     "NODE_TLS_REJECT_UNAUTHORIZED", "SSLKEYLOGFILE", "FCEDIT", "PWD", "HISTSIZE",
     "COMPOSE_FILE", "CC", "MAKEFLAGS"],
)  # fmt: skip
def test_project_file_may_not_set_interpreter_variables(tmp_path: Path, variable: str) -> None:
    project = tmp_path / "pyproject.toml"
    project.write_text(f'[tool.portalloc.env]\n{variable} = "/tmp/evil:{{api_port}}"\n')
    # Untrusted, the entry waits: nothing of it is printed, one line says so.
    result = run_cli("env", "s", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}
    assert "1 env entry waits until you trust this file" in result.stderr
    # Trusting it is refused by the second wall: the name is on the list.
    refused = run_cli("trust", str(project), cwd=tmp_path)
    one_line_exit_2(refused)
    assert f"tool.portalloc.env.{variable}" in refused.stderr and "may not set" in refused.stderr
    if variable in ("PATH", "VIMINIT"):
        # ... and `run` never hands it to a child either.
        child = run_cli("run", "s", "--", "env", cwd=tmp_path)
        assert child.returncode == 0 and "/tmp/evil" not in child.stdout


def test_pyproject_whose_tool_is_not_a_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('tool = "tool.portalloc"\n')
    one_line_exit_2(run_cli("env", "s", cwd=tmp_path))


# --- bounds: arguments and environment ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["allocate", "s", "--ttl", "525601"], {}),
        (["env", "s", "--ttl", "9" * 30], {}),
        (["allocate", "s", "--pid", str(2**63)], {}),
        (["env", "s", "--pid", "99999999"], {}),
        (["env", "s"], {"PORT_ALLOC_TTL_MINUTES": "525601"}),
        (["env", "s"], {"PORT_ALLOC_TTL_MINUTES": "1" + "0" * 40}),
        (["env", "s"], {"PORTALLOC_STATE_DIR": "~no-such-user-xyz/state"}),
    ],
)
def test_out_of_range_input_is_one_line_exit_2(args: list[str], env: dict[str, str]) -> None:
    one_line_exit_2(run_cli(*args, env=env))


def test_a_year_of_ttl_is_fine() -> None:
    assert run_cli("allocate", "s", "--ttl", "525600").returncode == 0


def test_no_arguments_prints_help_without_an_empty_error_line() -> None:
    result = run_cli()
    assert "Usage" in result.stdout
    assert result.stderr == ""


# --- zsh's =word and friends ---------------------------------------------------------------


@pytest.mark.parametrize("shell", SH_SHELLS)
@pytest.mark.parametrize(
    "value", ["=ls", "=missing-command-xyz", "a:=ls", "~", "~root", "a:~root", "=", "x=y"]
)
def test_sh_values_never_expand(shell: str, value: str) -> None:
    assert eval_in(shell, render_sh({"V": value}), "V") == value


def test_session_id_equals_word_through_a_template_in_zsh(tmp_path: Path) -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed")
    (tmp_path / "portalloc.toml").write_text('[ports]\napi = 0\n[env]\nSID = "{session_id}"\n')
    trust(tmp_path / "portalloc.toml")
    script = run_cli("env", "=ls", cwd=tmp_path).stdout
    assert eval_in("zsh", script, "SID") == "=ls"


# --- ledger content ----------------------------------------------------------------------


def good_lease(session_id: str, start: int) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "start": start,
        "span": 100,
        "ports": {"api": start},
        "env": {"API_PORT": str(start)},
        "compose_project_name": "ac-12345678",
        "created_at": "2026-11-22T10:00:00Z",
        "expires_at": "2100-01-01T00:00:00Z",
        "ttl_minutes": 120,
        "owner": None,
        "worktree": None,
        "guests": [],
    }


def write_ledger(state_dir: Path, *leases: dict[str, Any]) -> None:
    state_dir.mkdir(exist_ok=True)
    document = {"version": 2, "leases": list(leases), "homes": {}, "files": {}}
    (state_dir / "leases.json").write_text(json.dumps(document))


HOSTILE_LEASES: list[dict[str, Any]] = [
    {"env": {f"X=1; touch {MARK}; Y": "1"}},
    {"env": {"API_PORT\n": "1"}},
    {"env": {"PROMPT_COMMAND": f"touch {MARK}"}},
    {"env": {"LD_PRELOAD": "/tmp/evil.so"}},
    {"env": {"API_PORT": "1\x00"}},
    {"ports": {"api\n": 20000}},
    {"compose_project_name": "ac-x\n"},
    {"session_id": "bad\nid"},
    {"expires_at": "9999-12-31T23:59:59-01:00"},  # overflows when brought to UTC
    {"owner": {"pid": 2**64, "started": None}},
    {"guests": [{"pid": -1, "started": None}]},
    {"ttl_minutes": 10**30},
    {"worktree": "/tmp/a\x00b"},
    # found by a hostile review
    {"env": {"VIMINIT": ":!touch /tmp/portalloc-trust-marker"}},
    {"env": {"API_PORT": "\udc80"}},  # a lone surrogate: no UTF-8 can carry it
    {"compose_project_name": "ac-\udc80"},
    {"start": 70000},
    {"ports": {"api": 30000}},  # outside its block
    {"start": 20050, "ports": {"api": 20050}},  # overlaps "good"
    {"session_id": "good"},  # the same session twice
]


@pytest.mark.parametrize("hostile", HOSTILE_LEASES, ids=lambda h: next(iter(h)))
def test_hostile_ledger_lease_is_dropped_copied_aside_and_the_rest_carry_on(
    state_dir: Path, hostile: dict[str, Any]
) -> None:
    write_ledger(state_dir, good_lease("good", 20000), {**good_lease("victim", 20100), **hostile})
    env = {"PORT_ALLOC_BASE": "20000"}
    result = run_cli("env", "good", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "export API_PORT=20000\n"
    assert "unusable lease" in result.stderr and "Traceback" not in result.stderr
    for shell in SH_SHELLS:
        eval_in(shell, result.stdout, "API_PORT")
    copies = list(state_dir.glob("leases.json.corrupt-*"))
    assert len(copies) == 1
    # The file is written back without it: the next command says nothing.
    again = run_cli("status", "--json", env=env)
    assert [a["session_id"] for a in json.loads(again.stdout)] == ["good"]
    assert again.stderr == ""


def test_mcp_never_hands_out_a_hostile_ledger_lease(state_dir: Path, tmp_path: Path) -> None:
    from mcp.client.session import ClientSession

    from tests.test_mcp import run_session, structured

    hostile = {**good_lease("victim", 20100), "env": {f"X=1; touch {MARK}; Y": "1"}}
    write_ledger(state_dir, good_lease("good", 20000), hostile)
    errlog = tmp_path / "mcp.log"

    async def body(session: ClientSession) -> None:
        data = structured(await session.call_tool("allocate_ports", {"session_id": "good"}))
        assert data["env_snippet"] == "export API_PORT=20000\n"
        listed = structured(await session.call_tool("ports_status", {}))["result"]
        assert [lease["session_id"] for lease in listed] == ["good"]

    run_session(state_dir, errlog, body, PORT_ALLOC_BASE="20000", PORTALLOC_DEBUG="1")
    log = errlog.read_text()
    assert "unusable lease" in log and "Traceback" not in log


def test_an_unusable_lease_is_copied_aside_once_even_when_the_operation_fails(
    state_dir: Path,
) -> None:
    write_ledger(
        state_dir, good_lease("full", 20000), {**good_lease("bad", 20100), "ttl_minutes": 0}
    )
    env = {"PORT_ALLOC_BASE": "20000", "PORT_ALLOC_MAX_SESSIONS": "1"}
    for index in range(3):
        assert run_cli("allocate", f"new{index}", env=env).returncode == 3
    assert len(list(state_dir.glob("leases.json.corrupt-*"))) == 1


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000 + b"]" * 100_000, b'{"version": 2, "leases": ' + b"[" * 50_000],
)
def test_unusable_ledger_is_moved_aside_not_a_traceback(state_dir: Path, content: bytes) -> None:
    state_dir.mkdir()
    (state_dir / "leases.json").write_bytes(content)
    result = run_cli("status", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == []
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr
    assert len(list(state_dir.glob("leases.json.corrupt-*"))) == 1


ledger_text = st.text(max_size=40)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(session_id=ledger_text, name=ledger_text, value=ledger_text, compose=ledger_text)
def test_arbitrary_ledger_strings_are_used_only_when_safe(
    state_dir: Path, session_id: str, name: str, value: str, compose: str
) -> None:
    lease = {
        **good_lease(session_id, 20000),
        "env": {name: value},
        "compose_project_name": compose,
    }
    write_ledger(state_dir, lease)
    for copy in state_dir.glob("leases.json.corrupt-*"):
        copy.unlink()
    svc = PortAllocatorService(
        PortAllocatorConfig(state_dir=state_dir), clock=FakeClock(), port_is_free=lambda _p: True
    )
    leases = svc.status()
    if leases:
        (allocation,) = leases
        assert allocation.session_id == session_id
        for shell in SH_SHELLS[:1]:
            assert eval_in(shell, render_sh(allocation.env), name) == value


# --- session ids, property-based, through real shells -----------------------------------

session_ids = st.text(min_size=1, max_size=30).filter(
    lambda text: _valid(text) and not text.startswith("-")
)


def _valid(text: str) -> bool:
    try:
        validate_session_id(text)
    except InvalidSessionId:
        return False
    return True


@pytest.fixture
def echo_profile(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "portalloc.toml").write_text(
        "max_sessions = 10\n[ports]\napi = 0\n"
        '[env]\nSID = "{session_id}"\nLIT = "=x:=y ~{session_id}"\n'
    )
    trust(project / "portalloc.toml")
    return project


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(session_id=session_ids)
def test_arbitrary_session_ids_round_trip_in_every_sh(echo_profile: Path, session_id: str) -> None:
    result = run_cli(
        "env", "--", session_id, cwd=echo_profile, env={"PORTALLOC_SKIP_PORT_CHECK": "1"}
    )
    assert result.returncode == 0, result.stderr
    for shell in SH_SHELLS:
        assert eval_in(shell, result.stdout, "SID") == session_id
        assert eval_in(shell, result.stdout, "LIT") == f"=x:=y ~{session_id}"
    run_cli("release", "--", session_id, cwd=echo_profile)


# --- files portalloc writes ----------------------------------------------------------------


def test_write_refuses_symlinks_devices_and_the_ledger(state_dir: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    link = tmp_path / "link.json"
    link.symlink_to(precious)
    run_cli("allocate", "s")
    for target in (
        link,
        Path("/dev/null"),
        state_dir / "leases.json",
        state_dir / "leases.json.lock",
    ):
        before = target.read_bytes() if target.is_file() else None
        result = run_cli("env", "s", "--write", str(target))
        one_line_exit_2(result)
        if before is not None:
            assert target.read_bytes() == before
    assert precious.read_text() == "keep me" and link.is_symlink()
    assert [a["session_id"] for a in json.loads(run_cli("status", "--json").stdout)] == ["s"]


# --- shared state dir: another user's worktree ------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second Unix user")
def test_another_users_uninspectable_worktree_locks_nobody_out(tmp_path: Path) -> None:
    import pwd

    try:
        other = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to act as")
    shared = Path(tempfile_dir())
    state = shared / "state"
    state.mkdir(mode=0o2777)
    state.chmod(0o2777)
    private = shared / "root-home"
    private.mkdir(mode=0o700)
    tree = private / "worktree"
    tree.mkdir()
    svc = PortAllocatorService(PortAllocatorConfig(state_dir=state, base=20400))
    svc.allocate(str(tree), worktree=tree)
    (state / "leases.json").chmod(0o666)
    (state / "leases.json.lock").chmod(0o666)
    # A real second user, in a forked child that drops root: everything it needs is
    # imported already, since it may not read this interpreter's files.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.setgid(other.pw_gid)
            os.setuid(other.pw_uid)
            theirs = PortAllocatorService(PortAllocatorConfig(state_dir=state, base=20400))
            listed = [a.session_id for a in theirs.status()]
            theirs.allocate("theirs")
            os.write(write, json.dumps(listed).encode())
            code = 0
        except BaseException as exc:
            os.write(write, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    report = os.read(read, 65536).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert json.loads(report) == [str(tree)]  # seen, not reclaimed as gone
    assert {a.session_id for a in svc.status()} == {str(tree), "theirs"}
    shutil.rmtree(shared)


def tempfile_dir() -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix="portalloc-shared-")
    Path(path).chmod(0o755)
    return path


# --- HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trust_server(
    portalloc_ports: PortallocPorts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    # An unnamed port of the plugin's block (the HTTP tests use all four named ones),
    # the first one free: a server another test left in TIME_WAIT or still closing
    # must not fail the whole module.
    from portalloc.probe import port_is_free

    first = portalloc_ports.port("db") + 10
    port = next((p for p in range(first, first + 20) if port_is_free(p)), first)
    running = start_server(port, tmp_path_factory.mktemp("trust-http"))
    yield running
    stop_server(running)


def _peak_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.005)


def test_http_bodies_are_limited_before_buffering(trust_server: Any) -> None:
    url = trust_server.url
    baseline = psutil.Process(trust_server.process.pid).memory_info().rss
    stop, peak = threading.Event(), [baseline]
    watcher = threading.Thread(target=_peak_rss, args=(trust_server.process.pid, stop, peak))
    watcher.start()
    chunk = b"x" * (1 << 20)

    def stream(megabytes: int) -> Iterator[bytes]:
        for _ in range(megabytes):
            yield chunk

    results: list[int] = []

    def post(headers: dict[str, str]) -> None:
        try:
            response = httpx.post(
                f"{url}/ports/allocate", content=stream(64), headers=headers, timeout=60
            )
            results.append(response.status_code)
        except httpx.TransportError:
            results.append(0)  # the server closed the connection on the oversized body

    try:
        threads = [
            threading.Thread(target=post, args=(h,))
            for h in ({}, {}, {"X-API-Key": API_KEY}, {"X-API-Key": API_KEY})
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        stop.set()
        watcher.join()
    assert sorted(results)[:2] != [500, 500]
    assert all(code in (0, 401, 413) for code in results), results
    # 4 x 64 MiB sent; the server never held more than a few MiB of it.
    assert peak[0] - baseline < 32 * (1 << 20), (baseline, peak[0])

    sized = httpx.post(
        f"{url}/ports/allocate",
        content=b"{" + b" " * 70_000 + b"}",
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    assert sized.status_code == 413
    assert sized.json()["success"] is False and sized.json()["error"] == "body_too_large"


def test_http_key_is_checked_before_the_body(trust_server: Any) -> None:
    bad_utf8 = httpx.post(
        f"{trust_server.url}/ports/allocate",
        content=b'{"session_id": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    assert bad_utf8.status_code == 401
    assert bad_utf8.json()["error"] == "unauthorized"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("GET", "/ports/allocate", 405), ("DELETE", "/ports/status", 405),
     ("GET", "/docs", 404), ("GET", "/redoc", 404)],
)  # fmt: skip
def test_http_errors_use_the_documented_shape(
    trust_server: Any, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, f"{trust_server.url}{path}")
    assert response.status_code == status
    body = response.json()
    assert body["success"] is False and set(body) >= {"error", "message"}


def test_http_bad_json_is_an_error_in_shape(trust_server: Any) -> None:
    response = httpx.post(
        f"{trust_server.url}/ports/allocate",
        content=b"{not json",
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422)
    assert response.json()["success"] is False


def test_openapi_states_the_session_id_rule(trust_server: Any) -> None:
    schema = httpx.get(f"{trust_server.url}/openapi.json").json()
    rule = schema["components"]["schemas"]["SessionRequest"]["properties"]["session_id"]
    assert (rule["minLength"], rule["maxLength"]) == (1, 4096)
    import re

    pattern = re.compile(rule["pattern"])
    assert pattern.search("/home/me/wt") and pattern.search(" x ")
    for bad in ("a\nb", "tab\t", "\x1b[31m", "\x85", "   "):
        assert not pattern.search(bad)
    page = httpx.get(f"{trust_server.url}/openapi.json").text
    assert "cdn" not in page.lower()


# --- the last-resort guard ------------------------------------------------------------------


def test_unexpected_error_is_one_line_naming_the_traceback_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from portalloc.adapters import cli

    monkeypatch.delenv("PORTALLOC_DEBUG")

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(PortAllocatorService, "status", broken)
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (RuntimeError)" in err
    path = Path(err.rsplit("traceback written to ", 1)[1].strip())
    assert "RuntimeError: a bug" in path.read_text()
    path.unlink()


def test_unexpected_http_error_is_a_500_in_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from portalloc.adapters.http import create_app

    monkeypatch.delenv("PORTALLOC_DEBUG")

    def broken() -> PortAllocatorService:
        raise RuntimeError("a bug")

    with TestClient(create_app(broken, api_key="k")) as client:
        response = client.get("/ports/status")
    assert response.status_code == 500
    body = response.json()
    assert (body["success"], body["error"]) == (False, "internal_error")
    Path(body["message"].rsplit("traceback written to ", 1)[1]).unlink()


def test_unexpected_mcp_error_is_a_tool_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    from portalloc.adapters import mcp

    monkeypatch.delenv("PORTALLOC_DEBUG")

    def broken() -> PortAllocatorService:
        raise RuntimeError("a bug")

    monkeypatch.setattr(mcp, "_service", broken)
    with pytest.raises(ToolError, match=r"internal error \(RuntimeError\)") as caught:
        mcp.release_ports("s")
    Path(str(caught.value).rsplit("traceback written to ", 1)[1]).unlink()

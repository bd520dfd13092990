"""`portalloc serve` end to end: a real uvicorn process on a loopback port portalloc leased."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portalloc.adapters.http import MAX_BODY_BYTES, AllocateResponse, ReleaseResponse
from portalloc.pytest_plugin import PortallocPorts
from tests.conftest import ENV_VARS
from tests.helpers import run_cli

API_KEY = "test-key-0123456789"
X_KEY = {"X-API-Key": API_KEY}
BEARER = {"Authorization": f"Bearer {API_KEY}"}
STARTUP_SECONDS = 30


@dataclass
class Server:
    url: str
    env: dict[str, str]  # what a CLI process needs to share the server's ledger and settings
    process: subprocess.Popen[bytes]
    stderr: Path

    def cli(self, *args: str) -> Any:
        """Run the CLI against the server's ledger and return its parsed JSON output."""
        result = run_cli(*args, "--json", env=self.env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def clean_environ(tmp: Path) -> dict[str, str]:
    """This process's environment without any portalloc settings the user may have set."""
    env = {key: value for key, value in os.environ.items() if key not in ENV_VARS}
    env["XDG_STATE_HOME"] = str(tmp / "xdg-state-must-stay-unused")
    return env


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("http-server")


def start_server(port: int, directory: Path, **settings: str) -> Server:
    state = directory / "state"
    env = {"PORTALLOC_STATE_DIR": str(state), **settings}
    stderr = directory / "server.stderr"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "portalloc", "serve", "--port", str(port)],
            env={**clean_environ(directory), **env, "PORTALLOC_API_KEY": API_KEY},
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    server = Server(f"http://127.0.0.1:{port}", env, process, stderr)
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: {stderr.read_text()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise AssertionError(f"server not up after {STARTUP_SECONDS}s: {stderr.read_text()}")
        time.sleep(0.05)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(portalloc_ports: PortallocPorts, server_dir: Path) -> Iterator[Server]:
    """One server for the module; room for the concurrency test's 16 sessions and more."""
    running = start_server(portalloc_ports.port("api"), server_dir, PORT_ALLOC_MAX_SESSIONS="100")
    yield running
    stop_server(running)
    assert "Traceback" not in running.stderr.read_text()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def leased(server: Server) -> dict[str, dict[str, Any]]:
    return {lease["session_id"]: lease for lease in server.cli("status")}


def test_allocate_and_release_with_either_header(client: httpx.Client, server: Server) -> None:
    for name, headers in (("x-api-key", X_KEY), ("bearer", BEARER)):
        session_id = f"/srv/wt {name} $HOME `id` 'ü'"
        response = client.post("/ports/allocate", json={"session_id": session_id}, headers=headers)
        assert response.status_code == 200, response.text
        body = AllocateResponse.model_validate(response.json())
        allocation = response.json()["allocation"]
        assert body.allocation.session_id == session_id
        assert allocation["rest_port"] == allocation["db_port"] + 1
        assert f"export API_PORT={allocation['api_port']}\n" in body.env_snippet

        again = client.post("/ports/allocate", json={"session_id": session_id}, headers=headers)
        assert again.json()["allocation"]["api_port"] == allocation["api_port"]

        released = client.post("/ports/release", json={"session_id": session_id}, headers=headers)
        assert released.status_code == 200
        assert ReleaseResponse.model_validate(released.json()).success is True
        assert released.json() == {"success": True}
        assert session_id not in leased(server)


def test_bearer_scheme_is_case_insensitive(client: httpx.Client) -> None:
    headers = {"Authorization": f"bearer {API_KEY}"}
    response = client.post("/ports/release", json={"session_id": "never-held"}, headers=headers)
    assert response.status_code == 200
    assert response.json() == {"success": True}


WRONG_CREDENTIALS: list[dict[str, str]] = [
    {},
    {"X-API-Key": ""},
    {"X-API-Key": "wrong"},
    {"X-API-Key": API_KEY + "x"},
    {"X-API-Key": API_KEY[:-1]},
    {"X-API-Key": API_KEY.upper()},
    {"Authorization": API_KEY},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {API_KEY}"},
    {"Authorization": f"Token {API_KEY}"},
    {"X-Api-Token": API_KEY},
]


@pytest.mark.parametrize("path", ["/ports/allocate", "/ports/release"])
def test_missing_or_wrong_key_is_401(client: httpx.Client, server: Server, path: str) -> None:
    for headers in WRONG_CREDENTIALS:
        response = client.post(path, json={"session_id": "intruder"}, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
        # Unauthenticated garbage is refused as unauthenticated, not described.
        garbage = client.post(path, content=b"{oops", headers=headers)
        assert garbage.status_code == 401
    assert "intruder" not in leased(server)


INVALID_BODIES: list[tuple[Any, str]] = [
    ({}, "invalid_session_id"),
    ({"session_id": ""}, "invalid_session_id"),
    ({"session_id": "   "}, "invalid_session_id"),
    ({"session_id": 42}, "invalid_session_id"),
    ({"session_id": None}, "invalid_session_id"),
    ({"session_id": ["a"]}, "invalid_session_id"),
    ({"session_id": "a\nb"}, "invalid_session_id"),
    ({"session_id": "a\x00b"}, "invalid_session_id"),
    ({"session_id": "\x1b[31mred"}, "invalid_session_id"),
    ({"session_id": "tab\there"}, "invalid_session_id"),
    ({"session_id": "x" * 4097}, "invalid_session_id"),
    ({"session": "a"}, "invalid_session_id"),
    (["session_id", "a"], "invalid_request"),
    ("a", "invalid_request"),
    (1.5, "invalid_request"),
]


@pytest.mark.parametrize("path", ["/ports/allocate", "/ports/release"])
def test_missing_empty_or_invalid_session_id_is_422(
    client: httpx.Client, server: Server, path: str
) -> None:
    before = leased(server)
    for body, code in INVALID_BODIES:
        response = client.post(path, json=body, headers=X_KEY)
        assert response.status_code == 422, (body, response.text)
        data = response.json()
        assert data["success"] is False
        assert data["error"] == code, body
        assert data["message"]
    # JSON as Python reads it (NaN, a lone surrogate escape), with no usable session_id;
    # `null` (httpx sends no body at all for json=None: that is the 400 below).
    for raw, code in (
        (b'{"session_id": NaN}', "invalid_session_id"),
        (b'{"session_id": "\\ud800"}', "invalid_session_id"),
        (b"null", "invalid_request"),
    ):
        response = client.post(
            path, content=raw, headers={**X_KEY, "Content-Type": "application/json"}
        )
        assert response.status_code == 422, (raw, response.text)
        assert response.json()["error"] == code
    assert leased(server) == before


NOT_JSON: list[tuple[bytes, str | None, str]] = [
    (b"", "application/json", "the body is empty"),
    (b"{oops", "application/json", "the body is not JSON (Expecting property name"),
    (b'{"session_id": "a",}', "application/json", "the body is not JSON"),
    (b'{"session_id": "\xff"}', "application/json", "the body is not UTF-8 (byte 16)"),
    (b"\x80", "application/json; charset=utf-8", "the body is not UTF-8 (byte 0)"),
    (b"[" * 30_000 + b"]" * 30_000, "application/json", "nested too deeply"),
    (b'{"session_id": "a"}', None, "as Content-Type: application/json (no Content-Type)"),
    (b"session_id=a", "application/x-www-form-urlencoded", "(not application/x-www-form-"),
    (b'{"session_id": "a"}', "text/plain", "(not text/plain)"),
]


@pytest.mark.parametrize("path", ["/ports/allocate", "/ports/release"])
def test_a_body_that_is_not_json_is_400(client: httpx.Client, server: Server, path: str) -> None:
    """One status for "not JSON", whatever FastAPI would have said (422 for a syntax
    error, 400 for bytes that are not UTF-8); JSON of the wrong shape stays 422."""
    before = leased(server)
    for raw, content_type, message in NOT_JSON:
        headers = {**X_KEY, **({"Content-Type": content_type} if content_type else {})}
        response = client.post(path, content=raw, headers=headers)
        assert response.status_code == 400, (raw[:40], response.text)
        data = response.json()
        assert data["success"] is False and data["error"] == "invalid_json"
        assert message in data["message"], data
    assert leased(server) == before


@pytest.mark.parametrize("path", ["/ports/allocate", "/ports/release"])
def test_two_content_types_that_differ_are_400(
    client: httpx.Client, server: Server, path: str
) -> None:
    """Starlette reads the first Content-Type, the guard read the last: whichever is
    JSON, two that differ are no type at all."""
    before = leased(server)
    body = b'{"session_id": "two-types"}'
    for types in (("text/plain", "application/json"), ("application/json", "text/plain")):
        headers = [*X_KEY.items(), *(("Content-Type", value) for value in types)]
        response = client.post(path, content=body, headers=headers)
        assert response.status_code == 400, (types, response.text)
        data = response.json()
        assert data["error"] == "invalid_json"
        assert "send one header, Content-Type: application/json (got 2" in data["message"]
    same = [*X_KEY.items(), ("Content-Type", "application/json")]
    same.append(("Content-Type", "application/json"))  # the same one twice is that one
    assert client.post(path, content=body, headers=same).status_code == 200
    if path == "/ports/allocate":
        client.post("/ports/release", json={"session_id": "two-types"}, headers=X_KEY)
    assert leased(server) == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/ports/allocate/"),
        ("POST", "/ports/release/"),
        ("GET", "/ports/status/"),
        ("GET", "/healthz/"),
    ],
)
def test_a_trailing_slash_is_404_not_a_redirect(
    client: httpx.Client, method: str, path: str
) -> None:
    body = {"session_id": "slash"} if method == "POST" else None
    response = client.request(method, path, json=body, headers=X_KEY)
    assert response.status_code == 404, response.text
    assert "location" not in response.headers
    assert response.json()["error"] == "not_found"


def test_full_is_409_with_the_contract_body(
    portalloc_ports: PortallocPorts, tmp_path: Path
) -> None:
    # One block only: the probe is off, so a busy port elsewhere on the host cannot
    # make the first allocation fail too.
    small = start_server(
        portalloc_ports.port("rest"),
        tmp_path,
        PORT_ALLOC_MAX_SESSIONS="1",
        PORTALLOC_SKIP_PORT_CHECK="1",
    )
    try:
        with httpx.Client(base_url=small.url, headers=X_KEY, timeout=30) as http:
            first = http.post("/ports/allocate", json={"session_id": "one"})
            assert first.status_code == 200
            full = http.post("/ports/allocate", json={"session_id": "two"})
            assert full.status_code == 409
            assert full.json() == {"success": False, "error": "no_ports_available"}
            # The holder can still refresh; nothing else changed.
            assert http.post("/ports/allocate", json={"session_id": "one"}).status_code == 200
            assert list(leased(small)) == ["one"]
    finally:
        stop_server(small)


def test_status_and_health_need_no_key(client: httpx.Client, server: Server) -> None:
    made = client.post("/ports/allocate", json={"session_id": "status-check"}, headers=X_KEY)
    status = client.get("/ports/status")
    assert status.status_code == 200
    entry = next(item for item in status.json() if item["session_id"] == "status-check")
    assert entry["api_port"] == made.json()["allocation"]["api_port"]
    assert entry["ttl_remaining_minutes"] > 0
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    client.post("/ports/release", json={"session_id": "status-check"}, headers=X_KEY)


def test_openapi_describes_the_real_models(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    allocate = spec["paths"]["/ports/allocate"]["post"]
    assert allocate["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SessionRequest"
    )
    # Every status each route answers with, and no other.
    documented = {
        (path, method): set(operation["responses"])
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }
    assert documented == {
        ("/ports/allocate", "post"): {"200", "400", "401", "409", "413", "422", "500", "503"},
        ("/ports/release", "post"): {"200", "400", "401", "413", "422", "500", "503"},
        ("/ports/status", "get"): {"200", "413", "500", "503"},
        ("/healthz", "get"): {"200", "413", "500"},
    }
    schemes = spec["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"apiKey", "http"}
    assert "security" not in spec["paths"]["/ports/status"]["get"]
    session = spec["components"]["schemas"]["SessionRequest"]["properties"]["session_id"]
    assert session["minLength"] == 1


def test_http_and_cli_see_each_others_leases(client: httpx.Client, server: Server) -> None:
    over_http = client.post("/ports/allocate", json={"session_id": "via-http"}, headers=BEARER)
    assert leased(server)["via-http"]["db_port"] == over_http.json()["allocation"]["db_port"]

    from_cli = server.cli("allocate", "via-cli")["allocation"]
    seen = {item["session_id"]: item for item in client.get("/ports/status").json()}
    assert seen["via-cli"]["db_port"] == from_cli["db_port"]
    assert seen["via-cli"]["db_port"] != seen["via-http"]["db_port"]

    # Each side releases what the other made.
    released = client.post("/ports/release", json={"session_id": "via-cli"}, headers=X_KEY)
    assert released.json() == {"success": True}
    assert server.cli("release", "via-http") == {"success": True, "released": True}
    remaining = {item["session_id"] for item in client.get("/ports/status").json()}
    assert not remaining & {"via-http", "via-cli"}


def test_concurrent_http_clients_and_cli_processes_never_share_a_port(server: Server) -> None:
    workers = 8
    barrier = threading.Barrier(workers + 1)
    clis_done = threading.Event()
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []

    def http_worker(index: int) -> None:
        session = {"session_id": f"race-http-{index}"}
        with httpx.Client(base_url=server.url, headers=X_KEY, timeout=60) as http:
            barrier.wait(timeout=30)
            # Churn (allocate, release, allocate...) for as long as the CLI processes
            # run, so their allocations land in the middle of the HTTP traffic.
            for _round in range(100):
                response = http.post("/ports/allocate", json=session)
                if response.status_code != 200:
                    failures.append(f"http {index}: {response.status_code} {response.text}")
                    return
                if clis_done.is_set():
                    break
                http.post("/ports/release", json=session)
        results[session["session_id"]] = response.json()["allocation"]

    threads = [threading.Thread(target=http_worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    cli_env = {**clean_environ(server.stderr.parent), **server.env}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "portalloc", "allocate", f"race-cli-{i}", "--json"],
            env=cli_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(workers)
    ]
    barrier.wait(timeout=30)
    for index, process in enumerate(processes):
        out, err = process.communicate(timeout=60)
        if process.returncode == 0:
            results[f"race-cli-{index}"] = json.loads(out)["allocation"]
        else:
            failures.append(f"cli {index}: exit {process.returncode} {err.decode()}")
    clis_done.set()
    for thread in threads:
        thread.join(timeout=60)

    assert not failures
    assert len(results) == 2 * workers
    blocks = sorted((a["block_start"], a["block_end"]) for a in results.values())
    for (_, end), (start, _) in pairwise(blocks):
        assert end < start, blocks
    named = [a[f"{name}_port"] for a in results.values() for name in ("db", "rest", "realtime")]
    assert len(set(named)) == len(named)
    # The ledger agrees with what every client was told.
    on_disk = leased(server)
    for session_id, allocation in results.items():
        assert on_disk[session_id]["api_port"] == allocation["api_port"]
    for session_id in results:
        server.cli("release", session_id)


def serve_without_key(tmp_path: Path, port: int, **env: str) -> tuple[int, str]:
    process = subprocess.run(
        [sys.executable, "-m", "portalloc", "serve", "--port", str(port)],
        env={**clean_environ(tmp_path), "PORTALLOC_STATE_DIR": str(tmp_path / "state"), **env},
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert process.stdout == ""
    return process.returncode, process.stderr


@pytest.mark.parametrize(
    ("key", "shown"),
    [(None, "(unset)"), ("", "(empty)"), ("has space", "(hidden)"), ("ключ", "(hidden)")],
)
def test_refuses_to_start_without_a_usable_key(
    tmp_path: Path, portalloc_ports: PortallocPorts, key: str | None, shown: str
) -> None:
    env = {} if key is None else {"PORTALLOC_API_KEY": key}
    code, stderr = serve_without_key(tmp_path, portalloc_ports.port("realtime"), **env)
    assert code == 2
    assert stderr.count("\n") == 1
    assert stderr.startswith("portalloc: PORTALLOC_API_KEY=")
    assert shown in stderr
    assert "Traceback" not in stderr
    if key:
        assert key not in stderr
    assert not (tmp_path / "state").exists()


def test_bad_settings_stop_the_server_before_it_listens(
    tmp_path: Path, portalloc_ports: PortallocPorts
) -> None:
    code, stderr = serve_without_key(
        tmp_path, portalloc_ports.port("realtime"), PORTALLOC_API_KEY=API_KEY, PORT_ALLOC_BASE="80"
    )
    assert code == 2
    assert stderr == "portalloc: PORT_ALLOC_BASE=80 is invalid: must be an integer >= 1024\n"


def test_busy_port_is_one_line_and_exit_1(tmp_path: Path, portalloc_ports: PortallocPorts) -> None:
    port = portalloc_ports.port("realtime")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        code, stderr = serve_without_key(tmp_path, port, PORTALLOC_API_KEY=API_KEY)
    # Not uvicorn's exit 3, which would read as portalloc's "no ports available".
    assert code == 1
    assert stderr == (
        f"portalloc: cannot listen on 127.0.0.1:{port}: Address already in use "
        f"(`portalloc why {port}` tells who holds it)\n"
    )


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
BODIES = st.one_of(
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries({"session_id": JSON_VALUES}).map(
        lambda value: json.dumps(value).encode()
    ),
    st.text(max_size=60).map(lambda text: json.dumps({"session_id": text}).encode()),
    st.binary(max_size=80),
)
# Visible bytes with inner blanks, non-ASCII (obs-text) included: h11 refuses to send
# anything else (control characters, surrounding blanks) at all.
HEADER_VALUES = st.one_of(
    st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]), max_size=40)
    .map(str.strip)
    .map(lambda text: text.encode("latin-1")),
    st.sampled_from(
        [API_KEY, f"Bearer {API_KEY}", f"bearer  {API_KEY}", "Bearer", "application/json"]
    ).map(str.encode),
)
ANY_HEADERS = st.dictionaries(
    st.sampled_from([b"X-API-Key", b"Authorization", b"Content-Type", b"X-Other", b"Accept"]),
    HEADER_VALUES,
    max_size=4,
)
# Half the time with the right key, so bodies get past the key check and are judged.
HEADERS = ANY_HEADERS | ANY_HEADERS.map(lambda headers: {**headers, b"X-API-Key": API_KEY.encode()})
ENDPOINTS = st.sampled_from(
    [
        ("POST", "/ports/allocate"),
        ("POST", "/ports/release"),
        ("GET", "/ports/status"),
        ("GET", "/healthz"),
    ]
)


# The autouse state-dir fixture is function-scoped but unused here: the server and its
# ledger are module-scoped, so nothing needs resetting between examples.
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(endpoint=ENDPOINTS, body=BODIES, headers=HEADERS)
def test_arbitrary_bodies_and_headers_never_get_a_500(
    server: Server, endpoint: tuple[str, str], body: bytes, headers: dict[bytes, bytes]
) -> None:
    method, path = endpoint
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.request(method, path, content=body, headers=headers)
        assert response.status_code < 500, response.text
        assert response.status_code in {200, 400, 401, 409, 422}
        data = response.json()
        if path == "/ports/allocate" and response.status_code == 200:
            session_id = data["allocation"]["session_id"]
            release = http.post("/ports/release", json={"session_id": session_id}, headers=X_KEY)
            assert release.status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/ports/allocate"),
        ("POST", "/ports/release"),
        ("GET", "/ports/status"),
        ("GET", "/healthz"),
    ],
)
def test_every_route_refuses_a_body_over_the_limit(
    client: httpx.Client, method: str, path: str
) -> None:
    """The 413 every route documents: the guard reads no route's body past the limit."""
    response = client.request(method, path, content=b"x" * (MAX_BODY_BYTES + 1), headers=X_KEY)
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


# --- schemathesis: the OpenAPI document against the real server ---------------------------


@pytest.fixture(scope="module")
def schema_server(
    portalloc_ports: PortallocPorts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server of its own: what schemathesis allocates stays out of the module's ledger."""
    running = start_server(
        portalloc_ports.port("db"),
        tmp_path_factory.mktemp("schemathesis"),
        PORT_ALLOC_MAX_SESSIONS="500",
        PORTALLOC_SKIP_PORT_CHECK="1",  # what is allocated is never bound
    )
    yield running
    stop_server(running)
    assert "Traceback" not in running.stderr.read_text()


ROUTES = ["POST /ports/allocate", "POST /ports/release", "GET /ports/status", "GET /healthz"]


def test_schemathesis_sees_every_route(schema_server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{schema_server.url}/openapi.json")
    labels = [operation.label for path in schema for operation in schema[path].values()]
    assert sorted(labels) == sorted(ROUTES)


@pytest.mark.parametrize("route", ROUTES)
def test_openapi_documents_every_answer(schema_server: Server, route: str) -> None:
    """Schemathesis' default checks on valid and invalid requests to the real server,
    with the key (and, through its auth check, without): an undocumented status (the
    400 and 413 were), a body unlike its documented model, a 5xx, valid data refused
    or invalid data accepted all fail."""
    schema = schemathesis.openapi.from_url(f"{schema_server.url}/openapi.json")
    method, path = route.split(" ")
    operation = schema[path][method]
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)

    @given(case=st.one_of(*(operation.as_strategy(mode) for mode in modes)))
    @settings(
        max_examples=30,  # per route: a few seconds against the real server
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(headers=X_KEY)

    check()


def test_one_key_check_reads_both_headers() -> None:
    """`authorized` is what the guard, the routes' dependency and the invalid-request
    handler all ask."""
    from portalloc.adapters.http import authorized

    def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
        return {"type": "http", "headers": list(headers)}

    key = b"s3cret"
    assert authorized(scope((b"x-api-key", key)), key)
    assert authorized(scope((b"authorization", b"Bearer " + key)), key)
    assert authorized(scope((b"Authorization", b"bEaReR " + key)), key)
    assert not authorized(scope((b"authorization", b"Basic " + key)), key)
    assert not authorized(scope((b"x-api-key", b"s3cre")), key)
    assert not authorized(scope(), key)
    assert not authorized(scope((b"x-api-key", b"")), b"")  # no key set: nothing matches

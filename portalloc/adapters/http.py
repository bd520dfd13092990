"""FastAPI routes over the same locked ledger as the CLI, served by uvicorn."""

from __future__ import annotations

import hmac
import json
import os
import socket
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from portalloc import __version__
from portalloc.adapters.common import (
    DEFAULT_HTTP_PORT,
    allocate_body,
    error_body,
    http_status,
    say,
    warn,
)
from portalloc.adapters.schema import Allocation
from portalloc.errors import (
    ConfigError,
    InvalidSessionId,
    LockTimeout,
    NoPortsAvailable,
    PortallocError,
)
from portalloc.rules import MAX_SESSION_ID_LENGTH, validate_session_id
from portalloc.service import PortAllocatorService, open_service

ENV_API_KEY = "PORTALLOC_API_KEY"
JSON_TYPE = "Content-Type: application/json"
PROTECTED_PATHS = frozenset({"/ports/allocate", "/ports/release"})

ServiceFactory = Callable[[], PortAllocatorService]
MAX_BODY_BYTES = 64 * 1024
SESSION_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"


class SessionRequest(BaseModel):
    """The session a POST acts on."""

    session_id: str = Field(
        min_length=1,
        max_length=MAX_SESSION_ID_LENGTH,
        # The rule validate_session_id enforces, stated in the schema: no C0/C1 control
        # characters, and not only whitespace.
        pattern=SESSION_ID_PATTERN,
        description="Any string of 1-4096 characters without control characters (no NUL, "
        "newline, CR, tab, ESC, DEL, U+0080-U+009F) and not only whitespace, e.g. the "
        "worktree's absolute path.",
        examples=["/home/me/src/shop-feature-x"],
    )

    @field_validator("session_id")
    @classmethod
    def _valid_session_id(cls, value: str) -> str:
        try:
            return validate_session_id(value)
        except InvalidSessionId as exc:
            raise ValueError(exc.message) from None


class AllocateResponse(BaseModel):
    success: Literal[True]
    allocation: Allocation
    env_snippet: str = Field(description="`export NAME=VALUE` lines, safe to eval in sh/bash/zsh.")


class ReleaseResponse(BaseModel):
    success: Literal[True]


class NoPortsResponse(BaseModel):
    success: Literal[False]
    error: Literal["no_ports_available"]


class ErrorResponse(BaseModel):
    success: Literal[False]
    error: str = Field(examples=["unauthorized", "lock_timeout", "ledger_error"])
    message: str


class ValidationErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(ErrorResponse):
    detail: list[ValidationErrorDetail]


class Health(BaseModel):
    status: Literal["ok"]
    version: str


API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", auto_error=False, description=f"The key in {ENV_API_KEY}."
)
BEARER = HTTPBearer(auto_error=False, description=f"The key in {ENV_API_KEY}, as a bearer token.")

UNAUTHORIZED_MESSAGE = "missing or wrong API key: send X-API-Key: KEY or Authorization: Bearer KEY"

# Every status a route answers with besides 200, for its OpenAPI entry: the guard's
# (413, 500) on every route, the key and body checks of the POSTs, the ledger's 503.
_RESPONSES: dict[int, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "`invalid_json`: the body is not JSON (not sent as application/json, "
        "empty, not UTF-8 or not parseable).",
    },
    401: {"model": ErrorResponse, "description": "`unauthorized`: missing or wrong API key."},
    409: {"model": NoPortsResponse, "description": "Every block is taken."},
    413: {
        "model": ErrorResponse,
        "description": f"`body_too_large`: the body is over {MAX_BODY_BYTES} bytes.",
    },
    422: {
        "model": ValidationErrorResponse,
        "description": "`invalid_session_id`: missing, empty or invalid session_id; "
        "`invalid_request`: the JSON is not an object.",
    },
    500: {
        "model": ErrorResponse,
        "description": "`internal_error`: a bug; the message names the crash report.",
    },
    503: {
        "model": ErrorResponse,
        "description": "`lock_timeout` / `ledger_error`: the ledger is locked past the timeout "
        "or unusable.",
    },
}


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: _RESPONSES[status] for status in sorted(statuses)}


def _not_json(content_types: Sequence[bytes], body: bytes) -> str | None:
    """Why BODY, sent with the Content-Type headers CONTENT_TYPES, is not a JSON document
    (as RFC 8259 has it: UTF-8), or None. The one reason for a 400; JSON of the wrong
    shape is the model's 422. Two Content-Type headers that differ are no type at all:
    Starlette reads the first and this guard would read the last."""
    if len(set(content_types)) > 1:
        sent = ", ".join(repr(value.decode("latin-1")) for value in content_types)
        return f"send one header, {JSON_TYPE} (got {len(content_types)} Content-Types: {sent})"
    content_type = content_types[0] if content_types else None
    media = (content_type or b"").split(b";", 1)[0].strip().lower().decode("latin-1")
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        sent = f"not {media}" if media else "no Content-Type"
        return f'send a JSON object {{"session_id": ...}} as {JSON_TYPE} ({sent})'
    if not body:
        return 'the body is empty: send a JSON object {"session_id": ...}'
    try:
        json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"the body is not UTF-8 (byte {exc.start})"
    except ValueError as exc:
        return f"the body is not JSON ({exc})"
    except RecursionError:
        return "the body is not JSON this server reads: nested too deeply"
    return None


_warn = warn
_info = say


def _key_matches(presented: bytes | None, expected: bytes) -> bool:
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented, expected)


def authorized(scope: Scope, expected: bytes) -> bool:
    """The one key check, which the guard, the routes' dependency and the invalid-request
    handler all ask: the request's X-API-Key, or its `Authorization: Bearer` token, is
    EXPECTED (the key's bytes as sent; an empty key matches nothing)."""
    headers = {name.lower(): value for name, value in scope.get("headers", [])}
    authorization = headers.get(b"authorization", b"")
    token = authorization[7:] if authorization[:7].lower() == b"bearer " else None
    # Both compared, so the time taken does not say which header was close.
    by_header = _key_matches(headers.get(b"x-api-key"), expected)
    by_bearer = _key_matches(token, expected)
    return by_header or by_bearer


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"success": False, "error": code, "message": message},
        **extra,
    )


def _unauthorized() -> JSONResponse:
    return _error(401, "unauthorized", UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": "Bearer"})


class _Unauthorized(Exception):
    """Raised by the key check; rendered as a 401 by the app's handler."""


async def _send_json(send: Send, status: int, body: dict[str, Any], **headers: str) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class _Guard:
    """Outermost checks, before FastAPI reads anything: the key of a protected POST
    (so an unauthenticated body is never read), the 64 KiB body limit (read at most
    that much, never buffered whole), and one JSON line for any unexpected error."""

    def __init__(self, app: ASGIApp, expected: bytes) -> None:
        self.app = app
        self.expected = expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        is_post = scope["path"] in PROTECTED_PATHS and scope["method"] == "POST"
        if is_post and not authorized(scope, self.expected):
            await _send_json(
                send,
                401,
                {"success": False, "error": "unauthorized", "message": UNAUTHORIZED_MESSAGE},
                **{"WWW-Authenticate": "Bearer"},
            )
            return
        too_big = {
            "success": False,
            "error": "body_too_large",
            "message": f"the request body exceeds {MAX_BODY_BYTES} bytes",
        }
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _send_json(send, 413, too_big, Connection="close")
            return
        # Read the body here, at most MAX_BODY_BYTES of it, then hand it on: a chunked
        # upload without Content-Length is cut off as soon as it passes the limit.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await _send_json(send, 413, too_big, Connection="close")
                return
        # A body that is not JSON is a 400 here, before FastAPI, which would answer
        # 422 for a syntax error and 400 for bytes that are not UTF-8.
        content_types = [
            value for name, value in scope.get("headers", []) if name.lower() == b"content-type"
        ]
        problem = _not_json(content_types, bytes(body)) if is_post else None
        if problem is not None:
            await _send_json(
                send, 400, {"success": False, "error": "invalid_json", "message": problem}
            )
            return
        started = False
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, replay, tracking_send)
        except Exception as exc:
            from portalloc.adapters import guard

            if guard.debugging() or started:
                raise
            line = guard.report(exc)
            _warn(line)
            await _send_json(
                send, 500, {"success": False, "error": "internal_error", "message": line}
            )


def _validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    # Leave out pydantic's `input`: it echoes the body back (NaN and lone surrogates
    # included, which would not even render as JSON).
    return [
        {
            "loc": [part if isinstance(part, int) else str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        for error in errors
    ]


def _shared(service: PortAllocatorService) -> ServiceFactory:
    return lambda: service


def create_app(
    service_factory: ServiceFactory | None = None, *, api_key: str | None = None
) -> FastAPI:
    """The HTTP API over SERVICE_FACTORY()'s ledger; API_KEY defaults to $PORTALLOC_API_KEY."""
    # One service is enough: it keeps settings only, every lease lives in the ledger.
    get_service = service_factory or _shared(open_service(on_warning=_warn))
    key = api_key if api_key is not None else os.environ.get(ENV_API_KEY, "")
    # Without a key nothing matches: an app built by mistake without one fails closed.
    expected = key.encode("utf-8")

    app = FastAPI(
        title="portalloc",
        version=__version__,
        summary="Conflict-free blocks of TCP ports from one locked ledger.",
        # Swagger UI and ReDoc load their scripts from a public CDN: blank offline, and
        # a third party's code in the page. The schema itself is at /openapi.json.
        docs_url=None,
        redoc_url=None,
        # `/ports/allocate/` is no route: 404, not a 307 to the route without the slash
        # (which a client would follow with its body and key, or not at all).
        redirect_slashes=False,
    )
    app.add_middleware(_Guard, expected=expected)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        return _error(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            headers=exc.headers,
        )

    async def require_api_key(
        request: Request,
        # Declared for the OpenAPI document's security schemes; the check reads the
        # headers itself, as the guard does.
        _header_key: Annotated[str | None, Security(API_KEY_HEADER)],
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
    ) -> None:
        if not authorized(request.scope, expected):
            raise _Unauthorized

    @app.exception_handler(_Unauthorized)
    async def _on_unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return _unauthorized()

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A body that does not parse fails before the key check would run; an
        # unauthenticated caller still gets 401, not a description of its mistake.
        if request.url.path in PROTECTED_PATHS and not authorized(request.scope, expected):
            return _unauthorized()
        detail = _validation_details(exc.errors())
        on_session = any(tuple(d["loc"][:2]) == ("body", "session_id") for d in detail)
        message = "; ".join(
            f"{'.'.join(str(part) for part in d['loc'][1:]) or 'body'}: {d['msg']}" for d in detail
        )
        # The body is JSON (the guard answered 400 otherwise), of the wrong shape.
        return JSONResponse(
            status_code=422,
            content={
                "success": False,
                "error": "invalid_session_id" if on_session else "invalid_request",
                "message": message or "invalid request",
                "detail": detail,
            },
        )

    @app.exception_handler(PortallocError)
    async def _on_portalloc_error(request: Request, exc: PortallocError) -> JSONResponse:
        if isinstance(exc, NoPortsAvailable):
            return JSONResponse(status_code=409, content=error_body(exc))
        headers = {"Retry-After": "1"} if isinstance(exc, LockTimeout) else None
        return _error(http_status(exc), exc.code, exc.message, headers=headers)

    protected = [Depends(require_api_key)]

    @app.post(
        "/ports/allocate",
        response_model=AllocateResponse,
        dependencies=protected,
        responses=_responses(400, 401, 409, 413, 422, 500, 503),
        summary="Allocate a block for a session, or refresh its lease",
    )
    def allocate(body: SessionRequest) -> dict[str, Any]:
        # A dict, not a JSONResponse: FastAPI then validates it against response_model.
        return allocate_body(get_service().allocate(body.session_id))

    @app.post(
        "/ports/release",
        response_model=ReleaseResponse,
        dependencies=protected,
        responses=_responses(400, 401, 413, 422, 500, 503),
        summary="Release a session's block (succeeds for an unknown session too)",
    )
    def release(body: SessionRequest) -> dict[str, Any]:
        get_service().release(body.session_id)
        return {"success": True}

    @app.get(
        "/ports/status",
        response_model=list[Allocation],
        responses=_responses(413, 500, 503),
        summary="Active leases, lowest block first",
    )
    def status() -> list[dict[str, Any]]:
        return [allocation.to_dict() for allocation in get_service().status()]

    @app.get(
        "/healthz", response_model=Health, responses=_responses(413, 500), summary="Liveness check"
    )
    async def healthz() -> Health:
        return Health(status="ok", version=__version__)

    return app


def _checked_api_key() -> str:
    key = os.environ.get(ENV_API_KEY)
    if key is None:
        raise ConfigError(ENV_API_KEY, "(unset)", "must be set to start the HTTP server")
    # Never echo the key itself: the message ends up in terminals and logs.
    if not key:
        raise ConfigError(ENV_API_KEY, "(empty)", "must be set to start the HTTP server")
    if not all("!" <= char <= "~" for char in key):
        raise ConfigError(
            ENV_API_KEY,
            "(hidden)",
            "must be printable ASCII without spaces (it travels in an HTTP header)",
        )
    return key


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address HOST names (as uvicorn would bind them), or a
    one-line PortallocError saying why not."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise PortallocError(f"cannot listen on {host}:{port}: {reason}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # `--host ::` means IPv6 only, as with uvicorn; 0.0.0.0 is separate.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)  # listen now: nothing can slip in before uvicorn starts
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = exc.strerror or str(exc)
        raise PortallocError(
            f"cannot listen on {host}:{port}: {reason} (`portalloc why {port}` tells who holds it)"
        ) from None
    return sockets


def serve(host: str = "127.0.0.1", port: int = DEFAULT_HTTP_PORT) -> None:
    """Run the HTTP API with uvicorn; refuses to start without a usable API key."""
    key = _checked_api_key()
    app = create_app(api_key=key)  # bad settings raise here, before anything listens
    # Bind here rather than in uvicorn: a busy port is then our one-line error with
    # exit 1, not uvicorn's log lines and its exit code 3 (portalloc's "no ports").
    sockets = _listen(host, port)
    config = uvicorn.Config(app, log_level="info", server_header=False)
    shown = f"[{host}]" if ":" in host else (host or "0.0.0.0")
    _info(f"serving on http://{shown}:{port} (OpenAPI schema at /openapi.json); Ctrl-C stops")
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()

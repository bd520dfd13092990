"""Caddy's configuration, built as data: never a template a session id, a slug or a
project file could write into, and the same whatever the leases. Pure: no I/O."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from portalloc.proxy import ADMIN_SOCKET, ROUTES_DIR
from portalloc.rules import DNS_LABEL, URL_DOMAIN

SERVER = "portalloc"  # the name of Caddy's one HTTP server
NOT_FOUND_BODY = "portalloc: no lease has this name\n"
# The names the proxy answers, whole: `<label>.<slug>.localhost` or `<slug>.localhost`,
# DNS labels, lowercase (as browsers send them). Nothing else is looked up on disk.
_LABEL = DNS_LABEL.pattern
HOST_PATTERN = rf"^(?:{_LABEL}\.)?{_LABEL}\.{re.escape(URL_DOMAIN)}$"
# The file the lookup found, relative to the route directory: `/<host>/<port>`.
PORT_PATTERN = r"^/[a-z0-9.-]+/([1-9][0-9]{0,4})$"
# Where the port of the name asked for is, once both patterns matched.
PORT_PLACEHOLDER = "{http.regexp.portalloc_port.1}"


def caddy_routes() -> list[dict[str, Any]]:
    """The routes of Caddy's server, the same whatever the leases: a name is looked up in
    the route directory on every request, so a lease change never touches Caddy's
    configuration (a change through its admin API would be a reload, and a reload
    closes idle keep-alive connections on every route).

    Three steps, each a route inside the last, since the matchers of one route run in no
    set order: the Host is a name portalloc could have made (else 404, and nothing is
    looked up); a file `<host>/<port>` exists in the route directory (the `file`
    matcher: placeholders in its pattern are escaped, never globbed, and the path is
    kept inside its root); its name is a port. Then a reverse proxy to that port on
    loopback. Every other request: 404."""
    by_port = {
        "match": [
            {
                "vars_regexp": {
                    "{http.matchers.file.relative}": _named("portalloc_port", PORT_PATTERN)
                }
            }
        ],
        "handle": [_reverse_proxy("127.0.0.1")],
    }
    by_file = {
        "match": [{"file": {"root": ROUTES_DIR, "try_files": ["/{http.request.host}/[0-9]*"]}}],
        "handle": [{"handler": "subroute", "routes": [by_port]}],
    }
    return [
        {
            "match": [
                {"vars_regexp": {"{http.request.host}": _named("portalloc_host", HOST_PATTERN)}}
            ],
            "handle": [{"handler": "subroute", "routes": [by_file]}],
        },
        _not_found(),
    ]


def _named(name: str, pattern: str) -> dict[str, str]:
    return {"name": name, "pattern": pattern}


def _reverse_proxy(address: str) -> dict[str, Any]:
    return {"handler": "reverse_proxy", "upstreams": [{"dial": f"{address}:{PORT_PLACEHOLDER}"}]}


def ipv6_fallback() -> dict[str, Any]:
    """The server's error routes: a name whose port refuses on 127.0.0.1 is tried on ::1.

    Dev servers listen on 127.0.0.1, on ::1 (Node's `localhost` on some systems) or on
    both. Caddy's load balancing cannot say "the other one" under concurrent requests
    (round robin hands a retry to whichever comes next), so the second address is
    tried here, once, and only after a failed dial: nothing of the request was sent."""
    return {
        "routes": [
            {
                "match": [
                    {
                        "vars_regexp": {
                            "{http.error.message}": {"pattern": r"^dial tcp 127\.0\.0\.1:"}
                        }
                    }
                ],
                "handle": [_reverse_proxy("[::1]")],
            }
        ]
    }


def _not_found() -> dict[str, Any]:
    # A fixed body: the Host header is the client's, and is never echoed back.
    return {
        "handle": [
            {
                "handler": "static_response",
                "status_code": 404,
                "headers": {"Content-Type": ["text/plain; charset=utf-8"]},
                "body": NOT_FOUND_BODY,
            }
        ]
    }


def document(listen: list[str], ipv6: bool, directory: Path) -> dict[str, Any]:
    """Caddy's whole configuration, loaded once at start and never changed: the server on
    LISTEN (`fd/N`: loopback sockets portalloc bound and handed over), the admin endpoint
    on a unix socket in DIRECTORY (mode 0200: its owner alone may connect), its storage,
    log and route directory there too, nothing written anywhere else."""
    return {
        "admin": {"listen": f"unix/{ADMIN_SOCKET}", "config": {"persist": False}},
        "logging": {
            "logs": {
                "default": {
                    "level": "INFO",
                    "writer": {
                        "output": "file",
                        "filename": str(directory / "caddy.log"),
                        "roll_size_mb": 10,
                        "roll_keep": 2,
                    },
                }
            }
        },
        "storage": {"module": "file_system", "root": str(directory / "data")},
        "apps": {
            "http": {
                "servers": {
                    SERVER: {
                        "listen": listen,
                        "protocols": ["h1", "h2", "h2c"],
                        "automatic_https": {"disable": True},
                        "routes": caddy_routes(),
                        **({"errors": ipv6_fallback()} if ipv6 else {}),
                    }
                }
            }
        },
    }

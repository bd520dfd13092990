"""Caddy's configuration, built as data from the leases: never a template a session id,
a slug or a project file could write into. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from portalloc.models import Lease

SERVER = "portalloc"  # the name of Caddy's one HTTP server
ADMIN_SOCKET = "admin.sock"  # relative: Caddy runs in the proxy's directory
# Caddy closes a proxied stream (a WebSocket, an event stream) when the configuration it
# was opened under is replaced, unless told to wait: every lease change replaces the
# routes, and a dev server's hot-reload socket must not drop because another worktree
# got its ports. A day is longer than any dev session holds one.
STREAM_CLOSE_DELAY = "24h"
NOT_FOUND_BODY = "portalloc: no lease has this name\n"


class Route(NamedTuple):
    """One name the proxy answers, and the port of the lease it forwards to."""

    host: str
    port: int
    session_id: str


def table(leases: Iterable[Lease]) -> list[Route]:
    """Every host name of every lease, to that lease's own port, lowest block first.

    Only a port inside the lease's own block is routed to, and a name two leases claim
    (a hand-edited ledger) goes to the first one alone: no input makes a name forward
    to another lease's port."""
    routes: list[Route] = []
    seen: set[str] = set()
    for lease in sorted(leases, key=lambda lease: lease.start):
        ports = dict(lease.ports)
        for name, host in lease.hosts().items():
            port = ports.get(name or lease.bare or "")
            if port is None or not lease.start <= port <= lease.end or host in seen:
                continue
            seen.add(host)
            routes.append(Route(host, port, lease.session_id))
    return routes


# The placeholder the name table fills with the port of the name asked for.
PORT_PLACEHOLDER = "{portalloc.port}"


def caddy_routes(routes: Iterable[Route]) -> list[dict[str, Any]]:
    """The routes of Caddy's server: a table from name to port (one lookup per request
    whatever the number of leases, and one small configuration to load), a reverse proxy
    to that port on loopback, and 404 for every name not in the table."""
    table = {
        "handler": "map",
        "source": "{http.request.host}",
        "destinations": [PORT_PLACEHOLDER],
        "mappings": [{"input": route.host, "outputs": [str(route.port)]} for route in routes],
        "defaults": [""],
    }
    return [
        {"handle": [table]},
        {
            "match": [{"not": [{"vars": {PORT_PLACEHOLDER: [""]}}]}],
            "handle": [_reverse_proxy("127.0.0.1")],
            "terminal": True,
        },
        _not_found(),
    ]


def _reverse_proxy(address: str) -> dict[str, Any]:
    return {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": f"{address}:{PORT_PLACEHOLDER}"}],
        "stream_close_delay": STREAM_CLOSE_DELAY,
    }


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


def document(
    listen: list[str], ipv6: bool, directory: Path, routes: Iterable[Route]
) -> dict[str, Any]:
    """Caddy's whole configuration: the server on LISTEN (`fd/N`: loopback sockets
    portalloc bound and handed over), the admin endpoint on a unix socket in DIRECTORY
    (mode 0200: its owner alone may connect), its storage and log there too, nothing
    written anywhere else."""
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
                        "routes": caddy_routes(routes),
                        **({"errors": ipv6_fallback()} if ipv6 else {}),
                    }
                }
            }
        },
    }


def served(config_routes: object) -> list[tuple[str, int]]:
    """(host, port) of each name in Caddy's answer for the server's routes."""
    found: list[tuple[str, int]] = []
    try:
        mappings = config_routes[0]["handle"][0]["mappings"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return found
    for mapping in mappings if isinstance(mappings, list) else ():
        try:
            found.append((str(mapping["input"]), int(mapping["outputs"][0])))
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    return found

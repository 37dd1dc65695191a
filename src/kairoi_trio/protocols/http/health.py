"""/metrics, /live and /ready: the probes' routes of the HTTP server.

Their paths, content types and bodies are what they were on the old metrics
port (a Prometheus scrape config and a load balancer's probe keep working),
except /ready's body, which is JSON naming the failing check:

    200 {"ready": true, "failing": null, "reason": null,
         "checks": {"shutdown": {"ok": true, "reason": null}, "storage": {...}}}
    503 {"ready": false, "failing": "storage", "reason": "storage writes fail: ...", ...}
"""

from __future__ import annotations

from prometheus_client import generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from kairoi_trio.observability.metrics import REGISTRY, Readiness

# Set explicitly: Starlette would add "; charset=utf-8" to a text/* media type.
_PROMETHEUS = {"content-type": "text/plain; version=0.0.4"}
_PLAIN = {"content-type": "text/plain"}


def health_routes(readiness: Readiness) -> list[BaseRoute]:
    """The three routes, GET (and HEAD) only; `readiness` decides /ready."""

    async def metrics(request: Request) -> Response:
        # generate_latest reads counters the server keeps anyway: no I/O, a few ms at most.
        return Response(generate_latest(REGISTRY), headers=_PROMETHEUS)

    async def live(request: Request) -> Response:
        return Response(b"ok\n", headers=_PLAIN)

    async def ready(request: Request) -> Response:
        status, body = ready_document(readiness)
        return JSONResponse(body, status_code=status)

    return [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/live", live, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]


def ready_document(readiness: Readiness) -> tuple[int, dict[str, object]]:
    """/ready's status (200 or 503) and JSON body: every check, and the first that fails."""
    checks = readiness.checks()
    failing = next((name for name, reason in checks.items() if reason is not None), None)
    body: dict[str, object] = {
        "ready": failing is None,
        "failing": failing,
        "reason": checks[failing] if failing is not None else None,
        "checks": {
            name: {"ok": reason is None, "reason": reason} for name, reason in checks.items()
        },
    }
    return (200 if failing is None else 503), body

"""The admin API (127.0.0.1:9901 by default): inspect and steer a running gateway."""

from __future__ import annotations

import hmac
from typing import Any, Protocol

from aiohttp import web

from . import metrics
from .errors import GatewayError, NoRouteError, Unauthorized, error_body
from .forwarder import Upstreams
from .runtime import Runtime


class Controlled(Protocol):
    """What the admin API reads and steers (the running :class:`~gateway.server.Gateway`)."""

    @property
    def runtime(self) -> Runtime: ...

    upstreams: Upstreams

    def upstream_report(self, service: str | None = None) -> list[dict[str, Any]]: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    async def reload(self) -> dict[str, Any]: ...

    def extend_admin(self, app: web.Application) -> None: ...

_OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def _json_error(error: GatewayError) -> web.Response:
    return web.json_response(error_body(error, None), status=error.status, headers=error.headers)


def build_admin_app(gw: Controlled, token: str | None) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        if token and request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return _json_error(
                    Unauthorized("admin token required: send 'Authorization: Bearer <token>'")
                )
        try:
            return await handler(request)
        except GatewayError as exc:
            return _json_error(exc)
        except web.HTTPNotFound:
            return _json_error(NoRouteError(f"no admin endpoint {request.method} {request.path}"))
        except web.HTTPMethodNotAllowed as exc:
            err = GatewayError(f"{request.method} is not allowed on {request.path}")
            err.status, err.type = 405, "method_not_allowed"
            err.headers = {"Allow": ", ".join(sorted(exc.allowed_methods))}
            return _json_error(err)

    app = web.Application(middlewares=[guard])

    async def routes(_: web.Request) -> web.Response:
        rt = gw.runtime
        return web.json_response(
            {
                "source": rt.source,
                "loaded_at": rt.loaded_at.isoformat(),
                "routes": rt.describe_routes(),
            }
        )

    async def upstreams(request: web.Request) -> web.Response:
        return web.json_response({"services": gw.upstream_report(request.query.get("service"))})

    async def upstream_one(request: web.Request) -> web.Response:
        name = request.match_info["service"]
        report = gw.upstream_report(name)
        if not report:
            raise NoRouteError(f"unknown service {name!r}")
        return web.json_response({"services": report})

    async def breakers(_: web.Request) -> web.Response:
        return web.json_response(
            {"breakers": [b.snapshot() for _, b in sorted(gw.upstreams.breakers.items())]}
        )

    async def breaker_action(request: web.Request) -> web.Response:
        name, action = request.match_info["service"], request.match_info["action"]
        breaker = gw.upstreams.breakers.get(name)
        if breaker is None:
            known = ", ".join(sorted(gw.upstreams.breakers)) or "none"
            raise NoRouteError(f"unknown service {name!r} (known: {known})")
        {"open": breaker.force_open, "close": breaker.force_close, "reset": breaker.reset}[action]()
        return web.json_response(breaker.snapshot())

    async def reload(_: web.Request) -> web.Response:
        result = await gw.reload()
        return web.json_response(result, status=200 if result["reloaded"] else 400)

    async def metrics_text(_: web.Request) -> web.Response:
        return web.Response(
            body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, detail = gw.readiness()
        return web.json_response(detail, status=200 if ready else 503)

    app.router.add_get("/routes", routes)
    app.router.add_get("/upstreams", upstreams)
    app.router.add_get("/upstreams/{service}", upstream_one)
    app.router.add_get("/breakers", breakers)
    app.router.add_post("/breakers/{service}/{action:open|close|reset}", breaker_action)
    app.router.add_post("/reload", reload)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    gw.extend_admin(app)
    return app

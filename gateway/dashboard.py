"""The live dashboard on the admin port: ``GET /`` (the page) and ``GET /stats`` (counters).

The page is one static file, ``gateway/static/dashboard.html`` (plain HTML and JS, no
build step, no external assets). It polls the admin API every 2 s: ``/routes``,
``/upstreams``, ``/breakers``, ``/readyz`` and ``/stats``, and computes request rates
and error ratios itself from the differences between two polls.

``GET /`` is served without the admin token even when one is set: the page holds no
data, and a browser cannot send a bearer header on a plain navigation. Everything it
shows comes from the other endpoints, which stay behind the token; the page takes the
token from ``?token=`` (then drops it from the address bar) or from a small form, keeps
it in ``sessionStorage`` and sends it as ``Authorization: Bearer`` on every fetch.
``GET /stats`` is behind the token like every other data endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from . import metrics

__all__ = ["install_dashboard", "request_stats"]

_PAGE_PATH = "/"
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def _load_page() -> tuple[bytes, dict[str, str]]:
    html = resources.files("gateway").joinpath("static/dashboard.html").read_text("utf-8")
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in _SCRIPT.findall(html)
    )
    script_src = hashes or "'none'"
    headers = {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        # Only our own inline script (by hash) runs, and it may only talk to this origin.
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {script_src}; "
            "style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ),
    }
    return html.encode("utf-8"), headers


def request_stats() -> dict[str, Any]:
    """Lifetime request counts per route (by status) and latency sums, from the registry."""
    routes: dict[str, dict[str, Any]] = {}

    def entry(route: str) -> dict[str, Any]:
        return routes.setdefault(
            route,
            {
                "route": route,
                "services": [],
                "requests": 0,
                "status": {},
                "latency_sum": 0.0,
                "latency_count": 0,
            },
        )

    for family in metrics.REQUESTS.collect():
        for sample in family.samples:
            if sample.name != "aiagg_gateway_requests_total":
                continue
            labels, count = sample.labels, int(sample.value)
            e = entry(labels["route"])
            e["requests"] += count
            status = labels["status"]
            e["status"][status] = e["status"].get(status, 0) + count
            if labels["service"] not in e["services"]:
                e["services"].append(labels["service"])
    for family in metrics.LATENCY.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                entry(sample.labels["route"])["latency_sum"] += sample.value
            elif sample.name.endswith("_count"):
                entry(sample.labels["route"])["latency_count"] += int(sample.value)
    return {"time": time.time(), "routes": sorted(routes.values(), key=lambda e: e["route"])}


def install_dashboard(app: web.Application) -> None:
    """Add ``GET /`` (the page, open) and ``GET /stats`` (guarded) to the admin app."""
    body, headers = _load_page()

    def page() -> web.Response:
        return web.Response(body=body, headers=headers)

    @web.middleware
    async def open_page(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Outermost, so the page bypasses the admin token guard: it carries no data.
        if request.path == _PAGE_PATH and request.method in ("GET", "HEAD"):
            return page()
        return await handler(request)

    async def dashboard(_: web.Request) -> web.Response:
        return page()

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(request_stats(), headers={"Cache-Control": "no-store"})

    app.middlewares.insert(0, open_page)
    app.router.add_get(_PAGE_PATH, dashboard)
    app.router.add_get("/stats", stats)

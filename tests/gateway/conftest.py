"""Real-socket fixtures: scripted upstream servers and a gateway started on free ports."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.discovery import DiscoveryRouter, StaticResolver
from gateway.server import Gateway
from gateway.settings import GatewaySettings


@dataclass
class Upstream:
    """An HTTP server whose answers a test scripts; it records what it received."""

    url: str
    seen: list[dict] = field(default_factory=list)
    script: list[Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(
        default_factory=list
    )
    default: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None

    @property
    def hits(self) -> int:
        return len(self.seen)


async def _ok(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True, "path": request.path_qs})


@pytest.fixture
async def make_upstream(aiohttp_server):
    async def make() -> Upstream:
        holder: dict[str, Upstream] = {}

        async def handle(request: web.Request) -> web.StreamResponse:
            up = holder["u"]
            body = await request.read()
            up.seen.append(
                {
                    "method": request.method,
                    "path": request.path_qs,
                    "headers": dict(request.headers),
                    "raw_headers": [(k.decode(), v.decode()) for k, v in request.raw_headers],
                    "body": body,
                }
            )
            if up.script:
                return await up.script.pop(0)(request)
            return await (up.default or _ok)(request)

        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", handle)
        server = await aiohttp_server(app)
        holder["u"] = Upstream(url=f"http://127.0.0.1:{server.port}")
        return holder["u"]

    return make


def status(code: int, headers: dict | None = None, delay: float = 0.0):
    async def answer(request: web.Request) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"status": code}, status=code, headers=headers)

    return answer




@dataclass
class RunningGateway:
    gw: Gateway
    routes_file: Path
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gw.public_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.gw.admin_port}"

    def write(self, yaml_text: str) -> None:
        self.routes_file.write_text(textwrap.dedent(yaml_text))


@pytest.fixture
async def start_gateway(tmp_path):
    started: list[RunningGateway] = []

    async def start(yaml_text: str, **settings) -> RunningGateway:
        routes = tmp_path / f"routes{len(started)}.yaml"
        routes.write_text(textwrap.dedent(yaml_text))
        cfg = GatewaySettings(
            **{
                "routes_file": str(routes),
                "host": "127.0.0.1",
                "port": 0,
                "admin_port": 0,
                "access_log": False,
                **settings,
            }
        )
        gw = Gateway(cfg, resolver=DiscoveryRouter(StaticResolver()))
        await gw.start()
        running = RunningGateway(gw, routes, aiohttp.ClientSession())
        started.append(running)
        return running

    yield start
    for running in started:
        await running.session.close()
        await running.gw.stop()

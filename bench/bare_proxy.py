"""The 30-line aiohttp reverse proxy every gateway is compared with: one shared session,
no policies, no retries, no metrics."""

import sys

import aiohttp
from aiohttp import web

UPSTREAM = sys.argv[2]
HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer", "host"}


async def on_startup(app: web.Application) -> None:
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))


async def handle(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = await request.read()
    async with request.app["session"].request(
        request.method, UPSTREAM + request.path_qs, headers=headers, data=body or None
    ) as up:
        payload = await up.read()
        out = {k: v for k, v in up.headers.items() if k.lower() not in HOP | {"content-length"}}
        return web.Response(status=up.status, body=payload, headers=out)


app = web.Application()
app.on_startup.append(on_startup)
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)

"""A minimal aiohttp upstream for benchmarks: answers every request with a small JSON body."""

import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    return web.Response(body=b'{"ok":true}', content_type="application/json")


app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)

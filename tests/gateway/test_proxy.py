"""The gateway through real sockets: routing, retries, breakers, timeouts, streaming, errors."""

from __future__ import annotations

import asyncio
import errno
import time

import pytest
from aiohttp import web

from tests.support import refused_url

from .conftest import status


def one_route(url: str, extra_route: str = "", extra_service: str = "", defaults: str = "") -> str:
    return f"""
defaults:
  retry: {{attempts: 3, backoff: {{initial: 10ms, max: 20ms}}}}
{defaults}
services:
  echo:
    instances: [{url}]
{extra_service}
routes:
  - name: echo
    match: {{prefix: /echo/}}
    service: echo
{extra_route}
"""


async def test_forwards_path_query_body_and_headers(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(one_route(up.url))
    async with g.session.post(
        f"{g.url}/echo/a/b?x=1&y=2",
        data=b"hello",
        headers={
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "X-Keep": "yes",
            "X-Request-ID": "client-id-42",
        },
    ) as r:
        assert r.status == 200
        assert r.headers["X-Request-ID"] == "client-id-42"
    seen = up.seen[-1]
    assert seen["path"] == "/echo/a/b?x=1&y=2"
    assert seen["body"] == b"hello"
    h = seen["headers"]
    assert h["X-Keep"] == "yes"
    assert "X-Drop-Me" not in h  # named in Connection: hop-by-hop
    assert h["X-Forwarded-For"] == "127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Forwarded-Host"].startswith("127.0.0.1:")
    assert h["X-Request-ID"] == "client-id-42"


async def test_generates_request_id_when_missing_or_malformed(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(one_route(up.url))
    async with g.session.get(
        f"{g.url}/echo/x", headers={"X-Request-ID": "bad id\twith spaces"}
    ) as r:
        rid = r.headers["X-Request-ID"]
    assert len(rid) == 32 and rid != "bad id\twith spaces"
    assert up.seen[-1]["headers"]["X-Request-ID"] == rid


async def test_path_rewrite_strip_and_replace(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        one_route(
            up.url,
            extra_route="""
  - name: stripped
    match: {prefix: /api/v2}
    service: echo
    rewrite: {strip_prefix: true}
  - name: replaced
    match: {prefix: /old/}
    service: echo
    rewrite: {replace_prefix: /new/}
""",
        )
    )
    async with g.session.get(f"{g.url}/api/v2/items/7") as r:
        assert r.status == 200
    async with g.session.get(f"{g.url}/old/thing") as r:
        assert r.status == 200
    assert [s["path"] for s in up.seen] == ["/items/7", "/new/thing"]


async def test_get_is_retried_on_503_and_post_is_not(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(one_route(up.url))
    up.script = [status(503), status(503)]
    async with g.session.get(f"{g.url}/echo/r") as r:
        assert r.status == 200
    assert up.hits == 3

    up.script = [status(503), status(503)]
    async with g.session.post(f"{g.url}/echo/r", data=b"{}") as r:
        assert r.status == 503  # the upstream's own answer, passed through
    assert up.hits == 4


async def test_post_opted_in_by_route_is_retried(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        one_route(up.url)
        .replace("service: echo\n", "service: echo\n    retry: {methods: [GET, POST]}\n", 1)
        .replace("    retry: {methods", "    retry: {methods", 1)
    )
    up.script = [status(503)]
    async with g.session.post(f"{g.url}/echo/r", data=b"{}") as r:
        assert r.status == 200
    assert up.hits == 2


async def test_refused_connection_is_retried_for_get_and_post(start_gateway, make_upstream):
    up = await make_upstream()
    dead = refused_url()
    g = await start_gateway(
        one_route(up.url).replace(f"instances: [{up.url}]", f"instances: [{dead}, {up.url}]")
    )
    for method in ("GET", "POST", "GET", "POST", "POST", "GET"):
        async with g.session.request(method, f"{g.url}/echo/x", data=b"1") as r:
            assert r.status == 200, method
    assert up.hits == 6
    async with g.session.get(f"{g.admin}/metrics") as r:
        text = await r.text()
    assert 'aiagg_gateway_retries_total{reason="connect-error",service="echo"}' in text


async def test_each_retry_goes_to_another_instance(start_gateway, make_upstream):
    a, b = await make_upstream(), await make_upstream()
    g = await start_gateway(
        one_route(a.url).replace(f"instances: [{a.url}]", f"instances: [{a.url}, {b.url}]")
    )
    a.default = b.default = status(503)
    async with g.session.get(f"{g.url}/echo/x") as r:
        assert r.status == 503
    # three attempts over two instances: both were tried, neither twice in a row
    assert a.hits + b.hits == 3
    assert a.hits >= 1 and b.hits >= 1


async def test_all_instances_refusing_gives_502(start_gateway):
    dead = refused_url()
    g = await start_gateway(one_route(dead))
    async with g.session.get(f"{g.url}/echo/x") as r:
        assert r.status == 502
        body = await r.json()
    assert body["error"]["type"] == "bad_gateway"
    assert body["error"]["request_id"] == r.headers["X-Request-ID"]


async def test_breaker_opens_probes_and_closes(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        one_route(
            up.url,
            extra_service="    breaker: {failures: 3, reset_after: 1s, half_open_probes: 1}",
        ).replace("attempts: 3", "attempts: 1")
    )
    up.default = status(500)
    for _ in range(3):
        async with g.session.get(f"{g.url}/echo/x") as r:
            assert r.status == 500
    assert up.hits == 3
    async with g.session.get(f"{g.admin}/breakers") as r:
        snap = (await r.json())["breakers"][0]
    assert snap["state"] == "open" and snap["failures"] >= 3 and snap["opened_at"]

    started = time.monotonic()
    async with g.session.get(f"{g.url}/echo/x") as r:
        assert r.status == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["type"] == "circuit_open"
    assert time.monotonic() - started < 0.2  # answered without contacting the upstream
    assert up.hits == 3

    await asyncio.sleep(1.1)
    up.default = status(200, delay=0.3)  # a slow, healthy probe
    results = await asyncio.gather(*[g.session.get(f"{g.url}/echo/x") for _ in range(10)])
    codes = sorted(r.status for r in results)
    for r in results:
        r.release()
    assert codes.count(200) == 1 and codes.count(503) == 9
    assert up.hits == 4  # exactly one probe went through
    async with g.session.get(f"{g.admin}/breakers") as r:
        assert (await r.json())["breakers"][0]["state"] == "closed"
    async with g.session.get(f"{g.url}/echo/x") as r:
        assert r.status == 200


async def test_4xx_does_not_open_the_breaker(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        one_route(up.url, extra_service="    breaker: {failures: 2, reset_after: 30s}")
    )
    up.default = status(404)
    for _ in range(5):
        async with g.session.get(f"{g.url}/echo/x") as r:
            assert r.status == 404
    async with g.session.get(f"{g.admin}/breakers") as r:
        assert (await r.json())["breakers"][0]["state"] == "closed"


async def test_breaker_counts_only_the_outcomes_it_is_told_to(start_gateway, make_upstream):
    """An upstream whose 503 means "my own dependency is down" can be told apart."""
    up = await make_upstream()
    g = await start_gateway(
        one_route(
            up.url,
            extra_service="    breaker: {failures: 2, reset_after: 30s, "
            "count: [connect-error, 500]}",
        ).replace("attempts: 3", "attempts: 1")
    )
    up.default = status(503)
    for _ in range(4):
        async with g.session.get(f"{g.url}/echo/x") as r:
            assert r.status == 503 and "Retry-After" not in r.headers  # the upstream's own
    async with g.session.get(f"{g.admin}/breakers") as r:
        assert (await r.json())["breakers"][0]["state"] == "closed"
    up.default = status(500)
    for _ in range(2):
        async with g.session.get(f"{g.url}/echo/x") as r:
            assert r.status == 500
    async with g.session.get(f"{g.url}/echo/x") as r:
        assert r.status == 503 and (await r.json())["error"]["type"] == "circuit_open"
    assert up.hits == 6


async def test_a_route_with_its_own_breaker_does_not_cut_off_its_service(
    start_gateway, make_upstream
):
    up = await make_upstream()
    g = await start_gateway(
        one_route(
            up.url,
            extra_route="""
  - name: fragile
    match: {prefix: /fragile/}
    service: echo
    breaker: {failures: 2, reset_after: 30s}
""",
        ).replace("attempts: 3", "attempts: 1")
    )

    async def by_path(request: web.Request) -> web.StreamResponse:
        code = 500 if request.path.startswith("/fragile/") else 200
        return web.json_response({}, status=code)

    up.default = by_path
    for _ in range(2):
        async with g.session.get(f"{g.url}/fragile/x") as r:
            assert r.status == 500
    async with g.session.get(f"{g.url}/fragile/x") as r:
        assert r.status == 503 and (await r.json())["error"]["type"] == "circuit_open"
    async with g.session.get(f"{g.url}/echo/x") as r:
        assert r.status == 200  # the service's own breaker saw none of that
    async with g.session.get(f"{g.admin}/breakers") as r:
        states = {b["service"]: b["state"] for b in (await r.json())["breakers"]}
    assert states == {"echo": "closed", "echo:fragile": "open"}
    async with g.session.get(f"{g.admin}/routes") as r:
        routes = {x["name"]: x["breaker"] for x in (await r.json())["routes"]}
    assert routes == {"echo": "echo", "fragile": "echo:fragile"}
    async with g.session.post(f"{g.admin}/breakers/echo:fragile/close") as r:
        assert (await r.json())["state"] == "closed"


async def test_per_try_timeout_gives_504_at_the_configured_time(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        one_route(up.url, defaults="  timeout: {per_try: 300ms, total: 5s}").replace(
            "attempts: 3", "attempts: 1"
        )
    )
    up.default = status(200, delay=3)
    started = time.monotonic()
    async with g.session.get(f"{g.url}/echo/slow") as r:
        assert r.status == 504
        assert (await r.json())["error"]["type"] == "upstream_timeout"
    elapsed = time.monotonic() - started
    assert 0.28 <= elapsed < 0.8, elapsed


async def test_total_deadline_caps_retries_with_504(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        one_route(up.url, defaults="  timeout: {per_try: 200ms, total: 500ms}").replace(
            "attempts: 3", "attempts: 10, on: [timeout]"
        )
    )
    up.default = status(200, delay=3)
    started = time.monotonic()
    async with g.session.get(f"{g.url}/echo/slow") as r:
        assert r.status == 504
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.0, elapsed
    assert 2 <= up.hits <= 3


async def test_sse_chunks_reach_the_client_before_the_upstream_finishes(
    start_gateway, make_upstream
):
    up = await make_upstream()
    release = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.wait_for(release.wait(), 5)
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    up.default = sse
    g = await start_gateway(one_route(up.url))
    async with g.session.get(f"{g.url}/echo/stream") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 2)
        assert first == b"data: first\n\n"
        release.set()  # only now may the upstream finish
        rest = await asyncio.wait_for(r.content.read(), 2)
    assert rest == b"data: second\n\n"


async def test_large_streamed_bodies_flow_both_ways(start_gateway, make_upstream):
    up = await make_upstream()

    async def echo_body(request: web.Request) -> web.StreamResponse:
        body = up.seen[-1]["body"]
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(0, len(body), 100_000):
            await resp.write(body[i : i + 100_000])
        await resp.write_eof()
        return resp

    up.default = echo_body
    g = await start_gateway(one_route(up.url))
    payload = bytes(range(256)) * 8000  # 2 MB, above the buffering threshold

    async def gen():
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    async with g.session.post(f"{g.url}/echo/big", data=gen()) as r:
        assert r.status == 200
        got = await r.read()
    assert got == payload


async def test_oversized_body_is_413_and_gateway_keeps_serving(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(one_route(up.url, defaults="  limits: {max_body: 1KiB}"))
    async with g.session.post(f"{g.url}/echo/x", data=b"x" * 2048) as r:
        assert r.status == 413
        assert (await r.json())["error"]["type"] == "payload_too_large"
    assert up.hits == 0

    async def gen():
        for _ in range(4):
            yield b"y" * 1000

    async with g.session.post(f"{g.url}/echo/x", data=gen()) as r:  # chunked, no length
        assert r.status == 413
    async with g.session.get(f"{g.url}/echo/ok") as r:
        assert r.status == 200


async def test_unknown_route_404_and_wrong_method_405(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        one_route(
            up.url,
            extra_route="""
  - name: only-post
    match: {path: /submit, methods: [POST]}
    service: echo
""",
        )
    )
    async with g.session.get(f"{g.url}/nowhere") as r:
        assert r.status == 404
        body = await r.json()
        assert body["error"]["type"] == "route_not_found"
        assert body["error"]["request_id"]
    async with g.session.get(f"{g.url}/submit") as r:
        assert r.status == 405
        assert r.headers["Allow"] == "POST"
        assert (await r.json())["error"]["type"] == "method_not_allowed"


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.read(65536), 3)
    writer.close()
    return got


async def test_malformed_requests_get_json_errors_and_gateway_keeps_serving(
    start_gateway, make_upstream
):
    up = await make_upstream()
    g = await start_gateway(one_route(up.url, defaults="  limits: {max_headers: 4KiB}"))
    port = g.gw.public_port
    raw = await _raw(port, b"THIS IS NOT HTTP\r\n\r\n")
    assert raw.split(b" ")[1] == b"400"
    assert b'"type": "bad_request"' in raw
    raw = await _raw(port, b"GET /echo/x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    assert raw.split(b" ")[1] == b"400"
    raw = await _raw(
        port, b"GET /echo/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    )
    assert raw.split(b" ")[1] == b"431"
    async with g.session.get(f"{g.url}/echo/x", headers={"X-Many": "b" * 5000}) as r:
        assert r.status == 431  # over the route's header limit
        assert (await r.json())["error"]["type"] == "headers_too_large"
    async with g.session.get(f"{g.url}/echo/fine") as r:
        assert r.status == 200
    assert up.hits == 1


async def test_a_client_hanging_up_before_the_answer_is_quiet(
    start_gateway, make_upstream, caplog
):
    up = await make_upstream()

    async def late_stream(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)  # the client is gone by now
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: x\n\n")
        return resp

    up.default = late_stream
    g = await start_gateway(one_route(up.url))
    _reader, writer = await asyncio.open_connection("127.0.0.1", g.gw.public_port)
    writer.write(b"GET /echo/stream HTTP/1.1\r\nHost: a\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await asyncio.sleep(0.6)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors == []
    async with g.session.get(f"{g.admin}/metrics") as r:
        text = await r.text()
    assert 'aiagg_gateway_requests_total{route="echo",service="echo",status="499"}' in text
    up.default = None
    async with g.session.get(f"{g.url}/echo/x") as r:
        assert r.status == 200


async def test_gateways_with_reuse_port_share_the_public_port(start_gateway, make_upstream):
    """GATEWAY_REUSE_PORT: two gateways listen on one port and the kernel spreads new
    connections over both (each routes to its own upstream, so the hits tell who
    served); without it, the second gateway's start fails on the taken port."""
    up_a, up_b = await make_upstream(), await make_upstream()
    a = await start_gateway(one_route(up_a.url), reuse_port=True)
    b = await start_gateway(one_route(up_b.url), reuse_port=True, port=a.gw.public_port)
    assert b.gw.public_port == a.gw.public_port
    for _ in range(40):  # a new connection each time: the kernel picks a listener per connection
        async with a.session.get(f"{a.url}/echo/x", headers={"Connection": "close"}) as r:
            assert r.status == 200
    assert up_a.hits + up_b.hits == 40
    assert up_a.hits > 0 and up_b.hits > 0
    with pytest.raises(OSError) as taken:
        await start_gateway(one_route(up_a.url), port=a.gw.public_port)
    assert taken.value.errno == errno.EADDRINUSE

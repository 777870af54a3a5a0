"""Forward-auth, the admin API and live reload, through real sockets."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway import metrics
from tests.support import refused_url


def with_auth(app_url: str, auth_url: str, ttl: str = "5s") -> str:
    return f"""
defaults:
  retry: {{attempts: 2, backoff: {{initial: 10ms, max: 20ms}}}}
auth_policies:
  api_key:
    service: auth
    path: /auth/validate
    cache_ttl: {ttl}
    forward_headers: [X-User-Id, X-Key-Id]
services:
  app:
    instances: [{app_url}]
  auth:
    instances: [{auth_url}]
routes:
  - name: private
    match: {{prefix: /private/}}
    service: app
    auth: api_key
  - name: public
    match: {{prefix: /public/}}
    service: app
"""


def validator(valid: dict[str, str]):
    """An auth upstream: a bearer key maps to a user id."""

    async def answer(request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if key in valid:
            return web.json_response(
                {"user_id": valid[key]},
                headers={"X-User-Id": valid[key], "X-Key-Id": f"key-{key}", "X-Other": "no"},
            )
        return web.json_response(
            {"error": {"type": "invalid_api_key", "message": "unknown API key"}}, status=401
        )

    return answer


async def test_forward_auth_sets_identity_and_strips_client_headers(start_gateway, make_upstream):
    app, auth = await make_upstream(), await make_upstream()
    auth.default = validator({"good": "alice"})
    g = await start_gateway(with_auth(app.url, auth.url))
    spoof = {"Authorization": "Bearer good", "X-User-Id": "mallory", "x-key-id": "stolen"}
    async with g.session.get(f"{g.url}/private/me", headers=spoof) as r:
        assert r.status == 200
    raw = app.seen[-1]["raw_headers"]
    assert [v for k, v in raw if k.lower() == "x-user-id"] == ["alice"]
    assert [v for k, v in raw if k.lower() == "x-key-id"] == ["key-good"]
    assert "X-Other" not in app.seen[-1]["headers"]  # only the listed headers are copied
    # the auth service saw the credential and the request id
    assert auth.seen[-1]["headers"]["Authorization"] == "Bearer good"
    assert auth.seen[-1]["headers"]["X-Request-ID"] == r.headers["X-Request-ID"]

    # a route without auth never passes a client-sent identity either
    async with g.session.get(f"{g.url}/public/x", headers={"X-User-Id": "mallory"}) as r:
        assert r.status == 200
    assert "X-User-Id" not in app.seen[-1]["headers"]


async def test_bad_or_missing_key_is_401_and_never_reaches_upstream(start_gateway, make_upstream):
    app, auth = await make_upstream(), await make_upstream()
    auth.default = validator({"good": "alice"})
    g = await start_gateway(with_auth(app.url, auth.url))
    async with g.session.get(f"{g.url}/private/x", headers={"Authorization": "Bearer bad"}) as r:
        assert r.status == 401
        body = await r.json()
        assert body["error"]["type"] == "unauthorized"
        assert body["error"]["message"] == "unknown API key"
    async with g.session.get(f"{g.url}/private/x") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert app.hits == 0


async def test_positive_answers_are_cached_for_the_ttl(start_gateway, make_upstream):
    app, auth = await make_upstream(), await make_upstream()
    auth.default = validator({"good": "alice"})
    g = await start_gateway(with_auth(app.url, auth.url, ttl="300ms"))
    h = {"Authorization": "Bearer good"}
    for _ in range(3):
        async with g.session.get(f"{g.url}/private/x", headers=h) as r:
            assert r.status == 200
    assert auth.hits == 1
    await asyncio.sleep(0.35)
    async with g.session.get(f"{g.url}/private/x", headers=h) as r:
        assert r.status == 200
    assert auth.hits == 2
    # negative answers are not cached: each bad attempt asks again
    for _ in range(2):
        async with g.session.get(f"{g.url}/private/x", headers={"Authorization": "Bearer no"}):
            pass
    assert auth.hits == 4


async def test_auth_unreachable_fails_closed_with_503(start_gateway, make_upstream):
    app = await make_upstream()
    dead = refused_url()
    g = await start_gateway(with_auth(app.url, dead))
    async with g.session.get(f"{g.url}/private/x", headers={"Authorization": "Bearer k"}) as r:
        assert r.status == 503
        assert "Retry-After" in r.headers
        assert (await r.json())["error"]["type"] == "auth_unavailable"
    assert app.hits == 0


async def test_reload_serves_new_route_and_refuses_broken_file(start_gateway, make_upstream):
    up = await make_upstream()
    base = f"""
services:
  echo:
    instances: [{up.url}]
routes:
  - name: one
    match: {{prefix: /one/}}
    service: echo
"""
    g = await start_gateway(base)
    refused_before = metrics.RELOADS.labels("error")._value.get()
    async with g.session.get(f"{g.url}/two/x") as r:
        assert r.status == 404
    g.write(base + "  - name: two\n    match: {prefix: /two/}\n    service: echo\n")
    async with g.session.post(f"{g.admin}/reload") as r:
        assert r.status == 200
        assert (await r.json()) == {"reloaded": True, "routes": 2, "source": str(g.routes_file)}
    async with g.session.get(f"{g.url}/two/x") as r:
        assert r.status == 200

    g.write(base + "  - name: three\n    match: {prefix: /three/}\n    service: nowhere\n")
    async with g.session.post(f"{g.admin}/reload") as r:
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["type"] == "invalid_config"
    assert f"{g.routes_file}:" in err["message"] and "nowhere" in err["message"]
    # the previous good routes keep serving
    async with g.session.get(f"{g.url}/two/x") as r:
        assert r.status == 200
    async with g.session.get(f"{g.admin}/metrics") as r:
        text = await r.text()
    refused = float(text.split('aiagg_gateway_config_reloads_total{result="error"} ')[1].split()[0])
    assert refused == refused_before + 1
    assert "aiagg_gateway_config_last_reload_successful 0.0" in text


async def test_in_flight_request_finishes_on_its_config_during_reload(start_gateway, make_upstream):
    up = await make_upstream()
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(gate.wait(), 5)
        return web.json_response({"ok": 1})

    arrived = asyncio.Event()

    async def slow_and_tell(request: web.Request) -> web.StreamResponse:
        arrived.set()
        return await slow(request)

    up.default = slow_and_tell
    base = f"""
services:
  echo:
    instances: [{up.url}]
routes:
  - name: one
    match: {{prefix: /one/}}
    service: echo
"""
    g = await start_gateway(base)
    pending = asyncio.ensure_future(g.session.get(f"{g.url}/one/x"))
    await asyncio.wait_for(arrived.wait(), 5)
    g.write(base.replace("/one/", "/uno/"))
    async with g.session.post(f"{g.admin}/reload") as r:
        assert r.status == 200
    gate.set()
    resp = await pending
    assert resp.status == 200
    resp.release()
    async with g.session.get(f"{g.url}/one/x") as r:
        assert r.status == 404


async def test_admin_reports_routes_upstreams_breakers(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        f"""
services:
  echo:
    instances: [{up.url}]
    breaker: {{failures: 2, reset_after: 10s}}
routes:
  - name: echo
    match: {{path: "/items/{{id}}", methods: [GET]}}
    service: echo
    timeout: {{total: 2s}}
"""
    )
    async with g.session.get(f"{g.admin}/routes") as r:
        routes = (await r.json())["routes"]
    assert routes[0]["name"] == "echo"
    assert routes[0]["timeout"]["total"] == 2.0
    assert routes[0]["retry"]["methods"] == ["DELETE", "GET", "HEAD", "OPTIONS", "PUT", "TRACE"]
    async with g.session.get(f"{g.admin}/upstreams") as r:
        svc = (await r.json())["services"][0]
    assert svc["service"] == "echo" and svc["source"] == "static"
    assert svc["instances"][0]["url"] == up.url
    async with g.session.post(f"{g.admin}/breakers/echo/open") as r:
        assert (await r.json())["state"] == "open"
    async with g.session.get(f"{g.url}/items/1") as r:
        assert r.status == 503
    async with g.session.get(f"{g.admin}/breakers") as r:
        b = (await r.json())["breakers"][0]
    assert b["service"] == "echo" and b["state"] == "open" and b["forced"] is True
    assert b["opened_at"].endswith(("Z", "+00:00"))
    async with g.session.post(f"{g.admin}/breakers/echo/close") as r:
        assert (await r.json())["state"] == "closed"
    async with g.session.get(f"{g.url}/items/1") as r:
        assert r.status == 200
    async with g.session.post(f"{g.admin}/breakers/nope/reset") as r:
        assert r.status == 404
    async with g.session.get(f"{g.admin}/metrics") as r:
        text = await r.text()
    for name in (
        "aiagg_gateway_requests_total",
        "aiagg_gateway_request_duration_seconds_bucket",
        "aiagg_gateway_breaker_state",
        "aiagg_gateway_breaker_transitions_total",
    ):
        assert name in text
    async with g.session.get(f"{g.admin}/healthz") as r:
        assert r.status == 200
    async with g.session.get(f"{g.admin}/readyz") as r:
        assert r.status == 200


async def test_admin_token_is_required_when_set(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(
        f"services:\n  echo:\n    instances: [{up.url}]\nroutes: []\n", admin_token="s3cret"
    )
    async with g.session.get(f"{g.admin}/routes") as r:
        assert r.status == 401
    async with g.session.get(f"{g.admin}/routes", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401
    async with g.session.get(f"{g.admin}/routes", headers={"Authorization": "Bearer s3cret"}) as r:
        assert r.status == 200
    async with g.session.get(f"{g.admin}/healthz") as r:
        assert r.status == 200


async def test_concurrent_requests_with_one_key_ask_auth_once(start_gateway, make_upstream):
    app, auth = await make_upstream(), await make_upstream()
    answer = validator({"good": "alice"})

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return await answer(request)

    auth.default = slow
    g = await start_gateway(with_auth(app.url, auth.url, ttl="0s"))
    good = [
        g.session.get(f"{g.url}/private/x", headers={"Authorization": "Bearer good"})
        for _ in range(20)
    ]
    results = await asyncio.gather(*good)
    assert [r.status for r in results] == [200] * 20
    for r in results:
        r.release()
    assert auth.hits == 1  # one question answered twenty requests
    refused = await asyncio.gather(
        *[
            g.session.get(f"{g.url}/private/x", headers={"Authorization": "Bearer nope"})
            for _ in range(5)
        ]
    )
    assert [r.status for r in refused] == [401] * 5
    for r in refused:
        r.release()
    assert auth.hits == 2

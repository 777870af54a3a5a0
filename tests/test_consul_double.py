"""The Consul double answers like Consul does (checked with raw HTTP, not our client)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from tests.consul_double import ConsulDouble, parse_go_duration


@pytest.fixture
async def consul():
    double = ConsulDouble()
    await double.start()
    yield double
    await double.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def _get(http, url, **params):
    async with http.get(url, params=params) as resp:
        if resp.content_type != "application/json":
            return resp.status, resp.headers, await resp.text()
        return resp.status, resp.headers, await resp.json()


async def _put(http, url, body=None, headers=None):
    async with http.put(url, json=body, headers=headers) as resp:
        return resp.status, await resp.text()


def test_go_durations():
    assert parse_go_duration("30s") == 30
    assert parse_go_duration("500ms") == 0.5
    assert parse_go_duration("1m30s") == 90
    with pytest.raises(ValueError):
        parse_go_duration("10 seconds")


async def test_register_defaults_and_health_shape(consul, http):
    status, _ = await _put(http, consul.url + "/v1/agent/service/register",
                           {"Name": "web", "Port": 8080, "Check": {"TTL": "30s"}})
    assert status == 200
    assert "web" in consul.services  # ID defaults to Name
    status, headers, entries = await _get(http, consul.url + "/v1/health/service/web")
    assert status == 200 and int(headers["X-Consul-Index"]) > 0
    [entry] = entries
    assert entry["Service"]["ID"] == "web" and entry["Service"]["Address"] == ""
    assert entry["Node"]["Address"] == "127.0.0.1"
    checks = {c["CheckID"]: c for c in entry["Checks"]}
    assert checks["serfHealth"]["Status"] == "passing"
    assert checks["service:web"]["Status"] == "critical"  # a new check starts critical
    # ?passing drops it until its check passes.
    assert (await _get(http, consul.url + "/v1/health/service/web", passing="true"))[2] == []
    assert (await _put(http, consul.url + "/v1/agent/check/pass/service:web"))[0] == 200
    assert len((await _get(http, consul.url + "/v1/health/service/web", passing="1"))[2]) == 1


async def test_passing_filter_counts_node_check_and_no_check_services(consul, http):
    await _put(http, consul.url + "/v1/agent/service/register",
               {"Name": "api", "ID": "api-1", "Port": 1})  # no checks: passing
    await _put(http, consul.url + "/v1/agent/service/register",
               {"Name": "api", "ID": "api-2", "Port": 2, "Check": {"TTL": "9s",
                                                                     "Status": "passing"}})
    ids = {e["Service"]["ID"] for e in
           (await _get(http, consul.url + "/v1/health/service/api", passing="true"))[2]}
    assert ids == {"api-1", "api-2"}
    consul.set_check_status("api-2", "warning")  # warning is not passing
    ids = {e["Service"]["ID"] for e in
           (await _get(http, consul.url + "/v1/health/service/api", passing="true"))[2]}
    assert ids == {"api-1"}
    consul.set_node_health("critical")  # serfHealth fails: nothing on the node passes
    assert (await _get(http, consul.url + "/v1/health/service/api", passing="true"))[2] == []
    assert len((await _get(http, consul.url + "/v1/health/service/api"))[2]) == 2


async def test_tag_filter_all_must_match(consul, http):
    for sid, tags in (("a", ["v1", "primary"]), ("b", ["v1"]), ("c", ["V2"])):
        await _put(http, consul.url + "/v1/agent/service/register",
                   {"Name": "db", "ID": sid, "Port": 1, "Tags": tags})
    url = consul.url + "/v1/health/service/db"
    async with http.get(url, params=[("tag", "v1"), ("tag", "primary")]) as resp:
        assert [e["Service"]["ID"] for e in await resp.json()] == ["a"]
    async with http.get(url, params=[("tag", "v2")]) as resp:  # case-insensitive, like Consul
        assert [e["Service"]["ID"] for e in await resp.json()] == ["c"]


async def test_blocking_returns_on_change(consul, http):
    _, headers, _ = await _get(http, consul.url + "/v1/health/service/web")
    index = int(headers["X-Consul-Index"])
    started = time.monotonic()
    query = asyncio.create_task(
        _get(http, consul.url + "/v1/health/service/web", index=str(index), wait="5s")
    )
    await asyncio.sleep(0.2)
    assert not query.done()  # held
    consul.register({"Name": "web", "Port": 80})
    _, headers, entries = await query
    assert time.monotonic() - started < 1.0
    assert int(headers["X-Consul-Index"]) > index and len(entries) == 1


async def test_blocking_times_out_with_same_index(consul, http):
    consul.register({"Name": "web", "Port": 80})
    _, headers, _ = await _get(http, consul.url + "/v1/health/service/web")
    index = headers["X-Consul-Index"]
    consul.register({"Name": "other", "Port": 81})  # an unrelated write does not wake it
    started = time.monotonic()
    _, headers2, _ = await _get(http, consul.url + "/v1/health/service/web",
                                index=index, wait="500ms")
    held = time.monotonic() - started
    assert 0.45 <= held <= 0.5 * 17 / 16 + 0.5
    assert headers2["X-Consul-Index"] == index


async def test_blocking_answers_at_once_when_index_is_behind(consul, http):
    consul.register({"Name": "web", "Port": 80})
    started = time.monotonic()
    _, headers, _ = await _get(http, consul.url + "/v1/health/service/web", index="1", wait="5s")
    assert time.monotonic() - started < 0.5 and int(headers["X-Consul-Index"]) > 1
    status, _, _ = await _get(http, consul.url + "/v1/health/service/web", index="x")
    assert status == 400


async def test_reset_index_goes_backwards(consul, http):
    for port in range(5):
        consul.register({"Name": "web", "ID": f"w{port}", "Port": 1000 + port})
    _, headers, _ = await _get(http, consul.url + "/v1/health/service/web")
    before = int(headers["X-Consul-Index"])
    consul.reset_index(2)
    _, headers, _ = await _get(http, consul.url + "/v1/health/service/web")
    assert int(headers["X-Consul-Index"]) <= 2 < before


async def test_catalog_services(consul, http):
    consul.register({"Name": "web", "ID": "w1", "Port": 1, "Tags": ["a"]})
    consul.register({"Name": "web", "ID": "w2", "Port": 2, "Tags": ["a", "b"]})
    status, headers, body = await _get(http, consul.url + "/v1/catalog/services")
    assert status == 200 and "X-Consul-Index" in headers
    assert body == {"consul": [], "web": ["a", "b"]}


async def test_deregister_and_errors(consul, http):
    status, text = await _put(http, consul.url + "/v1/agent/service/register", {"Port": 1})
    assert status == 400 and "Missing service name" in text
    consul.register({"Name": "web", "Port": 80, "Check": {"HTTP": "http://x/", "Interval": "9s"}})
    status, text = await _put(http, consul.url + "/v1/agent/check/pass/service:web")
    assert status == 500 and "TTL" in text  # only TTL checks take updates
    assert (await _put(http, consul.url + "/v1/agent/service/deregister/web"))[0] == 200
    assert consul.services == {}
    assert (await _put(http, consul.url + "/v1/agent/service/deregister/web"))[0] == 404


async def test_acl_token(http):
    consul = ConsulDouble(acl_token="s3cret")
    await consul.start()
    try:
        body = {"Name": "web", "Port": 80}
        status, text = await _put(http, consul.url + "/v1/agent/service/register", body,
                                  {"X-Consul-Token": "wrong"})
        assert (status, text) == (403, "ACL not found")
        status, text = await _put(http, consul.url + "/v1/agent/service/register", body)
        assert status == 403 and text.startswith("Permission denied")
        status, _ = await _put(http, consul.url + "/v1/agent/service/register", body,
                               {"X-Consul-Token": "s3cret"})
        assert status == 200
        # The anonymous token reads nothing, and is told so by a header.
        status, headers, entries = await _get(http, consul.url + "/v1/health/service/web")
        assert status == 200 and entries == []
        assert headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
        assert [r.token for r in consul.requests] == ["wrong", None, "s3cret", None]
    finally:
        await consul.stop()


async def test_stop_cuts_held_queries_and_restart_keeps_state(consul, http):
    consul.register({"Name": "web", "Port": 80})
    port = consul.port
    _, headers, _ = await _get(http, consul.url + "/v1/health/service/web")
    held = asyncio.create_task(_get(http, consul.url + "/v1/health/service/web",
                                    index=headers["X-Consul-Index"], wait="10s"))
    await asyncio.sleep(0.1)
    await consul.stop()
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(held, 2)
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(http, f"http://127.0.0.1:{port}/v1/health/service/web")
    await consul.start()
    assert consul.port == port
    assert len((await _get(http, consul.url + "/v1/health/service/web"))[2]) == 1


async def test_runs_http_checks(aiohttp_server):
    healthy = {"ok": True}

    async def health(request):
        return web.Response(status=200 if healthy["ok"] else 503)

    app = web.Application()
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    consul = ConsulDouble(run_http_checks=True)
    await consul.start()
    try:
        consul.register({"Name": "svc", "Port": server.port, "Check": {
            "HTTP": f"http://127.0.0.1:{server.port}/health", "Interval": "100ms"}})
        for _ in range(50):
            if consul.checks_of("svc")[0]["Status"] == "passing":
                break
            await asyncio.sleep(0.05)
        assert consul.checks_of("svc")[0]["Status"] == "passing"
        healthy["ok"] = False
        for _ in range(50):
            if consul.checks_of("svc")[0]["Status"] == "critical":
                break
            await asyncio.sleep(0.05)
        assert consul.checks_of("svc")[0]["Status"] == "critical"
    finally:
        await consul.stop()

"""Consul client, resolver and self-registration, through real sockets against the double."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port
from prometheus_client import REGISTRY

from gateway import registration as registration_module
from gateway.clock import ManualClock
from gateway.consul import (
    RETRY_INITIAL,
    RETRY_MAX,
    ConsulClient,
    ConsulError,
    ConsulSettings,
    backoff_delays,
    format_wait,
    normalize_addr,
)
from gateway.consul_resolver import ConsulResolver, build_resolver, instances_from_entries
from gateway.discovery import DiscoveryRouter, ServiceDiscovery
from gateway.registration import ServiceRegistration, registration_ctx
from tests.consul_double import ConsulDouble
from tests.support import seconds_until

WAIT = 1.0  # blocking wait in these tests: short, so restarts and resets stay quick


@pytest.fixture
async def consul():
    double = ConsulDouble()
    await double.start()
    yield double
    await double.stop()


@pytest.fixture
async def make_resolver():
    made: list[ConsulResolver] = []

    def make(double: ConsulDouble, **kw) -> ConsulResolver:
        token = kw.pop("token", None)
        opts = {"wait": WAIT, "backoff_initial": 0.05, "backoff_max": 0.2,
                "first_answer_timeout": 2.0} | kw
        resolver = ConsulResolver(ConsulClient(double.addr, token), **opts)
        made.append(resolver)
        return resolver

    yield make
    for r in made:
        await r.close()


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 3.0) -> float:
    """Poll until ``check()`` is true; returns the seconds it took."""
    return await seconds_until(check, within)


def service(name: str, sid: str, port: int, *, tags=(), status: str | None = "passing",
            address: str = "127.0.0.1") -> dict:
    body = {"Name": name, "ID": sid, "Address": address, "Port": port, "Tags": list(tags),
            "Meta": {"version": "1.0"}}
    if status is not None:
        body["Check"] = {"TTL": "30s", "Status": status}
    return body


def urls(instances) -> list[str]:
    return [i.url for i in instances]


def gauge(name: str, service_name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"service": service_name, "source": "consul"})


# -- settings and client -------------------------------------------------------------------


def test_addr_forms_like_consul_cli(monkeypatch):
    assert normalize_addr("127.0.0.1:8500") == "http://127.0.0.1:8500"
    assert normalize_addr("http://consul:8500/") == "http://consul:8500"
    assert normalize_addr("consul:8501", ssl=True) == "https://consul:8501"
    with pytest.raises(ValueError, match="CONSUL_HTTP_ADDR"):
        normalize_addr("unix:///tmp/consul.sock")

    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    assert ConsulSettings().enabled is False
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "")
    assert ConsulSettings().http_addr is None
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "10.0.0.5:8500")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "tok")
    settings = ConsulSettings()
    assert settings.base_url == "http://10.0.0.5:8500" and settings.http_token == "tok"
    assert "tok" not in repr(settings)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "ftp://x")
    with pytest.raises(ValueError):
        ConsulSettings()


def test_wait_format_and_backoff():
    assert format_wait(30) == "30s" and format_wait(1.5) == "1500ms"
    assert format_wait(5000) == "600s"  # Consul's cap
    delays = backoff_delays(0.5, 4.0)
    got = [next(delays) for _ in range(8)]
    assert 0.25 <= got[0] <= 0.5 and all(2.0 <= d <= 4.0 for d in got[4:])


def test_a_failing_consul_is_retried_at_most_5s_apart():
    """After a long outage the watchers and the registration try again within 5 s, so
    discovery is fresh (and a service registered) seconds after the agent is back."""
    delays = backoff_delays()
    got = [next(delays) for _ in range(40)]
    assert 0.25 <= got[0] <= 0.5 and max(got) <= RETRY_MAX == 5.0
    assert max(got[6:]) >= RETRY_MAX / 2  # it does back off: a dead agent is not hammered
    for cls in (ConsulResolver, ServiceRegistration):
        params = inspect.signature(cls).parameters
        assert params["backoff_max"].default == RETRY_MAX
        assert params["backoff_initial"].default == RETRY_INITIAL
    # an agent that lost its data learns of the service again within one check interval
    assert inspect.signature(ServiceRegistration).parameters["recheck_interval"].default <= 10


def test_instances_from_entries_fall_back_to_node_address():
    entries = [
        {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "a", "Address": "", "Port": 80,
                                                      "Tags": None, "Meta": None}},
        {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "b", "Address": "::1", "Port": 81}},
        {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "c", "Address": "x", "Port": 0}},
    ]
    assert urls(instances_from_entries(entries)) == ["http://10.0.0.1:80", "http://[::1]:81"]


async def test_client_register_health_and_catalog(consul):
    client = ConsulClient(consul.addr)
    try:
        await client.agent_service_register(service("web", "web-1", 8080, tags=["v1"]))
        index, entries = await client.health_service("web", passing=True)
        assert index > 0 and [e["Service"]["ID"] for e in entries] == ["web-1"]
        _, services = await client.catalog_services()
        assert services["web"] == ["v1"]
        assert (await client.agent_service("web-1"))["Port"] == 8080
        await client.agent_check_update("service:web-1", "critical", "down")
        assert (await client.health_service("web"))[1] == []
        await client.agent_service_deregister("web-1")
        assert await client.agent_service("web-1") is None
        with pytest.raises(ConsulError) as err:
            await client.agent_service_deregister("web-1")
        assert err.value.status == 404
        with pytest.raises(ConsulError) as err:
            await client.agent_service_register({"Port": 1})
        assert err.value.status == 400 and "Missing service name" in str(err.value)
    finally:
        await client.close()


async def test_client_blocking_timeout_exceeds_wait_and_jitter(consul):
    # The base HTTP timeout (0.2 s) is far below the wait: the client must add wait + wait/16.
    client = ConsulClient(consul.addr, timeout=0.2)
    try:
        index, _ = await client.health_service("web")
        started = time.monotonic()
        index2, entries = await client.health_service("web", index=index, wait=0.6)
        assert time.monotonic() - started >= 0.55
        assert (index2, entries) == (index, [])
        assert consul.requests[-1].query["wait"] == ["600ms"]
    finally:
        await client.close()


async def test_client_errors_say_what_to_check():
    client = ConsulClient(f"127.0.0.1:{unused_port()}")
    try:
        with pytest.raises(ConsulError) as err:
            await client.health_service("web")
        assert err.value.status is None and "CONSUL_HTTP_ADDR" in str(err.value)
    finally:
        await client.close()


async def test_token_is_sent_and_bad_token_explained():
    consul = ConsulDouble(acl_token="s3cret")
    await consul.start()
    good = ConsulClient(consul.addr, "s3cret")
    bad = ConsulClient(consul.addr, "nope")
    try:
        await good.agent_service_register(service("web", "web-1", 80))
        _, entries = await good.health_service("web")
        assert len(entries) == 1
        assert {r.token for r in consul.requests} == {"s3cret"}
        with pytest.raises(ConsulError) as err:
            await bad.health_service("web")
        assert err.value.status == 403 and "CONSUL_HTTP_TOKEN" in str(err.value)
    finally:
        await good.close()
        await bad.close()
        await consul.stop()


# -- the resolver -------------------------------------------------------------------------


async def test_new_instance_seen_within_one_blocking_round(consul, make_resolver):
    resolver = make_resolver(consul, wait=10.0)  # a long wait: a change must not wait for it
    await resolver.configure({"billing": ServiceDiscovery("billing", "consul")})
    assert await resolver.resolve("billing") == ()
    await eventually(lambda: resolver.status()["billing"].index > 0)
    await asyncio.sleep(0.1)  # the watcher is now parked in a blocking query
    consul.register(service("billing", "billing-1", 3004))
    took = await eventually(lambda: len(resolver.status()["billing"].instances) == 1)
    assert took < 1.0  # far under the 10 s wait
    [inst] = await resolver.resolve("billing")
    assert inst.url == "http://127.0.0.1:3004" and inst.id == "billing-1"
    assert inst.meta == {"version": "1.0"}
    assert gauge("aiagg_gateway_discovery_instances", "billing") == 1
    assert gauge("aiagg_gateway_discovery_staleness_seconds", "billing") == 0
    blocking = [r for r in consul.requests if r.path == "/v1/health/service/billing"]
    assert blocking[0].query.get("index") is None  # the first read does not block
    assert blocking[-1].query["wait"] == ["10s"] and blocking[-1].query["passing"] == ["true"]


async def test_first_resolve_waits_for_the_first_answer(consul, make_resolver):
    consul.register(service("auth", "auth-1", 3001))
    resolver = make_resolver(consul)
    await resolver.configure({"auth": ServiceDiscovery("auth", "consul")})
    assert urls(await resolver.resolve("auth")) == ["http://127.0.0.1:3001"]
    assert await resolver.resolve("unknown") == ()


async def test_first_answer_timeout_when_consul_hangs(make_resolver):
    writers = []

    async def never_answer(reader, writer):
        writers.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    resolver = ConsulResolver(ConsulClient(f"127.0.0.1:{port}"), first_answer_timeout=0.3)
    try:
        await resolver.configure({"auth": ServiceDiscovery("auth", "consul")})
        started = time.monotonic()
        assert await resolver.resolve("auth") == ()
        assert 0.25 <= time.monotonic() - started < 1.0
    finally:
        await resolver.close()
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def test_critical_check_removes_instance(consul, make_resolver):
    consul.register(service("proxy", "proxy-1", 3003))
    consul.register(service("proxy", "proxy-2", 3013))
    resolver = make_resolver(consul, wait=10.0)
    await resolver.configure({"proxy": ServiceDiscovery("proxy", "consul")})
    assert len(await resolver.resolve("proxy")) == 2
    await asyncio.sleep(0.1)  # parked in a blocking query
    consul.set_check_status("proxy-2", "critical")
    took = await eventually(lambda: len(resolver.status()["proxy"].instances) == 1)
    assert took < 1.0
    assert urls(await resolver.resolve("proxy")) == ["http://127.0.0.1:3003"]
    consul.set_check_status("proxy-1", "warning")  # ?passing excludes warning too
    await eventually(lambda: resolver.status()["proxy"].instances == [])


async def test_consul_down_serves_last_known_then_recovers(consul, make_resolver):
    clock = ManualClock()
    consul.register(service("billing", "billing-1", 3004))
    resolver = make_resolver(consul, clock=clock)
    await resolver.configure({"billing": ServiceDiscovery("billing", "consul")})
    assert len(await resolver.resolve("billing")) == 1
    last_ok_wall = resolver.status()["billing"].updated_at
    assert last_ok_wall == clock.now()

    await consul.stop()
    await eventually(lambda: resolver.status()["billing"].error is not None)
    clock.advance(7)
    st = resolver.status()["billing"]
    assert urls(await resolver.resolve("billing")) == ["http://127.0.0.1:3004"]
    assert st.source == "consul" and st.stale_seconds == 7.0 and st.updated_at == last_ok_wall
    assert "cannot reach Consul" in st.error
    await eventually(lambda: gauge("aiagg_gateway_discovery_staleness_seconds", "billing") == 7)
    assert gauge("aiagg_gateway_discovery_instances", "billing") == 1

    # Consul comes back on the same address: watching resumes, new registrations are seen.
    await consul.start()
    consul.register(service("billing", "billing-2", 3014))
    await eventually(lambda: len(resolver.status()["billing"].instances) == 2)
    st = resolver.status()["billing"]
    assert st.error is None and st.stale_seconds == 0 and st.updated_at == clock.now()
    assert gauge("aiagg_gateway_discovery_staleness_seconds", "billing") == 0


async def test_backoff_does_not_hammer_a_dead_consul(make_resolver):
    dead = ConsulDouble()
    await dead.start()
    await dead.stop()
    requests = 0
    resolver = make_resolver(dead, backoff_initial=0.1, backoff_max=0.4)
    real = resolver._client.health_service

    async def counting(*a, **kw):
        nonlocal requests
        requests += 1
        return await real(*a, **kw)

    resolver._client.health_service = counting
    await resolver.configure({"x": ServiceDiscovery("x", "consul")})
    await asyncio.sleep(1.5)
    # 0.05-0.1, 0.1-0.2, 0.2-0.4, then 0.2-0.4 each: at most ~8 tries in 1.5 s.
    assert 2 <= requests <= 10


async def test_index_going_backwards_resets_the_watch(consul, make_resolver, caplog):
    for i in range(5):
        consul.register(service("orchestrator", f"o-{i}", 3100 + i, status="critical"))
    consul.register(service("orchestrator", "o-ok", 3002))
    resolver = make_resolver(consul)
    await resolver.configure({"orchestrator": ServiceDiscovery("orchestrator", "consul")})
    assert len(await resolver.resolve("orchestrator")) == 1
    high = resolver.status()["orchestrator"].index
    await asyncio.sleep(0.1)

    caplog.set_level(logging.INFO, logger="gateway.consul_resolver")
    consul.reset_index(2)  # e.g. a snapshot restore: the index is now far below the watcher's
    consul.register(service("orchestrator", "o-new", 3012))
    await eventually(lambda: len(resolver.status()["orchestrator"].instances) == 2,
                     within=WAIT * 2 + 1)
    assert any("went backwards" in r.getMessage() for r in caplog.records)
    assert resolver.status()["orchestrator"].index < high
    # ...and the watch keeps working from the new, lower index.
    consul.set_check_status("o-new", "critical")
    took = await eventually(lambda: len(resolver.status()["orchestrator"].instances) == 1)
    assert took < 0.5


async def test_zero_index_never_busy_loops(consul, make_resolver):
    consul.zero_index_bug = True  # old Consul versions could answer X-Consul-Index: 0
    resolver = make_resolver(consul, wait=1.0, min_interval=0.0)
    await resolver.configure({"web": ServiceDiscovery("web", "consul")})
    await resolver.resolve("web")
    await asyncio.sleep(1.5)
    health = [r for r in consul.requests if r.path == "/v1/health/service/web"]
    assert len(health) <= 4  # blocks on index 1 instead of spinning on index 0
    assert health[-1].query["index"] == ["1"]


async def test_tags_narrow_instances_and_reload_changes_them(consul, make_resolver):
    consul.register(service("db", "a", 1, tags=["v1", "primary"]))
    consul.register(service("db", "b", 2, tags=["v1"]))
    consul.register(service("db", "c", 3, tags=["v2"]))
    resolver = make_resolver(consul)
    await resolver.configure({"db": ServiceDiscovery("db", "consul", tags=("v1", "primary"))})
    assert [i.id for i in await resolver.resolve("db")] == ["a"]
    await resolver.configure({"db": ServiceDiscovery("db", "consul", tags=("v1",))})
    assert [i.id for i in await resolver.resolve("db")] == ["a", "b"]
    assert consul.requests[-1].query["tag"] == ["v1"]


async def test_configure_adds_and_removes_watchers(consul, make_resolver):
    consul.register(service("a", "a-1", 1))
    consul.register(service("b", "b-1", 2))
    resolver = make_resolver(consul)
    await resolver.configure({"a": ServiceDiscovery("a", "consul")})
    assert len(await resolver.resolve("a")) == 1
    first_task = resolver._watches["a"].task
    await resolver.configure({"a": ServiceDiscovery("a", "consul"),
                              "b": ServiceDiscovery("b", "consul")})
    assert resolver._watches["a"].task is first_task  # unchanged services keep their watcher
    assert len(await resolver.resolve("b")) == 1
    await resolver.configure({"b": ServiceDiscovery("b", "consul")})
    assert first_task.cancelled() and set(resolver.status()) == {"b"}
    assert await resolver.resolve("a") == ()
    assert gauge("aiagg_gateway_discovery_instances", "a") is None
    await resolver.close()
    assert all(t.task.done() for t in resolver._watches.values())
    assert gauge("aiagg_gateway_discovery_instances", "b") is None


async def test_build_resolver_modes(consul, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="gateway.consul_resolver")
    services = {
        "billing": ServiceDiscovery("billing", "consul", instances=("http://127.0.0.1:9",)),
        "auth": ServiceDiscovery("auth", "static", instances=("http://127.0.0.1:3001",)),
    }
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    static_only = build_resolver()
    assert isinstance(static_only, DiscoveryRouter)
    await static_only.configure(services)
    assert urls(await static_only.resolve("billing")) == ["http://127.0.0.1:9"]
    await static_only.close()
    assert sum("static only" in r.getMessage() for r in caplog.records) == 1

    consul.register(service("billing", "billing-1", 3004))
    router = build_resolver(ConsulSettings(http_addr=consul.addr))
    try:
        await router.configure(services)
        assert urls(await router.resolve("billing")) == ["http://127.0.0.1:3004"]
        assert urls(await router.resolve("auth")) == ["http://127.0.0.1:3001"]
        status = router.status()
        assert status["billing"].source == "consul" and status["auth"].source == "static"
        assert status["billing"].to_json()["index"] > 0
    finally:
        await router.close()
    assert any(f"Consul at http://{consul.addr}" in r.getMessage() for r in caplog.records)


# -- self-registration ---------------------------------------------------------------------


def _settings(double_or_port) -> ConsulSettings:
    port = double_or_port if isinstance(double_or_port, int) else double_or_port.port
    return ConsulSettings(http_addr=f"127.0.0.1:{port}")


async def test_service_registers_and_deregisters_itself(aiohttp_server, make_resolver):
    consul = ConsulDouble(run_http_checks=True)  # the double calls the service's /health
    await consul.start()
    try:
        async def health(request):
            return web.json_response({"status": "ok"})

        port = unused_port()
        reg = ServiceRegistration("billing", port, version="0.1.0", tags=["v1"],
                                  check_interval="200ms", settings=_settings(consul))
        app = web.Application()
        app.router.add_get("/health", health)
        app.cleanup_ctx.append(registration_ctx(reg))
        resolver = make_resolver(consul)
        await resolver.configure({"billing": ServiceDiscovery("billing", "consul")})

        server = await aiohttp_server(app, port=port)
        assert await reg.wait_registered(3)
        assert reg.instance_id == f"billing-127.0.0.1-{port}"
        got = consul.services[reg.instance_id]
        assert (got["Service"], got["Address"], got["Port"]) == ("billing", "127.0.0.1", port)
        assert got["Tags"] == ["v1"] and got["Meta"] == {"version": "0.1.0"}
        [check] = consul.checks_of(reg.instance_id)
        assert check["Type"] == "http" and check["Interval"] == "200ms"
        # The health check passes, so the gateway's resolver now sees the instance.
        await eventually(lambda: len(resolver.status()["billing"].instances) == 1)

        await server.close()  # runs cleanup_ctx: deregisters
        assert reg.instance_id not in consul.services
        await eventually(lambda: resolver.status()["billing"].instances == [])
    finally:
        await consul.stop()


async def test_registration_retries_until_consul_comes_up(caplog):
    caplog.set_level(logging.INFO, logger="gateway.registration")
    port = unused_port()
    reg = ServiceRegistration("auth", 3001, version="1", settings=_settings(port),
                              backoff_initial=0.05, backoff_max=0.2)
    await reg.start()  # returns at once even though Consul is down
    consul = ConsulDouble()
    try:
        await asyncio.sleep(0.4)
        assert not reg.registered
        failures = [r for r in caplog.records if "registering auth" in r.getMessage()]
        assert 2 <= len(failures) <= 8 and "CONSUL_HTTP_ADDR" in failures[0].getMessage()
        await consul.start(port)
        assert await reg.wait_registered(2)
        assert "auth-127.0.0.1-3001" in consul.services
    finally:
        await reg.stop()
        await consul.stop()
    assert consul.services == {}


async def test_registration_renews_when_agent_forgets(consul):
    reg = ServiceRegistration("proxy", 3003, version="1", settings=_settings(consul),
                              recheck_interval=0.1)
    await reg.start()
    try:
        assert await reg.wait_registered(2)
        consul.clear()  # an agent restarted without its data
        await eventually(lambda: "proxy-127.0.0.1-3003" in consul.services)
    finally:
        await reg.stop()
    assert consul.services == {}


async def test_stop_is_bounded_when_consul_is_gone(consul, caplog):
    reg = ServiceRegistration("analytics", 3005, version="1", settings=_settings(consul),
                              stop_timeout=0.5)
    await reg.start()
    assert await reg.wait_registered(2)
    await consul.stop()
    started = time.monotonic()
    await reg.stop()
    assert time.monotonic() - started < 1.0
    assert any("could not deregister" in r.getMessage() for r in caplog.records)


async def test_registration_sends_token_and_advertise_host(monkeypatch):
    consul = ConsulDouble(acl_token="s3cret")
    await consul.start()
    monkeypatch.setenv("SERVICE_ADVERTISE_HOST", "10.1.2.3")
    reg = ServiceRegistration("orchestrator", 3002, version="2",
                              settings=ConsulSettings(http_addr=consul.url, http_token="s3cret"))
    try:
        await reg.start()
        assert await reg.wait_registered(2)
        assert reg.instance_id == "orchestrator-10.1.2.3-3002"
        [check] = consul.checks_of(reg.instance_id)
        assert consul.services[reg.instance_id]["Address"] == "10.1.2.3"
        assert reg.payload()["Check"]["HTTP"] == "http://10.1.2.3:3002/health"
        assert check["Status"] == "critical"  # until Consul's first check passes
    finally:
        await reg.stop()
        await consul.stop()
    assert {r.token for r in consul.requests} == {"s3cret"}
    assert consul.services == {}


async def test_without_consul_registration_is_off_and_says_so_once(monkeypatch, caplog):
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    monkeypatch.setattr(registration_module, "_off_logged", False)
    caplog.set_level(logging.DEBUG, logger="gateway.registration")
    regs = [ServiceRegistration(n, p, version="1") for n, p in (("auth", 3001), ("billing", 3004))]
    for reg in regs:
        await reg.start()
        assert reg._task is None and not await reg.wait_registered(0.1)
    for reg in regs:
        await reg.stop()
    records = [r for r in caplog.records if r.name == "gateway.registration"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "CONSUL_HTTP_ADDR is not set" in records[0].getMessage()

"""The key Consul scenarios against a REAL agent (run only when CONSUL_HTTP_ADDR is set).

    CONSUL_HTTP_ADDR=127.0.0.1:8500 .venv/bin/python -m pytest -m consul_agent

Every registration uses a unique name and is removed afterwards. The agent need
not reach this machine: checks here are TTL checks the tests drive themselves.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port

from gateway.consul import ConsulClient, ConsulSettings
from gateway.consul_resolver import ConsulResolver
from gateway.discovery import ServiceDiscovery
from gateway.registration import ServiceRegistration, registration_ctx
from tests.support import seconds_until

pytestmark = [
    pytest.mark.consul_agent,
    pytest.mark.skipif(
        not os.environ.get("CONSUL_HTTP_ADDR"),
        reason="needs a real Consul agent: set CONSUL_HTTP_ADDR (e.g. 127.0.0.1:8500) to run",
    ),
]


@pytest.fixture
async def agent():
    """A client for the agent; deregisters whatever the test registered through it."""
    client = ConsulSettings().client()
    registered: list[str] = []
    real_register = client.agent_service_register

    async def register(payload):
        registered.append(payload.get("ID") or payload["Name"])
        await real_register(payload)

    client.agent_service_register = register
    yield client
    for sid in registered:
        try:
            await client.agent_service_deregister(sid)
        except Exception:  # already gone
            pass
    await client.close()


@pytest.fixture
async def resolvers():
    made: list[ConsulResolver] = []

    def make(**kw) -> ConsulResolver:
        opts = {"wait": 2.0, "backoff_initial": 0.1, "backoff_max": 1.0} | kw
        resolver = ConsulResolver(ConsulSettings().client(), **opts)
        made.append(resolver)
        return resolver

    yield make
    for r in made:
        await r.close()


def unique(prefix: str = "aiagg-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def ttl_service(name: str, sid: str, port: int, tags=(), status: str = "passing") -> dict:
    return {"Name": name, "ID": sid, "Address": "127.0.0.1", "Port": port, "Tags": list(tags),
            "Meta": {"version": "test"},
            "Check": {"CheckID": f"service:{sid}", "TTL": "60s", "Status": status,
                      "DeregisterCriticalServiceAfter": "1m"}}


async def eventually(check, within: float = 5.0) -> float:
    """Poll until ``check()`` is true; returns the seconds it took."""
    return await seconds_until(check, within, interval=0.05)


async def test_agent_register_health_and_deregister(agent: ConsulClient):
    name = unique()
    await agent.agent_service_register(ttl_service(name, f"{name}-1", 4001, tags=["v1"]))
    index, entries = await agent.health_service(name, passing=True)
    assert index > 0 and [e["Service"]["ID"] for e in entries] == [f"{name}-1"]
    _, services = await agent.catalog_services()
    assert services[name] == ["v1"]
    await agent.agent_service_deregister(f"{name}-1")
    assert await agent.agent_service(f"{name}-1") is None


async def test_agent_new_instance_seen_within_one_blocking_round(agent, resolvers):
    name = unique()
    resolver = resolvers(wait=10.0)
    await resolver.configure({name: ServiceDiscovery(name, "consul")})
    assert await resolver.resolve(name) == ()
    await eventually(lambda: (resolver.status()[name].index or 0) > 0)
    await asyncio.sleep(0.2)
    await agent.agent_service_register(ttl_service(name, f"{name}-1", 4001))
    took = await eventually(lambda: len(resolver.status()[name].instances) == 1)
    assert took < 3.0  # far under the 10 s wait
    [inst] = await resolver.resolve(name)
    assert inst.url == "http://127.0.0.1:4001" and inst.meta == {"version": "test"}


async def test_agent_critical_check_removes_instance(agent, resolvers):
    name = unique()
    await agent.agent_service_register(ttl_service(name, f"{name}-1", 4001))
    await agent.agent_service_register(ttl_service(name, f"{name}-2", 4002))
    resolver = resolvers()
    await resolver.configure({name: ServiceDiscovery(name, "consul")})
    await eventually(lambda: len(resolver.status()[name].instances) == 2)
    await agent.agent_check_update(f"service:{name}-2", "critical", "test says so")
    await eventually(lambda: len(resolver.status()[name].instances) == 1)
    assert [i.id for i in await resolver.resolve(name)] == [f"{name}-1"]


async def test_agent_tags_narrow_instances(agent, resolvers):
    name = unique()
    await agent.agent_service_register(ttl_service(name, f"{name}-a", 1, tags=["v1", "primary"]))
    await agent.agent_service_register(ttl_service(name, f"{name}-b", 2, tags=["v1"]))
    resolver = resolvers()
    await resolver.configure({name: ServiceDiscovery(name, "consul", tags=("v1", "primary"))})
    await eventually(lambda: len(resolver.status()[name].instances) >= 1)
    await asyncio.sleep(0.3)
    assert [i.id for i in await resolver.resolve(name)] == [f"{name}-a"]


async def test_agent_service_registers_and_deregisters_itself(agent, aiohttp_server):
    name = unique()
    port = unused_port()
    reg = ServiceRegistration(name, port, version="test", tags=["itest"])

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/health", health)
    app.cleanup_ctx.append(registration_ctx(reg))
    server = await aiohttp_server(app, port=port)
    try:
        assert await reg.wait_registered(5)
        known = await agent.agent_service(reg.instance_id)
        assert known is not None and known["Service"] == name and known["Port"] == port
        assert known["Meta"] == {"version": "test"}
    finally:
        await server.close()
    assert await agent.agent_service(reg.instance_id) is None

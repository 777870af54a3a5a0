"""The gateway routing through Consul discovery (the HTTP API double in tests/)."""

from __future__ import annotations

import asyncio
import textwrap
import time

import aiohttp
import pytest

from gateway.consul import ConsulSettings
from gateway.consul_resolver import build_resolver
from gateway.server import Gateway
from gateway.settings import GatewaySettings
from tests.consul_double import ConsulDouble


@pytest.fixture
async def consul():
    double = ConsulDouble()
    await double.start()
    yield double
    await double.close()


def register(double: ConsulDouble, url: str, sid: str, status: str = "passing") -> None:
    port = int(url.rsplit(":", 1)[1])
    double.register(
        {
            "Name": "echo",
            "ID": sid,
            "Address": "127.0.0.1",
            "Port": port,
            "Check": {"CheckID": f"chk-{sid}", "TTL": "30s", "Status": status},
        }
    )


async def test_gateway_follows_consul(consul, make_upstream, tmp_path):
    a, b = await make_upstream(), await make_upstream()
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        textwrap.dedent(
            """
            defaults:
              retry: {attempts: 1}
            services:
              echo:
                discovery: consul
                instances: [http://127.0.0.1:1]   # used only without CONSUL_HTTP_ADDR
            routes:
              - name: echo
                match: {prefix: /}
                service: echo
            """
        )
    )
    register(consul, a.url, "echo-a")
    resolver = build_resolver(ConsulSettings(http_addr=consul.addr))
    gw = Gateway(
        GatewaySettings(
            routes_file=str(routes), host="127.0.0.1", port=0, admin_port=0, access_log=False
        ),
        resolver=resolver,
    )
    await gw.start()
    url = f"http://127.0.0.1:{gw.public_port}/x"
    admin = f"http://127.0.0.1:{gw.admin_port}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                assert r.status == 200
            assert a.hits == 1

            # a new instance appears within one blocking round
            register(consul, b.url, "echo-b")
            started = time.monotonic()
            while b.hits == 0:
                assert time.monotonic() - started < 2, "new instance never received traffic"
                async with s.get(url) as r:
                    assert r.status == 200
            # its check turns critical: it stops receiving traffic
            consul.set_check_status("chk-echo-b", "critical")
            await asyncio.sleep(0.3)
            before = b.hits
            for _ in range(6):
                async with s.get(url) as r:
                    assert r.status == 200
            assert b.hits == before

            # Consul goes away: the last known instances keep serving, marked stale
            await consul.stop()
            await asyncio.sleep(0.3)
            for _ in range(3):
                async with s.get(url) as r:
                    assert r.status == 200
            async with s.get(f"{admin}/upstreams/echo") as r:
                entry = (await r.json())["services"][0]
            assert entry["source"] == "consul"
            assert entry["error"]
            assert entry["stale_seconds"] is not None and entry["stale_seconds"] > 0
            assert [i["url"] for i in entry["instances"]] == [a.url]

            # Consul returns: watching resumes and sees the change
            await consul.start()
            consul.set_check_status("chk-echo-b", "passing")
            started = time.monotonic()
            while True:
                async with s.get(f"{admin}/upstreams/echo") as r:
                    entry = (await r.json())["services"][0]
                if len(entry["instances"]) == 2 and not entry["error"]:
                    break
                assert time.monotonic() - started < 5, entry
                await asyncio.sleep(0.1)
    finally:
        await gw.stop()

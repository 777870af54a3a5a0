"""Service-to-service calls through the gateway library (open_service_client)."""

from __future__ import annotations

import textwrap

import pytest

from gateway.client import open_service_client
from gateway.discovery import DiscoveryRouter, StaticResolver
from gateway.errors import BadGateway
from tests.support import refused_url

from .conftest import status


def routes(tmp_path, instances: list[str], attempts: int = 3) -> str:
    path = tmp_path / "routes.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            defaults:
              retry: {{attempts: {attempts}, backoff: {{initial: 10ms, max: 20ms}}}}
            services:
              billing:
                instances: [{", ".join(instances)}]
            """
        )
    )
    return str(path)


async def test_peer_call_uses_routes_yaml_instances_and_retries(tmp_path, make_upstream):
    up = await make_upstream()
    dead = refused_url()
    client = await open_service_client(
        routes(tmp_path, [dead, up.url]), resolver=DiscoveryRouter(StaticResolver())
    )
    try:
        up.script = [status(503)]
        code, _headers, _body = await client.request(
            "billing", "GET", "/billing/x", headers={"Host": "spoof", "Content-Length": "9"}
        )
        assert code == 200
        assert up.seen[-1]["path"] == "/billing/x"
        assert up.seen[-1]["headers"]["Host"] != "spoof"
        code, _, _ = await client.request("billing", "POST", "/x", json_body={"a": "1.50"})
        assert code == 200 and up.seen[-1]["body"] == b'{"a": "1.50"}'
    finally:
        await client.close()


async def test_never_sent_only_when_no_attempt_may_have_reached_the_peer(
    tmp_path, make_upstream
):
    dead = [refused_url() for _ in range(2)]
    client = await open_service_client(
        routes(tmp_path, dead), resolver=DiscoveryRouter(StaticResolver())
    )
    try:
        with pytest.raises(BadGateway) as exc:
            await client.request("billing", "POST", "/x", json_body={})
        assert exc.value.never_sent is True
    finally:
        await client.close()

    up = await make_upstream()
    up.default = status(503)
    client = await open_service_client(
        routes(tmp_path, [up.url, dead[0]], attempts=2),
        resolver=DiscoveryRouter(StaticResolver()),
    )
    try:
        # GET: a 503 from the live instance (processed), then a refused connection
        with pytest.raises(BadGateway) as exc:
            await client.request("billing", "GET", "/x")
        assert up.hits == 1
        assert exc.value.never_sent is False
    finally:
        await client.close()

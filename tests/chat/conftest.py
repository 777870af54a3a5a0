"""The whole platform on real sockets: gateway, auth, billing, analytics, proxy, orchestrator.

``await start_platform(bus="rabbit" | "inprocess", postgres=False)`` starts every
service's real app (the kit's factory) on a socket bound here, writes a routes file
(the top-level ``routes.yaml`` with the test ports, static discovery) and a providers
file (:data:`PROVIDERS` plus a local OpenAI-compatible test server), and starts the
real :class:`gateway.server.Gateway` in front. All services share one event backbone:

* ``rabbit``: each service has its own RabbitBus (as separate processes would) in a
  namespace of this test's own (``EVENTS_NAMESPACE``), deleted afterwards;
* ``inprocess``: one InProcessBus shared by all (the local launcher's mode).

Databases are SQLite files in the test's directory; with ``postgres=True`` billing,
proxy and analytics each get a PostgreSQL database of their own (dropped afterwards).
The only fakes are remote AI providers: the built-in ``mock`` provider and
:class:`FakeOpenAI`, an OpenAI-compatible server written here.

A missing RabbitMQ or PostgreSQL fails the test when ``CI=true`` and skips it otherwise.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.discovery import DiscoveryRouter, StaticResolver
from gateway.server import Gateway
from gateway.settings import GatewaySettings
from services.analytics.app import create_app as create_analytics
from services.analytics.settings import AnalyticsSettings
from services.auth.app import create_app as create_auth
from services.auth.settings import AuthSettings
from services.billing.app import create_app as create_billing
from services.billing.settings import BillingSettings
from services.common.events import EventBus, InProcessBus, RabbitBus
from services.common.events.broker import delete_names, namespace_names
from services.orchestrator.app import create_app as create_orchestrator
from services.orchestrator.settings import OrchestratorSettings
from services.proxy.app import create_app as create_proxy
from services.proxy.settings import ProxySettings
from tests import support
from tests.support import (
    AMQP_URL,
    PG_URL,
    TcpRelay,
    fast_event_settings,
    fresh_database,
    require_server,
    sweep_namespaces,
)

ROOT = Path(__file__).resolve().parents[2]
NS_PREFIX = "tchat"
MASTER_KEY = "mk-chat-test-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
FAKE_KEY_ENV = "AIAGG_TEST_FAKE_OPENAI_KEY"
FAKE_KEY = "sk-fake-provider-credential"

#: The providers of the tests. Prices are chosen so that rounding matters.
PROVIDERS = """
defaults:
  max_output_tokens: 512
  timeout: 5s
  cooldown: {failures: 3, duration: 30s}
providers:
  mock-main:
    kind: mock
    priority: 1
    mock: {seed: 7}
    models:
      mock-small: {input_price: "0.50", output_price: "1.50"}
      mock-odd: {input_price: "1.234567", output_price: "7.654321"}
  broken-first:                      # fails before the first byte, every time
    kind: mock
    priority: 1
    mock: {failure_rate: 1}
    models:
      fallback-model: {input_price: "2", output_price: "4"}
  backup:
    kind: mock
    priority: 2
    mock: {seed: 3}
    models:
      fallback-model: {input_price: "1", output_price: "3"}
  cutter:                            # streams fail after 4 tokens, every time
    kind: mock
    mock: {mid_stream_failure_rate: 1, fail_after_tokens: 4, chunk_delay: 5ms}
    models:
      cut-model: {input_price: "1.5", output_price: "2.5"}
  slow:                              # for cutting the proxy off mid-stream
    kind: mock
    mock: {chunk_delay: 40ms, seed: 11}
    models:
      slow-model: {input_price: "2.5", output_price: "3.5"}
  local-openai:
    kind: openai
    base_url: {fake_url}
    api_key_env: AIAGG_TEST_FAKE_OPENAI_KEY
    models:
      fake-gpt: {input_price: "0.15", output_price: "0.60", upstream: upstream-gpt}
      fake-nousage: {input_price: "0.15", output_price: "0.60", upstream: upstream-nousage}
      fake-broken: {input_price: "0.15", output_price: "0.60", upstream: upstream-500}
      fake-cut: {input_price: "0.15", output_price: "0.60", upstream: upstream-cut}
"""


async def eventually(
    predicate: Callable[[], Any], within: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """:func:`tests.support.eventually` with the whole-platform tests' longer timeout."""
    return await support.eventually(predicate, within, interval, what)


def micro(text: str) -> int:
    """``"1.250000"`` -> 1250000 (exact)."""
    return int(Decimal(text) * 1_000_000)


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def test_routes(ports: dict[str, int]) -> str:
    """The top-level routes.yaml with the test ports and static discovery."""
    text = (ROOT / "routes.yaml").read_text()
    defaults = {
        "auth": 3001,
        "orchestrator": 3002,
        "proxy": 3003,
        "billing": 3004,
        "analytics": 3005,
    }
    for name, port in defaults.items():
        text = text.replace(f"http://127.0.0.1:{port}]", f"http://127.0.0.1:{ports[name]}]")
    text = re.sub(r"discovery: consul", "discovery: static", text)
    assert all(f":{ports[n]}]" in text for n in defaults), "routes.yaml changed shape"
    return text


test_routes.__test__ = False  # not a test, despite the name


# -- a local OpenAI-compatible provider --------------------------------------------------


@dataclass
class FakeOpenAI:
    """An OpenAI-compatible server. By upstream model: ``upstream-gpt`` answers with
    usage; ``upstream-nousage`` never reports usage; ``upstream-500`` fails before the
    first byte; ``upstream-cut`` drops the connection after two content chunks."""

    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    words: tuple[str, ...] = ("Hello", " from", " the", " fake", " provider", ".")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append({"headers": dict(request.headers), "body": body})
        model = body.get("model")
        if model == "upstream-500":
            return web.json_response({"error": {"message": "upstream exploded"}}, status=500)
        prompt = sum(len(str(m.get("content", ""))) for m in body["messages"])
        usage = {
            "prompt_tokens": 1000 + prompt,
            "completion_tokens": 2 * len(self.words),
            "total_tokens": 1000 + prompt + 2 * len(self.words),
        }
        if not body.get("stream"):
            answer = {
                "id": "fake-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "".join(self.words)},
                    }
                ],
            }
            if model != "upstream-nousage":
                answer["usage"] = usage
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            data = {
                "id": "fake-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(data)}\n\n".encode()

        await response.write(chunk({"role": "assistant", "content": ""}))
        for i, word in enumerate(self.words):
            if model == "upstream-cut" and i == 2:
                assert request.transport is not None
                request.transport.close()  # after what was written: a connection drop
                return response
            await response.write(chunk({"content": word}))
        await response.write(chunk({}, "stop"))
        include = (body.get("stream_options") or {}).get("include_usage")
        if include and model != "upstream-nousage":
            data = {
                "id": "fake-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


# -- the platform -----------------------------------------------------------------------


@dataclass
class Platform:
    gateway: Gateway
    http: aiohttp.ClientSession
    ports: dict[str, int]
    apps: dict[str, web.Application]
    fake: FakeOpenAI
    bus_kind: str
    tmp: Path
    cutter: TcpRelay | None = None
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.public_port}"

    def service_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def openai(self, api_key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        """The official client pointed at the gateway (closed with the platform)."""
        client = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30, **kwargs
        )
        self.clients.append(client)
        return client

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        async with self.http.request(
            method, self.url + path, json=json_body, headers=headers or ADMIN
        ) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def new_user(self, balance: str | None = "10.00") -> tuple[str, str]:
        """A user with an API key (created through the gateway with the master key) and,
        unless ``balance`` is None, that much money topped up."""
        user_id = f"user-{uuid.uuid4().hex[:10]}"
        status, body = await self.call(
            "POST", "/auth/api-keys", json_body={"user_id": user_id, "name": "chat test"}
        )
        assert status == 201, body
        if balance is not None:
            status, top = await self.call(
                "POST",
                "/billing/top-up",
                json_body={
                    "user_id": user_id,
                    "amount": balance,
                    "idempotency_key": f"topup-{uuid.uuid4().hex}",
                },
            )
            assert status == 201, top
        return user_id, body["key"]

    async def balance(self, user_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/billing/balance/{user_id}")
        assert status == 200, body
        return body

    async def transactions(self, user_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            path = f"/billing/transactions/{user_id}?limit=500"
            if cursor:
                path += f"&cursor={cursor}"
            status, body = await self.call("GET", path)
            assert status == 200, body
            out += body["data"]
            cursor = body["next_cursor"]
            if not cursor:
                return out

    async def metrics(self) -> dict[str, Any]:
        status, body = await self.call("GET", "/analytics/metrics")
        assert status == 200, body
        return body

    async def events(self, type_: str, user_id: str | None = None) -> list[dict[str, Any]]:
        path = f"/analytics/events?type={type_}&limit=500"
        if user_id:
            path += f"&user_id={user_id}"
        status, body = await self.call("GET", path)
        assert status == 200, body
        return body["data"]

    async def internal(self, service: str, path: str) -> tuple[int, Any]:
        """An internal endpoint, straight to the service (no route points at it)."""
        async with self.http.get(self.service_url(service) + path, headers=ADMIN) as resp:
            return resp.status, await resp.json()

    async def usage(self, request_id: str) -> dict[str, Any]:
        """The proxy's metered usage of a request (the source of its usage.recorded)."""
        status, body = await self.internal("proxy", f"/internal/proxy/usage/{request_id}")
        assert status == 200, body
        return body

    async def decision(self, request_id: str) -> dict[str, Any]:
        status, body = await self.internal(
            "orchestrator", f"/internal/orchestrator/requests/{request_id}"
        )
        assert status == 200, body
        return body

    async def hold(self, request_id: str) -> dict[str, Any]:
        status, body = await self.internal(
            "billing", f"/internal/billing/reservations/{request_id}"
        )
        assert status == 200, body
        return body

    async def charged(self, user_id: str, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` charges are booked; return them."""

        async def charges() -> list[dict[str, Any]] | None:
            found = [t for t in await self.transactions(user_id) if t["type"] == "charge"]
            return found if len(found) >= count else None

        return await eventually(charges, what=f"{count} charge(s) for {user_id}")


@pytest.fixture(scope="session", autouse=True)
def _sweep_test_namespaces() -> Any:
    """At the end of the run, delete any queue or exchange a crashed test left behind."""
    yield
    sweep_namespaces(lambda name: name.startswith(NS_PREFIX))


@pytest.fixture
async def start_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[Platform]]]:
    cleanups: list[Callable[[], Awaitable[None]]] = []
    monkeypatch.setenv(FAKE_KEY_ENV, FAKE_KEY)
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)

    async def start(
        bus: str = "rabbit",
        *,
        postgres: bool = False,
        providers: str = PROVIDERS,
        cut_proxy: bool = False,
        cut: str | None = None,
        **orchestrator_settings: Any,
    ) -> Platform:
        """``cut="billing"`` (``cut_proxy``: ``cut="proxy"``): that service is reached
        through a :class:`TcpRelay` (``platform.cutter``), which a test can stop."""
        cut = "proxy" if cut_proxy else cut
        names = ("auth", "billing", "analytics", "proxy", "orchestrator")
        if bus == "rabbit":
            require_server(AMQP_URL, 5672, "RabbitMQ")
        if postgres:
            require_server(PG_URL, 5432, "PostgreSQL")

        fake = FakeOpenAI()
        fake_app = web.Application()
        fake_app.router.add_post("/v1/chat/completions", fake.handle)
        fake_runner = web.AppRunner(fake_app, shutdown_timeout=0.5)
        await fake_runner.setup()
        fake_sock = bound_socket()
        await web.SockSite(fake_runner, fake_sock).start()
        cleanups.append(fake_runner.cleanup)
        fake.url = f"http://127.0.0.1:{fake_sock.getsockname()[1]}"

        socks = {name: bound_socket() for name in names}
        ports = {name: sock.getsockname()[1] for name, sock in socks.items()}
        cutter = None
        routed = dict(ports)
        if cut is not None:
            cutter = TcpRelay("127.0.0.1", ports[cut])
            await cutter.start()
            cleanups.append(cutter.stop)
            routed[cut] = cutter.port
        routes_file = tmp_path / "routes.yaml"
        routes_file.write_text(test_routes(routed))
        providers_file = tmp_path / "providers.yaml"
        providers_file.write_text(providers.replace("{fake_url}", f"{fake.url}/v1"))

        db_urls = {name: f"sqlite:///{tmp_path}/data/{name}.db" for name in names}
        if postgres:
            databases = contextlib.AsyncExitStack()  # each dropped at the end
            cleanups.append(databases.aclose)
            for name in ("billing", "proxy", "analytics"):
                db_urls[name] = await databases.enter_async_context(
                    fresh_database(f"aiagg_chat_{name}_")
                )

        buses: dict[str, EventBus] = {}
        if bus == "rabbit":
            namespace = f"{NS_PREFIX}{uuid.uuid4().hex[:10]}"
            settings = fast_event_settings(amqp_url=AMQP_URL, events_namespace=namespace)
            for name in names:
                buses[name] = RabbitBus(
                    AMQP_URL, settings, connection_name=f"test-{name}", grace=0.5
                )
            queue_names = namespace_names(settings, ("billing.usage", "analytics.events"))
            cleanups.append(lambda: delete_names(AMQP_URL, queue_names))
        else:
            shared = InProcessBus(fast_event_settings(), grace=0.5)
            buses = dict.fromkeys(names, shared)
        unique_buses = {id(b): b for b in buses.values()}.values()

        async def close_buses() -> None:
            for b in unique_buses:
                with contextlib.suppress(Exception):
                    await b.close()

        cleanups.append(close_buses)

        common = {"port": 0, "master_key": MASTER_KEY, "amqp_url": None}
        apps = {
            "auth": create_auth(
                AuthSettings(database_url=db_urls["auth"], **common),
                bus=buses["auth"],
                register=False,
            ),
            "billing": create_billing(
                BillingSettings(database_url=db_urls["billing"], **common),
                bus=buses["billing"],
                register=False,
            ),
            "analytics": create_analytics(
                AnalyticsSettings(database_url=db_urls["analytics"], **common),
                bus=buses["analytics"],
                register=False,
            ),
            "proxy": create_proxy(
                ProxySettings(
                    database_url=db_urls["proxy"], providers_file=str(providers_file), **common
                ),
                bus=buses["proxy"],
                register=False,
            ),
            "orchestrator": create_orchestrator(
                OrchestratorSettings(
                    database_url=db_urls["orchestrator"],
                    providers_file=str(providers_file),
                    routes_file=str(routes_file),
                    **common,
                    **orchestrator_settings,
                ),
                bus=buses["orchestrator"],
                register=False,
            ),
        }
        for name in names:
            runner = web.AppRunner(apps[name], shutdown_timeout=1.0)
            await runner.setup()
            await web.SockSite(runner, socks[name]).start()
            cleanups.append(runner.cleanup)

        gateway = Gateway(
            GatewaySettings(
                routes_file=str(routes_file),
                host="127.0.0.1",
                port=0,
                admin_port=0,
                access_log=False,
            ),
            resolver=DiscoveryRouter(StaticResolver()),
        )
        await gateway.start()
        cleanups.append(gateway.stop)
        http = aiohttp.ClientSession()
        cleanups.append(http.close)
        platform = Platform(gateway, http, ports, apps, fake, bus, tmp_path, cutter)

        async def close_clients() -> None:
            for client in platform.clients:
                await client.close()

        cleanups.append(close_clients)
        return platform

    yield start
    for cleanup in reversed(cleanups):
        with contextlib.suppress(Exception):
            await cleanup()

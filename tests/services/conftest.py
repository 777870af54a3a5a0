"""Fixtures of the service tests: real SQLite files, the real PostgreSQL and RabbitMQ.

* PostgreSQL (``PG_TEST_URL``, default postgresql://postgres@127.0.0.1:5432/postgres):
  a test that asks for ``pg_url`` gets a database of its own, dropped afterwards.
* RabbitMQ (``AMQP_TEST_URL``, default amqp://guest:guest@127.0.0.1:5672/): a test that
  asks for ``rabbit_settings`` gets its own ``EVENTS_NAMESPACE``; its exchange and
  queues are deleted afterwards.

A missing server fails the test when ``CI=true`` and skips it otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from services.analytics.app import create_app as create_analytics
from services.analytics.settings import AnalyticsSettings
from services.auth.app import create_app as create_auth
from services.auth.settings import AuthSettings
from services.billing.app import create_app as create_billing
from services.billing.settings import BillingSettings
from services.common.db import Database
from services.common.events import EventBus, EventSettings, InProcessBus, RabbitBus, Topology

AMQP_URL = os.environ.get("AMQP_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("PG_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
NS_PREFIX = "tsvc"  # every test namespace starts with it (the session sweep relies on it)

MASTER_KEY = "mk-test-" + "0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}


def as_user(user_id: str, *scopes: str, key_id: str = "key_test") -> dict[str, str]:
    """The identity headers the gateway sets after forward-auth."""
    return {"X-User-Id": user_id, "X-Key-Id": key_id, "X-Key-Scopes": ",".join(scopes)}


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_server(url: str, default_port: int, name: str) -> None:
    """Fail (CI=true) or skip (otherwise) when nothing listens where ``url`` points."""
    u = URL(url)
    host, port = u.host or "127.0.0.1", u.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc})"
        if _ci():
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(message)


def run_in_thread(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


async def eventually(
    predicate: Callable[[], Any], within: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Wait until ``predicate()`` (maybe async) is truthy and return it; fail after ``within``."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def event_settings(**overrides: Any) -> EventSettings:
    """Fast event settings for tests (short retries, quick outbox polling)."""
    values: dict[str, Any] = {
        "amqp_url": None,
        "events_namespace": "",
        "events_retry_delays": "100ms,200ms",
        "events_max_attempts": 3,
        "amqp_reconnect_interval": "200ms",
        "amqp_connect_timeout": "5s",
        "events_publish_timeout": "5s",
        "events_outbox_poll_interval": "100ms",
        "events_outbox_backoff_initial": "50ms",
        "events_outbox_backoff_max": "300ms",
    }
    values.update(overrides)
    return EventSettings(**values)


# -- databases --------------------------------------------------------------------------


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A PostgreSQL database of this test's own (created here, dropped afterwards)."""
    require_server(PG_URL, 5432, "PostgreSQL")
    name = f"aiagg_svc_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield str(URL(PG_URL).with_path(f"/{name}"))
    finally:
        await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Callable[[str], str]:
    """``sqlite_url("billing")``: a SQLite file of this test's own per service."""
    return lambda name: f"sqlite:///{tmp_path}/data/{name}.db"


# -- buses ------------------------------------------------------------------------------


@pytest.fixture
async def inprocess_bus() -> AsyncIterator[InProcessBus]:
    bus = InProcessBus(event_settings(), grace=0.5)
    await bus.start()
    yield bus
    await bus.close()


async def delete_names(url: str, names: Iterable[str]) -> None:
    connection = await aio_pika.connect(url)
    try:
        for name in sorted(set(names)):
            for kind in ("queue", "exchange"):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                with contextlib.suppress(Exception):
                    await channel.close()
    finally:
        await connection.close()


@pytest.fixture
async def rabbit_settings() -> AsyncIterator[EventSettings]:
    """Event settings on the real RabbitMQ in a namespace of this test's own."""
    require_server(AMQP_URL, 5672, "RabbitMQ")
    settings = event_settings(
        amqp_url=AMQP_URL, events_namespace=f"{NS_PREFIX}{uuid.uuid4().hex[:10]}"
    )
    yield settings
    topo = Topology(settings.events_namespace)
    names = {topo.exchange}
    for queue in ("billing.usage", "analytics.events"):
        names |= {topo.queue(queue), topo.dlq(queue)}
        names |= {topo.retry_queue(queue, d) for d in settings.retry_delays_in_use()}
    await delete_names(AMQP_URL, names)


@pytest.fixture(scope="session", autouse=True)
def _sweep_test_namespaces() -> Iterable[None]:
    """At the end of the run, delete any queue or exchange a crashed test left behind."""
    yield
    ctl = shutil.which("rabbitmqctl")
    if not ctl:
        return
    leftovers: list[str] = []
    for what in ("list_queues", "list_exchanges"):
        with contextlib.suppress(Exception):
            out = subprocess.run(
                [ctl, what, "-q", "--no-table-headers", "name"],
                capture_output=True, text=True, timeout=20, check=False,
            ).stdout
            leftovers += [n.strip() for n in out.splitlines() if n.strip().startswith(NS_PREFIX)]
    if leftovers:
        with contextlib.suppress(Exception):
            run_in_thread(lambda: delete_names(AMQP_URL, leftovers))


# -- services ---------------------------------------------------------------------------

_FACTORIES: dict[str, tuple[Callable[..., web.Application], type]] = {
    "auth": (create_auth, AuthSettings),
    "billing": (create_billing, BillingSettings),
    "analytics": (create_analytics, AnalyticsSettings),
}


@dataclass
class Service:
    name: str
    client: TestClient
    app: web.Application
    bus: EventBus
    db_url: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def db(self) -> Database:
        from services.common.app import DB

        return self.app[DB]


@pytest.fixture
async def start_service(
    aiohttp_client: Any, sqlite_url: Callable[[str], str]
) -> AsyncIterator[Callable[..., Awaitable[Service]]]:
    """``await start_service("billing", bus=..., database_url=..., hold_ttl=...)``.

    Runs the real service app (the kit's factory) on a real socket. Without ``bus`` it
    gets an in-process bus of its own.
    """
    owned: list[EventBus] = []

    async def start(
        name: str,
        *,
        bus: EventBus | None = None,
        database_url: str | None = None,
        **settings: Any,
    ) -> Service:
        factory, settings_cls = _FACTORIES[name]
        url = database_url or sqlite_url(name)
        config = settings_cls(
            port=0, database_url=url, master_key=MASTER_KEY, amqp_url=None, **settings
        )
        if bus is None:
            bus = InProcessBus(event_settings(), grace=0.5)
            owned.append(bus)
        app = factory(config, bus=bus, register=False)
        client = await aiohttp_client(app)
        return Service(name, client, app, bus, url)

    yield start
    for bus in owned:
        with contextlib.suppress(Exception):
            await bus.close()


def rabbit_bus(settings: EventSettings, name: str) -> RabbitBus:
    return RabbitBus(settings.amqp_url, settings, connection_name=f"test-{name}", grace=0.5)

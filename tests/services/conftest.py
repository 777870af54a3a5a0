"""Fixtures of the service tests: real SQLite files, the real PostgreSQL and RabbitMQ.

* PostgreSQL (``PG_TEST_URL``, default postgresql://postgres@127.0.0.1:5432/postgres):
  a test that asks for ``pg_url`` gets a database of its own, dropped afterwards.
* RabbitMQ (``AMQP_TEST_URL``, default amqp://guest:guest@127.0.0.1:5672/): a test that
  asks for ``rabbit_settings`` gets its own ``EVENTS_NAMESPACE``; its exchange and
  queues are deleted afterwards.

A missing server fails the test when ``CI=true`` and skips it otherwise.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from services.analytics.app import create_app as create_analytics
from services.analytics.settings import AnalyticsSettings
from services.auth.app import create_app as create_auth
from services.auth.settings import AuthSettings
from services.billing.app import create_app as create_billing
from services.billing.settings import BillingSettings
from services.common.db import Database
from services.common.events import EventBus, EventSettings, InProcessBus, RabbitBus
from services.common.events.broker import delete_names, namespace_names
from tests.support import (
    AMQP_URL,
    fast_event_settings,
    fresh_database,
    require_server,
    sweep_namespaces,
)

NS_PREFIX = "tsvc"  # every test namespace starts with it (the session sweep relies on it)

MASTER_KEY = "mk-test-" + "0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}


def as_user(user_id: str, *scopes: str, key_id: str = "key_test") -> dict[str, str]:
    """The identity headers the gateway sets after forward-auth."""
    return {"X-User-Id": user_id, "X-Key-Id": key_id, "X-Key-Scopes": ",".join(scopes)}


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


# -- databases --------------------------------------------------------------------------


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A PostgreSQL database of this test's own (created here, dropped afterwards)."""
    async with fresh_database("aiagg_svc_") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Callable[[str], str]:
    """``sqlite_url("billing")``: a SQLite file of this test's own per service."""
    return lambda name: f"sqlite:///{tmp_path}/data/{name}.db"


# -- buses ------------------------------------------------------------------------------


@pytest.fixture
async def inprocess_bus() -> AsyncIterator[InProcessBus]:
    bus = InProcessBus(fast_event_settings(), grace=0.5)
    await bus.start()
    yield bus
    await bus.close()


@pytest.fixture
async def rabbit_settings() -> AsyncIterator[EventSettings]:
    """Event settings on the real RabbitMQ in a namespace of this test's own."""
    require_server(AMQP_URL, 5672, "RabbitMQ")
    settings = fast_event_settings(
        amqp_url=AMQP_URL, events_namespace=f"{NS_PREFIX}{uuid.uuid4().hex[:10]}"
    )
    yield settings
    await delete_names(AMQP_URL, namespace_names(settings, ("billing.usage", "analytics.events")))


@pytest.fixture(scope="session", autouse=True)
def _sweep_test_namespaces() -> Iterable[None]:
    """At the end of the run, delete any queue or exchange a crashed test left behind."""
    yield
    sweep_namespaces(lambda name: name.startswith(NS_PREFIX))


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
            bus = InProcessBus(fast_event_settings(), grace=0.5)
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

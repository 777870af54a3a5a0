"""Fixtures of the event tests: the real RabbitMQ and PostgreSQL, isolated per test.

* RabbitMQ (``AMQP_TEST_URL``, default amqp://guest:guest@127.0.0.1:5672/): every test
  gets its own ``EVENTS_NAMESPACE`` so its exchange and queues are its own; they are
  deleted after the test.
* PostgreSQL (``PG_TEST_URL``, default postgresql://postgres@127.0.0.1:5432/postgres):
  one database is created for the test run and dropped at its end; each test gets an
  empty ``public`` schema.

A missing server fails the test when ``CI=true`` and skips it otherwise.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from yarl import URL

from services.common.db import Database
from services.common.events import (
    Event,
    EventBus,
    EventSettings,
    Handler,
    InProcessBus,
    QueueSpec,
    RabbitBus,
)
from services.common.events.broker import delete_names, namespace_names
from tests import support
from tests.support import (
    AMQP_URL,
    PG_URL,
    TcpRelay,
    asyncpg_dsn,
    fast_event_settings,
    pg_admin,
    require_server,
    run_in_thread,
    stale,
    sweep_namespaces,
)

#: every namespace of this test run starts with it; the end-of-run sweep deletes these,
#: never the queues of another run going on at the same time on the same broker, plus
#: those of runs started more than support.STALE_AFTER ago (killed before their own sweep)
RUN_STARTED = int(time.time())
NS_PREFIX = f"tev-{RUN_STARTED}-{uuid.uuid4().hex[:6]}-"
_STALE_NS = re.compile(r"^tev-(\d+)-")
PG_DB_PREFIX = "aiagg_events_"
_STALE_DB = re.compile(r"^aiagg_events_(\d+)_")


async def eventually(
    predicate: Callable[[], Any], within: float = 5.0, interval: float = 0.02, what: str = ""
) -> Any:
    """:func:`tests.support.eventually` with the event tests' shorter default timeout."""
    return await support.eventually(predicate, within, interval, what)


def test_settings(namespace: str = "", **overrides: Any) -> EventSettings:
    """Fast settings for the event tests, on the real broker, in ``namespace``."""
    values: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "events_namespace": namespace,
        "events_retry_delays": "200ms,400ms",
        "amqp_prefetch": 8,
        "events_outbox_poll_interval": "200ms",
    }
    return fast_event_settings(**(values | overrides))


test_settings.__test__ = False  # not a test, despite the name


# -- RabbitMQ -----------------------------------------------------------------------------


@pytest.fixture
def rabbit_url() -> str:
    require_server(AMQP_URL, 5672, "RabbitMQ")
    return AMQP_URL


@pytest.fixture
def namespace() -> str:
    return f"{NS_PREFIX}{uuid.uuid4().hex[:8]}"


class BusKit:
    """Makes started buses of one kind for a test and cleans up after it."""

    def __init__(self, kind: str, settings: EventSettings) -> None:
        self.kind = kind
        self.settings = settings
        self.buses: list[EventBus] = []
        self.logical: set[str] = set()

    async def make(
        self,
        queues: Iterable[QueueSpec] = (),
        settings: EventSettings | None = None,
        *,
        rabbit_class: type[RabbitBus] = RabbitBus,
        inprocess_class: type[InProcessBus] = InProcessBus,
    ) -> EventBus:
        """A started bus of the kit's kind (or of the given subclass of it)."""
        settings = settings or self.settings
        queues = tuple(queues)
        self.logical |= {q.name for q in queues}
        if self.kind == "rabbit":
            bus: EventBus = rabbit_class(settings.amqp_url, settings, queues=queues, grace=0.5)
        else:
            bus = inprocess_class(settings, queues=queues, grace=0.5)
        self.buses.append(bus)
        await bus.start()
        assert bus.connected
        return bus

    async def reopen(
        self, bus: EventBus, subscriptions: Iterable[tuple[str, list[str], Handler]] = ()
    ) -> EventBus:
        """The bus a restarted process would have: a new RabbitBus with the same
        subscriptions; the same in-process bus (its memory is the only copy), restarted."""
        await bus.close()
        if self.kind == "rabbit":
            new = await self.make(bus.queues)
            for queue, bindings, handler in subscriptions:
                await new.subscribe(queue, bindings, handler)
            return new
        await bus.start()
        return bus

    def track(self, *logical_queues: str) -> None:
        self.logical |= set(logical_queues)

    async def cleanup(self) -> None:
        for bus in self.buses:
            with contextlib.suppress(Exception):
                await bus.close()
        if self.kind == "rabbit":
            names = namespace_names(self.settings, self.logical)
            await delete_names(self.settings.amqp_url, names)


@pytest.fixture
async def rabbit_kit(rabbit_url: str, namespace: str) -> AsyncIterator[BusKit]:
    kit = BusKit("rabbit", test_settings(namespace, amqp_url=rabbit_url))
    yield kit
    await kit.cleanup()


@pytest.fixture(params=["rabbit", "inprocess"])
async def bus_kit(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[BusKit]:
    """The same test on both buses."""
    if request.param == "rabbit":
        require_server(AMQP_URL, 5672, "RabbitMQ")
    kit = BusKit(request.param, test_settings(namespace))
    yield kit
    await kit.cleanup()


@pytest.fixture(scope="session", autouse=True)
def _sweep_test_namespaces() -> Iterable[None]:
    """At the end of the run, delete any queue or exchange of this run a test left behind."""
    yield
    sweep_namespaces(lambda name: name.startswith(NS_PREFIX) or stale(name, _STALE_NS))


@pytest.fixture
async def amqp_proxy(rabbit_url: str) -> AsyncIterator[TcpRelay]:
    """A :class:`TcpRelay` to the broker: ``stop()`` makes it vanish for one client only,
    ``start()`` brings it back on the same port."""
    u = URL(rabbit_url)
    proxy = TcpRelay(u.host or "127.0.0.1", u.port or 5672)
    await proxy.start()
    yield proxy
    await proxy.stop()


def via_proxy(url: str, proxy: TcpRelay) -> str:
    return str(URL(url).with_host("127.0.0.1").with_port(proxy.port))


# -- databases ----------------------------------------------------------------------------


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite:///{tmp_path}/data/events.db")
    yield db
    await db.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterable[str]:
    """One PostgreSQL database for the whole run (created, then dropped)."""
    require_server(PG_URL, 5432, "PostgreSQL")
    name = f"{PG_DB_PREFIX}{RUN_STARTED}_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(PG_URL))
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1", PG_DB_PREFIX + "%"
            )
            for row in rows:  # left by killed runs
                if stale(row["datname"], _STALE_DB):
                    await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    run_in_thread(create)
    yield str(URL(asyncpg_dsn(PG_URL)).with_path(f"/{name}"))
    run_in_thread(lambda: pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _empty_schema(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()


@pytest.fixture
async def pg_db(pg_database: str) -> AsyncIterator[Database]:
    await _empty_schema(pg_database)
    db = Database(pg_database)
    yield db
    await db.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """The same test on SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path}/data/events.db")
    else:
        db = Database(request.getfixturevalue("pg_database"))
        await _empty_schema(request.getfixturevalue("pg_database"))
    yield db
    await db.close()


async def collector(bus: EventBus, queue: str, bindings: list[str]) -> list[Event]:
    """Subscribe ``queue`` with a handler that keeps what it gets, in order."""
    got: list[Event] = []

    async def handler(event: Event) -> None:
        got.append(event)

    await bus.subscribe(queue, bindings, handler)
    return got


def assert_contract_message(message: Any, event: Event) -> None:
    """An AMQP message (aio-pika's, read back from a queue) carries ``event`` as the
    events contract says: its stored body and every contract property."""
    assert message is not None
    assert message.body == event.to_json()
    assert message.message_id == event.id
    assert message.type == event.type
    assert message.app_id == event.source
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2  # persistent
    assert message.routing_key == event.type
    assert message.timestamp is not None
    assert abs(message.timestamp.timestamp() - event.occurred_at.timestamp()) < 1.5

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

import asyncio
import concurrent.futures
import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from yarl import URL

from services.common.db import Database
from services.common.events import (
    EventBus,
    EventSettings,
    Handler,
    InProcessBus,
    QueueSpec,
    RabbitBus,
    Topology,
)

AMQP_URL = os.environ.get("AMQP_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("PG_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
#: every namespace of this test run starts with it; the end-of-run sweep deletes these,
#: never the queues of another run going on at the same time on the same broker, plus
#: those of runs started more than STALE_AFTER ago (killed before their own sweep)
RUN_STARTED = int(time.time())
NS_PREFIX = f"tev-{RUN_STARTED}-{uuid.uuid4().hex[:6]}-"
_STALE_NS = re.compile(r"^tev-(\d+)-")
PG_DB_PREFIX = "aiagg_events_"
_STALE_DB = re.compile(r"^aiagg_events_(\d+)_")
STALE_AFTER = 3 * 3600


def _stale(name: str, pattern: re.Pattern[str]) -> bool:
    match = pattern.match(name)
    return bool(match) and int(match.group(1)) < time.time() - STALE_AFTER


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_server(host: str, port: int, name: str) -> None:
    """Fail (CI=true) or skip (otherwise) when nothing listens on host:port."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc})"
        if _ci():
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(message)


def run_in_thread(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine to completion on its own loop in another thread (from any context)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    u = URL(url)
    return u.host or "127.0.0.1", u.port or default_port


async def eventually(
    predicate: Callable[[], Any], within: float = 5.0, interval: float = 0.02, what: str = ""
) -> None:
    """Wait until ``predicate()`` (maybe async) is truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def test_settings(namespace: str = "", **overrides: Any) -> EventSettings:
    """Fast settings for tests: short retry delays, quick reconnects."""
    values: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "events_namespace": namespace,
        "events_retry_delays": "200ms,400ms",
        "events_max_attempts": 3,
        "amqp_prefetch": 8,
        "amqp_reconnect_interval": "200ms",
        "amqp_connect_timeout": "5s",
        "events_publish_timeout": "5s",
        "events_outbox_poll_interval": "200ms",
        "events_outbox_backoff_initial": "50ms",
        "events_outbox_backoff_max": "300ms",
    }
    values.update(overrides)
    return EventSettings(**values)


test_settings.__test__ = False  # not a test, despite the name


# -- RabbitMQ -----------------------------------------------------------------------------


@pytest.fixture
def rabbit_url() -> str:
    require_server(*_host_port(AMQP_URL, 5672), "RabbitMQ")
    return AMQP_URL


@pytest.fixture
def namespace() -> str:
    return f"{NS_PREFIX}{uuid.uuid4().hex[:8]}"


async def delete_names(url: str, names: Iterable[str]) -> None:
    """Delete queues and exchanges by name (missing ones are fine)."""
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


def names_of(topology: Topology, settings: EventSettings, queues: Iterable[str]) -> set[str]:
    names = {topology.exchange}
    for queue in queues:
        names |= {topology.queue(queue), topology.dlq(queue)}
        names |= {topology.retry_queue(queue, d) for d in settings.retry_delays_in_use()}
    return names


class BusKit:
    """Makes started buses of one kind for a test and cleans up after it."""

    def __init__(self, kind: str, settings: EventSettings) -> None:
        self.kind = kind
        self.settings = settings
        self.buses: list[EventBus] = []
        self.logical: set[str] = set()

    async def make(
        self, queues: Iterable[QueueSpec] = (), settings: EventSettings | None = None
    ) -> EventBus:
        settings = settings or self.settings
        queues = tuple(queues)
        self.logical |= {q.name for q in queues}
        if self.kind == "rabbit":
            bus: EventBus = RabbitBus(settings.amqp_url, settings, queues=queues, grace=0.5)
        else:
            bus = InProcessBus(settings, queues=queues, grace=0.5)
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
            topo = Topology(self.settings.events_namespace)
            await delete_names(self.settings.amqp_url, names_of(topo, self.settings, self.logical))


@pytest.fixture
async def rabbit_kit(rabbit_url: str, namespace: str) -> AsyncIterator[BusKit]:
    kit = BusKit("rabbit", test_settings(namespace, amqp_url=rabbit_url))
    yield kit
    await kit.cleanup()


@pytest.fixture(params=["rabbit", "inprocess"])
async def bus_kit(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[BusKit]:
    """The same test on both buses."""
    if request.param == "rabbit":
        require_server(*_host_port(AMQP_URL, 5672), "RabbitMQ")
    kit = BusKit(request.param, test_settings(namespace))
    yield kit
    await kit.cleanup()


@pytest.fixture(scope="session", autouse=True)
def _sweep_test_namespaces() -> Iterable[None]:
    """At the end of the run, delete any queue or exchange of this run a test left behind."""
    yield
    ctl = shutil.which("rabbitmqctl")
    if not ctl:
        return
    leftovers: list[str] = []
    for what in ("list_queues", "list_exchanges"):
        with contextlib.suppress(Exception):
            out = subprocess.run(
                [ctl, what, "-q", "--no-table-headers", "name"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout
            for name in (n.strip() for n in out.splitlines()):
                if name.startswith(NS_PREFIX) or _stale(name, _STALE_NS):
                    leftovers.append(name)
    if leftovers:
        with contextlib.suppress(Exception):
            run_in_thread(lambda: delete_names(AMQP_URL, leftovers))


class TcpProxy:
    """A TCP forwarder we can cut, to make the broker unreachable for one client only."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop listening and cut every connection (the client sees the broker vanish)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def amqp_proxy(rabbit_url: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(*_host_port(rabbit_url, 5672))
    await proxy.start()
    yield proxy
    await proxy.stop()


def via_proxy(url: str, proxy: TcpProxy) -> str:
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
    require_server(*_host_port(PG_URL, 5432), "PostgreSQL")
    name = f"{PG_DB_PREFIX}{RUN_STARTED}_{uuid.uuid4().hex[:8]}"
    admin = PG_URL.replace("postgresql+asyncpg://", "postgresql://")

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create() -> None:
        conn = await asyncpg.connect(admin)
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1", PG_DB_PREFIX + "%"
            )
            for row in rows:  # left by killed runs
                if _stale(row["datname"], _STALE_DB):
                    await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    run_in_thread(create)
    yield str(URL(admin).with_path(f"/{name}"))
    run_in_thread(lambda: run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def pg_db(pg_database: str) -> AsyncIterator[Database]:
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()
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
        conn = await asyncpg.connect(request.getfixturevalue("pg_database"))
        try:
            await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
        finally:
            await conn.close()
    yield db
    await db.close()

"""What every test folder needs to reach the real servers, written once.

* ``AMQP_URL`` / ``PG_URL``: the real RabbitMQ and PostgreSQL (``AMQP_TEST_URL``,
  ``PG_TEST_URL`` override them).
* :func:`require_server`: a missing server fails the test when ``CI=true`` and skips
  it otherwise; never a silent pass (:func:`fail_or_skip` for other missing things).
* per-test isolation: :func:`fresh_database` (a PostgreSQL database of the test's own)
  and :func:`delete_names` (a RabbitMQ namespace's queues and exchanges);
  :func:`sweep_namespaces` deletes what crashed tests left on the broker.
* :func:`eventually` (:func:`seconds_until` to time it), :func:`serves_health` (a
  service process is up), :func:`fast_event_settings`,
  :func:`run_in_thread`, and :class:`TcpRelay`, a TCP forwarder a test can cut to make a
  peer vanish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import aiohttp
import asyncpg
import pytest
from yarl import URL

from services.common.events import EventSettings
from services.common.events.broker import delete_names, listed_names

AMQP_URL = os.environ.get("AMQP_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("PG_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def fail_or_skip(message: str) -> NoReturn:
    """Something a test needs is missing: fail when ``CI=true``, skip otherwise."""
    if in_ci():
        pytest.fail(f"{message}; CI=true requires it", pytrace=False)
    pytest.skip(message)


def require_server(url: str, default_port: int, name: str) -> None:
    """Fail (CI=true) or skip (otherwise) when nothing listens where ``url`` points."""
    u = URL(url)
    host, port = u.host or "127.0.0.1", u.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        fail_or_skip(f"{name} is not reachable at {host}:{port} ({exc})")


#: sockets held by :func:`refused_port` until the test process ends
_HELD_PORTS: list[socket.socket] = []


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nobody listens on now, for a server started next (often in
    another process).

    Chosen below the kernel's ephemeral range. A port that ``bind(0)`` hands out is
    in that range, where any outgoing connection may take it as its source port
    before the server binds it ("address already in use"). Below the range only
    another explicit choice like this one can collide, and the bind check skips
    ports taken now.
    """
    floor = _ephemeral_floor()
    low = max(1024, min(20000, floor - 4000))
    for _ in range(100):
        port = random.randint(low, floor - 1)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # everything tried was taken: let the kernel pick
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def refused_port() -> int:
    """A loopback port where every connection is refused, for the rest of the test run.

    The socket is bound but never listens, so connecting fails at once and no server
    started later can be given the number. A port found free and then closed can be:
    the next server binding port 0 may get it, and a "dead" upstream then answers.
    """
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(held)
    return held.getsockname()[1]


def refused_url() -> str:
    """``http://127.0.0.1:<refused_port()>``: an upstream that is down."""
    return f"http://127.0.0.1:{refused_port()}"


def run_in_thread(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine on its own loop in another thread (from sync or async context)."""
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


async def seconds_until(
    predicate: Callable[[], Any], within: float = 10.0, interval: float = 0.02, what: str = ""
) -> float:
    """:func:`eventually`, returning how many seconds it took."""
    started = time.monotonic()
    await eventually(predicate, within, interval, what)
    return time.monotonic() - started


async def serves_health(proc: asyncio.subprocess.Process, port: int, within: float = 20) -> bool:
    """Wait until the service process on ``port`` answers ``GET /health`` with 200.

    False when the process exited first or ``within`` seconds passed: the caller fails
    the test with the process's output, which only it knows how to read.
    """
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200:
                        return True
            except aiohttp.ClientConnectionError:
                pass
            if proc.returncode is not None or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)


def fast_event_settings(**overrides: Any) -> EventSettings:
    """Event settings for tests: short retry delays, quick reconnects and outbox polls."""
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


# -- PostgreSQL ---------------------------------------------------------------------------


def asyncpg_dsn(url: str) -> str:
    """``url`` as asyncpg takes it (without SQLAlchemy's ``+asyncpg`` driver suffix)."""
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def pg_admin(sql: str) -> None:
    """Run ``sql`` on the server's maintenance database (CREATE/DROP DATABASE)."""
    conn = await asyncpg.connect(asyncpg_dsn(PG_URL))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


#: what a killed test run leaves behind (databases, namespaces) is swept by later runs
#: once it is older than this; a run going on at the same time is never touched
STALE_AFTER = 3 * 3600


def stale(name: str, pattern: re.Pattern[str]) -> bool:
    """``name`` carries a start time (``pattern``'s first group) older than STALE_AFTER."""
    match = pattern.match(name)
    return bool(match) and int(match.group(1)) < time.time() - STALE_AFTER


@contextlib.asynccontextmanager
async def fresh_database(prefix: str) -> AsyncIterator[str]:
    """A PostgreSQL database of the caller's own (its URL), dropped afterwards.

    Its name carries the time it was made, so the databases of a killed run (never
    dropped) are dropped by the next ``fresh_database`` of the same prefix, 3 h on.
    """
    require_server(PG_URL, 5432, "PostgreSQL")
    name = f"{prefix}{int(time.time())}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(asyncpg_dsn(PG_URL))
    try:
        left = re.compile(rf"^{re.escape(prefix)}(\d+)_")
        for row in await conn.fetch(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", prefix
        ):
            if stale(row["datname"], left):
                await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield str(URL(PG_URL).with_path(f"/{name}"))
    finally:
        await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- RabbitMQ -----------------------------------------------------------------------------


def sweep_namespaces(matches: Callable[[str], bool]) -> None:
    """Delete every queue and exchange on the broker whose name ``matches``: what a
    crashed test left behind (for the end of a session). Needs ``rabbitmqctl``; never
    raises."""
    leftovers = listed_names(matches)
    if leftovers:
        with contextlib.suppress(Exception):
            run_in_thread(lambda: delete_names(AMQP_URL, leftovers))


# -- a TCP forwarder a test can cut ------------------------------------------------------


class TcpRelay:
    """Forwards TCP from a local port to ``target``; :meth:`cut` aborts every connection
    (the client sees its peer vanish) and :meth:`stop` also stops listening;
    :meth:`hold_replies` keeps what the target sends until :meth:`release_replies` (a
    server that stalls: the client's requests get there, its answers do not come)."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._replies = asyncio.Event()
        self._replies.set()

    def hold_replies(self) -> None:
        self._replies.clear()

    def release_replies(self) -> None:
        self._replies.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gate: bool = False
    ) -> None:
        try:
            while data := await reader.read(65536):
                if gate:
                    await self._replies.wait()
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
        self._transports += [writer.transport, up_writer.transport]
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer, gate=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cut(self) -> None:
        for transport in self._transports:
            transport.abort()
        self._transports.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

"""Idempotent consumers: a duplicate delivery changes nothing; a failure changes nothing."""

from __future__ import annotations

import asyncio

from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select

from services.common.db import Database
from services.common.events import (
    USAGE_RECORDED,
    Event,
    outbox_metadata,
    processed_events,
    run_handler,
)
from services.common.events.consumer import subscribe

from .conftest import BusKit, eventually

effects_metadata = MetaData()
effects = Table(
    "effects",
    effects_metadata,
    Column("id", Integer, primary_key=True),
    Column("event_id", String(36), nullable=False),
    Column("consumer", String(50), nullable=False),
)


async def _effects(db: Database) -> list[tuple[str, str]]:
    async with db.session() as session:
        rows = await session.execute(select(effects.c.event_id, effects.c.consumer))
        return [tuple(r) for r in rows.all()]


def _writer(consumer: str):
    async def handler(event: Event, session) -> None:
        await session.execute(insert(effects).values(event_id=event.id, consumer=consumer))

    return handler


async def test_run_handler_runs_once_per_consumer_and_event(any_db: Database) -> None:
    await any_db.create_all(effects_metadata, outbox_metadata)
    event = Event.new(USAGE_RECORDED, "proxy", {"cost": "1"})
    assert await run_handler(any_db, "billing", event, _writer("billing")) is True
    assert await run_handler(any_db, "billing", event, _writer("billing")) is False
    # another consumer of the same event has its own mark
    assert await run_handler(any_db, "analytics", event, _writer("analytics")) is True
    assert sorted(await _effects(any_db)) == [(event.id, "analytics"), (event.id, "billing")]
    async with any_db.session() as session:
        marks = (await session.execute(select(processed_events.c.consumer))).scalars().all()
    assert sorted(marks) == ["analytics", "billing"]


async def test_concurrent_duplicates_have_one_effect(any_db: Database) -> None:
    """Two deliveries of one event racing (two consumer processes): one effect."""
    await any_db.create_all(effects_metadata, outbox_metadata)
    other = Database(any_db.url)  # a second process's connection pool
    try:
        event = Event.new(USAGE_RECORDED, "proxy", {})
        started = asyncio.Event()

        async def slow(event: Event, session) -> None:
            started.set()
            await asyncio.sleep(0.2)  # hold the transaction open
            await session.execute(insert(effects).values(event_id=event.id, consumer="b"))

        results = await asyncio.gather(
            run_handler(any_db, "b", event, slow),
            run_handler(other, "b", event, slow),
        )
        assert sorted(results) == [False, True]
        assert await _effects(any_db) == [(event.id, "b")]
    finally:
        await other.close()


async def test_failing_handler_leaves_no_trace(any_db: Database) -> None:
    await any_db.create_all(effects_metadata, outbox_metadata)
    event = Event.new(USAGE_RECORDED, "proxy", {})

    async def half_done(event: Event, session) -> None:
        await session.execute(insert(effects).values(event_id=event.id, consumer="c"))
        raise RuntimeError("crashed after writing")

    try:
        await run_handler(any_db, "c", event, half_done)
    except RuntimeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("the handler's error must propagate (so the bus retries)")
    assert await _effects(any_db) == []  # the write and the processed mark rolled back
    assert await run_handler(any_db, "c", event, _writer("c")) is True


async def test_same_event_delivered_twice_has_one_effect(
    sqlite_db: Database, bus_kit: BusKit
) -> None:
    await sqlite_db.create_all(effects_metadata, outbox_metadata)
    bus = await bus_kit.make()
    bus_kit.track("effects")
    calls = 0

    async def handler(event: Event, session) -> None:
        nonlocal calls
        calls += 1
        await session.execute(insert(effects).values(event_id=event.id, consumer="effects"))

    consumer = await subscribe(bus, sqlite_db, "effects", ["usage.recorded"], handler)
    assert consumer.name == "effects"
    event = Event.new(USAGE_RECORDED, "proxy", {"cost": "0.5"})
    other = Event.new(USAGE_RECORDED, "proxy", {"cost": "0.7"})
    for e in (event, event, other, event):
        await bus.publish(e)
    await eventually(lambda: _queue_empty(bus, "effects"), what="all deliveries handled")
    await eventually(lambda: calls == 2, what="two handler runs")
    await asyncio.sleep(0.2)
    assert calls == 2
    assert sorted(await _effects(sqlite_db)) == sorted(
        [(event.id, "effects"), (other.id, "effects")]
    )


async def _queue_empty(bus, queue: str) -> bool:
    return await bus.queue_depth(queue) == 0


async def test_handler_failure_is_retried_and_counted_once(
    sqlite_db: Database, bus_kit: BusKit
) -> None:
    """Ack after commit: a failed attempt commits nothing, the retry commits once."""
    await sqlite_db.create_all(effects_metadata, outbox_metadata)
    bus = await bus_kit.make()
    bus_kit.track("once")
    attempts = 0

    async def handler(event: Event, session) -> None:
        nonlocal attempts
        attempts += 1
        await session.execute(insert(effects).values(event_id=event.id, consumer="once"))
        if attempts == 1:
            raise ConnectionError("the provider hung up")  # after the write: rolled back

    await subscribe(bus, sqlite_db, "once", ["usage.recorded"], handler)
    event = Event.new(USAGE_RECORDED, "proxy", {})
    await bus.publish(event)
    await eventually(lambda: attempts == 2, what="the retry")
    await asyncio.sleep(0.3)
    assert attempts == 2
    assert await _effects(sqlite_db) == [(event.id, "once")]
    assert await bus.dlq_depth("once") == 0

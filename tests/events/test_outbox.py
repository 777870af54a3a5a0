"""The transactional outbox and the relay, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select

from services.common.db import Database
from services.common.events import (
    TRANSACTION_CREATED,
    USAGE_RECORDED,
    Event,
    InProcessBus,
    OutboxRelay,
    QueueSpec,
    event_outbox,
    outbox_metadata,
    record,
)
from services.common.events import processed_events as inbox
from services.common.events.consumer import subscribe
from tests.support import TcpRelay

from .conftest import BusKit, collector, eventually, test_settings, via_proxy

things_metadata = MetaData()
things = Table(
    "things",
    things_metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
)


async def test_record_is_part_of_the_callers_transaction(any_db: Database) -> None:
    await any_db.create_all(things_metadata, outbox_metadata)
    async with any_db.transaction() as session:
        await session.execute(insert(things).values(name="kept"))
        kept = await record(session, USAGE_RECORDED, {"cost": "1.50"}, "proxy")
    with pytest.raises(RuntimeError):
        async with any_db.transaction() as session:
            await session.execute(insert(things).values(name="rolled back"))
            await record(session, USAGE_RECORDED, {"cost": "2.50"}, "proxy")
            raise RuntimeError("the change failed")
    async with any_db.session() as session:
        rows = (await session.execute(select(event_outbox))).mappings().all()
        names = (await session.execute(select(things.c.name))).scalars().all()
    assert names == ["kept"]
    assert [r["event_id"] for r in rows] == [kept.id]
    row = rows[0]
    assert row["type"] == USAGE_RECORDED and row["source"] == "proxy"
    assert row["sent_at"] is None and row["attempts"] == 0
    assert Event.from_json(row["payload"]) == kept


async def test_relay_publishes_in_order_and_marks_sent(any_db: Database, bus_kit: BusKit) -> None:
    await any_db.create_all(outbox_metadata)
    # prefetch 1: one delivery at a time, so the arrival order is the queue's order
    one_at_a_time = bus_kit.settings.model_copy(update={"amqp_prefetch": 1})
    bus = await bus_kit.make([QueueSpec("ordered", ("#",))], settings=one_at_a_time)
    got = await collector(bus, "ordered", ["#"])
    recorded = []
    for i in range(30):
        async with any_db.transaction() as session:
            recorded.append(await record(session, USAGE_RECORDED, {"n": i}, "proxy"))
    relay = OutboxRelay(any_db, bus, test_settings(events_outbox_batch_size=7), name="t")
    assert await relay.pending_count() == 30
    assert await relay.run_once() == 30
    await eventually(lambda: len(got) == 30, what="30 deliveries")
    assert [e.id for e in got] == [e.id for e in recorded]
    assert await relay.pending_count() == 0
    assert await relay.run_once() == 0  # nothing is sent twice
    async with any_db.session() as session:
        unsent = await session.scalar(
            select(func.count()).select_from(event_outbox).where(event_outbox.c.sent_at.is_(None))
        )
    assert unsent == 0


async def test_commit_wakes_the_relay_at_once(sqlite_db: Database, bus_kit: BusKit) -> None:
    await sqlite_db.create_all(outbox_metadata)
    bus = await bus_kit.make([QueueSpec("fast", ("#",))])
    got = await collector(bus, "fast", ["#"])
    relay = OutboxRelay(sqlite_db, bus, test_settings(events_outbox_poll_interval="30s"))
    await relay.start()
    try:
        await asyncio.sleep(0.1)  # the relay is now asleep for 30 s unless notified
        began = time.monotonic()
        async with sqlite_db.transaction() as session:
            await record(session, USAGE_RECORDED, {"n": 1}, "proxy")
        await eventually(lambda: len(got) == 1, within=3, what="the event")
        assert time.monotonic() - began < 2.0
    finally:
        await relay.close()


async def test_a_woken_relay_lingers_and_sends_what_came_meanwhile_in_one_drain(
    sqlite_db: Database, bus_kit: BusKit
) -> None:
    """EVENTS_OUTBOX_LINGER: one drain (one SELECT, one mark-sent) for a burst of commits."""
    await sqlite_db.create_all(outbox_metadata)
    bus = await bus_kit.make([QueueSpec("burst", ("#",))])
    got = await collector(bus, "burst", ["#"])
    drains: list[tuple[float, int]] = []

    class Counted(OutboxRelay):
        async def run_once(self) -> int:
            sent = await super().run_once()
            drains.append((time.monotonic(), sent))
            return sent

    relay = Counted(
        sqlite_db,
        bus,
        test_settings(events_outbox_poll_interval="30s", events_outbox_linger="300ms"),
    )
    await relay.start()
    try:
        await eventually(lambda: len(drains) == 1, what="the first (empty) drain")
        began = time.monotonic()
        for i in range(3):  # three commits within the linger
            async with sqlite_db.transaction() as session:
                await record(session, USAGE_RECORDED, {"n": i}, "proxy")
            await asyncio.sleep(0.02)
        await eventually(lambda: len(got) == 3, within=10, what="the three events")
        # the drain returns after its mark-sent commit, which may come after the deliveries
        await eventually(lambda: sum(sent for _, sent in drains) == 3, what="the drain")
        sending = [(at, sent) for at, sent in drains[1:] if sent]
        assert [sent for _, sent in sending] == [3], drains  # one drain sent all three
        assert sending[0][0] - began >= 0.3, drains  # it waited for the linger first
    finally:
        await relay.close()


async def test_events_recorded_while_broker_is_down_are_all_delivered_in_order(
    any_db: Database, rabbit_kit: BusKit, amqp_proxy: TcpRelay
) -> None:
    await any_db.create_all(outbox_metadata)
    settings = test_settings(
        rabbit_kit.settings.events_namespace,
        amqp_url=via_proxy(rabbit_kit.settings.amqp_url, amqp_proxy),
        amqp_prefetch=1,
    )
    bus = await rabbit_kit.make([QueueSpec("durable", ("#",))], settings=settings)
    got = await collector(bus, "durable", ["#"])
    relay = OutboxRelay(any_db, bus, settings, name="outage")
    await relay.start()
    try:
        async with any_db.transaction() as session:
            first = await record(session, USAGE_RECORDED, {"n": -1}, "proxy")
        await eventually(lambda: len(got) == 1, what="delivery before the outage")
        # a consumer can see an event before its publisher has marked it sent: wait for
        # that too, or the cut below would leave it pending (then resent, harmlessly)
        await eventually(lambda: _pending_is(relay, 0), what="the first event marked sent")

        await amqp_proxy.stop()  # the broker vanishes for this process
        await eventually(lambda: not bus.connected, what="the bus to notice")
        recorded = []
        for i in range(25):
            async with any_db.transaction() as session:
                recorded.append(await record(session, USAGE_RECORDED, {"n": i}, "proxy"))
        await eventually(lambda: relay.consecutive_failures >= 2, what="failed attempts")
        assert await relay.pending_count() == 25  # all kept
        assert "not connected" in (relay.last_error or "")
        async with any_db.session() as session:
            attempts = await session.scalar(
                select(event_outbox.c.attempts).where(event_outbox.c.event_id == recorded[0].id)
            )
        assert attempts >= 1  # the failure is recorded on the first pending row

        await amqp_proxy.start()  # the broker is back
        await eventually(lambda: len(got) == 26, within=15, what="all 26 events")
        assert [e.id for e in got] == [first.id] + [e.id for e in recorded]  # none lost, in order
        await eventually(lambda: _pending_is(relay, 0), what="outbox drained")
        await eventually(lambda: relay.consecutive_failures == 0, what="the relay to recover")
        assert relay.last_error is None
    finally:
        await relay.close()


async def _pending_is(relay: OutboxRelay, n: int) -> bool:
    return await relay.pending_count() == n


async def test_pending_events_survive_a_restart(any_db: Database, bus_kit: BusKit) -> None:
    """Rows committed by a process that died before relaying are sent by the next one."""
    await any_db.create_all(outbox_metadata)
    recorded = []
    async with any_db.transaction() as session:
        for i in range(3):
            recorded.append(await record(session, USAGE_RECORDED, {"n": i}, "proxy"))
    await any_db.close()  # "the process dies"

    db = Database(any_db.url)  # the restarted process
    try:
        bus = await bus_kit.make([QueueSpec("restart", ("#",))])
        got = await collector(bus, "restart", ["#"])
        relay = OutboxRelay(db, bus)
        await relay.start()
        try:
            await eventually(lambda: len(got) == 3, what="the 3 old events")
        finally:
            await relay.close()
        assert sorted(e.id for e in got) == sorted(e.id for e in recorded)
    finally:
        await db.close()


async def test_consumer_effect_and_its_own_event_commit_together(
    any_db: Database, bus_kit: BusKit
) -> None:
    """Billing's shape: consume usage.recorded, write the charge and record
    transaction.created in one transaction; the relay then publishes it; a duplicate
    delivery charges nothing and publishes nothing."""
    charges = Table(
        "charges",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("usage_id", String(36), nullable=False),
        Column("amount", String(30), nullable=False),
    )
    await any_db.create_all(charges.metadata, outbox_metadata)
    bus = await bus_kit.make(
        [
            QueueSpec("billing.usage", ("usage.recorded",)),
            QueueSpec("audit", ("transaction.created",)),
        ]
    )
    relay = OutboxRelay(any_db, bus, name="billing")
    await relay.start()
    audit = await collector(bus, "audit", ["transaction.created"])

    async def charge(event: Event, session) -> None:
        await session.execute(insert(charges).values(usage_id=event.id, amount=event.data["cost"]))
        await record(session, TRANSACTION_CREATED, {"usage_id": event.id}, "billing")

    await subscribe(bus, any_db, "billing.usage", ["usage.recorded"], charge)
    try:
        usage = Event.new(USAGE_RECORDED, "proxy", {"cost": "0.42"})
        await bus.publish(usage)
        await bus.publish(usage)  # delivered twice
        await eventually(lambda: len(audit) == 1, what="transaction.created")
        await asyncio.sleep(0.3)
        async with any_db.session() as session:
            rows = (await session.execute(select(charges.c.usage_id, charges.c.amount))).all()
        assert rows == [(usage.id, "0.42")]
        assert len(audit) == 1
        assert audit[0].data == {"usage_id": usage.id}
        assert audit[0].source == "billing"
    finally:
        await relay.close()


async def test_old_outbox_rows_and_inbox_marks_are_purged(any_db: Database) -> None:
    """Both tables stop growing: what was sent (outbox) or processed (inbox) longer ago
    than the retention is deleted; pending rows and recent marks stay."""
    await any_db.create_all(outbox_metadata)
    old = datetime.now(UTC) - timedelta(days=10)
    new = datetime.now(UTC)
    async with any_db.transaction() as session:
        for i, (sent_at, created) in enumerate([(old, old), (new, new), (None, old)]):
            await session.execute(
                insert(event_outbox).values(
                    event_id=f"e{i}",
                    type="t",
                    source="s",
                    payload="{}",
                    created_at=created,
                    sent_at=sent_at,
                    attempts=0,
                )
            )
        await session.execute(
            insert(inbox),
            [
                {"consumer": "c", "event_id": "old", "processed_at": old},
                {"consumer": "c", "event_id": "new", "processed_at": new},
            ],
        )
    relay = OutboxRelay(any_db, InProcessBus(test_settings()), name="purge")
    try:
        assert await relay.purge_sent(7 * 86400) == 1
        assert await relay.purge_processed(7 * 86400) == 1
    finally:
        await relay.close()
    async with any_db.session() as session:
        left = (await session.execute(select(event_outbox.c.event_id))).scalars().all()
        marks = (await session.execute(select(inbox.c.event_id))).scalars().all()
        assert await session.scalar(select(func.count()).select_from(inbox)) == 1
    assert sorted(left) == ["e1", "e2"]  # the recent sent one and the pending one
    assert marks == ["new"]

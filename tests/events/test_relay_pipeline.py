"""The pipelined relay: a batch's publishes await their confirms together, in id order.

The buses are the real ones; a subclass only counts (and, for one test, holds back)
publishes on their way to the real ``publish``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from sqlalchemy import select

from services.common.db import Database
from services.common.events import (
    APIKEY_REVOKED,
    USAGE_RECORDED,
    Event,
    InProcessBus,
    OutboxRelay,
    PublishError,
    QueueSpec,
    RabbitBus,
    event_outbox,
    outbox_metadata,
    record,
    record_event,
)
from services.common.events import bus as bus_module
from services.common.events.envelope import StoredEvent
from services.common.events.metrics import CONFIRMED

from .conftest import BusKit, collector, eventually


class _Counting:
    """Counts publishes in flight (called, not yet confirmed) around the real publish."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        #: event ids whose publish waits for ``release`` before going to the broker
        self.hold: set[str] = set()
        self.release = asyncio.Event()

    async def _counted(self, event_id: str, send: Any) -> None:
        self.started.append(event_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if event_id in self.hold:
                await self.release.wait()
            await send()
        finally:
            self.in_flight -= 1

    async def publish(self, event: Event) -> None:
        await self._counted(event.id, lambda: super(_Counting, self).publish(event))  # type: ignore[misc]

    async def publish_stored(self, stored: StoredEvent) -> None:
        await self._counted(  # what the relay calls
            stored.id, lambda: super(_Counting, self).publish_stored(stored)  # type: ignore[misc]
        )


class CountingRabbitBus(_Counting, RabbitBus):
    """RabbitBus writes a relay's batch in chunks, without ``publish_stored``: it counts
    each chunk as in flight until its confirms are in. A held event's chunk is sent
    without it, then the held event alone once released (as if its confirm hung)."""

    async def _publish_chunk(self, chunk: Any, offset: int, result: Any) -> bool:
        self.started.extend(s.id for s in chunk)
        runs: list[tuple[int, int]] = []  # [start, end) of the events not held, in order
        for i, stored in enumerate(chunk):
            if stored.id not in self.hold:
                if runs and runs[-1][1] == i:
                    runs[-1] = (runs[-1][0], i + 1)
                else:
                    runs.append((i, i + 1))
        held = [i for i, stored in enumerate(chunk) if stored.id in self.hold]
        self.in_flight += len(chunk)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        waiting = len(chunk)
        try:
            for start, end in runs:
                await super()._publish_chunk(chunk[start:end], offset + start, result)
            self.in_flight -= waiting - len(held)
            waiting = len(held)
            if held:
                await self.release.wait()
            for i in held:
                await super()._publish_chunk(chunk[i : i + 1], offset + i, result)
        finally:
            self.in_flight -= waiting
        return True


class CountingInProcessBus(_Counting, InProcessBus):
    pass


async def _counting_bus(kit: BusKit, queues: Iterable[QueueSpec], **settings: Any) -> Any:
    """Like ``kit.make``, with the counting subclass of the kit's bus."""
    config = kit.settings.model_copy(update=settings)
    return await kit.make(
        queues, config, rabbit_class=CountingRabbitBus, inprocess_class=CountingInProcessBus
    )


async def _record(db: Database, events: list[Event]) -> None:
    async with db.transaction() as session:
        for event in events:
            await record_event(session, event)


async def _rows(db: Database) -> dict[str, dict[str, Any]]:
    async with db.session() as session:
        rows = (await session.execute(select(event_outbox).order_by(event_outbox.c.id))).all()
    return {r.event_id: dict(r._mapping) for r in rows}


async def test_relay_publishes_a_batch_concurrently_in_id_order(
    any_db: Database, rabbit_kit: BusKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real confirms: many publishes are in flight at once, never more than the bound,
    started in id order; the broker delivers them in that order; all are marked sent."""
    monkeypatch.setattr(bus_module, "MAX_IN_FLIGHT", 64)
    await any_db.create_all(outbox_metadata)
    bus = await _counting_bus(rabbit_kit, [QueueSpec("piped", ("#",))], amqp_prefetch=1)
    got = await collector(bus, "piped", ["#"])
    events = [Event.new(USAGE_RECORDED, "proxy", {"n": i}) for i in range(300)]
    await _record(any_db, events)
    relay = OutboxRelay(
        any_db, bus, bus.settings.model_copy(update={"events_outbox_batch_size": 200})
    )
    assert await relay.run_once() == 300
    assert 1 < bus.max_in_flight <= 64
    assert bus.started == [e.id for e in events]
    await eventually(lambda: len(got) == 300, what="300 deliveries")
    assert [e.id for e in got] == [e.id for e in events]  # the broker kept the order
    assert await relay.pending_count() == 0
    assert all(r["sent_at"] is not None for r in (await _rows(any_db)).values())


async def test_concurrent_publishes_all_confirm_and_arrive(rabbit_kit: BusKit) -> None:
    """RabbitBus: N publishes in flight on the one confirm channel all get their own
    confirm, and each message arrives once."""
    bus = await _counting_bus(rabbit_kit, [QueueSpec("burst", ("usage.recorded",))])
    got = await collector(bus, "burst", ["usage.recorded"])
    confirmed = CONFIRMED.labels(type=USAGE_RECORDED)
    before = confirmed._value.get()
    events = [Event.new(USAGE_RECORDED, "proxy", {"n": i}) for i in range(500)]
    await asyncio.gather(*(bus.publish(e) for e in events))
    assert bus.max_in_flight > 100
    assert confirmed._value.get() - before == 500
    await eventually(lambda: len(got) >= 500, what="500 deliveries")
    await asyncio.sleep(0.2)
    assert sorted(e.id for e in got) == sorted(e.id for e in events)


async def test_a_failed_publish_leaves_only_its_row_pending(
    any_db: Database, bus_kit: BusKit
) -> None:
    """An unroutable event in the middle of a batch: the rows confirmed around it are
    marked sent, it alone stays pending with the error recorded, and run_once raises."""
    await any_db.create_all(outbox_metadata)
    bus = await _counting_bus(bus_kit, [QueueSpec("usage", ("usage.recorded",))])
    got = await collector(bus, "usage", ["usage.recorded"])
    events = [Event.new(USAGE_RECORDED, "proxy", {"n": i}) for i in range(10)]
    events[3] = Event.new(APIKEY_REVOKED, "auth", {"n": 3})  # no queue binds it
    await _record(any_db, events)
    relay = OutboxRelay(any_db, bus, name="partial")
    with pytest.raises(PublishError, match="unroutable"):
        await relay.run_once()
    assert bus.started == [e.id for e in events]  # all started, in order
    rows = await _rows(any_db)
    unsent = [eid for eid, r in rows.items() if r["sent_at"] is None]
    assert unsent == [events[3].id]
    assert rows[events[3].id]["attempts"] == 1
    assert "unroutable" in rows[events[3].id]["last_error"]
    assert all(r["attempts"] == 0 for eid, r in rows.items() if eid != events[3].id)
    expected = [e.id for i, e in enumerate(events) if i != 3]
    await eventually(lambda: len(got) == 9, what="the 9 routable events")
    assert [e.id for e in got] == expected

    with pytest.raises(PublishError):  # the next drain retries only that row
        await relay.run_once()
    assert bus.started[10:] == [events[3].id]
    assert (await _rows(any_db))[events[3].id]["attempts"] == 2


async def test_a_row_that_is_not_an_envelope_goes_out_and_to_the_dlq(
    any_db: Database, bus_kit: BusKit
) -> None:
    """The relay does not parse what it publishes: a row altered into something that is
    not an envelope is published with the others, the consumer dead-letters it as
    poison, and the outbox is not held up behind it."""
    await any_db.create_all(outbox_metadata)
    bus = await _counting_bus(bus_kit, [QueueSpec("usage", ("usage.recorded",))])
    got = await collector(bus, "usage", ["usage.recorded"])
    events = [Event.new(USAGE_RECORDED, "proxy", {"n": i}) for i in range(3)]
    await _record(any_db, events)
    async with any_db.transaction() as session:
        await session.execute(
            event_outbox.update()
            .where(event_outbox.c.event_id == events[1].id)
            .values(payload="not an envelope")
        )
    relay = OutboxRelay(any_db, bus, name="poison")
    assert await relay.run_once() == 3
    assert await relay.pending_count() == 0
    await eventually(lambda: len(got) == 2, what="the 2 good events")
    assert [e.id for e in got] == [events[0].id, events[2].id]
    letters: list[Any] = []

    async def dead_lettered() -> bool:
        letters[:] = await bus.dead_letters("usage")
        return len(letters) == 1

    for _ in range(100):
        if await dead_lettered():
            break
        await asyncio.sleep(0.05)
    assert len(letters) == 1
    assert letters[0].body == b"not an envelope"
    assert letters[0].reason == "poison"


async def test_no_new_publish_starts_after_a_failure(
    any_db: Database, bus_kit: BusKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one publish in flight at a time the relay behaves as before: it stops at the
    failed row and the later rows stay pending (not published)."""
    monkeypatch.setattr(bus_module, "MAX_IN_FLIGHT", 1)
    await any_db.create_all(outbox_metadata)
    bus = await _counting_bus(bus_kit, [QueueSpec("usage", ("usage.recorded",))])
    events = [Event.new(USAGE_RECORDED, "proxy", {"n": i}) for i in range(6)]
    events[2] = Event.new(APIKEY_REVOKED, "auth", {"n": 2})
    await _record(any_db, events)
    relay = OutboxRelay(any_db, bus, name="stops")
    with pytest.raises(PublishError):
        await relay.run_once()
    assert bus.max_in_flight == 1
    assert bus.started == [e.id for e in events[:3]]
    rows = await _rows(any_db)
    assert [eid for eid, r in rows.items() if r["sent_at"] is None] == [e.id for e in events[2:]]


async def test_a_stopped_relay_marks_what_was_confirmed(any_db: Database, bus_kit: BusKit) -> None:
    """Stopping the relay while one publish hangs: the confirmed rows of the batch are
    marked sent (not published again), the hanging one stays pending."""
    await any_db.create_all(outbox_metadata)
    bus = await _counting_bus(bus_kit, [QueueSpec("usage", ("usage.recorded",))])
    got = await collector(bus, "usage", ["usage.recorded"])
    events = [Event.new(USAGE_RECORDED, "proxy", {"n": i}) for i in range(8)]
    bus.hold.add(events[4].id)
    await _record(any_db, events)
    relay = OutboxRelay(any_db, bus, name="stopped")
    await relay.start()
    try:
        await eventually(lambda: len(got) == 7, what="the 7 other events")
        await eventually(lambda: bus.in_flight == 1, what="their confirms")
    finally:
        await relay.stop()
    rows = await _rows(any_db)
    assert [eid for eid, r in rows.items() if r["sent_at"] is None] == [events[4].id]
    bus.hold.clear()  # the next drain sends it
    assert await relay.run_once() == 1
    await eventually(lambda: len(got) == 8, what="the held event")
    await relay.close()


async def test_recorded_events_still_flow_through_a_running_relay(
    any_db: Database, bus_kit: BusKit
) -> None:
    """Commits wake the pipelined relay; many small transactions all get out once."""
    await any_db.create_all(outbox_metadata)
    bus = await _counting_bus(bus_kit, [QueueSpec("flow", ("#",))])
    got = await collector(bus, "flow", ["#"])
    relay = OutboxRelay(any_db, bus, name="flow")
    await relay.start()
    try:
        recorded = []

        async def one(i: int) -> None:
            async with any_db.transaction() as session:
                recorded.append(await record(session, USAGE_RECORDED, {"n": i}, "proxy"))

        await asyncio.gather(*(one(i) for i in range(120)))
        await eventually(lambda: len(got) == 120, what="120 events")
        await eventually(lambda: _pending_is(relay, 0), what="all marked sent")
        assert sorted(e.id for e in got) == sorted(e.id for e in recorded)
        assert len(bus.started) == 120  # each published once
    finally:
        await relay.close()


async def _pending_is(relay: OutboxRelay, n: int) -> bool:
    return await relay.pending_count() == n

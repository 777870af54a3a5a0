"""Group commit: concurrent deliveries share one transaction, and nothing else changes.

The semantics of :mod:`services.common.events.consumer` hold per event (effect and inbox
mark commit together, a failure fails only its own delivery, duplicates run nothing),
while N concurrent deliveries cost fewer than N transactions. Commits are counted with
``db.add_commit_listener``; the handlers tag their transaction in ``session.info``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text

from services.common.db import Database, DbSession
from services.common.events import USAGE_RECORDED, Event, QueueSpec, outbox_metadata
from services.common.events import processed_events as inbox
from services.common.events.consumer import Consumer, ConsumerClosed, subscribe
from services.common.events.metrics import DUPLICATES

from .conftest import BusKit, eventually

effects_metadata = MetaData()
effects = Table(
    "gc_effects",
    effects_metadata,
    Column("id", Integer, primary_key=True),
    Column("event_id", String(36), nullable=False),
)

#: ``session.info`` key: how many handler runs this transaction holds
HANDLED = "test_handled"


class Commits:
    """Counts the committed transactions in which a handler ran, and their sizes."""

    def __init__(self, db: Database) -> None:
        self.sizes: list[int] = []
        self.db = db
        db.add_commit_listener(self._on_commit)

    def _on_commit(self, session: DbSession) -> None:
        if session.info.get(HANDLED):
            self.sizes.append(session.info[HANDLED])

    def close(self) -> None:
        self.db.remove_commit_listener(self._on_commit)


@pytest.fixture
def commits(any_db: Database) -> Iterator[Commits]:
    counter = Commits(any_db)
    yield counter
    counter.close()


class Recorder:
    """A handler that writes one effect row per run and can be told to fail for an event."""

    def __init__(self, poison: Iterable[str] = ()) -> None:
        self.poison = set(poison)
        self.runs: list[str] = []

    async def __call__(self, event: Event, session: DbSession) -> None:
        self.runs.append(event.id)
        session.info[HANDLED] = session.info.get(HANDLED, 0) + 1
        await session.execute(insert(effects).values(event_id=event.id))
        if event.id in self.poison:
            raise ValueError(f"poisoned event {event.id}")


async def _effects(db: Database) -> list[str]:
    async with db.session() as session:
        return list((await session.execute(select(effects.c.event_id))).scalars().all())


async def _marked(db: Database, consumer: str) -> list[str]:
    async with db.session() as session:
        rows = await session.execute(select(inbox.c.event_id).where(inbox.c.consumer == consumer))
        return list(rows.scalars().all())


def _events(n: int) -> list[Event]:
    return [Event.new(USAGE_RECORDED, "proxy", {"n": i}) for i in range(n)]


async def test_concurrent_deliveries_commit_in_fewer_transactions(
    any_db: Database, commits: Commits
) -> None:
    await any_db.create_all(effects_metadata, outbox_metadata)
    handler = Recorder()
    consumer = Consumer(any_db, "gc", handler, max_batch=20)
    try:
        events = _events(50)
        await asyncio.gather(*(consumer(e) for e in events))
        # every call returned only after its effect and mark were committed
        assert sorted(await _effects(any_db)) == sorted(e.id for e in events)
        assert sorted(await _marked(any_db, "gc")) == sorted(e.id for e in events)
        assert sum(commits.sizes) == 50
        assert len(commits.sizes) <= 3  # 50 arrivals in one tick, batches of at most 20
        assert max(commits.sizes) == 20
    finally:
        await consumer.close()


async def test_a_lone_event_runs_at_once(any_db: Database, commits: Commits) -> None:
    """No collecting timer: an idle consumer commits a single event straight away."""
    await any_db.create_all(effects_metadata, outbox_metadata)
    consumer = Consumer(any_db, "gc", Recorder())
    try:
        loop = asyncio.get_running_loop()
        for event in _events(3):
            began = loop.time()
            await consumer(event)
            assert loop.time() - began < 0.5
        assert commits.sizes == [1, 1, 1]
    finally:
        await consumer.close()


async def test_arrivals_during_a_batch_form_the_next_one(
    any_db: Database, commits: Commits
) -> None:
    await any_db.create_all(effects_metadata, outbox_metadata)
    release = asyncio.Event()
    first = Event.new(USAGE_RECORDED, "proxy", {"first": True})

    async def handler(event: Event, session: DbSession) -> None:
        if event.id == first.id:
            await release.wait()  # hold the first batch open
        await Recorder()(event, session)

    consumer = Consumer(any_db, "gc", handler)
    try:
        head = asyncio.create_task(consumer(first))
        await eventually(lambda: consumer._batcher._running, what="the first batch to start")
        rest = [asyncio.create_task(consumer(e)) for e in _events(10)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in rest)
        release.set()
        await asyncio.gather(head, *rest)
        assert commits.sizes == [1, 10]
    finally:
        await consumer.close()


async def test_a_poisoned_event_fails_alone_and_the_worker_goes_on(
    any_db: Database, commits: Commits
) -> None:
    await any_db.create_all(effects_metadata, outbox_metadata)
    events = _events(8)
    bad = events[3]
    handler = Recorder(poison={bad.id})
    consumer = Consumer(any_db, "gc", handler)
    try:
        results = await asyncio.gather(*(consumer(e) for e in events), return_exceptions=True)
        assert [type(r) for r in results] == [type(None)] * 3 + [ValueError] + [type(None)] * 4
        good = sorted(e.id for e in events if e is not bad)
        # the batch rolled back; the three before the bad one committed together, the
        # bad one failed alone, the four after it committed together
        assert sorted(await _effects(any_db)) == good
        assert sorted(await _marked(any_db, "gc")) == good
        assert handler.runs.count(bad.id) == 2  # in the batch, then alone
        assert commits.sizes == [3, 4]

        # the worker survived and batches again; the bad event's retry still fails alone
        handler.runs.clear()
        more = _events(5)
        results = await asyncio.gather(*(consumer(e) for e in [*more, bad]), return_exceptions=True)
        assert isinstance(results[-1], ValueError) and results[:-1] == [None] * 5
        assert commits.sizes[2:] == [5]  # 6 in a batch, rolled back; 5 again, then it alone

        # healed: the retry of the bad event commits (once), in a batch with others
        handler.poison = set()
        batch = [bad, *_events(4)]
        await asyncio.gather(*(consumer(e) for e in batch))
        assert commits.sizes[3:] == [5]
        assert (await _effects(any_db)).count(bad.id) == 1
    finally:
        await consumer.close()


async def test_a_database_error_in_the_batch_fails_only_its_event(
    any_db: Database, commits: Commits
) -> None:
    """Not only handler exceptions: a statement the database refuses aborts the batch
    transaction (on PostgreSQL every later statement fails too); the events around the
    offending one commit in a batch each and only it fails."""
    await any_db.create_all(effects_metadata, outbox_metadata)
    events = _events(6)
    bad = events[2]

    async def handler(event: Event, session: DbSession) -> None:
        if event.id == bad.id:
            await session.execute(text("INSERT INTO no_such_table VALUES (1)"))
        await Recorder()(event, session)

    consumer = Consumer(any_db, "gc", handler)
    try:
        results = await asyncio.gather(*(consumer(e) for e in events), return_exceptions=True)
        assert [r is None for r in results] == [True, True, False, True, True, True]
        assert sorted(await _marked(any_db, "gc")) == sorted(e.id for e in events if e is not bad)
        assert commits.sizes == [2, 3]
    finally:
        await consumer.close()


async def test_a_duplicate_within_one_batch_runs_the_handler_once(
    any_db: Database, commits: Commits
) -> None:
    await any_db.create_all(effects_metadata, outbox_metadata)
    handler = Recorder()
    consumer = Consumer(any_db, "gc-dup", handler)
    duplicates = DUPLICATES.labels(consumer="gc-dup")
    before = duplicates._value.get()
    try:
        event, other = _events(2)
        await asyncio.gather(consumer(event), consumer(other), consumer(event), consumer(event))
        assert sorted(handler.runs) == sorted([event.id, other.id])
        assert commits.sizes == [2]  # one transaction for the four deliveries
        assert duplicates._value.get() - before == 2
        # a later redelivery is a duplicate too (the batch's mark was committed)
        await consumer(event)
        assert sorted(handler.runs) == sorted([event.id, other.id])
        assert sorted(await _effects(any_db)) == sorted([event.id, other.id])
        assert duplicates._value.get() - before == 3
    finally:
        await consumer.close()


async def test_batches_of_two_processes_stay_idempotent(any_db: Database) -> None:
    """Two consumer processes (two pools) batching overlapping deliveries: one effect
    per event, whichever batch wins each one."""
    await any_db.create_all(effects_metadata, outbox_metadata)
    other_db = Database(any_db.url)
    mine, theirs = Recorder(), Recorder()
    a = Consumer(any_db, "shared", mine)
    b = Consumer(other_db, "shared", theirs)
    try:
        events = _events(40)
        await asyncio.gather(
            *(a(e) for e in events), *(b(e) for e in reversed(events)), return_exceptions=False
        )
        assert sorted(mine.runs + theirs.runs) == sorted(e.id for e in events)
        assert sorted(await _effects(any_db)) == sorted(e.id for e in events)
    finally:
        await a.close()
        await b.close()
        await other_db.close()


async def test_a_delivery_cancelled_while_queued_is_skipped(any_db: Database) -> None:
    """The bus cancels a delivery at shutdown: if its batch has not started it does not
    run, and nothing is marked, so the redelivery runs it."""
    await any_db.create_all(effects_metadata, outbox_metadata)
    release = asyncio.Event()
    first, queued = _events(2)
    handler = Recorder()

    async def gated(event: Event, session: DbSession) -> None:
        await release.wait()
        await handler(event, session)

    consumer = Consumer(any_db, "gc", gated)
    try:
        head = asyncio.create_task(consumer(first))
        await eventually(lambda: consumer._batcher._running, what="the first batch to start")
        waiting = asyncio.create_task(consumer(queued))
        await asyncio.sleep(0.02)
        waiting.cancel()
        release.set()
        await head
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.05)
        assert handler.runs == [first.id]
        assert await _marked(any_db, "gc") == [first.id]
        await consumer(queued)  # the redelivery
        assert handler.runs == [first.id, queued.id]
    finally:
        await consumer.close()


async def test_close_fails_what_is_not_committed(any_db: Database) -> None:
    await any_db.create_all(effects_metadata, outbox_metadata)
    never = asyncio.Event()
    handler = Recorder()

    async def stuck(event: Event, session: DbSession) -> None:
        await handler(event, session)
        await never.wait()

    consumer = Consumer(any_db, "gc", stuck)
    assert consumer._batcher._worker is None  # started on the first call, not before
    running = asyncio.create_task(consumer(Event.new(USAGE_RECORDED, "proxy", {})))
    await eventually(lambda: handler.runs, what="the handler to start")
    queued = asyncio.create_task(consumer(Event.new(USAGE_RECORDED, "proxy", {})))
    await asyncio.sleep(0.02)
    await consumer.close()
    for task in (running, queued):
        with pytest.raises(ConsumerClosed):
            async with asyncio.timeout(5):  # a call left waiting would hang the test
                await task
    assert await _effects(any_db) == []  # the open transaction rolled back
    assert await _marked(any_db, "gc") == []
    with pytest.raises(ConsumerClosed):
        await consumer(Event.new(USAGE_RECORDED, "proxy", {}))
    await consumer.close()  # idempotent


async def test_group_commit_through_the_bus(
    any_db: Database, bus_kit: BusKit, commits: Commits
) -> None:
    """On both buses: concurrent deliveries are acked after a shared commit; a poisoned
    event is retried and dead-lettered on its own while the others are consumed once."""
    await any_db.create_all(effects_metadata, outbox_metadata)
    settings = bus_kit.settings.model_copy(update={"amqp_prefetch": 32})
    bus = await bus_kit.make([QueueSpec("gc.q", ("usage.recorded",))], settings=settings)
    events = _events(60)
    bad = events[10]
    handler = Recorder(poison={bad.id})
    # a backlog (the queue is declared by make): the consumer gets prefetch at once
    await asyncio.gather(*(bus.publish(e) for e in events))
    consumer = await subscribe(bus, any_db, "gc.q", ["usage.recorded"], handler)
    try:
        good = sorted(e.id for e in events if e is not bad)
        await eventually(lambda: _dlq_is(bus, "gc.q", 1), within=10, what="the bad event's DLQ")
        await eventually(lambda: _marked_is(any_db, "gc.q", good), what="the good events")
        assert await bus.queue_depth("gc.q") == 0
        assert sorted(await _effects(any_db)) == good  # each good effect once
        assert sum(commits.sizes) == 59
        assert len(commits.sizes) < 59  # grouped: fewer transactions than deliveries
        [dead] = await bus.dead_letters("gc.q")
        assert dead.event is not None and dead.event.id == bad.id
        assert "poisoned event" in dead.error
    finally:
        await bus.close()
        await consumer.close()


async def _dlq_is(bus, queue: str, n: int) -> bool:
    return await bus.dlq_depth(queue) == n


async def _marked_is(db: Database, consumer: str, ids: list[str]) -> bool:
    return sorted(await _marked(db, consumer)) == ids


async def test_consumer_batches_share_the_request_paths_single_writer(pg_db: Database) -> None:
    """On PostgreSQL two transactions of one process could lock rows in opposite orders
    (a batch of reservations, a batch of charges) and deadlock. The consumer commits
    through ``db.writes``, the process's one writer: while a request-path unit holds its
    transaction, a consumer batch waits for it instead of running beside it."""
    await pg_db.create_all(effects_metadata, outbox_metadata)
    recorder = Recorder()
    consumer = Consumer(pg_db, "single-writer", recorder)
    gate = asyncio.Event()

    async def request_unit(session: DbSession) -> str:
        await session.execute(insert(effects).values(event_id="request"))
        await gate.wait()  # the request's transaction stays open
        return "done"

    request = asyncio.create_task(pg_db.writes.run(request_unit))
    await asyncio.sleep(0.05)
    deliveries = [asyncio.create_task(consumer(e)) for e in _events(3)]
    await asyncio.sleep(0.3)
    assert recorder.runs == []  # queued behind the open transaction, not beside it
    gate.set()
    assert await request == "done"
    await asyncio.wait_for(asyncio.gather(*deliveries), 5)
    assert len(recorder.runs) == 3
    assert sorted(await _effects(pg_db)) == sorted(["request", *recorder.runs])
    await consumer.close()

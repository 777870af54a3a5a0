"""Idempotent consumers: the effect of an event happens once, however often it arrives.

``run_handler`` opens ``db.transaction()``, inserts ``(consumer, event.id)`` into
``processed_events`` and, only if that row is new, runs ``handler(event, session)`` in
the same transaction. The commit makes the effect and the "seen" mark durable together;
the bus acknowledges the delivery only after that. A handler error rolls both back, so
the retry runs the handler again. On PostgreSQL a concurrent duplicate waits on the
primary key and then sees the row; on SQLite the write transaction is exclusive.

Group commit. A transaction costs far more CPU (BEGIN, COMMIT, pool checkout, fsync)
than the statements of a typical handler, and the buses call a handler for up to
``prefetch`` deliveries at once. So :class:`Consumer` does not open a transaction per
delivery: each call queues ``(event, future)`` and waits; one worker task per consumer
takes everything queued (at most ``max_batch``) and runs it in *one* transaction: one
multi-row inbox INSERT (``ON CONFLICT DO NOTHING RETURNING event_id``) says which
events are new, then each new event's handler runs on the shared session. Only after
the commit are the futures resolved, so every delivery is still acked after its effect
is durable. Batching is natural (no timer): an idle worker runs a lone event at once,
and what arrives while a batch runs forms the next one.

If anything in a batch fails (a handler, the database, the commit), the whole batch
rolled back and each of its events runs again alone through ``run_handler``, so one
bad event fails only its own delivery (retry, then DLQ) and the others commit. Handlers
therefore may run more than once per delivery; like retries, that is harmless as long
as their effects go through ``session`` only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy.dialects import postgresql, sqlite

from ..db import Database, DbSession
from .bus import EventBus, error_text
from .envelope import Event
from .metrics import DUPLICATES
from .outbox import processed_events

log = logging.getLogger("aiagg.events.consumer")

SessionHandler = Callable[[Event, DbSession], Awaitable[None]]

#: most events one group-commit transaction takes (the buses' prefetch bounds it too)
DEFAULT_MAX_BATCH = 200

#: the inbox INSERT per dialect, built once; the values go as parameters
_MARK_PROCESSED = {
    "postgresql": postgresql.insert(processed_events).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(processed_events).on_conflict_do_nothing(),
}
#: the same for a batch: one multi-row INSERT that returns the ids it inserted
_MARK_MANY = {
    name: stmt.returning(processed_events.c.event_id) for name, stmt in _MARK_PROCESSED.items()
}


def _dialect(session: DbSession) -> str:
    dialect = session.get_bind().dialect.name
    if dialect not in _MARK_PROCESSED:  # pragma: no cover - Database only builds these two
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    return dialect


async def mark_processed(session: DbSession, consumer: str, event_id: str) -> bool:
    """Insert the inbox row; False when this consumer has already processed the event."""
    result = await session.execute(
        _MARK_PROCESSED[_dialect(session)],
        {"consumer": consumer, "event_id": event_id, "processed_at": datetime.now(UTC)},
    )
    return bool(result.rowcount)


async def mark_many_processed(
    session: DbSession, consumer: str, event_ids: Sequence[str]
) -> set[str]:
    """Insert the inbox rows of ``event_ids`` in one statement; returns the new ones.

    The ids are deduplicated and sorted, so two processes marking overlapping batches
    on PostgreSQL lock the keys in the same order (no deadlock between them).
    """
    unique = sorted(set(event_ids))
    if not unique:
        return set()
    now = datetime.now(UTC)
    result = await session.execute(
        _MARK_MANY[_dialect(session)],
        [{"consumer": consumer, "event_id": i, "processed_at": now} for i in unique],
    )
    return set(result.scalars().all())


async def run_handler(db: Database, consumer: str, event: Event, handler: SessionHandler) -> bool:
    """Run ``handler`` once per (consumer, event id); True if it ran, False for a duplicate."""
    async with db.transaction() as session:
        if not await mark_processed(session, consumer, event.id):
            DUPLICATES.labels(consumer=consumer).inc()
            return False
        await handler(event, session)
    return True


class ConsumerClosed(RuntimeError):
    """The consumer stopped before this delivery committed: it is not acked, it is retried."""


_Pending = tuple[Event, asyncio.Future[bool]]


class Consumer:
    """A bus handler that runs ``handler(event, session)`` idempotently in ``db``.

    ``name`` identifies the consumer in ``processed_events``: keep it stable (the
    queue name is a good choice); two consumers of one event need different names.
    Concurrent calls are group-committed, up to ``max_batch`` per transaction (see the
    module doc); :meth:`close` stops the worker.
    """

    def __init__(
        self,
        db: Database,
        name: str,
        handler: SessionHandler,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.db = db
        self.name = name
        self.handler = handler
        self.max_batch = max_batch
        self._queue: deque[_Pending] = deque()
        self._running: list[_Pending] = []  # the batch the worker is on
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    async def __call__(self, event: Event) -> None:
        """Queue the event for the worker; return once its transaction has committed."""
        if self._closed:
            raise ConsumerClosed(f"consumer {self.name!r} is closed")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        if self._worker is None:
            self._start_worker()
        self._wakeup.set()
        # a cancelled delivery (bus shutdown) cancels the future: the worker skips it,
        # or, if its batch already runs, commits it unacked (the redelivery is a duplicate)
        await future

    async def close(self) -> None:
        """Stop the worker; deliveries not yet committed fail with :class:`ConsumerClosed`."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.wait([worker])  # never raises what the worker raised
        self._fail(self._running)
        self._fail(self._queue)
        self._running = []
        self._queue.clear()

    def _start_worker(self) -> None:
        worker = asyncio.create_task(self._work(), name=f"consumer:{self.name}")
        worker.add_done_callback(self._worker_done)
        self._worker = worker

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        """Fail what the dead worker held. After a crash (not a cancellation: close or
        loop shutdown) a new worker takes the calls still queued."""
        if self._worker is worker:
            self._worker = None
        crashed = not worker.cancelled() and worker.exception() is not None
        if crashed:
            log.error("consumer %s: worker crashed", self.name, exc_info=worker.exception())
        self._fail(self._running)
        self._running = []
        if not crashed or self._closed:
            self._fail(self._queue)
            self._queue.clear()
        elif self._queue and self._worker is None:
            self._start_worker()

    def _fail(self, pending: Sequence[_Pending] | deque[_Pending]) -> None:
        for _event, future in pending:
            if not future.done():
                future.set_exception(
                    ConsumerClosed(
                        f"consumer {self.name!r} stopped before the event committed; "
                        "the delivery is not acknowledged"
                    )
                )

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch: list[_Pending] = []
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if not item[1].done():  # skip deliveries cancelled while queued
                    batch.append(item)
            if not batch:
                continue
            self._running = batch  # kept if this raises: _worker_done fails them
            await self._run_batch(batch)
            self._running = []

    async def _run_batch(self, batch: list[_Pending]) -> None:
        """One transaction for the batch; on any failure, each event alone."""
        if len(batch) > 1:
            try:
                ran = await self._commit_batch([event for event, _future in batch])
            except Exception as exc:
                log.info(
                    "consumer %s: batch of %d failed (%s); running its events one by one",
                    self.name,
                    len(batch),
                    error_text(exc),
                )
            else:
                for (_event, future), result in zip(batch, ran, strict=True):
                    if not future.done():
                        future.set_result(result)
                return
        for event, future in batch:
            if future.done():
                continue
            try:
                result = await run_handler(self.db, self.name, event, self.handler)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)

    async def _commit_batch(self, events: list[Event]) -> list[bool]:
        """Mark and handle ``events`` in one transaction; per event, whether it ran."""
        ran: list[bool] = []
        async with self.db.transaction() as session:
            new = await mark_many_processed(session, self.name, [e.id for e in events])
            for event in events:
                if event.id in new:
                    new.discard(event.id)  # a second copy in this batch is a duplicate
                    await self.handler(event, session)
                    ran.append(True)
                else:
                    ran.append(False)
        duplicates = ran.count(False)
        if duplicates:  # counted after the commit: a rolled-back batch is re-run alone
            DUPLICATES.labels(consumer=self.name).inc(duplicates)
        return ran


async def subscribe(
    bus: EventBus,
    db: Database,
    queue: str,
    bindings: Sequence[str],
    handler: SessionHandler,
    *,
    consumer: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Consumer:
    """Consume ``queue`` with an idempotent ``handler(event, session)``; returns the Consumer.

    Call ``await consumer.close()`` at shutdown, after the bus stopped delivering.
    """
    wrapped = Consumer(db, consumer or queue, handler, max_batch=max_batch)
    await bus.subscribe(queue, bindings, wrapped)
    return wrapped


__all__ = [
    "DEFAULT_MAX_BATCH",
    "Consumer",
    "ConsumerClosed",
    "SessionHandler",
    "mark_many_processed",
    "mark_processed",
    "run_handler",
    "subscribe",
]

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
delivery: each call queues the event and waits; one worker per consumer (the shared
:class:`~services.common.groupcommit.Batcher`) takes everything queued (at most
``max_batch``, by default the prefetch) and runs it in *one* transaction: one
multi-row inbox INSERT (``ON CONFLICT DO NOTHING RETURNING event_id``) says which
events are new, then each new event's handler runs on the shared session (or the
batch handler once, for all of them). Only after the commit are the waiting calls
answered, so every delivery is still acked after its effect is durable. Before a batch
the worker lingers ``EVENTS_CONSUMER_LINGER`` (10 ms) for more deliveries, unless a
full batch is already queued.

If anything in a batch fails (a handler, the database, the commit), the whole batch
rolled back and each of its events runs again alone through ``run_handler``, so one
bad event fails only its own delivery (retry, then DLQ) and the others commit. Handlers
therefore may run more than once per delivery; like retries, that is harmless as long
as their effects go through ``session`` only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from ..db import Database, DbSession, InsertIgnore
from ..groupcommit import Batcher, ItemFailed
from .bus import EventBus
from .envelope import Event
from .metrics import DUPLICATES
from .outbox import processed_events

SessionHandler = Callable[[Event, DbSession], Awaitable[None]]
BatchHandler = Callable[[list[Event], DbSession], Awaitable[None]]

#: most events one group-commit transaction takes (the buses' prefetch bounds it too)
DEFAULT_MAX_BATCH = 200

#: the inbox INSERT (ON CONFLICT DO NOTHING), built once; the values go as parameters
_MARK = InsertIgnore(processed_events)


async def mark_processed(session: DbSession, consumer: str, event_id: str) -> bool:
    """Insert the inbox row; False when this consumer has already processed the event."""
    return await _MARK.run(
        session, {"consumer": consumer, "event_id": event_id, "processed_at": datetime.now(UTC)}
    )


async def mark_many_processed(
    session: DbSession, consumer: str, event_ids: Sequence[str]
) -> set[str]:
    """Insert the inbox rows of ``event_ids`` in one statement; returns the new ones.

    The ids are deduplicated and sorted, so two processes marking overlapping batches
    on PostgreSQL lock the keys in the same order (no deadlock between them).
    """
    now = datetime.now(UTC)
    rows = [
        {"consumer": consumer, "event_id": i, "processed_at": now} for i in sorted(set(event_ids))
    ]
    return await _MARK.run_returning(session, "event_id", rows)


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


class Consumer:
    """A bus handler that runs ``handler(event, session)`` idempotently in ``db``.

    ``name`` identifies the consumer in ``processed_events``: keep it stable (the
    queue name is a good choice); two consumers of one event need different names.
    Concurrent calls are group-committed, up to ``max_batch`` per transaction (see the
    module doc); :meth:`close` stops the worker. ``batch_handler(events, session)``,
    when given, handles the new events of a batch at once (say, with one multi-row
    INSERT); ``handler`` still handles an event that runs alone.
    """

    def __init__(
        self,
        db: Database,
        name: str,
        handler: SessionHandler,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_handler: BatchHandler | None = None,
        linger: float = 0.0,
    ) -> None:
        self.db = db
        self.name = name
        self.handler = handler
        self.batch_handler = batch_handler
        self._batcher: Batcher[Event, bool] = Batcher(
            f"consumer {name!r}",
            self._commit_batch,
            self._run_alone,
            max_batch=max_batch,
            linger=linger,
            reopen=False,
            closed_error=ConsumerClosed,
        )

    @property
    def max_batch(self) -> int:
        return self._batcher.max_batch

    async def __call__(self, event: Event) -> None:
        """Queue the event for the worker; return once its transaction has committed."""
        await self._batcher.submit(event)

    async def close(self) -> None:
        """Stop the worker; deliveries not yet committed fail with :class:`ConsumerClosed`."""
        await self._batcher.close()

    async def _run_alone(self, event: Event) -> bool:
        return await run_handler(self.db, self.name, event, self.handler)

    async def _commit_batch(self, events: list[Event]) -> list[bool]:
        """Mark and handle ``events`` in one transaction; per event, whether it ran.

        The transaction is the database's group commit (``db.writes``), shared with the
        request path's writes of the moment: one writer per process, so a batch of
        charges and a batch of reservations never lock the same rows in opposite orders
        (a deadlock on PostgreSQL), and on SQLite they share a commit.
        """

        async def unit(session: DbSession) -> list[bool]:
            ran: list[bool] = []
            new = await mark_many_processed(session, self.name, [e.id for e in events])
            for event in events:
                ran.append(event.id in new)
                new.discard(event.id)  # a second copy in this batch is a duplicate
            if self.batch_handler is not None:
                fresh = [event for event, is_new in zip(events, ran, strict=True) if is_new]
                if fresh:
                    await self.batch_handler(fresh, session)
                return ran
            for index, (event, is_new) in enumerate(zip(events, ran, strict=True)):
                if is_new:
                    try:
                        await self.handler(event, session)
                    except Exception as exc:
                        # the batcher commits the others without it, and runs it alone
                        raise ItemFailed(index, exc) from exc
            return ran

        ran = await self.db.writes.run(unit)
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
    max_batch: int | None = None,
    batch_handler: BatchHandler | None = None,
) -> Consumer:
    """Consume ``queue`` with an idempotent ``handler(event, session)``; returns the Consumer.

    Call ``await consumer.close()`` at shutdown, after the bus stopped delivering.
    """
    if max_batch is None:  # the broker never has more than prefetch out: a full batch
        max_batch = min(DEFAULT_MAX_BATCH, bus.settings.amqp_prefetch)
    wrapped = Consumer(
        db,
        consumer or queue,
        handler,
        max_batch=max_batch,
        batch_handler=batch_handler,
        linger=bus.settings.events_consumer_linger,
    )
    await bus.subscribe(queue, bindings, wrapped)
    return wrapped


__all__ = [
    "DEFAULT_MAX_BATCH",
    "BatchHandler",
    "Consumer",
    "ConsumerClosed",
    "SessionHandler",
    "mark_many_processed",
    "mark_processed",
    "run_handler",
    "subscribe",
]

"""Idempotent consumers: the effect of an event happens once, however often it arrives.

``run_handler`` opens ``db.transaction()``, inserts ``(consumer, event.id)`` into
``processed_events`` and, only if that row is new, runs ``handler(event, session)`` in
the same transaction. The commit makes the effect and the "seen" mark durable together;
the bus acknowledges the delivery only after that. A handler error rolls both back, so
the retry runs the handler again. On PostgreSQL a concurrent duplicate waits on the
primary key and then sees the row; on SQLite the write transaction is exclusive.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from ..db import Database
from .bus import EventBus
from .envelope import Event
from .metrics import DUPLICATES
from .outbox import processed_events

SessionHandler = Callable[[Event, AsyncSession], Awaitable[None]]


#: the inbox INSERT per dialect, built once; the values go as parameters
_MARK_PROCESSED = {
    "postgresql": postgresql.insert(processed_events).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(processed_events).on_conflict_do_nothing(),
}


async def mark_processed(session: AsyncSession, consumer: str, event_id: str) -> bool:
    """Insert the inbox row; False when this consumer has already processed the event."""
    dialect = session.get_bind().dialect.name
    stmt = _MARK_PROCESSED.get(dialect)
    if stmt is None:  # pragma: no cover - Database only builds these two
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    result = await session.execute(
        stmt, {"consumer": consumer, "event_id": event_id, "processed_at": datetime.now(UTC)}
    )
    return bool(result.rowcount)


async def run_handler(db: Database, consumer: str, event: Event, handler: SessionHandler) -> bool:
    """Run ``handler`` once per (consumer, event id); True if it ran, False for a duplicate."""
    async with db.transaction() as session:
        if not await mark_processed(session, consumer, event.id):
            DUPLICATES.labels(consumer=consumer).inc()
            return False
        await handler(event, session)
    return True


class Consumer:
    """A bus handler that runs ``handler(event, session)`` idempotently in ``db``.

    ``name`` identifies the consumer in ``processed_events``: keep it stable (the
    queue name is a good choice); two consumers of one event need different names.
    """

    def __init__(self, db: Database, name: str, handler: SessionHandler) -> None:
        self.db = db
        self.name = name
        self.handler = handler

    async def __call__(self, event: Event) -> None:
        await run_handler(self.db, self.name, event, self.handler)


async def subscribe(
    bus: EventBus,
    db: Database,
    queue: str,
    bindings: Sequence[str],
    handler: SessionHandler,
    *,
    consumer: str | None = None,
) -> Consumer:
    """Consume ``queue`` with an idempotent ``handler(event, session)``; returns the Consumer."""
    wrapped = Consumer(db, consumer or queue, handler)
    await bus.subscribe(queue, bindings, wrapped)
    return wrapped


__all__ = ["Consumer", "SessionHandler", "mark_processed", "run_handler", "subscribe"]

"""Analytics consumes every event (queue ``analytics.events`` bound to ``#``) and
publishes none. Each event is stored once: the consumer's inbox dedupes by event id,
and the events table's unique id makes a second insert a no-op anyway."""

from __future__ import annotations

from services.common import events
from services.common.db import DbSession

from . import store

EVENTS_QUEUE = events.ANALYTICS_EVENTS
EVENTS_BINDINGS = ("#",)


async def on_event(event: events.Event, session: DbSession) -> None:
    await store.store_event(session, event)


async def on_events(batch: list[events.Event], session: DbSession) -> None:
    """A group-committed batch of new events: one INSERT per table."""
    await store.store_events(session, batch)

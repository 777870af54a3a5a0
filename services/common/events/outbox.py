"""Transactional outbox: events are written with the change they describe, then relayed.

A service never publishes from its request path. It calls :func:`record` inside the
database transaction that makes the change; the row commits (or rolls back) with it.
The :class:`OutboxRelay` background task publishes pending rows in id order with
publisher confirms and marks them sent. When the broker is down the rows wait; the
relay backs off (jittered, capped) and keeps retrying; a restarted process just reads
them again. A crash between publish and "mark sent" publishes an event twice, which
consumers absorb (they dedupe by event id, see :mod:`.consumer`).

Pipelining: the relay does not wait for each confirm before the next publish. It
hands a batch to the bus, which sends it in id order with up to
:data:`~.bus.MAX_IN_FLIGHT` confirms awaited at once (RabbitMQ: written in one go), then
marks every confirmed row sent in one transaction. If some fail, the
confirmed ones are still marked sent, the first failed row gets ``attempts`` and
``last_error``, and the error is raised (the relay backs off). So after a failure a
later event of the same batch may already be out while the failed one waits for the
next attempt: id order holds while the broker takes everything (at-least-once delivery,
retries and redeliveries never promised consumers more).

Rows go out as stored (:class:`StoredEvent`): :func:`record` wrote the body with
``Event.to_json``, so the relay does not parse it again. A row altered by hand into
something that is not an envelope is therefore published, and its consumers send it to
their DLQ as poison, instead of holding up the outbox behind it.

Include :data:`outbox_metadata` in the service's ``create_all``: it holds
``event_outbox`` and ``processed_events`` (the consumers' inbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)

from ..db import Database, DbSession
from .bus import BatchResult, EventBus, PublishError, error_text
from .envelope import Event, StoredEvent
from .metrics import OUTBOX_BACKLOG, OUTBOX_RELAYED
from .settings import EventSettings

log = logging.getLogger("aiagg.events.outbox")

#: set in ``session.info`` by :func:`record`; the relay wakes after such a commit
OUTBOX_PENDING = "aiagg_outbox_pending"

#: seconds between two ``COUNT(*)`` of the pending rows for the backlog gauge
_BACKLOG_REFRESH = 1.0

outbox_metadata = MetaData()

_Id = BigInteger().with_variant(Integer(), "sqlite")  # INTEGER PRIMARY KEY autoincrements

event_outbox = Table(
    "event_outbox",
    outbox_metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("type", String(200), nullable=False),
    Column("source", String(100), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Index("ix_event_outbox_pending", "sent_at", "id"),
)

processed_events = Table(
    "processed_events",
    outbox_metadata,
    Column("consumer", String(200), primary_key=True),
    Column("event_id", String(36), primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False),
)


async def record(session: DbSession, type: str, data: dict[str, Any], source: str) -> Event:
    """Add a new event to the outbox in the caller's open transaction (no commit here)."""
    return await record_event(session, Event.new(type, source, data))


#: built once; the values go as parameters
_INSERT_OUTBOX = insert(event_outbox)


async def record_event(session: DbSession, event: Event) -> Event:
    """Like :func:`record`, for an event built by the caller."""
    await session.execute(
        _INSERT_OUTBOX,
        {
            "event_id": event.id,
            "type": event.type,
            "source": event.source,
            "payload": event.to_json().decode("utf-8"),
            "created_at": event.occurred_at,
            "attempts": 0,
        },
    )
    session.info[OUTBOX_PENDING] = True
    return event


#: one row marked sent; run for many rows at once (executemany), built once
_MARK_SENT = (
    update(event_outbox)
    .where(event_outbox.c.id == bindparam("p_id"))
    .values(sent_at=bindparam("p_now"))
)


async def pending_count(db: Database) -> int:
    async with db.session() as session:
        result = await session.execute(
            select(func.count()).select_from(event_outbox).where(event_outbox.c.sent_at.is_(None))
        )
        return int(result.scalar_one())


class OutboxRelay:
    """Publishes the outbox of ``db`` through ``bus``; one per service process.

    ``start()`` runs it in the background; ``notify()`` wakes it (called for you after
    every commit of a ``db`` session that recorded events), and it reads the outbox
    ``EVENTS_OUTBOX_LINGER`` later, so a burst of commits costs one drain; otherwise it
    polls every ``EVENTS_OUTBOX_POLL_INTERVAL``. Two relays on one database stay correct
    (consumers dedupe) but may publish some events twice.
    """

    def __init__(
        self,
        db: Database,
        bus: EventBus,
        settings: EventSettings | None = None,
        *,
        name: str = "outbox",
    ) -> None:
        self.db = db
        self.bus = bus
        self.settings = settings or bus.settings
        self.name = name
        self._wake = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_purge = 0.0
        self._backlog_counted_at = float("-inf")
        self._pending_select: tuple[int, Any] | None = None
        #: failures in a row of the latest drains; 0 when the last one went through
        self.consecutive_failures = 0
        self.last_error: str | None = None
        db.add_commit_listener(self._on_commit)

    def _on_commit(self, session: DbSession) -> None:
        if session.info.pop(OUTBOX_PENDING, False):
            self.notify()

    def notify(self) -> None:
        """Wake the relay now (cheap; safe to call from anywhere in the event loop)."""
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if not self.running:
            self._task = asyncio.create_task(self._run(), name=f"outbox-relay:{self.name}")

    async def stop(self) -> None:
        """Stop the background task; pending rows stay pending for the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        await self.stop()
        self.db.remove_commit_listener(self._on_commit)

    async def pending_count(self) -> int:
        return await pending_count(self.db)

    async def run_once(self) -> int:
        """Publish every pending row, in order; returns how many were sent.

        Stops at the first failed batch: the first failed row gets the error, which is
        raised (PublishError for broker trouble); rows of that batch confirmed meanwhile
        are marked sent, the others stay pending.
        """
        async with self._drain_lock:
            total = 0
            drained = False
            try:
                while True:
                    sent, full = await self._drain_batch()
                    total += sent
                    if not full:
                        break
                drained = True
            finally:
                await self._update_backlog(drained)
            return total

    async def _update_backlog(self, drained: bool) -> None:
        """Set the backlog gauge without a ``COUNT(*)`` on every drain.

        A drain that read a short batch and published all of it left nothing pending
        as of its last read, so the gauge is 0 (rows committed since wake the relay
        again). Otherwise (a failure), or at least every ``_BACKLOG_REFRESH`` seconds,
        the pending rows are counted.
        """
        now = asyncio.get_running_loop().time()
        gauge = OUTBOX_BACKLOG.labels(outbox=self.name)
        if drained and now - self._backlog_counted_at < _BACKLOG_REFRESH:
            gauge.set(0)
            return
        with contextlib.suppress(Exception):
            gauge.set(await self.pending_count())
            self._backlog_counted_at = now

    def _pending_query(self, batch: int) -> Any:
        """The pending rows' SELECT, built once per batch size (the SQLite fast path
        then runs it without SQLAlchemy's per-execution work)."""
        if self._pending_select is None or self._pending_select[0] != batch:
            query = (
                select(
                    event_outbox.c.id,
                    event_outbox.c.event_id,
                    event_outbox.c.type,
                    event_outbox.c.source,
                    event_outbox.c.created_at,
                    event_outbox.c.payload,
                )
                .where(event_outbox.c.sent_at.is_(None))
                .order_by(event_outbox.c.id)
                .limit(batch)
            )
            self._pending_select = (batch, query)
        return self._pending_select[1]

    async def _drain_batch(self) -> tuple[int, bool]:
        batch = self.settings.events_outbox_batch_size
        async with self.db.session() as session:
            rows = (await session.execute(self._pending_query(batch))).all()
        stored = [
            (
                row.id,
                StoredEvent(
                    id=row.event_id,
                    type=row.type,
                    source=row.source,
                    occurred_at=row.created_at,
                    body=row.payload.encode("utf-8"),
                ),
            )
            for row in rows
        ]
        sent, failed, error = await self._publish_rows(stored)
        await self._mark(sent, failed)
        if error is not None:
            raise error
        return len(sent), len(rows) == batch

    async def _publish_rows(
        self, rows: Sequence[tuple[int, StoredEvent]]
    ) -> tuple[list[int], tuple[int, str] | None, Exception | None]:
        """Publish ``rows`` as one batch (:meth:`EventBus.publish_stored_batch`).

        Awaiting each confirm before the next publish made every event cost a broker
        round trip of idle time plus a wake-up; batched, one round trip covers many.
        Publishes go out in id order, which one channel keeps on the broker; after a
        failure no further publish starts. Returns the confirmed ids, the first failed
        row (lowest id) with its error text, and that error. If this is cancelled (relay
        stopped) it marks what was confirmed, and re-raises.
        """
        result = BatchResult()
        try:
            await self.bus.publish_stored_batch([stored for _id, stored in rows], result)
        except BaseException:
            await self._mark([rows[i][0] for i in sorted(result.confirmed)], None)
            raise
        sent = [rows[i][0] for i in sorted(result.confirmed)]
        if not result.failed:
            return sent, None, None
        first = min(result.failed)
        error = result.failed[first]
        return sent, (rows[first][0], error_text(error)), error

    async def _mark(self, sent: list[int], failed: tuple[int, str] | None) -> None:
        if not sent and failed is None:
            return
        now = datetime.now(UTC)

        async def mark(session: DbSession) -> None:
            if sent:
                await session.execute(_MARK_SENT, [{"p_id": i, "p_now": now} for i in sent])
            if failed is not None:
                await session.execute(
                    update(event_outbox)
                    .where(event_outbox.c.id == failed[0])
                    .values(attempts=event_outbox.c.attempts + 1, last_error=failed[1])
                )

        # shares a transaction with the request path's writes (group commit)
        await self.db.writes.run(mark)
        if sent:
            OUTBOX_RELAYED.labels(outbox=self.name).inc(len(sent))

    async def purge_sent(self, older_than: float) -> int:
        """Delete rows sent more than ``older_than`` seconds ago; returns how many."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        async with self.db.transaction() as session:
            result = await session.execute(
                delete(event_outbox).where(
                    event_outbox.c.sent_at.is_not(None), event_outbox.c.sent_at < cutoff
                )
            )
            return int(result.rowcount or 0)

    async def purge_processed(self, older_than: float) -> int:
        """Delete consumers' inbox marks older than ``older_than`` seconds; how many.

        The inbox dedupes redeliveries, which come within seconds or minutes; a mark
        kept for the retention (7 days by default) covers them, and the table stops
        growing with every event ever consumed. The services' effects also carry their
        own unique keys (billing: one charge per request id; analytics: one row per
        event id), so even a redelivery after the retention changes nothing.
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        async with self.db.transaction() as session:
            result = await session.execute(
                delete(processed_events).where(processed_events.c.processed_at < cutoff)
            )
            return int(result.rowcount or 0)

    def _backoff(self) -> float:
        s = self.settings
        ceiling = min(
            s.events_outbox_backoff_max,
            s.events_outbox_backoff_initial * 2 ** min(self.consecutive_failures - 1, 30),
        )
        return ceiling * random.uniform(0.5, 1.0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.consecutive_failures += 1
                self.last_error = error_text(exc)
                pause = self._backoff()
                if self.consecutive_failures == 1:
                    log.warning(
                        "outbox %s: cannot publish (%s); events stay pending, retrying in %.2fs",
                        self.name,
                        self.last_error,
                        pause,
                        exc_info=not isinstance(exc, PublishError),
                    )
                else:
                    log.info(
                        "outbox %s: still failing (%d in a row: %s); next try in %.2fs",
                        self.name,
                        self.consecutive_failures,
                        self.last_error,
                        pause,
                    )
                await asyncio.sleep(pause)
                continue
            if self.consecutive_failures:
                log.info(
                    "outbox %s: publishing again after %d failure(s)",
                    self.name,
                    self.consecutive_failures,
                )
            self.consecutive_failures = 0
            self.last_error = None
            retention = self.settings.events_outbox_retention
            if retention and loop.time() - self._last_purge > 3600:
                self._last_purge = loop.time()
                try:
                    await self.purge_sent(retention)
                    await self.purge_processed(retention)
                except Exception:
                    log.exception("outbox %s: purge of old rows failed", self.name)
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.events_outbox_poll_interval):
                    await self._wake.wait()
                    woken = True
            if woken and self.settings.events_outbox_linger:
                await asyncio.sleep(self.settings.events_outbox_linger)


__all__ = [
    "OUTBOX_PENDING",
    "OutboxRelay",
    "event_outbox",
    "outbox_metadata",
    "pending_count",
    "processed_events",
    "record",
    "record_event",
]

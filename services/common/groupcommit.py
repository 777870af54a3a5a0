"""Group commit: many small write units share one database transaction.

A transaction costs more CPU than the few statements of a typical request (BEGIN,
COMMIT, a pool checkout, the WAL write), and a busy service has many requests
writing at once. ``await db.writes.run(unit)`` queues ``unit(session)``; one worker
task per database takes everything queued (at most ``max_batch``) and runs the units
one after another on *one* session, then commits once. Each caller gets its own
unit's result (or exception) only after that commit, so "answered" still means
"durable". Batching is natural, without a timer: an idle worker runs a lone unit at
once, and what arrives while a batch runs forms the next batch.

If anything in a batch fails (a unit raising, a constraint, the commit), the batch is
rolled back and each of its units runs again alone in its own transaction, so one
failing unit fails only its own caller. A unit may therefore run more than once
before it commits: it must act only through ``session`` (no network calls, no
publishing; record events with the outbox) and build its results from what it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from .db import Database, DbSession

log = logging.getLogger("aiagg.db")

T = TypeVar("T")
Unit = Callable[["DbSession"], Awaitable[T]]

#: most units one transaction takes; bounds the time one batch holds the write lock
DEFAULT_MAX_BATCH = 64


class GroupCommitClosed(RuntimeError):
    """The database is closing: the unit was not run."""


class GroupCommit:
    """The group-commit writer of one :class:`~services.common.db.Database`."""

    def __init__(self, db: Database, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: deque[tuple[Unit[Any], asyncio.Future[Any]]] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        #: transactions committed and units run, for tests and metrics
        self.batches = 0
        self.units = 0

    async def run(self, unit: Unit[T]) -> T:
        """Run ``unit(session)`` in a shared write transaction; its result after commit."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._work(), name=f"group-commit:{self.db!r}")
        assert self._wake is not None
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((unit, future))
        self._wake.set()
        return await future

    async def close(self) -> None:
        """Stop the worker; queued units fail with :class:`GroupCommitClosed`."""
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await worker
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(GroupCommitClosed("the database is closing; not run"))

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [
                    self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))
                ]
                batch = [(unit, fut) for unit, fut in batch if not fut.done()]
                if batch:
                    await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[Unit[Any], asyncio.Future[Any]]]) -> None:
        if len(batch) > 1:
            try:
                results = []
                async with self.db.transaction() as session:
                    for unit, _ in batch:
                        results.append(await unit(session))
            except asyncio.CancelledError:
                self._fail(batch, GroupCommitClosed("the database is closing; rolled back"))
                raise
            except Exception:
                pass  # one of them failed: find out which, each alone
            else:
                self._count(len(batch))
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                return
        for unit, future in batch:
            try:
                async with self.db.transaction() as session:
                    result = await unit(session)
            except asyncio.CancelledError:
                self._fail(batch, GroupCommitClosed("the database is closing; rolled back"))
                raise
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                self._count(1)
                if not future.done():
                    future.set_result(result)

    def _count(self, units: int) -> None:
        self.batches += 1
        self.units += units

    @staticmethod
    def _fail(batch: list[tuple[Unit[Any], asyncio.Future[Any]]], exc: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)


__all__ = ["DEFAULT_MAX_BATCH", "GroupCommit", "GroupCommitClosed", "Unit"]

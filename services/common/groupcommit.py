"""Group commit: many callers' small pieces of work share one database transaction.

A transaction costs more CPU than the few statements of a typical request or event
(BEGIN, COMMIT, a pool checkout, the WAL write), and a busy service has many of them
at once. :class:`Batcher` is the shared machinery: callers ``await submit(item)``;
one worker task takes everything queued (at most ``max_batch``) and hands it to
``run_batch`` (one transaction), then gives each caller its own result, only after
that commit, so "answered" still means "durable". Batching is natural, without a
timer: an idle worker runs a lone item at once, and what arrives while a batch runs
forms the next batch.

If a batch fails it was rolled back as a whole. When ``run_batch`` says which item
failed (it raises :class:`ItemFailed`), the items before it commit again as one batch,
the failing item runs alone through ``run_one`` (its caller gets its own answer, a 402
say), and the items after it form a batch of their own: three transactions, not one
per item, so a stream of refused requests does not turn group commit off. Any other
failure (the commit itself, say) runs each item again alone. Either way one failing
item fails only its own caller. Work may therefore run more than once before it
commits: it must act only through the database session (no network calls, no
publishing; events go through the outbox) and build its result from what it did.

Two users: :class:`GroupCommit` (``db.writes``: request-path writes) and the event
consumers (:class:`services.common.events.consumer.Consumer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

log = logging.getLogger("aiagg.db")

I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")
T = TypeVar("T")
#: a piece of work on an open transaction's session (a ``DbSession`` in the services)
Unit = Callable[[Any], Awaitable[T]]

#: most units one transaction takes; bounds the time one batch holds the write lock
DEFAULT_MAX_BATCH = 64


class GroupCommitClosed(RuntimeError):
    """The batcher stopped before this item committed: it was not (durably) done."""


class ItemFailed(Exception):
    """Raised by a ``run_batch``: item ``index`` raised ``error``; the ones before ran."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"item {index} failed: {type(error).__name__}: {error}")
        self.index = index
        self.error = error


class Batcher(Generic[I, R]):
    """Queue of items, one worker, batches with a one-by-one fallback (module doc).

    ``linger``: seconds the worker waits, once work is there, for more to arrive, or
    until ``max_batch`` items are queued (0: none; for work nobody waits on
    interactively, such as event consumption).
    ``reopen``: whether :meth:`submit` after :meth:`close` starts a new worker (True)
    or raises ``closed_error`` (False).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[I]], Awaitable[list[R]]],
        run_one: Callable[[I], Awaitable[R]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        linger: float = 0.0,
        reopen: bool = True,
        closed_error: type[Exception] = GroupCommitClosed,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.name = name
        self.max_batch = max_batch
        self.linger = linger
        self._run_batch_fn = run_batch
        self._run_one = run_one
        self._reopen = reopen
        self._closed_error = closed_error
        self._queue: deque[tuple[I, asyncio.Future[R]]] = deque()
        self._running: list[tuple[I, asyncio.Future[R]]] = []
        self._wake: asyncio.Event | None = None
        self._full: asyncio.Event | None = None  # a full batch is waiting: stop lingering
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        #: committed batches and items, for tests and metrics
        self.batches = 0
        self.items = 0

    async def submit(self, item: I) -> R:
        """Queue ``item``; its result once its transaction has committed."""
        if self._closed and not self._reopen:
            raise self._closed_error(f"{self.name} is closed")
        self._closed = False
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._start_worker(loop)
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        assert self._wake is not None and self._full is not None
        self._wake.set()
        if len(self._queue) >= self.max_batch:
            self._full.set()
        # a cancelled caller cancels the future: the worker skips the item, or, if its
        # batch already runs, commits it without anybody waiting for the answer
        return await future

    async def close(self) -> None:
        """Stop the worker; what is queued or running fails with ``closed_error``."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            await asyncio.wait([worker])  # never raises what the worker raised
        self._fail(self._running)
        self._fail(self._queue)
        self._running = []
        self._queue.clear()

    def _start_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        worker = loop.create_task(self._work(), name=f"batcher:{self.name}")
        worker.add_done_callback(self._worker_done)
        self._worker = worker

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        """Fail what a dead worker held; after a crash, a new worker takes the queue."""
        if self._worker is worker:
            self._worker = None
        crashed = not worker.cancelled() and worker.exception() is not None
        if crashed:
            log.error("%s: worker crashed", self.name, exc_info=worker.exception())
        self._fail(self._running)
        self._running = []
        if crashed and not self._closed and self._queue:
            self._start_worker(worker.get_loop())
        elif not crashed:
            self._fail(self._queue)
            self._queue.clear()

    def _fail(self, pending: Sequence[tuple[I, asyncio.Future[R]]] | deque[Any]) -> None:
        for _item, future in pending:
            if not future.done():
                future.set_exception(
                    self._closed_error(f"{self.name} stopped before this committed")
                )

    async def _work(self) -> None:
        assert self._wake is not None and self._full is not None
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.linger and len(self._queue) < self.max_batch:
                # let more arrive (a larger batch), but no longer than a full batch takes
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger):
                        await self._full.wait()
            batch: list[tuple[I, asyncio.Future[R]]] = []
            while self._queue and len(batch) < self.max_batch:
                entry = self._queue.popleft()
                if not entry[1].done():  # skip callers cancelled while queued
                    batch.append(entry)
            if batch:
                self._running = batch  # kept if this raises: _worker_done fails them
                await self._run(batch)
                self._running = []

    async def _run(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        pending = [entry for entry in batch if not entry[1].done()]
        while len(pending) > 1:
            try:
                results = await self._run_batch_fn([item for item, _ in pending])
            except ItemFailed as failed:
                index = failed.index
                if not 0 <= index < len(pending):
                    log.error("%s: %s is outside the batch of %d", self.name, failed, len(pending))
                    break
                log.info(
                    "%s: item %d of a batch of %d failed (%s: %s); the others commit without it",
                    self.name, index, len(pending), type(failed.error).__name__, failed.error,
                )
                await self._run(pending[:index])  # they ran before: normally one commit
                await self._run_each(pending[index : index + 1])
                pending = [entry for entry in pending[index + 1 :] if not entry[1].done()]
                continue
            except Exception as exc:
                log.info(
                    "%s: batch of %d failed (%s: %s); running its items one by one",
                    self.name, len(pending), type(exc).__name__, exc,
                )
                break
            self.batches += 1
            self.items += len(pending)
            for (_, future), result in zip(pending, results, strict=True):
                if not future.done():
                    future.set_result(result)
            return
        await self._run_each(pending)

    async def _run_each(self, entries: list[tuple[I, asyncio.Future[R]]]) -> None:
        for item, future in entries:
            if future.done():
                continue
            try:
                result = await self._run_one(item)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                self.batches += 1
                self.items += 1
                if not future.done():
                    future.set_result(result)


class GroupCommit:
    """The group-commit writer of one database: ``await db.writes.run(unit)``.

    ``transaction()`` opens one write transaction (``Database.transaction``); kept as
    a callable so this module does not depend on the database layer.
    """

    def __init__(
        self,
        transaction: Callable[[], AbstractAsyncContextManager[Any]],
        *,
        name: str = "group commit",
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._transaction = transaction
        self._batcher: Batcher[Unit[Any], Any] = Batcher(
            name, self._run_batch, self._run_one, max_batch=max_batch
        )

    @property
    def batches(self) -> int:
        return self._batcher.batches

    @property
    def units(self) -> int:
        return self._batcher.items

    async def run(self, unit: Unit[T]) -> T:
        """Run ``unit(session)`` in a shared write transaction; its result after commit."""
        return await self._batcher.submit(unit)

    async def close(self) -> None:
        await self._batcher.close()

    async def _run_batch(self, units: list[Unit[Any]]) -> list[Any]:
        async with self._transaction() as session:
            results = []
            for index, unit in enumerate(units):
                try:
                    results.append(await unit(session))
                except Exception as exc:
                    raise ItemFailed(index, exc) from exc  # leaving the block rolls back
            return results

    async def _run_one(self, unit: Unit[Any]) -> Any:
        async with self._transaction() as session:
            return await unit(session)


__all__ = [
    "DEFAULT_MAX_BATCH",
    "Batcher",
    "GroupCommit",
    "GroupCommitClosed",
    "ItemFailed",
    "Unit",
]

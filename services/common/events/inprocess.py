"""An event bus inside one process, with the delivery semantics of :class:`RabbitBus`.

For the all-in-one local launcher (``make run`` without ``AMQP_URL``) and for tests.
Same topic routing (``*``, ``#``), same mandatory publish (no bound queue → PublishError),
at-least-once delivery with ``prefetch`` handlers at a time per queue, delayed retries,
and dead letters kept in memory where :meth:`dead_letters` shows them. A delivery whose
handler fails or is cancelled (shutdown) is never dropped: it waits for its retry or goes
back to the head of its queue. Nothing survives the process, which is the one difference
from RabbitMQ; durable state belongs in the services' outboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bus import (
    DeadLetter,
    EventBus,
    Handler,
    PublishError,
    attempt_of,
    dead_letter_from,
    run_delivery,
)
from .envelope import Event, StoredEvent
from .metrics import CONFIRMED, DEAD_LETTERED, PUBLISH_FAILED, PUBLISHED, RETRIED
from .settings import EventSettings
from .topology import (
    H_ATTEMPT,
    H_DEATH_REASON,
    H_ERROR,
    H_ORIGINAL_QUEUE,
    H_REPLAYED,
    STANDARD_QUEUES,
    QueueSpec,
    check_pattern,
    topic_matches,
)

log = logging.getLogger("aiagg.events")


@dataclass
class _Message:
    body: bytes
    message_id: str | None
    headers: dict[str, Any] = field(default_factory=dict)


class _Queue:
    def __init__(self, name: str) -> None:
        self.name = name
        self.bindings: list[str] = []
        self.ready: deque[_Message] = deque()
        self.dead: deque[_Message] = deque()
        self.delayed: dict[asyncio.TimerHandle, _Message] = {}
        self.wakeup = asyncio.Event()
        self.handler: Handler | None = None
        self.consumer: asyncio.Task[None] | None = None
        self.inflight: set[asyncio.Task[None]] = set()

    def put(self, message: _Message, *, front: bool = False) -> None:
        if front:
            self.ready.appendleft(message)
        else:
            self.ready.append(message)
        self.wakeup.set()


class InProcessBus(EventBus):
    """See the module doc. ``grace`` bounds how long close() waits for running handlers."""

    def __init__(
        self,
        settings: EventSettings | None = None,
        *,
        queues: Iterable[QueueSpec] = STANDARD_QUEUES,
        grace: float = 5.0,
    ) -> None:
        super().__init__(settings, queues=queues)
        self._queues: dict[str, _Queue] = {}
        self._started = False
        self._grace = grace

    @property
    def connected(self) -> bool:
        return self._started

    def _declare(self, name: str, bindings: Iterable[str]) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name)
        for pattern in bindings:
            check_pattern(pattern)
            if pattern not in queue.bindings:
                queue.bindings.append(pattern)
        return queue

    async def start(self) -> None:
        for spec in self.queues:
            self._declare(spec.name, spec.bindings)
        self._started = True
        for queue in self._queues.values():
            self._start_consumer(queue)

    def _start_consumer(self, queue: _Queue) -> None:
        if self._started and queue.handler is not None and queue.consumer is None:
            queue.consumer = asyncio.create_task(
                self._consume(queue), name=f"inprocess-consumer:{queue.name}"
            )

    def _idle(self) -> bool:
        """No consumed queue holds ready, delayed or in-flight deliveries."""
        return all(
            not (q.ready or q.delayed or q.inflight)
            for q in self._queues.values()
            if q.handler is not None
        )

    async def drain(self, within: float, quiet: float = 0.3) -> bool:
        """Wait (at most ``within`` s) until every consumed queue is empty and has stayed
        so for ``quiet`` s, so that events handlers publish in turn get delivered too.

        Nothing held here survives the process: the local launcher drains before it
        closes the services. Returns False if deliveries were still pending.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        quiet_since: float | None = None
        while loop.time() < deadline:
            if self._idle():
                quiet_since = quiet_since if quiet_since is not None else loop.time()
                if loop.time() - quiet_since >= quiet:
                    return True
            else:
                quiet_since = None
            await asyncio.sleep(0.05)
        queues = self._queues.values()
        pending = sum(len(q.ready) + len(q.delayed) + len(q.inflight) for q in queues)
        log.warning("in-process bus: %d deliveries still pending after %.0fs", pending, within)
        return False

    async def close(self) -> None:
        self._started = False
        for queue in self._queues.values():
            if queue.consumer is not None:
                queue.consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await queue.consumer
                queue.consumer = None
        inflight = [t for q in self._queues.values() for t in q.inflight]
        if inflight:
            _done, pending = await asyncio.wait(inflight, timeout=self._grace)
            for task in pending:
                task.cancel()  # the delivery goes back to the head of its queue
            if pending:
                await asyncio.wait(pending)
        for queue in self._queues.values():
            # delayed retries are not lost: they wait in the queue for the next start
            for handle, message in list(queue.delayed.items()):
                handle.cancel()
                queue.put(message)
            queue.delayed.clear()

    async def publish(self, event: Event) -> None:
        await self._publish(event.type, event.to_json(), event.id, {})

    async def publish_stored(self, stored: StoredEvent) -> None:
        await self._publish(stored.type, stored.body, stored.id, {})

    async def publish_raw(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        await self._publish(routing_key, bytes(body), message_id, dict(headers or {}))

    async def _publish(
        self, routing_key: str, body: bytes, message_id: str | None, headers: dict[str, Any]
    ) -> None:
        PUBLISHED.labels(type=routing_key).inc()
        if not self._started:
            PUBLISH_FAILED.labels(type=routing_key, reason="connection").inc()
            raise PublishError("the in-process bus is not started")
        targets = [
            q
            for q in self._queues.values()
            if any(topic_matches(p, routing_key) for p in q.bindings)
        ]
        if not targets:
            PUBLISH_FAILED.labels(type=routing_key, reason="unroutable").inc()
            raise PublishError(f"unroutable: no queue is bound for routing key {routing_key!r}")
        for queue in targets:
            queue.put(_Message(body, message_id, dict(headers)))
        CONFIRMED.labels(type=routing_key).inc()

    async def subscribe(self, queue: str, bindings: Sequence[str], handler: Handler) -> None:
        q = self._declare(queue, bindings)
        if q.handler is not None:
            raise ValueError(f"queue {queue!r} already has a consumer in this bus")
        q.handler = handler
        self._start_consumer(q)

    async def _consume(self, queue: _Queue) -> None:
        slots = asyncio.Semaphore(self.settings.amqp_prefetch)
        while True:
            await slots.acquire()
            while not queue.ready:
                queue.wakeup.clear()
                await queue.wakeup.wait()
            message = queue.ready.popleft()
            task = asyncio.create_task(self._deliver(queue, message))
            queue.inflight.add(task)

            def _done(t: asyncio.Task[None], q: _Queue = queue) -> None:
                q.inflight.discard(t)
                slots.release()

            task.add_done_callback(_done)

    async def _deliver(self, queue: _Queue, message: _Message) -> None:
        assert queue.handler is not None
        attempt = attempt_of(message.headers)
        try:
            outcome = await run_delivery(
                self.settings, queue.name, message.body, attempt, queue.handler
            )
        except asyncio.CancelledError:
            queue.put(message, front=True)  # not acknowledged: not lost
            raise
        if outcome.action == "retry":
            retry = _Message(message.body, message.message_id, {**message.headers})
            retry.headers[H_ATTEMPT] = attempt + 1
            loop = asyncio.get_running_loop()
            handle: asyncio.TimerHandle

            def _due() -> None:
                queue.delayed.pop(handle, None)
                queue.put(retry)

            handle = loop.call_later(outcome.delay, _due)
            queue.delayed[handle] = retry
            RETRIED.labels(queue=queue.name).inc()
        elif outcome.action == "dead":
            headers = {**message.headers}
            headers.update(
                {
                    H_ATTEMPT: attempt,
                    H_DEATH_REASON: outcome.reason,
                    H_ERROR: outcome.error,
                    H_ORIGINAL_QUEUE: queue.name,
                }
            )
            queue.dead.append(_Message(message.body, message.message_id, headers))
            DEAD_LETTERED.labels(queue=queue.name, reason=outcome.reason).inc()

    async def queue_depth(self, queue: str) -> int | None:
        q = self._queues.get(queue)
        return None if q is None else len(q.ready)

    async def dlq_depth(self, queue: str) -> int | None:
        q = self._queues.get(queue)
        return None if q is None else len(q.dead)

    def retry_depth(self, queue: str) -> int:
        """Messages waiting for a delayed retry (in-process only)."""
        q = self._queues.get(queue)
        return 0 if q is None else len(q.delayed)

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        q = self._queues.get(queue)
        if q is None:
            return []
        return [
            dead_letter_from(queue, m.body, m.headers, m.message_id) for m in list(q.dead)[:limit]
        ]

    async def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        q = self._queues.get(queue)
        if q is None:
            return 0
        count = len(q.dead) if limit is None else min(limit, len(q.dead))
        for _ in range(count):
            message = q.dead.popleft()
            q.put(_Message(message.body, message.message_id, replay_headers(message.headers)))
        if count:
            log.info("replayed %d dead letter(s) into %s", count, queue)
        return count


def replay_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """A dead letter's headers for its replay: attempt 1, our death headers gone."""
    out = {
        k: v
        for k, v in (headers or {}).items()
        if k not in (H_DEATH_REASON, H_ERROR, H_ORIGINAL_QUEUE, H_ATTEMPT, "x-death")
        and not k.startswith("x-first-death")
        and not k.startswith("x-last-death")
    }
    out[H_ATTEMPT] = 1
    try:
        out[H_REPLAYED] = int((headers or {}).get(H_REPLAYED, 0)) + 1
    except (TypeError, ValueError):
        out[H_REPLAYED] = 1
    return out


__all__ = ["InProcessBus", "replay_headers"]

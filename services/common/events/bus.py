"""The event bus interface, shared by :class:`RabbitBus` and :class:`InProcessBus`.

Delivery semantics, identical on both:

* ``publish`` returns only once the broker has taken the event (confirm); it raises
  :class:`PublishError` on a nack, when no queue is bound for the event type
  (mandatory publish) and on connection trouble.
* A subscribed handler is ``async def handler(event) -> None``. Returning acknowledges
  the delivery; raising sends it to a retry queue with the next delay of
  ``EVENTS_RETRY_DELAYS``; after ``EVENTS_MAX_ATTEMPTS`` attempts it goes to
  ``<queue>.dlq`` with the reason and the error text. A body that is not an event
  envelope goes to the DLQ at once. Delivery is at least once: handlers must be
  idempotent (see :mod:`services.common.events.consumer`).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from .envelope import Event, PoisonMessage, StoredEvent
from .metrics import CONSUMED, DLQ_DEPTH, QUEUE_DEPTH
from .settings import EventSettings
from .topology import (
    H_ATTEMPT,
    H_DEATH_REASON,
    H_ERROR,
    REASON_MAX_ATTEMPTS,
    REASON_POISON,
    STANDARD_QUEUES,
    QueueSpec,
    Topology,
)

log = logging.getLogger("aiagg.events")

Handler = Callable[[Event], Awaitable[None]]

#: longest exception text kept in the x-error header
MAX_ERROR_TEXT = 2000

#: most publishes of one batch awaiting their confirm at the same time (default path)
MAX_IN_FLIGHT = 256


class PublishError(Exception):
    """The broker did not take the event: nack, unroutable, or connection trouble."""


@dataclass(frozen=True)
class DeadLetter:
    """A message sitting in ``<queue>.dlq``."""

    queue: str
    body: bytes
    reason: str
    error: str
    attempts: int
    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def event(self) -> Event | None:
        """The event, or None when the body is poison."""
        try:
            return Event.from_json(self.body)
        except PoisonMessage:
            return None


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def attempt_of(headers: dict[str, Any] | None) -> int:
    """The attempt number a delivery is for, from its ``x-attempt`` header (1 if none)."""
    try:
        return max(1, int((headers or {}).get(H_ATTEMPT, 1)))
    except (TypeError, ValueError):
        return 1


def dead_letter_from(queue: str, body: bytes, headers: dict[str, Any] | None, message_id: Any):
    headers = dict(headers or {})
    reason = headers.get(H_DEATH_REASON, "")
    error = headers.get(H_ERROR, "")
    return DeadLetter(
        queue=queue,
        body=body,
        reason=reason.decode() if isinstance(reason, bytes) else str(reason),
        error=error.decode() if isinstance(error, bytes) else str(error),
        attempts=attempt_of(headers),
        message_id=str(message_id) if message_id is not None else None,
        headers=headers,
    )


@dataclass
class BatchResult:
    """What became of the events of :meth:`EventBus.publish_stored_batch`, by index.

    Filled in as confirms arrive, so a caller cancelled midway still knows which
    events the broker took (and marks them sent instead of publishing them again).
    """

    confirmed: set[int] = field(default_factory=set)
    failed: dict[int, Exception] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What to do with a delivery once the handler has run."""

    action: Literal["ack", "retry", "dead"]
    event: Event | None = None
    delay: float = 0.0
    reason: str = ""
    error: str = ""


async def run_delivery(
    settings: EventSettings, queue: str, body: bytes, attempt: int, handler: Handler
) -> Outcome:
    """Parse, run the handler, and decide: ack, retry after a delay, or dead-letter."""
    try:
        event = Event.from_json(body)
    except PoisonMessage as exc:
        log.error("poison message on %s goes to the DLQ: %s", queue, exc)
        return Outcome("dead", reason=REASON_POISON, error=error_text(exc))
    try:
        await handler(event)
    except Exception as exc:
        delay = settings.retry_delay(attempt)
        if delay is None:
            log.error(
                "handler for %s on %s failed attempt %d/%d: dead-lettered",
                event.id,
                queue,
                attempt,
                settings.events_max_attempts,
                exc_info=True,
            )
            return Outcome("dead", event, reason=REASON_MAX_ATTEMPTS, error=error_text(exc))
        log.warning(
            "handler for %s on %s failed attempt %d/%d (%s): retry in %.3gs",
            event.id,
            queue,
            attempt,
            settings.events_max_attempts,
            error_text(exc),
            delay,
        )
        return Outcome("retry", event, delay=delay, error=error_text(exc))
    CONSUMED.labels(queue=queue, type=event.type).inc()
    return Outcome("ack", event)


class EventBus(ABC):
    """What services use to publish and consume events."""

    def __init__(
        self,
        settings: EventSettings | None = None,
        *,
        queues: Iterable[QueueSpec] = STANDARD_QUEUES,
    ) -> None:
        self.settings = settings or EventSettings()
        self.topology = Topology(self.settings.events_namespace)
        #: queues declared at start (the contract's by default) so nothing is lost
        #: before their consumers first start
        self.queues: tuple[QueueSpec, ...] = tuple(queues)

    @property
    @abstractmethod
    def connected(self) -> bool:
        """True while the bus can publish."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and declare the topology (idempotent)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop consuming, let in-flight handlers finish briefly, disconnect."""

    @abstractmethod
    async def publish(self, event: Event) -> None:
        """Publish with routing key ``event.type``; returns once confirmed."""

    async def publish_stored(self, stored: StoredEvent) -> None:
        """Publish an outbox row's event exactly as :meth:`publish` would publish it.

        Buses that can send the stored body as it is override this."""
        await self.publish(stored.event())

    async def publish_stored_batch(self, batch: Sequence[StoredEvent], result: BatchResult) -> None:
        """Publish outbox rows in order, their confirms awaited together, into ``result``.

        Raises only when cancelled: each event is confirmed or failed in ``result``
        (failed with a :class:`PublishError`, or whatever a bug raised). After the first
        failure no further publish starts (the broker is in trouble: do not pile up
        more failures); the events not started are in neither set. This default
        pipelines :meth:`publish_stored`, at most :data:`MAX_IN_FLIGHT` at once;
        :class:`RabbitBus` writes that many in one go.
        """
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def publish(index: int, stored: StoredEvent) -> None:
            try:
                await self.publish_stored(stored)
            except Exception as exc:  # a PublishError, or a bug: the caller reports it
                result.failed[index] = exc
            else:
                result.confirmed.add(index)
            finally:
                slots.release()

        tasks: list[asyncio.Task[None]] = []
        try:
            for index, stored in enumerate(batch):
                await slots.acquire()
                if result.failed:
                    slots.release()
                    break
                tasks.append(asyncio.create_task(publish(index, stored)))
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    @abstractmethod
    async def publish_raw(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish any body to the events exchange (tools and tests; services use publish)."""

    @abstractmethod
    async def subscribe(self, queue: str, bindings: Sequence[str], handler: Handler) -> None:
        """Declare ``queue`` (logical name) bound to ``bindings`` and consume it with handler."""

    @abstractmethod
    async def queue_depth(self, queue: str) -> int | None:
        """Messages ready in ``queue`` (None if it does not exist)."""

    @abstractmethod
    async def dlq_depth(self, queue: str) -> int | None:
        """Messages in ``<queue>.dlq`` (None if it does not exist)."""

    @abstractmethod
    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Look at (without removing) up to ``limit`` messages of ``<queue>.dlq``, oldest first."""

    @abstractmethod
    async def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move the messages now in ``<queue>.dlq`` back to ``queue`` with a fresh attempt
        count; returns how many moved."""

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


__all__ = [
    "MAX_IN_FLIGHT",
    "BatchResult",
    "DeadLetter",
    "EventBus",
    "Handler",
    "Outcome",
    "PublishError",
    "attempt_of",
    "error_text",
    "run_delivery",
]


async def refresh_queue_depths(bus: EventBus, queues: Iterable[str]) -> dict[str, Any]:
    """Set the depth gauges of each logical queue and its DLQ; returns what it read.

    For RabbitMQ this is a passive queue declare (``message_count``) per queue; a queue
    that does not exist is left out.
    """
    read: dict[str, Any] = {}
    for queue in queues:
        depth = await bus.queue_depth(queue)
        dlq = await bus.dlq_depth(queue)
        if depth is not None:
            QUEUE_DEPTH.labels(queue=queue).set(depth)
        if dlq is not None:
            DLQ_DEPTH.labels(queue=queue).set(dlq)
        read[queue] = {"ready": depth, "dlq": dlq}
    return read

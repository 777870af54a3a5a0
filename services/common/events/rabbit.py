"""The RabbitMQ event bus (aio-pika 10, robust connection, publisher confirms).

* One robust connection, named after the service; it reconnects by itself and restores
  the declared exchanges, queues, bindings and consumers. While it is down, ``publish``
  raises :class:`PublishError` at once (the outbox keeps the events).
* ``start()`` keeps retrying the first connection in the background when the broker is
  not up yet; it waits ``AMQP_CONNECT_TIMEOUT`` for it, then returns anyway.
* Publishing channel: ``publisher_confirms=True``, ``on_return_raises=True``; every
  publish is ``mandatory`` and persistent, with ``message_id`` = event id, ``type``,
  ``timestamp``, ``app_id`` = source and ``content_type = application/json``.
* Consuming channel: ``basic.qos(prefetch_count=AMQP_PREFETCH)``, manual acks. A
  delivery is acked after its handler returned (after the handler's DB commit), or
  after its copy reached the retry queue or the DLQ (confirmed). If that copy cannot
  be published the delivery is nacked with requeue, never dropped.
* Consumers are registered on aiormq's channel under the robust one, so a delivery
  reaches the handler as aiormq's ``DeliveredMessage`` in aiormq's own task: aio-pika's
  ``IncomingMessage`` and the second task it starts per delivery cost 20 to 27 µs of CPU
  per message here (53 against 73 to 80 µs with an ack), and a chat request makes four
  deliveries. aio-pika still restores the queues and bindings after a reconnection;
  the consumers are registered again by this bus (the channel's reopen callback), and
  a consumer the broker cancels (its queue deleted) is declared and attached again.
* Frames of our own where they are hot, byte for byte what aiormq would send or read:
  a relay's batch is written as one frame sequence (:mod:`.amqpwire`, confirms awaited
  together), coalesced acks are written from the flush callback, and deliveries and
  confirms are read by :mod:`.framereader`. Each falls back to aiormq's own path when
  aiormq lacks a part it uses (see :mod:`.amqpchannel` and ``framereader.install``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    DeliveryMode,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError
from aio_pika.exceptions import PublishError as ReturnedError
from aiormq.abc import DeliveredMessage
from yarl import URL

from . import amqpchannel, framereader, quiet
from . import bus as bus_module
from .acks import ChannelAcks
from .bus import (
    BatchResult,
    DeadLetter,
    EventBus,
    Handler,
    PublishError,
    attempt_of,
    dead_letter_from,
    run_delivery,
)
from .envelope import Event, StoredEvent
from .inprocess import replay_headers
from .metrics import CONFIRMED, DEAD_LETTERED, PUBLISH_FAILED, PUBLISHED, RETRIED
from .settings import EventSettings
from .topology import (
    H_ATTEMPT,
    H_DEATH_REASON,
    H_ERROR,
    H_ORIGINAL_QUEUE,
    STANDARD_QUEUES,
    QueueSpec,
    check_pattern,
    delay_ms,
)

log = logging.getLogger("aiagg.events")

#: channel errors that no reconnection can fix: wrong arguments, permissions
_FATAL = (
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelAccessRefused,
)
#: headers RabbitMQ adds when it dead-letters; not carried over to our copies
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-")


Properties = aiormq.spec.Basic.Properties


def _event_properties(event_id: str, type_: str, source: str, occurred_at: datetime) -> Properties:
    """An event message's properties, as aio-pika's ``Message`` would build them."""
    return Properties(
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT.value,
        priority=0,
        headers={},
        message_id=event_id,
        message_type=type_,
        timestamp=occurred_at,
        app_id=source,
    )


def _clean_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    return {
        k: v
        for k, v in (headers or {}).items()
        if not any(k == p or (p.endswith("-") and k.startswith(p)) for p in _BROKER_HEADERS)
    }


def _recorded(made: list[AbstractRobustConnection]) -> Any:
    """A ``connection_class`` for ``connect_robust`` that remembers what it made."""

    def make(*args: Any, **kwargs: Any) -> aio_pika.RobustConnection:
        connection = aio_pika.RobustConnection(*args, **kwargs)
        made.append(connection)
        return connection

    return make


def _why(exc: BaseException) -> str:
    """A connection failure in words; a timeout's own text is empty."""
    if isinstance(exc, TimeoutError):
        return "timed out: is it a RabbitMQ server, and is it overloaded?"
    return str(exc) or type(exc).__name__


async def _close_quietly(connection: AbstractRobustConnection) -> None:
    """Close a connection that failed or was given up on; bounded, never raises."""
    with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
        async with asyncio.timeout(5):
            await connection.close()


@dataclass
class _Subscription:
    queue: str
    bindings: tuple[str, ...]
    handler: Handler
    consumer_tag: str | None = None
    #: the aiormq channel the consumer is registered on (a new one after a reopen)
    channel: Any = None


def _copy_properties(original: Properties, headers: dict[str, Any]) -> Properties:
    """The properties of a copy (retry, DLQ, replay): the original's, ``headers`` new."""
    return Properties(
        content_type=original.content_type,
        delivery_mode=DeliveryMode.PERSISTENT.value,
        headers=headers,
        message_id=original.message_id,
        message_type=original.message_type,
        timestamp=original.timestamp,
        app_id=original.app_id,
    )


class ConfirmLost(Exception):
    """A confirmation future was cancelled before the broker answered."""


def _publish_failure(
    exc: BaseException, exchange: str, routing_key: str, timeout: float
) -> tuple[str, PublishError]:
    """The metrics reason and the :class:`PublishError` for what a publish raised."""
    if isinstance(exc, PublishError):
        return "connection", exc
    if isinstance(exc, ReturnedError):
        return "unroutable", PublishError(
            f"unroutable: no queue is bound for routing key {routing_key!r} "
            f"on exchange {exchange or '(default)'!r}"
        )
    if isinstance(exc, DeliveryError):
        return "nack", PublishError(f"the broker refused (nack) the message to {routing_key!r}")
    if isinstance(exc, TimeoutError):
        return "timeout", PublishError(f"no confirm from RabbitMQ within {timeout}s")
    if isinstance(exc, ConfirmLost):
        return "connection", PublishError("the channel closed before RabbitMQ confirmed")
    return "connection", PublishError(f"RabbitMQ connection trouble: {exc!r}")


class RabbitBus(EventBus):
    """The production bus. ``url`` defaults to ``settings.amqp_url``."""

    def __init__(
        self,
        url: str | None = None,
        settings: EventSettings | None = None,
        *,
        queues: Iterable[QueueSpec] = STANDARD_QUEUES,
        connection_name: str = "aiagg",
        grace: float = 10.0,
    ) -> None:
        super().__init__(settings, queues=queues)
        self.url = url or self.settings.amqp_url
        if not self.url:
            raise ValueError("RabbitBus needs an AMQP URL (AMQP_URL)")
        self.connection_name = connection_name
        self._grace = grace
        self._connection: AbstractRobustConnection | None = None
        self._pub: AbstractRobustChannel | None = None
        self._con: AbstractRobustChannel | None = None
        self._exchange: AbstractRobustExchange | None = None
        self._subs: dict[str, _Subscription] = {}
        self._declared: set[str] = set()
        self._inflight: set[asyncio.Task[Any]] = set()
        #: ack bookkeeping per consuming channel (delivery tags are per channel)
        self._acks: weakref.WeakKeyDictionary[Any, ChannelAcks] = weakref.WeakKeyDictionary()
        #: aiormq channels whose broker-side consumer cancellations this bus follows
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._connect_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._setup_lock = asyncio.Lock()
        self._closing = False
        #: monotonic time the live connection was lost (None: not lost)
        self._lost_at: float | None = None
        quiet.install()
        framereader.install()

    # -- connection ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return (
            self._ready.is_set()
            and self._connection is not None
            and self._connection.connected.is_set()
            and self._pub is not None
            and not self._pub.is_closed
        )

    def display_url(self) -> str:
        """The broker URL with the password masked, for logs and messages."""
        url = URL(self.url)
        return str(url.with_password("***")) if url.password else str(url)

    async def start(self) -> None:
        """Connect and declare the topology; see the module doc for a broker that is down."""
        if self._ready.is_set():
            return  # idempotent: a shared bus is started by each app that uses it
        if self._connect_task is None or self._connect_task.done():
            self._closing = False
            self._connect_task = asyncio.create_task(
                self._connect_loop(), name=f"amqp-connect:{self.connection_name}"
            )
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait(
                {ready, self._connect_task},
                timeout=self.settings.amqp_connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ready.cancel()
        if self._connect_task.done() and not self._ready.is_set():
            self._connect_task.result()  # raises the fatal error
        if not self._ready.is_set():
            log.warning(
                "RabbitMQ at %s is not reachable yet; still trying in the background. "
                "Publishes fail (the outbox keeps events) until it is.",
                self.display_url(),
            )

    async def wait_connected(self) -> None:
        """Wait until the first connection and the topology are up (wrap in a timeout)."""
        await self._ready.wait()

    async def _connect_loop(self) -> None:
        delay = self.settings.amqp_reconnect_interval or 0.1
        attempt = 0
        while not self._closing:
            # aio-pika's connection object exists before connect_robust() returns, and its
            # reconnection task outlives a cancelled connect_robust() (it swallows the
            # cancellation until close() is called): keep hold of it so it can be closed
            made: list[AbstractRobustConnection] = []
            try:
                connection = await aio_pika.connect_robust(
                    self.url,
                    reconnect_interval=self.settings.amqp_reconnect_interval,
                    client_properties={"connection_name": self.connection_name},
                    timeout=max(1.0, min(10.0, self.settings.amqp_connect_timeout)),
                    connection_class=_recorded(made),
                )
                async with asyncio.timeout(max(10.0, self.settings.amqp_connect_timeout)):
                    await self._setup(connection)
            except BaseException as exc:
                if made:
                    self._ready.clear()
                    await _close_quietly(made[0])
                if isinstance(exc, asyncio.CancelledError):
                    raise  # close() stops a connection attempt: not a set-up error
                if isinstance(exc, _FATAL) or not isinstance(
                    exc, (*CONNECTION_EXCEPTIONS, TimeoutError)
                ):
                    # wrong queue arguments, no permission, a bug: no retry can fix it
                    log.error("RabbitMQ set-up failed: %r", exc)
                    raise
                attempt += 1
                pause = min(30.0, delay * 2 ** min(attempt - 1, 5)) * random.uniform(0.5, 1.0)
                (log.warning if attempt == 1 else log.info)(
                    "cannot connect to RabbitMQ at %s (%s); retrying in %.1fs",
                    self.display_url(),
                    _why(exc),
                    pause,
                )
                await asyncio.sleep(pause)
                continue
            log.info("connected to RabbitMQ at %s", self.display_url())
            return

    async def _setup(self, connection: AbstractRobustConnection) -> None:
        async with self._setup_lock:
            self._declared.clear()
            self._pub = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._con = await connection.channel(publisher_confirms=False)
            await self._con.set_qos(prefetch_count=self.settings.amqp_prefetch)
            self._exchange = await self._pub.declare_exchange(
                self.topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            for spec in self.queues:
                await self._declare_queue(spec.name, spec.bindings)
            for sub in list(self._subs.values()):
                await self._attach(sub)
            self._connection = connection
            self._ready.set()
            connection.reconnect_callbacks.add(self._on_reconnect)
            connection.close_callbacks.add(self._on_connection_lost)
            self._con.reopen_callbacks.add(self._on_consumer_channel_reopened)

    def _on_connection_lost(self, _connection: Any, exc: BaseException | None = None) -> None:
        """One WARNING per outage (the libraries' per-attempt lines are DEBUG, quiet.py)."""
        if self._closing or self._lost_at is not None:
            return
        self._lost_at = time.monotonic()
        log.warning(
            "lost the connection to RabbitMQ at %s (%s); publishing fails at once and the "
            "outboxes keep the events; reconnecting every %.1fs",
            self.display_url(),
            exc if exc is not None else "closed",
            self.settings.amqp_reconnect_interval,
        )

    def _on_reconnect(self, *_: Any) -> None:
        """aio-pika restored what it knew; attach what was subscribed while disconnected."""
        if self._lost_at is not None:
            log.warning(
                "reconnected to RabbitMQ at %s after %.1fs; the relays send what the outboxes kept",
                self.display_url(),
                time.monotonic() - self._lost_at,
            )
            self._lost_at = None
        self._schedule_attach()

    def _on_consumer_channel_reopened(self, *_: Any) -> None:
        """The consuming channel is a new aiormq channel now (a reconnection, or the
        channel alone was closed and reopened): aio-pika restored the queues and
        bindings; the consumers, registered on aiormq's channel, are attached again."""
        for sub in self._subs.values():
            sub.consumer_tag = None
            sub.channel = None
        self._schedule_attach()

    def _on_consumer_cancelled(self, sub: _Subscription, tag: str) -> None:
        """The broker cancelled the consumer (its queue was deleted): declare, attach."""
        if self._closing or sub.consumer_tag != tag:
            return
        log.warning("RabbitMQ cancelled the consumer of %s; declaring it again", sub.queue)
        sub.consumer_tag = None
        sub.channel = None
        self._declared.discard(sub.queue)
        self._schedule_attach()

    def _schedule_attach(self) -> None:
        if self._closing or all(sub.consumer_tag is not None for sub in self._subs.values()):
            return
        task = asyncio.create_task(self._attach_pending(), name="amqp-attach-pending")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _attach_pending(self) -> None:
        async with self._setup_lock:
            for sub in list(self._subs.values()):
                if sub.consumer_tag is None and self.connected:
                    try:
                        async with asyncio.timeout(self.settings.events_publish_timeout):
                            await self._attach(sub)
                    except (TimeoutError, *CONNECTION_EXCEPTIONS):
                        log.warning("could not attach the consumer of %s yet", sub.queue)

    async def _declare_queue(self, queue: str, bindings: Sequence[str]) -> AbstractQueue:
        """Declare queue, its retry queues and DLQ, and bind it (idempotent, robust)."""
        assert self._con is not None and self._exchange is not None
        topo = self.topology
        main = await self._con.declare_queue(topo.queue(queue), durable=True)
        for pattern in bindings:
            await main.bind(self._exchange, routing_key=pattern)
        if queue not in self._declared:
            for delay in self.settings.retry_delays_in_use():
                await self._con.declare_queue(
                    topo.retry_queue(queue, delay),
                    durable=True,
                    arguments={
                        "x-message-ttl": delay_ms(delay),
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": topo.queue(queue),
                    },
                )
            await self._con.declare_queue(topo.dlq(queue), durable=True)
            self._declared.add(queue)
        return main

    async def close(self) -> None:
        self._closing = True
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        for task in list(self._background):
            task.cancel()
        connected = self.connected
        for sub in self._subs.values():
            if connected and sub.channel is not None and sub.consumer_tag is not None:
                # stop deliveries first
                with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                    async with asyncio.timeout(2):
                        await sub.channel.basic_cancel(sub.consumer_tag)
            sub.consumer_tag = None
            sub.channel = None
        if self._inflight:
            _done, pending = await asyncio.wait(set(self._inflight), timeout=self._grace)
            for task in pending:  # not acked: the broker redelivers it
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        for channel in list(self._acks):  # what committed gets its ack before we go
            self._flush_acks(channel)
        if self._ack_tasks:
            await asyncio.wait(set(self._ack_tasks), timeout=2)
        if self._connection is not None:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                async with asyncio.timeout(5):
                    await self._connection.close()
        self._connection = self._pub = self._con = self._exchange = None
        self._declared.clear()
        self._ready.clear()

    # -- publishing ---------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        await self._send(
            self.topology.exchange,
            event.type,
            event.to_json(),
            _event_properties(event.id, event.type, event.source, event.occurred_at),
            label=event.type,
        )

    async def publish_stored(self, stored: StoredEvent) -> None:
        """The outbox row's body as it is, with the properties :meth:`publish` sets."""
        await self._send(
            self.topology.exchange,
            stored.type,
            stored.body,
            _event_properties(stored.id, stored.type, stored.source, stored.occurred_at),
            label=stored.type,
        )

    async def publish_raw(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        properties = aio_pika.Message(
            body=b"",
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message_id,
            timestamp=datetime.now(UTC),
            headers=dict(headers or {}),
        ).properties
        await self._send(
            self.topology.exchange, routing_key, bytes(body), properties, label=routing_key
        )

    async def publish_stored_batch(self, batch: Sequence[StoredEvent], result: BatchResult) -> None:
        """The relay's batch, written to the broker at once: one frame sequence and one
        wake-up of the connection's writer per :data:`~.bus.MAX_IN_FLIGHT` events, the
        confirms awaited together. Publishing them one by one cost a task, a lock, two
        timeouts, a drain future and pamqp's generic encoding per event (the README's
        benchmarks give what this bought). Semantics are the default's: in order, no
        further chunk after a failure, ``result`` holding what was confirmed even when
        this is cancelled."""
        for start in range(0, len(batch), bus_module.MAX_IN_FLIGHT):
            if result.failed:
                return
            chunk = batch[start : start + bus_module.MAX_IN_FLIGHT]
            if not await self._publish_chunk(chunk, start, result):
                # aiormq's channel lacks what the frame writer needs: one by one
                rest = BatchResult()
                try:
                    await super().publish_stored_batch(batch[start:], rest)
                finally:
                    result.confirmed.update(start + i for i in rest.confirmed)
                    result.failed.update({start + i: e for i, e in rest.failed.items()})
                return

    async def _publish_chunk(
        self, chunk: Sequence[StoredEvent], offset: int, result: BatchResult
    ) -> bool:
        """Write ``chunk`` (its indexes start at ``offset``) and await its confirms into
        ``result``; False, with nothing sent, if the channel cannot take a frame write."""
        exchange = self.topology.exchange
        futures: list[asyncio.Future[Any]] = []

        def fail(index: int, reason: str, error: PublishError) -> None:
            PUBLISH_FAILED.labels(type=chunk[index - offset].type, reason=reason).inc()
            result.failed[index] = error

        def settle_done() -> None:
            """Record what the broker answered so far (every future, once done)."""
            for index, future in enumerate(futures, offset):
                if not future.done() or index in result.confirmed or index in result.failed:
                    continue
                exc = ConfirmLost() if future.cancelled() else future.exception()
                if exc is None:
                    result.confirmed.add(index)
                    CONFIRMED.labels(type=chunk[index - offset].type).inc()
                else:
                    fail(
                        index,
                        *_publish_failure(exc, exchange, chunk[index - offset].type, self._timeout),
                    )

        counted = False

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                for stored in chunk:
                    PUBLISHED.labels(type=stored.type).inc()

        try:
            async with asyncio.timeout(self._timeout):
                channel = await self._publishing_channel()
                if not amqpchannel.writes_frames(channel):
                    return False  # the one-by-one path counts them
                count()
                messages = [
                    (
                        exchange,
                        s.type,
                        _event_properties(s.id, s.type, s.source, s.occurred_at),
                        s.body,
                    )
                    for s in chunk
                ]
                futures = await amqpchannel.write_publishes(channel, messages)
                await asyncio.wait(futures)
        except asyncio.CancelledError:
            settle_done()  # the rows not confirmed stay pending in the outbox
            for future in futures:
                future.cancel()
            raise
        except (PublishError, TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            count()
            settle_done()
            reason, error = _publish_failure(exc, exchange, chunk[0].type, self._timeout)
            for index in range(offset, offset + len(chunk)):
                if index not in result.confirmed and index not in result.failed:
                    fail(index, reason, error)
            for future in futures:
                future.cancel()
            return True
        settle_done()
        return True

    @property
    def _timeout(self) -> float:
        return self.settings.events_publish_timeout

    async def _publishing_channel(self) -> Any:
        """aiormq's channel under the publishing one; PublishError when not connected."""
        if not self.connected:
            raise PublishError(f"not connected to RabbitMQ at {self.display_url()}")
        assert self._pub is not None
        return await self._pub.get_underlay_channel()

    async def _send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties,
        *,
        label: str,
        count: bool = True,
    ) -> None:
        """Publish to ``exchange`` ("" = the default exchange), mandatory, confirmed.

        Written as :meth:`publish_stored_batch` writes (aiormq's ``basic_publish`` when
        the channel cannot take a frame write). ``count=False`` for moves of existing
        messages (retry, DLQ, replay): the publish metrics count events, those moves
        have their own counters.
        """
        if count:
            PUBLISHED.labels(type=label).inc()
        try:
            async with asyncio.timeout(self._timeout):
                channel = await self._publishing_channel()
                if amqpchannel.writes_frames(channel):
                    [confirmation] = await amqpchannel.write_publishes(
                        channel, [(exchange, routing_key, properties, body)]
                    )
                    await confirmation
                else:
                    await channel.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=True,
                    )
        except (
            PublishError,
            ReturnedError,
            DeliveryError,
            TimeoutError,
            *CONNECTION_EXCEPTIONS,
        ) as exc:
            reason, error = _publish_failure(exc, exchange, routing_key, self._timeout)
            if count:
                PUBLISH_FAILED.labels(type=label, reason=reason).inc()
            if error is exc:
                raise  # not connected: already ours
            raise error from exc
        if count:
            CONFIRMED.labels(type=label).inc()

    # -- consuming ----------------------------------------------------------------------------

    async def subscribe(self, queue: str, bindings: Sequence[str], handler: Handler) -> None:
        """Consume ``queue``; before the connection is up the subscription waits for it."""
        for pattern in bindings:
            check_pattern(pattern)
        if queue in self._subs:
            raise ValueError(f"queue {queue!r} already has a consumer in this bus")
        sub = _Subscription(queue, tuple(bindings), handler)
        self._subs[queue] = sub
        async with self._setup_lock:
            # under the lock: the first setup, a reconnection or this call attaches it
            if self.connected:
                try:
                    async with asyncio.timeout(self.settings.events_publish_timeout):
                        await self._attach(sub)
                except BaseException:
                    del self._subs[queue]
                    raise

    async def _attach(self, sub: _Subscription) -> None:
        assert self._con is not None
        amqp_queue = await self._declare_queue(sub.queue, sub.bindings)
        channel = await self._con.get_underlay_channel()

        async def on_message(message: DeliveredMessage) -> None:
            # runs in the task aiormq starts for each delivery
            tag = message.delivery_tag
            self._channel_acks(message.channel).delivered(tag)
            task = asyncio.current_task()
            if task is not None:
                self._inflight.add(task)
            try:
                await self._on_message(sub, message)
            finally:
                if task is not None:
                    self._inflight.discard(task)

        ok = await channel.basic_consume(amqp_queue.name, on_message, no_ack=False)
        sub.consumer_tag = ok.consumer_tag
        sub.channel = channel
        if channel not in self._watched:  # once per aiormq channel
            self._watched.add(channel)
            channel.on_consumer_cancel_callbacks.add(self._consumer_cancel_callback)

    def _consumer_cancel_callback(self, frame: Any) -> None:
        tag = frame.consumer_tag
        for sub in self._subs.values():
            if sub.consumer_tag == tag:
                self._on_consumer_cancelled(sub, tag)

    async def _on_message(self, sub: _Subscription, message: DeliveredMessage) -> None:
        props = message.header.properties
        attempt = attempt_of(props.headers)
        outcome = await run_delivery(self.settings, sub.queue, message.body, attempt, sub.handler)
        try:
            if outcome.action in ("retry", "dead"):
                headers = _clean_headers(props.headers)
                if outcome.action == "retry":
                    headers[H_ATTEMPT] = attempt + 1
                    target = self.topology.retry_queue(sub.queue, outcome.delay)
                else:
                    headers.update(
                        {
                            H_ATTEMPT: attempt,
                            H_DEATH_REASON: outcome.reason,
                            H_ERROR: outcome.error,
                            H_ORIGINAL_QUEUE: sub.queue,
                        }
                    )
                    target = self.topology.dlq(sub.queue)
                await self._send(
                    "",
                    target,
                    message.body,
                    _copy_properties(props, headers),
                    label=props.message_type or "unknown",
                    count=False,
                )
                if outcome.action == "retry":
                    RETRIED.labels(queue=sub.queue).inc()
                else:
                    DEAD_LETTERED.labels(queue=sub.queue, reason=outcome.reason).inc()
        except PublishError as exc:
            log.error(
                "could not move a failed delivery of %s out of the way (%s); requeued",
                sub.queue,
                exc,
            )
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await asyncio.sleep(min(1.0, outcome.delay or 1.0))  # do not spin on it
                self._channel_acks(message.channel).settled(message.delivery_tag)
                await message.channel.basic_nack(message.delivery_tag, requeue=True)
            return
        self._ack(message)

    # -- acknowledgements ---------------------------------------------------------------------

    def _channel_acks(self, channel: Any) -> ChannelAcks:
        acks = self._acks.get(channel)
        if acks is None:
            acks = self._acks[channel] = ChannelAcks()
        return acks

    def _ack(self, message: DeliveredMessage) -> None:
        """Ack once this loop turn ends, coalesced with the other deliveries of the
        channel that finished in the same turn (see :mod:`.acks`)."""
        channel = message.channel
        acks = self._channel_acks(channel)
        acks.want_ack(message.delivery_tag, message)
        if not acks.flush_scheduled:
            acks.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks, channel)

    def _flush_acks(self, channel: Any) -> None:
        acks = self._acks.get(channel)
        if acks is None:
            return
        acks.flush_scheduled = False
        sends = acks.take()
        if not sends:
            return
        if amqpchannel.write_acks(
            channel, [(message.delivery_tag, multiple) for message, multiple in sends]
        ):
            return
        task = asyncio.create_task(self._send_acks(channel, sends), name="amqp-acks")
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    @staticmethod
    async def _send_acks(channel: Any, sends: list[tuple[DeliveredMessage, bool]]) -> None:
        for message, multiple in sends:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                # a lost ack means a redelivery, which the idempotent consumer absorbs
                await channel.basic_ack(message.delivery_tag, multiple=multiple)

    # -- inspection and repair ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _scratch_channel(self):
        """A plain (non-robust) channel for passive declares and gets; a 404 closes only it."""
        if not self.connected or self._connection is None:
            raise PublishError(f"not connected to RabbitMQ at {self.display_url()}")
        channel = aio_pika.Channel(self._connection, publisher_confirms=False)
        try:
            async with asyncio.timeout(self.settings.events_publish_timeout):
                await channel.initialize()
        except TimeoutError as exc:
            raise PublishError("RabbitMQ did not open a channel in time") from exc
        try:
            yield channel
        finally:
            if not channel.is_closed:
                # bounded: when the broker closed the channel at the same moment (a
                # passive declare's 404), our Close may never get its Close-Ok
                with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                    async with asyncio.timeout(2):
                        await channel.close()

    async def _count(self, physical: str) -> int | None:
        try:
            async with self._scratch_channel() as channel:
                queue = await channel.declare_queue(physical, passive=True)
                return queue.declaration_result.message_count
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except PublishError:
            return None

    async def queue_depth(self, queue: str) -> int | None:
        return await self._count(self.topology.queue(queue))

    async def dlq_depth(self, queue: str) -> int | None:
        return await self._count(self.topology.dlq(queue))

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Peek: gets up to ``limit`` messages unacked, then closing the channel requeues them."""
        out: list[DeadLetter] = []
        async with self._scratch_channel() as channel:
            dlq = await channel.declare_queue(self.topology.dlq(queue), passive=True)
            for _ in range(limit):
                message = await dlq.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    break
                out.append(
                    dead_letter_from(queue, message.body, message.headers, message.message_id)
                )
        return out

    async def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move what is in ``<queue>.dlq`` now (at most ``limit``) back into ``queue``.

        Each message is published to the queue (confirmed) before it is acked in the DLQ,
        so a crash in between duplicates it rather than losing it.
        """
        moved = 0
        async with self._scratch_channel() as channel:
            dlq = await channel.declare_queue(self.topology.dlq(queue), passive=True)
            count = dlq.declaration_result.message_count
            if limit is not None:
                count = min(count, limit)
            for _ in range(count):
                message = await dlq.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    break
                try:
                    await self._send(
                        "",
                        self.topology.queue(queue),
                        message.body,
                        _copy_properties(
                            message.properties, replay_headers(_clean_headers(message.headers))
                        ),
                        label=message.type or "unknown",
                        count=False,
                    )
                except PublishError:
                    await message.nack(requeue=True)
                    raise
                await message.ack()
                moved += 1
        if moved:
            log.info("replayed %d dead letter(s) into %s", moved, self.topology.queue(queue))
        return moved


__all__ = ["RabbitBus"]

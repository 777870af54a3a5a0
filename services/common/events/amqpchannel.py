"""Frames written straight onto aiormq's channel, with aiormq's own bookkeeping.

aiormq's ``basic_publish`` lets one publish through its channel lock per loop turn, each
with a task, two timeouts, a drain future and pamqp's generic encoding; its
``basic_ack`` costs a task and a drain wait per ack. Here a batch of publishes is one
write and coalesced acks are one write from the flush callback, the frames encoded by
:mod:`.amqpwire`. The channel's delivery tags, confirmation futures and message ids
are kept exactly as ``basic_publish`` keeps them, so aiormq's reader settles the
confirms and returns as before. What this uses of aiormq's channel is listed in
:data:`AIORMQ_PARTS`; a channel without one of them gets aiormq's own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame

from . import amqpwire

Properties = aiormq.spec.Basic.Properties

#: what the frame writer uses of aiormq's channel: its lock, its delivery-tag counter,
#: its confirmation and message-id maps, its write queue (aiormq 7's own names for what
#: ``basic_publish`` does; a later aiormq without one of them gets ``basic_publish``)
AIORMQ_PARTS = (
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "number",
    "create_future",
    "max_content_size",
    "publisher_confirms",
    "is_closed",
)
_frame_writers: dict[type, bool] = {}


def takes_frames(channel: Any) -> bool:
    """Whether ``channel`` (aiormq's) has what writing our own frames to it needs."""
    kind = type(channel)
    known = _frame_writers.get(kind)
    if known is None:
        known = _frame_writers[kind] = isinstance(getattr(kind, "lock", None), property) and all(
            hasattr(channel, name) for name in AIORMQ_PARTS
        )
    return known


def writes_frames(channel: Any) -> bool:
    """Whether ``channel`` can take :func:`write_publishes` (a confirming channel)."""
    return takes_frames(channel) and channel.publisher_confirms


async def write_publishes(
    channel: Any, messages: Sequence[tuple[str, str, Properties, bytes]]
) -> list[asyncio.Future[Any]]:
    """Write ``(exchange, routing key, properties, body)`` publishes, mandatory, as one
    frame sequence; their confirmation futures, in order.

    What aiormq's ``basic_publish`` does for one message, for several at once: under the
    channel's lock, the frames (encoded by :mod:`.amqpwire`) go to the connection's
    write queue, then each message takes the next delivery tag and registers its
    confirmation (and its message id, which a ``basic.return`` names). Nothing awaits
    between the enqueue and the registration, so no answer of the broker can be read
    before it; and a write cancelled while it waits (for the lock, or for room in the
    queue) has taken no tag and registered nothing.
    """
    payload = []
    for exchange, routing_key, properties, body in messages:
        if not properties.message_id:
            properties.message_id = uuid.uuid4().hex  # a return names the message by it
        payload.append(
            amqpwire.publish(
                channel.number,
                exchange,
                routing_key,
                properties,
                body,
                mandatory=True,
                max_body_frame=channel.max_content_size,
            )
        )
    futures: list[asyncio.Future[Any]] = []
    async with channel.lock:
        await channel.write_queue.put(ChannelFrame(payload=b"".join(payload), should_close=False))
        for _exchange, _key, properties, _body in messages:
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            future = channel.create_future()
            channel.confirmations[tag] = future
            channel.message_id_delivery_tag[properties.message_id] = tag
            future.add_done_callback(_forget(channel, properties.message_id, tag))
            futures.append(future)
    return futures


def _forget(channel: Any, message_id: str, tag: int) -> Any:
    def forget(_future: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            del channel.message_id_delivery_tag[message_id]

    return forget


def write_acks(channel: Any, acks: Sequence[tuple[int, bool]]) -> bool:
    """Write ``(delivery tag, multiple)`` acks as one frame write, now (no task, no
    wait); False, with nothing written, when the caller should use ``basic_ack``
    instead (a channel without the parts, or a write queue that is full). A closed
    channel's acks are dropped: the broker redelivers those messages, and the
    idempotent consumers absorb that."""
    # aiormq's basic_ack refuses a channel that is closing as well as a closed one: once
    # a Channel.CloseOk went out, a frame on that channel number would be a connection
    # error; the event it keeps for that is private, so without it basic_ack decides
    closing = getattr(channel, "_Channel__close_event", None)
    if not takes_frames(channel) or closing is None:
        return False
    if channel.is_closed or closing.is_set():
        return True
    payload = b"".join(
        amqpwire.ack(channel.number, tag, multiple=multiple) for tag, multiple in acks
    )
    with contextlib.suppress(asyncio.QueueFull):
        channel.write_queue.put_nowait(ChannelFrame(payload=payload, should_close=False))
        return True
    return False


__all__ = ["AIORMQ_PARTS", "takes_frames", "write_acks", "write_publishes", "writes_frames"]

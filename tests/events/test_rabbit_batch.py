"""RabbitBus writes an outbox batch at once: what that must keep of ``basic_publish``.

On the real broker: the batch is one write whose messages are confirmed each, a broker
that stalls gives a timeout per event and leaves the channel in step with the broker,
a cancelled batch keeps what was confirmed, a lost connection fails the batch at once,
and a channel without the parts the writer needs falls back to ``basic_publish``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import aiormq.connection
import pytest

from services.common.events import (
    APIKEY_REVOKED,
    USAGE_RECORDED,
    Event,
    PublishError,
    QueueSpec,
    RabbitBus,
    amqpchannel,
    framereader,
)
from services.common.events import bus as bus_module
from services.common.events.bus import BatchResult
from services.common.events.envelope import StoredEvent
from services.common.events.metrics import CONFIRMED, PUBLISH_FAILED, PUBLISHED
from tests.support import TcpRelay

from .conftest import (
    BusKit,
    assert_contract_message,
    collector,
    eventually,
    test_settings,
    via_proxy,
)


def stored(event: Event) -> StoredEvent:
    return StoredEvent(event.id, event.type, event.source, event.occurred_at, event.to_json())


def batch_of(n: int, type_: str = USAGE_RECORDED) -> list[StoredEvent]:
    return [stored(Event.new(type_, "proxy", {"n": i})) for i in range(n)]


async def _via(kit: BusKit, proxy: TcpRelay, queue: str, **settings: Any) -> RabbitBus:
    """A bus on a queue bound to usage.recorded, connected through ``proxy``."""
    config = test_settings(
        kit.settings.events_namespace, amqp_url=via_proxy(kit.settings.amqp_url, proxy), **settings
    )
    bus = await kit.make([QueueSpec(queue, ("usage.recorded",))], settings=config)
    assert isinstance(bus, RabbitBus)
    return bus


def count(metric: Any, **labels: str) -> float:
    return metric.labels(**labels)._value.get()


async def _channel(bus: RabbitBus) -> Any:
    assert bus._pub is not None
    return await bus._pub.get_underlay_channel()


async def _in_step(bus: RabbitBus) -> None:
    """The channel's bookkeeping is empty and a new publish is confirmed."""
    channel = await _channel(bus)
    await eventually(lambda: not channel.confirmations, what="no confirmation left waiting")
    assert not channel.message_id_delivery_tag
    result = BatchResult()
    await bus.publish_stored_batch(batch_of(3), result)
    assert result.confirmed == {0, 1, 2} and not result.failed


async def test_a_batch_is_one_write_and_each_message_is_confirmed_and_delivered(
    rabbit_kit: BusKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = await rabbit_kit.make([QueueSpec("batch", ("usage.recorded",))])
    assert isinstance(bus, RabbitBus)
    got = await collector(bus, "batch", ["usage.recorded"])
    writes: list[int] = []
    real_write = amqpchannel.write_publishes

    async def counting_write(channel: Any, messages: Any) -> Any:
        writes.append(len(messages))
        return await real_write(channel, messages)

    monkeypatch.setattr(amqpchannel, "write_publishes", counting_write)
    batch = batch_of(40)
    published = count(PUBLISHED, type=USAGE_RECORDED)
    confirmed = count(CONFIRMED, type=USAGE_RECORDED)
    result = BatchResult()
    await bus.publish_stored_batch(batch, result)
    assert writes == [40]
    assert result.confirmed == set(range(40)) and not result.failed
    assert count(PUBLISHED, type=USAGE_RECORDED) - published == 40
    assert count(CONFIRMED, type=USAGE_RECORDED) - confirmed == 40
    await eventually(lambda: len(got) == 40, what="40 deliveries")
    assert [e.id for e in got] == [s.id for s in batch]  # in order
    assert [e.to_json() for e in got] == [s.body for s in batch]
    await _in_step(bus)


async def test_an_unroutable_message_fails_alone_and_its_neighbours_are_confirmed(
    rabbit_kit: BusKit,
) -> None:
    bus = await rabbit_kit.make([QueueSpec("batch", ("usage.recorded",))])
    assert isinstance(bus, RabbitBus)
    batch = batch_of(6)
    batch[2] = stored(Event.new(APIKEY_REVOKED, "auth", {}))  # no queue binds it
    failed = count(PUBLISH_FAILED, type=APIKEY_REVOKED, reason="unroutable")
    result = BatchResult()
    await bus.publish_stored_batch(batch, result)
    assert result.confirmed == {0, 1, 3, 4, 5}
    assert set(result.failed) == {2}
    assert isinstance(result.failed[2], PublishError)
    assert "unroutable" in str(result.failed[2]) and APIKEY_REVOKED in str(result.failed[2])
    assert count(PUBLISH_FAILED, type=APIKEY_REVOKED, reason="unroutable") - failed == 1
    await _in_step(bus)


async def test_a_stalled_broker_times_each_message_out_and_the_channel_stays_in_step(
    rabbit_kit: BusKit, amqp_proxy: TcpRelay
) -> None:
    """The frames reach the broker but its confirms do not come back in time: every event
    fails with a timeout, and the late confirms, once they come, are ignored."""
    bus = await _via(rabbit_kit, amqp_proxy, "stall", events_publish_timeout=0.5)
    assert isinstance(bus, RabbitBus)
    got = await collector(bus, "stall", ["usage.recorded"])
    timeouts = count(PUBLISH_FAILED, type=USAGE_RECORDED, reason="timeout")
    amqp_proxy.hold_replies()
    result = BatchResult()
    began = asyncio.get_running_loop().time()
    await bus.publish_stored_batch(batch_of(5), result)
    assert asyncio.get_running_loop().time() - began < 2.0
    assert not result.confirmed and set(result.failed) == set(range(5))
    assert all("no confirm from RabbitMQ within 0.5s" in str(e) for e in result.failed.values())
    assert count(PUBLISH_FAILED, type=USAGE_RECORDED, reason="timeout") - timeouts == 5
    amqp_proxy.release_replies()
    await eventually(lambda: len(got) == 5, what="the 5 (they did reach the broker)")
    await _in_step(bus)


async def test_a_cancelled_batch_keeps_what_was_confirmed(
    rabbit_kit: BusKit, amqp_proxy: TcpRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two chunks: the first is confirmed; the broker stalls before it answers the second;
    the relay is stopped. The first chunk is in ``result``, the second in neither set."""
    bus = await _via(rabbit_kit, amqp_proxy, "cancel")
    assert isinstance(bus, RabbitBus)
    monkeypatch.setattr(bus_module, "MAX_IN_FLIGHT", 4)
    real_write = amqpchannel.write_publishes
    writes = 0

    async def stall_before_the_second_write(channel: Any, messages: Any) -> Any:
        nonlocal writes
        writes += 1
        if writes == 2:
            amqp_proxy.hold_replies()
        return await real_write(channel, messages)

    monkeypatch.setattr(amqpchannel, "write_publishes", stall_before_the_second_write)
    channel = await _channel(bus)
    result = BatchResult()
    task = asyncio.create_task(bus.publish_stored_batch(batch_of(8), result))
    try:
        await eventually(lambda: writes == 2 and len(channel.confirmations) == 4, what="chunk 2")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert result.confirmed == {0, 1, 2, 3}
        assert not result.failed  # cancelled is not failed: those rows simply stay pending
    finally:
        amqp_proxy.release_replies()
    monkeypatch.setattr(amqpchannel, "write_publishes", real_write)
    await _in_step(bus)


async def test_a_cancelled_write_takes_no_delivery_tag(rabbit_kit: BusKit) -> None:
    """Cancelled while another publish holds the channel's lock: no tag taken, nothing
    registered, so the tags the channel counts stay those the broker counts."""
    bus = await rabbit_kit.make([QueueSpec("locked", ("usage.recorded",))])
    assert isinstance(bus, RabbitBus)
    channel = await _channel(bus)
    tag = channel.delivery_tag
    result = BatchResult()
    async with channel.lock:
        task = asyncio.create_task(bus.publish_stored_batch(batch_of(3), result))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert channel.delivery_tag == tag
    assert not channel.confirmations and not result.confirmed and not result.failed
    await _in_step(bus)


async def test_a_lost_connection_fails_the_batch_at_once(
    rabbit_kit: BusKit, amqp_proxy: TcpRelay
) -> None:
    bus = await _via(rabbit_kit, amqp_proxy, "lost", events_publish_timeout=30)
    assert isinstance(bus, RabbitBus)
    amqp_proxy.hold_replies()
    result = BatchResult()
    task = asyncio.create_task(bus.publish_stored_batch(batch_of(5), result))
    channel = await _channel(bus)
    await eventually(lambda: len(channel.confirmations) == 5, what="the batch written")
    began = asyncio.get_running_loop().time()
    amqp_proxy.cut()
    await asyncio.wait_for(task, 10)
    assert asyncio.get_running_loop().time() - began < 5  # not the 30 s timeout
    assert not result.confirmed and set(result.failed) == set(range(5))
    # while it is down, a batch fails at once, as publish does
    amqp_proxy.release_replies()
    down = BatchResult()
    await amqp_proxy.stop()
    await eventually(lambda: not bus.connected, what="the bus to notice")
    await bus.publish_stored_batch(batch_of(2), down)
    assert set(down.failed) == {0, 1} and "not connected" in str(down.failed[0])
    await amqp_proxy.start()
    await eventually(lambda: bus.connected, within=10, what="reconnection")
    await _in_step(bus)


async def test_without_the_channel_parts_a_batch_goes_one_by_one(
    rabbit_kit: BusKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later aiormq without one of the names the writer uses: basic_publish, same result,
    each event counted once."""
    monkeypatch.setattr(amqpchannel, "AIORMQ_PARTS", (*amqpchannel.AIORMQ_PARTS, "gone"))
    monkeypatch.setattr(amqpchannel, "_frame_writers", {})

    async def no_frames(*_: Any) -> Any:
        raise AssertionError("the frame writer was used")

    monkeypatch.setattr(amqpchannel, "write_publishes", no_frames)
    bus = await rabbit_kit.make([QueueSpec("fallback", ("usage.recorded",))])
    assert isinstance(bus, RabbitBus)
    got = await collector(bus, "fallback", ["usage.recorded"])
    published = count(PUBLISHED, type=USAGE_RECORDED)
    confirmed = count(CONFIRMED, type=USAGE_RECORDED)
    batch = batch_of(7)
    result = BatchResult()
    await bus.publish_stored_batch(batch, result)
    assert result.confirmed == set(range(7)) and not result.failed
    assert count(PUBLISHED, type=USAGE_RECORDED) - published == 7
    assert count(CONFIRMED, type=USAGE_RECORDED) - confirmed == 7
    await bus.publish(Event.new(USAGE_RECORDED, "proxy", {"single": True}))
    await eventually(lambda: len(got) == 8, what="8 deliveries")
    assert {e.id for e in got[:7]} == {s.id for s in batch}


async def test_the_written_message_carries_the_contract_properties(rabbit_kit: BusKit) -> None:
    """Read back by aio-pika from the queue: the properties the frame writer encoded."""
    bus = await rabbit_kit.make([QueueSpec("props", ("usage.recorded",))])
    assert isinstance(bus, RabbitBus)
    got: list[Any] = []
    connection = await aio_pika.connect(rabbit_kit.settings.amqp_url)
    try:
        channel = await connection.channel()
        event = Event.new(USAGE_RECORDED, "proxy", {"é": "ü"})
        result = BatchResult()
        await bus.publish_stored_batch([stored(event)], result)
        assert result.confirmed == {0}
        queue = await channel.declare_queue(bus.topology.queue("props"), passive=True)
        got.append(await queue.get(no_ack=True, fail=False))
    finally:
        await connection.close()
    assert_contract_message(got[0], event)


async def test_a_started_bus_reads_frames_with_the_frame_reader(
    rabbit_kit: BusKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating a RabbitBus installs the reader into aiormq; its connection works on it."""
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", framereader._Original)
    bus = await rabbit_kit.make([QueueSpec("read", ("usage.recorded",))])
    assert aiormq.connection.FrameReceiver is framereader.FrameReader
    got = await collector(bus, "read", ["usage.recorded"])
    await bus.publish(Event.new(USAGE_RECORDED, "proxy", {"n": 1}))
    await eventually(lambda: len(got) == 1, what="a delivery read by the frame reader")

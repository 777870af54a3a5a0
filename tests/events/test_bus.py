"""Delivery semantics, the same on RabbitBus (real RabbitMQ) and InProcessBus."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.events import (
    USAGE_RECORDED,
    Event,
    PublishError,
    QueueSpec,
)
from services.common.events.topology import H_DEATH_REASON, H_ERROR

from .conftest import BusKit, eventually


def usage(n: int = 0) -> Event:
    return Event.new(USAGE_RECORDED, "proxy", {"n": n, "cost": "0.001250"})


async def test_publish_consume_ack(bus_kit: BusKit) -> None:
    bus = await bus_kit.make()
    got: list[Event] = []

    async def handler(event: Event) -> None:
        got.append(event)

    await bus.subscribe("work", ["usage.recorded"], handler)
    bus_kit.track("work")
    sent = [usage(i) for i in range(5)]
    for event in sent:
        await bus.publish(event)
    await eventually(lambda: len(got) == 5, what="5 deliveries")
    assert sorted(e.id for e in got) == sorted(e.id for e in sent)
    assert {e.data["n"] for e in got} == set(range(5))
    assert got[0].data["cost"] == "0.001250"
    # acknowledged: nothing is left in the queue, nothing in the DLQ
    await eventually(lambda: _depth_is(bus, "work", 0), what="an empty queue")
    assert await bus.dlq_depth("work") == 0
    await asyncio.sleep(0.3)
    assert len(got) == 5  # and nothing is delivered again


async def _depth_is(bus, queue: str, expected: int) -> bool:
    return await bus.queue_depth(queue) == expected


async def test_unroutable_publish_raises(bus_kit: BusKit) -> None:
    bus = await bus_kit.make()
    bus_kit.track("only-usage")
    await bus.subscribe("only-usage", ["usage.recorded"], _noop)
    with pytest.raises(PublishError, match="unroutable"):
        await bus.publish(Event.new("apikey.created", "auth", {"key_id": "k1"}))
    # the channel survives the returned message: a routable publish still works
    await bus.publish(usage())


async def _noop(event: Event) -> None:
    return None


async def test_topic_bindings_route_like_amqp(bus_kit: BusKit) -> None:
    queues = (
        QueueSpec("all", ("#",)),
        QueueSpec("usage-only", ("usage.recorded",)),
        QueueSpec("any-created", ("*.created",)),
    )
    bus = await bus_kit.make(queues)
    seen: dict[str, list[str]] = {q.name: [] for q in queues}

    def collect(name: str):
        async def handler(event: Event) -> None:
            seen[name].append(event.type)

        return handler

    for spec in queues:
        await bus.subscribe(spec.name, list(spec.bindings), collect(spec.name))
    for type_ in ("usage.recorded", "apikey.created", "transaction.created", "route.decided"):
        await bus.publish(Event.new(type_, "test", {}))
    await eventually(lambda: len(seen["all"]) == 4, what="4 events on 'all'")
    await eventually(lambda: len(seen["any-created"]) == 2, what="2 on any-created")
    await asyncio.sleep(0.2)
    assert seen["usage-only"] == ["usage.recorded"]
    assert sorted(seen["any-created"]) == ["apikey.created", "transaction.created"]


async def test_failing_handler_is_retried_after_delays_then_succeeds(bus_kit: BusKit) -> None:
    bus = await bus_kit.make()
    bus_kit.track("flaky")
    attempts: list[float] = []

    async def flaky(event: Event) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError(f"boom {len(attempts)}")

    await bus.subscribe("flaky", ["usage.recorded"], flaky)
    await bus.publish(usage())
    await eventually(lambda: len(attempts) == 3, what="three attempts")
    # settings: 200ms then 400ms
    assert attempts[1] - attempts[0] >= 0.18
    assert attempts[2] - attempts[1] >= 0.36
    await asyncio.sleep(0.6)
    assert len(attempts) == 3  # the third attempt succeeded: acknowledged, not retried
    assert await bus.dlq_depth("flaky") == 0


async def test_handler_failing_every_time_lands_in_dlq_with_reason(bus_kit: BusKit) -> None:
    bus = await bus_kit.make()
    bus_kit.track("doomed")
    attempts: list[float] = []

    async def doomed(event: Event) -> None:
        attempts.append(time.monotonic())
        raise ValueError("price table has no model gpt-x")

    await bus.subscribe("doomed", ["usage.recorded"], doomed)
    event = usage(7)
    await bus.publish(event)
    await eventually(lambda: _depth_is(bus, "doomed", 0), what="queue drained")
    await eventually(lambda: _dlq_is(bus, "doomed", 1), within=5, what="one dead letter")
    assert len(attempts) == 3  # EVENTS_MAX_ATTEMPTS=3: the first try and two retries
    assert attempts[1] - attempts[0] >= 0.18
    assert attempts[2] - attempts[1] >= 0.36
    letters = await bus.dead_letters("doomed")
    assert len(letters) == 1
    letter = letters[0]
    assert letter.reason == "max-attempts"
    assert letter.error == "ValueError: price table has no model gpt-x"
    assert letter.attempts == 3
    assert letter.event == event  # the original body
    assert letter.headers[H_DEATH_REASON] == "max-attempts"
    assert letter.headers[H_ERROR] == letter.error
    # looking did not remove it
    assert await bus.dlq_depth("doomed") == 1
    await asyncio.sleep(0.5)
    assert len(attempts) == 3


async def _dlq_is(bus, queue: str, expected: int) -> bool:
    return await bus.dlq_depth(queue) == expected


async def test_poison_message_goes_straight_to_dlq(bus_kit: BusKit) -> None:
    bus = await bus_kit.make()
    bus_kit.track("strict")
    calls: list[Event] = []

    async def handler(event: Event) -> None:
        calls.append(event)

    await bus.subscribe("strict", ["usage.recorded"], handler)
    await bus.publish_raw("usage.recorded", b'{"id": "not a uuid", "type": 3}', message_id="p-1")
    await bus.publish_raw("usage.recorded", b"\xff\xfe not even utf-8", message_id="p-2")
    await eventually(lambda: _dlq_is(bus, "strict", 2), within=3, what="two dead letters")
    letters = await bus.dead_letters("strict")
    assert [d.reason for d in letters] == ["poison", "poison"]
    assert {d.message_id for d in letters} == {"p-1", "p-2"}
    assert all(d.attempts == 1 for d in letters)  # never retried
    assert "PoisonMessage" in letters[0].error
    assert letters[1].body == b"\xff\xfe not even utf-8"
    assert calls == []
    # a good event after the poison is still handled
    await bus.publish(usage())
    await eventually(lambda: len(calls) == 1, what="the good event")


async def test_replay_moves_dead_letters_back(bus_kit: BusKit) -> None:
    bus = await bus_kit.make()
    bus_kit.track("fixable")
    fixed = False
    done: list[Event] = []

    async def handler(event: Event) -> None:
        if not fixed:
            raise RuntimeError("downstream is broken")
        done.append(event)

    await bus.subscribe("fixable", ["usage.recorded"], handler)
    events = [usage(i) for i in range(3)]
    for event in events:
        await bus.publish(event)
    await eventually(lambda: _dlq_is(bus, "fixable", 3), within=5, what="three dead letters")
    assert done == []
    fixed = True
    assert await bus.replay_dead_letters("fixable") == 3
    await eventually(lambda: len(done) == 3, what="the replayed events")
    assert sorted(e.id for e in done) == sorted(e.id for e in events)
    assert await bus.dlq_depth("fixable") == 0
    assert await bus.replay_dead_letters("fixable") == 0


async def test_replay_of_a_still_failing_message_does_not_loop(bus_kit: BusKit) -> None:
    bus = await bus_kit.make()
    bus_kit.track("stubborn")
    await bus.subscribe("stubborn", ["usage.recorded"], _noop)
    await bus.publish_raw("usage.recorded", b"garbage", message_id="g")
    await eventually(lambda: _dlq_is(bus, "stubborn", 1), within=3, what="dead letter")
    assert await bus.replay_dead_letters("stubborn") == 1  # only what was there
    await eventually(lambda: _dlq_is(bus, "stubborn", 1), within=3, what="back in the DLQ")
    [letter] = await bus.dead_letters("stubborn")
    assert letter.headers.get("x-replayed") == 1


async def test_unacked_delivery_survives_a_bus_shutdown(bus_kit: BusKit) -> None:
    """A handler still running when its process stops: the event comes back, not lost."""
    bus = await bus_kit.make()
    bus_kit.track("slow")
    started = asyncio.Event()
    got: list[Event] = []
    calls = 0

    async def handler(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await asyncio.Event().wait()  # stuck until the shutdown cancels it
        got.append(event)

    await bus.subscribe("slow", ["usage.recorded"], handler)
    event = usage(1)
    await bus.publish(event)
    await asyncio.wait_for(started.wait(), 5)
    # close (grace 0.5s, then the stuck handler is cancelled) and start again
    await bus_kit.reopen(bus, [("slow", ["usage.recorded"], handler)])
    await eventually(lambda: len(got) == 1, what="redelivery after restart")
    assert got[0].id == event.id
    assert calls == 2


async def test_prefetch_bounds_concurrent_handlers(bus_kit: BusKit) -> None:
    bus = await bus_kit.make()
    bus_kit.track("bounded")
    running = 0
    peak = 0
    done = 0

    async def handler(event: Event) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        done += 1

    await bus.subscribe("bounded", ["usage.recorded"], handler)
    for i in range(20):
        await bus.publish(usage(i))
    await eventually(lambda: done == 20, what="20 handled")
    assert 1 < peak <= bus_kit.settings.amqp_prefetch  # concurrent, but at most prefetch

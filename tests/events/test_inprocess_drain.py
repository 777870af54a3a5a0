"""InProcessBus.drain: what the local launcher waits for before it closes the services."""

from __future__ import annotations

import asyncio

from services.common.events import TRANSACTION_CREATED, USAGE_RECORDED, Event, InProcessBus


async def test_drain_waits_for_deliveries_and_the_events_they_cause():
    bus = InProcessBus()
    await bus.start()
    charged: list[str] = []
    seen: list[str] = []

    async def billing(event: Event) -> None:
        await asyncio.sleep(0.02)
        charged.append(event.id)
        await bus.publish(Event.new(TRANSACTION_CREATED, "billing", {"for": event.id}))

    async def analytics(event: Event) -> None:
        seen.append(event.type)

    await bus.subscribe("billing.usage", ["usage.recorded"], billing)
    await bus.subscribe("analytics.events", ["#"], analytics)
    for n in range(5):
        await bus.publish(Event.new(USAGE_RECORDED, "proxy", {"n": n}))
    assert await bus.drain(5.0) is True
    assert len(charged) == 5
    assert seen.count(TRANSACTION_CREATED) == 5 and seen.count(USAGE_RECORDED) == 5
    await bus.close()


async def test_drain_gives_up_at_its_bound():
    bus = InProcessBus(grace=0.1)
    await bus.start()
    release = asyncio.Event()

    async def stuck(event: Event) -> None:
        await release.wait()

    await bus.subscribe("billing.usage", ["usage.recorded"], stuck)
    await bus.publish(Event.new(USAGE_RECORDED, "proxy", {}))
    assert await bus.drain(0.3) is False
    release.set()
    assert await bus.drain(2.0) is True
    await bus.close()

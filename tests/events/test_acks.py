"""Coalesced acks: fewer ack frames, and never an ack for a delivery still at work."""

from __future__ import annotations

import asyncio

import aiormq
import pytest

from services.common.events import USAGE_RECORDED, Event, QueueSpec, amqpchannel, amqpwire
from services.common.events.acks import plan

from .conftest import BusKit, eventually, test_settings


@pytest.mark.parametrize(
    ("ready", "unsettled", "expected"),
    [
        ({1, 2, 3}, set(), (3, [])),  # all of them in one frame
        ({3}, set(), (None, [3])),  # one alone needs no "multiple"
        ({1, 2, 4, 5}, {3}, (2, [4, 5])),  # never past a delivery still at work
        ({4, 5}, {1}, (None, [4, 5])),
        ({7, 9}, {8, 10}, (None, [7, 9])),
        (set(), {1}, (None, [])),
    ],
)
def test_plan(ready: set[int], unsettled: set[int], expected: tuple) -> None:
    assert plan(ready, unsettled) == expected


@pytest.fixture
def ack_frames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every basic.ack the client sends: (delivery tag, multiple). The bus writes ack
    frames itself (``amqpwire.ack``), and through aiormq's ``basic_ack`` when it cannot."""
    sent: list[tuple[int, bool]] = []
    original = aiormq.Channel.basic_ack
    encode = amqpwire.ack

    async def spy(self, delivery_tag, multiple=False, wait=False):
        sent.append((delivery_tag, multiple))
        return await original(self, delivery_tag, multiple=multiple, wait=wait)

    def frame_spy(channel: int, delivery_tag: int, *, multiple: bool) -> bytes:
        sent.append((delivery_tag, multiple))
        return encode(channel, delivery_tag, multiple=multiple)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", spy)
    monkeypatch.setattr(amqpwire, "ack", frame_spy)
    return sent


async def test_deliveries_finishing_together_share_one_ack(
    rabbit_kit: BusKit, ack_frames: list[tuple[int, bool]]
) -> None:
    settings = test_settings(rabbit_kit.settings.events_namespace, amqp_prefetch=20)
    bus = await rabbit_kit.make([QueueSpec("acks", (USAGE_RECORDED,))], settings)
    gate = asyncio.Event()
    seen: list[str] = []

    async def handler(event: Event) -> None:
        await gate.wait()  # like a group commit: they all finish in one turn
        seen.append(event.id)

    await bus.subscribe("acks", [USAGE_RECORDED], handler)
    sent = [Event.new(USAGE_RECORDED, "test", {"n": i}) for i in range(20)]
    await asyncio.gather(*(bus.publish(e) for e in sent))
    await asyncio.sleep(0.5)  # all 20 delivered (prefetch 20) and waiting
    gate.set()
    await eventually(lambda: len(seen) == 20, what="20 handled")
    await eventually(lambda: sum(1 for _ in ack_frames) >= 1, what="acks sent")
    await asyncio.sleep(0.2)
    assert len(ack_frames) < 20 and any(multiple for _, multiple in ack_frames)
    # every delivery is settled: a new consumer gets nothing again
    again: list[str] = []

    async def record(event: Event) -> None:
        again.append(event.id)

    bus = await rabbit_kit.reopen(bus, [("acks", [USAGE_RECORDED], record)])
    await asyncio.sleep(0.8)
    assert again == []
    assert sorted(seen) == sorted(e.id for e in sent)


async def test_a_delivery_still_at_work_is_not_acked_by_a_later_multiple_ack(
    rabbit_kit: BusKit, ack_frames: list[tuple[int, bool]]
) -> None:
    bus = await rabbit_kit.make([QueueSpec("acks", (USAGE_RECORDED,))])
    done: list[int] = []
    stuck = asyncio.Event()

    async def handler(event: Event) -> None:
        if event.data["n"] == 2:
            await stuck.wait()  # never set: this one is still at work at the end
        done.append(event.data["n"])

    await bus.subscribe("acks", [USAGE_RECORDED], handler)
    for i in range(6):  # one at a time, so tags 1..6 follow n = 0..5
        await bus.publish(Event.new(USAGE_RECORDED, "test", {"n": i}))
    await eventually(lambda: len(done) == 5, what="the other five handled")
    await asyncio.sleep(0.2)
    stuck_tag = 3
    assert all(tag < stuck_tag or not multiple for tag, multiple in ack_frames)
    # the process dies with n=2 unfinished: only that one comes back
    redelivered: list[int] = []

    async def record(event: Event) -> None:
        redelivered.append(event.data["n"])

    bus = await rabbit_kit.reopen(bus, [("acks", [USAGE_RECORDED], record)])
    await eventually(lambda: redelivered == [2], what="n=2 redelivered")
    await asyncio.sleep(0.5)
    assert redelivered == [2]


async def test_without_the_channel_parts_acks_go_through_basic_ack(
    rabbit_kit: BusKit, ack_frames: list[tuple[int, bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later aiormq without a name the frame writer uses: acks still go out, each
    through aiormq's ``basic_ack``, and nothing is delivered twice."""
    monkeypatch.setattr(amqpchannel, "AIORMQ_PARTS", (*amqpchannel.AIORMQ_PARTS, "gone"))
    monkeypatch.setattr(amqpchannel, "_frame_writers", {})
    encoded: list[int] = []
    monkeypatch.setattr(amqpwire, "ack", lambda *a, **k: encoded.append(1))
    bus = await rabbit_kit.make([QueueSpec("acks", (USAGE_RECORDED,))])
    seen: list[int] = []

    async def handler(event: Event) -> None:
        seen.append(event.data["n"])

    await bus.subscribe("acks", [USAGE_RECORDED], handler)
    for i in range(5):
        await bus.publish(Event.new(USAGE_RECORDED, "test", {"n": i}))
    await eventually(lambda: len(seen) == 5, what="5 handled")
    # tag 5 is the last: acked alone or by a multiple ack, it settles every delivery
    await eventually(lambda: any(t == 5 for t, _m in ack_frames), what="every delivery acked")
    assert encoded == []
    again: list[int] = []

    async def record(event: Event) -> None:
        again.append(event.data["n"])

    bus = await rabbit_kit.reopen(bus, [("acks", [USAGE_RECORDED], record)])
    await asyncio.sleep(0.8)
    assert again == []


async def test_no_ack_frame_goes_to_a_closing_or_closed_channel(
    rabbit_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a channel is closing (its Close-Ok may be out), a frame on its number would be
    a connection error: the acks are dropped, as aiormq's basic_ack drops them (the
    broker redelivers those messages)."""
    encoded: list[int] = []
    encode = amqpwire.ack
    monkeypatch.setattr(amqpwire, "ack", lambda *a, **k: encoded.append(1) or encode(*a, **k))
    connection = await aiormq.connect(rabbit_url)
    try:
        closing = await connection.channel()
        closing._Channel__close_event.set()  # the state between Close and its Close-Ok
        assert amqpchannel.write_acks(closing, [(1, False)]) is True
        closed = await connection.channel()
        await closed.close()
        assert amqpchannel.write_acks(closed, [(1, True)]) is True
        assert encoded == []  # (an open channel's acks are encoded: the tests above)
    finally:
        await connection.close()

"""services.common.events.amqpread and .framereader: the frames aiormq would have read.

Every frame is compared with what aiormq's own ``FrameReceiver`` (pamqp underneath)
returns for the same bytes: the same classes, the same attribute values, the same
byte counts, and the same exceptions for a cut connection or a broken frame.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Any

import aiormq.connection
import pytest
from aiormq.abc import ChannelFrame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

from services.common.events import amqpread, framereader
from services.common.events.framereader import FrameReader

AiormqReceiver = framereader._Original


def fields(frame: Any) -> dict[str, Any]:
    """Everything a frame carries, nested properties included."""
    out = {"class": type(frame).__name__}
    for name, value in vars(frame).items():
        out[name] = fields(value) if isinstance(value, commands.Basic.Properties) else value
    return out


async def read_all(cls: type, data: bytes, count: int, *, started: bool = True) -> list[Any]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    receiver = cls(reader)
    receiver.started = started
    return [await receiver.get_frame() for _ in range(count)]


def wire(channel: int, *frames: Any) -> bytes:
    return ChannelFrame.marshall(channel_number=channel, frames=list(frames)).payload


def sample_frames(seed: int) -> list[Any]:
    rng = random.Random(seed)
    props: dict[str, Any] = {
        "content_type": "application/json",
        "delivery_mode": rng.choice([1, 2]),
        "message_id": f"m-{rng.randrange(10**9)}",
        "timestamp": datetime(2026, 11, 27, 0, rng.randrange(60), tzinfo=UTC),
        "message_type": "usage.recorded",
        "app_id": "proxy",
    }
    optional = {
        "headers": {"x-attempt": rng.randrange(1, 9), "x-error": "KeyError: 'é'", "n": {"a": [1]}},
        "priority": rng.randrange(10),
        "correlation_id": "c",
        "reply_to": "r",
        "expiration": "60000",
        "user_id": "guest",
        "content_encoding": "gzip",
    }
    for name in rng.sample(sorted(optional), rng.randrange(len(optional) + 1)):
        props[name] = optional[name]
    for name in rng.sample(sorted(props), rng.randrange(3)):
        del props[name]
    body = rng.randbytes(rng.choice([0, 1, 17, 400, 5000]))
    content = [ContentBody(body)] if body else []  # an empty body has no body frame
    return [
        commands.Basic.Deliver(
            consumer_tag=f"ctag-{rng.randrange(99)}",
            delivery_tag=rng.randrange(1, 2**40),
            redelivered=rng.random() < 0.5,
            exchange=rng.choice(["", "aiagg.events", "ns.x-y_z:1"]),
            routing_key=rng.choice(["", "usage.recorded", "r" * 255, "ü.ñ"]),
        ),
        ContentHeader(properties=commands.Basic.Properties(**props), body_size=len(body)),
        *content,
        commands.Basic.Ack(delivery_tag=rng.randrange(1, 2**62), multiple=rng.random() < 0.5),
    ]


@pytest.mark.parametrize("seed", range(60))
async def test_deliveries_and_confirms_read_as_aiormq_reads_them(seed: int) -> None:
    frames = sample_frames(seed)
    data = wire(seed % 7 + 1, *frames)
    ours = await read_all(FrameReader, data, len(frames))
    theirs = await read_all(AiormqReceiver, data, len(frames))
    assert [(w, c, fields(f)) for w, c, f in ours] == [(w, c, fields(f)) for w, c, f in theirs]
    assert [type(f) for _w, _c, f in ours] == [type(f) for f in frames]
    # the fast decoder took all four, pamqp none
    assert all(amqpread.decode(kind, payload) is not None for kind, payload in split(data))


def split(data: bytes) -> list[tuple[int, bytes]]:
    """(frame type, payload) of each frame in ``data``."""
    out = []
    while data:
        kind, _channel, size = amqpread.FRAME_HEAD.unpack(data[:7])
        out.append((kind, data[7 : 7 + size]))
        data = data[8 + size :]
    return out


@pytest.mark.parametrize(
    "frame",
    [
        commands.Basic.Nack(delivery_tag=5, multiple=True, requeue=False),
        commands.Queue.DeclareOk(queue="q", message_count=3, consumer_count=1),
        commands.Basic.ConsumeOk(consumer_tag="ctag"),
        commands.Channel.Close(
            reply_code=404, reply_text="NOT_FOUND - no queue 'x'", class_id=50, method_id=10
        ),
        commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="e", routing_key="k"),
        commands.Basic.Cancel(consumer_tag="ctag"),
    ],
)
async def test_other_frames_are_pamqps(frame: Any) -> None:
    data = wire(3, frame)
    assert amqpread.decode(1, data[7:-1]) is None
    [(w1, c1, ours)] = await read_all(FrameReader, data, 1)
    [(w2, c2, theirs)] = await read_all(AiormqReceiver, data, 1)
    assert (w1, c1, fields(ours)) == (w2, c2, fields(theirs))


async def test_heartbeats_and_the_protocol_header_check() -> None:
    beat = Heartbeat().marshal()
    [(w, c, frame)] = await read_all(FrameReader, beat, 1)
    assert (w, c, type(frame)) == (8, 0, Heartbeat)
    # a server that answers with a protocol header (it does not speak 0-9-1 like us)
    with pytest.raises(ProtocolSyntaxError):
        await read_all(FrameReader, ProtocolHeader().marshal(), 1, started=False)


async def test_a_cut_connection_is_aiormqs_error() -> None:
    """Cut inside a frame's head or payload: aiormq's error (its text counts bytes of
    its own reads, so inside the head the two texts differ)."""
    data = wire(1, *sample_frames(1))
    for cut in (3, 7, 20, len(data) - 1):
        errors = []
        for cls in (FrameReader, AiormqReceiver):
            with pytest.raises(AMQPConnectionError) as info:
                await read_all(cls, data[:cut], 4)
            errors.append(str(info.value))
        assert all("Server connection unexpectedly closed" in e for e in errors)
        if cut > 7:
            assert errors[0] == errors[1]


async def test_a_broken_frame_is_aiormqs_error() -> None:
    data = bytearray(wire(1, commands.Basic.Ack(delivery_tag=1)))
    data[-1] = 0  # not the frame-end byte
    for cls in (FrameReader, AiormqReceiver):
        with pytest.raises(InvalidFrameError, match="Last byte error"):
            await read_all(cls, bytes(data), 1)
    # a Deliver whose short string claims more bytes than the frame has
    deliver = bytearray(
        wire(1, commands.Basic.Deliver(consumer_tag="abc", delivery_tag=1, routing_key="k"))
    )
    deliver[7 + 4] = 200
    for cls in (FrameReader, AiormqReceiver):
        with pytest.raises(InvalidFrameError):
            await read_all(cls, bytes(deliver), 1)


async def test_at_eof_the_receiver_stops() -> None:
    for cls in (FrameReader, AiormqReceiver):
        with pytest.raises(StopAsyncIteration):
            await read_all(cls, b"", 1)


def test_install_points_aiormq_at_the_reader_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", AiormqReceiver)
    assert framereader.install() is True
    assert aiormq.connection.FrameReceiver is FrameReader
    assert framereader.install() is True  # idempotent
    # an aiormq whose receiver is something else: left alone
    other = type("OtherReceiver", (), {})
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", other)
    assert framereader.install() is False
    assert aiormq.connection.FrameReceiver is other

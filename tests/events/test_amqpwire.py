"""services.common.events.amqpwire: the publish frames are pamqp's, byte for byte."""

from __future__ import annotations

import itertools
import random
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from services.common.events import amqpwire

Properties = commands.Basic.Properties
MAX_BODY = 131072 - 8  # aiormq: frame_max minus the frame overhead


def pamqp_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    properties: Properties,
    body: bytes,
    *,
    mandatory: bool,
    max_body: int = MAX_BODY,
) -> bytes:
    """What aiormq's ``basic_publish`` writes, built the way it builds it."""
    frames: list = [
        commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    if body:
        if len(body) < max_body:
            frames.append(ContentBody(body))
        else:
            frames += [ContentBody(body[i : i + max_body]) for i in range(0, len(body), max_body)]
    return ChannelFrame.marshall(channel_number=channel, frames=frames).payload


def event_properties(**overrides: object) -> Properties:
    values: dict[str, object] = {
        "content_type": "application/json",
        "delivery_mode": 2,
        "priority": 0,
        "headers": {},
        "message_id": "0f8e4c1d2b3a49c8a1e2f3d4c5b6a798",
        "message_type": "usage.recorded",
        "timestamp": datetime(2026, 11, 26, 23, 40, 5, 123456, tzinfo=UTC),
        "app_id": "proxy",
    }
    values.update(overrides)
    return Properties(**values)


def test_an_event_publish_is_pamqps_bytes() -> None:
    props = event_properties()
    body = b'{"id": "x", "type": "usage.recorded", "data": {"tokens": 12}}'
    ours = amqpwire.publish(
        7, "aiagg.events", "usage.recorded", props, body, mandatory=True, max_body_frame=MAX_BODY
    )
    theirs = pamqp_publish(7, "aiagg.events", "usage.recorded", props, body, mandatory=True)
    assert ours == theirs
    # and pamqp reads it back as the same three frames
    rest, frames = ours, []
    while rest:
        used, channel, value = frame.unmarshal(rest)
        frames.append((channel, value))
        rest = rest[used:]
    assert [type(v).__name__ for _c, v in frames] == ["Publish", "ContentHeader", "ContentBody"]
    assert {c for c, _v in frames} == {7}
    publish, header, content = (v for _c, v in frames)
    assert (publish.exchange, publish.routing_key, publish.mandatory) == (
        "aiagg.events",
        "usage.recorded",
        True,
    )
    assert header.body_size == len(body) and content.value == body
    assert header.properties.message_id == props.message_id
    assert header.properties.timestamp == datetime(2026, 11, 26, 23, 40, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "size", [0, 1, 255, 256, MAX_BODY - 1, MAX_BODY, MAX_BODY + 1, 3 * MAX_BODY + 17]
)
def test_bodies_of_every_size_split_as_aiormq_splits_them(size: int) -> None:
    body = random.Random(size).randbytes(size)
    props = event_properties()
    ours = amqpwire.publish(1, "", "q", props, body, mandatory=False, max_body_frame=MAX_BODY)
    assert ours == pamqp_publish(1, "", "q", props, body, mandatory=False)


def test_every_property_alone_and_in_combinations() -> None:
    """Each property (cluster_id is deprecated: pamqp refuses it), absent, present, and
    the empty cases pamqp leaves out."""
    samples: dict[str, list[object]] = {
        "content_type": ["application/json", ""],
        "content_encoding": ["gzip"],
        "headers": [
            {},
            {"x-attempt": 3, "x-error": "KeyError: 'amount'", "x-original-queue": "billing"},
            {"nested": {"a": [1, "two", True, None]}, "big": 2**40, "neg": -5, "ok": False},
            {"utf8": "héllo ✓", "float": 1.5},
        ],
        "delivery_mode": [1, 2],
        "priority": [0, 9],
        "correlation_id": ["c-1"],
        "reply_to": ["amq.rabbitmq.reply-to"],
        "expiration": ["60000"],
        "message_id": ["m" * 255, "ünïcode-id"],
        "timestamp": [
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            datetime(2026, 1, 2, 3, 4, 5),  # naive: read as UTC
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            time.gmtime(1_790_000_000),
        ],
        "message_type": ["billing.charged"],
        "user_id": ["guest"],
        "app_id": ["orchestrator"],
    }
    names = list(samples)
    rng = random.Random(8)
    cases = [{}] + [{name: value} for name in names for value in samples[name]]
    for _ in range(300):
        chosen = rng.sample(names, rng.randint(2, len(names)))
        cases.append({name: rng.choice(samples[name]) for name in chosen})
    for values in cases:
        props = Properties(**values)
        ours = amqpwire.publish(
            3, "ex", "rk", props, b"{}", mandatory=True, max_body_frame=MAX_BODY
        )
        assert ours == pamqp_publish(3, "ex", "rk", props, b"{}", mandatory=True), values


@pytest.mark.parametrize(
    ("channel", "exchange", "routing_key", "mandatory"),
    list(
        itertools.product(
            [1, 2, 65535],
            ["", "aiagg.events", "ns.x-y_z:1"],
            ["", "a.b.c", "r" * 255],
            [True, False],
        )
    ),
)
def test_method_frame_fields(
    channel: int, exchange: str, routing_key: str, mandatory: bool
) -> None:
    props = event_properties()
    ours = amqpwire.publish(
        channel, exchange, routing_key, props, b"x", mandatory=mandatory, max_body_frame=MAX_BODY
    )
    assert ours == pamqp_publish(channel, exchange, routing_key, props, b"x", mandatory=mandatory)


@pytest.mark.parametrize("tag", [1, 255, 2**32 + 7, 2**63 - 1])
@pytest.mark.parametrize("multiple", [True, False])
def test_an_ack_is_pamqps_bytes(tag: int, multiple: bool) -> None:
    theirs = frame.marshal(commands.Basic.Ack(delivery_tag=tag, multiple=multiple), 9)
    assert amqpwire.ack(9, tag, multiple=multiple) == theirs


def test_a_short_string_over_255_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        amqpwire.publish(
            1, "", "k" * 256, event_properties(), b"", mandatory=True, max_body_frame=MAX_BODY
        )
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        amqpwire.shortstr("é" * 128)  # 256 bytes in UTF-8

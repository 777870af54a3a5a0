"""AMQP 0-9-1 ``basic.publish`` and ``basic.ack`` frames, encoded directly: pure, no I/O.

Why: pamqp encodes every frame generically (per attribute: a type lookup, a
validation, an encoder call), which was most of the client CPU of a confirmed publish
once the publishes of an outbox batch were written together. A publish is always the
same three frames (method, content header, body), so they are packed here with a few
``struct`` calls. The bytes are pamqp's exactly (``tests/events/test_amqpwire.py``
checks that field by field); field tables (the ``headers`` property) are still encoded by
pamqp, since copies carry nested values and events carry none.
"""

from __future__ import annotations

import calendar
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pamqp.encode import field_table

#: frame types, the frame head (type, channel, payload size) and the frame-end byte
METHOD, HEADER, BODY = 1, 2, 3
FRAME_HEAD = struct.Struct(">BHI")
FRAME_END = 0xCE
_FRAME_END = bytes((FRAME_END,))
#: class basic (60), method publish (40), reserved short (the deprecated ticket)
_PUBLISH = struct.Struct(">HHH").pack(60, 40, 0)
#: class basic, weight 0, body size, property flags
_CONTENT_HEADER = struct.Struct(">HHQH")
#: class basic (60), method ack (80), delivery tag, the ``multiple`` bit
_ACK = struct.Struct(">HHQB")
_TIMESTAMP = struct.Struct(">Q")


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return FRAME_HEAD.pack(kind, channel, len(payload)) + payload + _FRAME_END


def shortstr(value: str) -> bytes:
    """A length-prefixed UTF-8 string of at most 255 bytes (AMQP ``shortstr``)."""
    data = value.encode("utf-8")
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(data),)) + data


def _octet(value: int) -> bytes:
    return bytes((value,))


def _timestamp(value: datetime | time.struct_time) -> bytes:
    if isinstance(value, datetime):
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            value = value.replace(tzinfo=UTC)  # naive: UTC, as pamqp reads it
        return _TIMESTAMP.pack(int(value.timestamp()))
    return _TIMESTAMP.pack(calendar.timegm(value))


#: the Basic properties in wire order: (attribute, flag bit, AMQP type); the one list
#: both this encoder and :mod:`.amqpread`'s decoder follow
PROPERTIES: tuple[tuple[str, int, str], ...] = (
    ("content_type", 1 << 15, "shortstr"),
    ("content_encoding", 1 << 14, "shortstr"),
    ("headers", 1 << 13, "table"),
    ("delivery_mode", 1 << 12, "octet"),
    ("priority", 1 << 11, "octet"),
    ("correlation_id", 1 << 10, "shortstr"),
    ("reply_to", 1 << 9, "shortstr"),
    ("expiration", 1 << 8, "shortstr"),
    ("message_id", 1 << 7, "shortstr"),
    ("timestamp", 1 << 6, "timestamp"),
    ("message_type", 1 << 5, "shortstr"),
    ("user_id", 1 << 4, "shortstr"),
    ("app_id", 1 << 3, "shortstr"),
    ("cluster_id", 1 << 2, "shortstr"),
)
_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "shortstr": shortstr,
    "table": field_table,
    "octet": _octet,
    "timestamp": _timestamp,
}
_PROPERTY_ENCODERS = tuple((name, bit, _ENCODERS[kind]) for name, bit, kind in PROPERTIES)


def encode_properties(properties: Any) -> tuple[int, bytes]:
    """(property flags, property list) of a ``Basic.Properties``-like object; a
    property that is None or ``""`` is absent, as in pamqp."""
    flags = 0
    parts: list[bytes] = []
    for name, bit, encode in _PROPERTY_ENCODERS:
        value = getattr(properties, name)
        if value is not None and value != "":
            flags |= bit
            parts.append(encode(value))
    return flags, b"".join(parts)


def publish(
    channel: int,
    exchange: str,
    routing_key: str,
    properties: Any,
    body: bytes,
    *,
    mandatory: bool,
    max_body_frame: int,
) -> bytes:
    """The frames of one ``basic.publish`` on ``channel``, ready to write.

    ``max_body_frame`` is the largest body frame payload (the connection's
    ``frame_max`` minus the frame overhead): a longer body is split as aiormq splits it.
    """
    method = _PUBLISH + shortstr(exchange) + shortstr(routing_key) + _octet(1 if mandatory else 0)
    flags, props = encode_properties(properties)
    out = [
        _frame(METHOD, channel, method),
        _frame(HEADER, channel, _CONTENT_HEADER.pack(60, 0, len(body), flags) + props),
    ]
    if len(body) < max_body_frame:
        if body:
            out.append(_frame(BODY, channel, body))
    else:
        for start in range(0, len(body), max_body_frame):
            out.append(_frame(BODY, channel, body[start : start + max_body_frame]))
    return b"".join(out)


def ack(channel: int, delivery_tag: int, *, multiple: bool) -> bytes:
    """A ``basic.ack`` frame on ``channel``, ready to write."""
    return _frame(METHOD, channel, _ACK.pack(60, 80, delivery_tag, 1 if multiple else 0))


__all__ = [
    "BODY",
    "FRAME_END",
    "FRAME_HEAD",
    "HEADER",
    "METHOD",
    "PROPERTIES",
    "ack",
    "encode_properties",
    "publish",
    "shortstr",
]

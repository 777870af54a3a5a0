"""Decoding the AMQP 0-9-1 frames a consumer and a confirming publisher receive most:
pure, no I/O.

Why: aiormq reads each frame with three ``readexactly`` calls, a ``BytesIO`` and a lock,
then pamqp decodes it generically (per attribute: a type lookup and a decoder call).
A delivery is three frames (``basic.deliver``, the content header, the body) and a
confirm one (``basic.ack``); in analytics, which consumes three events per chat
request, that reading was a quarter of its Python time. :func:`decode` builds the very
objects pamqp builds for those frames, the same way (the default constructor, then the
fields), and returns None for every other frame, which pamqp then decodes as before.
``tests/events/test_amqpread.py`` compares both on generated frames.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import commands
from pamqp.body import ContentBody
from pamqp.decode import field_table, timestamp
from pamqp.header import ContentHeader

from .amqpwire import BODY, FRAME_END, FRAME_HEAD, HEADER, METHOD, PROPERTIES

_U32 = struct.Struct(">I")
_Q = struct.Struct(">q")
_DELIVER = commands.Basic.Deliver.index
_ACK = commands.Basic.Ack.index
_HEADER_FIXED = struct.Struct(">HHQH")  # class, weight, body size, first flag word

Deliver = commands.Basic.Deliver
Ack = commands.Basic.Ack
Properties = commands.Basic.Properties


def _shortstr(data: bytes, at: int) -> tuple[str, int]:
    end = at + 1 + data[at]
    if end > len(data):
        raise ValueError("short string runs past the frame")
    return data[at + 1 : end].decode("utf-8"), end


def _octet(data: bytes, at: int) -> tuple[int, int]:
    return data[at], at + 1


def _table(data: bytes, at: int) -> tuple[Any, int]:
    used, value = field_table(data[at:])
    return value, at + used


def _timestamp(data: bytes, at: int) -> tuple[Any, int]:
    used, value = timestamp(data[at : at + 8])
    return value, at + used


_DECODERS = {"shortstr": _shortstr, "table": _table, "octet": _octet, "timestamp": _timestamp}
#: :data:`.amqpwire.PROPERTIES` with each type's decoder
_PROPERTY_DECODERS = tuple((name, bit, _DECODERS[kind]) for name, bit, kind in PROPERTIES)


def _deliver(payload: bytes) -> Any:
    frame = Deliver()
    frame.consumer_tag, at = _shortstr(payload, 4)
    frame.delivery_tag = _Q.unpack_from(payload, at)[0]
    frame.redelivered = bool(payload[at + 8] & 1)
    frame.exchange, at = _shortstr(payload, at + 9)
    frame.routing_key, at = _shortstr(payload, at)
    return frame


def _ack(payload: bytes) -> Any:
    frame = Ack()
    frame.delivery_tag = _Q.unpack_from(payload, 4)[0]
    frame.multiple = bool(payload[12] & 1)
    return frame


def _content_header(payload: bytes) -> Any:
    class_id, weight, body_size, flags = _HEADER_FIXED.unpack_from(payload, 0)
    if flags & 1:
        return None  # a second flag word: no Basic property needs one; leave it to pamqp
    header = ContentHeader(weight, body_size)
    header.class_id = class_id
    props = header.properties
    at = 14
    for name, bit, read in _PROPERTY_DECODERS:
        if flags & bit:
            value, at = read(payload, at)
            setattr(props, name, value)
    return header


def decode(kind: int, payload: bytes) -> Any:
    """The pamqp frame object for a ``basic.deliver``, ``basic.ack``, content header or
    body frame's payload; None for any other frame (decode that one with pamqp).

    Raises ``ValueError`` or ``struct.error`` on a malformed payload, as pamqp does
    (before it wraps them)."""
    if kind == BODY:
        return ContentBody(payload)
    if kind == METHOD:
        index = _U32.unpack_from(payload, 0)[0]
        if index == _DELIVER:
            return _deliver(payload)
        if index == _ACK:
            return _ack(payload)
        return None
    if kind == HEADER:
        return _content_header(payload)
    return None


__all__ = ["FRAME_END", "FRAME_HEAD", "decode"]

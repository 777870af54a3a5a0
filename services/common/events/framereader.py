"""aiormq's frame receiver, with two reads per frame and :mod:`.amqpread`'s decoding.

aiormq builds a ``FrameReceiver`` for every connection from its module's global name;
:func:`install` points that name at :class:`FrameReader`, a subclass that reads a
frame's 7-byte head and then its payload with its end byte (aiormq: three reads into a
``BytesIO`` under a lock, though one task alone reads), and decodes deliveries,
content headers, bodies and confirms with :func:`.amqpread.decode`. Every other frame,
and every failure, takes aiormq's own path and gets aiormq's own exceptions, so
connection handling is unchanged. :func:`install` does nothing if aiormq's receiver is
not the one this was written for (aiormq 7: ``reader``, ``started``, ``get_frame``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.exceptions import PAMQPException

from .amqpread import FRAME_END, FRAME_HEAD, decode

log = logging.getLogger("aiagg.events")

_Original: Any = aiormq.connection.FrameReceiver


class FrameReader(_Original):  # type: ignore[misc, valid-type]
    """See the module doc."""

    async def get_frame(self) -> tuple[int, int, Any]:
        reader = self.reader
        if reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        try:
            head = await reader.readexactly(7)
            if not self.started:
                if head.startswith(b"AMQP"):
                    raise ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
            kind, channel, size = FRAME_HEAD.unpack(head)
            rest = await reader.readexactly(size + 1)
        except asyncio.IncompleteReadError as e:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(e.partial)} bytes but {e.expected} bytes expected",
            ) from e
        except ConnectionRefusedError as e:
            raise AMQPConnectionError(f"Server connection refused: {e!r}") from e
        except ConnectionResetError as e:
            raise AMQPConnectionError(f"Server connection reset: {e!r}") from e
        except ConnectionError as e:
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e
        if size and rest[-1] == FRAME_END:
            try:
                frame = decode(kind, rest[:-1])
            except (struct.error, ValueError, IndexError, UnicodeDecodeError):
                frame = None  # pamqp says what is wrong with it, below
            if frame is not None:
                return 8 + size, channel, frame
        try:
            return pamqp.frame.unmarshal(head + rest)
        except PAMQPException as e:
            raise InvalidFrameError(str(e)) from e


def install() -> bool:
    """Make aiormq read frames with :class:`FrameReader` (idempotent); False if this
    aiormq's receiver is not the expected one (then nothing changes)."""
    current = aiormq.connection.FrameReceiver
    if current is FrameReader:
        return True
    expected = current is _Original and all(
        hasattr(_Original, name) for name in ("get_frame", "__anext__", "__init__")
    )
    if not expected:
        log.info("aiormq's FrameReceiver is not the expected one: frames read by aiormq")
        return False
    aiormq.connection.FrameReceiver = FrameReader
    return True


__all__ = ["FrameReader", "install"]

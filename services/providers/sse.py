"""Server-sent events as OpenAI streams use them: ``data: <json>\\n\\n`` ... ``data: [DONE]``.

:func:`iter_sse_data` decodes a byte stream (any chunking; ``\\n``, ``\\r\\n`` or ``\\r``
line ends; comments and ``event:``/``id:`` fields ignored; multi-line data joined with
``\\n``) into the data of each event. Unlike ``StreamReader.readline`` it has no 64 KiB
line limit; an event larger than ``max_event`` bytes is an error.

:func:`iter_sse_batches` gives the same events grouped by the read that completed them.
A provider writes a burst of events at once, and a relay that passes each burst on in
one write saves the next hop a wake-up and a read per event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

__all__ = [
    "DONE",
    "SSEError",
    "encode_done",
    "encode_event",
    "iter_sse_batches",
    "iter_sse_data",
]

DONE = "[DONE]"
MAX_EVENT = 8 * 1024 * 1024


class SSEError(ValueError):
    """The stream is not valid server-sent events (or an event is too large)."""


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode_event(data: Any) -> bytes:
    """One event carrying ``data`` as JSON."""
    return f"data: {_dumps(data)}\n\n".encode()


def encode_done() -> bytes:
    return b"data: [DONE]\n\n"


async def iter_sse_data(
    chunks: AsyncIterable[bytes], *, max_event: int = MAX_EVENT
) -> AsyncIterator[str]:
    """The data of each complete event; a trailing event without its blank line is dropped
    (a stream cut mid-event did not deliver it)."""
    async for batch in iter_sse_batches(chunks, max_event=max_event):
        for data in batch:
            yield data


async def iter_sse_batches(
    chunks: AsyncIterable[bytes], *, max_event: int = MAX_EVENT
) -> AsyncIterator[list[str]]:
    """The data of the complete events, one non-empty list per read that completed any
    (as :func:`iter_sse_data`; an error comes after the events read before it)."""
    buffer = b""
    data: list[str] = []
    size = 0
    async for chunk in chunks:
        if not chunk:
            continue
        buffer += chunk
        batch: list[str] = []
        error: SSEError | None = None
        while True:
            cut = _line_end(buffer)
            if cut is None:
                if len(buffer) > max_event:
                    error = SSEError(f"an event line is longer than {max_event} bytes")
                break
            end, skip = cut
            raw = buffer[:end]
            buffer = buffer[end + skip:]
            if not raw:
                if data:
                    batch.append("\n".join(data))
                data, size = [], 0
                continue
            line = raw.decode("utf-8", errors="replace")
            if line.startswith(":"):
                continue
            field, sep, value = line.partition(":")
            if not sep:
                field, value = line, ""
            elif value.startswith(" "):
                value = value[1:]
            if field == "data":
                size += len(value)
                if size > max_event:
                    error = SSEError(f"an event is larger than {max_event} bytes")
                    break
                data.append(value)
        if batch:
            yield batch
        if error is not None:
            raise error


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """(index of the line end, its length) or None when no full line is buffered.

    A lone ``\\r`` at the very end of the buffer waits for the next chunk (it may be
    the first half of ``\\r\\n``).
    """
    n = buffer.find(b"\n")
    r = buffer.find(b"\r")
    if r == -1 or (n != -1 and n < r):
        return (n, 1) if n != -1 else None
    if r + 1 < len(buffer):
        return (r, 2) if buffer[r + 1 : r + 2] == b"\n" else (r, 1)
    return None

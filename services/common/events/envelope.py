"""The event envelope that travels on the bus, and the event type names.

Wire form (UTF-8 JSON)::

    {"id": "<uuid>", "type": "usage.recorded", "source": "proxy",
     "occurred_at": "2026-01-01T12:00:00.000000Z", "data": {...}}

``data`` is plain JSON: money goes as strings (``"0.001250"``) or integer micro-units,
never floats; the envelope refuses values JSON cannot carry (``Decimal``, ``datetime``).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..ids import uuid7

USAGE_RECORDED = "usage.recorded"
TRANSACTION_CREATED = "transaction.created"
PAYMENT_RECEIVED = "payment.received"
APIKEY_CREATED = "apikey.created"
APIKEY_REVOKED = "apikey.revoked"
ROUTE_DECIDED = "route.decided"

EVENT_TYPES: frozenset[str] = frozenset(
    {
        USAGE_RECORDED,
        TRANSACTION_CREATED,
        PAYMENT_RECEIVED,
        APIKEY_CREATED,
        APIKEY_REVOKED,
        ROUTE_DECIDED,
    }
)

_FIELDS = ("id", "type", "source", "occurred_at", "data")


class PoisonMessage(ValueError):
    """A message body that is not a valid event envelope; it is never retried."""


def _check_type(type_: str) -> None:
    # a routing key: dot-separated words, no wildcard characters
    if not type_ or any(c in type_ for c in "*# ") or any(not w for w in type_.split(".")):
        raise ValueError(f"invalid event type {type_!r}: dot-separated words, no wildcards")


def _json_copy(data: Any) -> dict[str, Any]:
    """Round-trip through JSON: proves it is JSON, and detaches it from the caller."""
    if not isinstance(data, dict):
        raise TypeError(f"event data must be a dict, not {type(data).__name__}")
    try:
        return json.loads(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"event data must be plain JSON (money as strings, times as RFC 3339 strings): {exc}"
        ) from exc


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    """One immutable event. Build new ones with :meth:`Event.new`."""

    id: str
    type: str
    source: str
    occurred_at: datetime
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.occurred_at.tzinfo is None or self.occurred_at.utcoffset() is None:
            raise ValueError("occurred_at must be timezone-aware")

    def __hash__(self) -> int:
        return hash(self.id)

    @classmethod
    def new(
        cls,
        type: str,
        source: str,
        data: dict[str, Any] | None = None,
        *,
        id: str | None = None,
        occurred_at: datetime | None = None,
    ) -> Event:
        """A fresh event: a new time-ordered UUID (:mod:`..ids`), now (UTC), and a JSON-checked
        copy of ``data``."""
        _check_type(type)
        if not source:
            raise ValueError("an event needs a source (the publishing service's name)")
        return cls(
            id=id or str(uuid7()),
            type=type,
            source=source,
            occurred_at=(occurred_at or datetime.now(UTC)).astimezone(UTC),
            data=_json_copy(data or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "source": self.source,
            "occurred_at": _format_time(self.occurred_at),
            "data": self.data,
        }

    def to_json(self) -> bytes:
        return json.dumps(
            self.to_dict(), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")

    @classmethod
    def from_json(cls, body: bytes | str) -> Event:
        """Parse a wire body; anything that is not a complete envelope is a PoisonMessage."""
        try:
            raw = json.loads(body)
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            raise PoisonMessage(f"event body is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise PoisonMessage(f"event body is a JSON {type(raw).__name__}, not an object")
        missing = [name for name in _FIELDS if name not in raw]
        if missing:
            raise PoisonMessage(f"event envelope lacks field(s): {', '.join(missing)}")
        event_id, type_, source, occurred, data = (raw[name] for name in _FIELDS)
        if not isinstance(event_id, str):
            raise PoisonMessage("event id must be a string")
        try:
            uuid.UUID(event_id)
        except ValueError as exc:
            raise PoisonMessage(f"event id {event_id!r} is not a UUID") from exc
        if not isinstance(type_, str) or not isinstance(source, str) or not type_ or not source:
            raise PoisonMessage("event type and source must be non-empty strings")
        if not isinstance(data, dict):
            raise PoisonMessage(f"event data is a JSON {type(data).__name__}, not an object")
        if not isinstance(occurred, str):
            raise PoisonMessage("occurred_at must be an RFC 3339 string")
        try:
            moment = datetime.fromisoformat(occurred)
        except ValueError as exc:
            raise PoisonMessage(f"occurred_at {occurred!r} is not RFC 3339") from exc
        if moment.tzinfo is None:
            raise PoisonMessage(f"occurred_at {occurred!r} has no UTC offset")
        return cls(
            id=event_id, type=type_, source=source, occurred_at=moment.astimezone(UTC), data=data
        )


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the outbox holds it: the wire body :meth:`Event.to_json` wrote, and
    the fields the broker message's properties carry.

    The relay publishes it as it is: parsing the body back into an :class:`Event` and
    encoding it again was CPU spent on bytes that were already exactly what goes on
    the wire (the README's benchmarks give what the relay change bought).
    """

    id: str
    type: str
    source: str
    occurred_at: datetime
    body: bytes

    def event(self) -> Event:
        return Event.from_json(self.body)


__all__ = [
    "APIKEY_CREATED",
    "APIKEY_REVOKED",
    "EVENT_TYPES",
    "PAYMENT_RECEIVED",
    "ROUTE_DECIDED",
    "TRANSACTION_CREATED",
    "USAGE_RECORDED",
    "Event",
    "PoisonMessage",
    "StoredEvent",
]

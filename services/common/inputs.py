"""Strict readers for what clients send: JSON bodies, fields, query parameters.

Each reader raises :class:`~services.common.errors.BadRequest` with a message that
names the field and says what was expected, so every bad input gets a precise 400.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from . import money
from .errors import BadRequest

__all__ = [
    "IDENTIFIER",
    "decode_cursor",
    "encode_cursor",
    "format_time",
    "optional_str",
    "parse_amount",
    "parse_limit",
    "parse_time",
    "read_json",
    "reject_unknown",
    "require_str",
    "utcnow",
    "validate_identifier",
]

#: user ids, request ids, idempotency keys: printable, no spaces, at most 128 characters
IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,127}$")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object with exact numbers (``Decimal``), or a 400."""
    body = await request.read()
    if not body.strip():
        raise BadRequest("the request body must be a JSON object")
    try:
        data = money.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, not a JSON {json_kind(data)}")
    return data


def json_kind(value: Any) -> str:
    """The JSON type of a parsed value, for error messages (``string``, ``array``...)."""
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "number"


def reject_unknown(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(
            f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def validate_identifier(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string, not a JSON {json_kind(value)}")
    if not IDENTIFIER.match(value):
        raise BadRequest(
            f"'{field}' must be 1-128 characters of letters, digits and ._:@+=/- "
            "starting with a letter or digit"
        )
    return value


def require_str(data: dict[str, Any], field: str, *, identifier: bool = True) -> str:
    if field not in data or data[field] is None:
        raise BadRequest(f"'{field}' is required")
    if identifier:
        return validate_identifier(data[field], field)
    value = data[field]
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{field}' must be a non-empty string")
    return value


def optional_str(data: dict[str, Any], field: str, *, max_length: int = 200) -> str | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string, not a JSON {json_kind(value)}")
    if len(value) > max_length:
        raise BadRequest(f"'{field}' is longer than {max_length} characters")
    return value


def parse_amount(data: dict[str, Any], field: str = "amount", *, allow_zero: bool = False) -> int:
    """A required money field as micro-units (see :func:`services.common.money.parse_amount`)."""
    if field not in data:
        raise BadRequest(f"'{field}' is required")
    try:
        return money.parse_amount(data[field], field=field, allow_zero=allow_zero)
    except money.MoneyError as exc:
        raise BadRequest(str(exc)) from None


def parse_limit(request: web.Request, *, default: int = 50, maximum: int = 500) -> int:
    raw = request.query.get("limit")
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise BadRequest(f"'limit' must be a whole number between 1 and {maximum}")
    limit = int(raw)
    if not 1 <= limit <= maximum:
        raise BadRequest(f"'limit' must be between 1 and {maximum}, got {limit}")
    return limit


def encode_cursor(position: int) -> str:
    """An opaque cursor for a position (a row sequence number)."""
    return base64.urlsafe_b64encode(json.dumps({"p": position}).encode()).decode().rstrip("=")


def decode_cursor(request: web.Request) -> int | None:
    raw = request.query.get("cursor")
    if raw is None or raw == "":
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        position = data["p"]
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise BadRequest("'cursor' is not a cursor this service handed out") from None
    return position


def parse_time(request: web.Request, field: str) -> datetime | None:
    """An RFC 3339 query parameter (with an offset) as naive UTC, or None when absent."""
    raw = request.query.get(field)
    if raw is None or raw == "":
        return None
    try:
        moment = datetime.fromisoformat(raw.strip().replace(" ", "+"))
    except ValueError:
        raise BadRequest(
            f"'{field}' must be an RFC 3339 time such as 2026-01-01T00:00:00Z, got {raw!r}"
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise BadRequest(f"'{field}' needs a UTC offset (Z or +hh:mm), got {raw!r}")
    return moment.astimezone(UTC).replace(tzinfo=None)


def utcnow() -> datetime:
    """Now as naive UTC: how every service stores times (identical on SQLite and PostgreSQL)."""
    return datetime.now(UTC).replace(tzinfo=None)


def format_time(moment: datetime | None) -> str | None:
    """A stored (naive UTC) or aware time as RFC 3339 with ``Z``."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")

"""The services' error tree: the gateway's, plus the statuses only services answer.

Every refusal a handler raises is a :class:`~gateway.errors.GatewayError` (the
project's one exception tree, also raised by the gateway's HTTP client library
that services use to call their peers). The app factory's middleware renders any
of them as ``{"error": {"type", "message", "request_id"}}`` with its status.
"""

from __future__ import annotations

from gateway.errors import BadRequest, Forbidden, GatewayError, Unauthorized

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "GatewayError",
    "InsufficientQuota",
    "NotFound",
    "Unauthorized",
]


class NotFound(GatewayError):
    status = 404
    type = "not_found"


class Conflict(GatewayError):
    status = 409
    type = "conflict"


class InsufficientQuota(GatewayError):
    """Not enough available balance (the OpenAI-style ``insufficient_quota``)."""

    status = 402
    type = "insufficient_quota"

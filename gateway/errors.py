"""One shallow exception tree; each error knows its HTTP status and JSON ``type``.

Everything the gateway (or a service using the gateway's client) refuses or fails
with is a :class:`GatewayError`; :func:`error_body` turns one into the documented
``{"error": {"type", "message", "request_id"}}`` shape in one place.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ConfigError(GatewayError):
    """A routes file that cannot be used; the message names file:line and field."""

    status = 400
    type = "invalid_config"

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class BadRequest(GatewayError):
    status = 400
    type = "bad_request"


class Unauthorized(GatewayError):
    status = 401
    type = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    type = "forbidden"


class NoRouteError(GatewayError):
    status = 404
    type = "route_not_found"


class MethodNotAllowedError(GatewayError):
    status = 405
    type = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "payload_too_large"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "headers_too_large"


class BadGateway(GatewayError):
    """The upstream could not be reached, or answered with something unusable.

    ``never_sent`` tells a caller that the request certainly did not reach the
    upstream (every attempt failed to connect), so trying elsewhere is safe.
    """

    status = 502
    type = "bad_gateway"

    def __init__(self, message: str, *, never_sent: bool = False) -> None:
        super().__init__(message)
        self.never_sent = never_sent


class ServiceUnavailable(GatewayError):
    """No healthy instance, or the breaker is open; always carries ``Retry-After``."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, kind: str | None = None) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(message, headers={"Retry-After": str(seconds)})
        self.retry_after = retry_after
        if kind:
            self.type = kind


class GatewayTimeout(GatewayError):
    status = 504
    type = "upstream_timeout"


def error_body(error: GatewayError, request_id: str | None) -> dict[str, Any]:
    return {"error": {"type": error.type, "message": error.message, "request_id": request_id}}

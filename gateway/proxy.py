"""The public request path: a thin aiohttp adapter around the pure policies.

request id → header size → route match → body size → forward-auth → upstream
call (resolve, pick, breaker, timeouts, retries) → stream the answer back →
access log and metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .accesslog import AccessLog
from .errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    HeadersTooLarge,
    MethodNotAllowedError,
    NoRouteError,
    PayloadTooLarge,
    error_body,
)
from .forwarder import StreamedBody, Upstreams
from .headers import downstream_response_headers, request_id_from, upstream_request_headers
from .metrics import RequestMetrics
from .routing import Match, MethodNotAllowed
from .runtime import Runtime

log = logging.getLogger("gateway")

BUFFER_LIMIT = 256 * 1024  # bodies up to this size are buffered, so any retry can replay them
SMALL_RESPONSE = 256 * 1024  # answers with a known length up to this size are sent in one go
_NO_BODY_STATUSES = frozenset({204, 304})


def json_error(error: GatewayError, request_id: str | None) -> web.Response:
    headers = dict(error.headers)
    if request_id:
        headers["X-Request-ID"] = request_id
    return web.Response(
        status=error.status,
        body=json.dumps(error_body(error, request_id)).encode(),
        content_type="application/json",
        headers=headers,
    )


class ProxyHandler:
    """Handles every public request. ``runtime`` is read once per request."""

    def __init__(
        self,
        get_runtime: Callable[[], Runtime],
        upstreams: Upstreams,
        *,
        access_log: AccessLog | None = None,
    ) -> None:
        self._get_runtime = get_runtime
        self._upstreams = upstreams
        self._metrics = RequestMetrics()
        self._access_log = access_log

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        request_id = request_id_from(request.headers)
        route_name, service, status, attempts, instance = "-", "-", 0, 0, None
        try:
            runtime = self._get_runtime()
            match = runtime.table.match(request.method, request.host, request.path)
            if not isinstance(match, Match):
                if isinstance(match, MethodNotAllowed):
                    allowed = ", ".join(sorted(match.allowed))
                    raise MethodNotAllowedError(
                        f"{request.method} is not allowed here; use {allowed}",
                        headers={"Allow": allowed},
                    )
                raise NoRouteError(f"no route for {request.method} {request.path}")
            route = match.rule.payload
            route_name, service = route.name, route.service
            response, attempts, instance = await self._forward(
                request, route, match, request_id, runtime.identity_headers
            )
            status = response.status
            return response
        except GatewayError as exc:
            status = exc.status
            return json_error(exc, request_id)
        except ConnectionResetError:
            # The client hung up before its answer could start: nothing to send and
            # nothing wrong with the gateway. Counted as 499 (nginx's "client closed").
            status = 499
            return web.Response(status=499)
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            elapsed = time.monotonic() - started
            self._metrics.observe(route_name, service, status, elapsed)
            if self._access_log is not None:
                self._access_log.request(
                    request_id,
                    request.remote,
                    request.method,
                    request.path,
                    route_name,
                    service,
                    instance,
                    attempts,
                    status,
                    elapsed,
                )

    async def _forward(
        self,
        request: web.BaseRequest,
        route: Any,
        match: Match,
        request_id: str,
        identity_headers: frozenset[str],
    ) -> tuple[web.StreamResponse, int, str]:
        policy = route.policy
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if header_bytes > policy.max_headers:
            raise HeadersTooLarge(
                f"request headers are {header_bytes} bytes; the limit is {policy.max_headers}"
            )
        length = request.content_length
        if length is not None and length > policy.max_body:
            raise PayloadTooLarge(f"request body is {length} bytes; the limit is {policy.max_body}")
        identity: tuple[tuple[str, str], ...] = ()
        if route.auth is not None:
            identity = await route.auth.admit(request.headers, request_id)
        headers = upstream_request_headers(
            request.headers,
            drop=identity_headers,
            client_ip=request.remote,
            proto=request.scheme,
            host=request.host,
            request_id=request_id,
        )
        for name, value in identity:
            headers[name] = value

        body, streamed = await self._body(request, length, policy.max_body)
        path_qs = match.upstream_path
        if request.query_string:
            path_qs = f"{path_qs}?{request.query_string}"
        try:
            async with self._upstreams.open(
                route.service, request.method, path_qs, headers, body, route.call
            ) as ex:
                return await self._respond(request, route, ex, request_id)
        except GatewayError:
            if streamed is not None and streamed.too_large:
                raise PayloadTooLarge(
                    f"request body exceeds the limit of {policy.max_body} bytes"
                ) from None
            raise

    async def _respond(
        self, request: web.BaseRequest, route: Any, ex: Any, request_id: str
    ) -> tuple[web.StreamResponse, int, str]:
        """Send the upstream's answer on: small ones whole, the rest streamed."""
        upstream = ex.response
        out_headers = downstream_response_headers(upstream.headers)
        out_headers["X-Request-ID"] = request_id
        known = upstream.content_length
        if (
            request.method == "HEAD"
            or upstream.status in _NO_BODY_STATUSES
            or (known is not None and known <= SMALL_RESPONSE)
        ):
            try:
                payload = await upstream.read()
            except TimeoutError:
                raise GatewayTimeout(
                    f"service {route.service!r} stopped sending its answer"
                ) from None
            except aiohttp.ClientError as exc:
                raise BadGateway(f"service {route.service!r} broke off its answer: {exc}") from None
            resp = web.Response(status=upstream.status, reason=upstream.reason, headers=out_headers)
            if payload:
                resp.body = payload
            return resp, ex.attempts, ex.instance
        resp = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=out_headers
        )
        if known is not None:
            resp.content_length = known
        await resp.prepare(request)
        try:
            async with asyncio.timeout(max(0.0, ex.deadline - time.monotonic())):
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
        except Exception as exc:  # timeout, upstream cut off, client gone
            log.warning("stream from %s ended early: %r", ex.instance, exc)
            # Headers are gone already: cutting the connection is the only honest signal.
            if request.transport is not None:
                request.transport.close()
            return resp, ex.attempts, ex.instance
        await resp.write_eof()
        return resp, ex.attempts, ex.instance

    @staticmethod
    async def _body(
        request: web.BaseRequest, length: int | None, limit: int
    ) -> tuple[bytes | StreamedBody | None, _LimitedStream | None]:
        if not request.body_exists:
            return None, None
        if length is not None and length <= BUFFER_LIMIT:
            data = await request.content.readexactly(length) if length else b""
            return data, None
        stream = _LimitedStream(request.content.iter_chunked(64 * 1024), limit)
        return StreamedBody(stream), stream


class _LimitedStream:
    """Counts bytes on their way upstream and stops at the limit (then the answer is 413)."""

    def __init__(self, chunks: AsyncIterator[bytes], limit: int) -> None:
        self._chunks = chunks
        self._limit = limit
        self.seen = 0
        self.too_large = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            self.seen += len(chunk)
            if self.seen > self._limit:
                self.too_large = True
                # Raising (not returning) makes the client cut the upstream connection,
                # so the upstream never sees a body that looks complete.
                raise PayloadTooLarge(f"request body exceeds the limit of {self._limit} bytes")
            yield chunk


class JsonErrorRequestHandler(RequestHandler):
    """Turns the HTTP parser's own errors (bad request line, huge headers) into our JSON."""

    def handle_error(self, request, status=500, exc=None, message=None):  # type: ignore[override]
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "too long" in str(exc).lower()
        ):
            error: GatewayError = HeadersTooLarge(f"request line or header too large: {exc}")
        elif isinstance(exc, BadHttpMessage) or status == 400:
            error = BadRequest(f"malformed HTTP request: {_short(exc or message)}")
        else:
            return super().handle_error(request, status, exc, message)
        self.log_debug("rejected a malformed request: %r", exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        resp = json_error(error, None)
        resp.force_close()
        return resp


def _short(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) < 200 else text[:197] + "..."


class GatewayServer(web.Server):
    """``web.Server`` whose connections answer parser errors in JSON."""

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)

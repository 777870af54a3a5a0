"""Calling a named service: resolve, pick, breaker, per-try timeout, retry.

This is the one place where the pure policies (:mod:`.retry`, :mod:`.breaker`,
:mod:`.balancer`) meet aiohttp. The public proxy and service-to-service calls
(:class:`ServiceClient`) both go through :meth:`Upstreams.open`, so a service
calling a peer gets exactly the gateway's discovery, timeout, retry and breaker
behaviour.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from .balancer import Balancer, EjectionConfig
from .breaker import BreakerConfig, BreakerOpenError, CircuitBreaker, Permit
from .clock import Clock, SystemClock
from .discovery import Resolver
from .errors import BadGateway, GatewayError, GatewayTimeout, ServiceUnavailable
from .http1 import ConnectError, ConnectionPool, UpstreamResponse
from .retry import Attempt, Outcome, RetryPolicy, parse_retry_after

log = logging.getLogger("gateway.upstream")


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """Timeouts and retries for one kind of call (a route, or a service-to-service call)."""

    connect_timeout: float = 1.0
    per_try_timeout: float = 15.0
    total_timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: the breaker to use when it is not the service's own (a route's ``service:route``)
    breaker: str | None = None


class StreamedBody:
    """A request body read from the client as it is sent upstream.

    Once its first chunk has been taken it cannot be replayed, so only a failure
    that happened before that ("never sent") may be retried.
    """

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self._chunks:
            yield chunk


Body = bytes | StreamedBody | None


def classify(exc: BaseException) -> Outcome | None:
    """Map a client exception to a retry outcome; None means "not an upstream failure"."""
    if isinstance(exc, ConnectError):
        return Outcome.connect_error()
    if isinstance(exc, TimeoutError):
        return Outcome.timeout()
    if isinstance(exc, aiohttp.ClientError | OSError):
        return Outcome.reset()
    return None


def _final_error(
    service: str, outcome: Outcome, exc: BaseException, *, sent_before: bool
) -> GatewayError:
    if outcome.kind == "timeout":
        return GatewayTimeout(f"service {service!r} did not answer in time")
    if outcome.kind == "connect-error":
        return BadGateway(
            f"could not connect to service {service!r}: {_reason(exc)}",
            never_sent=not sent_before,
        )
    return BadGateway(f"service {service!r} dropped the connection: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


@dataclass(slots=True)
class Exchange:
    """The upstream answer that the caller reads; released when the context exits."""

    response: UpstreamResponse
    instance: str
    attempts: int
    deadline: float


RetryHook = Callable[[str, str], None]


class _Opening:
    """The async context manager :meth:`Upstreams.open` returns (a plain class: cheaper
    on the hot path than ``contextlib.asynccontextmanager``)."""

    __slots__ = ("_exchange", "_sending")

    def __init__(self, sending: Awaitable[Exchange]) -> None:
        self._sending = sending
        self._exchange: Exchange | None = None

    async def __aenter__(self) -> Exchange:
        self._exchange = await self._sending
        return self._exchange

    async def __aexit__(self, *exc_info: object) -> None:
        if self._exchange is not None:
            self._exchange.response.release()


class Upstreams:
    """Breakers, balancers and the resolver for every service; survives reloads."""

    def __init__(
        self,
        resolver: Resolver,
        pool: ConnectionPool,
        *,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
        on_breaker_transition: Callable[..., None] | None = None,
        on_retry: RetryHook | None = None,
        on_failure: RetryHook | None = None,
    ) -> None:
        self.resolver = resolver
        self.pool = pool
        self.clock = clock or SystemClock()
        self._rand = rand
        self._on_transition = on_breaker_transition
        self._on_retry = on_retry
        self._on_failure = on_failure
        self._breakers: dict[str, CircuitBreaker] = {}
        self._balancers: dict[str, Balancer] = {}

    def configure(
        self, breakers: Mapping[str, BreakerConfig], ejections: Mapping[str, EjectionConfig]
    ) -> None:
        """Apply new thresholds; a service whose thresholds did not change keeps its state."""
        for name, cfg in breakers.items():
            current = self._breakers.get(name)
            if current is None or current.config != cfg:
                self._breakers[name] = CircuitBreaker(
                    name, cfg, self.clock, on_transition=self._on_transition
                )
        for name in set(self._breakers) - set(breakers):
            del self._breakers[name]
        for name, cfg in ejections.items():
            current_b = self._balancers.get(name)
            if current_b is None or current_b.config != cfg:
                self._balancers[name] = Balancer(cfg, self.clock)
        for name in set(self._balancers) - set(ejections):
            del self._balancers[name]

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]:
        return self._breakers

    @property
    def balancers(self) -> Mapping[str, Balancer]:
        return self._balancers

    def open(
        self,
        service: str,
        method: str,
        path_qs: str,
        headers: Mapping[str, str] | CIMultiDict[str],
        body: Body,
        policy: CallPolicy,
    ) -> _Opening:
        """``async with upstreams.open(...) as exchange``: send, retrying per policy.

        The final upstream answer is yielded even when it is a 5xx that was not
        retried (the caller passes it on); failures without an answer raise a
        :class:`GatewayError`. The connection is released when the block ends.
        """
        return _Opening(self._send(service, method, path_qs, headers, body, policy))

    async def _send(
        self,
        service: str,
        method: str,
        path_qs: str,
        headers: Mapping[str, str] | CIMultiDict[str],
        body: Body,
        policy: CallPolicy,
    ) -> Exchange:
        breaker = self._breakers.get(policy.breaker or service)
        balancer = self._balancers.get(service)
        if breaker is None or balancer is None:
            raise ServiceUnavailable(
                f"service {service!r} is not configured", kind="unknown_service"
            )
        clock = self.clock
        attempt: Attempt = policy.retry.start(method, clock.monotonic(), policy.total_timeout)
        tried: list[str] = []
        sent = False  # did any attempt possibly reach the upstream?
        refused: set[str] = set()
        while True:
            if attempt.delay > 0:
                await asyncio.sleep(attempt.delay)
            now = clock.monotonic()
            if attempt.expired(now):
                raise GatewayTimeout(f"service {service!r} did not answer within the deadline")
            instances = await self.resolver.resolve(service)
            if not instances:
                raise ServiceUnavailable(
                    f"no healthy instance of service {service!r}", kind="no_healthy_upstream"
                )
            try:
                permit = breaker.acquire()
            except BreakerOpenError as exc:
                raise ServiceUnavailable(
                    str(exc), retry_after=exc.retry_after, kind="circuit_open"
                ) from None
            urls = [i.url for i in instances]
            # another instance when there is one; once all were tried, any but those
            # that refused the connection in this request
            url = (
                balancer.pick(urls, exclude=tried)
                or balancer.pick(urls, exclude=refused)
                or balancer.pick(urls)
                or urls[0]
            )
            tried.append(url)
            budget = attempt.budget(now, policy.per_try_timeout)
            try:
                response = await self.pool.request(
                    url,
                    method,
                    path_qs,
                    headers,
                    body,
                    connect_timeout=min(policy.connect_timeout, budget),
                    read_timeout=budget,
                )
            except asyncio.CancelledError:
                permit.release()
                raise
            except GatewayError:
                permit.release()
                raise
            except Exception as exc:
                outcome = classify(exc)
                if outcome is None:
                    permit.release()
                    raise
                sent = sent or not outcome.never_sent
                if outcome.never_sent:
                    refused.add(url)
                self._verdict(service, breaker, permit, balancer, url, outcome)
                replayable = not (isinstance(body, StreamedBody) and body.started)
                nxt = (
                    attempt.next(outcome, clock.monotonic(), self._rand)
                    if (replayable or outcome.never_sent)
                    else None
                )
                if nxt is None:
                    raise _final_error(service, outcome, exc, sent_before=sent) from exc
                log.info(
                    "retrying %s %s on %s after %s", method, service, outcome.kind, _reason(exc)
                )
                self._retried(service, outcome.kind)
                attempt = nxt
                continue
            status = response.status
            if status < 400:
                permit.success()
                balancer.report(url, True)
                return Exchange(response, url, attempt.number, attempt.deadline)
            outcome = Outcome.response(
                status, parse_retry_after(response.headers.get("Retry-After"))
            )
            self._verdict(service, breaker, permit, balancer, url, outcome)
            if status < 500 or (isinstance(body, StreamedBody) and body.started):
                return Exchange(response, url, attempt.number, attempt.deadline)
            nxt = attempt.next(outcome, clock.monotonic(), self._rand)
            if nxt is None:
                return Exchange(response, url, attempt.number, attempt.deadline)
            sent = True
            response.release()
            self._retried(service, str(status))
            attempt = nxt

    def _verdict(
        self,
        service: str,
        breaker: CircuitBreaker,
        permit: Permit,
        balancer: Balancer,
        url: str,
        outcome: Outcome,
    ) -> None:
        """Tell the breaker and the balancer how an attempt went. What counts as a failure
        is the service's ``breaker.count`` (by default connection trouble and any 5xx)."""
        if outcome.matches(breaker.config.count):
            permit.failure()
            balancer.report(url, False)
            self._failed(service, outcome.token if outcome.status is None else "5xx")
        else:
            permit.success()
            balancer.report(url, True)

    def _retried(self, service: str, reason: str) -> None:
        if self._on_retry:
            self._on_retry(service, reason)

    def _failed(self, service: str, kind: str) -> None:
        if self._on_failure:
            self._on_failure(service, kind)


def new_connection_pool() -> ConnectionPool:
    """The one pool for all upstream traffic of a process."""
    return ConnectionPool(keepalive_timeout=30.0)


class ServiceClient:
    """Service-to-service HTTP with the gateway's discovery, breakers, retries and timeouts."""

    def __init__(
        self,
        upstreams: Upstreams,
        policy: CallPolicy | None = None,
        *,
        per_service: Mapping[str, CallPolicy] | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.policy = policy or CallPolicy()
        # an explicit policy wins over the per-service ones from routes.yaml
        self._per_service = {} if policy is not None else dict(per_service or {})

    def policy_for(self, service: str) -> CallPolicy:
        return self._per_service.get(service, self.policy)

    async def request(
        self,
        service: str,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        policy: CallPolicy | None = None,
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """Send and read the whole answer: (status, headers, body)."""
        send_headers = _caller_headers(headers)
        body: bytes | None = None
        if json_body is not None:
            body = json.dumps(json_body, default=str).encode()
            send_headers.setdefault("Content-Type", "application/json")
        async with self.upstreams.open(
            service, method, path, send_headers, body, policy or self.policy_for(service)
        ) as ex:
            return ex.response.status, ex.response.headers, await ex.response.read()

    async def close(self) -> None:
        await self.upstreams.pool.close()
        await self.upstreams.resolver.close()

    def stream(
        self,
        service: str,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        policy: CallPolicy | None = None,
    ):
        """An async context manager yielding the :class:`Exchange`, body unread."""
        return self.upstreams.open(
            service,
            method,
            path,
            _caller_headers(headers),
            body,
            policy or self.policy_for(service),
        )


_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def _caller_headers(headers: Mapping[str, str] | None) -> CIMultiDict[str]:
    """A caller's headers minus the framing ones the client writes itself."""
    return CIMultiDict((k, v) for k, v in (headers or {}).items() if k.lower() not in _FRAMING)

"""Forward-auth: ask an auth service whether a request may pass, and who it is.

The auth service is reached through the same resolver, breaker and retry
machinery as any upstream. Positive answers are cached briefly (``cache_ttl``),
keyed by a hash of the credential, so a revoked key may still pass here for at
most that long. Unreachable auth fails closed (503).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from .clock import Clock
from .config import AuthPolicySpec
from .errors import Forbidden, GatewayError, ServiceUnavailable, Unauthorized
from .forwarder import CallPolicy, Upstreams
from .retry import RetryPolicy

_AUTH_RETRY = RetryPolicy(attempts=2, backoff_initial=0.02, backoff_max=0.1)


class ForwardAuth:
    """One named policy from ``auth_policies:``."""

    def __init__(
        self, name: str, spec: AuthPolicySpec, upstreams: Upstreams, clock: Clock, metrics=None
    ) -> None:
        self.name = name
        self.spec = spec
        self._upstreams = upstreams
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, tuple[tuple[str, str], ...]]] = OrderedDict()
        self._asking: dict[bytes, asyncio.Task[tuple[tuple[str, str], ...]]] = {}
        self._policy = CallPolicy(
            connect_timeout=min(1.0, spec.timeout),
            per_try_timeout=spec.timeout,
            total_timeout=spec.timeout * 2,
            retry=_AUTH_RETRY,
        )
        self._metrics = metrics

    async def admit(
        self, headers: CIMultiDictProxy[str], request_id: str
    ) -> tuple[tuple[str, str], ...]:
        """The identity headers to set upstream; raises 401/403/503 errors."""
        credential = headers.get("Authorization")
        if not credential:
            raise Unauthorized(
                "missing credentials: send 'Authorization: Bearer <api key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = hashlib.sha256(credential.encode("utf-8", "surrogateescape")).digest()
        now = self._clock.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self._count("hit")
            return hit[1]
        # One question per credential at a time: requests arriving while it is being
        # asked wait for that answer instead of all asking (no stampede on expiry).
        pending = self._asking.get(key)
        if pending is not None:
            self._count("joined")
            return await asyncio.shield(pending)
        self._count("miss")
        pending = asyncio.get_running_loop().create_task(self._ask(credential, request_id))
        self._asking[key] = pending
        try:
            identity = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._asking.pop(key, None)
            else:  # this caller was cancelled; the question goes on for the others
                pending.add_done_callback(lambda _: self._asking.pop(key, None))
        if self.spec.cache_ttl > 0 and self.spec.cache_size > 0:
            self._cache[key] = (self._clock.monotonic() + self.spec.cache_ttl, identity)
            self._cache.move_to_end(key)
            while len(self._cache) > self.spec.cache_size:
                self._cache.popitem(last=False)
        return identity

    def clear(self) -> None:
        self._cache.clear()

    async def _ask(self, credential: str, request_id: str) -> tuple[tuple[str, str], ...]:
        send = CIMultiDict({"Authorization": credential, "X-Request-ID": request_id})
        try:
            async with self._upstreams.open(
                self.spec.service, "GET", self.spec.path, send, None, self._policy
            ) as ex:
                status = ex.response.status
                answer_headers = ex.response.headers
                body = await ex.response.read()
        except GatewayError as exc:
            raise ServiceUnavailable(
                f"cannot verify credentials: the auth service is unavailable ({exc.message})",
                retry_after=getattr(exc, "retry_after", 1.0),
                kind="auth_unavailable",
            ) from None
        if 200 <= status < 300:
            return _identity(answer_headers, self.spec.forward_headers)
        message = _message(body) or "invalid credentials"
        if status == 401:
            raise Unauthorized(message, headers={"WWW-Authenticate": "Bearer"})
        if status == 403:
            raise Forbidden(message)
        raise ServiceUnavailable(
            f"cannot verify credentials: the auth service answered {status}",
            kind="auth_unavailable",
        )

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.labels(self.name, result).inc()


def _identity(headers: Mapping[str, str], wanted: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple((name, headers[name]) for name in wanted if name in headers)


def _message(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    return None

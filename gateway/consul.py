"""A thin async client for Consul's HTTP API, on aiohttp.

Only what the platform needs: register and deregister a service with the local
agent, read a service's healthy instances with blocking queries, list the
catalog. It is ours because python-consul's asyncio client no longer imports on
Python 3.11 and py-consul's passes arguments aiohttp is removing.

Every failure (a non-2xx answer, a refused connection, a timeout, a body that is
not JSON) is one :class:`ConsulError` whose message says what to check.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "RETRY_INITIAL",
    "RETRY_MAX",
    "ConsulClient",
    "ConsulError",
    "ConsulSettings",
    "backoff_delays",
    "format_wait",
    "normalize_addr",
]

log = logging.getLogger(__name__)

#: Consul caps a blocking query's ``wait`` at 10 minutes and defaults it to 5.
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
# Retrying a failing Consul: from 0.5 s, doubling, at most 5 s apart. Consul is a local
# agent and one request per service every few seconds costs it nothing, while a long
# cap would leave the gateway on stale instances, and a service unregistered, for that
# long after the agent is back.
RETRY_INITIAL = 0.5
RETRY_MAX = 5.0


class ConsulError(Exception):
    """Consul could not be reached or refused the request; ``status`` is the HTTP code if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def normalize_addr(addr: str, *, ssl: bool = False) -> str:
    """``127.0.0.1:8500`` or ``http(s)://127.0.0.1:8500`` -> a base URL without trailing slash.

    Like Consul's own CLI, a bare ``host:port`` means ``http://`` (``https://`` when
    ``CONSUL_HTTP_SSL`` is true).
    """
    addr = addr.strip()
    if not addr:
        raise ValueError("CONSUL_HTTP_ADDR is empty")
    if "://" not in addr:
        addr = ("https://" if ssl else "http://") + addr
    parts = urlsplit(addr)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"CONSUL_HTTP_ADDR={addr!r}: use host:port or http(s)://host:port "
            f"(the {parts.scheme}:// scheme is not supported here)"
        )
    if not parts.hostname:
        raise ValueError(f"CONSUL_HTTP_ADDR={addr!r} has no host")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class ConsulSettings(BaseSettings):
    """Consul's own environment variables (the names its CLI uses)."""

    model_config = SettingsConfigDict(env_prefix="CONSUL_", extra="ignore")

    http_addr: str | None = Field(
        default=None, description="CONSUL_HTTP_ADDR; unset or empty: Consul is not used"
    )
    http_token: str | None = Field(
        default=None, description="CONSUL_HTTP_TOKEN, sent as X-Consul-Token", repr=False
    )
    http_ssl: bool = Field(default=False, description="CONSUL_HTTP_SSL: https for a bare host:port")

    @field_validator("http_addr", "http_token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("http_addr")
    @classmethod
    def _valid_addr(cls, value: str | None) -> str | None:
        if value is not None:
            normalize_addr(value)  # raises a clear ValueError
        return value

    @property
    def enabled(self) -> bool:
        return self.http_addr is not None

    @property
    def base_url(self) -> str | None:
        return normalize_addr(self.http_addr, ssl=self.http_ssl) if self.http_addr else None

    def client(self, session: aiohttp.ClientSession | None = None) -> ConsulClient:
        if not self.http_addr:
            raise ConsulError("CONSUL_HTTP_ADDR is not set: there is no Consul to talk to")
        return ConsulClient(self.http_addr, self.http_token, session, ssl=self.http_ssl)


def format_wait(seconds: float) -> str:
    """A Go duration Consul accepts: ``30s`` or ``1500ms``."""
    seconds = min(max(seconds, 0.0), MAX_WAIT)
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def backoff_delays(
    initial: float = RETRY_INITIAL, maximum: float = RETRY_MAX, factor: float = 2.0
) -> Iterator[float]:
    """Endless jittered exponential delays: each one is in [d/2, d] for d = initial*factor**n
    capped at ``maximum``, so retries spread out and a dead Consul is not hammered."""
    base = initial
    while True:
        capped = min(base, maximum)
        yield capped / 2 + random.uniform(0, capped / 2)
        base = min(base * factor, maximum)


class ConsulClient:
    """Consul's HTTP API, the few endpoints the platform uses.

    ``session`` is borrowed when given (and then left open by :meth:`close`);
    otherwise the client makes its own on first use.
    """

    def __init__(
        self,
        addr: str,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        ssl: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = normalize_addr(addr, ssl=ssl)
        self._token = token or None
        self._session = session
        self._own_session = session is None
        self._timeout = timeout
        self._warned_acl_filter: set[str] = set()

    def __repr__(self) -> str:
        return f"ConsulClient({self.base_url!r}, token={'set' if self._token else 'none'})"

    # -- agent ------------------------------------------------------------------------

    async def agent_service_register(self, payload: dict[str, Any]) -> None:
        """Register (or update) a service with the local agent."""
        await self._request("PUT", "/v1/agent/service/register", json_body=payload)

    async def agent_service_deregister(self, service_id: str) -> None:
        """Remove a service (and its checks) from the local agent."""
        await self._request("PUT", f"/v1/agent/service/deregister/{_seg(service_id)}")

    async def agent_service(self, service_id: str) -> dict[str, Any] | None:
        """The local agent's definition of one service, or None if it does not know it."""
        try:
            _, _, body = await self._request("GET", f"/v1/agent/service/{_seg(service_id)}")
        except ConsulError as exc:
            if exc.status == 404:
                return None
            raise
        return body

    async def agent_check_update(self, check_id: str, status: str, output: str = "") -> None:
        """Set a TTL check's status (``passing``, ``warning`` or ``critical``)."""
        await self._request(
            "PUT",
            f"/v1/agent/check/update/{_seg(check_id)}",
            json_body={"Status": status, "Output": output},
        )

    # -- health and catalog -------------------------------------------------------------

    async def health_service(
        self,
        name: str,
        *,
        passing: bool = True,
        tags: Iterable[str] = (),
        index: int | None = None,
        wait: float | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        """``GET /v1/health/service/<name>``: ``(X-Consul-Index, entries)``.

        With ``index`` this is a blocking query: Consul holds the answer until the
        service's index passes ``index`` or ``wait`` (plus up to wait/16 jitter) ends.
        Every tag in ``tags`` must be on an instance for it to be listed.
        """
        params: list[tuple[str, str]] = []
        if passing:
            params.append(("passing", "true"))
        params.extend(("tag", t) for t in tags)
        status, headers, body = await self._request(
            "GET",
            f"/v1/health/service/{_seg(name)}",
            params=params + self._blocking_params(index, wait),
            timeout=self._blocking_timeout(index, wait),
        )
        if headers.get("X-Consul-Results-Filtered-By-ACLs") and name not in self._warned_acl_filter:
            self._warned_acl_filter.add(name)
            log.warning(
                "consul: the ACL token hides some instances of %r: check that CONSUL_HTTP_TOKEN "
                "grants service:read and node:read",
                name,
            )
        if not isinstance(body, list):
            raise ConsulError(f"Consul answered {status} with a non-list body for {name!r}")
        return _index(headers), body

    async def catalog_services(
        self, index: int | None = None, wait: float | None = None
    ) -> tuple[int, dict[str, list[str]]]:
        """``GET /v1/catalog/services``: ``(X-Consul-Index, {name: tags})``."""
        status, headers, body = await self._request(
            "GET",
            "/v1/catalog/services",
            params=self._blocking_params(index, wait),
            timeout=self._blocking_timeout(index, wait),
        )
        if not isinstance(body, dict):
            raise ConsulError(f"Consul answered {status} with a non-object catalog")
        return _index(headers), {k: list(v or []) for k, v in body.items()}

    async def close(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None if self._own_session else self._session

    # -- plumbing -----------------------------------------------------------------------

    @staticmethod
    def _blocking_params(index: int | None, wait: float | None) -> list[tuple[str, str]]:
        if index is None:
            return []
        params = [("index", str(max(int(index), 0)))]
        if wait is not None:
            params.append(("wait", format_wait(wait)))
        return params

    def _blocking_timeout(self, index: int | None, wait: float | None) -> float:
        if not index:
            return self._timeout
        held = min(wait if wait is not None else DEFAULT_WAIT, MAX_WAIT)
        # Consul adds up to wait/16 of jitter; never give up before it has answered.
        return held + held / 16 + self._timeout

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._own_session:
                raise ConsulError("the aiohttp session given to ConsulClient is closed")
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        json_body: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the HTTP timeout, passed to aiohttp
    ) -> tuple[int, Any, Any]:
        session = self._get_session()
        headers = {"Accept": "application/json"}
        if self._token:
            headers["X-Consul-Token"] = self._token
        seconds = timeout if timeout is not None else self._timeout
        client_timeout = aiohttp.ClientTimeout(total=seconds, sock_connect=min(seconds, 5.0))
        url = self.base_url + path
        data = None
        if json_body is not None:
            data = json.dumps(json_body)
            headers["Content-Type"] = "application/json"
        try:
            async with session.request(
                method, url, params=params, data=data, headers=headers, timeout=client_timeout
            ) as resp:
                text = await resp.text()
                status, resp_headers = resp.status, resp.headers
        except TimeoutError as exc:
            raise ConsulError(
                f"Consul at {self.base_url} did not answer {method} {path} within {seconds:g}s: "
                "check that the agent is up and reachable (CONSUL_HTTP_ADDR)"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise ConsulError(
                f"cannot reach Consul at {self.base_url} ({_why(exc)}): check "
                "CONSUL_HTTP_ADDR and that the Consul agent is running"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConsulError(
                f"talking to Consul at {self.base_url} failed on {method} {path} "
                f"({type(exc).__name__}: {exc}): check that the agent is up"
            ) from exc
        if status == 403:
            raise ConsulError(
                f"Consul refused {method} {path} (403 {text.strip()[:200]}): check "
                "CONSUL_HTTP_TOKEN (the token must exist and its policy must allow this)",
                status,
            )
        if not 200 <= status < 300:
            raise ConsulError(
                f"Consul answered {status} to {method} {path}: {text.strip()[:300] or '(empty)'}",
                status,
            )
        body: Any = None
        if text.strip():
            try:
                body = json.loads(text)
            except ValueError as exc:
                raise ConsulError(
                    f"Consul answered {method} {path} with a body that is not JSON: "
                    f"{text[:120]!r}: is CONSUL_HTTP_ADDR really a Consul agent?",
                    status,
                ) from exc
        return status, resp_headers, body


def _seg(value: str) -> str:
    """One URL path segment (a service name or id), escaped."""
    if not value:
        raise ValueError("an empty service name or id")
    return quote(value, safe="")


def _index(headers: Any) -> int:
    raw = headers.get("X-Consul-Index")
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0


def _why(exc: aiohttp.ClientConnectorError) -> str:
    err = exc.os_error
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    return getattr(err, "strerror", None) or str(err or exc)

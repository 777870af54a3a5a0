"""Header rules of a proxy: hop-by-hop removal, X-Forwarded-*, request ids."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
REQUEST_ID = "X-Request-ID"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


# A random per-process prefix plus a counter: unique across processes and restarts
# without a system call per request (uuid4 reads the kernel's random pool each time).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def request_id_from(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str:
    """Accept a well-formed client request id; otherwise make one."""
    given = headers.get(REQUEST_ID)
    if given and _SAFE_ID.match(given):
        return given
    return new_request_id()


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values:
        return HOP_BY_HOP
    extra = {t.strip().lower() for v in values for t in v.split(",") if t.strip()}
    return HOP_BY_HOP | extra


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    drop: Iterable[str] = (),
    client_ip: str | None,
    proto: str,
    host: str | None,
    request_id: str,
) -> CIMultiDict[str]:
    """What to send upstream: the client's headers minus hop-by-hop, Host, Content-Length
    and ``drop`` (identity headers only the gateway may set), plus X-Forwarded-*."""
    skip = _connection_tokens(headers) | {"host", "content-length", "x-request-id"}
    skip |= {d.lower() for d in drop}
    out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in skip)
    if client_ip:
        prior = headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    out["X-Forwarded-Proto"] = proto
    if host:
        out["X-Forwarded-Host"] = host
    out[REQUEST_ID] = request_id
    return out


def downstream_response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """What to send the client from an upstream answer: minus hop-by-hop and length
    (the server recomputes framing)."""
    skip = _connection_tokens(headers) | {"content-length"}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in skip)

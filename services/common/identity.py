"""Who is calling a service.

Trust model: the gateway is the trust boundary. For routes with ``auth: api_key``
it asks the auth service ``GET /auth/validate``, strips any identity headers the
client sent, and sets ``X-User-Id``, ``X-Key-Id`` and ``X-Key-Scopes`` (comma
separated) from the answer. Services therefore *trust those headers*, which is
only safe because they bind ``127.0.0.1`` by default (``SERVICE_HOST``): whoever
exposes a service beyond the gateway must put it on a private network.

Also accepted, for service-to-service calls and operations: ``Authorization:
Bearer <MASTER_KEY>`` sent straight to a service is the admin (user ``admin``,
key ``master``, scope ``admin``), compared in constant time. A master bearer wins
over identity headers.

Admin is the scope ``admin``.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from .errors import Forbidden, Unauthorized

__all__ = [
    "ADMIN_SCOPE",
    "HEADER_KEY_ID",
    "HEADER_SCOPES",
    "HEADER_USER_ID",
    "IDENTITY_HEADERS",
    "MASTER_IDENTITY",
    "Identity",
    "MasterKey",
    "bearer_token",
    "identify",
    "require_admin",
    "require_identity",
    "require_user_or_admin",
]

HEADER_USER_ID = "X-User-Id"
HEADER_KEY_ID = "X-Key-Id"
HEADER_SCOPES = "X-Key-Scopes"
IDENTITY_HEADERS = (HEADER_USER_ID, HEADER_KEY_ID, HEADER_SCOPES)
ADMIN_SCOPE = "admin"


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    key_id: str | None = None
    scopes: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    def headers(self) -> dict[str, str]:
        """The trusted headers that carry this identity (as the gateway sets them)."""
        return {
            HEADER_USER_ID: self.user_id,
            HEADER_KEY_ID: self.key_id or "",
            HEADER_SCOPES: ",".join(sorted(self.scopes)),
        }


MASTER_IDENTITY = Identity(user_id="admin", key_id="master", scopes=frozenset({ADMIN_SCOPE}))

#: where the app factory stores the master key ("" when none is set)
MasterKey = web.AppKey("aiagg_master_key", str)
_IDENTITY = web.RequestKey("aiagg_identity", object)


def bearer_token(request: web.BaseRequest) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_master_key(presented: str | None, master_key: str | None) -> bool:
    """Constant-time comparison of a presented token with the master key."""
    if not presented or not master_key:
        return False
    return hmac.compare_digest(presented.encode(), master_key.encode())


def parse_scopes(value: str | None) -> frozenset[str]:
    return frozenset(s.strip() for s in (value or "").split(",") if s.strip())


def identify(request: web.Request) -> Identity | None:
    """The caller, or None when the request carries no identity (cached per request)."""
    if _IDENTITY in request:
        cached = request[_IDENTITY]
        return cached if isinstance(cached, Identity) else None
    identity: Identity | None = None
    if is_master_key(bearer_token(request), request.config_dict.get(MasterKey)):
        identity = MASTER_IDENTITY
    else:
        user_id = request.headers.get(HEADER_USER_ID, "").strip()
        if user_id:
            identity = Identity(
                user_id=user_id,
                key_id=request.headers.get(HEADER_KEY_ID, "").strip() or None,
                scopes=parse_scopes(request.headers.get(HEADER_SCOPES)),
            )
    request[_IDENTITY] = identity
    return identity


def require_identity(request: web.Request) -> Identity:
    identity = identify(request)
    if identity is None:
        raise Unauthorized(
            "no caller identity: call through the gateway with an API key, "
            "or send Authorization: Bearer <MASTER_KEY>"
        )
    return identity


def require_admin(request: web.Request) -> Identity:
    identity = require_identity(request)
    if not identity.is_admin:
        raise Forbidden("this endpoint needs the admin scope")
    return identity


def require_user_or_admin(request: web.Request, user_id: str) -> Identity:
    """The caller must be ``user_id`` itself or an admin (403 otherwise)."""
    identity = require_identity(request)
    if not identity.is_admin and identity.user_id != user_id:
        raise Forbidden("you can only see your own account")
    return identity

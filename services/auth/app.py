"""Auth HTTP API.

==========================  =======  ====================================================
``POST /auth/api-keys``     admin    ``{user_id, name?, scopes?}`` -> 201 with the key,
                                     shown this once
``GET /auth/api-keys``      admin    ``?user_id=&limit=&cursor=``; never the key or hash
``DELETE /auth/api-keys/{id}`` admin revoke; validate refuses the key at once
``GET /auth/validate``      -        forward-auth: ``Authorization: Bearer sk-...`` ->
                                     200 + ``X-User-Id``/``X-Key-Id``/``X-Key-Scopes``,
                                     or 401
==========================  =======  ====================================================

The gateway caches positive validate answers for its cache TTL (5 s by default), so a
revoked key may still pass *at the gateway* for at most that long; this service
refuses it from the moment the revocation commits.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from services.common.app import DB, create_service_app, json_response
from services.common.db import Database
from services.common.errors import BadRequest, NotFound, Unauthorized
from services.common.events import EventBus
from services.common.identity import (
    HEADER_KEY_ID,
    HEADER_SCOPES,
    HEADER_USER_ID,
    MASTER_IDENTITY,
    Identity,
    MasterKey,
    bearer_token,
    is_master_key,
    require_admin,
)
from services.common.inputs import (
    decode_cursor,
    encode_cursor,
    optional_str,
    parse_limit,
    read_json,
    reject_unknown,
    require_str,
    validate_identifier,
)

from . import events as auth_events
from . import store
from .settings import AuthSettings

routes = web.RouteTableDef()

_SCOPE = re.compile(r"^[a-z][a-z0-9:._-]{0,63}$")
MAX_SCOPES = 32
#: longer than any key we issue; bounds the work done for garbage tokens
MAX_TOKEN_LENGTH = 256
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="aiagg"'}


def parse_scopes(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("'scopes' must be an array of strings such as [\"admin\"]")
    if len(value) > MAX_SCOPES:
        raise BadRequest(f"'scopes' may hold at most {MAX_SCOPES} entries")
    scopes: list[str] = []
    for item in value:
        if not isinstance(item, str) or not _SCOPE.match(item):
            raise BadRequest(
                f"'scopes' entries must be lowercase words (a-z, 0-9, :._-), got {item!r}"
            )
        if item not in scopes:
            scopes.append(item)
    return tuple(scopes)


@routes.post("/auth/api-keys")
async def create_api_key(request: web.Request) -> web.Response:
    require_admin(request)
    data = await read_json(request)
    reject_unknown(data, {"user_id", "name", "scopes"})
    user_id = require_str(data, "user_id")
    name = optional_str(data, "name", max_length=200)
    scopes = parse_scopes(data.get("scopes"))
    async with request.app[DB].transaction() as session:
        key, plaintext = await store.create_key(
            session, user_id=user_id, name=name, scopes=scopes
        )
        await auth_events.key_created(session, key)
    body = {"key": plaintext, **key.to_json()}
    return json_response(body, status=201, headers={"Cache-Control": "no-store"})


@routes.get("/auth/api-keys")
async def list_api_keys(request: web.Request) -> web.Response:
    require_admin(request)
    user_id = request.query.get("user_id")
    if user_id is not None:
        validate_identifier(user_id, "user_id")
    limit = parse_limit(request, default=100)
    before = decode_cursor(request)
    async with request.app[DB].session() as session:
        keys = await store.list_keys(session, user_id=user_id, limit=limit + 1, before_seq=before)
    page, more = keys[:limit], len(keys) > limit
    return json_response(
        {
            "data": [key.to_json() for key in page],
            "next_cursor": encode_cursor(page[-1].seq) if more else None,
        }
    )


@routes.delete("/auth/api-keys/{key_id}")
async def revoke_api_key(request: web.Request) -> web.Response:
    require_admin(request)
    key_id = request.match_info["key_id"]
    async with request.app[DB].transaction() as session:
        key, revoked_now = await store.revoke_key(session, key_id)
        if key is None:
            raise NotFound(f"no API key with id {key_id!r}")
        if revoked_now:
            await auth_events.key_revoked(session, key)
    return json_response(key.to_json())


def _identity_answer(identity: Identity) -> web.Response:
    scopes = sorted(identity.scopes)
    return json_response(
        {"user_id": identity.user_id, "key_id": identity.key_id, "scopes": scopes},
        headers={
            HEADER_USER_ID: identity.user_id,
            HEADER_KEY_ID: identity.key_id or "",
            HEADER_SCOPES: ",".join(scopes),
            "Cache-Control": "no-store",
        },
    )


@routes.get("/auth/validate")
async def validate(request: web.Request) -> web.Response:
    token = bearer_token(request)
    if token is None:
        raise Unauthorized(
            "missing credentials: send 'Authorization: Bearer <api key>'",
            headers=_UNAUTHORIZED_HEADERS,
        )
    if is_master_key(token, request.app[MasterKey]):
        return _identity_answer(MASTER_IDENTITY)
    if not token.startswith(store.KEY_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        raise Unauthorized("invalid API key", headers=_UNAUTHORIZED_HEADERS)
    async with request.app[DB].session() as session:
        key = await store.find_by_key(session, token)
    if key is None:
        raise Unauthorized("invalid API key", headers=_UNAUTHORIZED_HEADERS)
    if key.revoked_at is not None:
        raise Unauthorized("this API key has been revoked", headers=_UNAUTHORIZED_HEADERS)
    identity = Identity(user_id=key.user_id, key_id=key.id, scopes=frozenset(key.scopes))
    return _identity_answer(identity)


def create_app(
    settings: AuthSettings | None = None,
    *,
    database: Database | None = None,
    bus: EventBus | None = None,
    register: bool = True,
) -> web.Application:
    return create_service_app(
        settings or AuthSettings(),
        routes=routes,
        metadata=[store.metadata],
        database=database,
        bus=bus,
        register=register,
    )

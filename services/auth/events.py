"""What the auth service publishes (through its outbox); it consumes nothing.

``apikey.created``: ``{key_id, user_id, name, scopes, hint, created_at}``
``apikey.revoked``: ``{key_id, user_id, revoked_at}``

Never the key itself nor its hash.
"""

from __future__ import annotations

from services.common import events
from services.common.db import DbSession
from services.common.inputs import format_time

from .store import ApiKey

SOURCE = "auth"


async def key_created(session: DbSession, key: ApiKey) -> events.Event:
    return await events.record(
        session,
        events.APIKEY_CREATED,
        {
            "key_id": key.id,
            "user_id": key.user_id,
            "name": key.name,
            "scopes": list(key.scopes),
            "hint": key.hint,
            "created_at": format_time(key.created_at),
        },
        source=SOURCE,
    )


async def key_revoked(session: DbSession, key: ApiKey) -> events.Event:
    return await events.record(
        session,
        events.APIKEY_REVOKED,
        {"key_id": key.id, "user_id": key.user_id, "revoked_at": format_time(key.revoked_at)},
        source=SOURCE,
    )

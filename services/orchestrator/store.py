"""The orchestrator's own table: one row per chat request, written with its event.

``chat_requests`` keeps what was decided for each request (model, the provider that
served it, every attempt, the hold and how it ended), inserted in the same
transaction as the request's ``route.decided`` outbox event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    select,
)

from services.common.db import DbSession

metadata = MetaData()

requests = Table(
    "chat_requests",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("user_id", String(128), nullable=False, index=True),
    Column("key_id", String(128), nullable=True),
    Column("model", String(200), nullable=False),
    Column("provider", String(64), nullable=True),
    Column("stream", Boolean, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("fallback", Boolean, nullable=False),
    Column("attempts", Text, nullable=False),  # JSON list
    Column("reserved_micro", BigInteger, nullable=True),
    Column("hold", String(16), nullable=True),  # released | settled | usage (left to usage)
    Column("settled_micro", BigInteger, nullable=True),
    Column("error", Text, nullable=True),  # JSON object
    Column("created_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=False),
)


@dataclass(frozen=True, slots=True)
class Decision:
    request_id: str
    user_id: str
    key_id: str | None
    model: str
    provider: str | None
    stream: bool
    outcome: str
    fallback: bool
    attempts: list[dict[str, Any]]
    reserved_micro: int | None
    hold: str | None
    settled_micro: int | None
    error: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime


#: built once; the values go as parameters
_INSERT = requests.insert()


async def insert_decision(session: DbSession, decision: Decision) -> None:
    await session.execute(
        _INSERT,
        dict(
            request_id=decision.request_id,
            user_id=decision.user_id,
            key_id=decision.key_id,
            model=decision.model,
            provider=decision.provider,
            stream=decision.stream,
            outcome=decision.outcome,
            fallback=decision.fallback,
            attempts=json.dumps(decision.attempts, separators=(",", ":")),
            reserved_micro=decision.reserved_micro,
            hold=decision.hold,
            settled_micro=decision.settled_micro,
            error=json.dumps(decision.error) if decision.error is not None else None,
            created_at=decision.created_at,
            finished_at=decision.finished_at,
        ),
    )


async def get_decision(session: DbSession, request_id: str) -> dict[str, Any] | None:
    row = (
        await session.execute(select(requests).where(requests.c.request_id == request_id))
    ).first()
    if row is None:
        return None
    data = dict(row._mapping)
    data["attempts"] = json.loads(data["attempts"])
    data["error"] = json.loads(data["error"]) if data["error"] else None
    return data

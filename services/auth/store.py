"""API keys: created once, stored only as a hash, looked up by that hash.

Why SHA-256 and not a password hash: a key is ``sk-`` plus 32 bytes from
:func:`secrets.token_urlsafe` (256 bits of entropy). Slow hashes (bcrypt, scrypt,
argon2) exist to make guessing *low-entropy* secrets expensive; guessing a 256-bit
random value is infeasible at any hash speed, so one fast SHA-256 is enough and
keeps ``GET /auth/validate`` (on every gateway cache miss) cheap. The hash is the
lookup key (a unique index); the found row's hash is then compared with the
computed one with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
    update,
)

from services.common.db import DbSession
from services.common.inputs import format_time, utcnow

metadata = MetaData()

KEY_PREFIX = "sk-"
KEY_BYTES = 32

_BIGSEQ = BigInteger().with_variant(Integer, "sqlite")

api_keys = Table(
    "api_keys",
    metadata,
    Column("seq", _BIGSEQ, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("user_id", String(128), nullable=False, index=True),
    Column("name", String(200), nullable=True),
    Column("scopes", Text, nullable=False, default=""),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("hint", String(32), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("revoked_at", DateTime, nullable=True),
    Index("ix_api_keys_user_seq", "user_id", "seq"),
)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def hint_for(key: str) -> str:
    """What a list may show of a key: its first 7 and last 4 characters."""
    return f"{key[:7]}...{key[-4:]}"


@dataclass(frozen=True)
class ApiKey:
    seq: int
    id: str
    user_id: str
    name: str | None
    scopes: tuple[str, ...]
    hint: str
    created_at: datetime
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "name": self.name,
            "scopes": list(self.scopes),
            "hint": self.hint,
            "created_at": format_time(self.created_at),
            "revoked_at": format_time(self.revoked_at),
            "active": self.revoked_at is None,
        }


def _row(row: Any) -> ApiKey:
    return ApiKey(
        seq=row.seq,
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        scopes=tuple(s for s in row.scopes.split(",") if s),
        hint=row.hint,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


async def create_key(
    session: DbSession, *, user_id: str, name: str | None, scopes: tuple[str, ...]
) -> tuple[ApiKey, str]:
    """A new key: the record and the plaintext (which is never stored)."""
    plaintext = new_key()
    record = {
        "id": "key_" + uuid.uuid4().hex,
        "user_id": user_id,
        "name": name,
        "scopes": ",".join(scopes),
        "key_hash": hash_key(plaintext),
        "hint": hint_for(plaintext),
        "created_at": utcnow(),
        "revoked_at": None,
    }
    result = await session.execute(api_keys.insert().values(**record).returning(api_keys.c.seq))
    key = ApiKey(
        seq=result.scalar_one(),
        id=record["id"],
        user_id=user_id,
        name=name,
        scopes=scopes,
        hint=record["hint"],
        created_at=record["created_at"],
        revoked_at=None,
    )
    return key, plaintext


async def find_by_key(session: DbSession, presented: str) -> ApiKey | None:
    """The active-or-revoked record of a presented key, compared in constant time."""
    digest = hash_key(presented)
    row = (
        await session.execute(select(api_keys).where(api_keys.c.key_hash == digest))
    ).first()
    if row is None or not hmac.compare_digest(row.key_hash.encode(), digest.encode()):
        return None
    return _row(row)


async def get_key(session: DbSession, key_id: str, *, for_update: bool = False) -> ApiKey | None:
    query = select(api_keys).where(api_keys.c.id == key_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return _row(row) if row else None


async def revoke_key(session: DbSession, key_id: str) -> tuple[ApiKey | None, bool]:
    """(record, revoked now?); a key already revoked keeps its first revocation time."""
    key = await get_key(session, key_id, for_update=True)
    if key is None or key.revoked_at is not None:
        return key, False
    now = utcnow()
    await session.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now))
    return replace(key, revoked_at=now), True


async def list_keys(
    session: DbSession, *, user_id: str | None, limit: int, before_seq: int | None
) -> list[ApiKey]:
    """Newest first; ``before_seq`` continues a previous page."""
    query = select(api_keys).order_by(api_keys.c.seq.desc()).limit(limit)
    if user_id is not None:
        query = query.where(api_keys.c.user_id == user_id)
    if before_seq is not None:
        query = query.where(api_keys.c.seq < before_seq)
    return [_row(row) for row in (await session.execute(query)).all()]

"""The billing ledger: accounts, ledger entries and holds, all in integer micro-units.

Tables
------
``billing_accounts``  one row per user: ``balance_micro`` (top-ups - charges) and
                      ``held_micro`` (the sum of the user's open holds)
``billing_ledger``    one row per money movement (``top_up`` +, ``charge`` -), with the
                      balance after it; ``charge_request_id`` is UNIQUE (a request is
                      charged at most once) and ``idempotency_key`` is UNIQUE (a top-up
                      is credited at most once)
``billing_holds``     reservations by ``request_id``: ``open`` -> ``settled`` (charged),
                      ``released`` (closed without charge) or ``expired`` (TTL passed)

Invariants (tested): ``balance = sum(top-ups) - sum(charges)``; ``held = sum(open
holds)``; ``available = balance - held``. A reservation succeeds only when it fits in
``available``, so reservations never make ``available`` negative. A *charge* is the
real cost of a request that already happened and is always booked in full, even when
it is larger than its hold or than the balance: the balance may then go negative
(the user owes it, and further reservations are refused until a top-up).

Concurrency: every operation that moves money first locks the user's account row
(``SELECT ... FOR UPDATE``, or for a reservation the conditional ``UPDATE`` that takes
the amount, on PostgreSQL; on SQLite the whole write transaction is ``BEGIN
IMMEDIATE``), so operations of one user are serialised and checks made after the lock
see every earlier commit. Lock order is always account, then hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
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
    bindparam,
    func,
    select,
    update,
)

from services.common import events
from services.common.db import DbSession, InsertIgnore
from services.common.errors import Conflict, InsufficientQuota, NotFound
from services.common.ids import uuid7
from services.common.inputs import format_time, utcnow
from services.common.money import CURRENCY, format_micro

log = logging.getLogger("aiagg.billing")

SOURCE = "billing"

metadata = MetaData()

_BIGSEQ = BigInteger().with_variant(Integer, "sqlite")

accounts = Table(
    "billing_accounts",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("balance_micro", BigInteger, nullable=False, default=0),
    Column("held_micro", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

ledger = Table(
    "billing_ledger",
    metadata,
    Column("seq", _BIGSEQ, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("user_id", String(128), nullable=False),
    Column("kind", String(16), nullable=False),  # top_up | charge
    Column("amount_micro", BigInteger, nullable=False),  # signed: + top-up, - charge
    Column("balance_after_micro", BigInteger, nullable=False),
    Column("request_id", String(128), nullable=True),
    Column("charge_request_id", String(128), nullable=True, unique=True),
    Column("idempotency_key", String(128), nullable=True, unique=True),
    Column("source", String(32), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Index("ix_billing_ledger_user_seq", "user_id", "seq"),
)

holds = Table(
    "billing_holds",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("user_id", String(128), nullable=False),
    Column("amount_micro", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # open | settled | released | expired
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Column("closed_at", DateTime, nullable=True),
    Index("ix_billing_holds_status_expires", "status", "expires_at"),
    Index("ix_billing_holds_user_status", "user_id", "status"),
)

OPEN, SETTLED, RELEASED, EXPIRED = "open", "settled", "released", "expired"
TOP_UP, CHARGE = "top_up", "charge"

# -- statements of the hot paths, built once (values go as parameters) ------------------

_GET_ACCOUNT = select(accounts).where(accounts.c.user_id == bindparam("p_user"))
_LOCK_ACCOUNT = _GET_ACCOUNT.with_for_update()
_CREATE_ACCOUNT = InsertIgnore(accounts, "user_id")
_MOVE = (
    update(accounts)
    .where(accounts.c.user_id == bindparam("p_user"))
    .values(
        balance_micro=accounts.c.balance_micro + bindparam("p_balance"),
        held_micro=accounts.c.held_micro + bindparam("p_held"),
        updated_at=bindparam("p_now"),
    )
    .returning(accounts.c.balance_micro, accounts.c.held_micro)
)
#: take a hold only if it fits in what is available: the check and the move are one
#: statement, which also locks the account row (PostgreSQL)
_TAKE_IF_AVAILABLE = (
    update(accounts)
    .where(
        accounts.c.user_id == bindparam("p_user"),
        accounts.c.balance_micro - accounts.c.held_micro >= bindparam("p_amount"),
    )
    .values(held_micro=accounts.c.held_micro + bindparam("p_amount"), updated_at=bindparam("p_now"))
    .returning(accounts.c.balance_micro)
)
_INSERT_ENTRY = ledger.insert().returning(ledger.c.seq)
_FIND_CHARGE = select(ledger).where(ledger.c.charge_request_id == bindparam("p_request"))
_GET_HOLD = select(holds).where(holds.c.request_id == bindparam("p_request"))
_LOCK_HOLD = _GET_HOLD.with_for_update()
_CLOSE_HOLD = (
    update(holds)
    .where(holds.c.request_id == bindparam("p_request"))
    .values(status=bindparam("p_status"), closed_at=bindparam("p_closed"))
)
_INSERT_HOLD = InsertIgnore(holds, "request_id")


# -- values -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    user_id: str
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "balance": format_micro(self.balance),
            "held": format_micro(self.held),
            "available": format_micro(self.available),
            "currency": CURRENCY,
        }


@dataclass(frozen=True)
class Entry:
    seq: int
    id: str
    user_id: str
    kind: str
    amount: int
    balance_after: int
    request_id: str | None
    idempotency_key: str | None
    source: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "type": self.kind,
            "amount": format_micro(self.amount),
            "balance_after": format_micro(self.balance_after),
            "currency": CURRENCY,
            "request_id": self.request_id,
            "idempotency_key": self.idempotency_key,
            "source": self.source,
            "created_at": format_time(self.created_at),
        }

    def event_data(self) -> dict[str, Any]:
        data = self.to_json()
        data["transaction_id"] = data.pop("id")
        return data


@dataclass(frozen=True)
class Hold:
    request_id: str
    user_id: str
    amount: int
    status: str
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "amount": format_micro(self.amount),
            "currency": CURRENCY,
            "status": self.status,
            "created_at": format_time(self.created_at),
            "expires_at": format_time(self.expires_at),
            "closed_at": format_time(self.closed_at),
        }


def _entry(row: Any) -> Entry:
    return Entry(
        seq=row.seq,
        id=row.id,
        user_id=row.user_id,
        kind=row.kind,
        amount=row.amount_micro,
        balance_after=row.balance_after_micro,
        request_id=row.request_id,
        idempotency_key=row.idempotency_key,
        source=row.source,
        created_at=row.created_at,
    )


def _hold(row: Any) -> Hold:
    return Hold(
        request_id=row.request_id,
        user_id=row.user_id,
        amount=row.amount_micro,
        status=row.status,
        created_at=row.created_at,
        expires_at=row.expires_at,
        closed_at=row.closed_at,
    )


# -- accounts ---------------------------------------------------------------------------


async def get_account(session: DbSession, user_id: str) -> Account | None:
    row = (await session.execute(_GET_ACCOUNT, {"p_user": user_id})).first()
    return Account(row.user_id, row.balance_micro, row.held_micro) if row else None


async def _lock_account(session: DbSession, user_id: str) -> Account | None:
    row = (await session.execute(_LOCK_ACCOUNT, {"p_user": user_id})).first()
    return Account(row.user_id, row.balance_micro, row.held_micro) if row else None


async def _ensure_account(session: DbSession, user_id: str) -> Account:
    """Create the account if missing (race-free), then lock it."""
    account = await _lock_account(session, user_id)  # the usual case: it exists
    if account is not None:
        return account
    now = utcnow()
    await _CREATE_ACCOUNT.run(
        session,
        {
            "user_id": user_id,
            "balance_micro": 0,
            "held_micro": 0,
            "created_at": now,
            "updated_at": now,
        },
    )
    account = await _lock_account(session, user_id)
    assert account is not None
    return account


async def _move(session: DbSession, user_id: str, *, balance: int = 0, held: int = 0) -> Account:
    params = {"p_user": user_id, "p_balance": balance, "p_held": held, "p_now": utcnow()}
    row = (await session.execute(_MOVE, params)).one()
    return Account(user_id, row.balance_micro, row.held_micro)


async def _add_entry(
    session: DbSession,
    *,
    user_id: str,
    kind: str,
    amount: int,
    balance_after: int,
    source: str,
    request_id: str | None = None,
    idempotency_key: str | None = None,
) -> Entry:
    values = {
        "id": "txn_" + uuid7().hex,
        "user_id": user_id,
        "kind": kind,
        "amount_micro": amount,
        "balance_after_micro": balance_after,
        "request_id": request_id,
        "charge_request_id": request_id if kind == CHARGE else None,
        "idempotency_key": idempotency_key,
        "source": source,
        "created_at": utcnow(),
    }
    seq = (await session.execute(_INSERT_ENTRY, values)).scalar_one()
    entry = Entry(
        seq=seq,
        id=values["id"],
        user_id=user_id,
        kind=kind,
        amount=amount,
        balance_after=balance_after,
        request_id=request_id,
        idempotency_key=idempotency_key,
        source=source,
        created_at=values["created_at"],
    )
    await events.record(session, events.TRANSACTION_CREATED, entry.event_data(), source=SOURCE)
    return entry


# -- top-ups ----------------------------------------------------------------------------


def top_up_body(entry: Entry) -> dict[str, Any]:
    """The answer of a top-up; rebuilt identically from the ledger for a repeat."""
    return {
        "transaction_id": entry.id,
        "user_id": entry.user_id,
        "amount": format_micro(entry.amount),
        "balance": format_micro(entry.balance_after),
        "currency": CURRENCY,
        "idempotency_key": entry.idempotency_key,
        "created_at": format_time(entry.created_at),
    }


async def find_top_up(session: DbSession, idempotency_key: str) -> Entry | None:
    row = (
        await session.execute(select(ledger).where(ledger.c.idempotency_key == idempotency_key))
    ).first()
    return _entry(row) if row else None


async def top_up(
    session: DbSession, *, user_id: str, amount: int, idempotency_key: str
) -> tuple[Entry, bool]:
    """Credit once per idempotency key: (entry, created?). 409 when the key was used
    for a different top-up."""
    previous = await find_top_up(session, idempotency_key)
    if previous is None:
        await _ensure_account(session, user_id)
        # the key may have been used while we waited for the lock
        previous = await find_top_up(session, idempotency_key)
    if previous is not None:
        if previous.user_id != user_id or previous.amount != amount:
            raise Conflict(
                f"idempotency_key {idempotency_key!r} was already used for a different top-up "
                f"({format_micro(previous.amount)} {CURRENCY} for user {previous.user_id!r})"
            )
        return previous, False
    account = await _move(session, user_id, balance=amount)
    entry = await _add_entry(
        session,
        user_id=user_id,
        kind=TOP_UP,
        amount=amount,
        balance_after=account.balance,
        source="top_up",
        idempotency_key=idempotency_key,
    )
    await events.record(
        session,
        events.PAYMENT_RECEIVED,
        {
            "transaction_id": entry.id,
            "user_id": user_id,
            "amount": format_micro(amount),
            "currency": CURRENCY,
            "balance_after": format_micro(account.balance),
            "idempotency_key": idempotency_key,
        },
        source=SOURCE,
    )
    return entry, True


# -- charges ----------------------------------------------------------------------------


async def find_charge(session: DbSession, request_id: str) -> Entry | None:
    row = (await session.execute(_FIND_CHARGE, {"p_request": request_id})).first()
    return _entry(row) if row else None


async def charge(
    session: DbSession, *, request_id: str, user_id: str, amount: int, source: str
) -> tuple[Entry, bool]:
    """Charge ``amount`` for ``request_id`` exactly once and close its open hold.

    Used by both settle and the ``usage.recorded`` consumer: whichever runs first
    books the charge; the other finds it and changes nothing. Returns (entry, created?).
    """
    await _ensure_account(session, user_id)  # serialises every money move of this user
    existing = await find_charge(session, request_id)
    if existing is not None:
        return existing, False
    hold_row = (await session.execute(_LOCK_HOLD, {"p_request": request_id})).first()
    held_delta = 0
    if hold_row is not None:
        if hold_row.user_id != user_id:
            raise Conflict(
                f"request {request_id!r} was reserved for another user than {user_id!r}"
            )
        if hold_row.status == OPEN:
            held_delta = -hold_row.amount_micro
        closed = hold_row.closed_at if hold_row.status != OPEN else utcnow()
        await session.execute(
            _CLOSE_HOLD, {"p_request": request_id, "p_status": SETTLED, "p_closed": closed}
        )
    account = await _move(session, user_id, balance=-amount, held=held_delta)
    if account.balance < 0:
        log.warning(
            "charge %s for request %s overdraws user %s: balance %s",
            format_micro(amount), request_id, user_id, format_micro(account.balance),
        )
    entry = await _add_entry(
        session,
        user_id=user_id,
        kind=CHARGE,
        amount=-amount,
        balance_after=account.balance,
        source=source,
        request_id=request_id,
    )
    return entry, True


# -- holds ------------------------------------------------------------------------------


async def get_hold(session: DbSession, request_id: str) -> Hold | None:
    row = (await session.execute(_GET_HOLD, {"p_request": request_id})).first()
    return _hold(row) if row else None


async def _expire_user_holds(session: DbSession, user_id: str, now: datetime) -> int:
    """Expire this user's open holds past their TTL (account row already locked)."""
    rows = (
        await session.execute(
            select(holds.c.request_id, holds.c.amount_micro).where(
                holds.c.user_id == user_id, holds.c.status == OPEN, holds.c.expires_at <= now
            )
        )
    ).all()
    if not rows:
        return 0
    await session.execute(
        update(holds)
        .where(holds.c.request_id.in_([r.request_id for r in rows]), holds.c.status == OPEN)
        .values(status=EXPIRED, closed_at=now)
    )
    await _move(session, user_id, held=-sum(r.amount_micro for r in rows))
    log.info("expired %d hold(s) of user %s", len(rows), user_id)
    return len(rows)


async def reserve(
    session: DbSession, *, request_id: str, user_id: str, amount: int, ttl: float
) -> tuple[Hold, bool]:
    """Hold ``amount`` of the user's available balance: (hold, created?).

    Idempotent by ``request_id``: the same reservation again returns the existing hold;
    a different one under the same id is a 409. 402 when it does not fit.

    The usual case, a new request that fits, is three statements: a conditional
    UPDATE that checks and takes the amount at once (and locks the account), the
    hold's INSERT, and the check that the request is not charged already. Anything
    else (no account, not enough available, a repeated id) goes the careful way.
    """
    now = utcnow()
    taken = await session.execute(
        _TAKE_IF_AVAILABLE, {"p_user": user_id, "p_amount": amount, "p_now": now}
    )
    if taken.first() is not None:
        hold = _new_hold(request_id, user_id, amount, now, ttl)
        if await _INSERT_HOLD.run(session, _hold_values(hold)):
            if await find_charge(session, request_id) is not None:
                raise Conflict(f"request {request_id!r} is already charged")
            return hold, True
        # the id already holds something: give the amount back, then answer as below
        await _move(session, user_id, held=-amount)
    return await _reserve_carefully(
        session, request_id=request_id, user_id=user_id, amount=amount, ttl=ttl
    )


def _new_hold(request_id: str, user_id: str, amount: int, now: datetime, ttl: float) -> Hold:
    return Hold(
        request_id=request_id,
        user_id=user_id,
        amount=amount,
        status=OPEN,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl),
        closed_at=None,
    )


def _hold_values(hold: Hold) -> dict[str, Any]:
    return {
        "request_id": hold.request_id,
        "user_id": hold.user_id,
        "amount_micro": hold.amount,
        "status": hold.status,
        "created_at": hold.created_at,
        "expires_at": hold.expires_at,
        "closed_at": hold.closed_at,
    }


async def _reserve_carefully(
    session: DbSession, *, request_id: str, user_id: str, amount: int, ttl: float
) -> tuple[Hold, bool]:
    """:func:`reserve` when the fast path did not apply: lock, look, expire, decide."""
    account = await _lock_account(session, user_id)
    existing = await get_hold(session, request_id)
    if existing is not None:
        if existing.user_id != user_id or existing.amount != amount:
            raise Conflict(
                f"request_id {request_id!r} already holds {format_micro(existing.amount)} "
                f"{CURRENCY} for user {existing.user_id!r}"
            )
        return existing, False
    if account is None:
        raise InsufficientQuota(f"user {user_id!r} has no balance yet (no top-up so far)")
    if await find_charge(session, request_id) is not None:
        raise Conflict(f"request {request_id!r} is already charged")
    now = utcnow()
    if await _expire_user_holds(session, user_id, now):
        account = await get_account(session, user_id)
        assert account is not None
    if account.available < amount:
        raise InsufficientQuota(
            f"insufficient balance: {format_micro(max(account.available, 0))} {CURRENCY} "
            f"available, {format_micro(amount)} {CURRENCY} needed"
        )
    # conditional as well as locked: never over-reserve even if a lock were missing
    result = await session.execute(
        update(accounts)
        .where(
            accounts.c.user_id == user_id,
            accounts.c.balance_micro - accounts.c.held_micro >= amount,
        )
        .values(held_micro=accounts.c.held_micro + amount, updated_at=now)
    )
    if result.rowcount != 1:
        raise InsufficientQuota("insufficient balance")
    hold = _new_hold(request_id, user_id, amount, now, ttl)
    await session.execute(holds.insert(), _hold_values(hold))
    return hold, True


async def release(session: DbSession, request_id: str) -> Hold:
    """Close a hold without charge; a hold already closed is returned unchanged."""
    hold = await get_hold(session, request_id)
    if hold is None:
        raise NotFound(f"no reservation for request_id {request_id!r}")
    if hold.status != OPEN:
        return hold
    await _lock_account(session, hold.user_id)
    row = (
        await session.execute(
            select(holds).where(holds.c.request_id == request_id).with_for_update()
        )
    ).one()
    if row.status != OPEN:  # closed while we waited for the lock
        return _hold(row)
    now = utcnow()
    await session.execute(
        update(holds).where(holds.c.request_id == request_id).values(status=RELEASED, closed_at=now)
    )
    await _move(session, hold.user_id, held=-hold.amount)
    return replace(hold, status=RELEASED, closed_at=now)


async def settle(session: DbSession, request_id: str, amount: int) -> tuple[Hold, Entry, bool]:
    """Charge the actual cost of a reserved request (once) and close its hold."""
    hold = await get_hold(session, request_id)
    if hold is None:
        raise NotFound(f"no reservation for request_id {request_id!r}")
    entry, created = await charge(
        session, request_id=request_id, user_id=hold.user_id, amount=amount, source="settle"
    )
    closed = await get_hold(session, request_id)
    assert closed is not None
    return closed, entry, created


async def expire_holds(session: DbSession, *, limit_users: int = 100) -> int:
    """The sweeper's step: expire open holds past their TTL, user by user."""
    now = utcnow()
    users = (
        await session.execute(
            select(holds.c.user_id)
            .where(holds.c.status == OPEN, holds.c.expires_at <= now)
            .group_by(holds.c.user_id)
            .order_by(holds.c.user_id)  # one lock order for concurrent sweepers
            .limit(limit_users)
        )
    ).scalars().all()
    expired = 0
    for user_id in users:
        await _lock_account(session, user_id)
        expired += await _expire_user_holds(session, user_id, now)
    return expired


# -- reads ------------------------------------------------------------------------------


async def list_entries(
    session: DbSession, user_id: str, *, limit: int, before_seq: int | None
) -> list[Entry]:
    query = (
        select(ledger)
        .where(ledger.c.user_id == user_id)
        .order_by(ledger.c.seq.desc())
        .limit(limit)
    )
    if before_seq is not None:
        query = query.where(ledger.c.seq < before_seq)
    return [_entry(row) for row in (await session.execute(query)).all()]


async def totals(session: DbSession, user_id: str) -> dict[str, int]:
    """Sums straight from the ledger and the holds (for checks and tests)."""
    top_ups = (
        await session.execute(
            select(func.coalesce(func.sum(ledger.c.amount_micro), 0)).where(
                ledger.c.user_id == user_id, ledger.c.kind == TOP_UP
            )
        )
    ).scalar_one()
    charges = (
        await session.execute(
            select(func.coalesce(func.sum(-ledger.c.amount_micro), 0)).where(
                ledger.c.user_id == user_id, ledger.c.kind == CHARGE
            )
        )
    ).scalar_one()
    open_holds = (
        await session.execute(
            select(func.coalesce(func.sum(holds.c.amount_micro), 0)).where(
                holds.c.user_id == user_id, holds.c.status == OPEN
            )
        )
    ).scalar_one()
    return {"top_ups": int(top_ups), "charges": int(charges), "open_holds": int(open_holds)}

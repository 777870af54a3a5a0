"""Billing HTTP API. Amounts are decimal strings (``"10.00"``), at most 6 decimals.

Public (through the gateway):

=====================================  ==============  ===================================
``GET /billing/balance/{user_id}``     own or admin    ``{user_id, balance, held,
                                                       available, currency}``; 404 unknown
``POST /billing/top-up``               admin           ``{user_id, amount,
                                                       idempotency_key}`` -> 201 (the
                                                       key may come as the
                                                       ``Idempotency-Key`` header)
``GET /billing/transactions/{user_id}`` own or admin   ``?limit=&cursor=``, newest first
=====================================  ==============  ===================================

Internal (for the orchestrator; not routed by the gateway; admin = master bearer):

=================================================  =========================================
``POST /internal/billing/reservations``            ``{request_id, user_id, amount}`` -> 201
                                                   hold (200 for the same one again), 402
                                                   ``insufficient_quota``, 409 reused id
``POST /internal/billing/reservations/{id}/settle`` ``{amount}``: charge once, close the hold
``POST /internal/billing/reservations/{id}/release`` close without charge
``GET /internal/billing/reservations/{id}``         the hold
=================================================  =========================================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from sqlalchemy.exc import IntegrityError

from services.common.app import DB, SETTINGS, Subscription, create_service_app, json_response
from services.common.db import Database
from services.common.errors import BadRequest, Conflict, NotFound
from services.common.events import EventBus
from services.common.identity import require_admin, require_user_or_admin
from services.common.inputs import (
    decode_cursor,
    encode_cursor,
    parse_amount,
    parse_limit,
    read_json,
    reject_unknown,
    require_str,
    validate_identifier,
)

from . import store
from .events import USAGE_BINDINGS, USAGE_QUEUE, on_usage_recorded
from .settings import BillingSettings

log = logging.getLogger("aiagg.billing")

routes = web.RouteTableDef()

#: the header payment APIs take an idempotency key in (an alternative to the body field)
IDEMPOTENCY_HEADER = "Idempotency-Key"

T = TypeVar("T")


async def _retrying(db: Database, work: Callable[..., Awaitable[T]], what: str) -> T:
    """Run ``work(session)`` in a (group-committed) write transaction, again when a
    concurrent writer won a unique-key race (PostgreSQL); the retry sees the winner's row."""
    for attempt in range(3):
        try:
            return await db.writes.run(work)
        except IntegrityError:
            if attempt == 2:
                raise Conflict(f"{what} conflicts with a concurrent request; retry") from None
            await asyncio.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


def _user_id(request: web.Request) -> str:
    return validate_identifier(request.match_info["user_id"], "user_id")


@routes.get("/billing/balance/{user_id}")
async def balance(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    require_user_or_admin(request, user_id)
    async with request.app[DB].session() as session:
        account = await store.get_account(session, user_id)
    if account is None:
        raise NotFound(f"no billing account for user {user_id!r}")
    return json_response(account.to_json())


def _idempotency_key(request: web.Request, data: dict) -> str:
    """The top-up's key: ``idempotency_key`` in the body, or the ``Idempotency-Key``
    header that payment APIs use (a quoted value, as the IETF draft writes it, is
    unquoted). Both may be sent only if they agree."""
    header = request.headers.get(IDEMPOTENCY_HEADER)
    if header is not None:
        header = header.strip()
        if len(header) >= 2 and header[0] == header[-1] == '"':
            header = header[1:-1]
        header = validate_identifier(header, IDEMPOTENCY_HEADER)
    if data.get("idempotency_key") is None:
        if header is None:
            raise BadRequest(
                f"'idempotency_key' is required: send it in the body or as the "
                f"{IDEMPOTENCY_HEADER} header, and repeat it when you retry"
            )
        return header
    key = require_str(data, "idempotency_key")
    if header is not None and header != key:
        raise BadRequest(
            f"the {IDEMPOTENCY_HEADER} header ({header!r}) and 'idempotency_key' ({key!r}) "
            "differ; send one of them"
        )
    return key


@routes.post("/billing/top-up")
async def top_up(request: web.Request) -> web.Response:
    require_admin(request)
    data = await read_json(request)
    reject_unknown(data, {"user_id", "amount", "idempotency_key"})
    user_id = require_str(data, "user_id")
    amount = parse_amount(data, "amount")
    key = _idempotency_key(request, data)

    async def work(session):
        return await store.top_up(session, user_id=user_id, amount=amount, idempotency_key=key)

    entry, created = await _retrying(request.app[DB], work, "this top-up")
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return json_response(store.top_up_body(entry), status=201, headers=headers)


@routes.get("/billing/transactions/{user_id}")
async def transactions(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    require_user_or_admin(request, user_id)
    limit = parse_limit(request)
    before = decode_cursor(request)
    async with request.app[DB].session() as session:
        if await store.get_account(session, user_id) is None:
            raise NotFound(f"no billing account for user {user_id!r}")
        entries = await store.list_entries(session, user_id, limit=limit + 1, before_seq=before)
    page, more = entries[:limit], len(entries) > limit
    return json_response(
        {
            "data": [entry.to_json() for entry in page],
            "next_cursor": encode_cursor(page[-1].seq) if more else None,
        }
    )


# -- internal: reservations -----------------------------------------------------------


@routes.post("/internal/billing/reservations")
async def reserve(request: web.Request) -> web.Response:
    require_admin(request)
    data = await read_json(request)
    request_id = require_str(data, "request_id")
    user_id = require_str(data, "user_id")
    amount = parse_amount(data, "amount")
    ttl = request.app[SETTINGS].hold_ttl  # type: ignore[attr-defined]

    async def work(session):
        return await store.reserve(
            session, request_id=request_id, user_id=user_id, amount=amount, ttl=ttl
        )

    hold, created = await _retrying(request.app[DB], work, "this reservation")
    return json_response(hold.to_json(), status=201 if created else 200)


def _request_id(request: web.Request) -> str:
    return validate_identifier(request.match_info["request_id"], "request_id")


@routes.get("/internal/billing/reservations/{request_id}")
async def get_reservation(request: web.Request) -> web.Response:
    require_admin(request)
    request_id = _request_id(request)
    async with request.app[DB].session() as session:
        hold = await store.get_hold(session, request_id)
    if hold is None:
        raise NotFound(f"no reservation for request_id {request_id!r}")
    return json_response(hold.to_json())


@routes.post("/internal/billing/reservations/{request_id}/settle")
async def settle(request: web.Request) -> web.Response:
    require_admin(request)
    request_id = _request_id(request)
    data = await read_json(request)
    amount = parse_amount(data, "amount", allow_zero=True)

    async def work(session):
        return await store.settle(session, request_id, amount)

    hold, entry, created = await _retrying(request.app[DB], work, "this settlement")
    return json_response(
        {**hold.to_json(), "charge": entry.to_json(), "already_charged": not created}
    )


@routes.post("/internal/billing/reservations/{request_id}/release")
async def release(request: web.Request) -> web.Response:
    require_admin(request)
    request_id = _request_id(request)

    async def work(session):
        return await store.release(session, request_id)

    hold = await _retrying(request.app[DB], work, "this release")
    return json_response(hold.to_json())


# -- background: expire holds ----------------------------------------------------------


async def sweep_expired_holds(app: web.Application) -> None:
    settings: BillingSettings = app[SETTINGS]  # type: ignore[assignment]
    while True:
        await asyncio.sleep(settings.sweep_interval)
        try:
            async with app[DB].transaction() as session:
                expired = await store.expire_holds(session)
            if expired:
                log.info("released %d expired hold(s)", expired)
        except Exception:
            log.exception("sweeping expired holds failed; trying again later")


def create_app(
    settings: BillingSettings | None = None,
    *,
    database: Database | None = None,
    bus: EventBus | None = None,
    register: bool = True,
) -> web.Application:
    return create_service_app(
        settings or BillingSettings(),
        routes=routes,
        metadata=[store.metadata],
        consumers=[Subscription(USAGE_QUEUE, USAGE_BINDINGS, on_usage_recorded)],
        tasks=[sweep_expired_holds],
        database=database,
        bus=bus,
        register=register,
    )

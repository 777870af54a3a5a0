"""Billing's events.

Consumes ``usage.recorded`` on queue ``billing.usage``: charges ``data.cost`` (a
decimal string, or integer micro-units in ``data.cost_micro``) for
``data.request_id`` to ``data.user_id`` exactly once and closes the request's open
hold, in the transaction that marks the event processed. Unusable data raises
:class:`UnusableUsageEvent`, so the event is retried and then dead-lettered.
Publishes (through the outbox, in the transaction of the change):
``transaction.created`` for every ledger entry and ``payment.received`` for top-ups.
"""

from __future__ import annotations

from services.common import events
from services.common.db import DbSession
from services.common.errors import BadRequest
from services.common.inputs import require_str
from services.common.money import MoneyError, amount_from_data

from . import store

USAGE_QUEUE = events.BILLING_USAGE
USAGE_BINDINGS = (events.USAGE_RECORDED,)


class UnusableUsageEvent(ValueError):
    """A ``usage.recorded`` whose data cannot be charged; it ends in ``billing.usage.dlq``."""


async def on_usage_recorded(event: events.Event, session: DbSession) -> None:
    data = event.data
    try:
        request_id = require_str(data, "request_id")
        user_id = require_str(data, "user_id")
    except BadRequest as exc:
        raise UnusableUsageEvent(f"usage.recorded {event.id}: {exc.message}") from None
    try:
        cost = amount_from_data(data, "cost")
    except MoneyError as exc:
        raise UnusableUsageEvent(f"usage.recorded {event.id}: {exc}") from None
    await store.charge(
        session, request_id=request_id, user_id=user_id, amount=cost, source="usage.recorded"
    )

"""The proxy publishes ``usage.recorded`` (consumes nothing).

One event per metered request, written through the outbox **in the same
transaction** as its ``proxy_usage`` row, so the row and the event exist together
or not at all, and a request is never metered twice (the row's key is the
request id). Data::

    {"request_id": "chatcmpl-...", "user_id": "...", "key_id": "...",
     "provider": "local-mock", "model": "mock-small", "upstream_model": "mock-small",
     "prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42,
     "cost": "0.000051", "currency": "USD",
     "input_price": "0.50", "output_price": "1.50",      # USD per 1M tokens
     "estimated": false, "stream": true, "attempt": 1,
     "outcome": "completed",            # | "cut" | "client_disconnected"
     "charge_rule": "reported",         # | "estimated" | "delivered_tokens" (README)
     "error": null}                     # the provider's failure for a cut stream

``cost`` is exact: ``round_half_up(prompt x input_price + completion x output_price)``
micro-units (see :mod:`services.providers.pricing`). Billing charges it once per
``request_id``; analytics sums it.
"""

from __future__ import annotations

from services.common import events
from services.common.db import Database, DbSession
from services.common.money import CURRENCY, format_micro
from services.providers.config import ModelRoute

from . import store

SOURCE = "proxy"


def charge_rule(row: store.Usage) -> str:
    """``reported``: the provider's own counts; ``estimated``: a finished answer the
    provider reported no usage for; ``delivered_tokens``: a stream that ended early,
    charged for the prompt plus the completion tokens delivered before the end."""
    if row.outcome != store.COMPLETED:
        return "delivered_tokens"
    return "estimated" if row.estimated else "reported"


def usage_data(row: store.Usage, route: ModelRoute) -> dict:
    return {
        "request_id": row.request_id,
        "user_id": row.user_id,
        "key_id": row.key_id,
        "provider": row.provider,
        "model": row.model,
        "upstream_model": row.upstream_model,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.prompt_tokens + row.completion_tokens,
        "cost": format_micro(row.cost_micro),
        "currency": CURRENCY,
        "input_price": str(route.input_price),
        "output_price": str(route.output_price),
        "estimated": row.estimated,
        "stream": row.stream,
        "attempt": row.attempt,
        "outcome": row.outcome,
        "charge_rule": charge_rule(row),
        "error": row.error,
    }


async def record_usage(db: Database, row: store.Usage, route: ModelRoute) -> bool:
    """Insert the usage row and its event in one transaction; False if already metered."""
    event = events.Event.new(events.USAGE_RECORDED, SOURCE, usage_data(row, route))

    async def unit(session: DbSession) -> bool:
        if not await store.insert_usage(session, row, event.id):
            return False
        await events.record_event(session, event)
        return True

    return await db.writes.run(unit)  # group-committed with the other requests' usage

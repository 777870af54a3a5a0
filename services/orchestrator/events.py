"""The orchestrator publishes ``route.decided`` (consumes nothing).

One event per chat request that got as far as routing, written through the outbox
in the same transaction as its ``chat_requests`` row. Data::

    {"request_id": "chatcmpl-...", "user_id": "u1", "key_id": "key_...",
     "model": "mock-small", "stream": true,
     "provider": "local-mock",          # who served it; null when nobody did
     "attempts": [{"provider": "a", "outcome": "failed", "error": "...",
                   "latency_ms": 12},
                  {"provider": "b", "outcome": "served", "latency_ms": 30}],
     "fallback": true,                  # more than one provider was tried
     "outcome": "completed",            # | "cut" | "client_disconnected" | "failed"
                                        # | "rejected" | "no_provider"
     "error": null,                     # {"type", "code", "message"} when not completed
     "reserved": "0.006200",            # the hold, decimal string
     "hold": "usage",                   # usage: charged from usage.recorded;
                                        # released: nothing served; settled: charged
                                        # by the orchestrator (the proxy vanished)
     "settled": null}                   # the amount it settled, if it did

Analytics counts ``fallback`` and ``error`` from it.
"""

from __future__ import annotations

from services.common import events
from services.common.db import Database, DbSession
from services.common.money import format_micro

from . import store

SOURCE = "orchestrator"


def decision_data(decision: store.Decision) -> dict:
    return {
        "request_id": decision.request_id,
        "user_id": decision.user_id,
        "key_id": decision.key_id,
        "model": decision.model,
        "stream": decision.stream,
        "provider": decision.provider,
        "attempts": decision.attempts,
        "fallback": decision.fallback,
        "outcome": decision.outcome,
        "error": decision.error,
        "reserved": (
            format_micro(decision.reserved_micro) if decision.reserved_micro is not None else None
        ),
        "hold": decision.hold,
        "settled": (
            format_micro(decision.settled_micro) if decision.settled_micro is not None else None
        ),
    }


async def record_decision(db: Database, decision: store.Decision) -> None:
    async def unit(session: DbSession) -> None:
        await store.insert_decision(session, decision)
        await events.record(session, events.ROUTE_DECIDED, decision_data(decision), SOURCE)

    await db.writes.run(unit)  # group-committed with the other requests' decisions

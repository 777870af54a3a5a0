"""Every event once (by event id), plus flat rows for the metrics that need sums.

``analytics_events`` keeps each envelope (data as JSON text) with the fields the
filters use; ``analytics_usage`` has one row per ``usage.recorded`` (tokens and the
cost in micro-units) and ``analytics_routes`` one per ``route.decided`` (fallback,
error), so ``GET /analytics/metrics`` is a handful of ``GROUP BY`` queries.
Times are stored as naive UTC; windows are ``since <= occurred_at < until``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    case,
    func,
    select,
)

from services.common import events
from services.common.db import DbSession, InsertIgnore
from services.common.inputs import format_time, utcnow
from services.common.money import MoneyError, amount_from_data, format_micro

log = logging.getLogger("aiagg.analytics")

metadata = MetaData()

_BIGSEQ = BigInteger().with_variant(Integer, "sqlite")

events_table = Table(
    "analytics_events",
    metadata,
    Column("seq", _BIGSEQ, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("source", String(64), nullable=False),
    Column("occurred_at", DateTime, nullable=False),
    Column("received_at", DateTime, nullable=False),
    Column("user_id", String(128), nullable=True),
    Column("data", Text, nullable=False),
    Index("ix_analytics_events_type_seq", "type", "seq"),
    Index("ix_analytics_events_user_seq", "user_id", "seq"),
    Index("ix_analytics_events_occurred", "occurred_at"),
)

usage = Table(
    "analytics_usage",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("occurred_at", DateTime, nullable=False, index=True),
    Column("request_id", String(128), nullable=True),
    Column("user_id", String(128), nullable=True),
    Column("model", String(200), nullable=True),
    Column("provider", String(200), nullable=True),
    Column("prompt_tokens", BigInteger, nullable=False, default=0),
    Column("completion_tokens", BigInteger, nullable=False, default=0),
    Column("cost_micro", BigInteger, nullable=False, default=0),
)

routes = Table(
    "analytics_routes",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("occurred_at", DateTime, nullable=False, index=True),
    Column("model", String(200), nullable=True),
    Column("provider", String(200), nullable=True),
    Column("fallback", Boolean, nullable=False, default=False),
    Column("error", Boolean, nullable=False, default=False),
)


def _naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    return str(value)[:limit]


def _tokens(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    usage_block = data.get("usage")
    if isinstance(usage_block, dict):
        nested = usage_block.get(name)
        if isinstance(nested, int) and not isinstance(nested, bool) and nested >= 0:
            return nested
    return 0


def _cost(data: dict[str, Any], event_id: str) -> int:
    if "cost" not in data and "cost_micro" not in data:
        return 0
    try:
        return amount_from_data(data, "cost")
    except MoneyError as exc:
        # analytics records what happened; a malformed cost is counted as 0 and logged
        log.warning("event %s: unusable cost (%s): counted as 0", event_id, exc)
        return 0


_INSERT_EVENT = InsertIgnore(events_table, "id")


def _rows(event: events.Event) -> tuple[dict[str, Any], str | None, dict[str, Any] | None]:
    """The events-table row of ``event`` and, for usage and routing, its detail row
    (with the name of its table)."""
    occurred = _naive_utc(event.occurred_at)
    data = event.data if isinstance(event.data, dict) else {}
    row = {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "occurred_at": occurred,
        "received_at": utcnow(),
        "user_id": _text(data.get("user_id"), 128),
        "data": json.dumps(data, separators=(",", ":"), ensure_ascii=False),
    }
    if event.type == events.USAGE_RECORDED:
        return row, "usage", {
            "event_id": event.id,
            "occurred_at": occurred,
            "request_id": _text(data.get("request_id"), 128),
            "user_id": _text(data.get("user_id"), 128),
            "model": _text(data.get("model"), 200),
            "provider": _text(data.get("provider"), 200),
            "prompt_tokens": _tokens(data, "prompt_tokens"),
            "completion_tokens": _tokens(data, "completion_tokens"),
            "cost_micro": _cost(data, event.id),
        }
    if event.type == events.ROUTE_DECIDED:
        return row, "routes", {
            "event_id": event.id,
            "occurred_at": occurred,
            "model": _text(data.get("model"), 200),
            "provider": _text(data.get("provider"), 200),
            "fallback": data.get("fallback") is True,
            "error": bool(data.get("error")),
        }
    return row, None, None


_INSERT_DETAIL = {
    "usage": InsertIgnore(usage, "event_id"),
    "routes": InsertIgnore(routes, "event_id"),
}


async def store_event(session: DbSession, event: events.Event) -> bool:
    """Store one event; False when it was already stored (a duplicate delivery)."""
    row, table, detail = _rows(event)
    if not await _INSERT_EVENT.run(session, row):
        return False
    if table is not None and detail is not None:
        await _INSERT_DETAIL[table].run(session, detail)
    return True


async def store_events(session: DbSession, batch: list[events.Event]) -> None:
    """Store many events with one multi-row INSERT per table (the consumer's batches).

    An event already stored is skipped, and so is its detail row (both keyed by the
    event id), exactly as :func:`store_event` does one by one.
    """
    rows: list[dict[str, Any]] = []
    details: dict[str, list[dict[str, Any]]] = {"usage": [], "routes": []}
    for event in batch:
        row, table, detail = _rows(event)
        rows.append(row)
        if table is not None and detail is not None:
            details[table].append(detail)
    await _INSERT_EVENT.run_many(session, rows)
    for table, values in details.items():
        if values:
            await _INSERT_DETAIL[table].run_many(session, values)


def _window(column: Any, since: datetime | None, until: datetime | None) -> list[Any]:
    clauses = []
    if since is not None:
        clauses.append(column >= since)
    if until is not None:
        clauses.append(column < until)
    return clauses


async def metrics(
    session: DbSession, *, since: datetime | None, until: datetime | None
) -> dict[str, Any]:
    usage_window = _window(usage.c.occurred_at, since, until)
    sums = (
        func.count(),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0),
        func.coalesce(func.sum(usage.c.completion_tokens), 0),
        func.coalesce(func.sum(usage.c.cost_micro), 0),
    )

    def usage_json(row: Any) -> dict[str, Any]:
        requests, prompt, completion, cost = row[-4:]
        return {
            "requests": int(requests),
            "prompt_tokens": int(prompt),
            "completion_tokens": int(completion),
            "total_tokens": int(prompt) + int(completion),
            "cost": format_micro(int(cost)),
        }

    total = (await session.execute(select(*sums).where(*usage_window))).one()
    grouped: dict[str, list[dict[str, Any]]] = {}
    for name, column in (("model", usage.c.model), ("provider", usage.c.provider),
                         ("user_id", usage.c.user_id)):
        rows = (
            await session.execute(
                select(column, *sums).where(*usage_window).group_by(column).order_by(column)
            )
        ).all()
        grouped[name] = [{name: row[0], **usage_json(row)} for row in rows]

    route_window = _window(routes.c.occurred_at, since, until)
    decisions, fallbacks, errors = (
        await session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(_as_int(routes.c.fallback)), 0),
                func.coalesce(func.sum(_as_int(routes.c.error)), 0),
            ).where(*route_window)
        )
    ).one()

    type_rows = (
        await session.execute(
            select(events_table.c.type, func.count())
            .where(*_window(events_table.c.occurred_at, since, until))
            .group_by(events_table.c.type)
            .order_by(events_table.c.type)
        )
    ).all()
    return {
        "since": format_time(since),
        "until": format_time(until),
        **usage_json(total),
        "by_model": grouped["model"],
        "by_provider": grouped["provider"],
        "by_user": grouped["user_id"],
        "routing": {
            "decisions": int(decisions),
            "fallbacks": int(fallbacks),
            "errors": int(errors),
        },
        "events_by_type": {row[0]: int(row[1]) for row in type_rows},
    }


def _as_int(column: Any) -> Any:
    return case((column.is_(True), 1), else_=0)


async def list_events(
    session: DbSession,
    *,
    types: list[str],
    user_id: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    before_seq: int | None,
) -> list[dict[str, Any]]:
    """Newest first (by arrival); ``before_seq`` continues a previous page."""
    query = select(events_table).order_by(events_table.c.seq.desc()).limit(limit)
    if types:
        query = query.where(events_table.c.type.in_(types))
    if user_id is not None:
        query = query.where(events_table.c.user_id == user_id)
    query = query.where(*_window(events_table.c.occurred_at, since, until))
    if before_seq is not None:
        query = query.where(events_table.c.seq < before_seq)
    rows = (await session.execute(query)).all()
    return [
        {
            "seq": row.seq,
            "id": row.id,
            "type": row.type,
            "source": row.source,
            "occurred_at": format_time(row.occurred_at),
            "received_at": format_time(row.received_at),
            "user_id": row.user_id,
            "data": json.loads(row.data),
        }
        for row in rows
    ]

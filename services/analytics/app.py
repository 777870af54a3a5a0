"""Analytics HTTP API (admin only).

``GET /analytics/metrics?since=&until=``
    RFC 3339 window on the events' ``occurred_at`` (``since`` inclusive, ``until``
    exclusive, both optional): requests, prompt/completion tokens and cost (a decimal
    string) in total and grouped by model, provider and user (from ``usage.recorded``);
    route decisions, fallbacks and errors (from ``route.decided`` fields ``fallback``
    and ``error``); and a count per event type.

``GET /analytics/events?type=&user_id=&since=&until=&limit=&cursor=``
    Stored events, newest first (by arrival). ``type`` may repeat or be
    comma-separated; ``limit`` 1..500 (default 100); ``next_cursor`` continues.
"""

from __future__ import annotations

import re

from aiohttp import web

from services.common.app import DB, Subscription, create_service_app, json_response
from services.common.db import Database
from services.common.errors import BadRequest
from services.common.events import EventBus
from services.common.identity import require_admin
from services.common.inputs import (
    decode_cursor,
    encode_cursor,
    parse_limit,
    parse_time,
    validate_identifier,
)

from . import store
from .events import EVENTS_BINDINGS, EVENTS_QUEUE, on_event, on_events
from .settings import AnalyticsSettings

routes = web.RouteTableDef()

_TYPE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def _window(request: web.Request):
    since = parse_time(request, "since")
    until = parse_time(request, "until")
    if since is not None and until is not None and since >= until:
        raise BadRequest("'since' must be earlier than 'until'")
    return since, until


@routes.get("/analytics/metrics")
async def metrics(request: web.Request) -> web.Response:
    require_admin(request)
    since, until = _window(request)
    async with request.app[DB].session() as session:
        body = await store.metrics(session, since=since, until=until)
    return json_response(body)


@routes.get("/analytics/events")
async def list_events(request: web.Request) -> web.Response:
    require_admin(request)
    types: list[str] = []
    for raw in request.query.getall("type", []):
        for part in raw.split(","):
            part = part.strip()
            if not part:
                continue
            if not _TYPE.match(part) or len(part) > 64:
                raise BadRequest(f"'type' must be an event type like usage.recorded, got {part!r}")
            types.append(part)
    user_id = request.query.get("user_id")
    if user_id is not None:
        validate_identifier(user_id, "user_id")
    since, until = _window(request)
    limit = parse_limit(request, default=100, maximum=500)
    before = decode_cursor(request)
    async with request.app[DB].session() as session:
        rows = await store.list_events(
            session,
            types=types,
            user_id=user_id,
            since=since,
            until=until,
            limit=limit + 1,
            before_seq=before,
        )
    page, more = rows[:limit], len(rows) > limit
    next_cursor = encode_cursor(page[-1]["seq"]) if more else None
    for row in page:
        del row["seq"]
    return json_response({"data": page, "next_cursor": next_cursor})


def create_app(
    settings: AnalyticsSettings | None = None,
    *,
    database: Database | None = None,
    bus: EventBus | None = None,
    register: bool = True,
) -> web.Application:
    return create_service_app(
        settings or AnalyticsSettings(),
        routes=routes,
        metadata=[store.metadata],
        consumers=[Subscription(EVENTS_QUEUE, EVENTS_BINDINGS, on_event, on_events)],
        database=database,
        bus=bus,
        register=register,
    )

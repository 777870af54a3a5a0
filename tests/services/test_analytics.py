"""The analytics service: every event stored once, metrics and event listing; and the
event path from auth to analytics over the in-process bus and the real RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from services.analytics import store
from services.common.events import (
    APIKEY_CREATED,
    APIKEY_REVOKED,
    ROUTE_DECIDED,
    USAGE_RECORDED,
    Event,
)
from tests.support import eventually

from .conftest import ADMIN, as_user, new_user, rabbit_bus
from .test_kit import assert_error

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def rfc(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture
async def analytics(start_service):
    return await start_service("analytics")


async def stored_count(analytics) -> int:
    async with analytics.db.session() as session:
        return (await session.execute(
            select(func.count()).select_from(store.events_table))).scalar_one()


async def publish_all(analytics, events: list[Event]) -> None:
    before = await stored_count(analytics)
    for event in events:
        await analytics.bus.publish(event)
    ids = {e.id for e in events}

    async def all_stored() -> bool:
        return await stored_count(analytics) >= before + len(ids)

    await eventually(all_stored, what=f"{len(ids)} events stored")


def usage(user: str, model: str, provider: str, cost: str, at: datetime, p=10, c=20) -> Event:
    return Event.new(
        USAGE_RECORDED, "proxy",
        {"request_id": uuid.uuid4().hex, "user_id": user, "model": model, "provider": provider,
         "prompt_tokens": p, "completion_tokens": c, "cost": cost},
        occurred_at=at,
    )


def route(model: str, provider: str, at: datetime, *, fallback=False, error=None) -> Event:
    data = {"request_id": uuid.uuid4().hex, "model": model, "provider": provider,
            "fallback": fallback}
    if error:
        data["error"] = error
    return Event.new(ROUTE_DECIDED, "orchestrator", data, occurred_at=at)


async def test_each_event_is_stored_once(analytics):
    event = Event.new(APIKEY_CREATED, "auth", {"key_id": "key_1", "user_id": "u1"})
    await publish_all(analytics, [event])
    await analytics.bus.publish(event)  # delivered again
    await analytics.bus.publish(Event.new(APIKEY_REVOKED, "auth", {"key_id": "key_1"}))
    await eventually(lambda: _count_is(analytics, 2), what="the second event")
    await asyncio.sleep(0.2)
    assert await stored_count(analytics) == 2
    listed = await (await analytics.client.get("/analytics/events", headers=ADMIN)).json()
    assert [e["id"] for e in listed["data"]][-1] == event.id
    first = listed["data"][-1]
    assert first == {
        "id": event.id, "type": "apikey.created", "source": "auth",
        "occurred_at": rfc(event.occurred_at), "received_at": first["received_at"],
        "user_id": "u1", "data": {"key_id": "key_1", "user_id": "u1"},
    }


async def _count_is(analytics, n: int) -> bool:
    return await stored_count(analytics) == n


async def test_metrics_group_usage_and_routing_within_a_window(analytics):
    alice, bob = new_user(), new_user()
    events = [
        usage(alice, "gpt-x", "openai", "0.001000", T0, p=10, c=20),
        usage(alice, "gpt-x", "openai", "0.002500", T0 + timedelta(minutes=1), p=5, c=5),
        usage(bob, "llama", "ollama", "0.000100", T0 + timedelta(minutes=2), p=1, c=2),
        usage(bob, "llama", "ollama", "5.000000", T0 + timedelta(hours=2)),  # outside window
        route("gpt-x", "openai", T0),
        route("gpt-x", "openrouter", T0 + timedelta(seconds=5), fallback=True),
        route("llama", "ollama", T0 + timedelta(seconds=9), error="upstream 502"),
        Event.new(APIKEY_CREATED, "auth", {"user_id": alice}, occurred_at=T0),
    ]
    await publish_all(analytics, events)
    since, until = rfc(T0), rfc(T0 + timedelta(hours=1))
    resp = await analytics.client.get(f"/analytics/metrics?since={since}&until={until}",
                                      headers=ADMIN)
    assert resp.status == 200
    body = await resp.json()
    assert body["since"] == "2026-01-01T12:00:00.000000Z"
    assert body["requests"] == 3
    assert body["prompt_tokens"] == 16 and body["completion_tokens"] == 27
    assert body["total_tokens"] == 43
    assert body["cost"] == "0.003600"
    assert body["by_model"] == [
        {"model": "gpt-x", "requests": 2, "prompt_tokens": 15, "completion_tokens": 25,
         "total_tokens": 40, "cost": "0.003500"},
        {"model": "llama", "requests": 1, "prompt_tokens": 1, "completion_tokens": 2,
         "total_tokens": 3, "cost": "0.000100"},
    ]
    assert [(p["provider"], p["requests"]) for p in body["by_provider"]] == [
        ("ollama", 1), ("openai", 2)]
    by_user = {u["user_id"]: u["cost"] for u in body["by_user"]}
    assert by_user == {alice: "0.003500", bob: "0.000100"}
    assert body["routing"] == {"decisions": 3, "fallbacks": 1, "errors": 1}
    assert body["events_by_type"] == {"apikey.created": 1, "route.decided": 3,
                                      "usage.recorded": 3}

    everything = await (await analytics.client.get("/analytics/metrics", headers=ADMIN)).json()
    assert everything["requests"] == 4 and everything["cost"] == "5.003600"
    # offsets other than Z are the same instant
    later = rfc(T0 + timedelta(hours=1)).replace("Z", "")
    resp = await analytics.client.get(
        "/analytics/metrics", params={"since": later + "+01:00"}, headers=ADMIN)
    assert (await resp.json())["requests"] == 4  # 13:00+01:00 is 12:00Z: everything
    resp = await analytics.client.get(
        "/analytics/metrics", params={"since": rfc(T0 + timedelta(hours=1))}, headers=ADMIN)
    assert (await resp.json())["requests"] == 1


async def test_events_filters_and_pagination(analytics):
    alice, bob = new_user(), new_user()
    events = [usage(alice, "m", "p", "0.1", T0 + timedelta(seconds=i)) for i in range(5)]
    events += [usage(bob, "m", "p", "0.1", T0 + timedelta(hours=3))]
    events += [route("m", "p", T0)]
    await publish_all(analytics, events)

    async def get(query: str) -> dict:
        resp = await analytics.client.get(f"/analytics/events?{query}", headers=ADMIN)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    ids: list[str] = []
    cursor = ""
    while True:
        page = await get(f"type=usage.recorded&user_id={alice}&limit=2&cursor={cursor}")
        ids += [e["id"] for e in page["data"]]
        assert all(e["user_id"] == alice for e in page["data"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(ids) == sorted(e.id for e in events[:5]) and len(ids) == 5

    routes_only = await get("type=route.decided")
    assert [e["type"] for e in routes_only["data"]] == ["route.decided"]
    both = await get("type=route.decided,usage.recorded&limit=500")
    assert len(both["data"]) == 7
    window = await get(f"since={rfc(T0 + timedelta(hours=1))}")
    assert [e["user_id"] for e in window["data"]] == [bob]
    until = await get(f"until={rfc(T0 + timedelta(seconds=1))}")
    assert len(until["data"]) == 2  # alice's first usage and the route decision


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/analytics/events?limit=501", "'limit'"),
        ("/analytics/events?limit=0", "'limit'"),
        ("/analytics/events?limit=-1", "'limit'"),
        ("/analytics/events?cursor=zzz", "'cursor'"),
        ("/analytics/events?type=usage.*", "'type'"),
        ("/analytics/events?user_id=a%20b", "'user_id'"),
        ("/analytics/events?since=yesterday", "'since'"),
        ("/analytics/metrics?since=2026-01-01T00:00:00", "UTC offset"),
        ("/analytics/metrics?until=2026-13-01T00:00:00Z", "'until'"),
        ("/analytics/metrics?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
         "earlier than"),
    ],
)
async def test_bad_queries_are_precise_400(analytics, path, fragment):
    resp = await analytics.client.get(path, headers=ADMIN)
    assert resp.status == 400
    body = await resp.json()
    assert_error(body, "bad_request")
    assert fragment in body["error"]["message"]


@pytest.mark.parametrize("path", ["/analytics/metrics", "/analytics/events"])
async def test_analytics_is_admin_only(analytics, path):
    user = new_user()
    assert (await analytics.client.get(path, headers=as_user(user, "chat"))).status == 403
    assert (await analytics.client.get(path)).status == 401
    assert (await analytics.client.get(path, headers=as_user(user, "admin"))).status == 200


async def test_malformed_usage_data_is_kept_and_counted_safely(analytics):
    bad = Event.new(USAGE_RECORDED, "proxy", {"user_id": "u", "cost": 0.5,
                                              "prompt_tokens": "many", "completion_tokens": -3})
    await publish_all(analytics, [bad])
    body = await (await analytics.client.get("/analytics/metrics", headers=ADMIN)).json()
    assert body["requests"] == 1 and body["cost"] == "0.000000"
    assert body["prompt_tokens"] == 0 and body["completion_tokens"] == 0


# -- auth -> analytics ------------------------------------------------------------------


async def _created_key_reaches_analytics(auth, analytics) -> None:
    user = new_user()
    resp = await auth.client.post("/auth/api-keys", json={"user_id": user, "name": "ci"},
                                  headers=ADMIN)
    assert resp.status == 201
    created = await resp.json()

    async def arrived() -> list:
        resp = await analytics.client.get(
            f"/analytics/events?type=apikey.created&user_id={user}", headers=ADMIN)
        return (await resp.json())["data"]

    events = await eventually(arrived, within=15, what="apikey.created in analytics")
    assert len(events) == 1
    event = events[0]
    assert event["source"] == "auth"
    assert event["data"]["key_id"] == created["id"]
    assert event["data"]["user_id"] == user
    assert created["key"] not in str(event)

    resp = await auth.client.delete(f"/auth/api-keys/{created['id']}", headers=ADMIN)
    assert resp.status == 200

    async def revoked() -> list:
        resp = await analytics.client.get(
            f"/analytics/events?type=apikey.revoked&user_id={user}", headers=ADMIN)
        return (await resp.json())["data"]

    assert len(await eventually(revoked, within=15, what="apikey.revoked")) == 1
    metrics = await (await analytics.client.get("/analytics/metrics", headers=ADMIN)).json()
    assert metrics["events_by_type"]["apikey.created"] >= 1


async def test_created_key_shows_up_in_analytics_in_process(start_service, inprocess_bus):
    auth = await start_service("auth", bus=inprocess_bus)
    analytics = await start_service("analytics", bus=inprocess_bus)
    await _created_key_reaches_analytics(auth, analytics)


async def test_created_key_shows_up_in_analytics_over_rabbitmq(start_service, rabbit_settings):
    auth_bus = rabbit_bus(rabbit_settings, "auth")
    analytics_bus = rabbit_bus(rabbit_settings, "analytics")
    try:
        auth = await start_service("auth", bus=auth_bus)
        analytics = await start_service("analytics", bus=analytics_bus)
        assert (await (await auth.client.get("/health")).json())["checks"]["events"] == {
            "status": "ok", "bus": "rabbitmq"}
        await _created_key_reaches_analytics(auth, analytics)
    finally:
        await auth_bus.close()
        await analytics_bus.close()


async def test_usage_over_rabbitmq_charges_billing_once_and_reaches_analytics(
    start_service, rabbit_settings
):
    """billing and analytics each consume their own queue of the same exchange."""
    proxy_bus = rabbit_bus(rabbit_settings, "proxy")
    billing_bus = rabbit_bus(rabbit_settings, "billing")
    analytics_bus = rabbit_bus(rabbit_settings, "analytics")
    try:
        billing = await start_service("billing", bus=billing_bus)
        analytics = await start_service("analytics", bus=analytics_bus)
        await proxy_bus.start()
        user = new_user()
        resp = await billing.client.post(
            "/billing/top-up", json={"user_id": user, "amount": "1", "idempotency_key": user},
            headers=ADMIN)
        assert resp.status == 201
        event = usage(user, "mock-1", "mock", "0.250000", datetime.now(UTC))
        await proxy_bus.publish(event)
        await proxy_bus.publish(event)

        async def charged() -> bool:
            resp = await billing.client.get(f"/billing/balance/{user}", headers=ADMIN)
            return (await resp.json())["balance"] == "0.750000"

        await eventually(charged, within=15, what="the charge")

        async def seen() -> dict:
            resp = await analytics.client.get(f"/analytics/events?user_id={user}", headers=ADMIN)
            data = (await resp.json())["data"]
            types = sorted(e["type"] for e in data)
            want = ["payment.received", "transaction.created", "transaction.created",
                    "usage.recorded"]
            return data if types == want else {}

        await eventually(seen, within=15, what="billing's and proxy's events in analytics")
        await asyncio.sleep(0.3)
        resp = await billing.client.get(f"/billing/balance/{user}", headers=ADMIN)
        assert (await resp.json())["balance"] == "0.750000"
    finally:
        for bus in (proxy_bus, billing_bus, analytics_bus):
            await bus.close()


async def test_a_batch_is_stored_like_the_same_events_one_by_one(analytics):
    """store_events (the consumer's group-committed batches) writes exactly the rows
    store_event writes, skipping what is already there."""
    user = new_user()
    batch = [
        usage(user, "gpt-x", "mock", "0.000120", T0),
        route("gpt-x", "mock", T0, fallback=True),
        route("gpt-y", "mock", T0, error="boom"),
        Event.new(APIKEY_CREATED, "auth", {"user_id": user, "key_id": "k1"}, occurred_at=T0),
        usage(user, "gpt-y", "other", "0.5", T0, p=1, c=2),
    ]
    async with analytics.db.transaction() as session:
        assert await store.store_event(session, batch[0])  # already stored: skipped below
        await store.store_events(session, batch)

    async def rows(ids: list[str]) -> dict[str, list[tuple]]:
        async with analytics.db.session() as session:
            out = {}
            for name, table, key in (
                ("events", store.events_table, store.events_table.c.id),
                ("usage", store.usage, store.usage.c.event_id),
                ("routes", store.routes, store.routes.c.event_id),
            ):
                result = await session.execute(select(table).where(key.in_(ids)).order_by(key))
                skip = ("seq", "received_at", "id", "event_id")  # differ between twins
                out[name] = [
                    tuple(v for k, v in r._mapping.items() if k not in skip) for r in result
                ]
            return out

    # the same events under other ids, one by one
    twins = [Event.new(e.type, e.source, e.data, occurred_at=e.occurred_at) for e in batch]
    async with analytics.db.transaction() as session:
        for twin in twins:
            assert await store.store_event(session, twin)
    batched, single = await rows([e.id for e in batch]), await rows([t.id for t in twins])
    assert len(batched["events"]) == 5 and len(batched["usage"]) == 2
    assert len(batched["routes"]) == 2
    assert sorted(batched["events"]) == sorted(single["events"])
    assert sorted(batched["usage"]) == sorted(single["usage"])
    assert sorted(batched["routes"]) == sorted(single["routes"])

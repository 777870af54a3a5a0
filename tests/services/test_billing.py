"""The billing service: balances, idempotent top-ups, reservations, exactly-once charges."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import select

from services.billing import store
from services.common.events import USAGE_RECORDED, Event, event_outbox
from tests.support import eventually

from .conftest import ADMIN, as_user, new_user
from .test_kit import assert_error


@pytest.fixture
async def billing(start_service):
    return await start_service("billing")


async def top_up(billing, user_id: str, amount: str, key: str | None = None):
    body = {"user_id": user_id, "amount": amount, "idempotency_key": key or uuid.uuid4().hex}
    return await billing.client.post("/billing/top-up", json=body, headers=ADMIN)


async def balance_of(billing, user_id: str) -> dict:
    resp = await billing.client.get(f"/billing/balance/{user_id}", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def reserve(billing, user_id: str, amount: str, request_id: str | None = None):
    body = {"request_id": request_id or uuid.uuid4().hex, "user_id": user_id, "amount": amount}
    return await billing.client.post("/internal/billing/reservations", json=body, headers=ADMIN)


async def check_invariants(billing, user_id: str) -> dict:
    """balance = top-ups - charges; held = open holds; available = balance - held."""
    answer = await balance_of(billing, user_id)
    async with billing.db.session() as session:
        sums = await store.totals(session, user_id)
    balance = Decimal(answer["balance"])
    held = Decimal(answer["held"])
    assert balance == Decimal(sums["top_ups"] - sums["charges"]) / 10**6
    assert held == Decimal(sums["open_holds"]) / 10**6
    assert Decimal(answer["available"]) == balance - held
    return answer


async def usage_event(user_id: str, request_id: str, cost: str, **extra) -> Event:
    return Event.new(
        USAGE_RECORDED,
        "proxy",
        {"request_id": request_id, "user_id": user_id, "cost": cost, "model": "mock-1",
         "provider": "mock", "prompt_tokens": 3, "completion_tokens": 5, **extra},
    )


async def outbox_types(billing) -> list[str]:
    async with billing.db.session() as session:
        return list((await session.execute(
            select(event_outbox.c.type).order_by(event_outbox.c.id))).scalars())


# -- balance and top-up ------------------------------------------------------------------


async def test_top_up_creates_the_account_and_credits(billing):
    user = new_user()
    assert (await billing.client.get(f"/billing/balance/{user}", headers=ADMIN)).status == 404
    resp = await top_up(billing, user, "10.50", key="k-" + user)
    assert resp.status == 201
    body = await resp.json()
    assert body["user_id"] == user
    assert body["amount"] == "10.500000"
    assert body["balance"] == "10.500000"
    assert body["currency"] == "USD"
    assert body["idempotency_key"] == "k-" + user
    assert body["transaction_id"].startswith("txn_")
    assert await balance_of(billing, user) == {
        "user_id": user, "balance": "10.500000", "held": "0.000000",
        "available": "10.500000", "currency": "USD",
    }
    assert await outbox_types(billing) == ["transaction.created", "payment.received"]
    await check_invariants(billing, user)


async def test_repeated_top_up_credits_once_and_answers_the_same(billing):
    user = new_user()
    key = "pay-" + uuid.uuid4().hex
    first = await top_up(billing, user, "5", key=key)
    second = await top_up(billing, user, "5", key=key)
    assert first.status == second.status == 201
    assert await first.json() == await second.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    # concurrent repeats too
    answers = await asyncio.gather(*(top_up(billing, user, "5", key=key) for _ in range(10)))
    assert {a.status for a in answers} == {201}
    assert (await balance_of(billing, user))["balance"] == "5.000000"
    assert (await outbox_types(billing)).count("payment.received") == 1
    await check_invariants(billing, user)


async def test_same_idempotency_key_with_another_body_is_409(billing):
    user = new_user()
    key = "pay-" + uuid.uuid4().hex
    assert (await top_up(billing, user, "5", key=key)).status == 201
    for other_user, amount in ((user, "6"), (new_user(), "5")):
        resp = await top_up(billing, other_user, amount, key=key)
        assert resp.status == 409
        assert_error(await resp.json(), "conflict")
    assert (await balance_of(billing, user))["balance"] == "5.000000"


async def test_top_up_takes_the_idempotency_key_header(billing):
    """Payment APIs take the key as an ``Idempotency-Key`` header; so does billing."""
    user = new_user()
    key = "hdr-" + uuid.uuid4().hex

    async def send(value: str, body_key: str | None = None):
        body = {"user_id": user, "amount": "2.50"}
        if body_key is not None:
            body["idempotency_key"] = body_key
        headers = {**ADMIN, "Idempotency-Key": value}
        return await billing.client.post("/billing/top-up", json=body, headers=headers)

    first = await send(key)
    assert first.status == 201, await first.text()
    assert (await first.json())["idempotency_key"] == key
    assert "Idempotent-Replayed" not in first.headers
    # a retry: the header as the IETF draft quotes it, and the same key in both places
    for again in (await send(f'"{key}"'), await send(key, body_key=key)):
        assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert await again.json() == await first.json()
    assert (await balance_of(billing, user))["balance"] == "2.500000"
    # the body's key is the same one: a replay as well
    assert (await top_up(billing, user, "2.50", key=key)).headers["Idempotent-Replayed"] == "true"

    for value, body_key, fragment in (
        (key, "other-" + key, "differ; send one of them"),
        ("not a key!", None, "'Idempotency-Key' must be"),
    ):
        refused = await send(value, body_key)
        assert refused.status == 400
        error = await refused.json()
        assert_error(error, "bad_request")
        assert fragment in error["error"]["message"]
    assert (await balance_of(billing, user))["balance"] == "2.500000"
    await check_invariants(billing, user)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"amount": "1", "idempotency_key": "k"}, "'user_id' is required"),
        ({"user_id": "u", "idempotency_key": "k"}, "'amount' is required"),
        ({"user_id": "u", "amount": "1"}, "'idempotency_key' is required"),
        ({"user_id": "u", "amount": "-5", "idempotency_key": "k"}, "cannot be negative"),
        ({"user_id": "u", "amount": "0", "idempotency_key": "k"}, "greater than zero"),
        ({"user_id": "u", "amount": "ten", "idempotency_key": "k"}, "decimal string"),
        ({"user_id": "u", "amount": "0.1234567", "idempotency_key": "k"}, "more than 6 decimal"),
        ({"user_id": "u", "amount": True, "idempotency_key": "k"}, "decimal string"),
        ({"user_id": "u", "amount": None, "idempotency_key": "k"}, "decimal string"),
        ({"user_id": "u", "amount": [], "idempotency_key": "k"}, "decimal string"),
        ({"user_id": "u", "amount": "1e3", "idempotency_key": "k"}, "decimal string"),
        ({"user_id": "u", "amount": "NaN", "idempotency_key": "k"}, "decimal string"),
        ({"user_id": "u", "amount": "1", "idempotency_key": 7}, "'idempotency_key' must be"),
        ({"user_id": ["u"], "amount": "1", "idempotency_key": "k"}, "'user_id' must be a string"),
        ({"user_id": "u", "amount": "1", "idempotency_key": "k", "note": 1}, "unknown field"),
    ],
)
async def test_top_up_bad_input_is_precise_400(billing, body, fragment):
    resp = await billing.client.post("/billing/top-up", json=body, headers=ADMIN)
    assert resp.status == 400
    payload = await resp.json()
    assert_error(payload, "bad_request")
    assert fragment in payload["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"user_id": "u", "amount": 0.1234567, "idempotency_key": "k"}', "more than 6"),
        (b'{"user_id": "u", "amount": -1.5, "idempotency_key": "k"}', "negative"),
        (b'{"user_id": "u", "amount": NaN, "idempotency_key": "k"}', "not valid JSON"),
        (b'{"user_id": "u", "amount": Infinity, "idempotency_key": "k"}', "not valid JSON"),
    ],
)
async def test_top_up_raw_json_numbers_are_exact_or_refused(billing, raw, fragment):
    resp = await billing.client.post("/billing/top-up", data=raw, headers=ADMIN)
    assert resp.status == 400
    assert fragment in (await resp.json())["error"]["message"]


async def test_json_number_amount_is_taken_exactly(billing):
    user = new_user()
    raw = b'{"user_id": "%s", "amount": 0.1, "idempotency_key": "%s"}' % (
        user.encode(), uuid.uuid4().hex.encode())
    resp = await billing.client.post("/billing/top-up", data=raw, headers=ADMIN)
    assert resp.status == 201
    assert (await resp.json())["amount"] == "0.100000"


async def test_top_up_is_admin_only(billing):
    user = new_user()
    body = {"user_id": user, "amount": "1", "idempotency_key": "k"}
    resp = await billing.client.post("/billing/top-up", json=body, headers=as_user(user))
    assert resp.status == 403
    resp = await billing.client.post("/billing/top-up", json=body)
    assert resp.status == 401


async def test_users_see_only_their_own_balance_and_transactions(billing):
    alice, bob = new_user(), new_user()
    await top_up(billing, alice, "1")
    await top_up(billing, bob, "2")
    for path in (f"/billing/balance/{bob}", f"/billing/transactions/{bob}"):
        resp = await billing.client.get(path, headers=as_user(alice, "chat"))
        assert resp.status == 403, path
        assert_error(await resp.json(), "forbidden")
        assert (await billing.client.get(path)).status == 401
    # unknown users do not leak existence to others either
    stranger = new_user()
    resp = await billing.client.get(f"/billing/balance/{stranger}", headers=as_user(alice))
    assert resp.status == 403
    own = await billing.client.get(f"/billing/balance/{alice}", headers=as_user(alice))
    assert own.status == 200
    assert (await own.json())["balance"] == "1.000000"
    own = await billing.client.get(f"/billing/transactions/{alice}", headers=as_user(alice))
    assert own.status == 200
    assert [t["amount"] for t in (await own.json())["data"]] == ["1.000000"]


async def test_unknown_user_is_404_for_admin(billing):
    for path in ("/billing/balance/", "/billing/transactions/"):
        resp = await billing.client.get(path + new_user(), headers=ADMIN)
        assert resp.status == 404
        assert_error(await resp.json(), "not_found")
    resp = await billing.client.get("/billing/balance/bad%20id", headers=ADMIN)
    assert resp.status == 400


async def test_transactions_paginate_newest_first(billing):
    user = new_user()
    for amount in ("1", "2", "3", "4", "5"):
        await top_up(billing, user, amount)
    amounts: list[str] = []
    cursor = None
    while True:
        url = f"/billing/transactions/{user}?limit=2" + (f"&cursor={cursor}" if cursor else "")
        resp = await billing.client.get(url, headers=as_user(user))
        page = await resp.json()
        amounts += [t["amount"] for t in page["data"]]
        assert all(t["type"] == "top_up" for t in page["data"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert amounts == ["5.000000", "4.000000", "3.000000", "2.000000", "1.000000"]
    for bad in ("limit=0", "limit=501", "limit=x", "cursor=@@"):
        resp = await billing.client.get(f"/billing/transactions/{user}?{bad}", headers=ADMIN)
        assert resp.status == 400, bad


# -- reservations -----------------------------------------------------------------------


async def test_reservation_holds_then_settle_charges_once(billing):
    user = new_user()
    await top_up(billing, user, "10")
    rid = "req-" + uuid.uuid4().hex
    resp = await reserve(billing, user, "3", rid)
    assert resp.status == 201
    hold = await resp.json()
    assert hold["status"] == "open" and hold["amount"] == "3.000000"
    assert (await balance_of(billing, user))["available"] == "7.000000"

    again = await reserve(billing, user, "3", rid)  # idempotent by request_id
    assert again.status == 200
    assert (await again.json())["request_id"] == rid
    assert (await balance_of(billing, user))["available"] == "7.000000"

    resp = await billing.client.post(
        f"/internal/billing/reservations/{rid}/settle", json={"amount": "1.25"}, headers=ADMIN)
    assert resp.status == 200
    settled = await resp.json()
    assert settled["status"] == "settled"
    assert settled["charge"]["amount"] == "-1.250000"
    assert settled["charge"]["request_id"] == rid
    assert settled["already_charged"] is False
    after = await check_invariants(billing, user)
    assert after == {"user_id": user, "balance": "8.750000", "held": "0.000000",
                     "available": "8.750000", "currency": "USD"}

    resp = await billing.client.post(
        f"/internal/billing/reservations/{rid}/settle", json={"amount": "9"}, headers=ADMIN)
    assert resp.status == 200
    assert (await resp.json())["already_charged"] is True
    assert (await balance_of(billing, user))["balance"] == "8.750000"
    # a later usage.recorded for the same request is a no-op too
    await billing.bus.publish(await usage_event(user, rid, "1.25"))
    await asyncio.sleep(0.3)
    await check_invariants(billing, user)
    assert (await balance_of(billing, user))["balance"] == "8.750000"
    resp = await reserve(billing, user, "3", rid)  # the id stays taken
    assert resp.status == 200 and (await resp.json())["status"] == "settled"


async def test_reservation_that_does_not_fit_is_402(billing):
    user = new_user()
    await top_up(billing, user, "2")
    assert (await reserve(billing, user, "1.5")).status == 201
    resp = await reserve(billing, user, "0.500001")
    assert resp.status == 402
    body = await resp.json()
    assert_error(body, "insufficient_quota")
    assert "0.500000" in body["error"]["message"]
    assert (await reserve(billing, user, "0.5")).status == 201
    resp = await reserve(billing, new_user(), "1")  # no account at all
    assert resp.status == 402
    assert_error(await resp.json(), "insufficient_quota")
    answer = await check_invariants(billing, user)
    assert answer["available"] == "0.000000"


async def test_same_request_id_with_another_reservation_is_409(billing):
    user = new_user()
    await top_up(billing, user, "5")
    rid = uuid.uuid4().hex
    assert (await reserve(billing, user, "1", rid)).status == 201
    resp = await reserve(billing, user, "2", rid)
    assert resp.status == 409
    assert_error(await resp.json(), "conflict")


async def test_release_returns_the_money_once(billing):
    user = new_user()
    await top_up(billing, user, "5")
    rid = uuid.uuid4().hex
    await reserve(billing, user, "4", rid)
    for _ in range(2):
        resp = await billing.client.post(f"/internal/billing/reservations/{rid}/release",
                                         headers=ADMIN)
        assert resp.status == 200
        assert (await resp.json())["status"] == "released"
        assert (await check_invariants(billing, user))["available"] == "5.000000"
    resp = await billing.client.get(f"/internal/billing/reservations/{rid}", headers=ADMIN)
    assert (await resp.json())["status"] == "released"
    assert (await balance_of(billing, user))["balance"] == "5.000000"


async def test_charge_larger_than_the_hold_is_booked_in_full(billing):
    user = new_user()
    await top_up(billing, user, "1")
    rid = uuid.uuid4().hex
    await reserve(billing, user, "1", rid)
    resp = await billing.client.post(
        f"/internal/billing/reservations/{rid}/settle", json={"amount": "1.5"}, headers=ADMIN)
    assert resp.status == 200
    after = await check_invariants(billing, user)
    assert after["balance"] == "-0.500000" and after["available"] == "-0.500000"
    assert (await reserve(billing, user, "0.000001")).status == 402


async def test_reservation_endpoints_check_input_and_caller(billing):
    user = new_user()
    await top_up(billing, user, "5")
    cases = [
        ({"user_id": user, "amount": "1"}, "'request_id' is required"),
        ({"request_id": "r", "amount": "1"}, "'user_id' is required"),
        ({"request_id": "r", "user_id": user}, "'amount' is required"),
        ({"request_id": "r", "user_id": user, "amount": "-1"}, "negative"),
        ({"request_id": "r", "user_id": user, "amount": "0"}, "greater than zero"),
        ({"request_id": "r", "user_id": user, "amount": 0.1234567}, "more than 6"),
        ({"request_id": "r r", "user_id": user, "amount": "1"}, "'request_id' must be"),
    ]
    for body, fragment in cases:
        resp = await billing.client.post("/internal/billing/reservations", json=body,
                                         headers=ADMIN)
        assert resp.status == 400, body
        assert fragment in (await resp.json())["error"]["message"]
    resp = await billing.client.post(
        "/internal/billing/reservations",
        json={"request_id": "r", "user_id": user, "amount": "1"}, headers=as_user(user))
    assert resp.status == 403
    for action, body in (("settle", {"amount": "1"}), ("release", None)):
        resp = await billing.client.post(f"/internal/billing/reservations/nope/{action}",
                                         json=body, headers=ADMIN)
        assert resp.status == 404, action
    rid = uuid.uuid4().hex
    await reserve(billing, user, "1", rid)
    for body, fragment in (({}, "'amount' is required"), ({"amount": "-1"}, "negative"),
                           ({"amount": "x"}, "decimal string")):
        resp = await billing.client.post(f"/internal/billing/reservations/{rid}/settle",
                                         json=body, headers=ADMIN)
        assert resp.status == 400
        assert fragment in (await resp.json())["error"]["message"]
    await check_invariants(billing, user)


async def test_expired_holds_are_released(start_service):
    billing = await start_service("billing", hold_ttl=0.2, sweep_interval=0.1)
    user = new_user()
    await top_up(billing, user, "1")
    rid = uuid.uuid4().hex
    assert (await reserve(billing, user, "1", rid)).status == 201
    assert (await balance_of(billing, user))["available"] == "0.000000"

    async def released():
        return (await balance_of(billing, user))["available"] == "1.000000"

    await eventually(released, within=5, what="the sweeper to release the hold")
    hold = await (await billing.client.get(f"/internal/billing/reservations/{rid}",
                                           headers=ADMIN)).json()
    assert hold["status"] == "expired"
    await check_invariants(billing, user)
    # a usage event for the expired request still charges it (it did happen)
    await billing.bus.publish(await usage_event(user, rid, "0.4"))
    await eventually(lambda: _balance_is(billing, user, "0.600000"), what="the charge")
    await check_invariants(billing, user)


async def test_expired_holds_are_released_lazily_on_reservation(start_service):
    billing = await start_service("billing", hold_ttl=0.1, sweep_interval=3600)
    user = new_user()
    await top_up(billing, user, "1")
    assert (await reserve(billing, user, "1")).status == 201
    await asyncio.sleep(0.2)
    assert (await reserve(billing, user, "1")).status == 201
    await check_invariants(billing, user)


async def _balance_is(billing, user: str, balance: str) -> bool:
    return (await balance_of(billing, user))["balance"] == balance


# -- usage.recorded ---------------------------------------------------------------------


async def test_usage_event_delivered_twice_charges_once(billing):
    user = new_user()
    await top_up(billing, user, "10")
    rid = "req-" + uuid.uuid4().hex
    assert (await reserve(billing, user, "2", rid)).status == 201
    event = await usage_event(user, rid, "0.001250")
    await billing.bus.publish(event)
    await billing.bus.publish(event)  # the same event again (same id)
    await eventually(lambda: _balance_is(billing, user, "9.998750"), what="the charge")
    # another event for the same request (a re-published duplicate with a new id)
    await billing.bus.publish(await usage_event(user, rid, "0.001250"))
    await asyncio.sleep(0.3)
    answer = await check_invariants(billing, user)
    assert answer["balance"] == "9.998750" and answer["held"] == "0.000000"
    transactions = await (await billing.client.get(f"/billing/transactions/{user}",
                                                   headers=ADMIN)).json()
    charges = [t for t in transactions["data"] if t["type"] == "charge"]
    assert len(charges) == 1 and charges[0]["source"] == "usage.recorded"
    # settle after the event is a no-op that reports the existing charge
    resp = await billing.client.post(
        f"/internal/billing/reservations/{rid}/settle", json={"amount": "5"}, headers=ADMIN)
    body = await resp.json()
    assert body["already_charged"] is True and body["charge"]["amount"] == "-0.001250"
    assert (await outbox_types(billing)).count("transaction.created") == 2


async def test_usage_event_without_a_hold_charges_the_user(billing):
    user = new_user()
    await top_up(billing, user, "1")
    await billing.bus.publish(
        Event.new(USAGE_RECORDED, "proxy", {"request_id": "r-" + user, "user_id": user,
                                            "cost_micro": 250_000}))
    await eventually(lambda: _balance_is(billing, user, "0.750000"), what="the charge")
    await check_invariants(billing, user)
    # a reservation under an id that is already charged is refused and holds nothing
    resp = await reserve(billing, user, "0.5", "r-" + user)
    assert resp.status == 409
    assert "already charged" in (await resp.json())["error"]["message"]
    assert (await check_invariants(billing, user))["held"] == "0.000000"


async def test_unusable_usage_event_is_dead_lettered_and_charges_nothing(billing):
    user = new_user()
    await top_up(billing, user, "1")
    for data in ({"request_id": "r1", "user_id": user, "cost": 0.5},
                 {"request_id": "r2", "user_id": user, "cost": "-1"},
                 {"user_id": user, "cost": "1"}):
        await billing.bus.publish(Event.new(USAGE_RECORDED, "proxy", data))

    async def dead() -> bool:
        return (await billing.bus.dlq_depth("billing.usage")) == 3

    await eventually(dead, what="three dead letters")
    assert (await balance_of(billing, user))["balance"] == "1.000000"


async def test_settle_and_usage_event_racing_charge_once(billing):
    user = new_user()
    await top_up(billing, user, "10")
    rids = [uuid.uuid4().hex for _ in range(20)]
    for rid in rids:
        assert (await reserve(billing, user, "0.1", rid)).status == 201

    async def settle(rid):
        resp = await billing.client.post(f"/internal/billing/reservations/{rid}/settle",
                                         json={"amount": "0.05"}, headers=ADMIN)
        assert resp.status == 200

    async def publish(rid):
        await billing.bus.publish(await usage_event(user, rid, "0.05"))

    await asyncio.gather(*(f(rid) for rid in rids for f in (settle, publish)))
    await asyncio.sleep(0.3)
    answer = await check_invariants(billing, user)
    assert answer["balance"] == "9.000000" and answer["held"] == "0.000000"


# -- concurrency: never overdraw ---------------------------------------------------------


async def _concurrent_reservations(billing) -> None:
    user = new_user()
    await top_up(billing, user, "10")
    results = await asyncio.gather(*(reserve(billing, user, "1") for _ in range(200)))
    statuses = [r.status for r in results]
    assert statuses.count(201) == 10, statuses
    assert statuses.count(402) == 190
    answer = await check_invariants(billing, user)
    assert answer == {"user_id": user, "balance": "10.000000", "held": "10.000000",
                      "available": "0.000000", "currency": "USD"}
    async with billing.db.session() as session:
        holds = (await session.execute(
            select(store.holds).where(store.holds.c.user_id == user))).all()
    assert len(holds) == 10


async def test_200_concurrent_reservations_never_overdraw_sqlite(billing):
    await _concurrent_reservations(billing)


async def test_200_concurrent_reservations_never_overdraw_postgres(pg_url, start_service):
    billing = await start_service("billing", database_url=pg_url)
    assert billing.db.is_postgres
    await _concurrent_reservations(billing)


async def test_postgres_ledger_rules(pg_url, start_service):
    billing = await start_service("billing", database_url=pg_url)
    user = new_user()
    key = uuid.uuid4().hex
    answers = await asyncio.gather(*(top_up(billing, user, "3", key=key) for _ in range(10)))
    assert {a.status for a in answers} == {201}
    bodies = [await a.json() for a in answers]
    assert all(body == bodies[0] for body in bodies)
    assert (await balance_of(billing, user))["balance"] == "3.000000"
    rids = [uuid.uuid4().hex for _ in range(10)]
    await asyncio.gather(*(reserve(billing, user, "0.2", rid) for rid in rids))

    async def settle(rid):
        resp = await billing.client.post(f"/internal/billing/reservations/{rid}/settle",
                                         json={"amount": "0.1"}, headers=ADMIN)
        assert resp.status == 200, await resp.text()

    async def publish(rid):
        await billing.bus.publish(await usage_event(user, rid, "0.1"))

    await asyncio.gather(*(f(rid) for rid in rids for f in (settle, publish, settle)))
    await asyncio.sleep(0.5)
    answer = await check_invariants(billing, user)
    assert answer["balance"] == "2.000000" and answer["held"] == "0.000000"

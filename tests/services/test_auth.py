"""The auth service: API keys and forward-auth validation, through real sockets."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select, text

from services.auth import store
from services.common.events import event_outbox

from .conftest import ADMIN, MASTER_KEY, as_user, new_user
from .test_kit import assert_error


@pytest.fixture
async def auth(start_service):
    return await start_service("auth")


async def create_key(auth, user_id: str, **extra) -> dict:
    resp = await auth.client.post("/auth/api-keys", json={"user_id": user_id, **extra},
                                  headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def test_create_key_shows_it_once_and_stores_only_a_hash(auth):
    user = new_user()
    resp = await auth.client.post(
        "/auth/api-keys", json={"user_id": user, "name": "laptop", "scopes": ["chat"]},
        headers=ADMIN,
    )
    assert resp.status == 201
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    key = body["key"]
    assert key.startswith("sk-") and len(key) >= 3 + 43
    assert body["user_id"] == user
    assert body["name"] == "laptop"
    assert body["scopes"] == ["chat"]
    assert body["id"].startswith("key_")
    assert body["created_at"].endswith("Z")
    assert body["hint"] == f"{key[:7]}...{key[-4:]}"

    # the database holds the hash and the hint, never the key
    async with auth.db.session() as session:
        rows = (await session.execute(text("SELECT * FROM api_keys"))).mappings().all()
        outbox = (await session.execute(select(event_outbox.c.payload))).scalars().all()
    assert len(rows) == 1
    assert rows[0]["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert not any(key in str(value) for value in rows[0].values())
    # the event announces the key without the key or its hash
    assert len(outbox) == 1 and '"apikey.created"' in outbox[0]
    assert key not in outbox[0] and rows[0]["key_hash"] not in outbox[0]
    assert body["id"] in outbox[0]

    # listing never shows the key or the hash again
    listed = await (await auth.client.get(f"/auth/api-keys?user_id={user}", headers=ADMIN)).json()
    assert [k["id"] for k in listed["data"]] == [body["id"]]
    assert "key" not in listed["data"][0] and "key_hash" not in listed["data"][0]
    assert key not in str(listed)
    assert listed["data"][0]["hint"] == body["hint"]
    assert listed["data"][0]["active"] is True


async def test_keys_are_random_and_distinct(auth):
    user = new_user()
    keys = {(await create_key(auth, user))["key"] for _ in range(5)}
    assert len(keys) == 5


async def test_validate_answers_identity_in_body_and_headers(auth):
    user = new_user()
    created = await create_key(auth, user, scopes=["chat", "admin"])
    resp = await auth.client.get("/auth/validate",
                                 headers={"Authorization": f"Bearer {created['key']}"})
    assert resp.status == 200
    assert await resp.json() == {
        "user_id": user, "key_id": created["id"], "scopes": ["admin", "chat"]
    }
    assert resp.headers["X-User-Id"] == user
    assert resp.headers["X-Key-Id"] == created["id"]
    assert resp.headers["X-Key-Scopes"] == "admin,chat"


async def test_validate_master_key_is_admin(auth):
    resp = await auth.client.get("/auth/validate", headers=ADMIN)
    assert resp.status == 200
    assert await resp.json() == {"user_id": "admin", "key_id": "master", "scopes": ["admin"]}
    assert resp.headers["X-User-Id"] == "admin"
    assert resp.headers["X-Key-Id"] == "master"
    assert resp.headers["X-Key-Scopes"] == "admin"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer sk-not-a-real-key",
        "Bearer not-even-sk",
        "Bearer sk-" + "a" * 400,
        f"Bearer {MASTER_KEY[:-1]}",
    ],
)
async def test_validate_refuses_bad_credentials_with_json_401(auth, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = await auth.client.get("/auth/validate", headers=headers)
    assert resp.status == 401
    assert "Bearer" in resp.headers["WWW-Authenticate"]
    assert "X-User-Id" not in resp.headers
    assert_error(await resp.json(), "unauthorized")


async def test_revoked_key_fails_validate_at_once(auth):
    user = new_user()
    created = await create_key(auth, user)
    bearer = {"Authorization": f"Bearer {created['key']}"}
    assert (await auth.client.get("/auth/validate", headers=bearer)).status == 200

    resp = await auth.client.delete(f"/auth/api-keys/{created['id']}", headers=ADMIN)
    assert resp.status == 200
    revoked = await resp.json()
    assert revoked["active"] is False and revoked["revoked_at"]

    resp = await auth.client.get("/auth/validate", headers=bearer)
    assert resp.status == 401
    assert "revoked" in (await resp.json())["error"]["message"]

    # revoking again changes nothing (same time, no second event)
    again = await (await auth.client.delete(f"/auth/api-keys/{created['id']}",
                                            headers=ADMIN)).json()
    assert again["revoked_at"] == revoked["revoked_at"]
    async with auth.db.session() as session:
        types = (await session.execute(select(event_outbox.c.type))).scalars().all()
    assert sorted(types) == ["apikey.created", "apikey.revoked"]


async def test_revoke_unknown_key_is_404(auth):
    resp = await auth.client.delete("/auth/api-keys/key_doesnotexist", headers=ADMIN)
    assert resp.status == 404
    assert_error(await resp.json(), "not_found")


async def test_list_filters_by_user_and_paginates(auth):
    alice, bob = new_user(), new_user()
    alice_ids = [(await create_key(auth, alice, name=f"a{i}"))["id"] for i in range(5)]
    await create_key(auth, bob)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        url = f"/auth/api-keys?user_id={alice}&limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await auth.client.get(url, headers=ADMIN)).json()
        pages += 1
        assert len(page["data"]) <= 2
        seen += [k["id"] for k in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(alice_ids))  # newest first, each once

    everyone = await (await auth.client.get("/auth/api-keys", headers=ADMIN)).json()
    assert {k["user_id"] for k in everyone["data"]} == {alice, bob}


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/auth/api-keys"), ("GET", "/auth/api-keys"), ("DELETE", "/auth/api-keys/key_x")],
)
async def test_admin_endpoints_refuse_users_and_anonymous(auth, method, path):
    body = {"user_id": "someone"}
    resp = await auth.client.request(method, path, json=body, headers=as_user("someone", "chat"))
    assert resp.status == 403
    assert_error(await resp.json(), "forbidden")
    resp = await auth.client.request(method, path, json=body)
    assert resp.status == 401
    assert_error(await resp.json(), "unauthorized")


async def test_a_user_key_with_admin_scope_acts_as_admin(auth):
    resp = await auth.client.post("/auth/api-keys", json={"user_id": new_user()},
                                  headers=as_user("ops", "admin"))
    assert resp.status == 201


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "'user_id' is required"),
        ({"user_id": None}, "'user_id' is required"),
        ({"user_id": 42}, "'user_id' must be a string"),
        ({"user_id": ""}, "'user_id' must be 1-128"),
        ({"user_id": "has space"}, "'user_id' must be 1-128"),
        ({"user_id": "x" * 129}, "'user_id' must be 1-128"),
        ({"user_id": "u", "name": 5}, "'name' must be a string"),
        ({"user_id": "u", "name": "n" * 201}, "'name' is longer than 200"),
        ({"user_id": "u", "scopes": "admin"}, "'scopes' must be an array"),
        ({"user_id": "u", "scopes": [1]}, "'scopes' entries"),
        ({"user_id": "u", "scopes": ["Admin Scope"]}, "'scopes' entries"),
        ({"user_id": "u", "scopes": ["a,b"]}, "'scopes' entries"),
        ({"user_id": "u", "scope": ["admin"]}, "unknown field(s): scope"),
    ],
)
async def test_create_key_bad_input_is_precise_400(auth, body, fragment):
    resp = await auth.client.post("/auth/api-keys", json=body, headers=ADMIN)
    assert resp.status == 400
    payload = await resp.json()
    assert_error(payload, "bad_request")
    assert fragment in payload["error"]["message"]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [("limit=0", "'limit'"), ("limit=501", "'limit'"), ("limit=ten", "'limit'"),
     ("cursor=%%%", "'cursor'"), ("cursor=eyJ4IjoxfQ", "'cursor'"), ("user_id=a%20b", "user_id")],
)
async def test_list_bad_query_is_400(auth, query, fragment):
    resp = await auth.client.get(f"/auth/api-keys?{query}", headers=ADMIN)
    assert resp.status == 400
    assert fragment in (await resp.json())["error"]["message"]


def test_hash_lookup_helpers():
    key = store.new_key()
    assert key.startswith("sk-")
    assert len(key) == 3 + 43  # 32 random bytes, urlsafe base64 without padding
    assert store.hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert store.hash_key(key) != store.hash_key(key + "x")

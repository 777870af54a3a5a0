"""The service kit: health, JSON errors, request ids, identity, settings."""

from __future__ import annotations

from typing import ClassVar

import pytest
from aiohttp import web
from pydantic import Field, ValidationError

from services.auth.settings import AuthSettings
from services.billing.settings import BillingSettings
from services.common.app import BUS, Subscription, create_service_app, json_response
from services.common.db import Database
from services.common.errors import Conflict
from services.common.events import InProcessBus
from services.common.identity import require_admin, require_user_or_admin
from services.common.inputs import read_json
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from tests.support import fast_event_settings, pg_admin

from .conftest import ADMIN, MASTER_KEY, as_user


class DemoSettings(ServiceSettings):
    service_name: ClassVar[str] = "demo"
    port: int = Field(0, validation_alias="DEMO_PORT")
    database_url: str | None = Field(None, validation_alias="DEMO_DATABASE_URL")


demo_routes = web.RouteTableDef()


@demo_routes.get("/demo/boom")
async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret internal detail")


@demo_routes.post("/demo/echo")
async def echo(request: web.Request) -> web.Response:
    data = await read_json(request)
    return json_response({"keys": sorted(data)})


@demo_routes.get("/demo/conflict")
async def conflict(request: web.Request) -> web.Response:
    raise Conflict("already there")


@demo_routes.get("/demo/admin")
async def admin_only(request: web.Request) -> web.Response:
    identity = require_admin(request)
    return json_response({"user_id": identity.user_id, "key_id": identity.key_id})


@demo_routes.get("/demo/users/{user_id}")
async def own(request: web.Request) -> web.Response:
    identity = require_user_or_admin(request, request.match_info["user_id"])
    return json_response({"caller": identity.user_id, "scopes": sorted(identity.scopes)})


@pytest.fixture
async def demo(aiohttp_client, tmp_path, inprocess_bus):
    settings = DemoSettings(
        database_url=f"sqlite:///{tmp_path}/demo.db", master_key=MASTER_KEY, max_body_size=1024
    )
    app = create_service_app(settings, routes=demo_routes, bus=inprocess_bus, register=False)
    return await aiohttp_client(app)


def assert_error(body: dict, type_: str, request_id: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "request_id"}
    assert body["error"]["type"] == type_
    assert body["error"]["message"]
    if request_id is not None:
        assert body["error"]["request_id"] == request_id


async def test_health_ok(demo):
    resp = await demo.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok"
    assert body["service"] == "demo"
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["events"] == {"status": "ok", "bus": "in-process"}
    assert resp.headers["X-Request-ID"]


async def test_health_503_when_the_bus_is_down(demo, inprocess_bus):
    await inprocess_bus.close()
    resp = await demo.get("/health")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "fail"
    assert body["checks"]["events"]["status"] == "fail"
    assert body["checks"]["database"]["status"] == "ok"


async def test_health_503_when_the_database_is_gone(pg_url, inprocess_bus, aiohttp_client):
    settings = DemoSettings(database_url=pg_url, master_key=MASTER_KEY, health_timeout=3)
    app = create_service_app(settings, routes=demo_routes, bus=inprocess_bus, register=False)
    client = await aiohttp_client(app)
    assert (await client.get("/health")).status == 200
    name = pg_url.rsplit("/", 1)[1]
    await pg_admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    resp = await client.get("/health")
    assert resp.status == 503
    body = await resp.json()
    assert body["checks"]["database"]["status"] == "fail"
    assert body["checks"]["database"]["error"]


async def test_unknown_path_is_json_404(demo):
    resp = await demo.get("/nope", headers={"X-Request-ID": "req-123"})
    assert resp.status == 404
    assert resp.headers["X-Request-ID"] == "req-123"
    body = await resp.json()
    assert_error(body, "not_found", "req-123")
    assert "/nope" in body["error"]["message"]


async def test_wrong_method_is_json_405_with_allow(demo):
    resp = await demo.delete("/demo/echo")
    assert resp.status == 405
    assert "POST" in resp.headers["Allow"]
    assert_error(await resp.json(), "method_not_allowed")


async def test_crash_is_json_500_without_details(demo):
    resp = await demo.get("/demo/boom")
    assert resp.status == 500
    body = await resp.json()
    assert_error(body, "internal_error", resp.headers["X-Request-ID"])
    assert "secret" not in body["error"]["message"]


async def test_service_errors_keep_their_status(demo):
    resp = await demo.get("/demo/conflict")
    assert resp.status == 409
    assert_error(await resp.json(), "conflict")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "must be a JSON object"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON array"),
        (b'"text"', "not a JSON string"),
        (b'{"a": NaN}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
async def test_bad_json_is_400(demo, body, fragment):
    resp = await demo.post("/demo/echo", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    payload = await resp.json()
    assert_error(payload, "bad_request")
    assert fragment in payload["error"]["message"]


async def test_body_too_large_is_json_413(demo):
    resp = await demo.post("/demo/echo", data=b'{"a": "' + b"x" * 4096 + b'"}')
    assert resp.status == 413
    assert_error(await resp.json(), "payload_too_large")


async def test_request_id_generated_when_missing_or_unsafe(demo):
    first = await demo.get("/health")
    second = await demo.get("/health")
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    unsafe = await demo.get("/nope", headers={"X-Request-ID": "bad id\twith spaces"})
    rid = unsafe.headers["X-Request-ID"]
    assert rid != "bad id\twith spaces"
    assert (await unsafe.json())["error"]["request_id"] == rid


async def test_identity_master_key_headers_and_anonymous(demo):
    resp = await demo.get("/demo/admin", headers=ADMIN)
    assert resp.status == 200
    assert await resp.json() == {"user_id": "admin", "key_id": "master"}

    resp = await demo.get("/demo/admin", headers=as_user("u1", "admin"))
    assert resp.status == 200

    resp = await demo.get("/demo/admin", headers=as_user("u1", "chat"))
    assert resp.status == 403
    assert_error(await resp.json(), "forbidden")

    resp = await demo.get("/demo/admin")
    assert resp.status == 401
    assert_error(await resp.json(), "unauthorized")

    resp = await demo.get("/demo/admin", headers={"Authorization": f"Bearer {MASTER_KEY}x"})
    assert resp.status == 401

    resp = await demo.get("/demo/users/u1", headers=as_user("u1", "chat", "x"))
    assert resp.status == 200
    assert await resp.json() == {"caller": "u1", "scopes": ["chat", "x"]}
    resp = await demo.get("/demo/users/u2", headers=as_user("u1"))
    assert resp.status == 403
    resp = await demo.get("/demo/users/u2", headers=ADMIN)
    assert resp.status == 200


async def test_master_bearer_wins_over_identity_headers(demo):
    headers = {**as_user("mallory"), **ADMIN}
    resp = await demo.get("/demo/admin", headers=headers)
    assert await resp.json() == {"user_id": "admin", "key_id": "master"}


async def test_no_master_key_configured_means_no_master(aiohttp_client, tmp_path, inprocess_bus):
    settings = DemoSettings(database_url=f"sqlite:///{tmp_path}/d.db")
    app = create_service_app(settings, routes=demo_routes, bus=inprocess_bus, register=False)
    client = await aiohttp_client(app)
    assert (await client.get("/demo/admin", headers={"Authorization": "Bearer "})).status == 401
    assert (await client.get("/demo/admin", headers=ADMIN)).status == 401


def test_settings_from_environment(monkeypatch, tmp_path):
    for name in ("BILLING_PORT", "BILLING_DATABASE_URL", "SERVICE_HOST", "MASTER_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIAGG_DATA_DIR", str(tmp_path))
    default = BillingSettings()
    assert default.port == DEFAULT_PORTS["billing"] == 3004
    assert default.host == "127.0.0.1"
    assert default.resolved_database_url() == f"sqlite:///{tmp_path}/billing.db"
    assert AuthSettings().port == 3001

    monkeypatch.setenv("BILLING_PORT", "4100")
    monkeypatch.setenv("BILLING_DATABASE_URL", "postgresql://u@db/billing")
    monkeypatch.setenv("BILLING_HOLD_TTL", "2m")
    monkeypatch.setenv("SERVICE_HOST", "0.0.0.0")
    monkeypatch.setenv("MASTER_KEY", MASTER_KEY)
    configured = BillingSettings()
    assert configured.port == 4100
    assert configured.resolved_database_url() == "postgresql://u@db/billing"
    assert configured.hold_ttl == 120.0
    assert configured.resolved_advertise_host() == "127.0.0.1"
    assert configured.master_key_value() == MASTER_KEY
    assert MASTER_KEY not in repr(configured)

    monkeypatch.setenv("BILLING_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        BillingSettings()
    monkeypatch.setenv("BILLING_PORT", "1")
    monkeypatch.setenv("MASTER_KEY", "short")
    with pytest.raises(ValidationError, match="MASTER_KEY"):
        BillingSettings()


async def test_in_process_bus_is_announced_when_amqp_url_is_unset(
    aiohttp_client, tmp_path, monkeypatch, caplog
):
    monkeypatch.delenv("AMQP_URL", raising=False)
    settings = DemoSettings(database_url=f"sqlite:///{tmp_path}/d.db")
    with caplog.at_level("WARNING"):
        app = create_service_app(settings, routes=demo_routes, register=False)
    assert any("AMQP_URL is not set" in r.getMessage() and "demo" in r.getMessage()
               for r in caplog.records)
    client = await aiohttp_client(app)
    assert (await client.get("/health")).status == 200


async def test_given_bus_and_database_outlive_the_app_own_ones_do_not(tmp_path, monkeypatch):
    monkeypatch.delenv("AMQP_URL", raising=False)
    settings = DemoSettings(database_url=f"sqlite:///{tmp_path}/own.db")
    bus = InProcessBus(fast_event_settings())
    db = Database(settings.resolved_database_url())
    shared = create_service_app(settings, routes=demo_routes, database=db, bus=bus,
                                register=False)
    runner = web.AppRunner(shared)
    await runner.setup()
    assert bus.connected  # started by the app
    await runner.cleanup()
    assert bus.connected  # given, so not closed by the app
    assert await db.ping()
    await bus.close()
    await db.close()

    own = create_service_app(settings, routes=demo_routes, register=False)
    runner = web.AppRunner(own)
    await runner.setup()
    assert own[BUS].connected
    await runner.cleanup()
    assert not own[BUS].connected


async def test_metrics_endpoint_shows_outbox_and_queue_depths(aiohttp_client, tmp_path):
    bus = InProcessBus()

    async def never(event, session):
        raise AssertionError("not called")

    app = create_service_app(
        DemoSettings(MASTER_KEY=MASTER_KEY, AIAGG_DATA_DIR=tmp_path),
        routes=demo_routes,
        consumers=[Subscription("billing.usage", ("usage.recorded",), never)],
        database=Database(f"sqlite:///{tmp_path}/demo.db"),
        bus=bus,
        register=False,
    )
    client = await aiohttp_client(app)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'aiagg_events_outbox_backlog{outbox="demo"}' in text
    assert 'aiagg_events_queue_depth{queue="billing.usage"}' in text
    assert 'aiagg_events_dlq_depth{queue="billing.usage"}' in text


def test_services_run_on_uvloop_unless_told_not_to() -> None:
    import uvloop

    from services.common.app import _new_loop
    from services.common.settings import ServiceSettings

    loop = _new_loop(ServiceSettings())
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        assert loop is not None
        loop.close()
    assert _new_loop(ServiceSettings(SERVICE_UVLOOP=False)) is None


def test_analytics_runs_at_a_lower_cpu_priority_by_default() -> None:
    """Background work yields the CPU to the request path (ANALYTICS_NICE, default 5);
    the other services keep their priority unless SERVICE_NICE says otherwise."""
    import subprocess
    import sys

    from services.analytics.settings import AnalyticsSettings
    from services.billing.settings import BillingSettings

    assert AnalyticsSettings().nice == 5 and BillingSettings().nice == 0
    code = (
        "import os; from services.analytics.settings import AnalyticsSettings; "
        "from services.common.app import lower_priority; before = os.nice(0); "
        "lower_priority(AnalyticsSettings()); print(os.nice(0) - before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "5"


async def test_shutdown_does_not_wait_forever_for_a_task_that_ignores_cancellation(
    tmp_path, monkeypatch, caplog
):
    """A background task whose cleanup hangs (seen: a RabbitMQ channel close that never
    got its answer) once kept a SIGTERMed billing alive for good. Shutdown now waits
    ``TASK_STOP_GRACE`` for it, names it in a warning and goes on."""
    import asyncio
    import time

    from services.common import app as kit

    monkeypatch.setattr(kit, "TASK_STOP_GRACE", 0.3)
    started = asyncio.Event()
    forever = asyncio.Event()

    async def stubborn(app: web.Application) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await forever.wait()  # a cleanup that never finishes: the first cancel is spent

    settings = DemoSettings(database_url=f"sqlite:///{tmp_path}/stop.db")
    bus = InProcessBus(fast_event_settings())
    app = create_service_app(
        settings, routes=demo_routes, bus=bus, register=False, tasks=[stubborn]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    await asyncio.wait_for(started.wait(), 5)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="aiagg"):
        await asyncio.wait_for(runner.cleanup(), 10)
    assert time.monotonic() - t0 < 5
    assert any("did not stop within" in r.getMessage() for r in caplog.records)
    forever.set()
    await bus.close()

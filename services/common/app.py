"""The one app factory every service uses, and the ``python -m services.<name>`` runner.

A service is its settings, its routes, its tables, its event consumers and any
background loops; :func:`create_service_app` adds the rest, the same everywhere:

* ``GET /health``: checks the database and the event bus; ``200 {"status": "ok",
  "checks": {...}}`` or ``503 {"status": "fail", ...}`` (Consul's check URL);
* JSON errors for everything (404, 405, 400, 413, 500 ...) in the shape
  ``{"error": {"type", "message", "request_id"}}``; handlers raise
  :class:`~gateway.errors.GatewayError` subclasses (:mod:`services.common.errors`);
* ``X-Request-ID`` accepted (when sane) or generated, echoed on every answer and
  available as ``request[REQUEST_ID]``;
* startup and shutdown in order (``cleanup_ctx``): database tables, event bus,
  outbox relay, consumers, background loops, Consul registration last (so the
  service is announced only when ready, and withdrawn first).

Example (a whole service)::

    routes = web.RouteTableDef()

    @routes.get("/things/{id}")
    async def get_thing(request):
        identity = require_user_or_admin(request, ...)
        async with request.app[DB].transaction() as session:
            ...
            await events.record(session, "thing.changed", {...}, source="things")
        return json_response({...})

    def create_app(settings=None, *, database=None, bus=None, register=True):
        settings = settings or ThingsSettings()
        return create_service_app(
            settings, routes=routes, metadata=[store.metadata],
            consumers=[Subscription("things.usage", ("usage.recorded",), on_usage)],
            database=database, bus=bus, register=register,
        )
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import REGISTRY, generate_latest
from sqlalchemy import MetaData

from gateway.errors import GatewayError
from gateway.gctune import tune_gc
from gateway.registration import ServiceRegistration, registration_ctx

from . import events
from .db import Database, DbSession, normalize_url
from .identity import MasterKey
from .settings import ServiceSettings

__all__ = [
    "BUS",
    "DB",
    "RELAY",
    "REQUEST_ID",
    "SETTINGS",
    "BackgroundTask",
    "ConsumerHandler",
    "Subscription",
    "create_service_app",
    "error_response",
    "json_response",
    "request_id_of",
    "run_service",
]

log = logging.getLogger("aiagg.service")

DB = web.AppKey("aiagg_db", Database)
BUS = web.AppKey("aiagg_bus", events.EventBus)
RELAY = web.AppKey("aiagg_relay", events.OutboxRelay)
SETTINGS = web.AppKey("aiagg_settings", ServiceSettings)
#: the request's id (accepted ``X-Request-ID`` or generated)
REQUEST_ID = web.RequestKey("aiagg_request_id", str)

ConsumerHandler = Callable[[events.Event, DbSession], Awaitable[None]]
#: a long-running loop started with the app and cancelled when it stops
BackgroundTask = Callable[[web.Application], Awaitable[None]]


@dataclass(frozen=True)
class Subscription:
    """Consume ``queue`` (bound to ``bindings``) with an idempotent, transactional handler.

    ``handler(event, session)`` runs in one database transaction that also records the
    event id (consumer name = the queue name), so a duplicate delivery changes nothing;
    the delivery is acknowledged only after that transaction commits.
    """

    queue: str
    bindings: tuple[str, ...]
    handler: ConsumerHandler
    #: optional: handles the new events of a group-committed batch at once
    batch_handler: events.BatchHandler | None = None


# -- JSON answers and errors -----------------------------------------------------------

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")

_HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity",
    429: "rate_limited",
    431: "headers_too_large",
    503: "service_unavailable",
}


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def request_id_of(request: web.Request) -> str | None:
    return request.get(REQUEST_ID)


def error_response(
    status: int,
    type_: str,
    message: str,
    request_id: str | None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"type": type_, "message": message, "request_id": request_id}}
    return json_response(body, status=status, headers=headers)


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}"
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return f"method {request.method} is not allowed on {request.path} (allowed: {allowed})"
    if exc.status == 413:
        limit = request.app[SETTINGS].max_body_size if SETTINGS in request.app else None
        return f"the request body is too large (limit {limit} bytes)"
    text = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    return text or exc.reason


@web.middleware
async def _error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except GatewayError as exc:
        response = error_response(exc.status, exc.type, exc.message, request_id, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers["X-Request-ID"] = request_id
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        response = error_response(
            exc.status,
            _HTTP_TYPES.get(exc.status, "http_error" if exc.status < 500 else "internal_error"),
            _http_error_message(request, exc),
            request_id,
            headers,
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s (request %s)", request.method, request.path,
                      request_id)
        response = error_response(
            500, "internal_error", "internal error; the service logged the details", request_id
        )
    response.headers["X-Request-ID"] = request_id
    return response


# -- health -----------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    checks: dict[str, Any] = {}
    healthy = True
    try:
        await asyncio.wait_for(app[DB].ping(), settings.health_timeout)
        checks["database"] = {"status": "ok"}
    except Exception as exc:  # any failure is an unhealthy database
        healthy = False
        checks["database"] = {"status": "fail", "error": f"{type(exc).__name__}: {exc}"[:300]}
    bus = app[BUS]
    kind = "in-process" if isinstance(bus, events.InProcessBus) else "rabbitmq"
    if bus.connected:
        checks["events"] = {"status": "ok", "bus": kind}
    else:
        checks["events"] = {"status": "fail", "bus": kind, "error": "event bus not connected"}
        if settings.health_requires_broker:
            healthy = False
    body = {
        "status": "ok" if healthy else "fail",
        "service": settings.service_name,
        "version": settings.version,
        "checks": checks,
    }
    return json_response(body, status=200 if healthy else 503)


# -- lifecycle --------------------------------------------------------------------------


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text: the event backbone's counters, outbox backlog, queue depths.

    Not under any gateway route: only reachable where the service listens (loopback
    by default, the compose network in compose), which is where Prometheus scrapes.
    """
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE})


@dataclass(frozen=True)
class _QueueDepths:
    """Keeps the queue and dead-letter depth gauges fresh for the queues a service consumes."""

    queues: Sequence[str]
    every: float = 15.0

    async def __call__(self, app: web.Application) -> None:
        while True:
            try:
                await events.refresh_queue_depths(app[BUS], self.queues)
            except Exception as exc:  # the broker may be away; the gauges just age
                log.debug("queue depth refresh failed: %r", exc)
            await asyncio.sleep(self.every)

    def __str__(self) -> str:
        return "queue-depths"


def _make_bus(settings: ServiceSettings) -> events.EventBus:
    """RabbitMQ when ``AMQP_URL`` is set; otherwise an in-process bus, announced loudly."""
    event_settings = events.EventSettings()
    if settings.amqp_url:
        event_settings = event_settings.model_copy(update={"amqp_url": settings.amqp_url})
    return events.build_bus(settings.service_name, event_settings)


def _lifecycle(
    *,
    metadata: Sequence[MetaData],
    consumers: Sequence[Subscription],
    tasks: Sequence[BackgroundTask],
    own_database: bool,
    own_bus: bool,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings, db, bus = app[SETTINGS], app[DB], app[BUS]
        relay = app[RELAY]
        running: list[asyncio.Task[None]] = []
        subscribed: list[events.Consumer] = []
        try:
            await db.create_all(*metadata, events.outbox_metadata)
            await bus.start()
            await relay.start()
            for sub in consumers:
                subscribed.append(
                    await events.subscribe(
                        bus, db, sub.queue, sub.bindings, sub.handler,
                        batch_handler=sub.batch_handler,
                    )
                )
            for task in tasks:
                running.append(
                    asyncio.create_task(_guard(task, app), name=f"{settings.service_name}:{task}")
                )
            log.info("%s ready on %s:%s", settings.service_name, settings.host, settings.port)
            yield
        finally:
            await _stop_tasks(running, settings.service_name)
            with contextlib.suppress(Exception):
                await relay.close()
            if own_bus:
                with contextlib.suppress(Exception):
                    await bus.close()
            for consumer in subscribed:  # after the bus: its in-flight deliveries commit
                await consumer.close()
            if own_database:
                await db.close()

    return ctx


#: seconds shutdown waits for cancelled background tasks before going on without them
TASK_STOP_GRACE = 5.0


async def _stop_tasks(running: Sequence[asyncio.Task[None]], service: str) -> None:
    """Cancel the background tasks and wait for them, but not forever.

    A task whose cleanup hangs (seen: a RabbitMQ channel close that never got its
    answer) once kept a SIGTERMed service alive for good; now shutdown goes on after
    ``TASK_STOP_GRACE`` seconds and says which task did not stop.
    """
    for task in running:
        task.cancel()
    if not running:
        return
    _done, stuck = await asyncio.wait(running, timeout=TASK_STOP_GRACE)
    for task in stuck:
        log.warning(
            "%s: background task %s did not stop within %.0fs of its cancellation; "
            "shutting down without it",
            service, task.get_name(), TASK_STOP_GRACE,
        )


async def _guard(task: BackgroundTask, app: web.Application) -> None:
    """Run a background loop; if it crashes, log and start it again after a pause."""
    while True:
        try:
            await task(app)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %r crashed; restarting in 5s", task)
            await asyncio.sleep(5)


def _registration(settings: ServiceSettings, tags: Iterable[str]):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        port = settings.port
        if port == 0:  # an ephemeral port (tests): nothing meaningful to announce
            yield
            return
        reg = ServiceRegistration(
            settings.service_name,
            port,
            host=settings.resolved_advertise_host(),
            version=settings.version,
            tags=tuple(tags),
            check_path="/health",
        )
        async for _ in registration_ctx(reg)(app):
            yield

    return ctx


def create_service_app(
    settings: ServiceSettings,
    *,
    routes: Iterable[web.AbstractRouteDef],
    metadata: Sequence[MetaData] = (),
    consumers: Sequence[Subscription] = (),
    tasks: Sequence[BackgroundTask] = (),
    database: Database | None = None,
    bus: events.EventBus | None = None,
    register: bool = True,
    tags: Iterable[str] = (),
) -> web.Application:
    """A service's aiohttp app; see the module docstring.

    ``database`` and ``bus`` may be shared (the local launcher, tests): a given one is
    started (idempotently) but not closed by this app; ones made here from the settings
    (``<SERVICE>_DATABASE_URL``, ``AMQP_URL``) are closed with it.
    """
    app = web.Application(
        middlewares=[_error_middleware], client_max_size=settings.max_body_size
    )
    db = database or Database(settings.resolved_database_url())
    event_bus = bus or _make_bus(settings)
    app[SETTINGS] = settings
    app[DB] = db
    app[BUS] = event_bus
    app[MasterKey] = settings.master_key_value() or ""
    app[RELAY] = events.OutboxRelay(db, event_bus, name=settings.service_name)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    queues = sorted({sub.queue for sub in consumers})
    if queues:
        tasks = [*tasks, _QueueDepths(queues)]
    app.router.add_routes(routes)
    app.cleanup_ctx.append(
        _lifecycle(
            metadata=metadata,
            consumers=consumers,
            tasks=tasks,
            own_database=database is None,
            own_bus=bus is None,
        )
    )
    if register:
        app.cleanup_ctx.append(_registration(settings, tags))
    return app


# -- runner -----------------------------------------------------------------------------

S = TypeVar("S", bound=ServiceSettings)


def run_service(build: Callable[[S], web.Application], settings: S) -> None:
    """Run one service in the foreground until SIGINT/SIGTERM (``python -m services.x``)."""
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = build(settings)
    lower_priority(settings)
    if settings.gc_tune:

        async def _tune_gc(_: web.Application) -> None:  # after the start-up allocations
            tune_gc()

        app.on_startup.append(_tune_gc)
    print(
        f"{settings.service_name} listening on http://{settings.host}:{settings.port} "
        f"(database: {normalize_url(settings.resolved_database_url()).render_as_string()})",
        flush=True,
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        shutdown_timeout=10,
        loop=_new_loop(settings),
    )


def lower_priority(settings: ServiceSettings) -> None:
    """Add ``settings.nice`` to this process's niceness (analytics: 5 by default).

    Measured on two cores at c=50: analytics at nice 5 gave the chat path 10-15 % more
    req/s and a lower p99; analytics still keeps up (it batches more when it runs).
    """
    if settings.nice:
        os.nice(settings.nice)


def _new_loop(settings: ServiceSettings) -> asyncio.AbstractEventLoop | None:
    """uvloop's loop when wanted and installed; None lets aiohttp make asyncio's."""
    if not settings.uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        logging.getLogger("aiagg.service").warning(
            "SERVICE_UVLOOP is on but uvloop is not installed: running on asyncio's loop"
        )
        return None
    return uvloop.new_event_loop()

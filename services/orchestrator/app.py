"""Orchestrator HTTP API.

Public (through the gateway, ``auth: api_key``; the gateway sets ``X-User-Id`` and
``X-Key-Id``, which this service trusts):

``POST /v1/chat/completions``
    The OpenAI chat body (``stream: true`` answers server-sent events). Flow:
    validate (400 naming the parameter; 404 ``model_not_found``) -> plan the providers
    (priority, then weight, skipping those cooling down; 503 ``no_provider_available``
    when none is left) -> hold the worst-case cost with billing (402
    ``insufficient_quota``, nothing charged) -> call the proxy for one provider after
    another until one produces output. Fallback happens only before the first byte
    reaches the client; after that a provider failure ends the stream with an error
    chunk (``finish_reason: "error"`` and an ``error`` object, no ``[DONE]``). The
    hold is left for billing's ``usage.recorded`` charge when usage was recorded,
    released when nothing was served, and settled here only when the proxy vanished
    mid-stream (the README, "Chat completions"). ``route.decided`` is recorded in every case.
``GET /v1/models``
    ``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}``.

Internal (master bearer): ``GET /internal/orchestrator/providers`` (each provider's
cool-down breaker), ``GET /internal/orchestrator/requests/{request_id}`` (the decision).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import aiohttp
from aiohttp import web

from gateway.breaker import Permit
from gateway.client import open_service_client
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.forwarder import CallPolicy, ServiceClient
from gateway.retry import RetryPolicy
from services.common.app import DB, REQUEST_ID, create_service_app, json_response
from services.common.db import Database
from services.common.errors import NotFound
from services.common.events import EventBus
from services.common.identity import Identity, identify, require_admin
from services.common.ids import uuid7
from services.common.inputs import utcnow, validate_identifier
from services.common.logthrottle import ThrottledLog
from services.common.money import format_micro
from services.providers.chunks import DeliveredText, stream_error_chunk
from services.providers.config import Catalog, ModelRoute, load_catalog
from services.providers.pricing import (
    cost_micro,
    estimate_prompt_tokens,
    estimate_tokens,
    reserve_micro,
)
from services.providers.sse import DONE, SSEError, encode_done, encode_event, iter_sse_batches

from . import store
from .events import record_decision
from .routing import BreakerOpenError, ProviderPool
from .settings import OrchestratorSettings
from .validation import ChatRequest, OpenAIError, parse_body, validate_chat

log = logging.getLogger("aiagg.orchestrator")
#: per-request failures of a dependency that is down: one line per reason every 5 s
outage_log = ThrottledLog(log, every=5.0)

PROXY_PATH = "/internal/proxy/chat/completions"
RESERVATIONS = "/internal/billing/reservations"

routes = web.RouteTableDef()


@dataclass
class Peers:
    """How this service reaches billing and the proxy (filled in at startup)."""

    settings: OrchestratorSettings
    client: ServiceClient | None = None
    owned: bool = True
    proxy_policies: dict[str, CallPolicy] = field(default_factory=dict)

    @cached_property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.master_key_value()}"}

    @cached_property
    def billing_policy(self) -> CallPolicy:
        timeout = self.settings.billing_timeout
        # every billing call is idempotent by request_id, so POSTs may be retried too
        return CallPolicy(
            connect_timeout=min(1.0, timeout),
            per_try_timeout=timeout,
            total_timeout=timeout * 3,
            retry=RetryPolicy(
                attempts=3,
                on=frozenset({"connect-error", "502", "503", "504"}),
                methods=frozenset({"GET", "POST"}),
            ),
        )

    def proxy_policy(self, route: ModelRoute) -> CallPolicy:
        policy = self.proxy_policies.get(route.provider)
        if policy is None:
            s = self.settings
            # a POST to the proxy is repeated only when it was never sent
            policy = CallPolicy(
                connect_timeout=1.0,
                per_try_timeout=route.timeout + s.proxy_margin,
                total_timeout=max(s.proxy_timeout, route.timeout + s.proxy_margin),
                retry=RetryPolicy(
                    attempts=2, on=frozenset({"connect-error"}), methods=frozenset()
                ),
            )
            self.proxy_policies[route.provider] = policy
        return policy


CATALOG = web.AppKey("aiagg_orchestrator_catalog", Catalog)
POOL = web.AppKey("aiagg_orchestrator_pool", ProviderPool)
PEERS = web.AppKey("aiagg_orchestrator_peers", Peers)


# -- billing ------------------------------------------------------------------------------


class BillingUnavailable(Exception):
    pass


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except ValueError:
        pass
    return raw[:300].decode("utf-8", errors="replace")


async def _billing(peers: Peers, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    assert peers.client is not None
    try:
        status, _, raw = await peers.client.request(
            "billing", "POST", path, json_body=body, headers=peers.auth,
            policy=peers.billing_policy,
        )
    except GatewayError as exc:
        raise BillingUnavailable(exc.message) from None
    return status, raw


async def reserve(peers: Peers, request_id: str, user_id: str, amount: int) -> None:
    status, raw = await _billing(
        peers,
        RESERVATIONS,
        {"request_id": request_id, "user_id": user_id, "amount": format_micro(amount)},
    )
    if status in (200, 201):
        return
    if status == 402:
        raise OpenAIError(
            402,
            f"You exceeded your current quota: {_error_message(raw)}. Top up your balance.",
            type_="insufficient_quota",
            code="insufficient_quota",
        )
    raise BillingUnavailable(f"billing answered {status}: {_error_message(raw)}")


# -- the chat flow ------------------------------------------------------------------------


class _ClientGone(Exception):
    """Writing to the client failed: it hung up."""


async def _write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except (OSError, aiohttp.ClientError, RuntimeError) as exc:
        raise _ClientGone(str(exc)) from None


class ChatFlow:
    """One chat request from the reservation to ``route.decided``."""

    def __init__(
        self,
        request: web.Request,
        identity: Identity,
        chat: ChatRequest,
        plan: list[ModelRoute],
    ) -> None:
        app = request.app
        self.request = request
        self.settings: OrchestratorSettings = app[PEERS].settings
        self.peers: Peers = app[PEERS]
        self.pool: ProviderPool = app[POOL]
        self.db: Database = app[DB]
        self.identity = identity
        self.chat = chat
        self.plan = plan
        self.request_id = f"chatcmpl-{uuid7().hex}"
        self.started = utcnow()
        self.prompt_estimate = estimate_prompt_tokens(chat.messages)
        self.attempts: list[dict[str, Any]] = []
        self.reserved: int | None = None
        self.served_by: str | None = None
        #: True once usage was (or may have been) recorded by the proxy
        self.metered = False
        self.settled: int | None = None
        self.outcome = "failed"
        self.error: dict[str, Any] | None = None

    # -- money ---------------------------------------------------------------------

    def worst_case(self) -> int:
        """The hold: the dearest provider's price for the prompt estimate plus the
        completion cap (max_tokens, or the model's max_output_tokens)."""
        amount = max(
            reserve_micro(
                self.prompt_estimate,
                self.chat.max_tokens or route.max_output_tokens,
                route.input_price,
                route.output_price,
            )
            for route in self.chat.routes
        )
        return max(amount, 1)

    async def reserve(self) -> None:
        amount = self.worst_case()
        await reserve(self.peers, self.request_id, self.identity.user_id, amount)
        self.reserved = amount

    async def finish(self) -> None:
        """Close the hold if nothing was metered, then record the decision."""
        hold = None
        if self.reserved is not None:
            if self.settled is not None:
                hold = "settled"
            elif self.metered:
                hold = "usage"
            else:
                hold = "released"
                try:
                    status, raw = await _billing(
                        self.peers, f"{RESERVATIONS}/{self.request_id}/release", {}
                    )
                    if status != 200:
                        log.error("release of %s: billing answered %s: %s", self.request_id,
                                  status, _error_message(raw))
                except BillingUnavailable as exc:
                    log.error("release of %s failed (%s); the hold expires by itself",
                              self.request_id, exc)
        decision = store.Decision(
            request_id=self.request_id,
            user_id=self.identity.user_id,
            key_id=self.identity.key_id,
            model=self.chat.model,
            provider=self.served_by,
            stream=self.chat.stream,
            outcome=self.outcome,
            fallback=sum(1 for a in self.attempts if a["outcome"] != "skipped") > 1,
            attempts=self.attempts,
            reserved_micro=self.reserved,
            hold=hold,
            settled_micro=self.settled,
            error=self.error,
            created_at=self.started,
            finished_at=utcnow(),
        )
        try:
            await record_decision(self.db, decision)
        except Exception:
            log.exception("could not record the decision for %s", self.request_id)

    # -- attempts ------------------------------------------------------------------

    def _envelope(self, route: ModelRoute, attempt: int) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "user_id": self.identity.user_id,
            "key_id": self.identity.key_id,
            "provider": route.provider,
            "model": route.model,
            "attempt": attempt,
            "request": self.chat.body,
        }

    def _headers(self) -> dict[str, str]:
        headers = dict(self.peers.auth)
        gateway_id = self.request.get(REQUEST_ID)
        if gateway_id:
            headers["X-Request-ID"] = gateway_id
        return headers

    def _attempt(self, route: ModelRoute, outcome: str, started: float, **extra: Any) -> None:
        entry = {
            "provider": route.provider,
            "outcome": outcome,
            "latency_ms": int((time.monotonic() - started) * 1000),
        }
        entry.update({k: v for k, v in extra.items() if v is not None})
        self.attempts.append(entry)

    def _fail(self, type_: str, code: str, message: str) -> None:
        self.error = {"type": type_, "code": code, "message": message[:1000]}

    def _refused(self, route: ModelRoute, status: int, raw: bytes, permit: Permit,
                 started: float) -> OpenAIError | None:
        """Handle a non-200 answer of the proxy: None to try the next provider, or the
        error to give the client."""
        error: dict[str, Any] = {}
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                error = data["error"]
        except ValueError:
            pass
        message = str(error.get("message") or _error_message(raw))
        if status == 424 and error.get("retryable") is False:
            permit.success()  # the provider is fine; the request is not
            self._attempt(route, "rejected", started, status=error.get("status"), error=message)
            self.outcome = "rejected"
            self._fail("invalid_request_error", "provider_rejected_request", message)
            return OpenAIError(400, message, code="provider_rejected_request")
        if status == 424:
            permit.failure()
        else:
            permit.release()  # the proxy itself refused: not the provider's fault
            message = f"proxy answered {status}: {message}"
        self._attempt(route, "failed", started, error=message, code=error.get("code"))
        return None

    def _candidates(self) -> AsyncIterator[tuple[ModelRoute, Permit, int]]:
        async def gen() -> AsyncIterator[tuple[ModelRoute, Permit, int]]:
            tries = 0
            for route in self.plan:
                if tries >= self.settings.max_attempts:
                    return
                try:
                    permit = self.pool.acquire(route.provider)
                except BreakerOpenError:
                    self.attempts.append(
                        {"provider": route.provider, "outcome": "skipped",
                         "reason": "cooling_down", "latency_ms": 0}
                    )
                    continue
                tries += 1
                yield route, permit, tries

        return gen()

    def _exhausted(self) -> OpenAIError:
        tried = [a for a in self.attempts if a["outcome"] != "skipped"]
        if not tried:
            self.outcome = "no_provider"
            message = f"every provider of model {self.chat.model!r} is cooling down; retry later"
            self._fail("api_error", "no_provider_available", message)
            retry = self.pool.retry_after(self.chat.model)
            return OpenAIError(
                503, message, type_="api_error", code="no_provider_available",
                headers={"Retry-After": str(max(1, int(retry + 0.999)))},
            )
        summary = "; ".join(f"{a['provider']}: {a.get('error', 'failed')}" for a in tried)
        message = f"no provider could serve model {self.chat.model!r} ({summary})"
        self.outcome = "failed"
        self._fail("api_error", "provider_error", message)
        return OpenAIError(502, message, type_="api_error", code="provider_error")

    def _proxy_down(self, route: ModelRoute, permit: Permit, started: float,
                    exc: GatewayError) -> OpenAIError:
        permit.release()
        self._attempt(route, "failed", started, error=exc.message, code="proxy_unavailable")
        self.outcome = "failed"
        self._fail("api_error", "proxy_unavailable", exc.message)
        return OpenAIError(503, f"the provider proxy is unavailable: {exc.message}",
                           type_="api_error", code="proxy_unavailable",
                           headers={"Retry-After": "1"})

    def _unreachable(self, exc: GatewayError) -> bool:
        """The proxy itself could not be reached (never sent): no provider is to blame."""
        return isinstance(exc, ServiceUnavailable) or getattr(exc, "never_sent", False)

    def _call_failed(self, route: ModelRoute, permit: Permit, started: float,
                     exc: GatewayError) -> OpenAIError | None:
        if self._unreachable(exc):
            return self._proxy_down(route, permit, started, exc)
        # a timeout or a broken connection: the proxy may have acted on it, but it
        # meters a request at most once, and only while its caller is still there
        permit.failure()
        self._attempt(route, "failed", started, error=exc.message, code=exc.type)
        return None

    async def complete(self) -> web.StreamResponse:
        client = self.peers.client
        assert client is not None
        async for route, permit, number in self._candidates():
            with permit:  # an attempt ended by anything unforeseen releases its permit
                started = time.monotonic()
                try:
                    status, _, raw = await client.request(
                        "proxy", "POST", PROXY_PATH, json_body=self._envelope(route, number),
                        headers=self._headers(), policy=self.peers.proxy_policy(route),
                    )
                except GatewayError as exc:
                    error = self._call_failed(route, permit, started, exc)
                    if error is not None:
                        return error.response(self.request_id)
                    continue
                if status == 200:
                    permit.success()
                    self._attempt(route, "served", started)
                    self.served_by, self.metered, self.outcome = (
                        route.provider, True, "completed")
                    return web.Response(
                        body=raw,
                        content_type="application/json",
                        headers={"X-Aiagg-Provider": route.provider},
                    )
                refusal = self._refused(route, status, raw, permit, started)
                if refusal is not None:
                    return refusal.response(self.request_id)
        return self._exhausted().response(self.request_id)

    async def stream(self) -> web.StreamResponse:
        client = self.peers.client
        assert client is not None
        async for route, permit, number in self._candidates():
            with permit:
                started = time.monotonic()
                body = json.dumps(self._envelope(route, number)).encode()
                headers = {**self._headers(), "Content-Type": "application/json"}
                try:
                    async with client.stream(
                        "proxy", "POST", PROXY_PATH, body=body, headers=headers,
                        policy=self.peers.proxy_policy(route),
                    ) as exchange:
                        upstream = exchange.response
                        if upstream.status == 200:
                            return await self._relay(route, permit, started, upstream)
                        try:
                            raw = await upstream.read()
                        except (aiohttp.ClientError, OSError) as exc:
                            raw = json.dumps({"error": {"message": str(exc)}}).encode()
                        refusal = self._refused(route, upstream.status, raw, permit, started)
                        if refusal is not None:
                            return refusal.response(self.request_id)
                except GatewayError as exc:
                    error = self._call_failed(route, permit, started, exc)
                    if error is not None:
                        return error.response(self.request_id)
                    continue
        return self._exhausted().response(self.request_id)

    async def _relay(self, route: ModelRoute, permit: Permit, started: float,
                     upstream: Any) -> web.StreamResponse:
        """Pass the proxy's stream on; from here on there is no fallback."""
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Aiagg-Provider": route.provider,
            },
        )
        self.served_by = route.provider
        self.metered = True  # the proxy meters whatever it delivered
        terminal: str | None = None
        broken: str | None = None
        delivered = DeliveredText()
        try:
            try:
                await response.prepare(self.request)
            except (OSError, aiohttp.ClientError, RuntimeError) as exc:
                raise _ClientGone(str(exc)) from None
            # the events of one read go on in one write (the proxy sends bursts at once);
            # the last ones go with [DONE] and the end of the body
            events: list[bytes] = []
            async for datas in iter_sse_batches(upstream.content.iter_any()):
                events = []
                for data in datas:
                    if data.strip() == DONE:
                        terminal = "done"
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        broken = "the proxy sent a chunk that is not JSON"
                        break
                    if not isinstance(chunk, dict):
                        broken = "the proxy sent a chunk that is not an object"
                        break
                    if chunk.get("error"):
                        terminal = "error"
                        error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                        self._fail("provider_error",
                                   str(error.get("code") or "stream_interrupted"),
                                   str(error.get("message") or "the provider failed mid-stream"))
                        events.append(encode_event(chunk))
                        break
                    if not chunk.get("choices"):
                        if self.chat.include_usage:
                            events.append(encode_event(chunk))
                        continue
                    delivered.observe(chunk)
                    events.append(encode_event(chunk))
                if terminal == "done":
                    break
                if events:
                    await _write(response, b"".join(events))
                if terminal or broken:
                    break
        except _ClientGone:
            permit.release()
            self._attempt(route, "served", started, note="client_disconnected")
            self.outcome = "client_disconnected"  # not an error of the platform's
            return response
        except (aiohttp.ClientError, OSError, SSEError) as exc:
            broken = f"the provider proxy stopped mid-stream: {type(exc).__name__}: {exc}"

        if terminal == "done":
            permit.success()
            self._attempt(route, "served", started)
            self.outcome = "completed"
            try:
                await response.write_eof(b"".join(events) + encode_done())
            except (OSError, aiohttp.ClientError, RuntimeError):
                pass
            return response
        permit.failure()
        self.outcome = "cut"
        if terminal == "error":
            self._attempt(route, "cut", started, error=self.error and self.error["message"])
        else:
            # the proxy vanished without its terminal event: it may not have metered
            # the stream, so charge the delivered-tokens rule here (billing charges a
            # request once, whichever of this and a late usage.recorded comes first)
            message = broken or "the provider proxy ended the stream early"
            self._attempt(route, "cut", started, error=message)
            self._fail("api_error", "stream_interrupted", message)
            completion = estimate_tokens(delivered.text)
            cost = cost_micro(self.prompt_estimate, completion, route.input_price,
                              route.output_price)
            usage = {
                "prompt_tokens": self.prompt_estimate,
                "completion_tokens": completion,
                "total_tokens": self.prompt_estimate + completion,
                "cost": format_micro(cost),
                "estimated": True,
            }
            await self._settle(cost)
            base = {"id": self.request_id, "created": int(time.time()), "model": route.model,
                    "provider": route.provider}
            try:
                await _write(response, encode_event(stream_error_chunk(base, message, usage)))
            except _ClientGone:
                pass
        try:
            await response.write_eof()
        except (OSError, aiohttp.ClientError):
            pass
        return response

    async def _settle(self, amount: int) -> None:
        if self.reserved is None:
            return
        try:
            status, raw = await _billing(
                self.peers, f"{RESERVATIONS}/{self.request_id}/settle",
                {"amount": format_micro(amount)},
            )
        except BillingUnavailable as exc:
            log.error("settle of %s failed (%s): the hold will expire uncharged",
                      self.request_id, exc)
            return
        if status == 200:
            try:
                already = bool(json.loads(raw).get("already_charged"))
            except (ValueError, AttributeError):
                already = False
            if already:
                log.info("%s was already charged from its usage event", self.request_id)
            else:
                self.settled = amount
        else:
            log.error("settle of %s: billing answered %s: %s", self.request_id, status,
                      _error_message(raw))


# -- handlers -----------------------------------------------------------------------------


def _identity(request: web.Request) -> Identity:
    identity = identify(request)
    if identity is None:
        raise OpenAIError(
            401,
            "You didn't provide an API key. Call through the gateway with "
            "'Authorization: Bearer <api key>'.",
            code="invalid_api_key",
        )
    return identity


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    request_id = request.get(REQUEST_ID)
    try:
        identity = _identity(request)
        chat = validate_chat(parse_body(await request.read()), request.app[CATALOG])
    except OpenAIError as exc:
        return exc.response(request_id)
    flow = ChatFlow(request, identity, chat, request.app[POOL].plan(chat.model))
    if not flow.plan:
        error = flow._exhausted()
        await flow.finish()
        return error.response(flow.request_id)
    try:
        await flow.reserve()
    except OpenAIError as exc:
        return exc.response(flow.request_id)
    except BillingUnavailable as exc:
        outage_log.log(
            logging.ERROR, f"billing:{exc}", "billing unavailable for %s: %s", flow.request_id, exc
        )
        return OpenAIError(
            503, "billing is unavailable; nothing was charged, retry later",
            type_="api_error", code="billing_unavailable", headers={"Retry-After": "1"},
        ).response(flow.request_id)
    try:
        return await (flow.stream() if chat.stream else flow.complete())
    finally:
        await flow.finish()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    try:
        _identity(request)
    except OpenAIError as exc:
        return exc.response(request.get(REQUEST_ID))
    catalog = request.app[CATALOG]
    return json_response(
        {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": catalog.loaded_at,
                 "owned_by": "aiagg"}
                for model in catalog.models()
            ],
        }
    )


@routes.get("/internal/orchestrator/providers")
async def providers(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response({"data": request.app[POOL].snapshot()})


@routes.get("/internal/orchestrator/requests/{request_id}")
async def get_request(request: web.Request) -> web.Response:
    require_admin(request)
    request_id = validate_identifier(request.match_info["request_id"], "request_id")
    async with request.app[DB].session() as session:
        decision = await store.get_decision(session, request_id)
    if decision is None:
        raise NotFound(f"no chat request {request_id!r}")
    for key in ("created_at", "finished_at"):
        decision[key] = decision[key].isoformat() + "Z"
    return json_response(decision)


def _peers_ctx(app: web.Application) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        peers = app[PEERS]
        if peers.client is None:
            peers.client = await open_service_client(peers.settings.routes_file)
            peers.owned = True
        try:
            yield
        finally:
            if peers.owned and peers.client is not None:
                await peers.client.close()

    return ctx


def create_app(
    settings: OrchestratorSettings | None = None,
    *,
    database: Database | None = None,
    bus: EventBus | None = None,
    register: bool = True,
    catalog: Catalog | None = None,
    service_client: ServiceClient | None = None,
) -> web.Application:
    """The orchestrator; the providers file is read (and validated) here, at startup.

    Without ``service_client`` one is built at startup from ``GATEWAY_ROUTES_FILE``.
    """
    settings = settings or OrchestratorSettings()
    if not settings.master_key_value():
        raise ValueError(
            "MASTER_KEY is not set: the orchestrator needs it to call billing and the proxy"
        )
    catalog = catalog or load_catalog(settings.providers_file)
    app = create_service_app(
        settings,
        routes=routes,
        metadata=[store.metadata],
        database=database,
        bus=bus,
        register=register,
    )
    app[CATALOG] = catalog
    app[POOL] = ProviderPool(catalog)
    app[PEERS] = Peers(settings, client=service_client, owned=service_client is None)
    # before the Consul registration (the last context), so peers are ready when announced
    app.cleanup_ctx.insert(1, _peers_ctx(app))
    return app

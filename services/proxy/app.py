"""Proxy HTTP API (internal: no gateway route points here; the master bearer only).

``POST /internal/proxy/chat/completions``
    Call ONE provider for the orchestrator. Body::

        {"request_id": "chatcmpl-...", "user_id": "u1", "key_id": "key_..." | null,
         "provider": "local-mock", "model": "mock-small", "attempt": 1,
         "request": {<the OpenAI chat body: messages, stream, max_tokens, ...>}}

    * 200 ``application/json``: the ``chat.completion`` (``id`` = request_id, ``model``
      = the public model, ``provider``, ``usage`` with ``cost`` and ``estimated``);
      usage was recorded before the answer was sent.
    * 200 ``text/event-stream`` (``request.stream: true``): sent only once the provider
      produced its first chunk. Then the chunks (``id``/``model`` rewritten), and at
      the end EITHER the usage chunk (``choices: []``, ``usage`` with ``cost``) and
      ``data: [DONE]``, OR, when the provider failed mid-stream, one error chunk
      (``finish_reason: "error"``, ``error`` object, ``usage`` charged under the
      delivered-tokens rule) and no ``[DONE]``. Either terminal event is written
      only after the usage row and its event committed.
    * 424 ``{"error": {"type": "provider_error", "code", "message", "provider",
      "status", "retryable"}}``: the provider failed or refused BEFORE producing
      anything; nothing was recorded, so the orchestrator may try another provider.
      (424, not 5xx: the proxy itself is healthy and its service breaker must not trip.)
    * 400 bad envelope, 404 unknown provider or model, 401/403 not the master bearer.

``GET /internal/proxy/usage/{request_id}``: the metered usage of a request (404 none).
``GET /internal/proxy/providers``: providers, kinds, models, whether credentials are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.common.app import DB, create_service_app, json_response
from services.common.db import Database
from services.common.errors import BadRequest, NotFound
from services.common.events import EventBus
from services.common.identity import require_admin
from services.common.inputs import utcnow, validate_identifier
from services.common.money import format_micro
from services.providers.chunks import DeliveredText, stream_error_chunk
from services.providers.config import Catalog, ModelRoute, load_catalog
from services.providers.pricing import (
    cost_micro,
    estimate_prompt_tokens,
    estimate_tokens,
    message_text,
)
from services.providers.sse import encode_done, encode_event

from . import store
from .adapters import Adapter, OpenAIAdapter, ProviderError, build_adapter
from .events import record_usage
from .settings import ProxySettings

log = logging.getLogger("aiagg.proxy")

CATALOG = web.AppKey("aiagg_proxy_catalog", Catalog)
ADAPTERS = web.AppKey("aiagg_proxy_adapters", dict)

routes = web.RouteTableDef()

_ENVELOPE = {"request_id", "user_id", "key_id", "provider", "model", "attempt", "request"}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_envelope(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(data) - _ENVELOPE)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    for name in ("request_id", "user_id", "provider", "model"):
        if name not in data:
            raise BadRequest(f"'{name}' is required")
        validate_identifier(data[name], name)
    if data.get("key_id") is not None:
        validate_identifier(data["key_id"], "key_id")
    attempt = data.get("attempt", 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt <= 100:
        raise BadRequest("'attempt' must be a whole number from 1 to 100")
    body = data.get("request")
    if not isinstance(body, dict):
        raise BadRequest("'request' must be the OpenAI chat request object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'request.messages' must be a non-empty array")
    if not all(isinstance(m, dict) for m in messages):
        raise BadRequest("'request.messages' must hold objects")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'request.stream' must be a boolean")
    return data


@dataclass
class Call:
    request_id: str
    user_id: str
    key_id: str | None
    attempt: int
    route: ModelRoute
    adapter: Adapter
    body: dict[str, Any]
    stream: bool
    prompt_estimate: int


def _reported(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) when the provider's usage block is usable."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    for value in (prompt, completion):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return None
    return prompt, completion


def _usage_body(prompt: int, completion: int, cost: int, estimated: bool) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost": format_micro(cost),
        "estimated": estimated,
    }


def provider_error_response(provider: str, exc: ProviderError) -> web.Response:
    return json_response(
        {
            "error": {
                "type": "provider_error",
                "code": exc.code,
                "message": exc.message,
                "provider": provider,
                "status": exc.status,
                "retryable": exc.retryable,
            }
        },
        status=424,
    )


async def _meter(
    request: web.Request,
    call: Call,
    *,
    prompt: int,
    completion: int,
    estimated: bool,
    outcome: str,
    error: str | None,
) -> int:
    route = call.route
    cost = cost_micro(prompt, completion, route.input_price, route.output_price)
    row = store.Usage(
        request_id=call.request_id,
        user_id=call.user_id,
        key_id=call.key_id,
        provider=route.provider,
        model=route.model,
        upstream_model=route.upstream_model,
        attempt=call.attempt,
        stream=call.stream,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_micro=cost,
        estimated=estimated,
        outcome=outcome,
        error=error,
        created_at=utcnow(),
    )
    if not await record_usage(request.app[DB], row, route):
        log.warning(
            "request %s is already metered; attempt %d on %s is not metered again",
            call.request_id, call.attempt, route.provider,
        )
    return cost


@routes.post("/internal/proxy/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    require_admin(request)
    data = await _read_envelope(request)
    catalog = request.app[CATALOG]
    provider, model = data["provider"], data["model"]
    if provider not in catalog.providers:
        raise NotFound(f"no provider {provider!r} in {catalog.source}")
    route = catalog.route(provider, model)
    if route is None:
        raise NotFound(f"provider {provider!r} does not serve model {model!r}")
    body = dict(data["request"])
    body["model"] = route.upstream_model
    body.pop("stream_options", None)
    if body.get("stream"):
        # always ask for the provider's own count; the client's wish is the orchestrator's
        body["stream_options"] = {"include_usage": True}
    call = Call(
        request_id=data["request_id"],
        user_id=data["user_id"],
        key_id=data.get("key_id"),
        attempt=data.get("attempt", 1),
        route=route,
        adapter=request.app[ADAPTERS][provider],
        body=body,
        stream=bool(body.get("stream")),
        prompt_estimate=estimate_prompt_tokens(body["messages"]),
    )
    if call.stream:
        return await _stream(request, call)
    return await _complete(request, call)


async def _complete(request: web.Request, call: Call) -> web.StreamResponse:
    route = call.route
    try:
        async with asyncio.timeout(route.timeout):
            result = await call.adapter.complete(route, call.body, call.request_id)
    except ProviderError as exc:
        return provider_error_response(route.provider, exc)
    except TimeoutError:
        return provider_error_response(
            route.provider,
            ProviderError(
                f"provider {route.provider!r} did not answer within {route.timeout:g}s",
                code="provider_timeout",
            ),
        )
    reported = _reported(result.get("usage"))
    if reported is not None:
        prompt, completion, estimated = *reported, False
    else:
        text = "".join(
            message_text((c.get("message") or {}).get("content"))[0]
            for c in result.get("choices") or ()
            if isinstance(c, dict)
        )
        prompt, completion, estimated = call.prompt_estimate, estimate_tokens(text), True
    transport = request.transport
    if transport is None or transport.is_closing():
        log.warning("caller of %s hung up before the answer; not metered", call.request_id)
        return web.Response(status=499)
    cost = await _meter(
        request, call, prompt=prompt, completion=completion, estimated=estimated,
        outcome=store.COMPLETED, error=None,
    )
    answer = {
        **result,
        "id": call.request_id,
        "model": route.model,
        "provider": route.provider,
        "usage": _usage_body(prompt, completion, cost, estimated),
    }
    return json_response(answer, headers={"X-Aiagg-Provider": route.provider})


async def _next(batches: AsyncIterator[list[dict[str, Any]]], wait: float
                ) -> list[dict[str, Any]] | None:
    try:
        async with asyncio.timeout(wait):
            return await anext(batches)
    except StopAsyncIteration:
        return None


async def _stream(request: web.Request, call: Call) -> web.StreamResponse:
    route = call.route
    # a burst the provider sent at once goes on in one write: one wake-up and one read
    # for the orchestrator instead of one per chunk
    chunks = call.adapter.stream_batches(route, call.body, call.request_id)
    timeout_error = ProviderError(
        f"provider {route.provider!r} sent nothing for {route.timeout:g}s",
        code="provider_timeout",
    )
    try:
        first = await _next(chunks, route.timeout)
    except (ProviderError, TimeoutError) as exc:
        await _close(chunks)
        return provider_error_response(
            route.provider, exc if isinstance(exc, ProviderError) else timeout_error
        )
    except BaseException:
        await _close(chunks)
        raise
    if first is None:
        return provider_error_response(
            route.provider,
            ProviderError(f"provider {route.provider!r} ended the stream without any output"),
        )

    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Aiagg-Provider": route.provider,
        },
    )
    delivered = DeliveredText()
    outcome, error, cancelled = store.COMPLETED, None, False
    created = int(time.time())
    sent = 0
    usage_seen: Any = None
    try:
        await response.prepare(request)
        batch: list[dict[str, Any]] | None = first
        while batch is not None:
            events: list[bytes] = []
            passed: list[dict[str, Any]] = []
            for chunk in batch:
                if chunk.get("usage"):
                    usage_seen = chunk["usage"]
                if chunk.get("choices"):
                    passed.append(chunk)
                    out = {**chunk, "id": call.request_id, "model": route.model}
                    out.pop("usage", None)
                    events.append(encode_event(out))
            if events:
                await response.write(b"".join(events))
                for chunk in passed:  # counted once handed to the socket: what was sent
                    delivered.observe(chunk)
                sent += len(events)
            batch = await _next(chunks, route.timeout)
    except (ProviderError, TimeoutError) as exc:
        outcome = store.CUT
        error = exc.message if isinstance(exc, ProviderError) else timeout_error.message
    except (ConnectionError, OSError):
        outcome = store.CLIENT_GONE
    except asyncio.CancelledError:
        outcome, cancelled = store.CLIENT_GONE, True
    finally:
        await _close(chunks)

    if outcome == store.CLIENT_GONE and not sent:
        # the caller gave up before anything reached it (it may be trying another
        # provider): nothing was delivered, nothing is metered
        log.warning("caller of %s hung up before the first chunk; not metered", call.request_id)
        if cancelled:
            raise asyncio.CancelledError
        return response
    reported = _reported(usage_seen)
    if outcome == store.COMPLETED and reported is not None:
        prompt, completion, estimated = *reported, False
    else:
        # the estimator: for a finished answer without usage, and for every stream that
        # ended early (charged for the prompt plus the tokens delivered so far)
        prompt = reported[0] if reported is not None else call.prompt_estimate
        completion, estimated = estimate_tokens(delivered.text), True
    meter = _meter(
        request, call, prompt=prompt, completion=completion, estimated=estimated,
        outcome=outcome, error=error,
    )
    if cancelled:
        await asyncio.shield(meter)
        raise asyncio.CancelledError
    cost = await meter
    usage = _usage_body(prompt, completion, cost, estimated)
    base = {
        "id": call.request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": route.model,
        "provider": route.provider,
    }
    if outcome == store.COMPLETED:
        tail = encode_event({**base, "choices": [], "usage": usage}) + encode_done()
    elif outcome == store.CUT:
        tail = encode_event(stream_error_chunk(base, error or "", usage))
    else:
        tail = b""
    with contextlib.suppress(ConnectionError, OSError):
        await response.write_eof(tail)  # one write: the last events and the body's end
    return response


async def _close(chunks: AsyncIterator[dict[str, Any]]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


@routes.get("/internal/proxy/usage/{request_id}")
async def get_usage(request: web.Request) -> web.Response:
    require_admin(request)
    request_id = validate_identifier(request.match_info["request_id"], "request_id")
    async with request.app[DB].session() as session:
        row = await store.get_usage(session, request_id)
    if row is None:
        raise NotFound(f"no usage recorded for request {request_id!r}")
    return json_response(row.to_json())


@routes.get("/internal/proxy/providers")
async def list_providers(request: web.Request) -> web.Response:
    require_admin(request)
    catalog = request.app[CATALOG]
    adapters = request.app[ADAPTERS]
    data = []
    for name, spec in catalog.providers.items():
        adapter = adapters[name]
        data.append(
            {
                "name": name,
                "kind": spec.kind,
                "base_url": spec.base_url,
                "api_key_env": spec.api_key_env,
                "credentials": (
                    "missing"
                    if isinstance(adapter, OpenAIAdapter) and adapter.credential_missing
                    else ("set" if spec.api_key_env else "none needed")
                ),
                "models": sorted(spec.models),
            }
        )
    return json_response({"data": data, "source": catalog.source})


def _adapters_ctx(app: web.Application) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        for adapter in app[ADAPTERS].values():
            with contextlib.suppress(Exception):
                await adapter.close()

    return ctx


def create_app(
    settings: ProxySettings | None = None,
    *,
    database: Database | None = None,
    bus: EventBus | None = None,
    register: bool = True,
    catalog: Catalog | None = None,
) -> web.Application:
    """The proxy app; the providers file is read (and validated) here, at startup."""
    settings = settings or ProxySettings()
    if not settings.master_key_value():
        log.warning("MASTER_KEY is not set: the proxy's internal endpoint refuses every call")
    catalog = catalog or load_catalog(settings.providers_file)
    adapters: dict[str, Adapter] = {}
    for name, spec in catalog.providers.items():
        adapter = build_adapter(name, spec, catalog.timeout(name))
        if isinstance(adapter, OpenAIAdapter) and adapter.credential_missing:
            log.warning(
                "provider %r: %s (api_key_env) is not set; its calls will fail",
                name, spec.api_key_env,
            )
        adapters[name] = adapter
    app = create_service_app(
        settings,
        routes=routes,
        metadata=[store.metadata],
        database=database,
        bus=bus,
        register=register,
    )
    app[CATALOG] = catalog
    app[ADAPTERS] = adapters
    # before the Consul registration (the last context), so it is withdrawn first
    app.cleanup_ctx.insert(1, _adapters_ctx(app))
    return app

"""Chat completions end to end, with the official ``openai`` package pointed at the gateway:
API key (auth) -> gateway -> orchestrator -> billing hold -> proxy -> provider ->
usage.recorded -> billing charge -> analytics."""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal
from typing import Any

import openai
import pytest

from services.common.money import format_micro
from services.providers.pricing import cost_micro, estimate_prompt_tokens, estimate_tokens
from services.proxy.adapters import mock_tokens

from .conftest import Platform, eventually, micro

D = Decimal


def answer(seed: int, model: str, messages: list[dict[str, Any]]) -> list[str]:
    """What the mock provider says (its tokens), computed independently of the platform."""
    return mock_tokens(seed, model, messages)


async def raw_stream(p: Platform, key: str, body: dict[str, Any]) -> tuple[int, list[str]]:
    """POST a streamed chat straight through the gateway: (status, data of each event)."""
    async with p.http.post(
        f"{p.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        raw = await resp.read()
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    return resp.status, events


async def test_completion_stream_and_models_through_the_gateway(start_platform):
    p = await start_platform("rabbit")
    user, key = await p.new_user("5.00")
    client = p.openai(key)
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    tokens = answer(7, "mock-small", messages)
    prompt = estimate_prompt_tokens(messages)
    cost = cost_micro(prompt, len(tokens), D("0.50"), D("1.50"))

    models = await client.models.list()
    assert [m.id for m in models.data] == sorted(
        ["mock-small", "mock-odd", "fallback-model", "cut-model", "slow-model", "fake-gpt",
         "fake-nousage", "fake-broken", "fake-cut"]
    )
    assert {(m.object, m.owned_by) for m in models.data} == {("model", "aiagg")}

    done = await client.chat.completions.create(model="mock-small", messages=messages)
    assert done.id.startswith("chatcmpl-") and done.model == "mock-small"
    assert done.choices[0].message.content == "".join(tokens)
    assert done.choices[0].finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt, len(tokens))
    assert done.usage.model_extra == {"cost": format_micro(cost), "estimated": False}

    stream = await client.chat.completions.create(
        model="mock-small", messages=messages, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == len(tokens) + 3  # role, tokens, finish, usage
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
        tokens
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != done.id
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(tokens)
    assert chunks[-1].usage.model_extra["cost"] == format_micro(cost)

    plain = await client.chat.completions.create(model="mock-small", messages=messages,
                                                 stream=True)
    quiet = [chunk async for chunk in plain]
    assert all(c.choices and c.usage is None for c in quiet)  # no usage chunk unasked

    ids = {done.id, chunks[0].id, quiet[0].id}
    charges = await p.charged(user, 3)
    assert {c["request_id"] for c in charges} == ids
    assert {c["amount"] for c in charges} == {"-" + format_micro(cost)}
    assert {c["source"] for c in charges} == {"usage.recorded"}
    balance = await p.balance(user)
    assert (balance["balance"], balance["held"]) == (format_micro(5_000_000 - 3 * cost),
                                                     "0.000000")

    async def decided() -> list[dict[str, Any]] | None:
        found = await p.events("route.decided", user)
        return found if len(found) == 3 else None

    for event in await eventually(decided, what="3 route.decided"):
        data = event["data"]
        assert data["request_id"] in ids and event["source"] == "orchestrator"
        assert (data["provider"], data["fallback"], data["error"]) == ("mock-main", False, None)
        assert [a["outcome"] for a in data["attempts"]] == ["served"]
        assert data["hold"] == "usage" and data["outcome"] == "completed"


async def test_bad_key_unknown_model_and_bad_input_are_refused_precisely(start_platform):
    p = await start_platform("inprocess")
    user, key = await p.new_user("1.00")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        await p.openai("sk-not-a-key").chat.completions.create(model="mock-small",
                                                                messages=messages)
    with pytest.raises(openai.AuthenticationError):
        await p.openai("sk-not-a-key").models.list()
    with pytest.raises(openai.NotFoundError) as info:
        await p.openai(key).chat.completions.create(model="gpt-9", messages=messages)
    assert (info.value.code, info.value.param, info.value.type) == (
        "model_not_found", "model", "invalid_request_error")

    ok = {"model": "mock-small", "messages": messages}
    cases: list[tuple[Any, str | None, str]] = [
        (b"{not json", None, "invalid_json"),
        ([1, 2], None, "invalid_json"),
        ({"messages": messages}, "model", "missing_required_parameter"),
        ({"model": "mock-small"}, "messages", "missing_required_parameter"),
        ({**ok, "messages": []}, "messages", "empty_array"),
        ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role",
         "invalid_value"),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
         "invalid_type"),
        ({**ok, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
         "missing_required_parameter"),
        ({**ok, "temperature": 3}, "temperature", "invalid_value"),
        ({**ok, "temperature": "hot"}, "temperature", "invalid_type"),
        ({**ok, "stream": "yes"}, "stream", "invalid_type"),
        ({**ok, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({**ok, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({**ok, "max_tokens": 513}, "max_tokens", "invalid_value"),  # the model's cap is 512
        ({**ok, "max_tokens": 5, "max_completion_tokens": 5}, "max_tokens", "invalid_value"),
        ({**ok, "n": 2}, "n", "unsupported_value"),
        ({**ok, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    for body, param, code in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with p.http.post(f"{p.url}/v1/chat/completions", data=data,
                               headers=headers) as resp:
            status, answer_ = resp.status, await resp.json()
        error = answer_["error"]
        assert status == 400, (body, answer_)
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error", param, code), (body, error)
        assert error["message"]
    # nothing was reserved, charged or routed for any of them
    assert [t["type"] for t in await p.transactions(user)] == ["top_up"]
    assert (await p.balance(user))["held"] == "0.000000"
    assert await p.events("route.decided", user) == []


async def test_a_balance_that_does_not_cover_the_worst_case_is_402_and_nothing_is_charged(
    start_platform,
):
    p = await start_platform("rabbit")
    poor, key = await p.new_user("0.000100")  # the hold needs prompt x 0.5 + 512 x 1.5
    client = p.openai(key)
    messages = [{"role": "user", "content": "hi"}]
    refusals = []
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="mock-small", messages=messages,
                                                 stream=stream)
        assert info.value.status_code == 402
        assert (info.value.code, info.value.type) == ("insufficient_quota", "insufficient_quota")
        refusals.append(info.value.body["request_id"])
    _, stranger_key = await p.new_user(balance=None)  # no billing account at all
    with pytest.raises(openai.APIStatusError) as info:
        await p.openai(stranger_key).chat.completions.create(model="mock-small",
                                                              messages=messages)
    assert info.value.status_code == 402

    for request_id in refusals:  # no hold, no usage, nothing routed
        status, _ = await p.internal("billing", f"/internal/billing/reservations/{request_id}")
        assert status == 404
        status, _ = await p.internal("proxy", f"/internal/proxy/usage/{request_id}")
        assert status == 404
    balance = await p.balance(poor)
    assert (balance["balance"], balance["held"]) == ("0.000100", "0.000000")
    assert [t["type"] for t in await p.transactions(poor)] == ["top_up"]

    # the same request with max_tokens small enough for the balance goes through
    done = await client.chat.completions.create(model="mock-small", messages=messages,
                                                max_tokens=20)
    assert done.choices[0].message.content
    assert len(await p.charged(poor, 1)) == 1


async def test_fallback_before_the_first_byte_then_cooldown_after_consecutive_failures(
    start_platform,
):
    p = await start_platform("rabbit")
    user, key = await p.new_user("2.00")
    client = p.openai(key)
    ids: list[str] = []
    for i in range(4):
        messages = [{"role": "user", "content": f"question {i}"}]
        expected = "".join(answer(3, "fallback-model", messages))  # the backup's seed
        if i % 2:
            stream = await client.chat.completions.create(
                model="fallback-model", messages=messages, stream=True)
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            ids.append(chunks[0].id)
        else:
            done = await client.chat.completions.create(model="fallback-model",
                                                        messages=messages)
            assert done.model_extra["provider"] == "backup"
            text = done.choices[0].message.content
            ids.append(done.id)
        assert text == expected

    decisions = [await p.decision(request_id) for request_id in ids]
    for decision in decisions[:3]:  # broken-first is still tried after 1 and 2 failures
        assert [(a["provider"], a["outcome"]) for a in decision["attempts"]] == [
            ("broken-first", "failed"), ("backup", "served")]
        assert decision["fallback"] is True and decision["provider"] == "backup"
        assert "before output" in decision["attempts"][0]["error"]
    assert [(a["provider"], a["outcome"]) for a in decisions[3]["attempts"]] == [
        ("backup", "served")]  # after 3 in a row it cools down and is not even tried
    assert decisions[3]["fallback"] is False
    _, breakers = await p.internal("orchestrator", "/internal/orchestrator/providers")
    states = {b["provider"]: b["state"] for b in breakers["data"]}
    assert states["broken-first"] == "open" and states["backup"] == "closed"

    charges = {c["request_id"]: -micro(c["amount"]) for c in await p.charged(user, 4)}
    for request_id in ids:  # charged at the price of the provider that served
        usage = await p.usage(request_id)
        assert usage["provider"] == "backup"
        assert charges[request_id] == cost_micro(
            usage["prompt_tokens"], usage["completion_tokens"], D("1"), D("3"))

    async def routing() -> dict[str, int] | None:
        metrics = await p.metrics()
        return metrics["routing"] if metrics["routing"]["decisions"] == 4 else None

    assert await eventually(routing, what="4 decisions") == {
        "decisions": 4, "fallbacks": 3, "errors": 0}


async def test_a_provider_failing_mid_stream_ends_with_an_error_chunk_and_the_stated_charge(
    start_platform,
):
    p = await start_platform("rabbit")
    user, key = await p.new_user("1.00")
    client = p.openai(key)
    messages = [{"role": "user", "content": "cut me off"}]
    tokens = answer(0, "cut-model", messages)
    prompt = estimate_prompt_tokens(messages)

    stream = await client.chat.completions.create(
        model="cut-model", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.append(chunk)
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert text == "".join(tokens[:4])  # the provider died after 4 tokens
    assert "mid-stream" in info.value.message
    assert info.value.body["code"] == "stream_interrupted"
    request_id = received[0].id
    # the rule: the prompt plus the completion tokens delivered (estimated from their text)
    expected = cost_micro(prompt, estimate_tokens(text), D("1.5"), D("2.5"))

    status, events = await raw_stream(p, key, {"model": "cut-model", "messages": messages,
                                               "stream": True})
    assert status == 200 and "[DONE]" not in events  # never a clean end
    last = json.loads(events[-1])
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["error"]["code"] == "stream_interrupted"
    assert last["usage"]["cost"] == format_micro(expected) and last["usage"]["estimated"]
    raw_id = last["id"]

    charges = {c["request_id"]: -micro(c["amount"]) for c in await p.charged(user, 2)}
    assert charges == {request_id: expected, raw_id: expected}
    usage = await p.usage(request_id)
    assert (usage["outcome"], usage["estimated"], usage["cost"]) == (
        "cut", True, format_micro(expected))
    decision = await p.decision(request_id)
    assert (decision["outcome"], decision["hold"], decision["fallback"]) == ("cut", "usage",
                                                                             False)
    assert decision["error"]["code"] == "stream_interrupted"

    async def usage_events() -> list[dict[str, Any]] | None:
        found = await p.events("usage.recorded", user)
        return found if len(found) == 2 else None

    for event in await eventually(usage_events, what="2 usage events"):
        assert event["data"]["outcome"] == "cut"
        assert event["data"]["charge_rule"] == "delivered_tokens"
        assert event["data"]["cost"] == format_micro(expected)

    # not streamed, the same failure leaves nothing to deliver: 502, the hold is released
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="cut-model", messages=messages)
    assert failed.value.status_code == 502 and failed.value.code == "provider_error"
    failed_id = failed.value.body["request_id"]
    assert (await p.hold(failed_id))["status"] == "released"
    status, _ = await p.internal("proxy", f"/internal/proxy/usage/{failed_id}")
    assert status == 404
    balance = await p.balance(user)
    assert (balance["balance"], balance["held"]) == (format_micro(1_000_000 - 2 * expected),
                                                     "0.000000")

    # three failures in a row: the only provider of cut-model cools down; nothing is held
    with pytest.raises(openai.InternalServerError) as cooling:
        await client.chat.completions.create(model="cut-model", messages=messages, stream=True)
    assert cooling.value.status_code == 503 and cooling.value.code == "no_provider_available"
    assert 1 <= int(cooling.value.response.headers["Retry-After"]) <= 30
    status, _ = await p.internal(
        "billing", f"/internal/billing/reservations/{cooling.value.body['request_id']}")
    assert status == 404

    async def errors() -> int | None:
        routing = (await p.metrics())["routing"]
        return routing["errors"] if routing["decisions"] == 4 else None

    assert await eventually(errors, what="4 decisions") == 4


async def test_the_proxy_vanishing_mid_stream_is_settled_once_by_the_orchestrator(
    start_platform,
):
    p = await start_platform("inprocess", cut_proxy=True)
    user, key = await p.new_user("1.00")
    messages = [{"role": "user", "content": "a slow answer"}]
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "slow-model", "messages": messages, "stream": True}
    events: list[str] = []
    async with p.http.post(f"{p.url}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        buffer = b""
        async for piece in resp.content.iter_any():
            buffer += piece
            if buffer.count(b"\n\n") == 3 and p.cutter is not None:
                p.cutter.cut()  # the proxy is gone after the role chunk and two tokens
        events = [line[6:] for line in buffer.decode().split("\n") if line.startswith("data: ")]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["error"]["code"] == "stream_interrupted"
    request_id = last["id"]
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    expected = cost_micro(estimate_prompt_tokens(messages), estimate_tokens(text), D("2.5"),
                          D("3.5"))
    assert last["usage"]["cost"] == format_micro(expected)

    await p.charged(user, 1)
    # the proxy, still alive, notices the hang-up too and meters what it had sent: its
    # usage.recorded reaches billing as well, and must not charge a second time
    _, usage = await eventually(
        lambda: _found(p.internal("proxy", f"/internal/proxy/usage/{request_id}")),
        what="the proxy's usage row",
    )
    assert usage["outcome"] == "client_disconnected"
    await eventually(lambda: p.events("usage.recorded", user), what="the late usage event")
    await asyncio.sleep(0.3)  # billing consumes the same event on its own queue
    charges = [c for c in await p.transactions(user) if c["type"] == "charge"]
    assert [c["request_id"] for c in charges] == [request_id]
    decision = await p.decision(request_id)
    assert decision["outcome"] == "cut"
    if decision["hold"] == "settled":  # the orchestrator's settle came first
        assert charges[0]["source"] == "settle" and -micro(charges[0]["amount"]) == expected
    else:  # the proxy's usage event came first; the settle found it charged
        assert decision["hold"] == "usage"
        assert -micro(charges[0]["amount"]) == micro(usage["cost"])
    balance = await p.balance(user)
    assert balance["held"] == "0.000000"
    assert micro(balance["balance"]) == 1_000_000 + micro(charges[0]["amount"])


async def test_an_unreachable_proxy_is_503_blames_no_provider_and_charges_nothing(
    start_platform,
):
    p = await start_platform("inprocess", cut_proxy=True)
    user, key = await p.new_user("1.00")
    assert p.cutter is not None
    await p.cutter.stop()  # nothing listens where the orchestrator finds the proxy
    client = p.openai(key)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(
                model="mock-small", messages=[{"role": "user", "content": "hi"}], stream=stream)
        assert info.value.status_code == 503 and info.value.code == "proxy_unavailable"
        assert (await p.hold(info.value.body["request_id"]))["status"] == "released"
    _, breakers = await p.internal("orchestrator", "/internal/orchestrator/providers")
    assert {b["provider"]: b["failures"] for b in breakers["data"]}["mock-main"] == 0
    balance = await p.balance(user)
    assert (balance["balance"], balance["held"]) == ("1.000000", "0.000000")


async def test_billing_down_is_503_and_a_few_log_lines_not_one_per_request(
    start_platform, caplog: pytest.LogCaptureFixture
):
    p = await start_platform("inprocess", cut="billing")
    user, key = await p.new_user("1.00")
    assert p.cutter is not None
    await p.cutter.stop()  # nothing listens where the orchestrator finds billing
    caplog.set_level(logging.INFO, logger="aiagg.orchestrator")
    client = p.openai(key)
    for _ in range(20):
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(
                model="mock-small", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503 and info.value.code == "billing_unavailable"
    lines = [r for r in caplog.records if "billing unavailable for" in r.getMessage()]
    # one line per reason (connect error, then the open breaker) per 5 s, not 20
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]
    await p.cutter.start()
    assert (await p.balance(user))["balance"] == "1.000000"


@pytest.mark.parametrize(
    ("peer", "refused_as", "within"),
    [
        # the orchestrator's breaker for billing: reset_after 2s
        ("billing", {"billing_unavailable"}, 3.5),
        # the orchestrator's breaker for the proxy: the defaults' reset_after 5s
        ("proxy", {"proxy_unavailable"}, 6.5),
        # the gateway's breaker for the orchestrator: reset_after 3s
        ("orchestrator", {"bad_gateway", "circuit_open"}, 4.5),
        # the gateway's breaker for auth (forward-auth; the key was never validated, so
        # no cached answer hides the outage): the defaults' reset_after 5s
        ("auth", {"auth_unavailable"}, 6.5),
    ],
)
async def test_chat_is_back_within_seconds_of_a_peer(start_platform, peer, refused_as, within):
    """A breaker on the chat path waits a few seconds, not half a minute, before it
    tries a peer again: a restart takes about 1.5 s (bench/fault_injection.py). With the
    shipped file's earlier values (billing 5 s, the orchestrator 15 s, the defaults 30 s)
    chat stayed down for that long after the peer was back."""
    p = await start_platform("inprocess", cut=peer)
    _, key = await p.new_user("1.00")
    assert p.cutter is not None
    client = p.openai(key)
    hi = [{"role": "user", "content": "hi"}]
    await p.cutter.stop()
    for _ in range(6):  # enough failed attempts to open the breaker, then refusals
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="mock-small", messages=hi)
        assert (info.value.code or info.value.type) in refused_as  # the gateway's: type
    refused = asyncio.get_running_loop().time()
    await p.cutter.start()  # the peer is reachable again
    while True:
        try:
            await client.chat.completions.create(model="mock-small", messages=hi)
            break
        except openai.InternalServerError as exc:
            assert (exc.code or exc.type) in refused_as
            waited = asyncio.get_running_loop().time() - refused
            assert waited < within, f"chat still refused {waited:.1f} s after {peer} came back"
            await asyncio.sleep(0.1)


async def test_a_client_hanging_up_mid_stream_is_charged_for_what_was_sent(start_platform):
    p = await start_platform("inprocess")
    user, key = await p.new_user("1.00")
    messages = [{"role": "user", "content": "I will not wait"}]
    tokens = answer(11, "slow-model", messages)
    body = {"model": "slow-model", "messages": messages, "stream": True}
    async with p.http.post(f"{p.url}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}"}) as resp:
        first = (await resp.content.readuntil(b"\n\n")).decode()
        request_id = json.loads(first[6:])["id"]
        resp.connection.transport.abort()  # hang up after the first chunk

    usage = (await eventually(
        lambda: _found(p.internal("proxy", f"/internal/proxy/usage/{request_id}")),
        what="the proxy's usage row"))[1]
    assert usage["outcome"] == "client_disconnected" and usage["estimated"] is True
    assert usage["completion_tokens"] < estimate_tokens("".join(tokens))  # not all of it
    charges = await p.charged(user, 1)
    assert [(c["request_id"], c["amount"]) for c in charges] == [
        (request_id, "-" + usage["cost"])]
    decision = await eventually(lambda: _found(p.internal(
        "orchestrator", f"/internal/orchestrator/requests/{request_id}")))
    assert (decision[1]["outcome"], decision[1]["hold"], decision[1]["error"]) == (
        "client_disconnected", "usage", None)
    assert (await p.balance(user))["held"] == "0.000000"


async def _found(answer: Any) -> tuple[int, Any] | None:
    status, body = await answer
    return (status, body) if status == 200 else None


@pytest.mark.parametrize(("bus", "postgres"), [("rabbit", True), ("inprocess", False)])
async def test_twenty_requests_agree_to_the_micro_unit(start_platform, bus, postgres):
    p = await start_platform(bus, postgres=postgres)
    user, key = await p.new_user("3.000000")
    client = p.openai(key)
    reported: dict[str, str] = {}  # request id -> cost the client was told

    async def one(i: int) -> str:
        model = ("mock-small", "mock-odd", "fallback-model", "mock-odd")[i % 4]
        if i == 13:
            model = "cut-model"
        messages = [{"role": "system", "content": "s" * i},
                    {"role": "user", "content": f"request {i}: " + "x" * (7 * i)}]
        extra: dict[str, Any] = {"max_tokens": 6} if i % 5 == 0 else {}
        if i % 2 == 0 and model != "cut-model":
            done = await client.chat.completions.create(model=model, messages=messages, **extra)
            reported[done.id] = done.usage.model_extra["cost"]
            return done.id
        include = i % 4 == 1
        stream = await client.chat.completions.create(
            model=model, messages=messages, stream=True,
            stream_options={"include_usage": True} if include else None, **extra,
        )
        chunks = []
        try:
            async for chunk in stream:
                chunks.append(chunk)
        except openai.APIError:
            assert model == "cut-model"
        if include and model != "cut-model":
            reported[chunks[-1].id] = chunks[-1].usage.model_extra["cost"]
        return chunks[0].id

    ids: list[str] = []
    for batch in range(4):
        ids += await asyncio.gather(*(one(5 * batch + k) for k in range(5)))
    assert len(set(ids)) == 20

    charges = {c["request_id"]: -micro(c["amount"]) for c in await p.charged(user, 20)}
    usages = {request_id: await p.usage(request_id) for request_id in ids}
    costs = {request_id: micro(u["cost"]) for request_id, u in usages.items()}
    assert charges == costs  # one charge per request, each exactly its usage event's cost
    for request_id, cost in reported.items():
        assert micro(cost) == costs[request_id]
    for u in usages.values():
        route = {"mock-small": ("0.50", "1.50"), "mock-odd": ("1.234567", "7.654321"),
                 "fallback-model": ("1", "3"), "cut-model": ("1.5", "2.5")}[u["model"]]
        assert micro(u["cost"]) == cost_micro(u["prompt_tokens"], u["completion_tokens"],
                                              D(route[0]), D(route[1]))
    total = sum(costs.values())
    assert total > 0

    transactions = await p.transactions(user)
    balance = await p.balance(user)
    assert micro(balance["balance"]) == 3_000_000 - total
    assert balance["held"] == "0.000000"
    assert micro(transactions[0]["balance_after"]) == 3_000_000 - total  # newest first
    assert sum(-micro(t["amount"]) for t in transactions if t["type"] == "charge") == total

    async def settled() -> dict[str, Any] | None:
        metrics = await p.metrics()
        return metrics if metrics["requests"] == 20 else None

    metrics = await eventually(settled, what="20 usage events in analytics")
    assert micro(metrics["cost"]) == total
    assert [(u["user_id"], u["requests"], micro(u["cost"])) for u in metrics["by_user"]] == [
        (user, 20, total)]
    assert metrics["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages.values())
    assert metrics["completion_tokens"] == sum(u["completion_tokens"] for u in usages.values())
    events = await p.events("usage.recorded", user)
    assert {e["data"]["request_id"]: micro(e["data"]["cost"]) for e in events} == costs
    assert metrics["routing"]["decisions"] == 20
    assert metrics["routing"]["errors"] == 1  # the cut stream

"""The ``openai`` provider kind against a local OpenAI-compatible server (``FakeOpenAI``):
the platform's credential and model name go upstream, streams ask for usage, the
provider's usage is used when it gives one and estimated (and marked) when not."""

from __future__ import annotations

import json
from decimal import Decimal

import aiohttp
import openai
import pytest

from services.common.money import format_micro
from services.providers.pricing import cost_micro, estimate_prompt_tokens, estimate_tokens

from .conftest import ADMIN, FAKE_KEY, FAKE_KEY_ENV, micro

PRICES = (Decimal("0.15"), Decimal("0.60"))
MESSAGES = [{"role": "user", "content": "Say hello"}]
TEXT = "Hello from the fake provider."


async def test_the_provider_gets_our_key_and_its_model_name_and_its_usage_is_charged(
    start_platform,
):
    p = await start_platform("inprocess")
    user, key = await p.new_user("1.00")
    client = p.openai(key)
    reported = {"prompt_tokens": 1000 + len("Say hello"), "completion_tokens": 12}
    cost = cost_micro(reported["prompt_tokens"], reported["completion_tokens"], *PRICES)

    done = await client.chat.completions.create(model="fake-gpt", messages=MESSAGES,
                                                temperature=0.5, max_tokens=50)
    seen = p.fake.seen[-1]
    assert seen["headers"]["Authorization"] == f"Bearer {FAKE_KEY}"  # ours, not the client's
    assert seen["body"]["model"] == "upstream-gpt"
    assert (seen["body"]["temperature"], seen["body"]["max_tokens"]) == (0.5, 50)
    assert "stream_options" not in seen["body"] and seen["body"]["stream"] is False
    assert done.model == "fake-gpt" and done.choices[0].message.content == TEXT
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == tuple(reported.values())
    assert done.usage.model_extra == {"cost": format_micro(cost), "estimated": False}

    stream = await client.chat.completions.create(model="fake-gpt", messages=MESSAGES,
                                                  stream=True)
    chunks = [c async for c in stream]
    assert p.fake.seen[-1]["body"]["stream_options"] == {"include_usage": True}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXT
    assert all(c.usage is None for c in chunks)  # the client did not ask for it
    assert {c.model for c in chunks} == {"fake-gpt"}

    charges = {c["request_id"]: -micro(c["amount"]) for c in await p.charged(user, 2)}
    assert charges == {done.id: cost, chunks[0].id: cost}
    usage = await p.usage(chunks[0].id)
    assert (usage["estimated"], usage["upstream_model"], usage["outcome"]) == (
        False, "upstream-gpt", "completed")


async def test_usage_is_estimated_and_marked_when_the_provider_reports_none(start_platform):
    p = await start_platform("inprocess")
    user, key = await p.new_user("1.00")
    client = p.openai(key)
    prompt = estimate_prompt_tokens(MESSAGES)
    completion = estimate_tokens(TEXT)  # ceil(29 / 4) = 8
    cost = cost_micro(prompt, completion, *PRICES)

    stream = await client.chat.completions.create(
        model="fake-nousage", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        prompt, completion)
    assert chunks[-1].usage.model_extra == {"cost": format_micro(cost), "estimated": True}
    done = await client.chat.completions.create(model="fake-nousage", messages=MESSAGES)
    assert done.usage.model_extra["estimated"] is True

    charges = {c["request_id"]: -micro(c["amount"]) for c in await p.charged(user, 2)}
    assert charges == {chunks[0].id: cost, done.id: cost}
    usage = await p.usage(chunks[0].id)
    assert (usage["estimated"], usage["completion_tokens"]) == (True, completion)

    events = await p.events("usage.recorded", user)
    assert {e["data"]["charge_rule"] for e in events} == {"estimated"}


async def _http_chunks(response: aiohttp.ClientResponse) -> list[bytes]:
    """The body as the HTTP chunks it came in (one per write of the sender)."""
    chunks, part = [], b""
    async for data, end in response.content.iter_chunks():
        part += data
        if end and part:
            chunks.append(part)
            part = b""
    if part:
        chunks.append(part)
    return chunks


def _events(chunks: list[bytes]) -> list[str]:
    return [e[len("data: "):] for e in b"".join(chunks).decode().split("\n\n") if e]


async def test_a_burst_from_the_provider_goes_on_in_one_write_at_each_hop(start_platform):
    """The fake provider writes its whole answer at once. The proxy and the orchestrator
    each pass what one read brought on in one write (one HTTP chunk: one wake-up and one
    read for the next hop, not one per event), and the last events go with [DONE] and
    the end of the body."""
    p = await start_platform("inprocess")
    user, _ = await p.new_user("1.00")
    body = {"model": "fake-gpt", "messages": MESSAGES, "stream": True}
    envelope = {"request_id": "chatcmpl-burst-1", "user_id": user, "key_id": "k1",
                "provider": "local-openai", "model": "fake-gpt", "attempt": 1,
                "request": body}
    async with p.http.post(p.service_url("proxy") + "/internal/proxy/chat/completions",
                           json=envelope, headers=ADMIN) as resp:
        assert resp.status == 200
        chunks = await _http_chunks(resp)
    # role + six words + stop in one write; after metering, usage and [DONE] in another
    assert [c.count(b"data: ") for c in chunks] == [8, 2]
    events = _events(chunks)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 12
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                   for e in events[:8]) == TEXT

    identity = {"X-User-Id": user, "X-Key-Id": "k1"}  # what the gateway sets
    async with p.http.post(p.service_url("orchestrator") + "/v1/chat/completions",
                           json=body, headers=identity) as resp:
        assert resp.status == 200
        chunks = await _http_chunks(resp)
    # at most one write per read from the proxy: the proxy wrote twice
    assert len(chunks) <= 2 and chunks[-1].endswith(b"data: [DONE]\n\n")
    events = _events(chunks)
    assert len(events) == 9  # no usage chunk: the client did not ask for one
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                   for e in events[:8]) == TEXT


async def test_provider_failures_before_and_after_the_first_byte(start_platform):
    p = await start_platform("inprocess")
    user, key = await p.new_user("1.00")
    client = p.openai(key)

    with pytest.raises(openai.InternalServerError) as info:  # 500 upstream, nobody else
        await client.chat.completions.create(model="fake-broken", messages=MESSAGES,
                                             stream=True)
    assert info.value.status_code == 502 and info.value.code == "provider_error"
    assert "upstream exploded" in info.value.message
    assert (await p.hold(info.value.body["request_id"]))["status"] == "released"

    stream = await client.chat.completions.create(model="fake-cut", messages=MESSAGES,
                                                  stream=True)
    received = []
    with pytest.raises(openai.APIError) as cut:
        async for chunk in stream:
            received.append(chunk)
    assert cut.value.body["code"] == "stream_interrupted"
    text = "".join(c.choices[0].delta.content or "" for c in received)
    assert text == "Hello from"  # the server dropped the connection after two chunks
    expected = cost_micro(estimate_prompt_tokens(MESSAGES), estimate_tokens(text), *PRICES)
    charges = await p.charged(user, 1)
    assert [(c["request_id"], -micro(c["amount"])) for c in charges] == [
        (received[0].id, expected)]
    assert (await p.usage(received[0].id))["outcome"] == "cut"


async def test_a_missing_credential_fails_the_provider_clearly(start_platform, monkeypatch):
    p = await start_platform("inprocess")
    _, key = await p.new_user("1.00")
    monkeypatch.delenv(FAKE_KEY_ENV)
    with pytest.raises(openai.InternalServerError) as info:
        await p.openai(key).chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert FAKE_KEY_ENV in info.value.message
    assert p.fake.seen == []  # never called without the credential
    status, body = await p.internal("proxy", "/internal/proxy/providers")
    assert status == 200
    assert {d["name"]: d["credentials"] for d in body["data"]}["local-openai"] == "missing"

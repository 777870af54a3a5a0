"""The ``openai`` provider kind against a local OpenAI-compatible server (``FakeOpenAI``):
the platform's credential and model name go upstream, streams ask for usage, the
provider's usage is used when it gives one and estimated (and marked) when not."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from services.common.money import format_micro
from services.providers.pricing import cost_micro, estimate_prompt_tokens, estimate_tokens

from .conftest import FAKE_KEY, FAKE_KEY_ENV, micro

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

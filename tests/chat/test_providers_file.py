"""The providers file, prices, the token estimator, the SSE decoder, provider choice and
the mock provider: pure code, tested exhaustively without servers."""

from __future__ import annotations

import asyncio
import json
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp import web

from gateway.breaker import BreakerState
from gateway.clock import ManualClock
from gateway.errors import ConfigError
from services.orchestrator.routing import BreakerOpenError, ProviderPool, weighted_order
from services.providers import (
    cost_micro,
    estimate_prompt_tokens,
    estimate_tokens,
    load_catalog,
    parse_catalog,
    reserve_micro,
)
from services.providers.sse import SSEError, iter_sse_batches, iter_sse_data
from services.proxy.adapters import MockAdapter, OpenAIAdapter, ProviderError, mock_tokens

ROOT = Path(__file__).resolve().parents[2]


def parse(text: str):
    return parse_catalog(textwrap.dedent(text), "p.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problems


# -- the file ------------------------------------------------------------------------------


def test_the_platform_default_file_loads_with_the_mock_and_an_openai_example():
    catalog = load_catalog(ROOT / "providers.yaml")
    assert set(catalog.providers) == {"mock"}
    assert catalog.providers["mock"].kind == "mock"
    assert 2 <= len(catalog.models()) <= 3
    small = catalog.route("mock", "mock-small")
    assert small is not None and isinstance(small.input_price, Decimal)
    text = (ROOT / "providers.yaml").read_text()
    assert "#   kind: openai" in text and "#   api_key_env: OPENAI_API_KEY" in text


def test_a_full_provider_entry_is_read_with_defaults_applied():
    catalog = parse(
        """
        defaults: {max_output_tokens: 100, timeout: 7s, cooldown: {failures: 4, duration: 1m}}
        providers:
          router:
            kind: openai
            base_url: https://openrouter.ai/api/v1/
            api_key_env: OPENROUTER_API_KEY
            headers: {HTTP-Referer: https://example.com}
            priority: 2
            weight: 5
            models:
              gpt-4o-mini: {input_price: "0.15", output_price: 1, upstream: openai/gpt-4o-mini}
          local:
            kind: mock
            timeout: 250ms
            cooldown: {failures: 1, duration: 2s}
            models:
              gpt-4o-mini: {input_price: "0", output_price: "0", max_output_tokens: 9}
        """
    )
    routes = catalog.routes("gpt-4o-mini")
    assert [r.provider for r in routes] == ["local", "router"]  # priority 1 before 2
    local, router = routes
    assert router.upstream_model == "openai/gpt-4o-mini"
    assert router.input_price == Decimal("0.15") and router.output_price == Decimal(1)
    assert (router.max_output_tokens, router.timeout, router.weight) == (100, 7.0, 5)
    assert (router.cooldown.failures, router.cooldown.duration) == (4, 60.0)
    assert catalog.providers["router"].base_url == "https://openrouter.ai/api/v1"
    assert (local.max_output_tokens, local.timeout, local.cooldown.failures) == (9, 0.25, 1)
    assert catalog.route("local", "nope") is None and catalog.routes("nope") == []


def test_a_float_price_is_refused_with_file_line_and_field():
    found = problems(
        """
        providers:
          a:
            kind: mock
            models:
              m: {input_price: 0.15, output_price: "1"}
        """
    )
    assert len(found) == 1
    assert found[0].startswith("p.yaml:6: providers.a.models.m.input_price: ")
    assert 'write the price as a string such as "0.15"' in found[0]


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ('"0.1234567"', "at most 6 decimals"),
        ('"-1"', "decimal string"),
        ('"1e3"', "decimal string"),
        ("-2", "cannot be negative"),
        ("true", "decimal string"),
        ('"NaN"', "decimal string"),
    ],
)
def test_bad_prices(price: str, message: str):
    found = problems(
        f"""
        providers:
          a:
            kind: mock
            models:
              m: {{input_price: {price}, output_price: "1"}}
        """
    )
    assert any("input_price" in p and message in p for p in found), found


def test_a_key_written_in_the_file_is_refused():
    found = problems(
        """
        providers:
          openai:
            kind: openai
            base_url: https://api.openai.com/v1
            api_key: sk-live-123
            models: {m: {input_price: "1", output_price: "1"}}
        """
    )
    assert found == [
        "p.yaml:3: providers.openai: 'api_key' is not allowed: put the credential in an "
        "environment variable and name that variable in 'api_key_env'"
    ]


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ("kind: openai", "providers.a", "needs a base_url"),
        ("kind: mock\n    base_url: http://x", "providers.a", "has no base_url"),
        ("kind: bogus", "providers.a.kind", "'openai' or 'mock'"),
        ("kind: openai\n    base_url: ftp://x", "providers.a.base_url", "http(s) URL"),
        ("kind: openai\n    base_url: http://x\n    api_key_env: sk-abc-123",
         "providers.a.api_key_env", "NAME of an environment variable"),
        ("kind: openai\n    base_url: http://x\n    headers: {Authorization: Bearer x}",
         "providers.a.headers", "use api_key_env"),
        ("kind: mock\n    priority: -1", "providers.a.priority", "greater than or equal"),
        ("kind: mock\n    weight: 0", "providers.a.weight", "greater than or equal to 1"),
        ("kind: mock\n    timeout: soon", "providers.a.timeout", "not a duration"),
        ("kind: mock\n    mock: {failure_rate: 1.5}", "providers.a.mock.failure_rate",
         "between 0 and 1"),
        ("kind: mock\n    mock: {latency: 1s, typo: 1}", "providers.a.mock.typo",
         "unknown field"),
        ("kind: openai\n    base_url: http://x\n    mock: {seed: 1}", "providers.a",
         "only for kind 'mock'"),
        ("kind: mock\n    cooldown: {failures: 0}", "providers.a.cooldown.failures",
         "greater than or equal to 1"),
        ("kind: mock\n    colour: red", "providers.a.colour", "unknown field"),
    ],
)
def test_provider_mistakes_name_their_field(entry: str, field: str, message: str):
    text = "providers:\n  a:\n    " + entry + "\n    models: {m: {input_price: '1', " \
        "output_price: '1'}}\n"
    with pytest.raises(ConfigError) as info:
        parse_catalog(text, "p.yaml")
    assert any(p.startswith("p.yaml:") and f": {field}: " in p and message in p
               for p in info.value.problems), info.value.problems


def test_file_level_mistakes():
    assert problems("providers: {}") == ["p.yaml:1: providers: at least one provider is needed"]
    assert any("provider name 'Bad Name'" in p for p in problems(
        "providers:\n  Bad Name: {kind: mock, models: {m: {input_price: '1', output_price: '1'}}}"
    ))
    assert any("needs at least one model" in p for p in problems(
        "providers:\n  a: {kind: mock, models: {}}"
    ))
    assert any("duplicate key" in p for p in problems(
        "providers:\n  a: {kind: mock, models: {m: {input_price: '1', output_price: '1'}}}\n"
        "  a: {kind: mock, models: {m: {input_price: '1', output_price: '1'}}}\n"
    ))
    assert problems("nonsense: 1\nproviders: {}")[0].startswith("p.yaml:")


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_catalog(tmp_path / "nope.yaml")
    assert "cannot read the providers file" in info.value.message


# -- prices and tokens ---------------------------------------------------------------------


def test_cost_is_tokens_times_price_per_million_in_micro_units_rounded_half_up_once():
    d = Decimal
    assert cost_micro(1234, 56, d("0.15"), d("0.60")) == 219  # 185.1 + 33.6 = 218.7
    assert cost_micro(1, 0, d("0.5"), d("0")) == 1  # exactly .5 goes up
    assert cost_micro(3, 0, d("0.5"), d("0")) == 2  # 1.5 -> 2 (not banker's 2; 2.5 -> 3)
    assert cost_micro(5, 0, d("0.5"), d("0")) == 3
    assert cost_micro(1, 0, d("0.499999"), d("0")) == 0
    # rounded on the total: per part, 0.4 + 0.4 would round to 0 + 0
    assert cost_micro(1, 1, d("0.4"), d("0.4")) == 1
    assert cost_micro(10**9, 10**9, d("999999999.999999"), d("1")) == (
        10**9 * 999999999999999 // 10**6 + 10**9
    )
    assert cost_micro(0, 0, d("5"), d("5")) == 0


def test_reservations_round_up_and_values_are_checked():
    d = Decimal
    assert reserve_micro(1, 0, d("0.1"), d("0")) == 1
    assert reserve_micro(10, 0, d("0.1"), d("0")) == 1
    assert reserve_micro(11, 0, d("0.1"), d("0")) == 2
    with pytest.raises(ValueError):
        cost_micro(1, 1, 0.5, d("1"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cost_micro(-1, 1, d("1"), d("1"))
    with pytest.raises(ValueError):
        cost_micro(True, 1, d("1"), d("1"))


def test_the_estimator_is_one_token_per_four_characters_rounded_up():
    assert [estimate_tokens(t) for t in ("", "a", "abcd", "abcde", "é" * 8)] == [0, 1, 1, 2, 2]
    assert estimate_tokens(None) == 0
    messages = [
        {"role": "system", "content": "be brief"},  # 4 + 2
        {"role": "user", "content": [{"type": "text", "text": "hello"},  # 4 + 2 + 85
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": None, "name": "bot",  # 4 + 1 + 1 + 1
         "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
    ]
    assert estimate_prompt_tokens(messages) == 3 + 6 + 91 + 7


# -- server-sent events ----------------------------------------------------------------------


async def _pieces(pieces: list[bytes]):
    for piece in pieces:
        yield piece


async def _decode(pieces: list[bytes], **kwargs) -> list[str]:
    return [data async for data in iter_sse_data(_pieces(pieces), **kwargs)]


async def test_sse_events_are_decoded_whatever_the_chunking():
    stream = (b": keep-alive\r\nevent: x\r\ndata: {\"a\": 1}\r\n\r\n"
              b"data:two\ndata: lines\n\nid: 3\ndata: [DONE]\r\rdata: cut mid-event")
    whole = await _decode([stream])
    assert whole == ['{"a": 1}', "two\nlines", "[DONE]"]
    for size in (1, 2, 3, 7):
        pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
        assert await _decode(pieces) == whole


async def test_an_oversized_event_is_an_error():
    with pytest.raises(SSEError):
        await _decode([b"data: " + b"x" * 100 + b"\n\n"], max_event=50)
    with pytest.raises(SSEError):
        await _decode([b"data: " + b"x" * 100], max_event=50)


async def _batches(pieces: list[bytes], **kwargs) -> list[list[str]]:
    return [batch async for batch in iter_sse_batches(_pieces(pieces), **kwargs)]


async def test_sse_batches_group_the_events_each_read_completed():
    reads = [b"data: a\n\ndata: b\n\ndata: c", b"\n", b"\n", b": ping\n\n", b"data: d\n\n"]
    assert await _batches(reads) == [["a", "b"], ["c"], ["d"]]  # no empty batches

    # an error comes after the events read before it, in the same read
    got: list[list[str]] = []
    with pytest.raises(SSEError):
        async for batch in iter_sse_batches(_pieces([b"data: ok\n\ndata: " + b"x" * 100]),
                                            max_event=50):
            got.append(batch)
    assert got == [["ok"]]


async def test_the_openai_adapter_passes_a_burst_on_as_one_batch_good_chunks_before_an_error(
    aiohttp_server,
):
    """One write from the provider is one batch; a bad chunk in a burst still lets the
    chunks before it through, then fails the stream."""
    def event(content: str) -> bytes:
        chunk = {"choices": [{"index": 0, "delta": {"content": content}}]}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if (await request.json())["model"] == "bad":
            await response.write(event("one") + event("two") + b"data: {not json\n\n")
        else:
            await response.write(event("one") + event("two"))
            await asyncio.sleep(0.05)  # a second read
            done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await response.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    server = await aiohttp_server(app)
    catalog = parse_catalog(textwrap.dedent(f"""
        providers:
          up:
            kind: openai
            base_url: http://127.0.0.1:{server.port}/v1
            models:
              good: {{input_price: "1", output_price: "1", upstream: good}}
              bad: {{input_price: "1", output_price: "1", upstream: bad}}
    """))
    adapter = OpenAIAdapter("up", catalog.providers["up"], timeout=5)
    try:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        batches = [b async for b in adapter.stream_batches(catalog.route("up", "good"), body,
                                                           "r1")]
        assert [len(b) for b in batches] == [2, 1]
        assert batches[1][0]["choices"][0]["finish_reason"] == "stop"
        got = []
        with pytest.raises(ProviderError, match="not JSON"):
            async for batch in adapter.stream_batches(catalog.route("up", "bad"), body, "r2"):
                got.append(batch)
        assert [[c["choices"][0]["delta"]["content"] for c in b] for b in got] == [["one",
                                                                                     "two"]]
        # the chunk-by-chunk view is the same stream
        flat = [c async for c in adapter.stream(catalog.route("up", "good"), body, "r3")]
        assert [c for b in batches for c in b] == flat
    finally:
        await adapter.close()


# -- choosing providers --------------------------------------------------------------------

POOL_FILE = """
defaults: {cooldown: {failures: 3, duration: 10s}}
providers:
  a: {kind: mock, priority: 1, weight: 3, models: {m: {input_price: "1", output_price: "1"}}}
  b: {kind: mock, priority: 1, weight: 1, models: {m: {input_price: "1", output_price: "1"}}}
  c: {kind: mock, priority: 0, models: {m: {input_price: "1", output_price: "1"}}}
  d: {kind: mock, priority: 5, models: {m: {input_price: "1", output_price: "1"},
                                        other: {input_price: "1", output_price: "1"}}}
"""


def test_priority_first_then_weighted_random_within_a_priority():
    catalog = parse_catalog(POOL_FILE)
    draws = iter([0.1, 0.9])  # a (0.1 x 4 < 3) then b; b (0.9 x 4 >= 3) then a
    pool = ProviderPool(catalog, rand=lambda: next(draws))
    assert [r.provider for r in pool.plan("m")] == ["c", "a", "b", "d"]
    assert [r.provider for r in pool.plan("m")] == ["c", "b", "a", "d"]
    assert pool.plan("unknown") == []


def test_weights_are_respected_over_many_draws():
    catalog = parse_catalog(POOL_FILE)
    routes = [r for r in catalog.routes("m") if r.provider in ("a", "b")]
    import random

    rng = random.Random(42)
    firsts = [weighted_order(routes, rng.random)[0].provider for _ in range(4000)]
    share = firsts.count("a") / len(firsts)
    assert 0.72 < share < 0.78  # weight 3 of 4


def test_a_provider_cools_down_after_consecutive_failures_not_after_one():
    clock = ManualClock()
    pool = ProviderPool(parse_catalog(POOL_FILE), clock=clock)
    for _ in range(2):
        pool.acquire("c").failure()
    pool.acquire("c").success()  # a success resets the count
    for _ in range(2):
        pool.acquire("c").failure()
        assert "c" in [r.provider for r in pool.plan("m")]
    pool.acquire("c").failure()  # the third in a row
    assert pool.cooling_down("c")
    assert "c" not in [r.provider for r in pool.plan("m")]
    with pytest.raises(BreakerOpenError):
        pool.acquire("c")
    assert pool.retry_after("m") == pytest.approx(10.0)
    clock.advance(10)
    assert pool.plan("m")[0].provider == "c"  # half-open: one probe
    probe = pool.acquire("c")
    with pytest.raises(BreakerOpenError):
        pool.acquire("c")  # only one probe at a time
    probe.failure()
    assert pool.breakers["c"].state is BreakerState.OPEN  # back to cooling down
    clock.advance(10)
    pool.acquire("c").success()
    assert pool.breakers["c"].state is BreakerState.CLOSED
    assert {s["provider"] for s in pool.snapshot()} == {"a", "b", "c", "d"}


# -- the mock provider -----------------------------------------------------------------------

MOCKS = """
providers:
  plain: {kind: mock, models: {m: {input_price: "1", output_price: "1"}}}
  before: {kind: mock, mock: {failure_rate: 1}, models: {m: {input_price: "1", output_price: "1"}}}
  mid:
    kind: mock
    mock: {mid_stream_failure_rate: 1, fail_after_tokens: 2}
    models: {m: {input_price: "1", output_price: "1"}}
  half: {kind: mock, mock: {failure_rate: 0.5}, models: {m: {input_price: "1", output_price: "1"}}}
"""


def _mock(name: str):
    catalog = parse_catalog(MOCKS)
    return MockAdapter(name, catalog.providers[name]), catalog.route(name, "m")


async def test_the_mock_answers_deterministically_from_the_prompt():
    adapter, route = _mock("plain")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    one = await adapter.complete(route, body, "r1")
    two = await adapter.complete(route, body, "r2")
    other = await adapter.complete(route, {"messages": [{"role": "user", "content": "yo"}]}, "r3")
    text = one["choices"][0]["message"]["content"]
    assert text == two["choices"][0]["message"]["content"] != other["choices"][0]["message"][
        "content"]
    tokens = mock_tokens(0, "m", body["messages"])
    assert text == "".join(tokens) and 8 <= len(tokens) <= 24
    assert one["usage"] == {"prompt_tokens": estimate_prompt_tokens(body["messages"]),
                            "completion_tokens": len(tokens),
                            "total_tokens": estimate_prompt_tokens(body["messages"]) + len(tokens)}
    short = await adapter.complete(route, {**body, "max_tokens": 2}, "r4")
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 2

    chunks = [c async for c in adapter.stream(
        route, {**body, "stream_options": {"include_usage": True}}, "r5")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == text
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == one["usage"]
    no_usage = [c async for c in adapter.stream(route, body, "r6")]
    assert all(c["choices"] for c in no_usage)


async def test_the_mock_fails_before_the_first_byte_or_mid_stream_as_configured():
    adapter, route = _mock("before")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ProviderError, match="before output"):
        await adapter.complete(route, body, "r1")
    with pytest.raises(ProviderError):
        await anext(adapter.stream(route, body, "r1"))

    adapter, route = _mock("mid")
    got = []
    with pytest.raises(ProviderError) as info:
        async for chunk in adapter.stream(route, body, "r1"):
            got.append(chunk)
    assert info.value.code == "stream_interrupted"
    assert len(got) == 3  # the role chunk, then 2 tokens
    with pytest.raises(ProviderError, match="while generating"):
        await adapter.complete(route, body, "r1")

    adapter, route = _mock("half")
    outcomes = []
    for i in range(400):
        try:
            await adapter.complete(route, body, f"req-{i}")
            outcomes.append(True)
        except ProviderError:
            outcomes.append(False)
    again = []
    for i in range(400):
        try:
            await adapter.complete(route, body, f"req-{i}")
            again.append(True)
        except ProviderError:
            again.append(False)
    assert outcomes == again  # deterministic per request
    assert 0.4 < outcomes.count(False) / 400 < 0.6

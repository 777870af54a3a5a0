"""Provider adapters: how the proxy talks to one provider.

Two kinds, one interface (:class:`Adapter`):

* :class:`OpenAIAdapter` for any OpenAI-compatible base URL (OpenAI, vLLM, Ollama,
  OpenRouter, ...): ``POST {base_url}/chat/completions`` with the platform's key from
  the provider's ``api_key_env``; streams ask for ``stream_options: {include_usage:
  true}`` so the provider reports usage in its final chunk.
* :class:`MockAdapter`, the built-in ``mock`` provider: no network, deterministic
  answers derived from the prompt (the same messages, model and seed give the same
  answer), streamed one token per chunk, with configurable latency and failures
  before the first byte or in the middle of a stream (see ``MockSpec``).

Both raise :class:`ProviderError` for every provider failure; ``retryable`` says
whether another provider may do better (a malformed request will not).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from services.providers.config import MockSpec, ModelRoute, ProviderSpec
from services.providers.pricing import estimate_prompt_tokens
from services.providers.sse import DONE, SSEError, iter_sse_batches

__all__ = ["Adapter", "MockAdapter", "OpenAIAdapter", "ProviderError", "build_adapter"]

#: statuses meaning "this request is wrong": another provider would refuse it too
_CLIENT_FAULT = frozenset({400, 413, 422})


class ProviderError(Exception):
    """A provider failed (or refused). ``code`` is for the error body; ``status`` is the
    provider's HTTP status when it answered one."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "provider_error",
        status: int | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retryable = retryable


class Adapter(ABC):
    def __init__(self, name: str, spec: ProviderSpec) -> None:
        self.name = name
        self.spec = spec

    @abstractmethod
    async def complete(
        self, route: ModelRoute, body: dict[str, Any], request_id: str
    ) -> dict[str, Any]:
        """A whole ``chat.completion`` object (with ``usage`` when the provider gives it)."""

    @abstractmethod
    def stream(
        self, route: ModelRoute, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        """``chat.completion.chunk`` objects, the usage chunk (empty ``choices``) last
        when the provider sends one; raises :class:`ProviderError` on failure."""

    async def stream_batches(
        self, route: ModelRoute, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The chunks of :meth:`stream`, grouped as they arrived (non-empty lists), so a
        caller can pass a burst on in one write. By default one chunk per list."""
        async for chunk in self.stream(route, body, request_id):
            yield [chunk]

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


# -- the mock provider ------------------------------------------------------------------

_VOCAB = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "river",
    "stone", "cloud", "signal", "vector", "matrix", "lantern", "harbor", "meadow", "copper",
    "silver", "orbit", "prism", "ember", "cedar", "falcon", "glacier", "island", "jasmine",
    "kernel", "lotus", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron",
    "timber", "umber", "velvet", "willow", "zenith", "anchor", "beacon", "canyon", "dune",
    "fable",
)


def _digest(*parts: Any) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from the parts."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2**64


def mock_tokens(seed: int, model: str, messages: list[dict[str, Any]]) -> list[str]:
    """The mock's whole answer as tokens (one word each, 8 to 24 of them)."""
    digest = _digest(seed, model, json.dumps(messages, sort_keys=True, ensure_ascii=False))
    count = 8 + digest[0] % 17
    words = [_VOCAB[b % len(_VOCAB)] for b in digest[1 : 1 + count]]
    words[0] = words[0].capitalize()
    words[-1] += "."
    return [words[0]] + [" " + w for w in words[1:]]


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


class MockAdapter(Adapter):
    """See the module doc. Failure draws are deterministic per (seed, provider, request)."""

    def __init__(self, name: str, spec: ProviderSpec) -> None:
        super().__init__(name, spec)
        self.mock: MockSpec = spec.mock or MockSpec()

    def plan(self, route: ModelRoute, body: dict[str, Any], request_id: str):
        """(tokens, finish_reason, fail_before, fail_at) for this request."""
        m = self.mock
        tokens = mock_tokens(m.seed, route.model, body.get("messages") or [])
        finish = "stop"
        limit = _max_tokens(body)
        if limit is not None and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
        fail_before = _unit(m.seed, self.name, request_id, "before") < m.failure_rate
        fail_at = None
        if _unit(m.seed, self.name, request_id, "mid") < m.mid_stream_failure_rate:
            fail_at = min(m.fail_after_tokens, len(tokens))
        return tokens, finish, fail_before, fail_at

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = estimate_prompt_tokens(body.get("messages") or [])
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def complete(
        self, route: ModelRoute, body: dict[str, Any], request_id: str
    ) -> dict[str, Any]:
        tokens, finish, fail_before, fail_at = self.plan(route, body, request_id)
        if self.mock.latency:
            await asyncio.sleep(self.mock.latency)
        if fail_before:
            raise ProviderError(f"mock provider {self.name!r} failed (simulated, before output)")
        if fail_at is not None:
            raise ProviderError(f"mock provider {self.name!r} failed while generating (simulated)")
        return {
            "id": f"mock-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": route.upstream_model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens)},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": self._usage(body, len(tokens)),
        }

    async def stream(
        self, route: ModelRoute, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        tokens, finish, fail_before, fail_at = self.plan(route, body, request_id)
        cid, created, model = f"mock-{request_id}", int(time.time()), route.upstream_model
        if self.mock.latency:
            await asyncio.sleep(self.mock.latency)
        if fail_before:
            raise ProviderError(f"mock provider {self.name!r} failed (simulated, before output)")
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, None)
        for i, token in enumerate(tokens):
            if fail_at is not None and i == fail_at:
                break
            if self.mock.chunk_delay:
                await asyncio.sleep(self.mock.chunk_delay)
            yield _chunk(cid, created, model, {"content": token}, None)
        if fail_at is not None:
            raise ProviderError(
                f"mock provider {self.name!r} failed mid-stream (simulated) after {fail_at} "
                "token(s)",
                code="stream_interrupted",
            )
        yield _chunk(cid, created, model, {}, finish)
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            yield {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": self._usage(body, len(tokens)),
            }


# -- OpenAI-compatible providers ----------------------------------------------------------


class OpenAIAdapter(Adapter):
    """Any OpenAI-compatible ``/chat/completions``; one pooled aiohttp session each."""

    def __init__(self, name: str, spec: ProviderSpec, timeout: float) -> None:
        super().__init__(name, spec)
        assert spec.base_url is not None
        self.url = spec.base_url + "/chat/completions"
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(10.0, timeout), sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def credential_missing(self) -> bool:
        env = self.spec.api_key_env
        return bool(env) and not os.environ.get(env or "", "").strip()

    def _session_(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=200, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self.spec.headers}
        env = self.spec.api_key_env
        if env:
            key = os.environ.get(env, "").strip()
            if not key:
                raise ProviderError(
                    f"provider {self.name!r}: the environment variable {env} (api_key_env) "
                    "is not set",
                    code="provider_credentials_missing",
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    async def _error(self, response: aiohttp.ClientResponse) -> ProviderError:
        raw = await response.content.read(4096)
        message = raw.decode("utf-8", errors="replace").strip()
        try:
            data = json.loads(raw)
            error = data.get("error") if isinstance(data, dict) else None
            if isinstance(error, dict) and error.get("message"):
                message = str(error["message"])
            elif isinstance(error, str):
                message = error
        except ValueError:
            pass
        retryable = response.status not in _CLIENT_FAULT
        return ProviderError(
            f"provider {self.name!r} answered {response.status}: {message[:500]}",
            code="provider_error" if retryable else "provider_rejected_request",
            status=response.status,
            retryable=retryable,
        )

    def _failure(self, exc: BaseException) -> ProviderError:
        if isinstance(exc, TimeoutError):
            return ProviderError(
                f"provider {self.name!r} did not answer in time", code="provider_timeout"
            )
        return ProviderError(
            f"provider {self.name!r} could not be reached: {type(exc).__name__}: {exc}"[:500],
            code="provider_unreachable",
        )

    async def complete(
        self, route: ModelRoute, body: dict[str, Any], request_id: str
    ) -> dict[str, Any]:
        payload = {**body, "model": route.upstream_model, "stream": False}
        payload.pop("stream_options", None)
        try:
            async with self._session_().post(
                self.url, json=payload, headers=self._headers(), timeout=self.timeout
            ) as response:
                if response.status != 200:
                    raise await self._error(response)
                try:
                    data = await response.json(content_type=None)
                except ValueError as exc:
                    raise ProviderError(
                        f"provider {self.name!r} answered invalid JSON: {exc}"
                    ) from None
        except ProviderError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failure(exc) from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise ProviderError(f"provider {self.name!r} answered without 'choices'")
        return data

    async def stream(
        self, route: ModelRoute, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        async for batch in self.stream_batches(route, body, request_id):
            for chunk in batch:
                yield chunk

    async def stream_batches(
        self, route: ModelRoute, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """One list per read from the provider; a bad chunk ends the stream with a
        :class:`ProviderError` after the good chunks read before it."""
        payload = {
            **body,
            "model": route.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        finished = False
        try:
            async with self._session_().post(
                self.url, json=payload, headers=self._headers(), timeout=self.timeout
            ) as response:
                if response.status != 200:
                    raise await self._error(response)
                kind = response.headers.get("Content-Type", "")
                if "text/event-stream" not in kind:
                    raise ProviderError(
                        f"provider {self.name!r} answered {kind or 'no content type'} "
                        "instead of an event stream"
                    )
                async for datas in iter_sse_batches(response.content.iter_any()):
                    batch: list[dict[str, Any]] = []
                    try:
                        for data in datas:
                            if data.strip() == DONE:
                                if batch:
                                    yield batch
                                return
                            chunk = self._chunk(data)
                            for choice in chunk.get("choices") or ():
                                if isinstance(choice, dict) and choice.get("finish_reason"):
                                    finished = True
                            batch.append(chunk)
                    except ProviderError:
                        if batch:
                            yield batch
                        raise
                    yield batch
        except ProviderError:
            raise
        except SSEError as exc:
            raise ProviderError(f"provider {self.name!r}: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failure(exc) from None
        if not finished:
            raise ProviderError(
                f"provider {self.name!r} ended the stream before finishing the answer",
                code="stream_interrupted",
            )

    def _chunk(self, data: str) -> dict[str, Any]:
        """One event's chunk, checked; a provider's mid-stream error is raised."""
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ProviderError(f"provider {self.name!r} sent a chunk that is not JSON") from None
        if not isinstance(chunk, dict):
            raise ProviderError(f"provider {self.name!r} sent a non-object chunk")
        if chunk.get("error"):
            error = chunk["error"]
            text = error.get("message") if isinstance(error, dict) else str(error)
            raise ProviderError(
                f"provider {self.name!r} reported an error mid-stream: {text}"[:500],
                code="stream_interrupted",
            )
        return chunk

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def build_adapter(name: str, spec: ProviderSpec, timeout: float) -> Adapter:
    if spec.kind == "mock":
        return MockAdapter(name, spec)
    return OpenAIAdapter(name, spec, timeout)
